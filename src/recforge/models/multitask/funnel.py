"""The shared contract of the entire-space conversion models (ESMM, ESCM2, DCMT, ChorusCVR).

Each predicts a click label and a post-click conversion label: ``forward`` gives their logits
under the two label names, and ``predict`` gives pCTR, pCVR and ``ctcvr`` = pCTR * pCVR.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from recforge.data.schema import Schema
from recforge.models.base import Model, ModelConfig


@dataclass
class FunnelConfig(ModelConfig):
    click_label: str = "click"
    conversion_label: str = "conversion"


class FunnelModel(Model):
    """Base of the funnel models: checks both labels against the schema; pCTR, pCVR, pCTCVR."""

    def __init__(self, schema: Schema, config: FunnelConfig) -> None:
        super().__init__(schema, config)
        for label in (config.click_label, config.conversion_label):
            if label not in schema.labels:
                raise ValueError(f"{self.registry_name}: label {label!r} is not one of the schema's labels {schema.labels}")

    def predict(self, outputs: dict[str, Tensor]) -> dict[str, Tensor]:
        p_ctr = torch.sigmoid(outputs[self.config.click_label])  # [B]
        p_cvr = torch.sigmoid(outputs[self.config.conversion_label])  # [B]
        return {self.config.click_label: p_ctr, self.config.conversion_label: p_cvr, "ctcvr": p_ctr * p_cvr}
