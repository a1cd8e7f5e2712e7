"""MovieLens-1M as two domains: a small target domain and a large source domain.

The shared construction of the cross-domain papers (MiNet, FARM, Moment&Cross):

- each movie's domain is its *first-listed* genre's group: A = Action, Adventure, Sci-Fi,
  Fantasy, War, Western; B = Comedy, Romance, Musical, Animation, Children's; C = Drama, Crime,
  Thriller, Horror, Mystery, Film-Noir, Documentary. Target = A, source = B and C;
- users with at least 3 target ratings are kept;
- ``target_keep`` < 1 drops that share of the target ratings at random, never one of a user's
  last 2 (the valid and test events), so the source outweighs the target as in the papers'
  logs (0.25 gives about 8.5 source ratings per target rating);
- labels: ``like`` = rating >= 4, ``valuable`` = rating == 5. With ``click_task`` every rating is
  a click (``click`` = 1, the first label) and gets ``negatives`` unclicked rows: items of the
  same domain the user never rated (in the whole file), drawn once per ``seed``, at the rating's
  time, with every label 0;
- split (column ``split``, use ``SplitConfig(kind="column")``): per user, the last target rating
  (by time, then file order) is test, the one before it valid, the other target ratings train;
  sampled negatives follow their rating. Source ratings are training samples when
  ``source_samples`` and earlier than the user's valid rating; the others, and all of them
  without ``source_samples``, only feed the histories;
- histories are views on the users' timelines, restricted to one domain and to positive events
  (``like``, or ``click`` in the click task), strictly earlier than the sample:
  ``hist_target_<field>`` (the last ``target_history_len``) and ``hist_source_<field>`` (the last
  ``source_history_len``) for the item fields ``item_id``, ``genre`` and ``year``.

Columns: user_id, item_id (int64); gender, age, occupation, zip, year, genre (first-listed
genre), domain ("target" / "source"), group ("A" / "B" / "C"), split (str); genres (list[str]);
rating (int64, 0 on sampled rows; not a feature); timestamp (int64 seconds); [click,] like,
valuable (int8).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from recforge.data.schema import Feature, Kind, Schema
from recforge.data.sources import RawDataset
from recforge.data.sources._download import dataset_dir
from recforge.data.sources.movielens import GENRES_MAX_LEN, ML_1M, _check_joined, _read_1m
from recforge.errors import DataError

GROUPS = {
    "A": ("Action", "Adventure", "Sci-Fi", "Fantasy", "War", "Western"),
    "B": ("Comedy", "Romance", "Musical", "Animation", "Children's"),
    "C": ("Drama", "Crime", "Thriller", "Horror", "Mystery", "Film-Noir", "Documentary"),
}
TARGET_GROUPS = ("A",)
USER_FIELDS = ("user_id", "gender", "age", "occupation", "zip")
ITEM_FIELDS = ("item_id", "genre", "year")  # the fields of a movie, as candidate and in histories
MIN_TARGET_RATINGS = 3
_KEEP_STREAM, _NEGATIVE_STREAM = 1, 2  # sub-streams of the seed


def load(
    target_keep: float = 1.0,
    click_task: bool = False,
    negatives: int = 4,
    seed: int = 0,
    target_history_len: int = 10,
    source_history_len: int = 20,
    source_samples: bool = True,
    root: str | Path | None = None,
) -> RawDataset:
    """The two-domain table (see the module docstring); ``root`` holds ``ml-1m.zip``."""
    if not 0.0 < target_keep <= 1.0:
        raise DataError(f"target_keep must be in (0, 1], got {target_keep}")
    if click_task and negatives < 1:
        raise DataError(f"the click task needs negatives >= 1, got {negatives}")
    if target_history_len < 0 or source_history_len < 0:
        raise DataError("history lengths must be >= 0")
    base = dataset_dir("movielens-1m", [ML_1M], root=root)
    ratings, users, movies, origin = _read_1m(base / ML_1M.name)
    movies = with_domains(movies)
    rated = ratings.with_row_index("_file_row").join(
        movies, on="item_id", how="left", validate="m:1", maintain_order="left"
    )
    _check_joined(rated, "domain", "item_id", origin["movies"])

    frame = keep_target_users(rated)
    frame = drop_target_ratings(frame, target_keep, seed)
    frame = assign_split(frame, source_samples)
    frame = frame.with_columns(
        like=(pl.col("rating") >= 4).cast(pl.Int8), valuable=(pl.col("rating") == 5).cast(pl.Int8)
    )
    if click_task:
        frame = frame.with_columns(click=pl.lit(1, dtype=pl.Int8))
        sampled = sample_negatives(frame.filter(pl.col("split") != "history"), rated, movies, negatives, seed)
        frame = pl.concat([frame, sampled], how="diagonal_relaxed")
    frame = frame.join(users, on="user_id", how="left", validate="m:1", maintain_order="left")
    _check_joined(frame, "gender", "user_id", origin["users"])
    labels = ["click", "like", "valuable"] if click_task else ["like", "valuable"]
    frame = frame.select(
        *USER_FIELDS, *ITEM_FIELDS, "genres", "domain", "group", "rating", "timestamp",
        "split", *labels,
    )  # fmt: skip
    return RawDataset(
        frame=frame,
        schema=schema(labels, target_history_len, source_history_len),
        origin=origin["ratings"],
    )


def schema(labels: list[str], target_history_len: int = 10, source_history_len: int = 20) -> Schema:
    """Schema of :func:`load`'s frame; histories keep the events positive on ``labels[0]``."""
    features = [Feature(name=c, kind=Kind.CATEGORICAL) for c in (*USER_FIELDS, *ITEM_FIELDS, "domain")]
    features.append(Feature(name="genres", kind=Kind.SEQUENCE, max_len=GENRES_MAX_LEN, vocab="genre"))
    for domain, length in (("target", target_history_len), ("source", source_history_len)):
        if length:
            features += [
                Feature(
                    name=f"hist_{domain}_{field}", kind=Kind.SEQUENCE, timeline=field, max_len=length,
                    where={"domain": domain, labels[0]: 1},
                )  # fmt: skip
                for field in ITEM_FIELDS
            ]
    return Schema(features=features, labels=labels, user="user_id", time="timestamp", domain="domain")


def with_domains(movies: pl.DataFrame) -> pl.DataFrame:
    """Movies with their first-listed ``genre``, its ``group`` (A/B/C) and ``domain``."""
    genre_group = {genre: group for group, genres in GROUPS.items() for genre in genres}
    movies = movies.with_columns(genre=pl.col("genres").list.first())
    unknown = movies.filter(~pl.col("genre").is_in(list(genre_group)) | pl.col("genre").is_null())
    if unknown.height:
        raise DataError(f"movie {unknown['item_id'][0]}: first genre {unknown['genre'][0]!r} is in no domain group")
    group = pl.col("genre").replace_strict(genre_group)
    domain = pl.when(group.is_in(TARGET_GROUPS)).then(pl.lit("target")).otherwise(pl.lit("source"))
    return movies.with_columns(group=group, domain=domain)


def keep_target_users(rated: pl.DataFrame) -> pl.DataFrame:
    """The ratings of users with at least ``MIN_TARGET_RATINGS`` target ratings."""
    n_target = (pl.col("domain") == "target").sum().over("user_id")
    return rated.filter(n_target >= MIN_TARGET_RATINGS)


def _from_end() -> pl.Expr:
    """0 for a user's last rating of a domain (by time, then file order), 1 for the one before, ..."""
    return pl.struct("timestamp", "_file_row").rank("ordinal", descending=True).over("user_id", "domain") - 1


def drop_target_ratings(frame: pl.DataFrame, keep: float, seed: int) -> pl.DataFrame:
    """Keep each target rating with probability ``keep``, and always a user's last 2."""
    if keep >= 1.0:
        return frame
    draw = np.random.default_rng([seed, _KEEP_STREAM]).random(frame.height)
    kept = (pl.col("domain") == "source") | (_from_end() < 2) | (pl.Series(draw) < keep)
    return frame.filter(kept)


def assign_split(frame: pl.DataFrame, source_samples: bool) -> pl.DataFrame:
    """Leave-last-out on the target domain; source ratings train (before valid) or history."""
    frame = frame.with_columns(_from_end=_from_end())
    from_end, is_target = pl.col("_from_end"), pl.col("domain") == "target"
    valid_time = pl.col("timestamp").filter(is_target & (from_end == 1)).first().over("user_id")
    target_split = pl.when(from_end == 0).then(pl.lit("test")).when(from_end == 1).then(pl.lit("valid"))
    source_split = pl.when(pl.lit(source_samples) & (pl.col("timestamp") < valid_time)).then(pl.lit("train"))
    split = pl.when(is_target).then(target_split.otherwise(pl.lit("train"))).otherwise(
        source_split.otherwise(pl.lit("history"))
    )
    return frame.with_columns(split=split).drop("_from_end")


def sample_negatives(
    clicks: pl.DataFrame, rated: pl.DataFrame, movies: pl.DataFrame, per_click: int, seed: int
) -> pl.DataFrame:
    """``per_click`` unclicked rows per row of ``clicks``: distinct items of the click's domain
    that its user never rated (anywhere in ``rated``), at the click's time and split, labels 0."""
    domains = ["target", "source"]
    pools = [rated.filter(pl.col("domain") == d)["item_id"].unique().sort().to_numpy() for d in domains]
    pool_offset = np.array([0, len(pools[0])])
    pool_size = np.array([len(p) for p in pools])
    all_items = np.concatenate(pools)
    n_items = int(all_items.max()) + 1
    seen = np.sort(rated["user_id"].to_numpy() * n_items + rated["item_id"].to_numpy())  # [R] sorted (user, item) keys

    # a user needs per_click unrated items in the domain of each click
    rated_in_domain = rated.group_by("user_id", "domain").agg(pl.col("item_id").n_unique().alias("n"))
    short = rated_in_domain.filter(
        pl.col("n") > pl.col("domain").replace_strict(dict(zip(domains, pool_size.tolist()))) - per_click
    ).join(clicks.select("user_id", "domain").unique(), on=["user_id", "domain"])
    if short.height:
        raise DataError(f"user {short['user_id'][0]} has fewer than {per_click} unrated {short['domain'][0]} items")

    user = clicks["user_id"].to_numpy()
    domain = (clicks["domain"] == "source").cast(pl.Int64).to_numpy()  # [C] 0 target, 1 source
    rng = np.random.default_rng([seed, _NEGATIVE_STREAM])
    picks = np.zeros((len(user), per_click), dtype=np.int64)  # [C, K]
    for slot in range(per_click):  # rejection sampling, one vectorised draw per round
        todo = np.arange(len(user))
        while len(todo):
            d = domain[todo]
            candidate = all_items[pool_offset[d] + (rng.random(len(todo)) * pool_size[d]).astype(np.int64)]
            key = user[todo] * n_items + candidate
            rated_before = seen[np.minimum(np.searchsorted(seen, key), len(seen) - 1)] == key
            repeated = (picks[todo, :slot] == candidate[:, None]).any(1)
            ok = ~rated_before & ~repeated
            picks[todo[ok], slot] = candidate[ok]
            todo = todo[~ok]
    item_fields = movies.select("item_id", "genre", "year", "genres", "domain", "group")
    return (
        clicks.select("user_id", "timestamp", "split")[np.repeat(np.arange(len(user)), per_click)]
        .with_columns(item_id=pl.Series(picks.reshape(-1)))
        .join(item_fields, on="item_id", how="left", validate="m:1", maintain_order="left")
        .with_columns(
            rating=pl.lit(0, dtype=pl.Int64),
            click=pl.lit(0, dtype=pl.Int8),
            like=pl.lit(0, dtype=pl.Int8),
            valuable=pl.lit(0, dtype=pl.Int8),
        )
    )
