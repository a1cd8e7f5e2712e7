"""Filtered timeline views, the column split and the MovieLens-1M two-domain source."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recforge.data.prepare import DataError, prepare
from recforge.data.schema import Feature, Schema
from recforge.data.sources import RawDataset, load_source
from recforge.data.splits import SplitConfig, assign_splits


def tiny_schema(where: dict | None = None, length: int = 4) -> Schema:
    features = [
        Feature(name="user_id", kind="categorical"),
        Feature(name="item_id", kind="categorical"),
        Feature(name="domain", kind="categorical"),
        Feature(name="hist_all", kind="sequence", timeline="item_id", max_len=length),
        Feature(name="hist_a_pos", kind="sequence", timeline="item_id", max_len=length, where=where or {"domain": "a", "click": 1}),
    ]
    return Schema(features=features, labels=["click"], user="user_id", time="t", domain="domain")


def tiny_frame(n_users: int = 12, per_user: int = 15, seed: int = 0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    n = n_users * per_user
    split = np.where(rng.random(n) < 0.7, "train", np.where(rng.random(n) < 0.5, "valid", "test")).astype(object)
    split[rng.random(n) < 0.15] = "history"
    return pl.DataFrame(
        {
            "user_id": np.repeat(np.arange(n_users), per_user),
            "item_id": rng.integers(0, 30, n),
            "domain": rng.choice(["a", "b"], n),
            "t": rng.integers(0, 20, n),  # many ties in time
            "click": rng.integers(0, 2, n),
            "split": split,
        }
    )


def naive_history(frame: pl.DataFrame, row: int, length: int, where: dict) -> list[int]:
    """The item ids of the row's user's matching events strictly before its time, last ``length``."""
    me = frame.row(row, named=True)
    events = frame.with_row_index("_r").filter(
        (pl.col("user_id") == me["user_id"]) & (pl.col("t") < me["t"]),
        *[pl.col(c) == v for c, v in where.items()],
    ).sort("t", "_r")
    return events["item_id"].to_list()[-length:]


def test_filtered_view_holds_only_matching_strictly_earlier_events(tmp_path):
    frame = tiny_frame()
    store = prepare(RawDataset(frame, tiny_schema(), "memory"), tmp_path / "s", SplitConfig(kind="column"))
    vocab = store.vocabulary("item_id")
    decode = dict(zip(vocab["index"].to_list(), vocab["value"].cast(pl.Int64).to_list()))
    checked = 0
    for split in ("train", "valid", "test"):
        view = store.split(split)
        batch = view.take(np.arange(len(view)))
        for i, row in enumerate(np.asarray(view.row)):
            for name, where in (("hist_all", {}), ("hist_a_pos", {"domain": "a", "click": 1})):
                expected = naive_history(frame, int(row), 4, where)
                got = [v for v in batch.sequences[name][i].tolist() if v != 0]
                # items unseen in train are OOV (1) in the store; compare the known ones
                assert len(got) == len(expected)
                assert all(decode.get(g, e) == e for g, e in zip(got, expected) if g != 1)
                checked += 1
    assert checked > 100


def test_filtered_views_differ_and_sharing_a_filter_shares_the_window(tmp_path):
    frame = tiny_frame(seed=3)
    schema = tiny_schema()
    schema.features.append(
        Feature(name="hist_a_pos_domain", kind="sequence", timeline="domain", max_len=4, where={"click": 1, "domain": "a"})
    )
    store = prepare(RawDataset(frame, Schema.model_validate(schema.model_dump()), "memory"), tmp_path / "s", SplitConfig(kind="column"))
    assert len(store.schema.history_views) == 2  # the key order of a filter does not matter
    train = store.split("train")
    batch = train.take(np.arange(len(train)))
    filtered, everything = batch.sequences["hist_a_pos"], batch.sequences["hist_all"]
    assert (filtered != 0).sum() < (everything != 0).sum()
    domain_a = store.vocabulary("domain").filter(pl.col("value") == "a")["index"][0]
    hist_domains = batch.sequences["hist_a_pos_domain"]
    assert ((hist_domains == 0) | (hist_domains == domain_a)).all()
    assert ((hist_domains != 0) == (filtered != 0)).all()


def test_column_split_codes_and_history_rows(tmp_path):
    frame = tiny_frame(seed=1)
    codes = assign_splits(frame, tiny_schema(), SplitConfig(kind="column"))
    expected = frame["split"].replace_strict({"train": 0, "valid": 1, "test": 2, "history": -1}).to_numpy()
    assert np.array_equal(codes, expected)
    store = prepare(RawDataset(frame, tiny_schema(), "memory"), tmp_path / "s", SplitConfig(kind="column"))
    rows = np.concatenate([np.asarray(store.split(s).row) for s in ("train", "valid", "test")])
    history_rows = np.flatnonzero(expected == -1)
    assert len(rows) + len(history_rows) == frame.height and not set(rows) & set(history_rows)
    # history-only rows are still events of the timeline
    assert len(store.timeline["item_id"]) == frame.height


def test_column_split_rejects_unknown_values():
    frame = tiny_frame().with_columns(pl.when(pl.int_range(pl.len()) == 7).then(pl.lit("dev")).otherwise("split").alias("split"))
    with pytest.raises(ValueError, match=r"table: split column 'split', row 8: 'dev'"):
        assign_splits(frame, tiny_schema(), SplitConfig(kind="column"))
    with pytest.raises(ValueError, match="needs the column 'fold'"):
        assign_splits(frame, tiny_schema(), SplitConfig(kind="column", column="fold"))


def test_where_is_checked():
    with pytest.raises(ValueError, match="where filters a timeline"):
        Feature(name="h", kind="sequence", max_len=3, where={"domain": "a"})
    frame = tiny_frame()
    with pytest.raises(DataError, match=r"missing column\(s\) \['kind'\]"):
        prepare(RawDataset(frame, tiny_schema({"kind": "a"}), "memory"), "/tmp/unused", SplitConfig(kind="column"))
    with pytest.raises(DataError, match="the types must match"):
        prepare(RawDataset(frame, tiny_schema({"click": "1"}), "memory"), "/tmp/unused", SplitConfig(kind="column"))


def test_users_unseen_in_train_keep_their_own_timelines(tmp_path):
    frame = pl.DataFrame(
        {
            "user_id": [1, 1, 1, 2, 2, 3, 3, 3],
            "item_id": [10, 11, 12, 20, 21, 30, 31, 32],
            "domain": ["a"] * 8,
            "t": [1, 2, 3, 1, 2, 1, 2, 3],
            "click": [1] * 8,
            "split": ["train", "train", "test", "history", "test", "history", "history", "valid"],
        }
    )  # users 2 and 3 have no train rows: their ids are OOV in the store
    store = prepare(RawDataset(frame, tiny_schema(length=3), "memory"), tmp_path / "s", SplitConfig(kind="column"))
    vocab = store.vocabulary("item_id")
    decode = dict(zip(vocab["index"].to_list(), vocab["value"].to_list()))
    test = store.split("test").take(np.arange(2))
    assert [decode.get(v, "oov") for v in test.sequences["hist_a_pos"][0].tolist() if v] == ["10", "11"]
    assert test.sequences["hist_a_pos"][1].tolist() == [0, 0, 1]  # user 2's one earlier event (item OOV)
    valid = store.split("valid").take(np.arange(1))
    assert valid.sequences["hist_all"][0].tolist() == [0, 1, 1]  # user 3's own two events only


# --- the MovieLens-1M two-domain source (real data) -------------------------------------------


@functools.cache
def _like_frame(root: Path) -> pl.DataFrame:
    return load_source("movielens-1m-two-domain", root=root).frame


@pytest.fixture
def ml1m(real_data):
    """(folder, the like-task frame), loaded once per test session."""
    root = real_data("movielens-1m")
    return root, _like_frame(root)


def test_two_domain_counts_match_the_shared_construction(ml1m):
    from recforge.data.sources.movielens import ML_1M, _read_1m
    from recforge.data.sources.movielens_two_domain import with_domains

    root, frame = ml1m
    ratings, _, movies, _ = _read_1m(root / ML_1M.name)
    rated = ratings.join(with_domains(movies), on="item_id")
    by_group = dict(rated.group_by("group").len().iter_rows())
    assert by_group == {"A": 320_021, "B": 345_294, "C": 334_894}
    assert rated.filter(pl.col("group") == "A")["item_id"].n_unique() == 739
    assert rated.filter(pl.col("group") == "B")["item_id"].n_unique() == 1_236
    assert rated.filter(pl.col("domain") == "source").height == 680_188
    users = rated.group_by("user_id").agg(
        (pl.col("domain") == "target").any().alias("t"), (pl.col("domain") == "source").any().alias("s"),
        pl.col("group").n_unique().alias("groups"),
    )  # fmt: skip
    assert users.filter(pl.col("t") & pl.col("s")).height == 6_030
    assert users.filter(pl.col("groups") == 3).height == 5_973

    target = frame.filter(pl.col("domain") == "target")
    assert target.group_by("user_id").len()["len"].min() >= 3
    assert frame.filter(pl.col("split") == "test").height == frame["user_id"].n_unique() == 5_888
    assert set(frame.filter(pl.col("split").is_in(["valid", "test"]))["domain"]) == {"target"}
    assert (frame["like"] == (frame["rating"] >= 4)).all() and (frame["valuable"] == (frame["rating"] == 5)).all()
    # source ratings at or after the user's valid rating are history only, never samples
    valid_time = frame.filter(pl.col("split") == "valid").select("user_id", pl.col("timestamp").alias("tv"))
    source = frame.filter(pl.col("domain") == "source").join(valid_time, on="user_id")
    assert ((source["split"] == "train") == (source["timestamp"] < source["tv"])).all()


def test_target_keep_never_drops_a_users_last_two(ml1m):
    root, full = ml1m
    kept = load_source("movielens-1m-two-domain", root=root, target_keep=0.25, seed=3).frame
    key = ["user_id", "item_id", "timestamp"]
    last_two = full.filter(pl.col("split").is_in(["valid", "test"])).select(*key, "split")
    assert last_two.join(kept, on=key, how="inner")["split_right"].to_list() == last_two["split"].to_list()
    n_target = kept.filter(pl.col("domain") == "target").height
    n_full = full.filter(pl.col("domain") == "target").height
    droppable = n_full - last_two.height
    assert abs((n_target - last_two.height) / droppable - 0.25) < 0.01  # the others kept at 0.25
    n_source = kept.filter(pl.col("domain") == "source").height
    assert n_source == full.filter(pl.col("domain") == "source").height
    assert 7.4 < n_source / n_target < 7.8  # the protected last 2 per user lift the target share


def test_click_task_negatives_are_unrated_same_domain_and_fixed_per_seed(ml1m):
    from recforge.data.sources.movielens import ML_1M, _read_1m
    from recforge.data.sources.movielens_two_domain import sample_negatives, with_domains

    root, frame = ml1m
    ratings, _, movies, _ = _read_1m(root / ML_1M.name)
    movies = with_domains(movies)
    rated = ratings.join(movies, on="item_id")
    clicks = frame.filter(pl.col("user_id") <= 300, pl.col("split") != "history")
    sampled = sample_negatives(clicks, rated, movies, 4, seed=5)
    assert sampled.height == 4 * clicks.height
    assert sampled.join(ratings, on=["user_id", "item_id"], how="inner").height == 0  # never rated
    assert (sampled["click"] == 0).all() and (sampled["like"] == 0).all() and (sampled["rating"] == 0).all()
    # each click's 4 rows: distinct items of its domain, at its time and split
    per_click = sampled.with_columns(click_row=pl.int_range(pl.len()) // 4).group_by("click_row", maintain_order=True).agg(
        pl.col("item_id").n_unique().alias("n"), pl.col("domain").first(), pl.col("timestamp").first(), pl.col("split").first()
    )  # fmt: skip
    assert (per_click["n"] == 4).all()
    assert per_click.select("domain", "timestamp", "split").equals(clicks.select("domain", "timestamp", "split"))
    assert set(sampled.group_by("domain").agg(pl.col("group").unique())["group"].to_list()[0]) <= {"A", "B", "C"}
    assert (sampled.filter(pl.col("domain") == "target")["group"] == "A").all()
    assert (sampled.filter(pl.col("domain") == "source")["group"] != "A").all()
    # a seed fixes the draw
    again, other = (sample_negatives(clicks, rated, movies, 4, seed=s)["item_id"] for s in (5, 6))
    assert again.equals(sampled["item_id"]) and not other.equals(sampled["item_id"])


def test_two_domain_histories_filter_on_the_first_label():
    from recforge.data.sources.movielens_two_domain import schema

    hist = schema(["click", "like", "valuable"]).feature("hist_target_item_id")
    assert hist.where == {"domain": "target", "click": 1} and hist.max_len == 10 and hist.vocab == "item_id"
    assert schema(["like", "valuable"]).feature("hist_source_year").where == {"domain": "source", "like": 1}


def test_prepared_two_domain_histories_are_strictly_earlier_positive_same_domain(ml1m, tmp_path):
    from recforge.data.sources.movielens_two_domain import schema

    _, full = ml1m
    raw = RawDataset(full.filter(pl.col("user_id") <= 150), schema(["like", "valuable"]), "memory")
    store = prepare(raw, tmp_path / "s", SplitConfig(kind="column"))
    frame = raw.frame.with_row_index("_r")
    for split in ("train", "test"):
        view = store.split(split)
        sample = frame[np.asarray(view.row)]
        for domain, length in (("target", 10), ("source", 20)):
            starts, ends = (np.asarray(a) for a in view.windows[store.schema.feature(f"hist_{domain}_item_id").view])
            events = frame.filter(pl.col("domain") == domain, pl.col("like") == 1).sort("user_id", "timestamp", "_r")
            users, times = events["user_id"].to_numpy(), events["timestamp"].to_numpy()
            first = ends - np.minimum(ends - starts, length)
            # each window holds the sample's user's positives of the domain, all strictly
            # earlier, and ends at the first one that is not earlier
            for lo, hi, u, t in zip(first, ends, sample["user_id"].to_numpy(), sample["timestamp"].to_numpy()):
                assert (users[lo:hi] == u).all() and (times[lo:hi] < t).all()
                assert hi == len(users) or users[hi] != u or times[hi] >= t
            assert (ends > starts).mean() > 0.5
    domain_index = dict(zip(store.vocabulary("domain")["value"], store.vocabulary("domain")["index"]))
    assert set(store.split("test").column("domain")) == {domain_index["target"]}
    assert set(store.split("train").column("domain")) == set(domain_index.values())
    # no interaction of the test split is also a train interaction
    train_rows, test_rows = frame[np.asarray(store.split("train").row)], frame[np.asarray(store.split("test").row)]
    assert train_rows.join(test_rows, on=["user_id", "item_id"]).height == 0
