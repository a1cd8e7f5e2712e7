"""Attention layers. ``TargetAttention`` is the local activation unit of DIN."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from recforge.nn.mlp import MLP


class TargetAttention(nn.Module):
    """DIN activation unit (Zhou et al., KDD 2018, eq. 3 and fig. 2).

    Each history item ``e_j`` gets the weight ``a(e_j, v_A) = MLP([e_j, v_A, e_j - v_A, e_j * v_A])``
    against the target ``v_A``; the user vector is ``sum_j a(e_j, v_A) e_j``. As in the paper the
    weights are NOT normalised by default (``softmax=False``), so the pooled vector keeps the
    intensity of the user's interest (the official code applies a masked softmax instead: set
    ``softmax=True``); padding items get weight 0 either way. The paper's figure shows the outer
    product of the two vectors; the official code feeds the difference, as here.
    """

    def __init__(
        self,
        dim: int,
        hidden: Sequence[int] = (80, 40),
        activation: str = "prelu",
        softmax: bool = False,
    ) -> None:
        super().__init__()
        self.mlp = MLP(4 * dim, hidden, activation=activation, out_dim=1)
        self.softmax = softmax

    def weights(self, history: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        """``history`` [B, L, D], ``target`` [B, D], ``mask`` [B, L] (True = real item) -> [B, L]."""
        t = target.unsqueeze(1).expand_as(history)  # [B, L, D]
        score = self.mlp(torch.cat([history, t, history - t, history * t], -1)).squeeze(-1)  # [B, L]
        if self.softmax:
            score = score.masked_fill(~mask, torch.finfo(score.dtype).min).softmax(-1)
        return score * mask  # rows without any item get all-zero weights

    def forward(self, history: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        w = self.weights(history, target, mask)  # [B, L]
        return (w.unsqueeze(-1) * history).sum(1)  # [B, D]
