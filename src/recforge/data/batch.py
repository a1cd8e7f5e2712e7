"""Batch: the named tensors one training or evaluation step sees."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from torch import Tensor


@dataclass
class Batch:
    """A slice of an encoded store.

    ``categorical`` holds every categorical feature as one int64 matrix, columns in the schema's
    categorical order (``Schema.categorical_index(name)`` gives a column), so that a model embeds
    all fields with one lookup. ``numeric`` is float32 likewise. Sequences are right-aligned
    (most recent last), left-padded with 0.
    """

    categorical: Tensor  # [B, F_cat] int64
    numeric: Tensor  # [B, F_num] float32
    sequences: dict[str, Tensor] = field(default_factory=dict)  # name -> [B, L] int64 ([B, L, W] for a list timeline), 0 = pad
    embeddings: dict[str, Tensor] = field(default_factory=dict)  # name -> [B, D] float32
    labels: dict[str, Tensor] = field(default_factory=dict)  # name -> [B] float32
    group: Tensor | None = None  # [B] int64, the user (GAUC group)
    domain: Tensor | None = None  # [B] int64
    row: Tensor | None = None  # [B] int64, row index in its split (for outputs and tracing)

    def __len__(self) -> int:
        return self.categorical.shape[0]

    def to(self, device: torch.device | str) -> "Batch":
        def move(value):
            if isinstance(value, Tensor):
                return value.to(device, non_blocking=True)
            if isinstance(value, dict):
                return {k: v.to(device, non_blocking=True) for k, v in value.items()}
            return value

        return Batch(**{f.name: move(getattr(self, f.name)) for f in fields(self)})
