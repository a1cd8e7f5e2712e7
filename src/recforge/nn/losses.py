"""Losses shared by several models."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def per_domain_bce(logit: Tensor, label: Tensor, domain: Tensor, weights: dict[int, float]) -> tuple[Tensor, dict[int, Tensor]]:
    """``sum_d w_d * mean_{rows of domain d} BCE(logit, label)`` over the domains of ``weights``.

    ``logit``, ``label``, ``domain``: [B]. A domain without rows in the batch adds 0. Returns the
    total and each domain's mean BCE (detached).
    """
    losses = F.binary_cross_entropy_with_logits(logit, label, reduction="none")  # [B]
    total = logit.new_zeros(())
    parts = {}
    for domain_id, weight in weights.items():
        rows = (domain == domain_id).to(losses.dtype)  # [B]
        mean = (losses * rows).sum() / rows.sum().clamp(min=1.0)
        total = total + weight * mean
        parts[domain_id] = mean.detach()
    return total, parts
