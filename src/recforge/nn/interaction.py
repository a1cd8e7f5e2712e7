"""Explicit feature-interaction layers: FM second order and the DCN-V2 cross network."""

from __future__ import annotations

from torch import Tensor, nn


class FMInteraction(nn.Module):
    """Second-order term of a factorization machine (Rendle, ICDM 2010, eq. 1 rewritten as lemma 3.1).

    ``sum_{i<j} <v_i, v_j> = 1/2 * sum_d [(sum_i v_id)^2 - sum_i v_id^2]``, computed in O(F D).
    ``[B, F, D] -> [B]``.
    """

    def forward(self, x: Tensor) -> Tensor:
        square_of_sum = x.sum(1).pow(2)  # [B, D]
        sum_of_square = x.pow(2).sum(1)  # [B, D]
        return 0.5 * (square_of_sum - sum_of_square).sum(-1)  # [B]


class CrossNetV2(nn.Module):
    """Cross network of DCN-V2 (Wang et al., WWW 2021, eq. 1).

    ``x_{l+1} = x_0 * (W_l x_l + b_l) + x_l`` with a full-rank ``W_l`` [d, d], or with
    ``rank=r`` the paper's low-rank form ``W_l = U_l V_l^T`` (U, V: [d, r]; one expert, no mixture).
    ``[B, d] -> [B, d]``.
    """

    def __init__(self, dim: int, num_layers: int = 3, rank: int | None = None) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Linear(dim, dim)
            if rank is None
            else nn.Sequential(nn.Linear(dim, rank, bias=False), nn.Linear(rank, dim))  # U_l (V_l^T x) + b_l
            for _ in range(num_layers)
        )

    def forward(self, x0: Tensor) -> Tensor:
        x = x0  # [B, d]
        for layer in self.layers:
            x = x0 * layer(x) + x  # x_{l+1} = x_0 ⊙ (W_l x_l + b_l) + x_l
        return x
