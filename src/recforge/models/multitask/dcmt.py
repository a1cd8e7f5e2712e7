"""DCMT: A Direct Entire-Space Causal Multi-Task Framework for Post-Click Conversion Estimation.
Feng Zhu et al. ICDE 2023 (the arXiv id could not be checked offline).

What follows the paper (from its abstract and the authors' published summary):

- a twin CVR tower: a factual head ``r_hat = P(r = 1 | o = 1, x)`` trained on clicked exposures
  and a counterfactual head ``r_hat*`` trained on unclicked ones, both over the same input, so
  that the CVR task is debiased directly over the entire exposure space [paper];
- the counterfactual prior ``r_hat + r_hat* ~ 1`` as a soft constraint [paper];
- total ``L = L_ctr + w_cvr * L_dcmt + w_ctcvr * L_ctcvr`` [paper].

[reconstructed] here (the method section could not be read):

- ``L_dcmt = mean_D [o * BCE(r, r_hat) / clip(sg(pCTR)) + (1 - o) * BCE(1 - r, r_hat*) /
  clip(1 - sg(pCTR))] + lambda_cf * mean_D |1 - (r_hat + r_hat*)|``: inverse-propensity
  weights in both spaces, the counterfactual label ``1 - r`` (every unclicked exposure is a
  counterfactual positive), propensities clipped to ``[0.05, 1]`` and taken through
  stop-gradient;
- ``w_cvr = w_ctcvr = 1``, ``lambda_cf = 0.1``;
- the backbone: shared bottom ``[256, 128]`` and towers ``[64, 32]`` of
  :class:`~recforge.models.multitask.funnel.SharedBottomTowers` (the paper has wide and deep parts), the same
  as ESCM2 and ChorusCVR here.

Outputs: ``forward`` gives the CTR logit (click label), the factual CVR logit (conversion label)
and ``counterfactual`` (logit of ``r_hat*``); ``predict`` serves ``r_hat`` as pCVR.
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
from recforge.models.multitask.funnel import FunnelConfig, FunnelModel, SharedBottomTowers
from recforge.nn.funnel import funnel_labels, inverse_propensity

COUNTERFACTUAL = "counterfactual"


@dataclass
class DCMTConfig(FunnelConfig):
    embedding_dim: int = 16
    shared: list[int] = field(default_factory=lambda: [256, 128])
    tower: list[int] = field(default_factory=lambda: [64, 32])
    dropout: float = 0.1
    cvr_weight: float = 1.0  # w_cvr
    ctcvr_weight: float = 1.0  # w_ctcvr
    counterfactual_weight: float = 0.1  # lambda_cf of |1 - (r_hat + r_hat*)|
    propensity_clip: float = 0.05


@register("dcmt")
class DCMT(FunnelModel):
    config_class = DCMTConfig
    paper = (
        "Zhu et al., DCMT: A Direct Entire-Space Causal Multi-Task Framework for Post-Click Conversion Estimation, "
        "ICDE 2023"
    )
    results_page = "docs/results/chorus_cvr.md"

    def __init__(self, schema: Schema, config: DCMTConfig, side: dict[str, Tensor] | None = None) -> None:
        super().__init__(schema, config, side)
        self.network = SharedBottomTowers(schema, 3, config.embedding_dim, config.shared, config.tower, config.dropout)

    @property
    def embedding(self) -> FeatureEmbedding:
        """The backbone's field embeddings."""
        return self.network.embedding

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        logits = self.network(batch)  # [B, 3]
        return {
            self.config.click_label: logits[:, 0],  # pCTR logit
            self.config.conversion_label: logits[:, 1],  # factual r_hat logit
            COUNTERFACTUAL: logits[:, 2],  # counterfactual r_hat* logit
        }

    def loss(self, outputs: dict[str, Tensor], batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        cfg = self.config
        click = batch.labels[cfg.click_label]  # o: [B]
        conversion = funnel_labels(click, batch.labels[cfg.conversion_label])["ctcvr"]  # r: [B]
        ctr_logit, factual, counterfactual = outputs[cfg.click_label], outputs[cfg.conversion_label], outputs[COUNTERFACTUAL]
        p_ctr = torch.sigmoid(ctr_logit)
        w_clicked = click * inverse_propensity(p_ctr, cfg.propensity_clip)  # o / clip(pCTR)
        w_unclicked = (1.0 - click) * inverse_propensity(1.0 - p_ctr, cfg.propensity_clip)  # (1 - o) / clip(1 - pCTR)
        factual_risk = w_clicked * F.binary_cross_entropy_with_logits(factual, conversion, reduction="none")
        counterfactual_risk = w_unclicked * F.binary_cross_entropy_with_logits(counterfactual, 1.0 - conversion, reduction="none")
        prior = (1.0 - torch.sigmoid(factual) - torch.sigmoid(counterfactual)).abs()  # |1 - (r_hat + r_hat*)|
        parts = {
            cfg.click_label: F.binary_cross_entropy_with_logits(ctr_logit, click),  # L_ctr
            "dcmt": (factual_risk + counterfactual_risk).mean() + cfg.counterfactual_weight * prior.mean(),
            "ctcvr": F.binary_cross_entropy(p_ctr * torch.sigmoid(factual), conversion),  # L_ctcvr
        }
        total = parts[cfg.click_label] + cfg.cvr_weight * parts["dcmt"] + cfg.ctcvr_weight * parts["ctcvr"]
        return total, detached(parts)
