"""Embedding of every categorical field and sequence with one fused table.

All vocabularies of a schema are stacked into one ``nn.Embedding``, so that the categorical
fields of a batch are embedded by a single lookup (``ids + offsets``). Features that share a
vocabulary share rows.

A large table gets sparse gradients, so that the row-wise optimiser touches only the rows a
batch uses. A table of at most :data:`DENSE_GRADIENT_MAX_ELEMENTS` weights gets a dense
gradient instead: coalescing a sparse gradient (a sort of every looked-up id) then costs more
than updating the whole table, and since an untouched row's gradient is zero the row-wise update
is the same either way.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from recforge.data.batch import Batch
from recforge.data.schema import Schema

DENSE_GRADIENT_MAX_ELEMENTS = 1 << 20  # 4 MiB of float32 weights


class FeatureEmbedding(nn.Module):
    """One table over all vocabularies of ``schema``, trained by the row-wise optimiser.

    ``fields(batch)`` -> [B, F_cat, D] for the categorical fields;
    ``sequence(batch, name)`` -> [B, L, D] for a sequence feature (padding rows are zero);
    ``lookup(ids, vocab)`` -> [..., D] for ids of a named vocabulary.

    Inside ``with emb.replaced(feature, vectors):`` the categorical ``feature`` is embedded by
    the given per-row ``vectors`` [B, D] instead of its table rows (a cold-start generator feeds
    its generated item embeddings to any model this way; gradients flow to ``vectors``).
    """

    def __init__(self, schema: Schema, dim: int, vocabs: list[str] | None = None) -> None:
        super().__init__()
        self.schema = schema
        self.dim = dim
        names = vocabs if vocabs is not None else schema.vocabs
        sizes = [schema.vocab_size(v) for v in names]
        starts = torch.tensor([0] + sizes[:-1]).cumsum(0)
        self.vocab_offset = {v: int(s) for v, s in zip(names, starts)}
        rows = sum(sizes)
        self.table = nn.Embedding(rows, dim, sparse=rows * dim > DENSE_GRADIENT_MAX_ELEMENTS)
        nn.init.normal_(self.table.weight, std=1e-2)
        field_offsets = [self.vocab_offset[f.vocab] for f in schema.categorical]
        self.register_buffer("field_offsets", torch.tensor(field_offsets, dtype=torch.long), persistent=False)
        self._replacement: tuple[int, Tensor] | None = None

    @property
    def num_fields(self) -> int:
        return len(self.field_offsets)

    @property
    def flat_dim(self) -> int:
        """Width of :meth:`flat`."""
        return (self.num_fields + len(self.schema.sequences)) * self.dim + len(self.schema.numeric)

    def flat(self, batch: Batch) -> Tensor:
        """Every field's embedding, every mean-pooled sequence and the numeric features side by
        side -> [B, flat_dim]: the input of an embedding-and-MLP model."""
        e = torch.cat([self.fields(batch), self.pooled_sequences(batch)], 1)  # [B, F + S, D]
        return torch.cat([e.flatten(1), batch.numeric], 1)

    @property
    def num_field_vectors(self) -> int:
        """Rows of :meth:`field_vectors`."""
        return self.num_fields + len(self.schema.sequences) + len(self.schema.numeric)

    def field_vectors(self, batch: Batch, numeric_vectors: Tensor) -> Tensor:
        """One D-vector per input: every field's embedding, every mean-pooled sequence and each
        numeric value times its own vector (``numeric_vectors`` [Fn, D], the model's parameter)
        -> [B, F + S + Fn, D]: the input of a field-interaction model."""
        numeric = batch.numeric.unsqueeze(-1) * numeric_vectors  # [B, Fn, D]
        return torch.cat([self.fields(batch), self.pooled_sequences(batch), numeric], 1)

    def fields(self, batch: Batch) -> Tensor:
        e = self.table(batch.categorical + self.field_offsets)  # [B, F, D]
        if self._replacement is None:
            return e
        column, vectors = self._replacement
        return torch.cat([e[:, :column], vectors.unsqueeze(1), e[:, column + 1 :]], 1)  # [B, F, D]

    @contextmanager
    def replaced(self, feature: str, vectors: Tensor) -> Iterator[None]:
        """Embed categorical ``feature`` by ``vectors`` [B, D] within the block."""
        if vectors.shape[-1] != self.dim:
            raise ValueError(f"replacement vectors for {feature!r} have width {vectors.shape[-1]}, the table {self.dim}")
        previous, self._replacement = self._replacement, (self.schema.categorical_index(feature), vectors)
        try:
            yield
        finally:
            self._replacement = previous

    def lookup(self, ids: Tensor, vocab: str) -> Tensor:
        return self.table(ids + self.vocab_offset[vocab])  # [..., D]

    def sequence(self, batch: Batch, name: str) -> Tensor:
        """Embeddings of a sequence's ids, 0 at pads: [B, L] -> [B, L, D] ([B, L, W] -> [B, L, W, D])."""
        ids = batch.sequences[name]  # [B, L] or [B, L, W]
        emb = self.lookup(ids, self.schema.feature(name).vocab)  # [..., D]
        return emb * (ids != 0).unsqueeze(-1)

    def pooled_sequences(self, batch: Batch) -> Tensor:
        """Mean over the non-padding ids of every sequence feature (over events and their tokens
        for a list timeline) -> [B, S, D]."""
        pooled = []
        for f in self.schema.sequences:
            ids = batch.sequences[f.name].flatten(1)  # [B, L] (or L * W ids)
            emb = self.sequence(batch, f.name).flatten(1, -2)  # [B, L, D]
            count = (ids != 0).sum(1, keepdim=True).clamp(min=1)  # [B, 1]
            pooled.append(emb.sum(1) / count)
        if not pooled:
            return batch.numeric.new_zeros(len(batch), 0, self.dim)
        return torch.stack(pooled, 1)
