"""JDsearch (Liu, Dou, Tang, Xu, SIGIR 2023): JD.com users' full behaviour histories with the real
(anonymised) query behind each behaviour, and one test search per user.

The files (tab-separated text; the official samples ``user_behavior_data_sample.txt`` and
``product_meta_data_sample.txt`` in ``$RECFORGE_DATA/jdsearch-sample``, the full release
``release_data.txt`` and ``product_data.txt``, read instead when the folder holds them; a first
line naming the fields, as the samples have, is skipped). The format follows the data set's
README:

- behaviour file, one user per line, 7 fields: ``query`` (the test query's term ids joined by
  ``\\x18``), ``candidate_wid_list`` (the products shown for it), ``candidate_label_list`` (one
  label each: 0.0 none, 1.0 click, 2.0 add to cart, 3.0 purchase), ``history_qry_list`` (the
  query of each history behaviour, ``-1`` for a behaviour without one), ``history_wid_list``,
  ``history_type_list`` (ORD, CLICK, CART, FLW), ``history_time_list`` (the interval from the
  previous behaviour, 0 for the first; one entry longer than the other history lists, the last
  being the test search's). List fields are joined by ``_``;
- product file, one product per line, 13 fields: ``wid, name, brand_id, brand_name, cate_id_1,
  cate_name_1, ..., cate_id_4, cate_name_4, shop_id``; names are term ids joined by ``\\x18``.
  The README says some products lack metadata (15 of the samples' 230 history behaviours do).

Rows, chosen here: one per behaviour on each user's timeline, the history behaviours in file order,
then one per candidate of the test search, all at the search's time (so no candidate sees another
in its history, and every candidate's history is the user's whole history). Columns:

- ``user_id`` (int64): the number of the user's line in the behaviour file (the file has no user id);
- ``item_id`` (int64): the behaviour's product (``wid``);
- ``query`` (list[int64]): its query's term ids, empty for a behaviour without a query; the test
  query on candidate rows;
- ``behaviour`` (str, not a feature): ORD, CLICK, CART or FLW as the history gives it; on a
  candidate row its label's name (NONE, CLICK, CART, ORD), which a feature would leak;
- ``candidate`` (int8, not a feature): 1 on the test search's candidate rows, 0 on history rows;
- ``time`` (int64): the cumulative sum of the intervals, so a user's first behaviour is at 0. The
  README does not name the unit (the magnitudes suggest seconds); times of different users are
  not on one clock, so split per user (``leave_one_out`` or a ``column`` split), not by a global
  time cut. Intervals of 0 give equal times: behaviours at one time do not see each other;
- ``brand_id``, ``cate_id_1`` .. ``cate_id_4``, ``shop_id`` (int64) and ``name`` (list[int64], the
  name's term ids) of the product, joined by ``wid``; -1 (the file's own marker, as in one
  sample ``shop_id``) and an empty name where the product file lacks the product. The brand and
  category names (term ids naming those ids) are not read;
- ``click`` (int8): 1 on every history row (each is an interaction), label >= 1 on candidate rows.
  Users whose candidates are all 0 (the README drops them from its test) keep their rows.

Features: the ids above as categorical features; ``query`` and ``name`` as list features of one
``term`` vocabulary (queries and names are written in the same anonymised terms);
``hist_item_id`` and ``hist_query`` (a list timeline over ``query``: each earlier behaviour's last
``query_len`` terms) when ``history_len`` > 0.

Every malformed line is a :class:`DataError` naming the file, the line and the field.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from recforge.data.schema import Feature, Kind, Schema
from recforge.data.sources import RawDataset, history_feature, text_lines
from recforge.data.sources._download import dataset_dir
from recforge.errors import DataError

FOLDER = "jdsearch-sample"
# (behaviour file, product file): the full release first, then the official samples
FILES = (("release_data.txt", "product_data.txt"), ("user_behavior_data_sample.txt", "product_meta_data_sample.txt"))
BEHAVIOUR_FIELDS = (
    "query", "candidate_wid_list", "candidate_label_list", "history_qry_list", "history_wid_list",
    "history_type_list", "history_time_list",
)  # fmt: skip
PRODUCT_FIELDS = (
    "wid", "name", "brand_id", "brand_name", "cate_id_1", "cate_name_1", "cate_id_2", "cate_name_2",
    "cate_id_3", "cate_name_3", "cate_id_4", "cate_name_4", "shop_id",
)  # fmt: skip
ATTRIBUTES = ("brand_id", "cate_id_1", "cate_id_2", "cate_id_3", "cate_id_4", "shop_id")
BEHAVIOURS = ("ORD", "CLICK", "CART", "FLW")
LABELS = ("NONE", "CLICK", "CART", "ORD")  # candidate label 0..3 -> behaviour
NO_QUERY = "-1"
TERM_SEPARATOR = "\x18"
MISSING = -1  # attribute id of a product the product file lacks
_EMPTY = pl.lit([], dtype=pl.List(pl.String))


def load(root: str | Path | None = None, history_len: int = 200, query_len: int = 8, name_len: int = 64) -> RawDataset:
    """The behaviours and test searches of JDsearch (see the module).

    ``root`` is the folder holding the files (``$RECFORGE_DATA/jdsearch-sample`` by default; the
    full release is not downloadable, it is distributed through a JD cloud disk). ``query_len``
    and ``name_len`` are the terms kept of each query and name (the last ones; the samples'
    longest query has 7 terms, their longest name 50).
    """
    for what, value, least in (("history_len", history_len, 0), ("query_len", query_len, 1), ("name_len", name_len, 1)):
        if value < least:
            raise DataError(f"{what} must be >= {least}, got {value}")
    base = dataset_dir(FOLDER, root=root)
    present = [pair for pair in FILES if all((base / name).is_file() for name in pair)]
    if not present:
        raise DataError(f"JDsearch files not found in {base}: expected {' and '.join(FILES[0])}, or {' and '.join(FILES[1])}")
    behaviour_path, product_path = (base / name for name in present[0])
    events = read_behaviours(behaviour_path)
    products = read_products(product_path)
    frame = events.join(products, left_on="item_id", right_on="wid", how="left", maintain_order="left").with_columns(
        pl.col(ATTRIBUTES).fill_null(MISSING), pl.col("name").fill_null(pl.lit([], dtype=pl.List(pl.Int64)))
    )
    frame = frame.select("user_id", "item_id", "query", "behaviour", "candidate", "time", *ATTRIBUTES, "name", "click")
    return RawDataset(
        frame=frame, schema=schema(history_len, query_len, name_len), origin=str(behaviour_path), inputs=(behaviour_path, product_path)
    )


def schema(history_len: int = 200, query_len: int = 8, name_len: int = 64) -> Schema:
    """Schema of :func:`load`'s frame."""
    features = [Feature(name=c, kind=Kind.CATEGORICAL) for c in ("user_id", "item_id", *ATTRIBUTES)]
    features += [
        Feature(name="query", kind=Kind.SEQUENCE, max_len=query_len, vocab="term"),
        Feature(name="name", kind=Kind.SEQUENCE, max_len=name_len, vocab="term"),
    ]
    if history_len:
        features += [
            history_feature(history_len),
            Feature(name="hist_query", kind=Kind.SEQUENCE, timeline="query", max_len=history_len, vocab="term"),
        ]
    return Schema(features=features, labels=["click"], user="user_id", time="time")


def read_behaviours(path: Path) -> pl.DataFrame:
    """The behaviour file -> one row per history behaviour and per candidate (see the module):
    user_id, item_id, query, behaviour, candidate, time, click."""
    origin = str(path)
    users = _fields(path, BEHAVIOUR_FIELDS)
    lists = [f for f in BEHAVIOUR_FIELDS if f.endswith("_list")]
    users = users.with_columns(
        pl.when(pl.col(f) == "").then(_EMPTY).otherwise(pl.col(f).str.split("_")).alias(f) for f in lists
    )
    n = {f: pl.col(f).list.len() for f in lists}
    _check(users, n["candidate_label_list"] != n["candidate_wid_list"], origin,
           "candidate_label_list has {} labels for {} candidates in candidate_wid_list", "candidate_label_list", "candidate_wid_list")  # fmt: skip
    for field in ("history_qry_list", "history_type_list"):
        _check(users, n[field] != n["history_wid_list"], origin,
               f"{field} has {{}} entries for {{}} behaviours in history_wid_list", field, "history_wid_list")  # fmt: skip
    _check(users, n["history_time_list"] != n["history_wid_list"] + 1, origin,
           "history_time_list has {} entries; one more than the {} behaviours of history_wid_list is expected",
           "history_time_list", "history_wid_list")  # fmt: skip
    users = _integers(users, "history_time_list", origin, what="a time interval (a whole number >= 0)", least=0)
    users = users.with_columns(
        pl.col("history_time_list").list.head(n["history_wid_list"]).list.eval(pl.element().cum_sum()).alias("time"),
        pl.col("history_time_list").list.sum().alias("search_time"),
        pl.int_ranges(n["history_wid_list"]).alias("position"),
    )
    history = users.select(
        "line", "position",
        pl.col("history_wid_list").alias("item_id"),
        pl.col("history_qry_list").alias("query"),
        pl.col("history_type_list").alias("behaviour"),
        "time",
    ).explode("position", "item_id", "query", "behaviour", "time")  # fmt: skip
    _check(history, ~pl.col("behaviour").is_in(BEHAVIOURS), origin, f"history_type_list: {{!r}} is not one of {', '.join(BEHAVIOURS)}", "behaviour")
    history = _integers(history.rename({"item_id": "history_wid_list"}), "history_wid_list", origin)
    history = _queries(history.rename({"query": "history_qry_list"}), "history_qry_list", origin)
    history = history.select(
        "line", "position", pl.col("history_wid_list").alias("item_id"), pl.col("history_qry_list").alias("query"),
        "behaviour", "time", candidate=pl.lit(0, pl.Int8), click=pl.lit(1, pl.Int8),
    )  # fmt: skip

    searches = _queries(users.select("line", "query", "candidate_wid_list", "candidate_label_list", "search_time"), "query", origin)
    candidates = searches.with_columns(position=pl.int_ranges(pl.col("candidate_wid_list").list.len())).explode(
        "position", "candidate_wid_list", "candidate_label_list"
    )
    label = pl.col("candidate_label_list").cast(pl.Float64, strict=False)
    _check(candidates, ~label.is_in([0.0, 1.0, 2.0, 3.0]).fill_null(False), origin,
           "candidate_label_list: {!r} is not a label (0, 1, 2 or 3)", "candidate_label_list")  # fmt: skip
    candidates = _integers(candidates, "candidate_wid_list", origin).with_columns(label.cast(pl.Int64).alias("label"))
    candidates = candidates.select(
        "line", "position", pl.col("candidate_wid_list").alias("item_id"), "query",
        pl.col("label").replace_strict(dict(enumerate(LABELS)), return_dtype=pl.String).alias("behaviour"),
        pl.col("search_time").alias("time"), candidate=pl.lit(1, pl.Int8), click=(pl.col("label") >= 1).cast(pl.Int8),
    )  # fmt: skip
    return (
        pl.concat([history, candidates])
        .sort("line", "candidate", "position")
        .select(pl.col("line").cast(pl.Int64).alias("user_id"), "item_id", "query", "behaviour", "candidate", "time", "click")
    )


def read_products(path: Path) -> pl.DataFrame:
    """The product file -> wid, the :data:`ATTRIBUTES` (int64) and name (list[int64]), one row per
    product; a product listed twice is an error."""
    origin = str(path)
    products = _fields(path, PRODUCT_FIELDS)
    for field in ("wid", *ATTRIBUTES):
        products = _integers(products, field, origin)
    products = products.with_columns(
        pl.when(pl.col("name") == "").then(_EMPTY).otherwise(pl.col("name").str.split(TERM_SEPARATOR)).alias("name")
    )
    products = _integers(products, "name", origin)
    repeated = products.filter(pl.col("wid").is_duplicated())
    if repeated.height:
        raise DataError(f"{origin}, line {repeated['line'][1]}: wid {repeated['wid'][0]} is listed again (first on line {repeated['line'][0]})")
    return products.select("wid", *ATTRIBUTES, "name")


# --- parsing helpers ----------------------------------------------------------------------------
def _fields(path: Path, names: tuple[str, ...]) -> pl.DataFrame:
    """The tab-separated lines of ``path`` as text columns ``names`` plus ``line``, a first line
    naming the fields skipped; a line with another number of fields is an error."""
    if not path.is_file():
        raise DataError(f"JDsearch file not found: {path}")
    lines = text_lines(path, str(path))
    if lines["text"][0] == "\t".join(names):
        lines = lines.slice(1)
        if lines.height == 0:
            raise DataError(f"{path} has no lines after its header")
    parts = lines.select("line", pl.col("text").str.split("\t"))
    bad = parts.filter(pl.col("text").list.len() != len(names))
    if bad.height:
        raise DataError(f"{path}, line {bad['line'][0]}: expected {len(names)} tab-separated fields, found {bad['text'][0].len()}")
    return parts.select("line", *(pl.col("text").list.get(i).alias(name) for i, name in enumerate(names)))


def _check(table: pl.DataFrame, bad: pl.Expr, origin: str, problem: str, *columns: str) -> None:
    """Raise for the first line where ``bad``: ``problem`` with its ``{}`` filled by ``columns``'
    values (the lengths of list columns)."""
    first = table.filter(bad.fill_null(True)).head(1)
    if first.height:
        values = [first[c][0].len() if isinstance(first[c].dtype, pl.List) else first[c][0] for c in columns]
        raise DataError(f"{origin}, line {first['line'][0]}: {problem.format(*values)}")


def _integers(table: pl.DataFrame, column: str, origin: str, what: str = "an integer id", least: int | None = None) -> pl.DataFrame:
    """``column`` (text, or lists of text) as int64; the first value that is not an integer (or
    is below ``least``) is an error naming its line."""
    listed = isinstance(table[column].dtype, pl.List)
    values = table.select("line", column).explode(column) if listed else table.select("line", column)
    parsed = pl.col(column).cast(pl.Int64, strict=False)
    failed = parsed.is_null() if least is None else parsed.is_null() | (parsed < least)
    _check(values, failed, origin, f"{column}: {{!r}} is not {what}", column)
    return table.with_columns(pl.col(column).cast(pl.List(pl.Int64) if listed else pl.Int64))


def _queries(table: pl.DataFrame, column: str, origin: str) -> pl.DataFrame:
    """A query column (term ids joined by ``\\x18``, or ``-1``) as lists of int64 term ids (empty for ``-1``)."""
    split = pl.when(pl.col(column) == NO_QUERY).then(_EMPTY).otherwise(pl.col(column).str.split(TERM_SEPARATOR))
    return _integers(table.with_columns(split.alias(column)), column, origin, what="a term id")
