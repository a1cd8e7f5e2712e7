"""Logistic regression, the linear CTR baseline.

    p(y = 1 | x) = sigmoid(b + sum_i w_{field_i, id_i} + sum_s mean_{j in s} w_{s, j} + w_num . x_num)

What is chosen here (no paper to follow): one scalar weight per id, stored as a 1-wide
:class:`~recforge.nn.embedding.FeatureEmbedding` so the weights get sparse gradients like any
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
from recforge.models.base import Model, ModelConfig, register
from recforge.nn.embedding import FeatureEmbedding


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
class LRConfig(ModelConfig):
    label: str | None = None  # the label to predict; None = the schema's first label


@register("lr")
class LogisticRegression(Model):
    config_class = LRConfig

    def __init__(self, schema: Schema, config: LRConfig) -> None:
        super().__init__(schema, config)
        self.label = self.label_to_predict(config.label)
        self.linear = FirstOrder(schema)

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        return {self.label: self.linear(batch)}  # [B]
