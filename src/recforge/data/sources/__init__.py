"""Data sources: each public data set's module reads its originals, :func:`load_file` reads a
user's own table; every source returns a :class:`RawDataset`."""

from __future__ import annotations

import csv
import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from recforge.data.schema import Feature, Kind, Schema
from recforge.errors import ConfigError, DataError, did_you_mean

TEXT_TABLES = {".csv": ",", ".tsv": "\t"}  # suffix -> separator
PARQUET = (".parquet", ".pq")
MISSING_WORDS = ("nan", "null", "none")  # an id spelled so (any case) is taken for a missing value


@dataclass
class RawDataset:
    """A raw table (one row per sample) and the schema that declares its columns."""

    frame: pl.DataFrame
    schema: Schema
    origin: str  # file or generator the rows came from, named in error messages
    inputs: tuple[Path, ...] = ()  # every file the rows were read from (a store is re-prepared when one changes)


def locate(origin: str, row: int) -> str:
    """Where row ``row`` (0-based) of a table read from ``origin`` is, as error messages name it:
    ``line N`` of a CSV or TSV file (the header is line 1, so row 0 is line 2), else ``row N``
    counting from 1 (Parquet files, generated and in-memory tables)."""
    return f"line {row + 2}" if Path(origin).suffix.lower() in TEXT_TABLES else f"row {row + 1}"


def history_feature(max_len: int, where: dict[str, str | int | float | bool] | None = None) -> Feature:
    """``hist_item_id``: the user's items before each sample (those of the rows matching ``where``),
    a view on the item_id timeline."""
    return Feature(name="hist_item_id", kind=Kind.SEQUENCE, timeline="item_id", max_len=max_len, where=where)


def text_lines(source: bytes | Path, origin: str) -> pl.DataFrame:
    """The non-blank lines of utf-8 text: columns line (1-based number in the file), text."""
    if (len(source) if isinstance(source, bytes) else source.stat().st_size) == 0:
        raise DataError(f"{origin} is empty")
    lines = pl.read_csv(
        source, has_header=False, separator="\x1f", quote_char=None, new_columns=["text"],
        schema_overrides=[pl.String], raise_if_empty=False,
    )  # fmt: skip
    lines = lines.with_row_index("line", offset=1).filter(pl.col("text").str.strip_chars() != "")
    if lines.height == 0:
        raise DataError(f"{origin} is empty")
    return lines.with_columns(pl.col("text").str.strip_chars_end("\r"))


# name -> (module, fixed options); modules are imported on use
_SOURCES: dict[str, tuple[str, dict[str, object]]] = {
    "movielens-1m": ("movielens", {"variant": "1m"}),
    "movielens-100k": ("movielens", {"variant": "100k"}),
    "movielens-1m-two-domain": ("movielens_two_domain", {}),
    "movielens-1m-coldstart": ("movielens_coldstart", {}),
    "amazon-beauty": ("amazon_sequential", {"name": "Beauty"}),
    "amazon-sports": ("amazon_sequential", {"name": "Sports_and_Outdoors"}),
    "amazon-toys": ("amazon_sequential", {"name": "Toys_and_Games"}),
    "lastfm": ("amazon_sequential", {"name": "LastFM"}),
    "movielens-1m-funnel": ("movielens_funnel", {}),
    "ali-ccp": ("ali_ccp", {}),
    "synthetic": ("synthetic", {}),
    "amazon-cross-sport-cloth": ("amazon_crossdomain", {"pair": "sport_cloth"}),
    "amazon-cross-phone-electronic": ("amazon_crossdomain", {"pair": "phone_electronic"}),
    "amazon-cross-sport-phone": ("amazon_crossdomain", {"pair": "sport_phone"}),
    "amazon-cross-cloth-electronic": ("amazon_crossdomain", {"pair": "cloth_electronic"}),
    "amazon-musical-instruments": ("amazon_reviews", {}),
    "jdsearch": ("jdsearch", {}),
    "lifelong-simulator": ("lifelong_simulator", {}),
}
SOURCES = (*_SOURCES, "file")


def load_source(name: str, /, **options: object) -> RawDataset:
    """Load data source ``name`` (one of :data:`SOURCES`) with its loader's ``options``.

    ``"file"`` reads a user's own table: ``load_source("file", path=..., schema=...)``, see
    :func:`load_file`.
    """
    check_options(name, options)
    loader, fixed = _loader(name)
    return loader(**fixed, **options)


def check_options(name: str, options: dict[str, object]) -> None:
    """Raise a :class:`ConfigError` (naming ``data.source`` or ``data.options``) unless ``name`` is a
    source and ``options`` are arguments its loader takes, with every required one given."""
    loader, fixed = _loader(name)
    params = inspect.signature(loader).parameters
    accepted = [p for p in params if p not in fixed]
    for key in options:
        if key in fixed:
            raise ConfigError(f"data.options: data source {name!r} fixes {key!r} to {fixed[key]!r}; leave it out")
        if key not in accepted:
            raise ConfigError(
                f"data.options: unknown option {key!r} for source {name!r}{did_you_mean(key, accepted)}; "
                f"options: {', '.join(accepted)}"
            )
    needed = [p.name for p in params.values() if p.default is p.empty and p.name not in fixed and p.name not in options]
    if needed:
        raise ConfigError(f"data.options: data source {name!r} needs option(s) {', '.join(needed)}")


def _loader(name: str) -> tuple[Callable[..., RawDataset], dict[str, object]]:
    """The loader of source ``name`` and the options the source fixes."""
    if name == "file":
        return load_file, {}
    if name not in _SOURCES:
        raise ConfigError(f"data.source: unknown data source {name!r}{did_you_mean(name, SOURCES)}; known: {', '.join(SOURCES)}")
    module, fixed = _SOURCES[name]
    return importlib.import_module(f"{__name__}.{module}").load, fixed


def load_file(path: str | Path, schema: Schema | dict | str | Path, require_labels: bool = True) -> RawDataset:
    """A user's table, read by the schema that declares its columns (``schema``: a :class:`Schema`,
    a dict, or the path of a schema JSON file); nothing is guessed.

    CSV (``.csv``) and TSV (``.tsv``) fields are read as text, then parsed as the schema declares:

    - categorical ids stay the text of the file (``"07"`` and ``"7"`` are two ids) unless the
      feature's ``dtype`` is ``"integer"``. An id spelled ``nan``, ``null`` or ``none`` (any case)
      is taken for a missing value and rejected: give those rows an id of their own (``unknown``);
    - numeric columns become 64-bit floats; NaN and infinities are rejected;
    - labels must be 0 or 1 (Int64);
    - the time column is a number (Int64 when every value is an integer, else Float64), e.g. unix
      seconds; dates are not parsed;
    - a column that only a history's ``where`` filters on is a number when the filter value is;
    - undeclared columns stay text, and so do the text columns of an embedding from text (an empty
      field is an empty text); sequences and embeddings hold lists, which need Parquet (an
      embedding from text or a vector file has no column of its own).

    Numbers may have surrounding spaces, ids may not. An empty field is a missing value, a line
    without any value an error; blank lines that end the file are ignored.

    Parquet (``.parquet``, ``.pq``) columns keep the file's types, except ids (of categorical
    columns and the elements of list sequences): integers become their decimal text unless
    ``dtype`` is ``"integer"``, whole floats become integers (other floats are rejected), and text
    is parsed when ``dtype`` is ``"integer"``. Lists of lists are rejected.

    Every problem is a :class:`DataError` naming the file, the column, where (:func:`locate`:
    ``line N`` of a CSV file, ``row N`` of a Parquet table, from 1) and the value.

    Without ``require_labels`` (rows to score) a label column may be absent; it then reads as 0.
    """
    path = Path(path)
    schema_file = None if isinstance(schema, (Schema, dict)) else Path(schema)
    if isinstance(schema, Schema):
        declared = schema
    elif isinstance(schema, dict):
        declared = Schema.parse(schema)
    else:
        declared = Schema.load(schema)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in (*TEXT_TABLES, *PARQUET):
        raise DataError(f"data file {path}: expected .csv, .tsv or .parquet, not {suffix!r}")
    if path.stat().st_size == 0:
        raise DataError(f"data file {path} is empty")
    frame = _read_parquet(path) if suffix in PARQUET else _read_text(path, TEXT_TABLES[suffix])
    if frame.height == 0:
        raise DataError(f"data file {path} has no rows")
    optional = set() if require_labels else set(declared.labels)
    lacking = {column: at for column, at in _declared_at(declared).items() if column not in frame.columns and column not in optional}
    if lacking:
        raise DataError(
            f"{f'{schema_file}: ' if schema_file else ''}data file {path} lacks the schema's columns {list(lacking)} "
            f"({', '.join(lacking.values())}); it has {frame.columns}"
        )
    zero = pl.lit(0) if suffix in PARQUET else pl.lit("0")
    frame = frame.with_columns(zero.alias(label) for label in optional if label not in frame.columns)
    frame = _parse_parquet(frame, declared, str(path)) if suffix in PARQUET else _parse_text(frame, declared, str(path))
    return RawDataset(frame=frame, schema=declared, origin=str(path), inputs=(path,) if schema_file is None else (path, schema_file))


def _declared_at(schema: Schema) -> dict[str, str]:
    """Every raw column the schema reads -> the key that declares it (``features.2.name``, ``labels.0``, ...)."""
    at: dict[str, str] = {}
    for i, f in enumerate(schema.features):
        if f.text is not None:
            for j, column in enumerate(f.text):
                at.setdefault(column, f"features.{i}.text.{j}")
        elif f.timeline is None and f.vectors is None:
            at.setdefault(f.name, f"features.{i}.name")
    for i, label in enumerate(schema.labels):
        at.setdefault(label, f"labels.{i}")
    if schema.time is not None:
        at.setdefault(schema.time, "time")
    for i, f in enumerate(schema.features):
        for column in f.where or {}:
            at.setdefault(column, f"features.{i}.where.{column}")
    return at


def _read_text(path: Path, separator: str) -> pl.DataFrame:
    """Every field of a CSV or TSV file as text (null when empty), without the blank lines that end it."""
    try:
        frame = pl.read_csv(path, separator=separator, infer_schema=False, raise_if_empty=False)
    except pl.exceptions.PolarsError as err:
        raise DataError(_ragged_line(path, separator) or f"data file {path} could not be read: {_first_line(err)}") from None
    filled = np.flatnonzero(frame.select(~pl.all_horizontal(pl.all().is_null())).to_series().to_numpy())
    return frame.head(int(filled[-1]) + 1 if len(filled) else 0)


def _ragged_line(path: Path, separator: str) -> str | None:
    """The first line with more fields than the header, if there is one."""
    with path.open(newline="", encoding="utf-8", errors="replace") as f:
        lines = csv.reader(f, delimiter=separator)
        width = len(next(lines, []))
        for fields in lines:
            if len(fields) > width:
                return f"{path}: line {lines.line_num}: {len(fields)} fields, the header has {width}"
    return None


def _read_parquet(path: Path) -> pl.DataFrame:
    try:
        return pl.read_parquet(path)
    except pl.exceptions.PolarsError as err:
        raise DataError(f"data file {path} could not be read as Parquet: {_first_line(err)}") from None


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _parse_text(text: pl.DataFrame, schema: Schema, origin: str) -> pl.DataFrame:
    """The schema's columns of an all-text table parsed as :func:`load_file` describes."""

    def at(row: int) -> str:  # fields before the row may span lines
        spanned = text.head(row).select(pl.sum_horizontal(pl.all().str.count_matches("\n").fill_null(0)).sum()).item()
        return f"line {row + 2 + int(spanned or 0)}"

    empty = text.select(pl.all_horizontal(pl.all().is_null())).to_series()
    if empty.any():
        raise DataError(f"{origin}: {at(_first(empty))}: every field is empty")
    parsed: dict[str, pl.Series] = {}
    for f in schema.features:
        if f.timeline is not None or f.vectors is not None:
            continue
        if f.text is not None:  # an empty field is an empty text
            parsed |= {column: text[column].fill_null("") for column in f.text if column not in parsed}
            continue
        if f.kind in (Kind.SEQUENCE, Kind.EMBEDDING):
            raise DataError(f"{origin}: column {f.name!r}: a {f.kind.value} column holds lists, which CSV cannot; use Parquet")
        column = _present(text[f.name], origin, at)
        parsed[f.name] = _ids(column, f, origin, at) if f.kind is Kind.CATEGORICAL else _floats(column, origin, at)
    for label in schema.labels:
        if label not in parsed:
            parsed[label] = _labels(_present(text[label], origin, at), origin, at)
    numbers = [schema.time] if schema.time is not None else []
    numbers += [c for f in schema.histories for c, v in (f.where or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    for column in numbers:
        if column not in parsed:
            parsed[column] = _number(_present(text[column], origin, at), origin, at)
    return text.with_columns(parsed.values())


def _parse_parquet(frame: pl.DataFrame, schema: Schema, origin: str) -> pl.DataFrame:
    """A Parquet table with the ids of its categorical and list-sequence columns as :func:`load_file` describes."""

    def at(row: int) -> str:
        return f"row {row + 1}"

    parsed = []
    for f in schema.features:
        if f.kind is Kind.CATEGORICAL:
            parsed.append(_ids(frame[f.name], f, origin, at))
        elif f.kind is Kind.SEQUENCE and f.timeline is None and isinstance(frame[f.name].dtype, pl.List):
            parsed.append(_id_lists(frame[f.name], f, origin, at))
    return frame.with_columns(parsed)


def _first(mask: pl.Series) -> int:
    return int(mask.arg_true()[0])


def _bad(column: pl.Series, mask: pl.Series, origin: str, at: Callable[[int], str], problem: str) -> None:
    """Raise a :class:`DataError` for the first value where ``mask``: ``<value> <problem>``."""
    mask = mask.fill_null(False)
    if mask.any():
        row = _first(mask)
        value = column[row]
        shown = repr(value if not isinstance(value, str) or len(value) <= 40 else value[:37] + "...")
        raise DataError(f"{origin}: column {column.name!r}, {at(row)}: {shown} {problem}")


def _present(column: pl.Series, origin: str, at: Callable[[int], str]) -> pl.Series:
    """``column`` (text), checked to have no empty field."""
    missing = (column.is_null() | (column.str.strip_chars() == "")).fill_null(True)
    if missing.any():
        raise DataError(f"{origin}: column {column.name!r}, {at(_first(missing))}: missing value")
    return column


def _ids(column: pl.Series, feature: Feature, origin: str, at: Callable[[int], str]) -> pl.Series:
    """Ids as ``feature.dtype`` declares them: text, or Int64 for ``"integer"`` (nulls left for validate)."""
    if column.dtype.is_nested():
        raise DataError(f"{origin}: column {column.name!r} holds {column.dtype}; a categorical column holds one id (integer or text) per row")
    if column.dtype.is_float():
        _bad(column, column.is_nan(), origin, at, "is a missing value")
        _bad(column, (column != column.round()) | (column.abs() >= 2.0**63), origin, at, "is not an integer id")
        column = column.cast(pl.Int64)
    elif isinstance(column.dtype, (pl.Categorical, pl.Enum)):
        column = column.cast(pl.String)
    if feature.dtype == "integer":
        if not (column.dtype == pl.String or column.dtype.is_integer()):
            raise DataError(f"{origin}: column {column.name!r} has dtype {column.dtype}; the schema declares integer ids")
        ids = column.cast(pl.Int64, strict=False)
        failed = ids.is_null() & column.is_not_null()
        if column.dtype == pl.String:
            _bad(column, failed & ~column.str.contains(r"^[+-]?\d+$"), origin, at, "is not an integer")
        _bad(column, failed, origin, at, "is beyond the 64-bit integer range")
        return ids
    if column.dtype.is_integer():
        return column.cast(pl.String)
    if column.dtype == pl.String:
        _bad(column, column.str.strip_chars().str.to_lowercase().is_in(MISSING_WORDS), origin, at,
             "looks like a missing value; give those rows an id of their own (e.g. 'unknown')")  # fmt: skip
    return column


def _id_lists(column: pl.Series, feature: Feature, origin: str, at: Callable[[int], str]) -> pl.Series:
    """A list column whose elements are ids, converted as :func:`_ids` converts them."""
    if column.dtype.inner.is_nested():
        raise DataError(f"{origin}: column {column.name!r} holds {column.dtype}; a sequence column holds one list of ids per row")
    rows = np.repeat(np.arange(len(column)), column.list.len().fill_null(0).to_numpy())
    elements = _ids(column.explode(empty_as_null=False, keep_nulls=False), feature, origin, lambda i: at(int(rows[i])))
    if column.dtype.inner.is_float():
        column = column.cast(pl.List(pl.Int64))
    return column.cast(pl.List(elements.dtype))


def _floats(column: pl.Series, origin: str, at: Callable[[int], str]) -> pl.Series:
    values = column.str.strip_chars().cast(pl.Float64, strict=False)
    _bad(column, values.is_null(), origin, at, "is not a number")
    _bad(column, ~values.is_finite(), origin, at, "is not a finite number")
    return values


def _number(column: pl.Series, origin: str, at: Callable[[int], str]) -> pl.Series:
    """Int64 when every value is an integer, else Float64."""
    integers = column.str.strip_chars().cast(pl.Int64, strict=False)
    return integers if integers.null_count() == 0 else _floats(column, origin, at)


def _labels(column: pl.Series, origin: str, at: Callable[[int], str]) -> pl.Series:
    values = column.str.strip_chars().cast(pl.Float64, strict=False)
    _bad(column, ~values.is_in([0.0, 1.0]).fill_null(False), origin, at, "is not 0 or 1")
    return values.cast(pl.Int64)
