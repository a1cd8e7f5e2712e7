"""Raw table + schema -> encoded store on disk.

Vocabularies and numeric normalisers are fitted on the train split only (or on the splits
that ``SplitConfig.fit_on`` names). Index 0 is padding,
1 is OOV (unseen in train, or seen fewer than ``min_count`` times); known values get 2.. in
order of decreasing train frequency. The store holds, per split, one int32 matrix of all
categorical columns, one float32 matrix of numeric columns and one of labels; sequences are
(start, end) views into a values array: a list column's own values, or the user's timeline for
a history, so that a sample's history is the events strictly before its time.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import polars as pl

from recforge.data import content
from recforge.data.schema import N_RESERVED, OOV, Feature, Kind, Schema
from recforge.data.sources import RawDataset, locate
from recforge.data.splits import SPLITS, SplitConfig, assign_splits
from recforge.data.store import Store, last_window
from recforge.errors import DataError

_ID_DTYPES = (pl.String, pl.Categorical, pl.Enum, pl.Boolean)
TEXT_DIM = 384  # width of the sentence encoder's vectors


def validate(raw: RawDataset) -> None:
    """Check that every declared column exists with a usable dtype and no missing values.

    Each problem is a :class:`DataError` naming the origin, the column and where the first bad value
    is (:func:`recforge.data.sources.locate`: ``line N`` of a CSV file, else ``row N`` from 1).
    """
    frame, schema, origin = raw.frame, raw.schema, raw.origin
    if frame.height == 0:
        raise DataError(f"{origin}: the table is empty")
    missing = [c for c in schema.raw_columns() if c not in frame.columns]
    if missing:
        raise DataError(f"{origin}: missing column(s) {missing}; the table has {frame.columns}")
    for f in schema.features:
        if f.timeline is not None:
            continue
        if f.kind is Kind.EMBEDDING and f.text is not None:
            if f.dim != TEXT_DIM:
                raise DataError(f"{origin}: text embedding {f.name!r} has dim {f.dim}; the sentence encoder gives {TEXT_DIM} numbers")
            content.check_text_columns(frame, f, origin)
            continue
        if f.kind is Kind.EMBEDDING and f.vectors is not None:
            continue
        col = frame[f.name]
        if f.kind is Kind.CATEGORICAL:
            if not (col.dtype.is_integer() or isinstance(col.dtype, _ID_DTYPES) or col.dtype in _ID_DTYPES):
                raise DataError(
                    f"{origin}: categorical column {f.name!r} has dtype {col.dtype}; "
                    "ids must be integers or strings (cast floats explicitly)"
                )
            _no_nulls(col, origin)
        elif f.kind is Kind.NUMERIC:
            if not col.dtype.is_numeric():
                raise DataError(f"{origin}: numeric column {f.name!r} has dtype {col.dtype}")
            _no_nulls(col, origin)
            _all_finite(col, origin)
        elif f.kind is Kind.SEQUENCE:
            if not isinstance(col.dtype, pl.List):
                raise DataError(
                    f"{origin}: sequence column {f.name!r} must be a list column, got {col.dtype}"
                )
            _no_nulls(col, origin)
            bad = col.list.eval(pl.element().is_null()).list.any()
            if bad.any():
                row = int(bad.arg_true()[0])
                raise DataError(f"{origin}: sequence column {f.name!r}, {locate(origin, row)}: missing element")
        elif f.kind is Kind.EMBEDDING:
            if not isinstance(col.dtype, (pl.List, pl.Array)) or not col.dtype.inner.is_numeric():
                raise DataError(f"{origin}: embedding column {f.name!r} must hold float vectors, got {col.dtype}")
            _no_nulls(col, origin)
            lengths = col.list.len() if isinstance(col.dtype, pl.List) else None
            if lengths is not None and (lengths != f.dim).any():
                row = int((lengths != f.dim).arg_true()[0])
                raise DataError(
                    f"{origin}: embedding column {f.name!r}, {locate(origin, row)}: length {lengths[row]}, expected {f.dim}"
                )
    for label in schema.labels:
        col = frame[label]
        if not (col.dtype.is_numeric() or col.dtype == pl.Boolean):
            raise DataError(f"{origin}: label column {label!r} has dtype {col.dtype}; expected 0/1")
        _no_nulls(col, origin)
        bad = ~col.cast(pl.Float64).is_in([0.0, 1.0])
        if bad.any():
            row = int(bad.arg_true()[0])
            raise DataError(f"{origin}: label column {label!r}, {locate(origin, row)}: value {col[row]!r} is not 0 or 1")
    for f in schema.histories:
        for column, value in (f.where or {}).items():
            dtype = frame[column].dtype
            numeric_value = isinstance(value, (int, float)) and not isinstance(value, bool)
            if (dtype.is_numeric() and not numeric_value) or (not dtype.is_numeric() and numeric_value):
                raise DataError(
                    f"{origin}: history {f.name!r} filters column {column!r} ({dtype}) on {value!r} "
                    f"({type(value).__name__}); the types must match"
                )
    if schema.time is not None:
        if not (frame[schema.time].dtype.is_numeric() or frame[schema.time].dtype.is_temporal()):
            raise DataError(f"{origin}: time column {schema.time!r} has dtype {frame[schema.time].dtype}")
        _no_nulls(frame[schema.time], origin)


def _no_nulls(col: pl.Series, origin: str) -> None:
    if col.null_count():
        row = int(col.is_null().arg_true()[0])
        raise DataError(f"{origin}: column {col.name!r}, {locate(origin, row)}: missing value")


def _all_finite(col: pl.Series, origin: str) -> None:
    """No NaN and no infinity in a numeric column."""
    if col.dtype.is_float() and not col.is_finite().all():
        row = int((~col.is_finite()).arg_true()[0])
        raise DataError(f"{origin}: column {col.name!r}, {locate(origin, row)}: {col[row]} is not a finite number")


@dataclass
class Fitted:
    """What preparation fits on the training rows: the schema's vocabulary sizes and domain ids, one
    vocabulary table per vocabulary (columns value as text, count, index) and the numeric normalisers.

    A store and a model bundle hold the same files (``schema.json``, ``vocab/``, ``normalisers.json``
    and, for embeddings from text or a vector file, ``embedding/<name>.npy`` with ``<name>.keys.parquet``),
    so :meth:`load` reads either; :func:`prepare` with ``fitted`` encodes new rows exactly as the
    model's training rows were encoded.
    """

    schema: Schema
    vocabularies: dict[str, pl.DataFrame]
    normalisers: dict[str, dict[str, float]]
    content: dict[str, tuple[pl.DataFrame, np.ndarray]] = field(default_factory=dict)

    @classmethod
    def load(cls, folder: Path) -> "Fitted":
        schema = Schema.load(folder / "schema.json")
        vocabularies = {vocab: pl.read_parquet(folder / "vocab" / f"{vocab}.parquet") for vocab in schema.vocabs}
        tables = {
            f.name: (pl.read_parquet(folder / "embedding" / f"{f.name}.keys.parquet"), np.load(folder / "embedding" / f"{f.name}.npy"))
            for f in schema.content_embeddings
        }
        return cls(schema, vocabularies, json.loads((folder / "normalisers.json").read_text()), tables)


def prepare(raw: RawDataset, out_dir: str | Path, split: SplitConfig | None = None, fitted: Fitted | None = None) -> Store:
    """Encode ``raw`` into a store at ``out_dir`` (replaced if it exists) and open it.

    Without ``fitted`` the vocabularies and normalisers are fitted on the ``fit_on`` splits; with it
    they are ``fitted``'s, unchanged. Either way the store's ``oov.json`` counts, per split and
    feature, the values (list elements for list columns) absent from the vocabulary, encoded as OOV.
    """
    split = split or SplitConfig()
    if fitted is not None:  # the columns the model was trained on, whatever the source declares now
        raw = replace(raw, schema=fitted.schema)
    validate(raw)
    schema = raw.schema.model_copy(deep=True)
    frame = raw.frame.with_row_index("_row")
    # timeline views from the raw values: users unseen in train must not share the OOV timeline
    views = {
        view: timeline_view(frame, schema.user, schema.time, _matches(frame, where))
        for view, where in schema.history_views.items()
    }
    codes = assign_splits(frame, schema, split, raw.origin)
    frame = frame.with_columns(pl.Series("_split", codes))
    if fitted is None and not (codes == 0).any():
        raise DataError(f"{raw.origin}: the {split.kind} split left no training rows")
    train = frame.filter(pl.col("_split").is_in([SPLITS.index(name) for name in split.fit_on]))

    out = Path(out_dir)
    tmp = out.with_name(f"{out.name}.tmp.{os.getpid()}")  # one per process: preparing processes never share it
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "vocab").mkdir(parents=True)

    # vocabularies: fitted on train values of every feature that uses them (counted and encoded in
    # the columns' own dtype, strings only where features of one vocabulary differ in dtype) and
    # stored as text; a saved vocabulary matches values by their text
    encoded: dict[str, pl.Expr] = {}
    for vocab in schema.vocabs:
        users = [f for f in schema.categorical + schema.sequences if f.vocab == vocab and f.timeline is None]
        table = fitted.vocabularies[vocab] if fitted is not None else _fit_vocabulary(train, users)
        table.select(pl.col("value").cast(pl.String), "count", "index").write_parquet(tmp / "vocab" / f"{vocab}.parquet")
        if fitted is None:
            schema.vocab_sizes[vocab] = table.height + N_RESERVED
            if schema.domain is not None and vocab == schema.feature(schema.domain).vocab:
                schema.domain_index = dict(zip(table["value"].cast(pl.String).to_list(), table["index"].to_list()))
        for f in users:
            col = pl.col(f.name)
            encoded[f.name] = col.list.eval(_encode(pl.element(), table)) if f.kind is Kind.SEQUENCE else _encode(col, table)
    frame = frame.with_columns(**encoded)
    # numeric normalisers: train mean and std
    if fitted is not None:
        normalisers = {f.name: fitted.normalisers[f.name] for f in schema.numeric}
    else:
        normalisers = {}
        for f in schema.numeric:
            mean = float(train[f.name].cast(pl.Float64).mean())
            std = float(train[f.name].cast(pl.Float64).std() or 0.0) or 1.0
            normalisers[f.name] = {"mean": mean, "std": std}
    (tmp / "normalisers.json").write_text(json.dumps(normalisers, indent=2))
    if schema.numeric:
        frame = frame.with_columns(
            ((pl.col(n).cast(pl.Float64) - s["mean"]) / s["std"]).cast(pl.Float32).alias(n)
            for n, s in normalisers.items()
        )

    # timelines: one per view (all events, or those matching a history's ``where``), each sorted
    # by (user, time, row); a sample's window [start, end) in a view holds its user's events of
    # that view strictly before the sample's time
    if schema.histories:
        (tmp / "timeline").mkdir()
        bounds = {}
        for view, (order, start, end) in views.items():
            bounds |= {f"_hist_start{_suffix(view)}": start, f"_hist_end{_suffix(view)}": end}
            for column in sorted({f.timeline for f in schema.histories if f.view == view}):
                values = _event_values(frame[column], schema.feature(column))[order]  # [E] or [E, W]
                np.save(tmp / "timeline" / f"{column}{_suffix(view)}.npy", values)
        frame = frame.with_columns(pl.Series(name, values) for name, values in bounds.items())

    # pretrained vectors: one table row per distinct key value (content is known for new ids too)
    if schema.embeddings:
        (tmp / "embedding").mkdir()
        fit_codes = [SPLITS.index(name) for name in split.fit_on]
        frame = _embedding_tables(raw, frame, schema, tmp / "embedding", pl.col("_split").is_in(fit_codes), fitted)

    absent = {  # values no vocabulary entry holds: OOV after encoding (known values are >= 2)
        name: (pl.col(name).list.eval(pl.element() == OOV).list.sum() if schema.feature(name).kind is Kind.SEQUENCE else pl.col(name) == OOV)
        for name in encoded
    }  # fmt: skip
    absent |= {f.name: pl.col(f"_absent_{f.name}") for f in schema.content_embeddings}  # keys without content
    counts = frame.group_by("_split").agg(absent[name].cast(pl.Int64).sum().alias(name) for name in absent)
    oov = {name: {f: 0 for f in absent} for name in SPLITS}
    for row in counts.iter_rows(named=True):  # one row per split
        oov[SPLITS[row.pop("_split")]] = row
    (tmp / "oov.json").write_text(json.dumps(oov, indent=1))

    for code, name in enumerate(SPLITS):
        _write_split(frame.filter(pl.col("_split") == code), schema, tmp / "splits" / name)

    schema.save(tmp / "schema.json")
    (tmp / "split.json").write_text(split.model_dump_json(indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return Store.open(out)


def _fit_vocabulary(train: pl.DataFrame, users: list) -> pl.DataFrame:
    """The vocabulary of the features ``users`` on the train rows: value, count and index (2.. by
    decreasing count, ties by text), without the values seen fewer than ``min_count`` times."""
    parts = [train[f.name].explode() if f.kind is Kind.SEQUENCE else train[f.name] for f in users]
    if len({part.dtype for part in parts}) > 1:
        parts = [part.cast(pl.String) for part in parts]
    values = pl.concat([part.rename("value") for part in parts])
    return (
        values.value_counts(name="count")
        .with_columns(pl.col("count").cast(pl.Int64), pl.col("value").cast(pl.String).alias("text"))
        .filter(pl.col("count") >= max(f.min_count for f in users))
        .sort(["count", "text"], descending=[True, False])
        .with_columns(pl.int_range(N_RESERVED, pl.len() + N_RESERVED, dtype=pl.Int32).alias("index"))
        .select("value", "count", "index")
    )


def _suffix(view: str) -> str:
    """File-name suffix of a timeline view: none for all events, ``@<view>`` for a filtered one."""
    return f"@{view}" if view else ""


def _matches(frame: pl.DataFrame, where: dict[str, str | int | float | bool]) -> np.ndarray:
    """Rows whose raw columns equal every value of ``where`` (all rows for {}) -> [N] bool."""
    if not where:
        return np.ones(frame.height, dtype=bool)
    return frame.select(pl.all_horizontal(pl.col(c) == pl.lit(v) for c, v in where.items()))[:, 0].to_numpy()


def _event_values(column: pl.Series, f: Feature) -> np.ndarray:
    """A timeline column's encoded values per row: [N] for a categorical feature; [N, W] for a
    list feature, its last W = ``max_len`` ids right-aligned (0-padded left, all 0 when empty)."""
    if f.kind is Kind.CATEGORICAL:
        return column.to_numpy().astype(np.int32)
    lengths = column.list.len().fill_null(0).to_numpy().astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    flat = column.explode().drop_nulls().to_numpy().astype(np.int32)
    return last_window(flat, offsets[:-1], offsets[1:], f.max_len)


def timeline_view(
    frame: pl.DataFrame, user: str, time: str, in_view: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One timeline view: its events and every row's window into it.

    The view's events are the rows where ``in_view``, sorted by (user, time, row). Returns
    ``order`` (their row indices in that order, [E]) and per row of ``frame`` the window
    ``[start, end)`` ([N] each) of its user's view events strictly before the row's time.
    """
    keys = frame.select(
        pl.col(user).rank("dense").cast(pl.Int64).alias("u"), pl.col(time).rank("dense").cast(pl.Int64).alias("t")
    )
    span = int(keys["t"].max()) + 1
    user_key = keys["u"].to_numpy() * span  # [N]
    key = user_key + keys["t"].to_numpy()  # (user, time) as one sortable int64: [N]
    events = np.flatnonzero(in_view)
    order = events[np.argsort(key[events], kind="stable")]  # ties in time keep row order: [E]
    sorted_keys = key[order]
    start = np.searchsorted(sorted_keys, user_key, side="left")  # first event of the user
    end = np.searchsorted(sorted_keys, key, side="left")  # first event at or after the row's time
    return order, start.astype(np.int64), end.astype(np.int64)


def _encode(expr: pl.Expr, table: pl.DataFrame) -> pl.Expr:
    """Vocabulary index of each value (OOV for values not in ``table``), in the table's value dtype."""
    return expr.cast(table["value"].dtype).replace_strict(table["value"], table["index"], default=OOV, return_dtype=pl.Int32)


def _embedding_tables(raw: RawDataset, frame: pl.DataFrame, schema: Schema, out: Path, fitting: pl.Expr, fitted: Fitted | None) -> pl.DataFrame:
    """Write each pretrained-vector table (``<name>.npy``, its keys in ``<name>.keys.parquet``) and
    replace the vector column by its row index; a content embedding also gets ``_absent_<name>``,
    true on rows whose key has no content (its zero vector)."""
    raw_keys = raw.frame.select([pl.col(f.key).cast(pl.String).alias(f"_key_{f.name}") for f in schema.embeddings])
    source = raw.frame.with_row_index("_row").with_columns(frame["_split"])  # raw values, in row order
    frame = frame.with_columns(raw_keys.get_columns())
    for f in schema.embeddings:
        key = f"_key_{f.name}"
        if f.text is not None or f.vectors is not None:
            time = [schema.time] if schema.time is not None else []
            columns = source.select(pl.col(f.key).cast(pl.String), "_row", "_split", *time, *(c for c in dict.fromkeys(f.text or []) if c != f.key))
            keys, vectors = _content_table(raw, columns, f, fitting, fitted)
        else:
            keys, vectors = _row_vector_table(raw, frame, f, key)
        np.save(out / f"{f.name}.npy", vectors)
        keys.drop("absent", strict=False).write_parquet(out / f"{f.name}.keys.parquet")
        index = keys.select(pl.col("key").alias(key), pl.int_range(pl.len(), dtype=pl.Int32).alias("_idx"), *(
            [pl.col("absent").alias(f"_absent_{f.name}")] if "absent" in keys.columns else []
        ))  # fmt: skip
        frame = frame.join(index, on=key, how="left").with_columns(pl.col("_idx").alias(f.name)).drop("_idx", key)
    return frame.sort("_row")


def _row_vector_table(raw: RawDataset, frame: pl.DataFrame, f, key: str) -> tuple[pl.DataFrame, np.ndarray]:
    """The vectors of a raw vector column: one per key, which the key's rows must agree on."""
    ordered = frame.select(key, f.name, "_row").sort("_row")
    differing = ordered.with_columns(
        pl.col(f.name).first().over(key).alias("_first"), pl.col("_row").first().over(key).alias("_first_row")
    ).filter(pl.col(f.name) != pl.col("_first"))
    if differing.height:  # one vector per key: the table keeps one, so rows must not disagree
        value, first_row, row = differing[key][0], int(differing["_first_row"][0]), int(differing["_row"][0])
        raise DataError(
            f"{raw.origin}: embedding column {f.name!r} gives {f.key} {value!r} different vectors "
            f"({locate(raw.origin, first_row)} and {locate(raw.origin, row)}); one vector per {f.key} is expected"
        )
    first = frame.group_by(key, maintain_order=True).agg(pl.col(f.name).first())
    vectors = np.asarray(first[f.name].to_list(), dtype=np.float32).reshape(-1, f.dim)
    return first.select(pl.col(key).alias("key")), vectors


def _content_table(raw: RawDataset, rows: pl.DataFrame, f, fitting: pl.Expr, fitted: Fitted | None) -> tuple[pl.DataFrame, np.ndarray]:
    """The vectors of a text or vector-file embedding, one per distinct key of ``rows`` (raw key,
    ``_row``, ``_split``, time and text columns), with the keys (and texts) and whether each key has
    no content (``absent``: its vector is zero). With ``fitted``: its table's vectors for the keys it
    holds, and for new keys their encoded text (``text_from="key"``) or no content."""
    time = raw.schema.time if raw.schema.time in rows.columns else None
    if fitted is None:
        if f.vectors is not None:
            keys = rows.group_by(f.key, maintain_order=True).agg().select(pl.col(f.key).alias("key"))
            return keys.with_columns(absent=pl.lit(False)), content.file_vectors(f, keys["key"])
        texts = content.key_texts(rows, f, fitting, time, raw.origin).with_columns(absent=pl.col("text") == "")
        return texts, _text_vectors(texts, f.dim)
    known_keys, known = fitted.content[f.name]
    keys = rows.group_by(f.key, maintain_order=True).agg().select(pl.col(f.key).alias("key"))
    keys = keys.join(known_keys.with_row_index("_at"), on="key", how="left", maintain_order="left")
    vectors = np.zeros((keys.height, f.dim), dtype=np.float32)
    known_rows = (~keys["_at"].is_null()).to_numpy()
    vectors[known_rows] = known[keys["_at"].drop_nulls().to_numpy()]
    keys = keys.with_columns(absent=pl.col("_at").is_null())
    if f.text is None:
        return keys.select("key", "absent"), vectors
    keys = keys.with_columns(pl.col("text").fill_null(""))
    if f.text_from == "key" and not known_rows.all():  # new keys bring their own text
        new = keys.filter(pl.col("absent"))["key"]
        fresh = content.key_texts(rows.filter(pl.col(f.key).is_in(new.implode())), f, pl.lit(True), time, raw.origin)
        at = keys.with_row_index("_i").join(fresh.with_row_index("_j"), on="key")
        vectors[at["_i"].to_numpy()] = _text_vectors(fresh, f.dim)[at["_j"].to_numpy()]
        keys = keys.join(fresh.rename({"text": "_fresh"}), on="key", how="left", maintain_order="left")
        keys = keys.with_columns(pl.coalesce("_fresh", "text").alias("text"), absent=pl.lit(False))
    return keys.select("key", "text", "absent"), vectors


def _text_vectors(texts: pl.DataFrame, dim: int) -> np.ndarray:
    """Sentence vectors of the ``text`` column, zero where a text is empty -> [K, dim]."""
    vectors = np.zeros((texts.height, dim), dtype=np.float32)
    present = (texts["text"] != "").to_numpy()
    if present.any():
        vectors[present] = content.sentence_vectors(texts["text"].filter(texts["text"] != "").to_list())
    return vectors


def _write_split(part: pl.DataFrame, schema: Schema, out: Path) -> None:
    out.mkdir(parents=True)
    n = part.height

    def matrix(columns: list[str], dtype) -> np.ndarray:
        if not columns:
            return np.zeros((n, 0), dtype=dtype)
        return np.ascontiguousarray(part.select(columns).to_numpy().astype(dtype, copy=False))

    np.save(out / "categorical.npy", matrix([f.name for f in schema.categorical], np.int32))
    np.save(out / "numeric.npy", matrix([f.name for f in schema.numeric], np.float32))
    np.save(out / "labels.npy", matrix(schema.labels, np.float32))
    np.save(out / "row.npy", part["_row"].to_numpy().astype(np.int64))
    for view in schema.history_views:
        for bound in ("start", "end"):
            name = f"hist_{bound}{_suffix(view)}"
            np.save(out / f"{name}.npy", part[f"_{name}"].to_numpy().astype(np.int64))
    for f in schema.sequences:
        if f.timeline is None:
            lengths = part[f.name].list.len().to_numpy().astype(np.int64)
            offsets = np.zeros(n + 1, dtype=np.int64)
            np.cumsum(lengths, out=offsets[1:])
            np.save(out / f"{f.name}.values.npy", part[f.name].explode().drop_nulls().to_numpy().astype(np.int32))
            np.save(out / f"{f.name}.offsets.npy", offsets)
    for f in schema.embeddings:
        np.save(out / f"{f.name}.index.npy", part[f.name].to_numpy().astype(np.int32))
