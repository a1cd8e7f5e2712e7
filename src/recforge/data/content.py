"""Content vectors of keys (items): their text through the sentence encoder, or the user's own vectors.

An embedding feature with ``text`` makes one text per key from the raw text columns (values joined
by ". ", list values by ", ", empty values skipped): with ``text_from="key"`` every row of a key must
give the same text; with ``text_from="fit_rows"`` the key's text is its fitting rows' texts in time
order, joined by " | " and cut at :data:`MAX_TEXT_CHARS` (the encoder reads at most 256 word pieces),
and a key without a fitting row has no text. Each distinct text is encoded once, and cached on disk
by (encoder checksum, text hash) under ``$RECFORGE_CACHE/text-vectors``, so preparing the same texts
again encodes nothing. The frozen encoder's per-token states (:func:`token_states`) are cached the
same way, per token count.

An embedding feature with ``vectors`` reads a Parquet file with the key's column and a ``vector``
column (``dim`` finite floats per row, one row per key); every key of the data needs a vector.

A key without content (no fitting row) gets the zero vector, the OOV vector of a content table.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

import numpy as np
import polars as pl

from recforge.data.schema import Feature
from recforge.data.sources import locate
from recforge.data.sources._download import cache_dir
from recforge.errors import DataError

MAX_TEXT_CHARS = 4096
TEXT_SEPARATOR, LIST_SEPARATOR, ROWS_SEPARATOR = ". ", ", ", " | "
_TEXT_DTYPES = (pl.String, pl.Categorical, pl.Enum)


def check_text_columns(frame: pl.DataFrame, f: Feature, origin: str) -> None:
    """Every text column of ``f`` holds strings (or integers, or lists of strings) with no missing value."""
    for name in f.text or []:
        col = frame[name]
        inner = col.dtype.inner if isinstance(col.dtype, pl.List) else col.dtype
        if not (isinstance(inner, _TEXT_DTYPES) or inner in _TEXT_DTYPES or inner.is_integer()):
            raise DataError(f"{origin}: text column {name!r} of {f.name!r} has dtype {col.dtype}; expected text")
        missing = col.is_null() | (col.list.eval(pl.element().is_null()).list.any() if isinstance(col.dtype, pl.List) else False)
        if missing.any():
            row = int(missing.arg_true()[0])
            raise DataError(f"{origin}: text column {name!r}, {locate(origin, row)}: missing value (use an empty string for no text)")


def row_texts(frame: pl.DataFrame, f: Feature) -> pl.Expr:
    """The text each row gives for ``f``: its text columns' non-empty values joined."""
    parts = []
    for name in f.text or []:
        col = pl.col(name)
        if isinstance(frame[name].dtype, pl.List):
            col = col.list.eval(pl.element().cast(pl.String)).list.join(LIST_SEPARATOR)
        col = col.cast(pl.String).str.strip_chars()
        parts.append(pl.when(col != "").then(col))
    return pl.concat_str(parts, separator=TEXT_SEPARATOR, ignore_nulls=True).fill_null("")


def key_texts(frame: pl.DataFrame, f: Feature, fitting: pl.Expr, time: str | None, origin: str) -> pl.DataFrame:
    """One text per key of ``f`` (columns ``key`` as text and ``text``; "" where a key has none).

    ``frame`` holds the raw columns and ``_row``; ``fitting`` selects the rows of the fitting splits.
    """
    rows = frame.select(pl.col(f.key).cast(pl.String).alias("key"), row_texts(frame, f).alias("text"), "_row", fitting.alias("_fit"), *([time] if time else []))
    keys = rows.group_by("key", maintain_order=True).agg(pl.col("_row").first())
    if f.text_from == "key":
        differing = rows.with_columns(
            pl.col("text").first().over("key").alias("_first"), pl.col("_row").first().over("key").alias("_first_row")
        ).filter(pl.col("text") != pl.col("_first"))
        if differing.height:
            key, first, row = differing["key"][0], int(differing["_first_row"][0]), int(differing["_row"][0])
            raise DataError(
                f"{origin}: text of {f.name!r} differs for {f.key} {key!r} ({locate(origin, first)} and {locate(origin, row)}); "
                f"columns {f.text} describe the {f.key} and must be equal on its rows (or set text_from: fit_rows)"
            )
        empty = rows.filter(pl.col("text") == "")
        if empty.height:
            raise DataError(f"{origin}: text of {f.name!r} is empty for {f.key} {empty['key'][0]!r} ({locate(origin, int(empty['_row'][0]))}): columns {f.text} hold no text")
        return rows.group_by("key", maintain_order=True).agg(pl.col("text").first())
    order = [time, "_row"] if time else ["_row"]
    joined = (
        rows.filter(pl.col("_fit") & (pl.col("text") != ""))
        .sort(order)
        .group_by("key")
        .agg(pl.col("text").str.join(ROWS_SEPARATOR).str.slice(0, MAX_TEXT_CHARS))
    )
    return keys.join(joined, on="key", how="left").select("key", pl.col("text").fill_null(""))


def file_vectors(f: Feature, keys: pl.Series) -> np.ndarray:
    """The vectors of ``keys`` (as text) from ``f.vectors`` -> [K, dim] float32."""
    path = Path(f.vectors or "")
    if not path.is_file():
        raise DataError(f"embedding {f.name!r}: vector file {path} not found")
    try:
        table = pl.read_parquet(path)
    except Exception as err:  # polars raises several error types for a file that is not Parquet
        raise DataError(f"{path}: not a readable Parquet file ({str(err).splitlines()[0]})") from None
    for column in (f.key, "vector"):
        if column not in table.columns:
            raise DataError(f"{path}: missing column {column!r}; the file has {table.columns}")
    vector = table["vector"]
    if not isinstance(vector.dtype, (pl.List, pl.Array)) or not vector.dtype.inner.is_numeric():
        raise DataError(f"{path}: column 'vector' must hold lists of floats, got {vector.dtype}")
    where = lambda row: f"{path}: row {row + 1} ({f.key} {table[f.key][row]!r})"  # noqa: E731
    bad = vector.is_null() | (vector.list.len() != f.dim) if isinstance(vector.dtype, pl.List) else vector.is_null()
    if bad.any():
        row = int(bad.arg_true()[0])
        got = "no vector" if vector[row] is None else f"{len(vector[row])} numbers"
        raise DataError(f"{where(row)}: vector has {got}, expected {f.dim} (the width of {f.name!r})")
    if isinstance(vector.dtype, pl.Array) and vector.dtype.size != f.dim:
        raise DataError(f"{path}: vectors have {vector.dtype.size} numbers, expected {f.dim} (the width of {f.name!r})")
    values = np.asarray(vector.to_list(), dtype=np.float64).reshape(-1, f.dim)
    finite = np.isfinite(values).all(1)
    if not finite.all():
        raise DataError(f"{where(int(np.flatnonzero(~finite)[0]))}: vector holds NaN or infinity")
    file_keys = table[f.key].cast(pl.String)
    dupes = file_keys.is_duplicated()
    if dupes.any():
        raise DataError(f"{where(int(dupes.arg_true()[0]))}: {f.key} {file_keys[int(dupes.arg_true()[0])]!r} has more than one vector")
    index = pl.DataFrame({"key": file_keys, "_at": np.arange(len(file_keys))})
    found = pl.DataFrame({"key": keys}).join(index, on="key", how="left", maintain_order="left")["_at"]
    if found.null_count():
        key = keys[int(found.is_null().arg_true()[0])]
        raise DataError(f"{path}: no vector for {f.key} {key!r}, which the data holds ({found.null_count()} keys without one)")
    return values[found.to_numpy()].astype(np.float32)


# --- the encoder, cached by (encoder checksum, text hash) --------------------------------------
def _hashes(texts: list[str]) -> np.ndarray:
    return np.array([hashlib.sha256(t.encode()).digest()[:16] for t in texts], dtype="S16")


def _cache(kind: str) -> Path:
    """``$RECFORGE_CACHE/<kind>/<encoder checksum>``: vectors of one encoder's weights."""
    from recforge.text.encoder import WEIGHTS_SHA256

    kind, _, rest = kind.partition("/")
    return cache_dir(kind) / WEIGHTS_SHA256[:16] / rest


def _cached(folder: Path, hashes: np.ndarray, fields: tuple[str, ...]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Which of the distinct ``hashes`` the cache shards in ``folder`` hold, and their ``fields`` in input order."""
    found = np.zeros(len(hashes), dtype=bool)
    values: dict[str, np.ndarray] = {}
    for shard in sorted(folder.glob("*.npz")) if folder.is_dir() else []:
        with np.load(shard) as data:
            order = np.argsort(data["hashes"])
            stored = data["hashes"][order]
            at = np.minimum(np.searchsorted(stored, hashes), len(stored) - 1)
            hit = (stored[at] == hashes) & ~found
            if not hit.any():
                continue
            for name in fields:
                if name not in values:
                    values[name] = np.zeros((len(hashes), *data[name].shape[1:]), dtype=data[name].dtype)
                values[name][hit] = data[name][order[at[hit]]]
            found |= hit
    return found, values


def _add_shard(folder: Path, hashes: np.ndarray, **fields: np.ndarray) -> None:
    """A new cache shard, written atomically (readers see it whole or not at all)."""
    folder.mkdir(parents=True, exist_ok=True)
    name = uuid.uuid4().hex
    tmp = folder / f".{name}.tmp.npz"
    with open(tmp, "wb") as handle:
        np.savez(handle, hashes=hashes, **fields)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, folder / f"{name}.npz")


def _encoded(texts: list[str], kind: str, fields: dict[str, tuple[tuple[int, ...], type]], encode) -> dict[str, np.ndarray]:
    """``fields`` of each distinct text, from the cache under ``kind`` or from ``encode`` (which then caches them)."""
    hashes, inverse = np.unique(_hashes(texts), return_inverse=True)
    folder = _cache(kind)
    found, values = _cached(folder, hashes, tuple(fields))
    for name, (shape, dtype) in fields.items():
        values.setdefault(name, np.zeros((len(hashes), *shape), dtype=dtype))
    if not found.all():
        todo = np.flatnonzero(~found)
        first = np.zeros(len(hashes), dtype=np.int64)
        first[inverse[::-1]] = np.arange(len(texts))[::-1]  # a text of each hash
        new = encode([texts[i] for i in first[todo]])
        _add_shard(folder, hashes[todo], **new)
        for name in fields:
            values[name][todo] = new[name]
    return {name: value[inverse] for name, value in values.items()}


def sentence_vectors(texts: list[str], progress: bool = True) -> np.ndarray:
    """Unit-norm sentence vectors of non-empty ``texts`` -> [N, 384] float32, encoding only those not cached."""
    from recforge.text.encoder import SentenceEncoder

    def encode(todo: list[str]) -> dict[str, np.ndarray]:
        return {"vectors": SentenceEncoder.load().encode(todo, progress=progress)}

    return _encoded(texts, "text-vectors", {"vectors": ((384,), np.float32)}, encode)["vectors"]


def token_states(texts: list[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """The frozen encoder's token states of ``texts`` -> ([N, max_length, 384] float16, [N, max_length] bool mask).

    An empty text has no tokens (all-false mask, zero states). Cached per ``max_length``.
    """
    from recforge.text.encoder import SentenceEncoder

    def encode(todo: list[str]) -> dict[str, np.ndarray]:
        states, mask = SentenceEncoder.load().token_states(todo, max_length)
        return {"states": states.astype(np.float16), "mask": mask}

    texts = list(texts)
    present = np.array([bool(t) for t in texts], dtype=bool)
    states = np.zeros((len(texts), max_length, 384), dtype=np.float16)
    mask = np.zeros((len(texts), max_length), dtype=bool)
    if present.any():
        got = _encoded([t for t in texts if t], f"token-states/{max_length}", {"states": ((max_length, 384), np.float16), "mask": ((max_length,), bool)}, encode)
        states[present], mask[present] = got["states"], got["mask"]
    return states, mask
