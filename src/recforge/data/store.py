"""The encoded store: memory-mapped columns, batches made by slicing a shuffled index.

Layout written by :func:`recforge.data.prepare.prepare`::

    schema.json  split.json  normalisers.json  vocab/<vocab>.parquet
    timeline/<field>.npy                 # [E] int32, every event sorted by (user, time, row)
    timeline/<field>@<view>.npy          # [E_v] int32, the events of a filtered view (``Feature.where``)
    embedding/<feature>.npy              # [K, D] float32 pretrained vectors, one per key
    embedding/<feature>.keys.parquet     # the K keys as text (and, from text, each key's text)
    splits/<split>/categorical.npy       # [N, F_cat] int32
                   numeric.npy           # [N, F_num] float32 (normalised)
                   labels.npy            # [N, T] float32
                   row.npy               # [N] int64 row of the raw table
                   hist_start.npy, hist_end.npy   # [N] int64: the user's history is timeline[start:end]
                   hist_start@<view>.npy, hist_end@<view>.npy   # the same window in a filtered view
                   <seq>.values.npy, <seq>.offsets.npy   # list columns as CSR
                   <emb>.index.npy       # [N] int32 row of the vector table

A batch is ``rows = permutation[k * B:(k + 1) * B]``; every tensor is one fancy-index of a
memory-mapped array, and sequences are the last ``max_len`` entries of each row's
[start, end) window, right-aligned and left-padded with 0.
"""

from __future__ import annotations

from collections.abc import Iterator
import json
from functools import cached_property
from pathlib import Path

import numpy as np
import polars as pl
import torch

from recforge.data.batch import Batch
from recforge.data.schema import Kind, Schema
from recforge.errors import DataError
from recforge.data.splits import SPLITS

STAMP_FILE = "data.json"  # written by recforge.experiment.prepare_store: config, inputs, fingerprint


def _load(path: Path) -> np.ndarray:
    return np.load(path, mmap_mode="r")


def last_window(values: np.ndarray, start: np.ndarray, end: np.ndarray, length: int) -> np.ndarray:
    """The last ``length`` entries of ``values[start_i:end_i]`` per row -> [B, length], 0-padded left."""
    positions = end[:, None] - length + np.arange(length)  # [B, L]
    valid = positions >= start[:, None]
    out = values[np.where(valid, positions, 0)]
    out[~valid] = 0
    return out


def _view_name(stem: str, view: str) -> str:
    return f"{stem}@{view}" if view else stem


class Store:
    """An encoded data set on disk."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.schema = Schema.load(path / "schema.json")

    @classmethod
    def open(cls, path: str | Path) -> "Store":
        path = Path(path)
        if not (path / "schema.json").exists():
            raise FileNotFoundError(f"{path}: not an encoded store (no schema.json); run `recforge prepare`")
        return cls(path)

    @cached_property
    def fingerprint(self) -> str:
        """Digest of what the store was prepared from: its data config and the content of every input."""
        stamp = self.path / STAMP_FILE
        return json.loads(stamp.read_text())["fingerprint"] if stamp.exists() else ""

    def split(self, name: str) -> "SplitView":
        if name not in SPLITS:
            raise KeyError(f"unknown split {name!r}; splits are {SPLITS}")
        return SplitView(self, name)

    def vocabulary(self, vocab: str) -> pl.DataFrame:
        """Columns value (raw, as string), count (train frequency) and index."""
        return pl.read_parquet(self.path / "vocab" / f"{vocab}.parquet")

    @cached_property
    def timeline(self) -> dict[str, np.ndarray]:
        """Timeline arrays keyed by file stem: ``<field>`` or ``<field>@<view>``."""
        stems = {_view_name(f.timeline, f.view) for f in self.schema.histories}
        return {stem: _load(self.path / "timeline" / f"{stem}.npy") for stem in stems}

    @cached_property
    def vectors(self) -> dict[str, np.ndarray]:
        return {f.name: _load(self.path / "embedding" / f"{f.name}.npy") for f in self.schema.embeddings}

    def vector_keys(self, name: str) -> pl.DataFrame:
        """The keys of embedding ``name``'s table, one per row (column ``key`` as text; ``text`` for a text embedding)."""
        return pl.read_parquet(self.path / "embedding" / f"{name}.keys.parquet")

    def _by_vocab(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(vocabulary index, table row) of every key of embedding ``name`` that its key's vocabulary holds."""
        vocab = self.schema.feature(self.schema.feature(name).key).vocab
        pairs = self.vector_keys(name).with_row_index("_row").join(self.vocabulary(vocab), left_on="key", right_on="value")
        return pairs["index"].to_numpy(), pairs["_row"].to_numpy()

    def vectors_by_vocab(self, name: str) -> np.ndarray:
        """Embedding ``name``'s vectors by its key's vocabulary index -> [V, D] float32: row v is the
        vector of the key encoded v; padding, OOV and keys without content are zero."""
        f = self.schema.feature(name)
        out = np.zeros((self.schema.vocab_size(self.schema.feature(f.key).vocab), f.dim), dtype=np.float32)
        index, row = self._by_vocab(name)
        out[index] = self.vectors[name][row]
        return out

    def texts_by_vocab(self, name: str) -> list[str]:
        """Text embedding ``name``'s texts by its key's vocabulary index ("" for padding, OOV and keys without text)."""
        f = self.schema.feature(name)
        if f.text is None:
            raise DataError(f"embedding {name!r} is not made from text")
        out = np.full(self.schema.vocab_size(self.schema.feature(f.key).vocab), "", dtype=object)
        index, row = self._by_vocab(name)
        out[index] = self.vector_keys(name)["text"].to_numpy()[row]
        return out.tolist()


    def item_features(self, item: str, names: list[str]) -> dict[str, np.ndarray]:
        """Each feature's encoded ids per id of ``item``'s vocabulary, read from the item's first
        row (train, then valid, then test: an item's attributes are its content, known for new
        items too): [V] int64 for a categorical feature, [V, max_len] for a list feature; 0 for
        an id without a row."""
        schema = self.schema
        size = schema.vocab_size(schema.feature(item).vocab)
        out = {n: np.zeros((size,) if schema.feature(n).kind is Kind.CATEGORICAL else (size, schema.feature(n).max_len), dtype=np.int64)
               for n in names}  # fmt: skip
        seen = np.zeros(size, dtype=bool)
        for split in SPLITS:
            view = self.split(split)
            unique, first = np.unique(view.column(item).astype(np.int64), return_index=True)
            rows = np.sort(first[~seen[unique]])
            seen[unique] = True
            if not len(rows):
                continue
            batch = view.take(rows)
            items = batch.categorical[:, schema.categorical_index(item)].numpy()
            for name in names:
                categorical = schema.feature(name).kind is Kind.CATEGORICAL
                out[name][items] = (batch.categorical[:, schema.categorical_index(name)] if categorical else batch.sequences[name]).numpy()
        return out


class SplitView:
    """The rows of one split; iterates :class:`Batch` objects."""

    def __init__(self, store: Store, name: str) -> None:
        self.store = store
        self.name = name
        self.schema = store.schema
        root = store.path / "splits" / name
        self.categorical = _load(root / "categorical.npy")
        self.numeric = _load(root / "numeric.npy")
        self.labels = _load(root / "labels.npy")
        self.row = _load(root / "row.npy")
        # per timeline view ("" = all events): each row's window [start, end) into it
        self.windows = {
            view: (_load(root / f"{_view_name('hist_start', view)}.npy"), _load(root / f"{_view_name('hist_end', view)}.npy"))
            for view in self.schema.history_views
        }
        self.hist_start, self.hist_end = self.windows.get("", (None, None))
        self.lists = {
            f.name: (_load(root / f"{f.name}.values.npy"), _load(root / f"{f.name}.offsets.npy"))
            for f in self.schema.sequences
            if f.timeline is None
        }
        self.vector_index = {f.name: _load(root / f"{f.name}.index.npy") for f in self.schema.embeddings}
        names = [f.name for f in self.schema.categorical]
        self._group_col = names.index(self.schema.user) if self.schema.user else None
        self._domain_col = names.index(self.schema.domain) if self.schema.domain else None

    def __len__(self) -> int:
        return self.categorical.shape[0]

    def column(self, name: str) -> np.ndarray:
        """An encoded categorical column or a label column -> [N]."""
        if name in self.schema.labels:
            return np.asarray(self.labels[:, self.schema.labels.index(name)])
        return np.asarray(self.categorical[:, self.schema.categorical_index(name)])

    def num_batches(self, batch_size: int, world_size: int = 1, drop_last: bool = False) -> int:
        """Batches each rank sees; with several ranks every rank gets the same number."""
        total = len(self) // batch_size if drop_last else -(-len(self) // batch_size)
        return total // world_size if world_size > 1 else total

    def batches(
        self,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start: int = 0,
        drop_last: bool = False,
    ) -> Iterator[Batch]:
        """Batches of this rank's shard in an order fixed by ``(seed, epoch)``.

        ``start`` skips this rank's first batches (for a mid-epoch resume) without reading them.
        With ``world_size`` ranks, batch ``k`` goes to rank ``k % world_size``.
        """
        n = len(self)
        order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else None
        for k in range(start, self.num_batches(batch_size, world_size, drop_last)):
            b = k * world_size + rank
            if order is None:
                yield self.take(np.arange(b * batch_size, min((b + 1) * batch_size, n)))
            else:
                yield self.take(np.sort(order[b * batch_size : (b + 1) * batch_size]))

    def take(self, rows: np.ndarray) -> Batch:
        """The batch of the given row indices (sorted indices read the memory map fastest)."""
        categorical = torch.from_numpy(self.categorical[rows].astype(np.int64))
        sequences = {}
        for f in self.schema.sequences:
            if f.timeline is not None:
                starts, ends = self.windows[f.view]
                values, start, end = self.store.timeline[_view_name(f.timeline, f.view)], starts[rows], ends[rows]
            else:
                values, offsets = self.lists[f.name]
                start, end = offsets[rows], offsets[rows + 1]
            sequences[f.name] = torch.from_numpy(last_window(values, start, end, f.max_len).astype(np.int64))
        labels = torch.from_numpy(np.ascontiguousarray(self.labels[rows]))
        return Batch(
            categorical=categorical,
            numeric=torch.from_numpy(np.ascontiguousarray(self.numeric[rows])),
            sequences=sequences,
            embeddings={
                name: torch.from_numpy(self.store.vectors[name][index[rows]]) for name, index in self.vector_index.items()
            },
            labels={name: labels[:, i] for i, name in enumerate(self.schema.labels)},
            group=categorical[:, self._group_col] if self._group_col is not None else None,
            domain=categorical[:, self._domain_col] if self._domain_col is not None else None,
            row=torch.from_numpy(rows.astype(np.int64)),
        )
