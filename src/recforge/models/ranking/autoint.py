"""AutoInt: Automatic Feature Interaction Learning via Self-Attentive Neural Networks.
Weiping Song, Chence Shi, Zhiping Xiao, Zhijian Duan, Yewen Xu, Ming Zhang, Jian Tang. CIKM 2019,
arXiv:1810.11921.

    alpha^(h)_{m,k} = softmax_k(<W_Q^(h) e_m, W_K^(h) e_k>)                            (eq. 5-6)
    e~^(h)_m = sum_k alpha^(h)_{m,k} W_V^(h) e_k                                       (eq. 7)
    e^Res_m = ReLU([e~^(1)_m ; ... ; e~^(H)_m] + W_Res e_m)                            (eq. 8-9)
    y = sigmoid(w^T [e^Res_1 ; ... ; e^Res_M] + b)                                     (eq. 10)

Follows the paper (AutoInt, without the "+" DNN branch): every field (categorical, list,
numeric) is embedded, then ``num_layers`` interacting layers of multi-head self-attention with
a residual projection and ReLU; the output is a logistic layer over the concatenated field
representations. Paper defaults: 3 layers, 2 heads, attention size 32 per head. [reconstructed]
A list feature is one field, the mean of its items' embeddings (the paper averages multi-valued
fields too); a numeric field's embedding is its value times a learned vector; no scaling of the
attention logits (as in eq. 5). Chosen default: ``embedding_dim=16``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from recforge.data.batch import Batch
from recforge.data.schema import Schema
from recforge.models.base import SingleTaskConfig, SingleTaskModel, register
from recforge.models.features import FeatureEmbedding


class InteractingLayer(nn.Module):
    """One multi-head self-attention layer over fields with a residual projection: ``[B, M, d] -> [B, M, H d']``."""

    def __init__(self, in_dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.query = nn.Linear(in_dim, heads * head_dim, bias=False)  # W_Q^(h), all heads
        self.key = nn.Linear(in_dim, heads * head_dim, bias=False)  # W_K^(h)
        self.value = nn.Linear(in_dim, heads * head_dim, bias=False)  # W_V^(h)
        self.residual = nn.Linear(in_dim, heads * head_dim, bias=False)  # W_Res

    def forward(self, e: Tensor) -> Tensor:
        b, m, _ = e.shape

        def split(x: Tensor) -> Tensor:
            return x.view(b, m, self.heads, self.head_dim).transpose(1, 2)  # [B, H, M, d']

        q, k, v = split(self.query(e)), split(self.key(e)), split(self.value(e))
        alpha = (q @ k.transpose(-1, -2)).softmax(-1)  # eq. 5-6, [B, H, M, M]
        heads = (alpha @ v).transpose(1, 2).reshape(b, m, -1)  # eq. 7-8, [B, M, H d']
        return torch.relu(heads + self.residual(e))  # eq. 9


@dataclass
class AutoIntConfig(SingleTaskConfig):
    embedding_dim: int = 16
    num_layers: int = 3
    heads: int = 2
    head_dim: int = 32


@register("autoint")
class AutoInt(SingleTaskModel):
    config_class = AutoIntConfig
    paper = "Song et al., AutoInt: Automatic Feature Interaction Learning via Self-Attentive Neural Networks, CIKM 2019, arXiv:1810.11921"
    results_page = "docs/results/gme_movielens1m.md"

    def __init__(self, schema: Schema, config: AutoIntConfig, side: dict[str, Tensor] | None = None) -> None:
        super().__init__(schema, config, side)
        d = config.embedding_dim
        self.embedding = FeatureEmbedding(schema, d)
        self.numeric_vectors = nn.Parameter(torch.randn(len(schema.numeric), d) * 1e-2)
        width = config.heads * config.head_dim
        self.layers = nn.Sequential(
            *(InteractingLayer(d if i == 0 else width, config.heads, config.head_dim) for i in range(config.num_layers))
        )
        num_fields = self.embedding.num_field_vectors
        self.output = nn.Linear(num_fields * (width if config.num_layers else d), 1)  # w, b of eq. 10

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        e = self.embedding.field_vectors(batch, self.numeric_vectors)  # [B, M, D]
        return {self.predicted_label: self.output(self.layers(e).flatten(1)).squeeze(-1)}  # eq. 10, as a logit
