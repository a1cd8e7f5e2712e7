"""DeepFM: A Factorization-Machine based Neural Network for CTR Prediction.
Huifeng Guo, Ruiming Tang, Yunming Ye, Zhenguo Li, Xiuqiang He. IJCAI 2017, arXiv:1703.04247.

    y = sigmoid(y_FM + y_DNN)                                          (eq. 1)

Follows the paper: the FM component (global bias + first-order weights + second-order
interactions of the field embeddings) and the deep component (an MLP over the concatenated field
embeddings) share the same embeddings and are trained jointly; a numeric field's embedding is its
value times a learned vector. Chosen defaults (the paper tuned 400-400-400, dropout 0.5 on
Criteo): ``embedding_dim=16``, ``hidden=[256, 128]``, ReLU, ``dropout=0.1``, no batch-norm. A list
feature (genres, a history) is one field, the mean of its items' embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from recforge.data.batch import Batch
from recforge.data.schema import Schema
from recforge.models.base import SingleTaskModel, register
from recforge.models.features import FeatureEmbedding
from recforge.models.ranking.dnn import DNNConfig
from recforge.models.ranking.lr import FirstOrder
from recforge.nn.interaction import FMInteraction
from recforge.nn.mlp import MLP


@dataclass
class DeepFMConfig(DNNConfig):
    """DeepFM has the DNN's settings (embedding size, MLP, label)."""


@register("deepfm")
class DeepFM(SingleTaskModel):
    config_class = DeepFMConfig
    paper = "Guo et al., DeepFM: A Factorization-Machine based Neural Network for CTR Prediction, IJCAI 2017, arXiv:1703.04247"
    results_page = "docs/results/baselines.md"

    def __init__(self, schema: Schema, config: DeepFMConfig, side: dict[str, Tensor] | None = None) -> None:
        super().__init__(schema, config, side)
        d = config.embedding_dim
        self.linear = FirstOrder(schema)
        self.embedding = FeatureEmbedding(schema, d)
        self.numeric_vectors = nn.Parameter(torch.randn(len(schema.numeric), d) * 1e-2)
        self.interaction = FMInteraction()
        num_fields = self.embedding.num_field_vectors
        self.deep = MLP(num_fields * d, config.hidden, config.dropout, config.activation, config.batch_norm, out_dim=1)

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        e = self.embedding.field_vectors(batch, self.numeric_vectors)  # [B, F + S + Fn, D]
        y_fm = self.linear(batch) + self.interaction(e)  # [B]
        y_dnn = self.deep(e.flatten(1)).squeeze(-1)  # [B]
        return {self.predicted_label: y_fm + y_dnn}  # y = sigmoid(y_FM + y_DNN), as a logit
