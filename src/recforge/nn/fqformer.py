"""The Fusion-Q-Former (FQ-Former) of EM3 (Deng et al., End-to-end training of Multimodal Model
and ranking Model, arXiv:2404.06078, sec. 3.1).

Learnable queries and an item's modality tokens attend JOINTLY: every layer is one BERT-style
self-attention block over ``Z = [queries ; tokens]``,

    Z <- LayerNorm(Z + Dropout(O · MHA(Q Z, K Z, V Z)))        (LayerNorm eps 1e-5)

with NO feed-forward sublayer and no cross-attention (unlike the BLIP-2 Q-Former) [official code].
The query rows of the last layer are the output: ``tokens [B, T, D], mask [B, T] -> [B, Q, D]``.

Masking [reconstructed]: the official code fuses two always-present tokens and masks nothing;
here padded tokens (``mask`` False) are removed from every attention's keys, so their values
change nothing, and an item with no tokens at all gives its queries' self-attention (finite).
Queries start Xavier-uniform [official code]. Positions carry no embedding (none in the code).
The last layer computes only the query rows (the token rows it would give are never read).

The four projections of layer ``i`` are ``layers.{i}.query/key/value/output``
(:attr:`FQFormer.attention_projections`): the targets of :class:`recforge.nn.lora.LoRA`, which
runs the same weights plus low-rank deltas on a second path (EM3's user content sequence).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PROJECTIONS = ("query", "key", "value", "output")


class FQFormerLayer(nn.Module):
    """``Z <- LN(Z + Dropout(O MHA(Z)))``: ``z [B, N, D]``, ``keep [B, 1, 1, N]`` bool -> ``[B, N, D]``,
    or with ``rows=R`` only the first R rows ``[B, R, D]`` (every row still serves as key and value)."""

    def __init__(self, dim: int, num_heads: int, attention_dropout: float, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.attention_dropout = attention_dropout
        self.query, self.key, self.value, self.output = (nn.Linear(dim, dim) for _ in PROJECTIONS)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim, eps=1e-5)

    def heads(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # [B, N, D] -> [B, H, N, D/H]

    def forward(self, z: Tensor, keep: Tensor, rows: int | None = None) -> Tensor:
        out = z if rows is None else z[:, :rows]  # the rows computed: [B, R, D]
        q, k, v = self.heads(self.query(out)), self.heads(self.key(z)), self.heads(self.value(z))  # [B, H, R | N, D/H]
        p = self.attention_dropout if self.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=p)  # softmax(q k^T / sqrt(D/H)) v
        a = a.transpose(1, 2).flatten(2)  # [B, R, D]
        return self.norm(out + self.dropout(self.output(a)))  # LN(Z + Dropout(O a))


class FQFormer(nn.Module):
    """``num_queries`` learnable queries fused with an item's tokens by ``num_layers`` joint
    self-attention layers of ``num_heads`` heads (no FFN): ``forward(tokens [B, T, D], mask [B, T]
    bool, True = real token) -> [B, num_queries, D]``.

    EM3's defaults: 4 queries, 2 layers, 8 heads, D = 64 for CTR [reconstructed]; 1-2 queries,
    1 layer, 4 heads for the public variant [official code].
    """

    def __init__(
        self,
        dim: int,
        num_queries: int = 4,
        num_layers: int = 2,
        num_heads: int = 8,
        attention_dropout: float = 0.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if min(dim, num_queries, num_layers, num_heads) < 1:
            raise ValueError(
                f"FQFormer needs dim, num_queries, num_layers, num_heads >= 1; got {dim}, {num_queries}, {num_layers}, {num_heads}"
            )
        if dim % num_heads:
            raise ValueError(f"FQFormer: num_heads={num_heads} must divide dim={dim}")
        self.dim, self.num_queries = dim, num_queries
        self.queries = nn.Parameter(nn.init.xavier_uniform_(torch.empty(1, num_queries, dim)))  # [1, Q, D]
        self.layers = nn.ModuleList(FQFormerLayer(dim, num_heads, attention_dropout, dropout) for _ in range(num_layers))

    @property
    def attention_projections(self) -> list[str]:
        """Names of every layer's Q/K/V/O ``nn.Linear`` (the LoRA targets)."""
        return [f"layers.{i}.{name}" for i in range(len(self.layers)) for name in PROJECTIONS]

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        b, q = tokens.shape[0], self.num_queries
        tokens = tokens.masked_fill(~mask.unsqueeze(-1), 0.0)  # padded values never reach a real row
        z = torch.cat([self.queries.expand(b, -1, -1).to(tokens.dtype), tokens], 1)  # Z = [queries ; X]: [B, Q + T, D]
        keep = torch.cat([mask.new_ones(b, q), mask], 1)[:, None, None, :]  # keys attended: [B, 1, 1, Q + T]
        for layer in self.layers[:-1]:
            z = layer(z, keep)  # [B, Q + T, D]
        return self.layers[-1](z, keep, rows=q)  # the last layer's token rows are never read: query outputs [B, Q, D]
