"""Rows re-targeted to other items: the candidates of sampled ranking and the negatives of training.

:class:`ItemSwap` knows, for a store and its item feature, what goes with an item (its own
categorical or list features, read by :meth:`~recforge.data.store.Store.item_features`, and its
item-keyed vectors), which items each user had in the train split, and how to draw items a user
never had (:func:`unseen_items`).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import Tensor

from recforge.data.batch import Batch
from recforge.data.schema import Kind
from recforge.data.store import Store


def unseen_items(
    generator: np.random.Generator, pool: np.ndarray, users: np.ndarray, targets: np.ndarray, seen_keys: np.ndarray,
    num_items: int, draws: int,
) -> np.ndarray:  # fmt: skip
    """``draws`` distinct items of ``pool`` per row, uniform, none the row's target or a train item
    of its user (``seen_keys``: sorted ``user * num_items + item``) -> [R, draws]. Rejection
    sampling from 2 x draws (+ 64) draws per row; a row left short (small pools) is redrawn by
    ranking random keys over the whole pool."""
    width = 2 * draws + 64
    picks = pool[generator.integers(0, len(pool), (len(users), width))]  # [R, W]
    order = np.argsort(picks, axis=1, kind="stable")
    ordered = np.take_along_axis(picks, order, 1)
    repeat = np.zeros_like(ordered, dtype=bool)
    repeat[:, 1:] = ordered[:, 1:] == ordered[:, :-1]  # later copies of a value
    duplicate = np.empty_like(repeat)
    np.put_along_axis(duplicate, order, repeat, 1)
    keys = users[:, None] * num_items + picks
    at = np.minimum(np.searchsorted(seen_keys, keys), len(seen_keys) - 1)
    valid = ~duplicate & (seen_keys[at] != keys) & (picks != targets[:, None])
    first = np.argsort(~valid, axis=1, kind="stable")[:, :draws]  # the first valid draws, in draw order
    chosen = np.take_along_axis(picks, first, 1)
    short = np.flatnonzero(valid.sum(1) < draws)
    if len(short):  # rank random keys over the whole pool, excluded items last
        keys = users[short, None] * num_items + pool[None, :]  # [S, P]
        at = np.minimum(np.searchsorted(seen_keys, keys), len(seen_keys) - 1)
        excluded = (seen_keys[at] == keys) | (pool[None, :] == targets[short, None])
        ranked = np.argsort(generator.random(keys.shape) + excluded, axis=1)[:, :draws]
        chosen[short] = pool[ranked]
    return chosen


class ItemSwap:
    """Replaces the item of rows by other items of ``store``'s ``item`` vocabulary, with the
    item's own ``item_features`` and item-keyed vectors."""

    def __init__(self, store: Store, item: str = "item_id", item_features: list[str] | None = None) -> None:
        schema = store.schema
        self.schema, self.item = schema, item
        self.features = {name: torch.from_numpy(ids) for name, ids in store.item_features(item, list(item_features or [])).items()}
        self.vectors = {f.name: torch.from_numpy(store.vectors_by_vocab(f.name)) for f in schema.embeddings if f.key == item}
        train = store.split("train")
        users, items = train.column(schema.user).astype(np.int64), train.column(item).astype(np.int64)
        self.num_items = schema.vocab_size(schema.feature(item).vocab)
        self.seen_keys = np.unique(users * self.num_items + items)  # every (user, train item)
        self.item_count = np.bincount(items, minlength=self.num_items)
        self.pool = np.flatnonzero(self.item_count)  # items with a train row

    def unseen(self, generator: np.random.Generator, batch: Batch, draws: int) -> np.ndarray:
        """``draws`` items per row of ``batch`` that its user never had in train, nor its item: [B, draws]."""
        users = batch.categorical[:, self.schema.categorical_index(self.schema.user)].numpy()
        targets = batch.categorical[:, self.schema.categorical_index(self.item)].numpy()
        return unseen_items(generator, self.pool, users, targets, self.seen_keys, self.num_items, draws)

    def expanded(self, batch: Batch, items: Tensor) -> Batch:
        """``batch``'s rows, each repeated once per candidate ``items`` [B, C], the item and its
        features replaced by the candidate's -> a batch of B x C rows (row-major: row 0's C first)."""
        schema, c = self.schema, items.shape[1]
        flat = items.flatten()
        categorical = batch.categorical.repeat_interleave(c, 0)
        categorical[:, schema.categorical_index(self.item)] = flat
        sequences = {name: values.repeat_interleave(c, 0) for name, values in batch.sequences.items()}
        for name, table in self.features.items():
            if schema.feature(name).kind is Kind.CATEGORICAL:
                categorical[:, schema.categorical_index(name)] = table[flat]
            else:
                sequences[name] = table[flat]
        embeddings = {name: values.repeat_interleave(c, 0) for name, values in batch.embeddings.items()}
        embeddings |= {name: table[flat] for name, table in self.vectors.items()}
        names = [f.name for f in schema.categorical]
        return dataclasses.replace(
            batch, categorical=categorical, numeric=batch.numeric.repeat_interleave(c, 0), sequences=sequences,
            embeddings=embeddings, labels={name: v.repeat_interleave(c, 0) for name, v in batch.labels.items()},
            group=categorical[:, names.index(schema.user)], domain=None if batch.domain is None else batch.domain.repeat_interleave(c, 0),
            row=batch.row.repeat_interleave(c, 0),
        )  # fmt: skip

    def with_negatives(self, generator: np.random.Generator, batch: Batch, draws: int) -> Batch:
        """Each row followed by ``draws`` copies whose item is one its user never had in train,
        every label 0 on them -> a batch of B x (1 + draws) rows."""
        items = torch.cat([batch.categorical[:, self.schema.categorical_index(self.item)].unsqueeze(1),
                           torch.from_numpy(self.unseen(generator, batch, draws))], 1)  # fmt: skip
        out = self.expanded(batch, items)
        negative = (torch.arange(len(out)) % (1 + draws)) != 0
        return dataclasses.replace(out, labels={name: v.masked_fill(negative, 0) for name, v in out.labels.items()})
