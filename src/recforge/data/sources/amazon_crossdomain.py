"""Amazon cross-domain pairs of the DisenCDR release (Cao et al., SIGIR 2022): Sport, Cloth, Phone, Electronic.

Folder ``A_B/`` holds domain A's interactions of the users shared by A and B, ``B_A/`` domain B's
interactions of the same users; user ids are aligned across the two folders, item ids are local
to each folder. Each folder has ``train.txt`` and ``test_original.txt`` (one held-out interaction
per user), tab-separated ``user item 1`` lines without timestamps.

The loader makes one row per interaction of both domains: ``user_id``; ``item_id`` qualified by
its domain (``"sport:17"``), so that the two domains' local ids never collide in one vocabulary;
``domain``; ``position``, the order of the row within its (user, domain) pair (train rows in file
order, then the held-out row, so that a per-(user, domain) leave-one-out split holds out exactly
the file's test interaction); ``click`` = 1.

``test_original.txt`` is read rather than ``test.txt``: ``test.txt`` is the same file minus rows
whose item never occurs in train, a filter the evaluation applies itself (a test item unseen in
the train split has no embedding and is reported as skipped).
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from recforge.data.schema import Feature, Kind, Schema
from recforge.data.sources import RawDataset, history_feature, text_lines
from recforge.data.sources._download import dataset_dir
from recforge.errors import DataError

FOLDER = "amazon-crossdomain-disencdr"
PAIRS = (("sport", "cloth"), ("phone", "electronic"), ("sport", "phone"), ("cloth", "electronic"))
FILES = ("train.txt", "test_original.txt")


def load(pair: str = "sport_cloth", history_len: int = 0, root: str | Path | None = None) -> RawDataset:
    """Both domains of ``pair`` (``"sport_cloth"``, ``"phone_electronic"``, ``"sport_phone"``,
    ``"cloth_electronic"``) as one interaction table.

    ``root`` is the folder holding the ``A_B`` folders (``$RECFORGE_DATA/amazon-crossdomain-disencdr``
    by default). ``history_len`` > 0 declares ``hist_item_id``, a view on the item timeline.

    Columns: user_id (int64), item_id (str), domain (str), position (int64), click (int8, always 1).
    """
    names = tuple(pair.split("_"))
    if names not in PAIRS:
        raise DataError(f"unknown pair {pair!r}; known: {', '.join('_'.join(p) for p in PAIRS)}")
    if history_len < 0:
        raise DataError(f"history_len must be >= 0, got {history_len}")
    base = dataset_dir(FOLDER, [], root=root)
    first, second = names
    parts = [read_domain(base / f"{a}_{b}", a) for a, b in ((first, second), (second, first))]
    users = [set(p["user_id"].unique().to_list()) for p in parts]
    if users[0] != users[1]:
        only = sorted(users[0] ^ users[1])[:5]
        raise DataError(f"{base}: folders {first}_{second} and {second}_{first} must hold the same users; e.g. {only} are in one only")
    frame = pl.concat(parts)
    return RawDataset(frame=frame, schema=schema(history_len), origin=str(base / f"{first}_{second}"))


def read_domain(folder: Path, domain: str) -> pl.DataFrame:
    """``train.txt`` then ``test_original.txt`` of one folder -> rows with ``position`` per user."""
    tables = []
    for order, name in enumerate(FILES):
        rows = read_pairs(folder / name)
        tables.append(rows.with_columns(pl.lit(order, dtype=pl.Int8).alias("_file")))
    frame = pl.concat(tables).with_row_index("_order")
    return frame.select(
        "user_id",
        pl.format("{}:{}", pl.lit(domain), pl.col("item_id")).alias("item_id"),
        pl.lit(domain).alias("domain"),
        pl.col("_order").rank("ordinal").over("user_id").cast(pl.Int64).sub(1).alias("position"),
        pl.lit(1, dtype=pl.Int8).alias("click"),
    )


def read_pairs(path: Path) -> pl.DataFrame:
    """``user<TAB>item<TAB>1`` lines -> columns user_id, item_id (int64); errors name file and line."""
    if not path.is_file():
        raise DataError(f"interaction file not found: {path}")
    lines = text_lines(path, str(path))
    fields = lines.select("line", pl.col("text").str.split("\t").alias("fields"))
    wrong = fields.filter(pl.col("fields").list.len() != 3)
    if wrong.height:
        line, parts = wrong.row(0)
        raise DataError(f"{path}, line {line}: expected 3 tab-separated fields (user, item, 1), got {len(parts)}")
    ids = fields.select(
        "line",
        pl.col("fields").list.get(0).str.strip_chars().cast(pl.Int64, strict=False).alias("user_id"),
        pl.col("fields").list.get(1).str.strip_chars().cast(pl.Int64, strict=False).alias("item_id"),
        pl.col("fields").list.get(2).str.strip_chars().alias("value"),
        pl.col("fields").list.get(0).alias("raw_user"),
        pl.col("fields").list.get(1).alias("raw_item"),
    )
    for column, raw in (("user_id", "raw_user"), ("item_id", "raw_item")):
        bad = ids.filter(pl.col(column).is_null() | (pl.col(column) < 0))
        if bad.height:
            raise DataError(f"{path}, line {bad['line'][0]}: {column} {bad[raw][0]!r} is not a non-negative integer")
    bad = ids.filter(pl.col("value") != "1")
    if bad.height:
        raise DataError(f"{path}, line {bad['line'][0]}: third field {bad['value'][0]!r}; implicit feedback is always 1")
    return ids.select("user_id", "item_id")


def schema(history_len: int = 0) -> Schema:
    """Schema of :func:`load`'s frame."""
    features = [Feature(name=c, kind=Kind.CATEGORICAL) for c in ("user_id", "item_id", "domain")]
    if history_len:
        features.append(history_feature(history_len))
    return Schema(features=features, labels=["click"], user="user_id", time="position", domain="domain")
