"""Amazon product reviews, 2014 release, 5-core "Musical Instruments" (He and McAuley): one row per
review, with the review's text.

The file is ``Musical_Instruments.zip`` (member ``Musical_Instruments.json``, one JSON object per
line) in ``$RECFORGE_DATA/amazon-musical-instruments-5core``, else a verified download. Every user
and item has at least 5 reviews; the shared copy holds 10,261 reviews by 1,429 users of 900 items.

Columns:

- ``user_id`` (``reviewerID``), ``item_id`` (``asin``): str;
- ``rating`` (``overall``, 1 to 5): int64, not a feature;
- ``timestamp`` (``unixReviewTime``): int64 unix seconds, at day resolution, so a user's reviews
  of one day share it;
- ``click``: int8, rating >= ``label_threshold``; the default 4 (as for MovieLens) makes 9,022 of
  the 10,261 reviews positive;
- with ``text``: ``summary`` (the review's title) and ``review_text`` (``reviewText``), str, ""
  where the field is missing or null (7 reviews have an empty text, none lacks a summary).

Rows are in time order, ties broken by user and item id, so that a leave-one-out split holds out
the same review whatever the file's order.

Features: ``user_id``, ``item_id``; ``hist_item_id`` (the user's last ``history_len`` items) when
``history_len`` > 0; with ``text`` (the default) ``item_text``, the sentence-encoder vector of each
item's reviews: summary and text of its reviews in the fitting splits only, in time order
(``text_from="fit_rows"``), so that a held-out review never describes its item.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import polars as pl

from recforge.data.schema import Feature, Kind, Schema
from recforge.data.sources import RawDataset, history_feature
from recforge.data.sources._download import Remote, dataset_dir
from recforge.data.sources.movielens import utf8_lines
from recforge.errors import DataError

FOLDER = "amazon-musical-instruments-5core"
ARCHIVE = Remote(
    url="https://raw.githubusercontent.com/recohut/coldstart-recsys/da72950ca514faee94f010a2cb6e99a373044ec1"
    "/data/DaRE/Musical_Instruments.zip",
    name="Musical_Instruments.zip",
    sha256="27679efc609cb9ad12a6f6c4a23044a083f85994986ed69b9a654871f2d1466b",
)
MEMBER = "Musical_Instruments.json"
TEXT_DIM = 384  # width of the sentence encoder's vectors (recforge.text.encoder.EMBEDDING_DIM)
# JSON field -> the Python types its value may have (checked where a line does not decode)
_FIELDS: dict[str, tuple[type, ...]] = {
    "reviewerID": (str,), "asin": (str,), "overall": (int, float), "unixReviewTime": (int, float),
    "summary": (str,), "reviewText": (str,),
}  # fmt: skip
_DECODED = pl.Struct({"reviewerID": pl.String, "asin": pl.String, "overall": pl.Float64,
                      "unixReviewTime": pl.Float64, "summary": pl.String, "reviewText": pl.String})  # fmt: skip


def load(
    label_threshold: int = 4,
    history_len: int = 50,
    text: bool = True,
    root: str | Path | None = None,
) -> RawDataset:
    """The Musical Instruments reviews (see the module).

    ``root`` is the folder holding ``Musical_Instruments.zip``; ``text`` adds ``summary``,
    ``review_text`` and the ``item_text`` feature.
    """
    if history_len < 0:
        raise DataError(f"history_len must be >= 0, got {history_len}")
    path = dataset_dir(FOLDER, [ARCHIVE], root=root) / ARCHIVE.name
    origin = f"{path}:{MEMBER}"
    reviews = read_reviews(_member(path), origin)
    frame = reviews.with_columns(click=(pl.col("rating") >= label_threshold).cast(pl.Int8)).select(
        "user_id", "item_id", *(["summary", "review_text"] if text else []), "rating", "timestamp", "click"
    )
    return RawDataset(frame=frame, schema=schema(history_len, text), origin=origin)


def schema(history_len: int = 50, text: bool = True) -> Schema:
    """Schema of :func:`load`'s frame."""
    features = [Feature(name=c, kind=Kind.CATEGORICAL) for c in ("user_id", "item_id")]
    if history_len:
        features.append(history_feature(history_len))
    if text:
        features.append(
            Feature(name="item_text", kind=Kind.EMBEDDING, key="item_id", dim=TEXT_DIM, text=["summary", "review_text"], text_from="fit_rows")
        )
    return Schema(features=features, labels=["click"], user="user_id", time="timestamp")


def read_reviews(raw: bytes, origin: str) -> pl.DataFrame:
    """JSON lines of reviews -> user_id, item_id, summary, review_text (str), rating, timestamp
    (int64), in time order (then user, item). Every problem names ``origin`` and the line."""
    lines = utf8_lines(raw, origin)
    try:
        fields = lines.select("line", pl.col("text").str.json_decode(_DECODED).alias("review")).unnest("review")
    except pl.exceptions.PolarsError as err:
        raise DataError(_first_bad_line(lines, origin) or f"{origin}: not JSON lines ({str(err).strip().splitlines()[0]})") from None
    for field in ("reviewerID", "asin", "overall", "unixReviewTime"):
        _check(fields, fields[field].is_null(), origin, f"no {field!r}")
    for field in ("reviewerID", "asin"):
        _check(fields, fields[field].str.strip_chars() == "", origin, f"{field} is empty")
    rating, time = fields["overall"], fields["unixReviewTime"]
    _check(fields, (rating != rating.round()) | (rating < 1) | (rating > 5), origin, "overall {} is not a rating from 1 to 5", "overall")
    _check(fields, (time != time.round()) | (time.abs() >= 2.0**53), origin, "unixReviewTime {} is not a whole number of seconds", "unixReviewTime")
    return fields.select(
        pl.col("reviewerID").alias("user_id"),
        pl.col("asin").alias("item_id"),
        pl.col("summary").fill_null(""),
        pl.col("reviewText").fill_null("").alias("review_text"),
        pl.col("overall").cast(pl.Int64).alias("rating"),
        pl.col("unixReviewTime").cast(pl.Int64).alias("timestamp"),
    ).sort(["timestamp", "user_id", "item_id"], maintain_order=True)


def _member(path: Path) -> bytes:
    if not path.is_file():
        raise DataError(f"Amazon reviews archive not found: {path}")
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.read(MEMBER)
    except zipfile.BadZipFile:
        raise DataError(f"{path} is not a zip archive") from None
    except KeyError:
        raise DataError(f"{path}: member {MEMBER} is missing") from None


def _check(fields: pl.DataFrame, bad: pl.Series, origin: str, problem: str, column: str | None = None) -> None:
    """Raise for the first line where ``bad``: ``problem``, its ``{}`` filled with ``column``'s value."""
    bad = bad.fill_null(False)
    if bad.any():
        row = int(bad.arg_true()[0])
        value = fields[column][row] if column else None
        raise DataError(f"{origin}, line {fields['line'][row]}: {problem.format(value)}")


def _first_bad_line(lines: pl.DataFrame, origin: str) -> str | None:
    """Why the first line that does not decode as a review fails (a JSON error, a non-object, a
    field of the wrong type); None when every line decodes alone."""
    for number, text in lines.iter_rows():
        try:
            review = json.loads(text)
        except json.JSONDecodeError as err:
            return f"{origin}, line {number}: not valid JSON ({err.msg}, column {err.colno})"
        if not isinstance(review, dict):
            return f"{origin}, line {number}: expected a JSON object, found {type(review).__name__}"
        for field, types in _FIELDS.items():
            value = review.get(field)
            if value is not None and (isinstance(value, bool) or not isinstance(value, types)):
                shown = repr(value if not isinstance(value, str) or len(value) <= 40 else value[:37] + "...")
                return f"{origin}, line {number}: {field} {shown} is not a {'number' if float in types else 'string'}"
    return None
