"""DCN-V2: Improved Deep & Cross Network and Practical Lessons for Web-scale Learning to Rank Systems.
Ruoxi Wang, Rakesh Shivanna, Derek Z. Cheng, Sagar Jain, Dong Lin, Lichan Hong, Ed H. Chi.
WWW 2021, arXiv:2008.13535.

Follows the paper: ``x_0`` is the concatenation of the field embeddings and the (normalised)
numeric features; cross layers ``x_{l+1} = x_0 * (W_l x_l + b_l) + x_l`` (eq. 1, full-rank, or
low-rank ``W = U V^T`` with ``cross_rank``); combined with a deep network either *stacked*
(``x_0 -> cross -> deep``) or *parallel* (``[cross(x_0); deep(x_0)]``), then a linear logit.
Chosen defaults: stacked, 3 full-rank cross layers, ``embedding_dim=16``, deep ``[256, 128]``
ReLU, no dropout or batch-norm; the mixture of low-rank experts (DCN-Mix) is not built. A list
feature (genres, a history) is one field, the mean of its items' embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from recforge.data.batch import Batch
from recforge.data.schema import Schema
from recforge.models.base import SingleTaskConfig, SingleTaskModel, register
from recforge.models.features import FeatureEmbedding
from recforge.nn.interaction import CrossNetV2
from recforge.nn.mlp import MLP, Activation


@dataclass
class DCNV2Config(SingleTaskConfig):
    embedding_dim: int = 16
    structure: Literal["stacked", "parallel"] = "stacked"
    cross_layers: int = 3
    cross_rank: int | None = None  # None = full-rank W_l; r = low-rank U_l V_l^T
    hidden: list[int] = field(default_factory=lambda: [256, 128])
    dropout: float = 0.0
    activation: Activation = "relu"
    batch_norm: bool = False


@register("dcnv2")
class DCNV2(SingleTaskModel):
    config_class = DCNV2Config
    paper = (
        "Wang et al., DCN V2: Improved Deep & Cross Network and Practical Lessons for Web-scale Learning to Rank "
        "Systems, WWW 2021, arXiv:2008.13535"
    )
    results_page = "docs/results/baselines.md"

    def __init__(self, schema: Schema, config: DCNV2Config, side: dict[str, Tensor] | None = None) -> None:
        super().__init__(schema, config, side)
        self.embedding = FeatureEmbedding(schema, config.embedding_dim)
        d0 = self.embedding.flat_dim
        self.cross = CrossNetV2(d0, config.cross_layers, config.cross_rank)
        self.deep = MLP(d0, config.hidden, config.dropout, config.activation, config.batch_norm)
        head_in = self.deep.out_dim if config.structure == "stacked" else d0 + self.deep.out_dim
        self.head = nn.Linear(head_in, 1)

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        x0 = self.embedding.flat(batch)  # [B, d0]
        if self.config.structure == "stacked":
            h = self.deep(self.cross(x0))  # [B, H]
        else:
            h = torch.cat([self.cross(x0), self.deep(x0)], 1)  # [B, d0 + H]
        return {self.predicted_label: self.head(h).squeeze(-1)}  # [B]
