"""Product-based Neural Networks for User Response Prediction (IPNN).
Yanru Qu, Han Cai, Kan Ren, Weinan Zhang, Yong Yu, Ying Wen, Jun Wang. ICDM 2016, arXiv:1611.00144.

    l_1 = relu(l_z + l_p + b_1),  l_z = W_z ⊙ z,  l_p = W_p ⊙ p                          (eq. 3)
    z = (f_1, ..., f_N),  p = {p_ij = <f_i, f_j>}  (inner-product PNN, section 3.2)

Follows the paper's IPNN: the product layer holds the linear signals (the field embeddings) and
the pairwise inner products of all field embeddings; ``l_z + l_p + b_1`` is one linear layer
over ``[z, p]``, followed by the hidden layers and a sigmoid output. [reconstructed] The
products are computed exactly (all N(N-1)/2 pairs), not with the paper's rank-1 factorisation
of W_p; a list feature (genres, a history) is one field, the mean of its items' embeddings; a
numeric field's embedding is its value times a learned vector. Chosen defaults:
``embedding_dim=16``, ``hidden=[256, 128]``, ReLU, ``dropout=0.1``.
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
from recforge.nn.mlp import MLP


class InnerProducts(nn.Module):
    """``<f_i, f_j>`` for every field pair i < j: ``[B, N, D] -> [B, N(N-1)/2]``."""

    def __init__(self, num_fields: int) -> None:
        super().__init__()
        left, right = torch.triu_indices(num_fields, num_fields, offset=1)
        self.register_buffer("left", left, persistent=False)
        self.register_buffer("right", right, persistent=False)

    def forward(self, f: Tensor) -> Tensor:
        return (f[:, self.left] * f[:, self.right]).sum(-1)  # p_ij = <f_i, f_j>, [B, P]


@dataclass
class PNNConfig(DNNConfig):
    """PNN has the DNN's settings (embedding size, MLP, label)."""


@register("pnn")
class PNN(SingleTaskModel):
    config_class = PNNConfig
    paper = "Qu et al., Product-based Neural Networks for User Response Prediction, ICDM 2016, arXiv:1611.00144"
    results_page = "docs/results/gme_movielens1m.md"

    def __init__(self, schema: Schema, config: PNNConfig, side: dict[str, Tensor] | None = None) -> None:
        super().__init__(schema, config, side)
        d = config.embedding_dim
        self.embedding = FeatureEmbedding(schema, d)
        self.numeric_vectors = nn.Parameter(torch.randn(len(schema.numeric), d) * 1e-2)
        num_fields = self.embedding.num_field_vectors
        self.products = InnerProducts(num_fields)
        in_dim = num_fields * d + num_fields * (num_fields - 1) // 2
        self.deep = MLP(in_dim, config.hidden, config.dropout, config.activation, config.batch_norm, out_dim=1)

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        f = self.embedding.field_vectors(batch, self.numeric_vectors)  # [B, N, D]
        product_layer = torch.cat([f.flatten(1), self.products(f)], 1)  # [z, p], [B, N D + P]
        return {self.predicted_label: self.deep(product_layer).squeeze(-1)}  # l_1 = relu(W [z, p] + b_1), ...
