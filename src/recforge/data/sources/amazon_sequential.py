"""Sequential-recommendation benchmarks of the S3-Rec release: Amazon Beauty, Sports, Toys; LastFM.

Each ``<name>.txt`` holds one user per line, ``user item_1 item_2 ...`` in chronological order,
without timestamps. The loader makes one row per interaction; its ``position`` in the user's
sequence (0..n-1) is the time column, and every row is a positive (``click`` = 1). With
``attributes``, ``<name>_item2attributes.json`` (``{"item": [attribute ids]}``: category and brand
ids on Amazon, tags on LastFM) gives each row its item's ``attributes`` (a list feature, the last
``ATTRIBUTES_MAX_LEN`` of them; an item absent from the file has none).
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from recforge.data.schema import Feature, Kind, Schema
from recforge.data.sources import RawDataset, history_feature, text_lines
from recforge.data.sources._download import Remote, dataset_dir
from recforge.errors import DataError

FOLDER = "amazon-sequential-s3rec"
_COMMIT = "2a81540ae18615d88ef88227b0c066e5b74781e5"
_SHA256 = {
    "Beauty": "226cce9c3105299ca0db9615d7d3fb32b3175e90da43100ae352599f0f0107b8",
    "Sports_and_Outdoors": "2a095e0648872beb9982408958290f5d655db5be2911c3756b5446de9f0b8de2",
    "Toys_and_Games": "176c680c688d497598c4a89a03b402c0fe78d795e5db335c2e78dd5f2d778a3f",
    "LastFM": "9ded486adb5b0fe9dc761950afa0a9a05e93ff018992e0c52bf11afec529f802",
}
NAMES = tuple(_SHA256)
ATTRIBUTES_MAX_LEN = 8  # Beauty: at most 6 per item


def remote(name: str) -> Remote:
    """The publisher's copy of ``<name>.txt`` (GitHub RUCAIBox/CIKM2020-S3Rec, pinned commit)."""
    return Remote(
        url=f"https://raw.githubusercontent.com/RUCAIBox/CIKM2020-S3Rec/{_COMMIT}/data/{name}.txt",
        name=f"{name}.txt",
        sha256=_SHA256[name],
    )


def load(name: str = "Beauty", history_len: int = 50, attributes: bool = False, root: str | Path | None = None) -> RawDataset:
    """Interactions of sequence file ``name`` (one of :data:`NAMES`).

    ``root`` is the folder holding ``<name>.txt`` (``$RECFORGE_DATA/amazon-sequential-s3rec`` by
    default, else a verified download). ``history_len`` > 0 declares ``hist_item_id``.

    Columns: user_id, item_id, position (int64); click (int8, always 1); with ``attributes``:
    attributes (list[int64]).
    """
    if name not in _SHA256:
        raise DataError(f"unknown sequence file {name!r}; known: {', '.join(NAMES)}")
    if history_len < 0:
        raise DataError(f"history_len must be >= 0, got {history_len}")
    base = dataset_dir(FOLDER, [remote(name)], root=root)
    path = base / f"{name}.txt"
    frame = read_sequences(path)
    if attributes:
        table = read_attributes(base / f"{name}_item2attributes.json")
        frame = frame.join(table, on="item_id", how="left", validate="m:1", maintain_order="left")
        frame = frame.with_columns(pl.col("attributes").fill_null(pl.lit([], dtype=pl.List(pl.Int64))))
    return RawDataset(frame=frame, schema=schema(history_len, attributes), origin=str(path))


def read_attributes(path: Path) -> pl.DataFrame:
    """``{"item": [attribute ids]}`` -> item_id (int64), attributes (list[int64])."""
    if not path.is_file():
        raise DataError(f"attribute file not found: {path}")
    try:
        table = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(table, dict):
        raise DataError(f"{path}: expected an object of item id -> list of attribute ids")
    for item, values in table.items():
        if not item.isdigit() or not isinstance(values, list) or not all(type(v) is int for v in values):
            raise DataError(f"{path}: item {item!r}: expected an integer item id and a list of integer attribute ids, got {values!r}")
    return pl.DataFrame(
        {"item_id": [int(item) for item in table], "attributes": list(table.values())},
        schema={"item_id": pl.Int64, "attributes": pl.List(pl.Int64)},
    )


def read_sequences(path: Path) -> pl.DataFrame:
    """``user item_1 ... item_n`` lines -> rows (user_id, item_id, position, click)."""
    if not path.is_file():
        raise DataError(f"sequence file not found: {path}")
    lines = text_lines(path, str(path))
    tokens = lines.select("line", pl.col("text").str.extract_all(r"\S+"))
    short = tokens.filter(pl.col("text").list.len() < 2)
    if short.height:
        raise DataError(f"{path}, line {short['line'][0]}: a user id and at least one item needed")
    ids = tokens.select("line", pl.col("text").cast(pl.List(pl.Int64), strict=False).alias("ids"))
    bad = ids.filter(pl.col("ids").list.eval(pl.element().is_null()).list.any())
    if bad.height:
        raise DataError(f"{path}, line {bad['line'][0]}: ids must be integers")
    seqs = ids.select(
        "line",
        pl.col("ids").list.first().alias("user_id"),
        pl.col("ids").list.slice(1).alias("item_id"),
    )  # [U] one row per user, item_id: list[int64]
    repeated = seqs.filter(~pl.col("user_id").is_first_distinct())
    if repeated.height:
        line, user = repeated.row(0)[:2]
        raise DataError(f"{path}, line {line}: user {user} repeats")
    return (
        seqs.with_columns(position=pl.int_ranges(0, pl.col("item_id").list.len(), dtype=pl.Int64))
        .explode(["item_id", "position"])
        .select("user_id", "item_id", "position", click=pl.lit(1, dtype=pl.Int8))
    )  # [N] one row per interaction


def schema(history_len: int = 50, attributes: bool = False) -> Schema:
    """Schema of :func:`load`'s frame."""
    features = [Feature(name=c, kind=Kind.CATEGORICAL) for c in ("user_id", "item_id")]
    if attributes:
        features.append(Feature(name="attributes", kind=Kind.SEQUENCE, max_len=ATTRIBUTES_MAX_LEN))
    if history_len:
        features.append(history_feature(history_len))
    return Schema(features=features, labels=["click"], user="user_id", time="position")
