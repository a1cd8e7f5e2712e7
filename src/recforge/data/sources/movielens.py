"""MovieLens 1M and 100K (GroupLens): ratings joined with user and movie side features.

One row per rating. ``click`` = rating >= ``label_threshold``. Ids are int64; the side features
(gender, age, occupation, zip, year) are strings, the same in both variants; genres are a list.

With ``text`` (1M only) each row also carries its movie's text, and the schema declares
``item_text``, the sentence-encoder vector of each movie made from :data:`TEXT`:

- ``title``: the movies.dat title without its "(YYYY)" suffix, a trailing article put back in
  front ("Usual Suspects, The" -> "The Usual Suspects"; alternative titles in parentheses kept);
- ``director``, ``actors``, ``plot``: from MeLU's OMDb records of the ML-1M movies
  (``movies_extrainfos.dat``, UTF-8, 11 ``::``-separated fields:
  ``MovieID::Title::Year::Rated::Released::Genre::Director::Writer::Actors::Plot::PosterURL``),
  the parenthesised roles dropped from the directors ("Ash Brannon(co-director)" -> "Ash Brannon").
  "N/A" and the two movies the file lacks (MovieIDs 860 and 1795) give "".

Counted on the shared copies: the file covers 3,881 of the 3,883 movies (both missing ones are
rated); 3,845 movies have a plot, 3,869 a director, 3,874 actors. Of the 3,706 rated movies 3,685
have a plot (999,626 of the 1,000,209 ratings), 3,695 a director, 3,698 actors; three (860, 1795
and 3027, all "N/A") have no text beyond title, year and genres.

The text puts the short fields first and the plot last (title, year, genres, director, actors,
plot): the encoder reads at most 256 word pieces, so a long plot is what gets cut.

With ``query_words`` (1M only) every rating becomes a (query, item) pair, the pseudo-query of data
without queries being the first words of the item's text: ``query`` holds the first
``query_words`` lower-cased words of the movie's title (as ``title`` above, so "Usual Suspects,
The (1995)" gives "the", "usual", "suspects"); a word is a run of letters and digits, inner
apostrophes kept ("children's"). The schema declares ``query`` and, with a history,
``hist_query``: the queries of the same earlier ratings as ``hist_item_id``, ``[B, L, W]`` with
W = ``query_words``.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import polars as pl

from recforge.data.schema import Feature, Kind, Schema
from recforge.data.sources import RawDataset, history_feature, text_lines
from recforge.data.sources._download import Remote, dataset_dir
from recforge.errors import DataError

_GROUPLENS = "https://files.grouplens.org/datasets/movielens"
# The publisher's zips were re-packed in the shared copy: the members' hashes are what is checked.
ML_1M = Remote(
    url=f"{_GROUPLENS}/ml-1m.zip",
    name="ml-1m.zip",
    members={
        "ml-1m/ratings.dat": "506d64ca44484487c11dc2d9a28de5c54948213e6b96285e298afe28d6ea4e0f",
        "ml-1m/movies.dat": "0140fc2356357c1a851d0f52e893a1e4d3696df632c4141cea8d5bc3d621f0b9",
        "ml-1m/users.dat": "1dc3a95300cb19f7c10e027daf29b8cdf1d908dab65b5edfb45950aa389a10a3",
    },
)
ML_100K = Remote(
    url=f"{_GROUPLENS}/ml-100k.zip",
    name="ml-100k.zip",
    members={
        "ml-100k/u.data": "06416e597f82b7342361e41163890c81036900f418ad91315590814211dca490",
        "ml-100k/u.item": "553841ebc7de3a0fd0d6b62a204ea30c1e651aacfb2814c7a6584ac52f2c5701",
        "ml-100k/u.user": "f120e114da2e8cf314fd28f99417c94ae9ddf1cb6db8ce0e4b5995d40e90e62c",
    },
    extract=True,
)
# u.item's 19 genre flags, in column order (as listed in u.genre)
GENRES_100K = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "War", "Western",
)  # fmt: skip
GENRES_MAX_LEN = 6  # the most genres any movie has, in both variants
SIDE = ["gender", "age", "occupation", "zip", "year"]

EXTRAS_FOLDER = "movielens-1m-melu-extrainfos"
EXTRAS = Remote(
    url="https://raw.githubusercontent.com/hoyeoplee/MeLU/f70c8ff91471193cd598bc241c6b0f22665f6375"
    "/movielens/ml-1m/movies_extrainfos.dat",
    name="movies_extrainfos.dat",
    sha256="18432b1713b66a5262c11f6d929801a6e6f414d861cd2adf191dfba61e45c74d",
)
EXTRAS_HEADER = ("MovieID", "Title", "Year", "Rated", "Released", "Genre", "Director", "Writer", "Actors", "Plot", "PosterURL")
TEXT = ["title", "year", "genres", "director", "actors", "plot"]  # item_text's columns, in reading order
TEXT_DIM = 384  # width of the sentence encoder's vectors (recforge.text.encoder.EMBEDDING_DIM)
_WORD = r"[^\W_]+(?:'[^\W_]+)*"  # a query word: letters and digits, inner apostrophes kept
# articles that movies.dat moves to the end of a title ("Postino, Il"); put back in front
_ARTICLES = ("The", "A", "An", "La", "Le", "Les", "El", "Il", "Der", "Das", "Die")


def load(
    variant: str = "1m",
    label_threshold: int = 4,
    history_len: int = 50,
    root: str | Path | None = None,
    text: bool = False,
    extras_root: str | Path | None = None,
    query_words: int = 0,
) -> RawDataset:
    """Ratings of MovieLens ``variant`` ("1m" or "100k") with user and movie features.

    ``root`` is the data set's folder (``$RECFORGE_DATA/movielens-1m`` by default, else a
    verified download). ``history_len`` > 0 declares ``hist_item_id``, the user's last items.
    ``text`` adds the movie text columns and ``item_text`` (see the module); ``extras_root`` is the
    folder of ``movies_extrainfos.dat`` (``$RECFORGE_DATA/movielens-1m-melu-extrainfos`` by default).
    ``query_words`` > 0 adds the pseudo-query of each rating (see the module).

    Columns: user_id, item_id (int64); gender, age, occupation, zip, year (str); genres
    (list[str]); with ``text``: title, director, actors, plot (str); with ``query_words``: query
    (list[str]); rating (int64, not a feature); timestamp (int64 seconds); click (int8).
    """
    if history_len < 0:
        raise DataError(f"history_len must be >= 0, got {history_len}")
    if text and variant != "1m":
        raise DataError(f"text needs MovieLens variant '1m' (the plots are of ML-1M movies), not {variant!r}")
    if query_words < 0:
        raise DataError(f"query_words must be >= 0, got {query_words}")
    if query_words and variant != "1m":
        raise DataError(f"query_words needs MovieLens variant '1m', not {variant!r}")
    if variant == "1m":
        base = dataset_dir("movielens-1m", [ML_1M], root=root)
        ratings, users, movies, origin = _read_1m(base / ML_1M.name)
    elif variant == "100k":
        base = dataset_dir("movielens-100k", [ML_100K], root=root)
        ratings, users, movies, origin = _read_100k(base / "ml-100k")
    else:
        raise DataError(f"unknown MovieLens variant {variant!r}; known: '1m', '100k'")

    frame = (
        ratings.join(users, on="user_id", how="left", validate="m:1", maintain_order="left")
        .join(movies, on="item_id", how="left", validate="m:1", maintain_order="left")
        .with_columns(click=(pl.col("rating") >= label_threshold).cast(pl.Int8))
    )
    _check_joined(frame, "gender", "user_id", origin["users"])
    _check_joined(frame, "genres", "item_id", origin["movies"])
    texts = []
    if text:
        extras = dataset_dir(EXTRAS_FOLDER, [EXTRAS], root=extras_root) / EXTRAS.name
        texts = ["title", "director", "actors", "plot"]
        frame = frame.join(movie_texts(base / ML_1M.name, extras), on="item_id", how="left", validate="m:1", maintain_order="left")
    queries = []
    if query_words:
        queries = ["query"]
        frame = frame.join(title_queries(base / ML_1M.name, query_words), on="item_id", how="left", validate="m:1", maintain_order="left")
    frame = frame.select("user_id", "item_id", *SIDE, "genres", *texts, *queries, "rating", "timestamp", "click")
    return RawDataset(frame=frame, schema=schema(history_len, text, query_words), origin=origin["ratings"])


def schema(history_len: int = 50, text: bool = False, query_words: int = 0) -> Schema:
    """Schema of :func:`load`'s frame."""
    features = [Feature(name=c, kind=Kind.CATEGORICAL) for c in ["user_id", "item_id", *SIDE]]
    features.append(
        Feature(name="genres", kind=Kind.SEQUENCE, max_len=GENRES_MAX_LEN, vocab="genre")
    )
    if query_words:
        features.append(Feature(name="query", kind=Kind.SEQUENCE, max_len=query_words))
    if history_len:
        features.append(history_feature(history_len))
    if history_len and query_words:
        features.append(Feature(name="hist_query", kind=Kind.SEQUENCE, timeline="query", max_len=history_len))
    if text:
        features.append(text_feature(TEXT))
    return Schema(features=features, labels=["click"], user="user_id", time="timestamp")


def text_feature(columns: list[str]) -> Feature:
    """``item_text``: the sentence-encoder vector of each movie's text, made of ``columns``."""
    return Feature(name="item_text", kind=Kind.EMBEDDING, key="item_id", dim=TEXT_DIM, text=columns)


# --- movie text -------------------------------------------------------------------------------
def movie_texts(archive: Path, extras: Path) -> pl.DataFrame:
    """item_id -> title, director, actors, plot (str, "" where unknown) of every movie of the ML-1M
    ``archive``, the credits and plot read from MeLU's ``extras`` file."""
    origin = f"{archive}:ml-1m/movies.dat"
    with zipfile.ZipFile(archive) as zf:
        raw = zf.read("ml-1m/movies.dat").decode("latin-1").encode()
    movies = _parse(raw, "::", {"item_id": pl.Int64, "title": pl.String, "genres": pl.String}, origin)
    info = read_extras(extras)
    unknown = info.filter(~pl.col("item_id").is_in(movies["item_id"].implode()))
    if unknown.height:
        raise DataError(f"{extras}: MovieID {unknown['item_id'][0]} is not in {origin} ({unknown.height} such movies)")

    def known(field: str) -> pl.Expr:
        return pl.when(pl.col(field) != "N/A").then(pl.col(field).str.strip_chars())

    info = info.select(
        "item_id",
        known("Director").str.replace_all(r"\s*\([^)]*\)", "").alias("director"),
        known("Actors").alias("actors"),
        known("Plot").alias("plot"),
    )
    texts = movies.select("item_id", _title(pl.col("title"))).join(info, on="item_id", how="left", validate="1:1")
    return texts.with_columns(pl.col("director", "actors", "plot").fill_null(""))


def title_queries(archive: Path, words: int) -> pl.DataFrame:
    """item_id -> query: the first ``words`` lower-cased words of each movie's title (as
    :func:`movie_texts` gives it) in the ML-1M ``archive`` -> list[str]."""
    origin = f"{archive}:ml-1m/movies.dat"
    with zipfile.ZipFile(archive) as zf:
        raw = zf.read("ml-1m/movies.dat").decode("latin-1").encode()
    movies = _parse(raw, "::", {"item_id": pl.Int64, "title": pl.String, "genres": pl.String}, origin)
    return movies.select("item_id", _title(pl.col("title")).str.to_lowercase().str.extract_all(_WORD).list.head(words).alias("query"))


def read_extras(path: Path) -> pl.DataFrame:
    """MeLU's ``movies_extrainfos.dat``: item_id (int64) and the other :data:`EXTRAS_HEADER` (str),
    one row per movie. A line that is not UTF-8, lacks a field or repeats a MovieID is an error."""
    if not path.is_file():
        raise DataError(f"MovieLens extras file not found: {path}")
    lines = utf8_lines(path.read_bytes(), str(path)).select("line", pl.col("text").str.split("::"))
    bad = lines.filter(pl.col("text").list.len() != len(EXTRAS_HEADER))
    if bad.height:
        raise DataError(
            f"{path}, line {bad['line'][0]}: expected {len(EXTRAS_HEADER)} fields separated by '::', found {bad['text'][0].len()}"
        )
    item = pl.col("text").list.get(0).str.strip_chars().cast(pl.Int64, strict=False)
    bad = lines.filter(item.is_null())
    if bad.height:
        raise DataError(f"{path}, line {bad['line'][0]}: MovieID {bad['text'][0][0]!r} is not an integer")
    table = lines.select(
        "line", item.alias("item_id"), *(pl.col("text").list.get(i).alias(name) for i, name in enumerate(EXTRAS_HEADER) if i)
    )
    repeated = table.filter(pl.col("item_id").is_duplicated())
    if repeated.height:
        raise DataError(f"{path}, line {repeated['line'][1]}: MovieID {repeated['item_id'][0]} appears twice")
    return table.drop("line")


def utf8_lines(raw: bytes, origin: str) -> pl.DataFrame:
    """:func:`text_lines` of ``raw``, which must be UTF-8: a line that is not is an error naming it."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise DataError(f"{origin}, line {line}: not UTF-8 text (byte {raw[err.start]:#04x})") from None
    return text_lines(raw, origin)


def _title(title: pl.Expr) -> pl.Expr:
    """A movies.dat title without its year suffix and with a trailing article put back in front."""
    bare = title.str.replace(r"\s*\(\d{4}\)\s*$", "")
    articles = "|".join(_ARTICLES)
    bare = bare.str.replace(r"^(.+?), L'((?: \(.*\))?)$", "L'$1$2").str.replace(rf"^(.+?), ({articles})((?: \(.*\))?)$", "$2 $1$3")
    return bare.alias("title")


# --- readers ----------------------------------------------------------------------------------
_Frames = tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame, dict[str, str]]
_RATINGS = {"user_id": pl.Int64, "item_id": pl.Int64, "rating": pl.Int64, "timestamp": pl.Int64}


def _read_1m(path: Path) -> _Frames:
    origin = {k: f"{path}:ml-1m/{k}.dat" for k in ("ratings", "users", "movies")}
    if not path.is_file():
        raise DataError(f"MovieLens 1M archive not found: {path}")
    with zipfile.ZipFile(path) as archive:
        raw = {}
        for name in origin:
            try:
                raw[name] = archive.read(f"ml-1m/{name}.dat")
            except KeyError:
                raise DataError(f"{path}: member ml-1m/{name}.dat is missing") from None
    ratings = _parse(raw["ratings"], "::", _RATINGS, origin["ratings"])
    users = _parse(
        raw["users"], "::",
        {"user_id": pl.Int64, "gender": pl.String, "age": pl.String, "occupation": pl.String,
         "zip": pl.String},
        origin["users"],
    )  # fmt: skip
    movies = _parse(
        raw["movies"].decode("latin-1").encode(), "::",  # ISO-8859-1 -> utf-8
        {"item_id": pl.Int64, "title": pl.String, "genres": pl.String},
        origin["movies"],
    )  # fmt: skip
    movies = movies.select("item_id", _year(pl.col("title")), pl.col("genres").str.split("|"))
    return ratings, users, movies, origin


def _read_100k(folder: Path) -> _Frames:
    files = {"ratings": "u.data", "users": "u.user", "movies": "u.item"}
    origin = {k: str(folder / f) for k, f in files.items()}
    raw = {}
    for name, file in origin.items():
        if not Path(file).is_file():
            raise DataError(f"MovieLens 100K file not found: {file}")
        raw[name] = Path(file).read_bytes()
    ratings = _parse(raw["ratings"], "\t", _RATINGS, origin["ratings"])
    users = _parse(
        raw["users"], "|",
        {"user_id": pl.Int64, "age": pl.String, "gender": pl.String, "occupation": pl.String,
         "zip": pl.String},
        origin["users"],
    )  # fmt: skip
    flags = [f"g{i}" for i in range(len(GENRES_100K))]
    movies = _parse(
        raw["movies"].decode("latin-1").encode(), "|",
        {"item_id": pl.Int64, "title": pl.String, "release": pl.String, "video": pl.String,
         "url": pl.String} | {f: pl.Int8 for f in flags},
        origin["movies"],
    )  # fmt: skip
    genres = pl.concat_list(
        [pl.when(pl.col(f) == 1).then(pl.lit(g)) for f, g in zip(flags, GENRES_100K)]
    ).list.drop_nulls()
    movies = movies.select("item_id", _year(pl.col("title")), genres.alias("genres"))
    return ratings, users, movies, origin


def _parse(raw: bytes, sep: str, columns: dict[str, pl.DataType], origin: str) -> pl.DataFrame:
    """Split delimited utf-8 text into typed ``columns``; blank lines are skipped.

    A line with the wrong number of fields, or a value that does not parse, is reported with
    its line number.
    """
    parts = text_lines(raw, origin).select("line", pl.col("text").str.split(sep))
    bad = parts.filter(pl.col("text").list.len() != len(columns))
    if bad.height:
        line, fields = bad.row(0)
        raise DataError(
            f"{origin}, line {line}: expected {len(columns)} fields separated by {sep!r}, "
            f"found {len(fields)}"
        )
    frame = parts.select(
        "line", *(pl.col("text").list.get(i).alias(c) for i, c in enumerate(columns))
    )
    for column, dtype in columns.items():
        if dtype == pl.String:
            continue
        parsed = pl.col(column).str.strip_chars().cast(dtype, strict=False)
        bad = frame.filter(parsed.is_null())
        if bad.height:
            raise DataError(
                f"{origin}, line {bad['line'][0]}: {column} {bad[column][0]!r} is not {dtype}"
            )
        frame = frame.with_columns(parsed)
    return frame.drop("line")


def _year(title: pl.Expr) -> pl.Expr:
    """Release year from a title ending in "(YYYY)" (the last such group); "unknown" if none."""
    year = title.str.extract_all(r"\(\d{4}\)").list.last().str.slice(1, 4)
    return year.fill_null("unknown").alias("year")


def _check_joined(frame: pl.DataFrame, column: str, key: str, origin: str) -> None:
    missing = frame.filter(pl.col(column).is_null())
    if missing.height:
        raise DataError(
            f"{origin}: no entry for {key} {missing[key][0]} "
            f"({missing[key].n_unique()} {key}s of the ratings are missing)"
        )
