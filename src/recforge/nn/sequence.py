"""Layers over variable-length item sequences.

- :func:`segment_sample`: up to ``take[b]`` entries of one CSR segment per row, first or
  uniformly sampled without replacement, as a 0-padded ``[B, width]`` id matrix.
- :class:`SelfAttentionPool`: one SASRec block (Kang & McAuley, Self-Attentive Sequential
  Recommendation, ICDM 2018) over a padded sequence, mean-pooled over its real positions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recforge.nn.mlp import MLP


def segment_sample(ptr: Tensor, values: Tensor, segment: Tensor, take: Tensor, width: int, shuffle: bool) -> Tensor:
    """Up to ``take[b]`` entries of ``values[ptr[s]:ptr[s+1]]`` for ``s = segment[b]`` -> [B, width], 0-padded.

    ``ptr`` [S + 1] are CSR pointers into ``values`` [E]; ``segment``, ``take`` are [B]. Row b
    holds ``min(take[b], n_s, width)`` entries of its segment (``n_s = ptr[s+1] - ptr[s]``)
    followed by zeros. ``shuffle=False``: the segment's first entries, in order. ``shuffle=True``:
    a uniform sample without replacement (distinct positions of the segment), drawn from the
    global torch generator. Segments longer than ``4 * width`` draw ``3 * width`` positions with
    replacement and keep the first distinct ones, so that a long history costs no more than a
    short one; when fewer than ``take[b]`` of the draws are distinct (negligible probability
    for segments that long) the row holds only those.
    """
    start, stop = ptr[segment], ptr[segment + 1]  # [B]
    length = stop - start
    take = torch.minimum(take, length)
    short = max(4 * width, 1)
    span = min(max(int(length.max()) if len(length) else 0, 1), short if shuffle else width)
    position = torch.arange(span, device=ptr.device).expand(len(segment), span)  # [B, L]
    valid = position < length[:, None]
    if shuffle:
        keys = torch.rand(valid.shape, device=ptr.device).masked_fill(~valid, math.inf)
        position = keys.topk(min(width, span), dim=1, largest=False).indices  # [B, w] distinct positions
        long = length > short
        if long.any():
            draws = (torch.rand(int(long.sum()), 3 * width, device=ptr.device) * length[long, None]).long()  # [R, 3w]
            ordered, order = draws.sort(1)
            repeat = torch.zeros_like(ordered, dtype=torch.bool)
            repeat[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
            duplicate = torch.zeros_like(repeat).scatter(1, order, repeat)  # later copies, in draw order
            first = torch.argsort(duplicate.int(), dim=1, stable=True)[:, : position.shape[1]]
            position = position.clone()
            position[long] = draws.gather(1, first)
            distinct = torch.full_like(take, width)
            distinct[long] = (~duplicate).sum(1)
            take = torch.minimum(take, distinct)
    index = (start[:, None] + position).clamp(max=max(len(values) - 1, 0))
    picked = values[index] if len(values) else torch.zeros_like(index)  # [B, w]
    keep = torch.arange(picked.shape[1], device=ptr.device)[None, :] < take[:, None]
    picked = picked * keep
    return F.pad(picked, (0, width - picked.shape[1]))  # [B, width]


class SelfAttentionPool(nn.Module):
    """One SASRec block over ``items`` [B, L, D] with ``mask`` [B, L] (True = real) -> [B, D].

    ``x = items + P[:L]`` (learned positions, ``L <= max_len``); ``h = LN(x) + Attn(LN(x), x, x)``
    with one head, a causal mask (position t attends to positions <= t) and padded keys
    masked; ``y = h + FFN(LN(h))``; the output is the mean of ``y`` over the real positions
    (zero for a row without any). Position t's output depends on items 1..t only.
    """

    def __init__(self, dim: int, max_len: int, dropout: float) -> None:
        super().__init__()
        self.positions = nn.Embedding(max_len, dim)
        self.norm_in = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, 1, dropout=dropout, batch_first=True)
        self.norm_ffn = nn.LayerNorm(dim)
        self.ffn = MLP(dim, [dim], dropout, "relu", out_dim=dim)

    def encode(self, items: Tensor, mask: Tensor) -> Tensor:
        """The block's output at every position -> [B, L, D]."""
        length = items.shape[1]
        x = items + self.positions.weight[:length]  # [B, L, D]
        causal = torch.ones(length, length, dtype=torch.bool, device=items.device).triu(1)
        query = self.norm_in(x)
        attended, _ = self.attention(query, x, x, attn_mask=causal, key_padding_mask=~mask, need_weights=False)
        x = query + attended.nan_to_num(0.0)  # a query with no visible item attends to nothing
        return x + self.ffn(self.norm_ffn(x))  # [B, L, D]

    def forward(self, items: Tensor, mask: Tensor) -> Tensor:
        x = self.encode(items, mask)  # [B, L, D]
        weight = mask.unsqueeze(-1).float()
        return (x * weight).sum(1) / weight.sum(1).clamp(min=1.0)  # [B, D]
