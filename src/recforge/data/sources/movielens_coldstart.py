"""MovieLens-1M for item cold start: the movie attributes of the GME / MetaEmb protocol.

One row per rating, in time order (timestamp, then user and movie id), so that an item's rows
are in the order it received them. ``click`` = rating >= ``label_threshold``. Features:

- user: ``user_id``, ``gender``, ``age``, ``occupation`` (categorical);
- item: ``item_id``, ``year`` (categorical); ``title_words`` (the first ``title_words_max``
  lower-cased words of the title, year and a few articles removed), ``genres`` (lists);
- with ``extras`` (MeLU's OMDb records of the ML-1M movies, ``movies_extrainfos.dat``): for
  each name in ``extras`` (``director``, ``writer``, ``actors``) a list of the first
  ``extras_max`` people, without the parenthesised roles; "N/A" and movies absent from the
  file give an empty list;
- with ``text``: the string columns ``title``, ``director_text``, ``actors_text``, ``plot`` and
  ``item_text``, the sentence-encoder vector of each movie's text, exactly as the
  ``movielens-1m`` source makes them (:mod:`recforge.data.sources.movielens`); the credits are
  named apart from the people lists of ``extras``, which keep ``director`` and ``actors``;
- with ``history_len`` > 0: ``hist_item_id``, the user's last ``history_len`` ratings of *old*
  movies (at least ``history_min_ratings`` ratings, the split's ``old_min_count``) before each
  row, read from the timeline of the rows where ``old_movie`` is 1. A new movie never enters a
  history, so a history model cannot learn a new movie's ID from the rows it appears in later:
  its ID stays as cold as in the GME protocol.

Movies with fewer than ``min_item_ratings`` ratings are removed from the table on purpose: the
cold-start protocol (old movies >= 300 ratings, new movies 80 to 299) uses no rarer movie.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import polars as pl

from recforge.data.schema import Feature, Kind, Schema
from recforge.data.sources import RawDataset, history_feature
from recforge.data.sources._download import dataset_dir
from recforge.data.sources.movielens import (
    EXTRAS, EXTRAS_FOLDER, GENRES_MAX_LEN, ML_1M, _parse, _read_1m, movie_texts, read_extras, text_feature,
)  # fmt: skip
from recforge.errors import DataError

EXTRA_FIELDS = ("director", "writer", "actors")  # columns 7, 8, 9 of the extras file
TEXT = ["title", "year", "genres", "director_text", "actors_text", "plot"]  # item_text's columns
TEXT_COLUMNS = ["title", "director_text", "actors_text", "plot"]  # the string columns text adds
# function words dropped from titles, so that sharing "the" does not make two movies neighbours
TITLE_STOPWORDS = ("the", "a", "an", "of", "and", "in", "on", "to", "for", "la", "le", "les", "de", "il", "el")
USER_FIELDS = ["user_id", "gender", "age", "occupation"]


def load(
    label_threshold: int = 4,
    min_item_ratings: int = 80,
    title_words_max: int = 5,
    extras: list[str] | None = None,
    extras_max: int = 3,
    root: str | Path | None = None,
    extras_root: str | Path | None = None,
    text: bool = False,
    history_len: int = 0,
    history_min_ratings: int = 300,
) -> RawDataset:
    """Ratings of MovieLens-1M with the item attributes of the cold-start protocol.

    ``root``: the folder of ``ml-1m.zip`` (``$RECFORGE_DATA/movielens-1m`` by default);
    ``extras_root``: the folder of ``movies_extrainfos.dat``
    (``$RECFORGE_DATA/movielens-1m-melu-extrainfos`` by default; read only with ``extras`` or
    ``text``).
    """
    extras = list(extras or [])
    unknown = sorted(set(extras) - set(EXTRA_FIELDS))
    if unknown:
        raise DataError(f"movielens cold start: unknown extras {unknown}; known: {list(EXTRA_FIELDS)}")
    if min(title_words_max, extras_max) < 1 or min(min_item_ratings, history_len) < 0:
        raise DataError("movielens cold start: title_words_max and extras_max must be >= 1, min_item_ratings and history_len >= 0")
    base = dataset_dir("movielens-1m", [ML_1M], root=root)
    archive = base / ML_1M.name
    ratings, users, movies, origin = _read_1m(archive)
    movies = movies.join(_titles(archive, title_words_max), on="item_id", how="left", validate="1:1")
    if extras or text:
        extras_file = dataset_dir(EXTRAS_FOLDER, [EXTRAS], root=extras_root) / EXTRAS.name
        if extras:
            people = _extras(extras_file, extras, extras_max)
            movies = movies.join(people, on="item_id", how="left", validate="1:1").with_columns(
                pl.col(name).fill_null(pl.lit([], dtype=pl.List(pl.String))) for name in extras
            )
        if text:
            credits = movie_texts(archive, extras_file).rename({"director": "director_text", "actors": "actors_text"})
            movies = movies.join(credits, on="item_id", how="left", validate="1:1")
    frame = (
        ratings.filter(pl.len().over("item_id") >= min_item_ratings)
        .join(users, on="user_id", how="left", validate="m:1")
        .join(movies, on="item_id", how="left", validate="m:1")
        .sort(["timestamp", "user_id", "item_id"])
        .with_columns(click=(pl.col("rating") >= label_threshold).cast(pl.Int8))
    )
    history = ["old_movie"] if history_len else []
    if history_len:
        frame = frame.with_columns(old_movie=(pl.len().over("item_id") >= history_min_ratings).cast(pl.Int8))
    for column, key, source in (("gender", "user_id", "users"), ("title_words", "item_id", "movies")):
        missing = frame.filter(pl.col(column).is_null())
        if missing.height:
            raise DataError(f"{origin[source]}: no entry for {key} {missing[key][0]}")
    texts = TEXT_COLUMNS if text else []
    frame = frame.select(*USER_FIELDS, "item_id", "year", "title_words", "genres", *extras, *texts, *history, "rating", "timestamp", "click")
    return RawDataset(frame=frame, schema=schema(title_words_max, extras, extras_max, text, history_len), origin=origin["ratings"])


def schema(
    title_words_max: int = 5, extras: list[str] | None = None, extras_max: int = 3, text: bool = False, history_len: int = 0
) -> Schema:
    """Schema of :func:`load`'s frame; the item attribute fields come after ``item_id``."""
    features = [Feature(name=c, kind=Kind.CATEGORICAL) for c in [*USER_FIELDS, "item_id", "year"]]
    features.append(Feature(name="title_words", kind=Kind.SEQUENCE, max_len=title_words_max))
    features.append(Feature(name="genres", kind=Kind.SEQUENCE, max_len=GENRES_MAX_LEN, vocab="genre"))
    features += [Feature(name=name, kind=Kind.SEQUENCE, max_len=extras_max) for name in extras or []]
    if text:
        features.append(text_feature(TEXT))
    if history_len:
        features.append(history_feature(history_len, where={"old_movie": 1}))
    return Schema(features=features, labels=["click"], user="user_id", time="timestamp")


def _titles(archive: Path, max_words: int) -> pl.DataFrame:
    """item_id -> title_words: lower-cased alphanumeric words of the title, year and stopwords removed."""
    with zipfile.ZipFile(archive) as zf:
        raw = zf.read("ml-1m/movies.dat").decode("latin-1").encode()
    movies = _parse(raw, "::", {"item_id": pl.Int64, "title": pl.String, "genres": pl.String}, f"{archive}:ml-1m/movies.dat")
    words = (
        pl.col("title").str.replace(r"\s*\(\d{4}\)\s*$", "").str.to_lowercase().str.extract_all(r"[a-z0-9']+")
        .list.eval(pl.element().filter(~pl.element().is_in(list(TITLE_STOPWORDS))))
        .list.head(max_words)
    )  # fmt: skip
    return movies.select("item_id", words.alias("title_words"))


def _extras(path: Path, names: list[str], max_people: int) -> pl.DataFrame:
    """item_id -> one list of people per name in ``names``, read from MeLU's extras file."""
    columns = {
        name: pl.col(name.capitalize())
        .str.replace_all(r"\([^)]*\)", "").str.split(",")
        .list.eval(pl.element().str.strip_chars().filter((pl.element() != "") & (pl.element() != "N/A")))
        .list.unique(maintain_order=True).list.head(max_people)
        for name in names
    }  # fmt: skip
    return read_extras(path).select("item_id", **columns)
