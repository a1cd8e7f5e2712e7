"""FREEDOM: A Tale of Two Graphs: Freezing and Denoising Graph Structures for Multimodal Recommendation.
Xin Zhou, Zhiqi Shen. ACM MM 2023, arXiv:2211.06924 (official code: MMRec's ``FREEDOM``, as
rerun in ``em3e2e-anonymous/em3``).

Follows the paper and its code:

- **frozen item-item graph**: from the item content vectors ``x_i``, each item's ``k = 10``
  nearest items by cosine similarity (the item itself included, as the code's top-k),
  normalised ``S = D^-1/2 A D^-1/2`` with ``D`` the row degrees (so ``S_ij = 1 / k``), built
  once from the training store and never updated;
- **denoised user-item graph**: LightGCN (:mod:`recforge.models.retrieval.lightgcn`, 2 layers,
  mean of layers) over a graph whose edges are sampled anew for each training step by
  degree-sensitive pruning: ``int(E (1 - p))`` edges (``p = edge_dropout = 0.8``) drawn without
  replacement with probability proportional to ``1 / sqrt(d_u d_i)`` (so edges between popular
  nodes are dropped more), then renormalised by the kept graph's degrees; evaluation uses
  the full graph;
- **item representation** ``h_i = e_i^{LightGCN} + (S^L E_item)_i``: the item ID embeddings
  propagated ``L = 1`` times over the frozen graph are added to the LightGCN item output; users
  are the LightGCN output; a pair is scored by their inner product;
- **loss** ``BPR(u, h_i, h_j) + lambda BPR(u, W x_i + b, W x_j + b)``: the second term ranks the
  linearly projected content vectors for the user (the code's ``reg_weight``), no L2 term
  (the code's weight decay is 0); embedding 64, Xavier initialisation.

Chosen here: ``lambda = 1e-4`` (the code's grid is {0, 1e-5, 1e-4, 1e-3}); the content vectors
stay frozen (the code fine-tunes a copy of them through the second term only); pruning is
redrawn every training step rather than every epoch (the trainer has no epoch hook; a step's
draw depends on the step's seed only, so a resumed run draws the same graphs); an item without
content (zero vector: padding, OOV, no text) has no kNN edges and is nobody's neighbour; the
kNN search runs in blocks of rows (no ``[V, V]`` matrix); negatives as in LightGCN.

Content vectors: ``store.vectors_by_vocab(content_feature)``, an embedding feature keyed by the
item feature (a sentence-encoder vector of the item's text, or a raw vector column).

Side data (:meth:`FREEDOM.side_data`): ``edges`` [2, E] (train user-item pairs), ``knn_index``
[2, E_knn] and ``knn_weight`` [E_knn] (the frozen graph ``S``), ``content`` [V, dim].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recforge.data.batch import Batch
from recforge.data.schema import Kind, Schema
from recforge.errors import ModelConfigError
from recforge.models.base import register
from recforge.models.retrieval.lightgcn import LightGCN, LightGCNConfig, bipartite_adjacency, bpr, symmetric_weights, train_edges

if TYPE_CHECKING:
    from recforge.data.store import Store

_KNN_BLOCK = 1 << 24  # similarities computed at once when building the kNN graph


def knn_graph(vectors: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Each row's ``k`` most cosine-similar rows (itself included) among the rows with a non-zero
    vector, as ``(index [2, E], weight [E])`` of ``S = D^-1/2 A D^-1/2`` (row degrees: ``1 / k``).

    ``vectors`` [V, d]; zero rows get no edge and are no row's neighbour; fewer than ``k``
    non-zero rows give every non-zero row all of them.
    """
    valid = vectors.norm(dim=1) > 0  # [V]
    rows = valid.nonzero().squeeze(1)  # [V']
    k = min(k, len(rows))
    unit = F.normalize(vectors[rows].float(), dim=1)  # [V', d]
    block = max(1, _KNN_BLOCK // max(1, len(rows)))
    neighbours = torch.cat([(chunk @ unit.T).topk(k, dim=1).indices for chunk in unit.split(block)]) if k else rows[:0, None]
    index = torch.stack([rows.repeat_interleave(k), rows[neighbours.flatten()]])  # (i, j): [2, V' k]
    degree = torch.bincount(index[0], minlength=len(vectors)).float()  # [V]
    weight = (degree[index[0]] * degree[index[1]]).rsqrt()  # D^-1/2 A D^-1/2
    return index, weight


def degree_sensitive_prune(edges: Tensor, weights: Tensor, dropout: float) -> Tensor:
    """``int(E (1 - dropout))`` of the edges [2, E], drawn without replacement with probability
    proportional to ``weights`` [E] (Gumbel top-k: the successive sampling ``torch.multinomial``
    does) -> [2, E_kept]."""
    keep = int(edges.shape[1] * (1.0 - dropout))
    gumbel = -torch.empty_like(weights).exponential_().log()  # G ~ Gumbel(0, 1): [E]
    return edges[:, (weights.log() + gumbel).topk(keep).indices]  # top-k of log w + G


@dataclass
class FREEDOMConfig(LightGCNConfig):
    embedding_dim: int = 64
    num_layers: int = 2  # user-item layers (the code's n_ui_layers)
    l2_weight: float = 0.0  # the code has none
    edge_dropout: float = 0.8  # p: share of the user-item edges pruned each training step
    knn_k: int = 10
    knn_layers: int = 1  # L: propagations over the frozen item-item graph (the code's n_mm_layers)
    content_feature: str = "item_text"  # embedding keyed by item_feature: builds S, feeds the content BPR
    content_bpr_weight: float = 1e-4  # lambda (the code's reg_weight)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.edge_dropout < 1:
            raise ModelConfigError(f"edge_dropout: must be in [0, 1), got {self.edge_dropout}")
        if self.knn_k < 1:
            raise ModelConfigError(f"knn_k: must be >= 1, got {self.knn_k}")
        if self.knn_layers < 0:
            raise ModelConfigError(f"knn_layers: must be >= 0, got {self.knn_layers}")
        if self.content_bpr_weight < 0:
            raise ModelConfigError(f"content_bpr_weight: must be >= 0, got {self.content_bpr_weight}")


def check_content_feature(schema: Schema, name: str, item: str, model: str) -> None:
    """``name`` is an embedding feature keyed by ``item``, or a ModelConfigError."""
    known = {f.name: f for f in schema.features}
    if name not in known or known[name].kind is not Kind.EMBEDDING or known[name].key != item:
        raise ModelConfigError(f"model.params.content_feature: {model} needs an embedding feature keyed by {item!r}, the data has no such {name!r}")


@register("freedom")
class FREEDOM(LightGCN):
    config_class = FREEDOMConfig
    paper = "Zhou and Shen, A Tale of Two Graphs: Freezing and Denoising Graph Structures for Multimodal Recommendation, ACM MM 2023, arXiv:2211.06924"
    results_page = "docs/results/em3.md"
    side_keys: ClassVar[tuple[str, ...]] = ("edges", "knn_index", "knn_weight", "content")

    @classmethod
    def side_data(cls, store: "Store", config: FREEDOMConfig) -> dict[str, Tensor]:
        check_content_feature(store.schema, config.content_feature, config.item_feature, cls.registry_name)
        content = torch.from_numpy(store.vectors_by_vocab(config.content_feature))  # x: [V, dim]
        index, weight = knn_graph(content, config.knn_k)
        return {"edges": train_edges(store, config.user_feature, config.item_feature),
                "knn_index": index, "knn_weight": weight, "content": content}  # fmt: skip

    def __init__(self, schema: Schema, config: FREEDOMConfig, side: dict[str, Tensor] | None = None) -> None:
        check_content_feature(schema, config.content_feature, config.item_feature, self.registry_name)
        super().__init__(schema, config, side)
        content = self.side["content"].float()
        if content.shape[0] != self.num_items:
            raise ValueError(f"{self.registry_name}: side content has {content.shape[0]} rows for {self.num_items} items")
        self.register_buffer("edge_weights", symmetric_weights(self.edges, self.num_users, self.num_items), persistent=False)  # [E]
        size = (self.num_items, self.num_items)
        item_graph = torch.sparse_coo_tensor(self.side["knn_index"].long(), self.side["knn_weight"].float(), size, check_invariants=False).coalesce()
        self.register_buffer("item_graph", item_graph, persistent=False)  # S: [I, I]
        self.register_buffer("content", content, persistent=False)  # x: [I, dim]
        if config.content_bpr_weight:
            self.content_projection = nn.Linear(content.shape[1], self.score_dim)  # W, b

    @property
    def score_dim(self) -> int:
        """Width of the user and item vectors that are scored."""
        return self.config.embedding_dim

    def graph(self) -> Tensor:
        """The pruned, renormalised user-item graph in training; the full graph otherwise."""
        if not self.training or not self.config.edge_dropout:
            return self.adjacency
        kept = degree_sensitive_prune(self.edges, self.edge_weights, self.config.edge_dropout)  # [2, E']
        return bipartite_adjacency(kept, self.num_users, self.num_items)

    def over_items(self, x: Tensor) -> Tensor:
        """``S^L x``: item rows [I, D] propagated over the frozen item-item graph."""
        for _ in range(self.config.knn_layers):
            x = torch.sparse.mm(self.item_graph, x)
        return x

    def propagated(self, adjacency: Tensor) -> tuple[Tensor, Tensor]:
        users, items = super().propagated(adjacency)  # LightGCN: [U, D], [I, D]
        return users, items + self.over_items(self.item_table.weight)  # h_i = e_i + (S^L E_item)_i

    def loss(self, outputs: dict[str, Tensor], batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        total, parts = super().loss(outputs, batch)
        if self.config.content_bpr_weight:
            user = outputs["user"]  # [B, D]
            positive = self.content_projection(self.content[batch.categorical[:, self.item_index]])  # W x_i + b: [B, D]
            negative = self.content_projection(self.content[outputs["negative"]])  # W x_j + b: [B, D]
            content = bpr((user * positive).sum(-1), (user * negative).sum(-1))
            parts["content_bpr"] = content.detach()
            total = total + self.config.content_bpr_weight * content
        return total, parts
