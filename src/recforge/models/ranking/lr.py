"""Logistic regression, the linear CTR baseline (as in McMahan et al., "Ad Click Prediction: a View
from the Trenches", KDD 2013, trained here by the library's optimisers rather than FTRL-Proximal).

    p(y = 1 | x) = sigmoid(b + sum_i w_{field_i, id_i} + sum_s mean_{j in s} w_{s, j} + w_num . x_num)

Chosen here: one scalar weight per id, stored as a 1-wide
:class:`~recforge.models.features.FeatureEmbedding` so the weights get sparse gradients like any
embedding; a list feature (e.g. genres, a history) contributes the mean of its items' weights;
numeric features enter through a linear layer whose bias is the global bias. ``embedding_dim`` of
the config is unused (the weights are scalars).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from recforge.data.batch import Batch
from recforge.data.schema import Schema
from recforge.models.base import SingleTaskConfig, SingleTaskModel, register
from recforge.models.features import FeatureEmbedding


class FirstOrder(nn.Module):
    """The linear part ``b + sum of id weights + w_num . x_num`` -> [B]; reused by FM and DeepFM."""

    def __init__(self, schema: Schema) -> None:
        super().__init__()
        self.weights = FeatureEmbedding(schema, 1)
        self.numeric = nn.Parameter(torch.zeros(len(schema.numeric)))  # w_num
        self.bias = nn.Parameter(torch.zeros(()))  # b

    def forward(self, batch: Batch) -> Tensor:
        ids = self.weights.fields(batch).sum((1, 2))  # [B, F, 1] -> [B]
        lists = self.weights.pooled_sequences(batch).sum((1, 2))  # [B, S, 1] -> [B]
        return ids + lists + batch.numeric @ self.numeric + self.bias  # [B]


@dataclass
class LRConfig(SingleTaskConfig):
    """LR's only setting is the label it predicts."""


@register("lr")
class LogisticRegression(SingleTaskModel):
    config_class = LRConfig
    results_page = "docs/results/baselines.md"

    def __init__(self, schema: Schema, config: LRConfig, side: dict[str, Tensor] | None = None) -> None:
        super().__init__(schema, config, side)
        self.linear = FirstOrder(schema)

    @property
    def embedding(self) -> FeatureEmbedding:
        """The id weights: a 1-wide table."""
        return self.linear.weights

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        return {self.predicted_label: self.linear(batch)}  # [B]
