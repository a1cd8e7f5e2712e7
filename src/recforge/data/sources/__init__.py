"""Public data sets: each module reads the originals and returns a :class:`RawDataset`."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from recforge.data.schema import Feature, Kind, Schema


@dataclass
class RawDataset:
    """A raw table (one row per sample) and the schema that declares its columns."""

    frame: pl.DataFrame
    schema: Schema
    origin: str  # file or generator the rows came from, named in error messages
    inputs: tuple[Path, ...] = ()  # every file the rows were read from (a store is re-prepared when one changes)


def history_feature(max_len: int) -> Feature:
    """``hist_item_id``: the user's items before each sample, a view on the item_id timeline."""
    return Feature(name="hist_item_id", kind=Kind.SEQUENCE, timeline="item_id", max_len=max_len)


def text_lines(source: bytes | Path, origin: str) -> pl.DataFrame:
    """The non-blank lines of utf-8 text: columns line (1-based number in the file), text."""
    if (len(source) if isinstance(source, bytes) else source.stat().st_size) == 0:
        raise ValueError(f"{origin} is empty")
    lines = pl.read_csv(
        source, has_header=False, separator="\x1f", quote_char=None, new_columns=["text"],
        schema_overrides=[pl.String], raise_if_empty=False,
    )  # fmt: skip
    lines = lines.with_row_index("line", offset=1).filter(pl.col("text").str.strip_chars() != "")
    if lines.height == 0:
        raise ValueError(f"{origin} is empty")
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
}
SOURCES = (*_SOURCES, "file")


def load_source(name: str, /, **options: object) -> RawDataset:
    """Load data source ``name`` (one of :data:`SOURCES`) with its loader's ``options``.

    ``"file"`` reads a user's own table: ``load_source("file", path=..., schema=...)``, where
    the schema is a :class:`Schema`, a dict, or the path of a schema JSON file.
    """
    if name == "file":
        return load_file(**options)  # type: ignore[arg-type]
    if name not in _SOURCES:
        raise ValueError(f"unknown data source {name!r}; known: {', '.join(SOURCES)}")
    module, fixed = _SOURCES[name]
    clash = sorted(set(fixed) & set(options))
    if clash:
        raise ValueError(f"data source {name!r} fixes {clash}; leave them out")
    loader = importlib.import_module(f"{__name__}.{module}").load
    return loader(**fixed, **options)


def load_file(path: str | Path, schema: Schema | dict | str | Path) -> RawDataset:
    """A CSV or Parquet table (by extension) with the schema that declares its columns."""
    path = Path(path)
    if isinstance(schema, Schema):
        declared = schema
    elif isinstance(schema, dict):
        declared = Schema.model_validate(schema)
    else:
        declared = Schema.load(schema)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"data file {path} is empty")
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".tsv", ".parquet", ".pq"):
        raise ValueError(f"data file {path}: expected .csv, .tsv or .parquet, not {suffix!r}")
    try:
        if suffix in (".parquet", ".pq"):
            frame = pl.read_parquet(path)
        else:
            frame = pl.read_csv(path, separator="\t" if suffix == ".tsv" else ",")
    except pl.exceptions.NoDataError:
        raise ValueError(f"data file {path} is empty") from None
    except pl.exceptions.PolarsError as e:
        raise ValueError(f"data file {path} could not be read: {e}") from e
    if frame.height == 0:
        raise ValueError(f"data file {path} has no rows")
    missing = [c for c in declared.raw_columns() if c not in frame.columns]
    if missing:
        raise ValueError(f"data file {path} lacks the schema's columns {missing}")
    return RawDataset(frame=frame, schema=declared, origin=str(path))
