"""The shared contract of the entire-space conversion models (ESMM, ESCM2, DCMT, ChorusCVR).

Each predicts a click label and a post-click conversion label: ``forward`` gives their logits
under the two label names, and ``predict`` gives pCTR, pCVR and ``ctcvr`` = pCTR * pCVR, the
entire-space factorisation of ESMM (Ma et al., "Entire Space Multi-Task Model", SIGIR 2018,
arXiv:1804.07931, eq. 1).
:class:`SharedBottomTowers` is the backbone of ESCM2, DCMT and ChorusCVR, so that their
comparison is about the losses only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from recforge.data.batch import Batch
from recforge.data.schema import Schema
from recforge.errors import ModelConfigError
from recforge.models.base import ModelConfig, RankingModel
from recforge.models.capabilities import Funnel
from recforge.models.features import FeatureEmbedding
from recforge.nn.mlp import MLP


@dataclass
class FunnelConfig(ModelConfig):
    click_label: str = "click"
    conversion_label: str = "conversion"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.click_label == self.conversion_label:
            raise ModelConfigError(f"conversion_label: must differ from click_label, both are {self.click_label!r}")


class FunnelModel(RankingModel, Funnel):
    """Base of the funnel models: checks both labels against the schema; pCTR, pCVR, pCTCVR."""

    def __init__(self, schema: Schema, config: FunnelConfig, side: dict[str, Tensor] | None = None) -> None:
        super().__init__(schema, config, side)
        for key, label in (("click_label", config.click_label), ("conversion_label", config.conversion_label)):
            if label not in schema.labels:
                raise ModelConfigError(f"model.params.{key}: {self.registry_name} predicts {label!r}, not one of the data's labels {schema.labels}")

    def funnel_labels(self) -> tuple[str, str]:
        return self.config.click_label, self.config.conversion_label

    def predict(self, outputs: dict[str, Tensor]) -> dict[str, Tensor]:
        p_ctr = torch.sigmoid(outputs[self.config.click_label])  # [B]
        p_cvr = torch.sigmoid(outputs[self.config.conversion_label])  # [B]
        return {self.config.click_label: p_ctr, self.config.conversion_label: p_cvr, "ctcvr": p_ctr * p_cvr}


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
