"""Mixture-of-experts building blocks: experts, softmax gates, and the MMoE layer.

``Experts`` and ``Gate`` are separate so that PLE (shared + task-specific experts, one gate per
task over its own and the shared experts) is built from the same parts as MMoE.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from recforge.nn.mlp import MLP


class Experts(nn.Module):
    """``num_experts`` independent MLPs on the same input: ``[B, in] -> [B, E, H]``."""

    def __init__(
        self,
        in_dim: int,
        num_experts: int,
        hidden: Sequence[int],
        dropout: float = 0.0,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        self.experts = nn.ModuleList(MLP(in_dim, hidden, dropout, activation) for _ in range(num_experts))
        self.out_dim = self.experts[0].out_dim

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([expert(x) for expert in self.experts], 1)  # [B, E, H]


class Gate(nn.Module):
    """Softmax gate ``g(x) = softmax(W x)`` mixing experts: ``x`` [B, in], experts [B, E, H] -> [B, H]."""

    def __init__(self, in_dim: int, num_experts: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, num_experts)

    def forward(self, x: Tensor, experts: Tensor) -> Tensor:
        g = self.linear(x).softmax(-1)  # [B, E]
        return torch.einsum("be,beh->bh", g, experts)  # f^k(x) = sum_i g^k(x)_i f_i(x)


class MixtureOfExperts(nn.Module):
    """MMoE layer (Ma et al., KDD 2018, eq. 5-6): shared experts, one gate per task.

    ``[B, in] -> list of num_tasks tensors [B, H]``.
    """

    def __init__(
        self,
        in_dim: int,
        num_experts: int,
        num_tasks: int,
        hidden: Sequence[int],
        dropout: float = 0.0,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        self.experts = Experts(in_dim, num_experts, hidden, dropout, activation)
        self.gates = nn.ModuleList(Gate(in_dim, num_experts) for _ in range(num_tasks))
        self.out_dim = self.experts.out_dim

    def forward(self, x: Tensor) -> list[Tensor]:
        experts = self.experts(x)  # [B, E, H]
        return [gate(x, experts) for gate in self.gates]
