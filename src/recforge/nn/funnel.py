"""Building blocks of the entire-space conversion models (ESCM2, DCMT, ChorusCVR).

- :class:`SharedBottomTowers`: field embeddings -> one shared MLP -> one small tower per head,
  the backbone the three models share so that their comparison is about the losses only.
- :func:`inverse_propensity`: ``1 / clip(sg(p), low, 1)``, the inverse-propensity weight of
  the counterfactual losses (the propensity never receives a gradient through its weight).
- :func:`funnel_labels`: click, conversion and the two negatives the funnel tells apart.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from recforge.data.batch import Batch
from recforge.data.schema import Schema
from recforge.nn.embedding import FeatureEmbedding
from recforge.nn.mlp import MLP


class SharedBottomTowers(nn.Module):
    """``[B, fields] -> [B, num_heads]`` logits: embeddings, a shared MLP, one tower per head.

    The input is the concatenation of every categorical field's embedding, the mean-pooled
    sequence features and the numeric features.
    """

    def __init__(
        self,
        schema: Schema,
        num_heads: int,
        embedding_dim: int,
        shared: Sequence[int],
        tower: Sequence[int],
        dropout: float,
    ) -> None:
        super().__init__()
        self.embedding = FeatureEmbedding(schema, embedding_dim)
        in_dim = self.embedding.flat_dim
        self.shared = MLP(in_dim, shared, dropout)
        self.towers = nn.ModuleList(MLP(self.shared.out_dim, tower, out_dim=1) for _ in range(num_heads))

    def forward(self, batch: Batch) -> Tensor:
        h = self.shared(self.embedding.flat(batch))  # [B, H]
        return torch.cat([tower(h) for tower in self.towers], 1)  # [B, num_heads]


def inverse_propensity(propensity: Tensor, low: float) -> Tensor:
    """``1 / clip(sg(propensity), low, 1)``: an IPW weight that passes no gradient."""
    return 1.0 / propensity.detach().clamp(min=low, max=1.0)


def funnel_labels(click: Tensor, conversion: Tensor) -> dict[str, Tensor]:
    """The funnel's label sets, all float 0/1 over the exposures ``[B]``.

    - ``ctcvr`` = o * r: clicked and converted;
    - ``factual_negative`` = o * (1 - r): clicked and not converted (the conversion is known);
    - ``ambiguous_negative`` = 1 - o: not clicked (whether it would convert is unknown).

    A conversion logged on an unclicked exposure is impossible; it counts as no conversion.
    """
    o, r = click, conversion * click
    return {"ctcvr": o * r, "factual_negative": o * (1.0 - r), "ambiguous_negative": 1.0 - o}
