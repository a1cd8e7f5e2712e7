"""ChorusCVR: Chorus Supervision for Entire Space Post-Click Conversion Rate Modeling.
Wei Cheng, Yucheng Lu, Boyang Xia, Jiangxia Cao, Kuan Xu, Mingxing Wen, Wei Jiang, Jiaming Zhang,
Zhaojie Liu, Liyin Hong, Kun Gai, Guorui Zhou (Kuaishou). WSDM 2026, arXiv:2502.08277.
No official code; the losses follow two unofficial re-implementations.

What follows the paper:

- the three heads pCTR, pCVR = P(r = 1 | o = 1, x) and the unCVR head
  pUNCVR = P(r = 0 | o = 1, x) [paper];
- the Negative-sample Discrimination Module: the unCVR head is supervised so that factual
  negatives (clicked, not converted) are its positives while ambiguous negatives (not clicked)
  are not, which separates the two kinds of CVR negative [paper];
- the Soft Alignment Module: over the whole exposure space the CVR and unCVR heads supervise
  each other with soft labels, pCVR towards 1 - pUNCVR and pUNCVR towards 1 - pCVR [paper].

From the re-implementations [secondary] (equation numbers as they cite them), with
``w_c = 1 / clip(sg(pCTR), 0.01, 1)``:

- ``L_ctcvr = mean_D BCE(o r, pCTR pCVR)`` (Eq. 3);
- ``L_cvr = mean_D o w_c BCE(r, pCVR)`` (Eq. 4);
- ``L_ctuncvr = mean_D BCE(o (1 - r), pCTR pUNCVR)`` (Eq. 7);
- ``L_uncvr = mean_D o w_c BCE(1 - r, pUNCVR)`` (Eq. 9);
- ``L_align = mean_D w [BCE(1 - sg(pUNCVR), pCVR) + BCE(1 - sg(pCVR), pUNCVR)]`` (Eq. 10).

[reconstructed] here:

- ``L_ctr = mean_D BCE(o, pCTR)`` is kept (one re-implementation omits it);
- the total ``L = L_ctr + L_ctcvr + L_cvr + L_ctuncvr + L_uncvr + lambda_align L_align``, all
  weights 1;
- the SAM weight ``w``: ``sam_weight="ipw"`` (default) is ``1 / clip(sg(pCTR))`` on clicked and
  ``1 / clip(1 - sg(pCTR))`` on unclicked exposures, normalised to mean 1 in each batch;
  ``"propensity"`` is ``sg(pCTR)`` on clicked and ``1 - sg(pCTR)`` on unclicked ones (the two
  re-implementations disagree);
- the backbone: embedding 16 per field, shared bottom ``[256, 128]`` (ReLU, dropout 0.1),
  towers ``[64, 32]`` (:class:`~recforge.models.multitask.funnel.SharedBottomTowers`).

Serving: the unCVR head is training-only; ``predict`` gives pCTR, pCVR and pCTCVR = pCTR pCVR.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from recforge.data.batch import Batch
from recforge.data.schema import Schema
from recforge.models.base import detached, register
from recforge.models.features import FeatureEmbedding
from recforge.models.multitask.funnel import FunnelConfig, FunnelModel, SharedBottomTowers
from recforge.nn.funnel import funnel_labels, inverse_propensity

UNCVR = "uncvr"


@dataclass
class ChorusCVRConfig(FunnelConfig):
    embedding_dim: int = 16
    shared: list[int] = field(default_factory=lambda: [256, 128])
    tower: list[int] = field(default_factory=lambda: [64, 32])
    dropout: float = 0.1
    align_weight: float = 1.0  # lambda_align of the SAM loss
    sam_weight: Literal["ipw", "propensity"] = "ipw"
    propensity_clip: float = 0.01


@register("chorus_cvr")
class ChorusCVR(FunnelModel):
    config_class = ChorusCVRConfig
    paper = (
        "Cheng et al., ChorusCVR: Chorus Supervision for Entire Space Post-Click Conversion Rate Modeling, "
        "WSDM 2026, arXiv:2502.08277"
    )
    results_page = "docs/results/chorus_cvr.md"

    def __init__(self, schema: Schema, config: ChorusCVRConfig, side: dict[str, Tensor] | None = None) -> None:
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
            self.config.conversion_label: logits[:, 1],  # pCVR logit
            UNCVR: logits[:, 2],  # pUNCVR logit (NDM tower)
        }

    def sam_weights(self, click: Tensor, p_ctr: Tensor) -> Tensor:
        """The per-exposure weight of the alignment loss ``[B]`` (see the module docstring)."""
        cfg = self.config
        if cfg.sam_weight == "propensity":
            p = p_ctr.detach()
            return click * p + (1.0 - click) * (1.0 - p)
        w = click * inverse_propensity(p_ctr, cfg.propensity_clip)
        w = w + (1.0 - click) * inverse_propensity(1.0 - p_ctr, cfg.propensity_clip)
        return w / w.mean()  # mean 1 per batch

    def loss(self, outputs: dict[str, Tensor], batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        cfg = self.config
        click = batch.labels[cfg.click_label]  # o: [B]
        labels = funnel_labels(click, batch.labels[cfg.conversion_label])
        ctr_logit, cvr_logit, uncvr_logit = outputs[cfg.click_label], outputs[cfg.conversion_label], outputs[UNCVR]
        p_ctr, p_cvr, p_uncvr = torch.sigmoid(ctr_logit), torch.sigmoid(cvr_logit), torch.sigmoid(uncvr_logit)
        ipw = click * inverse_propensity(p_ctr, cfg.propensity_clip)  # o w_c: [B]
        converted = labels["ctcvr"]  # r on clicked, 0 elsewhere
        bce = F.binary_cross_entropy_with_logits
        align = bce(cvr_logit, 1.0 - p_uncvr.detach(), reduction="none") + bce(
            uncvr_logit, 1.0 - p_cvr.detach(), reduction="none"
        )  # BCE(1 - sg(pUNCVR), pCVR) + BCE(1 - sg(pCVR), pUNCVR): [B]
        parts = {
            cfg.click_label: bce(ctr_logit, click),  # L_ctr
            "ctcvr": F.binary_cross_entropy(p_ctr * p_cvr, labels["ctcvr"]),  # Eq. 3
            "cvr": (ipw * bce(cvr_logit, converted, reduction="none")).mean(),  # Eq. 4
            "ctuncvr": F.binary_cross_entropy(p_ctr * p_uncvr, labels["factual_negative"]),  # Eq. 7
            "uncvr": (ipw * bce(uncvr_logit, 1.0 - converted, reduction="none")).mean(),  # Eq. 9
            "align": (self.sam_weights(click, p_ctr) * align).mean(),  # Eq. 10
        }
        total = sum(v for k, v in parts.items() if k != "align") + cfg.align_weight * parts["align"]
        return total, detached(parts)
