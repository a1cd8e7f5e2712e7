"""Multi-layer perceptron and the activations the baselines use (ReLU, PReLU, Dice, ...)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Dice(nn.Module):
    """Data-adaptive activation of DIN (Zhou et al., KDD 2018, section 5.2).

    ``f(s) = p(s) * s + (1 - p(s)) * alpha * s`` with ``p(s) = sigmoid((s - E[s]) / sqrt(Var[s] + eps))``;
    mean and variance are batch statistics in training and running averages in evaluation (and
    for a training batch of one row, which has no variance). Input ``[N, dim]``.
    """

    def __init__(self, dim: int, eps: float = 1e-8, momentum: float = 0.1) -> None:
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.alpha = nn.Parameter(torch.zeros(dim))
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        batch_stats = self.training and x.shape[0] > 1
        z = F.batch_norm(x, self.running_mean, self.running_var, None, None, batch_stats, self.momentum, self.eps)
        p = torch.sigmoid(z)  # [N, dim]
        return p * x + (1 - p) * self.alpha * x


#: the activation names a config may choose
Activation = Literal["relu", "gelu", "silu", "tanh", "sigmoid", "prelu", "dice"]

#: activation name -> constructor taking the layer width
ACTIVATIONS: dict[str, Callable[[int], nn.Module]] = {
    "relu": lambda dim: nn.ReLU(),
    "gelu": lambda dim: nn.GELU(),
    "silu": lambda dim: nn.SiLU(),
    "tanh": lambda dim: nn.Tanh(),
    "sigmoid": lambda dim: nn.Sigmoid(),
    "prelu": lambda dim: nn.PReLU(dim),
    "dice": Dice,
}


def make_activation(name: str, dim: int) -> nn.Module:
    """The activation called ``name`` for a layer of width ``dim``."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name](dim)


class MLP(nn.Module):
    """``[Linear -> (BatchNorm) -> activation -> (Dropout)] x len(hidden)``, then an optional
    output ``Linear(hidden[-1], out_dim)`` without activation.

    Accepts ``[..., in_dim]``: leading dimensions are flattened so that batch-norm and Dice
    see one row per vector (e.g. per history item), and restored on the way out.
    """

    def __init__(
        self,
        in_dim: int,
        hidden: Sequence[int],
        dropout: float = 0.0,
        activation: str = "relu",
        batch_norm: bool = False,
        out_dim: int | None = None,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_dim
        for h in hidden:
            layers.append(nn.Linear(width, h))
            if batch_norm:
                layers.append(nn.BatchNorm1d(h))
            layers.append(make_activation(activation, h))
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        if out_dim is not None:
            layers.append(nn.Linear(width, out_dim))
            width = out_dim
        self.layers = nn.Sequential(*layers)
        self.out_dim = width

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        y = self.layers(x.reshape(-1, x.shape[-1]))  # [N, out]
        return y.reshape(*lead, self.out_dim)
