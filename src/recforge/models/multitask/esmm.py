"""ESMM: Entire Space Multi-Task Model: An Effective Approach for Estimating Post-Click Conversion Rate.
Xiao Ma, Liqin Zhao, Guan Huang, Zhi Wang, Zelin Hu, Xiaoqiang Zhu, Kun Gai. SIGIR 2018,
arXiv:1804.07931.

Follows the paper: a CTR tower and a CVR tower share one embedding; over the entire exposure
space ``pCTCVR = pCTR * pCVR`` and the loss is
``BCE(pCTR, click) + BCE(pCTCVR, click * conversion)`` over all exposures. The CVR tower is
never fit directly to the conversion label: it is supervised only through pCTCVR, which removes
the sample-selection bias of training on clicked rows.

Outputs: ``forward`` gives the CTR logit under the click label and the CVR logit under the
conversion label; ``predict`` gives ``{click: pCTR, conversion: pCVR, ctcvr: pCTR * pCVR}``; the
loss parts are named after the click label and ``ctcvr``. Chosen here: towers ``[360, 200, 80]`` ReLU (the
paper's MLP widths), ``embedding_dim=16`` (the paper: 18); list features are mean-pooled fields
(the paper sum-pools behaviour fields); numeric features are concatenated to the tower input;
the CTCVR term is a BCE on the product probability (``binary_cross_entropy`` clamps its logs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from recforge.data.batch import Batch
from recforge.data.schema import Schema
from recforge.models.base import detached, register
from recforge.models.features import FeatureEmbedding
from recforge.models.multitask.funnel import FunnelConfig, FunnelModel
from recforge.nn.mlp import MLP, Activation


@dataclass
class ESMMConfig(FunnelConfig):
    embedding_dim: int = 16
    hidden: list[int] = field(default_factory=lambda: [360, 200, 80])
    dropout: float = 0.0
    activation: Activation = "relu"


@register("esmm")
class ESMM(FunnelModel):
    config_class = ESMMConfig
    paper = (
        "Ma et al., Entire Space Multi-Task Model: An Effective Approach for Estimating Post-Click Conversion Rate, "
        "SIGIR 2018, arXiv:1804.07931"
    )
    results_page = "docs/results/baselines.md"

    def __init__(self, schema: Schema, config: ESMMConfig, side: dict[str, Tensor] | None = None) -> None:
        super().__init__(schema, config, side)
        self.embedding = FeatureEmbedding(schema, config.embedding_dim)
        in_dim = self.embedding.flat_dim
        self.ctr = MLP(in_dim, config.hidden, config.dropout, config.activation, out_dim=1)
        self.cvr = MLP(in_dim, config.hidden, config.dropout, config.activation, out_dim=1)

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        x = self.embedding.flat(batch)  # [B, in_dim]
        return {
            self.config.click_label: self.ctr(x).squeeze(-1),  # logit of pCTR: [B]
            self.config.conversion_label: self.cvr(x).squeeze(-1),  # logit of pCVR: [B]
        }

    def loss(self, outputs: dict[str, Tensor], batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        click = batch.labels[self.config.click_label]  # [B]
        ctcvr = click * batch.labels[self.config.conversion_label]  # y & z: [B]
        p_ctcvr = torch.sigmoid(outputs[self.config.click_label]) * torch.sigmoid(
            outputs[self.config.conversion_label]
        )  # pCTCVR = pCTR * pCVR: [B]
        parts = {
            self.config.click_label: F.binary_cross_entropy_with_logits(outputs[self.config.click_label], click),
            "ctcvr": F.binary_cross_entropy(p_ctcvr, ctcvr),
        }
        return sum(parts.values()), detached(parts)
