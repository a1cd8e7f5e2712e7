"""Wide&Deep, PNN and AutoInt layers against hand computations (training is covered for every
registered ranking model in test_models.py)."""

from __future__ import annotations

import torch

from recforge.models.ranking.autoint import InteractingLayer
from recforge.models.ranking.pnn import InnerProducts


def test_inner_products_are_all_field_pairs():
    f = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]])  # [1, 3, 2]
    # pairs (0, 1), (0, 2), (1, 2): 1*3 + 2*4, 1*5 + 2*6, 3*5 + 4*6
    assert InnerProducts(3)(f).tolist() == [[11.0, 17.0, 39.0]]


def test_interacting_layer_matches_the_formula():
    torch.manual_seed(0)
    layer = InteractingLayer(in_dim=4, heads=2, head_dim=3)
    e = torch.randn(2, 5, 4)
    out = layer(e)
    assert out.shape == (2, 5, 6)
    expected = []
    for h in range(2):
        rows = slice(3 * h, 3 * h + 3)
        q = e @ layer.query.weight[rows].T  # [2, 5, 3]
        k = e @ layer.key.weight[rows].T
        v = e @ layer.value.weight[rows].T
        alpha = torch.softmax(q @ k.transpose(1, 2), -1)  # softmax_k <W_Q e_m, W_K e_k>
        expected.append(alpha @ v)
    manual = torch.relu(torch.cat(expected, -1) + e @ layer.residual.weight.T)
    torch.testing.assert_close(out, manual)
