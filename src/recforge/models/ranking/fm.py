"""FM: Factorization Machines. Steffen Rendle, ICDM 2010.

    y(x) = w_0 + sum_i w_i x_i + sum_{i<j} <v_i, v_j> x_i x_j        (eq. 1)

Follows the paper: a global bias, a weight per id (and per numeric feature), and a
``embedding_dim``-wide factor per id whose pairwise inner products are computed in linear time
(lemma 3.1, :class:`~recforge.nn.interaction.FMInteraction`). A numeric feature is a real-valued
``x_i`` with its own factor ``v_i``, i.e. its field vector is ``x_i v_i``. Chosen here: a list
feature (genres, a history) is one field whose vector is the mean of its items' factors (the
paper's normalised multi-hot encoding of a set); ``embedding_dim=16``; no L2 regularisation
term (use the optimiser's weight decay).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from recforge.data.batch import Batch
from recforge.data.schema import Schema
from recforge.models.base import SingleTaskConfig, SingleTaskModel, register
from recforge.models.features import FeatureEmbedding
from recforge.models.ranking.lr import FirstOrder
from recforge.nn.interaction import FMInteraction


@dataclass
class FMConfig(SingleTaskConfig):
    embedding_dim: int = 16  # k, the factor width


@register("fm")
class FM(SingleTaskModel):
    config_class = FMConfig
    paper = "Rendle, Factorization Machines, ICDM 2010"
    results_page = "docs/results/baselines.md"

    def __init__(self, schema: Schema, config: FMConfig, side: dict[str, Tensor] | None = None) -> None:
        super().__init__(schema, config, side)
        self.linear = FirstOrder(schema)
        self.embedding = FeatureEmbedding(schema, config.embedding_dim)
        self.numeric_factors = nn.Parameter(torch.randn(len(schema.numeric), config.embedding_dim) * 1e-2)
        self.interaction = FMInteraction()

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        v = self.embedding.field_vectors(batch, self.numeric_factors)  # numeric rows x_i v_i: [B, F + S + Fn, D]
        return {self.predicted_label: self.linear(batch) + self.interaction(v)}  # [B]
