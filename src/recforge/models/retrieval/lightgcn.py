"""LightGCN: Simplifying and Powering Graph Convolution Network for Recommendation.
Xiangnan He, Kuan Deng, Xiang Wang, Yan Li, Yongdong Zhang, Meng Wang. SIGIR 2020, arXiv:2002.02126.

Follows the paper: the ID embeddings ``E^0`` of users and items are propagated over the
normalised user-item graph without weights or non-linearities,
``E^{k+1} = D^-1/2 A D^-1/2 E^k`` (eq. 3, matrix form eq. 9, ``A = [[0, R], [R^T, 0]]``), and
the final representation is the mean of the layers, ``E = sum_{k=0..K} E^k / (K + 1)`` (eq. 4,
``alpha_k = 1 / (K + 1)``); a pair is scored by ``y_ui = <e_u, e_i>`` (eq. 5) and trained by
BPR, ``-ln sigma(y_ui - y_uj)``, plus ``lambda ||E^0||^2`` over the ego embeddings of the
batch's users, positives and negatives (eq. 15); Xavier initialisation; ``embedding_dim = 64``,
``K = 3``, ``lambda = 1e-4``.

Chosen here:

- the graph is the distinct (user, item) pairs of the TRAIN split (``side_data``: ``edges``
  [2, E]); padding and OOV ids take no edge; the normalised adjacency is built from the edges
  when the model is built (a sparse COO buffer, not saved: the edges are);
- negatives: for every batch row, one item drawn uniformly from the real item ids in the
  model's forward, redrawn (up to ``negative_draws`` candidates, all drawn at once) where it is
  a train item of the row's user, as the LightGCN and MMRec samplers do (not in-batch);
- the L2 term is ``lambda / 2 * (|e_u^0|^2 + |e_i^0|^2 + |e_j^0|^2)`` summed over the batch and
  divided by its size, as the official code;
- the embedding tables take dense gradients (every row moves through the propagation), so the
  trainer's dense optimiser (AdamW, no weight decay by default) updates them;
- training propagates the whole graph once per step; ``user_embedding`` and ``item_embeddings``
  propagate it once per call (no cache to go stale).

Outputs: ``forward`` gives ``user`` [B, D], ``pos`` and ``neg`` [B, D] and the drawn ``negative``
ids [B]; ``user_embedding(batch)`` and ``item_embeddings()`` serve full-corpus ranking.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recforge.data.batch import Batch
from recforge.data.schema import N_RESERVED, Kind, Schema
from recforge.errors import ModelConfigError
from recforge.models.base import Model, ModelConfig, detached, register
from recforge.models.capabilities import Retriever

if TYPE_CHECKING:
    from recforge.data.store import Store


# --- graph helpers (shared by FREEDOM and EM3) -------------------------------------------------
def train_edges(store: "Store", user: str, item: str) -> Tensor:
    """Distinct (user, item) pairs of the train split, padding and OOV left out -> [2, E] int64,
    sorted by (user, item)."""
    train = store.split("train")
    users, items = train.column(user).astype(np.int64), train.column(item).astype(np.int64)
    keep = (users >= N_RESERVED) & (items >= N_RESERVED)
    num_items = store.schema.vocab_size(store.schema.feature(item).vocab)
    keys = np.unique(users[keep] * num_items + items[keep])
    return torch.from_numpy(np.stack([keys // num_items, keys % num_items]))


def symmetric_weights(edges: Tensor, num_users: int, num_items: int) -> Tensor:
    """``1 / sqrt(d_u d_i)`` of each edge of the bipartite graph ``edges`` [2, E] -> [E]."""
    users, items = edges
    d_user = torch.bincount(users, minlength=num_users).float()  # [U]
    d_item = torch.bincount(items, minlength=num_items).float()  # [I]
    return (d_user[users] * d_item[items]).rsqrt()


def bipartite_adjacency(edges: Tensor, num_users: int, num_items: int) -> Tensor:
    """``D^-1/2 A D^-1/2`` with ``A = [[0, R], [R^T, 0]]`` of the user-item edges [2, E] ->
    sparse COO [U + I, U + I]; users are nodes 0..U-1, items U..U+I-1."""
    users, items = edges
    weights = symmetric_weights(edges, num_users, num_items)  # [E]
    rows = torch.cat([users, items + num_users])  # R and R^T: [2E]
    cols = torch.cat([items + num_users, users])
    n = num_users + num_items
    return torch.sparse_coo_tensor(torch.stack([rows, cols]), torch.cat([weights, weights]), (n, n), check_invariants=False).coalesce()


def propagate(adjacency: Tensor, ego: Tensor, num_layers: int) -> Tensor:
    """Mean of ``E^0 .. E^K`` with ``E^{k+1} = adjacency @ E^k``: ``ego`` [N, D] -> [N, D]."""
    layers = [ego]
    for _ in range(num_layers):
        layers.append(torch.sparse.mm(adjacency, layers[-1]))  # E^{k+1} = A_hat E^k: [N, D]
    return torch.stack(layers).mean(0)  # sum_k E^k / (K + 1): [N, D]


def sample_negatives(users: Tensor, seen: Tensor, num_items: int, draws: int) -> Tensor:
    """One item per row, uniform over ids ``N_RESERVED .. num_items - 1``: the first of ``draws``
    candidates that is not a train item of the row's user (``seen``: sorted ``user * num_items +
    item`` keys), or the last candidate when all are -> [B]."""
    candidates = torch.randint(N_RESERVED, num_items, (len(users), draws), device=users.device)  # [B, R]
    keys = users[:, None] * num_items + candidates  # [B, R]
    at = torch.searchsorted(seen, keys).clamp(max=len(seen) - 1)
    fresh = seen[at] != keys  # [B, R]
    fresh[:, -1] = True
    first = fresh.int().argmax(1)  # first unseen candidate: [B]
    return candidates.gather(1, first[:, None]).squeeze(1)


def bpr(positive: Tensor, negative: Tensor) -> Tensor:
    """``mean(-ln sigma(y_ui - y_uj))`` of the scores [B]."""
    return -F.logsigmoid(positive - negative).mean()


def categorical_field(schema: Schema, key: str, name: str, model: str) -> int:
    """Batch column of categorical feature ``name`` (config field ``key``), or a ModelConfigError."""
    known = {f.name: f for f in schema.features}
    if name not in known or known[name].kind is not Kind.CATEGORICAL:
        raise ModelConfigError(f"model.params.{key}: {model} needs a categorical feature, the data has no categorical {name!r}")
    return schema.categorical_index(name)


# --- the model ---------------------------------------------------------------------------------
@dataclass
class LightGCNConfig(ModelConfig):
    embedding_dim: int = 64
    num_layers: int = 3  # K
    l2_weight: float = 1e-4  # lambda
    negative_draws: int = 8  # candidates per row to find a negative the user has not interacted with
    user_feature: str = "user_id"
    item_feature: str = "item_id"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_layers < 0:
            raise ModelConfigError(f"num_layers: must be >= 0, got {self.num_layers}")
        if self.l2_weight < 0:
            raise ModelConfigError(f"l2_weight: must be >= 0, got {self.l2_weight}")
        if self.negative_draws < 1:
            raise ModelConfigError(f"negative_draws: must be >= 1, got {self.negative_draws}")


@register("lightgcn")
class LightGCN(Model, Retriever):
    """Side data (:meth:`side_data`): ``edges`` [2, E], the train split's distinct (user, item) pairs."""

    config_class = LightGCNConfig
    paper = "He et al., LightGCN: Simplifying and Powering Graph Convolution Network for Recommendation, SIGIR 2020, arXiv:2002.02126"
    results_page = "docs/results/em3.md"
    side_keys: ClassVar[tuple[str, ...]] = ("edges",)

    @classmethod
    def side_data(cls, store: "Store", config: LightGCNConfig) -> dict[str, Tensor]:
        categorical_field(store.schema, "user_feature", config.user_feature, cls.registry_name)
        categorical_field(store.schema, "item_feature", config.item_feature, cls.registry_name)
        return {"edges": train_edges(store, config.user_feature, config.item_feature)}

    def __init__(self, schema: Schema, config: LightGCNConfig, side: dict[str, Tensor] | None = None) -> None:
        super().__init__(schema, config, side)
        name = self.registry_name
        self.user_index = categorical_field(schema, "user_feature", config.user_feature, name)
        self.item_index = categorical_field(schema, "item_feature", config.item_feature, name)
        missing = [key for key in self.side_keys if key not in self.side]
        if missing:
            raise ValueError(f"{name}: side data lacks {missing} ({type(self).__name__}.side_data(store, config) gives them)")
        self.num_users = schema.vocab_size(schema.feature(config.user_feature).vocab)
        self.num_items = schema.vocab_size(schema.feature(config.item_feature).vocab)
        edges = self.side["edges"].long()
        if edges.numel() == 0:
            raise ValueError(f"{name}: the train split holds no (user, item) interaction")
        self.register_buffer("edges", edges, persistent=False)  # [2, E]
        self.register_buffer("adjacency", bipartite_adjacency(edges, self.num_users, self.num_items), persistent=False)
        self.register_buffer("seen", edges[0] * self.num_items + edges[1], persistent=False)  # sorted keys: [E]
        self.user_table = nn.Embedding(self.num_users, config.embedding_dim)  # E^0 of users
        self.item_table = nn.Embedding(self.num_items, config.embedding_dim)  # E^0 of items
        nn.init.xavier_uniform_(self.user_table.weight)
        nn.init.xavier_uniform_(self.item_table.weight)

    @property
    def item_feature(self) -> str:
        return self.config.item_feature

    def graph(self) -> Tensor:
        """The user-item adjacency this forward propagates over."""
        return self.adjacency

    def propagated(self, adjacency: Tensor) -> tuple[Tensor, Tensor]:
        """Final user [U, D] and item [I, D] representations over ``adjacency``."""
        ego = torch.cat([self.user_table.weight, self.item_table.weight])  # E^0: [U + I, D]
        final = propagate(adjacency, ego, self.config.num_layers)  # E: [U + I, D]
        return final[: self.num_users], final[self.num_users :]

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        return self.outputs(batch, *self.propagated(self.graph()))

    def outputs(self, batch: Batch, user_all: Tensor, item_all: Tensor) -> dict[str, Tensor]:
        """The batch's rows of the final representations ``user_all`` [U, D], ``item_all`` [I, D],
        with a negative item drawn per row."""
        users = batch.categorical[:, self.user_index]  # [B]
        items = batch.categorical[:, self.item_index]  # [B]
        negative = sample_negatives(users, self.seen, self.num_items, self.config.negative_draws)  # [B]
        return {"user": user_all[users], "pos": item_all[items], "neg": item_all[negative], "negative": negative}

    def loss(self, outputs: dict[str, Tensor], batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        user = outputs["user"]
        ranking = bpr((user * outputs["pos"]).sum(-1), (user * outputs["neg"]).sum(-1))  # BPR over y_ui, y_uj
        parts = {"bpr": ranking}
        if self.config.l2_weight:
            users = batch.categorical[:, self.user_index]
            items = batch.categorical[:, self.item_index]
            ego = (self.user_table(users).square().sum() + self.item_table(items).square().sum()
                   + self.item_table(outputs["negative"]).square().sum())  # fmt: skip
            parts["l2"] = self.config.l2_weight * ego / (2 * len(users))  # lambda / 2 |E^0_batch|^2 / B
        total = torch.stack(list(parts.values())).sum()
        return total, detached(parts)

    def user_embedding(self, batch: Batch) -> Tensor:
        return self.propagated(self.graph())[0][batch.categorical[:, self.user_index]]  # e_u: [B, D]

    def item_embeddings(self) -> Tensor:
        """Every id of the item vocabulary (row i = id i) -> [I, D]."""
        return self.propagated(self.graph())[1]
