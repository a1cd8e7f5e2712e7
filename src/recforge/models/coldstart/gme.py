"""Graph Meta Embedding: initial ID embeddings for new items, from their attributes and a graph.

Learning Graph Meta Embeddings for Cold-Start Ads in Click-Through Rate Prediction.
Wentao Ouyang, Xiuwu Zhang, Shukui Ren, Li Li, Kun Zhang, Jinmei Luo, Zhaojie Liu, Yanlong Du.
SIGIR 2021, arXiv:2105.08909. Baseline: MetaEmb, Warm Up Cold-start Advertisements: Improving CTR
Predictions via Learning to Learn ID Embeddings. Feiyang Pan, Shuokai Li, Xiang Ao, Pingzhong
Tang, Qing He. SIGIR 2019, arXiv:1904.11547.

A generator maps an item to the embedding that its ID row in a frozen, pre-trained CTR model
should start from. It plugs into any ranking model through the model's ``embedding`` (the
:class:`~recforge.models.features.FeatureEmbedding` every ranker declares): the generated
vectors replace the item field's rows (``FeatureEmbedding.replaced``) while the generator
learns, and are written into the table for new items afterwards (:func:`write_generated`).
It is the registered model ``gme`` (``variant`` picks GME-P/G/A or MetaEmb), built from its
config and the item graph of ``GraphMetaEmbedding.side_data(store, config)``; it trains only
under the ``cold_start`` protocol.

Part by part:

- Item graph (:class:`ItemGraph`) [official code, get_ngb.py]: the neighbours of an item are the
  old items that share attribute values with it, scored +1 per shared value of every attribute
  field (same year, each shared title word, genre, director, actor), the item itself excluded;
  the top ``num_neighbours`` = 10 are kept (ties: the more frequent old item first)
  [reconstructed tie rule]. Items with fewer candidates get padding (id 0), which the attention
  masks [reconstructed: the official code does not mask it]. Built with one sparse product.
- Attribute vector u [official code]: the concatenation of the item's attribute-field
  embeddings from the frozen CTR model, list fields sum-pooled: ``u in R^{n_a k}``.
- Embedding generator EG(u) = gamma tanh(W_meta u), gamma = 1 [paper, eq. 2; MetaEmb].
- Attention [paper, eq. 4-6]: ``e_i = LeakyReLU(a^T [W x_0 || W x_i])`` over the item itself
  (i = 0) and its neighbours, ``alpha = softmax_i(e_i)`` with padding masked,
  ``out = ELU(sum_i alpha_i W x_i)``; LeakyReLU slope 0.2 (TensorFlow's default)
  [official code].
- GME-P: x_0 = EG(u_0), x_i = the neighbours' pre-trained ID embeddings (frozen); r_0 = out.
  GME-G: as GME-P with x_i = EG(u_i). GME-A: x_i = u_i, W maps n_a k -> att_dim = 10 n_a, and
  r_0 = gamma tanh(W_meta out) [paper, section 4; official code].
- MetaEmb (``variant="meta_emb"``): r_0 = EG(u_0) [MetaEmb paper].
- Meta-learning loss (:func:`meta_loss`) [paper, eq. 7-9; official code]: on two disjoint
  batches A, B of the same old items, ``l_a`` = BCE of A with r_0; one inner gradient step
  ``r_0' = r_0 - eta_cold dl_a/dr_0`` (second order, as the official graph); ``l_b`` = BCE of B
  with r_0'; loss = alpha l_a + (1 - alpha) l_b, alpha = 0.1, eta_cold = 1e-4. The inner
  gradient is taken per item (the gradient of the mean loss of each item's rows)
  [reconstructed]; ``inner_grad="per_row"`` reproduces the official code, where every row of A
  carries its own copy of r_0 and the row-aligned row of B uses that copy's update.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recforge.data.batch import Batch
from recforge.data.schema import Kind, Schema
from recforge.errors import ModelConfigError
from recforge.models.base import Model, ModelConfig, RankingModel, SingleTaskModel, detached, register
from recforge.models.capabilities import EmbeddingGenerator, NeedsProtocol
from recforge.models.features import FeatureEmbedding

if TYPE_CHECKING:
    from recforge.data.store import Store


@dataclass
class GMEConfig(ModelConfig):
    """The item graph, generator and meta-learning settings; defaults follow the official code.

    ``embedding_dim`` is the width of the backbone's embedding table the generator fills.
    """

    item_feature: str = "item_id"
    attributes: list[str] = field(default_factory=list)  # the item's attribute fields: u and the graph
    num_neighbours: int = 10
    variant: Literal["meta_emb", "gme_p", "gme_g", "gme_a"] = "gme_a"
    gamma: float = 1.0  # scale of EG's tanh output
    attention_dim: int | None = None  # GME-A's att_dim; None = 10 * number of attribute fields
    leaky_slope: float = 0.2
    cold_loss_weight: float = 0.1  # alpha of the meta loss
    inner_lr: float = 1e-4  # eta_cold of the inner step
    inner_grad: Literal["per_item", "per_row"] = "per_item"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.attributes:
            raise ModelConfigError("attributes: must name at least one item attribute field")
        if self.num_neighbours < 1:
            raise ModelConfigError(f"num_neighbours: must be >= 1, got {self.num_neighbours}")
        if not 0.0 <= self.cold_loss_weight <= 1.0:
            raise ModelConfigError(f"cold_loss_weight: must be in [0, 1], got {self.cold_loss_weight}")


def attribute_fields(schema: Schema, attributes: list[str]) -> tuple[list[str], list[str]]:
    """``attributes`` split into the categorical fields and the list (sequence) fields."""
    categorical = [a for a in attributes if schema.feature(a).kind is Kind.CATEGORICAL]
    lists = [a for a in attributes if schema.feature(a).kind is Kind.SEQUENCE]
    unsupported = set(attributes) - set(categorical) - set(lists)
    if unsupported:
        raise ModelConfigError(f"model.params.attributes: gme reads categorical or list features, not {sorted(unsupported)}")
    return categorical, lists


class ItemGraph(nn.Module):
    """Per-item attribute ids and old-item neighbours, indexed by the item vocabulary.

    - ``categorical[item]`` [V, Fc]: ids of the categorical attribute fields;
    - ``lists[name][item]`` [V, L]: ids of each list attribute field (0 = padding);
    - ``neighbours[item]`` [V, N]: old items sharing the most attribute values (0 = padding);
    - ``is_old[item]`` [V].
    Rows of items absent from the data are all padding.
    """

    def __init__(
        self, schema: Schema, attributes: list[str], categorical: Tensor, lists: dict[str, Tensor], is_old: Tensor, neighbours: Tensor
    ) -> None:
        super().__init__()
        self.schema = schema
        self.attributes = list(attributes)
        self.categorical_fields, self.list_fields = attribute_fields(schema, attributes)
        self.register_buffer("categorical", categorical, persistent=False)  # [V, Fc]
        for name in self.list_fields:
            self.register_buffer(f"list_{name}", lists[name], persistent=False)  # [V, L]
        self.register_buffer("is_old", is_old, persistent=False)  # [V]
        self.register_buffer("neighbours", neighbours, persistent=False)  # [V, N]

    @property
    def num_fields(self) -> int:
        return len(self.attributes)

    def attribute_vectors(self, items: Tensor, embedding: FeatureEmbedding) -> Tensor:
        """u: the attribute-field embeddings of ``items`` [...], concatenated -> [..., n_a k]."""
        parts = []
        for column, name in enumerate(self.categorical_fields):
            parts.append(embedding.lookup(self.categorical[items, column], self.schema.feature(name).vocab))  # [..., k]
        for name in self.list_fields:
            ids = self.get_buffer(f"list_{name}")[items]  # [..., L]
            vectors = embedding.lookup(ids, self.schema.feature(name).vocab) * (ids != 0).unsqueeze(-1)  # [..., L, k]
            parts.append(vectors.sum(-2))  # sum pooling, [..., k]
        return torch.cat(parts, -1)  # [..., n_a k]


def top_neighbours(
    categorical: Tensor, lists: list[Tensor], is_old: Tensor, old_popularity: Tensor, num_neighbours: int
) -> Tensor:
    """For every item, the ``num_neighbours`` old items sharing the most attribute values -> [V, N].

    Score of (i, j) = number of attribute values (field, id) both items hold; the item itself and
    old items sharing nothing are excluded; padding (0) fills the rest. Ties go to the more
    popular old item (``old_popularity`` [V]), then the smaller id.
    """
    num_items = categorical.shape[0]
    columns = [categorical[:, c : c + 1] for c in range(categorical.shape[1])] + list(lists)
    blocks, offset = [], 0
    for ids in columns:  # one incidence block per field: item x (field, value)
        ids = ids.cpu().numpy().astype(np.int64)
        rows = np.repeat(np.arange(num_items), ids.shape[1])
        values = ids.reshape(-1)
        keep = values >= 2  # padding (0) and out-of-vocabulary (1) values link nothing
        blocks.append((rows[keep], values[keep] + offset))
        offset += int(ids.max(initial=0)) + 1
    rows = np.concatenate([b[0] for b in blocks])
    cols = np.concatenate([b[1] for b in blocks])
    incidence = sp.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(num_items, offset))
    incidence.sum_duplicates()
    incidence.data[:] = 1.0  # a value listed twice in one field counts once
    old = np.flatnonzero(is_old.cpu().numpy())
    shared = torch.from_numpy((incidence @ incidence[old].T).toarray()).double()  # [V, n_old]
    shared[torch.from_numpy(old), torch.arange(len(old))] = 0.0  # not its own neighbour
    popularity = old_popularity.cpu().double()[torch.from_numpy(old)]  # [n_old]
    tie_rank = torch.empty(len(old), dtype=torch.float64)
    tie_rank[torch.from_numpy(np.lexsort((old, -popularity.numpy())))] = torch.arange(len(old), dtype=torch.float64)
    key = shared * (len(old) + 1) - tie_rank  # more shared values first, then the tie order
    k = min(num_neighbours, len(old))
    best = key.topk(k, dim=1).indices  # [V, k]
    chosen = torch.from_numpy(old)[best]  # [V, k]
    chosen[shared.gather(1, best) <= 0] = 0  # nothing shared: padding
    if k < num_neighbours:
        chosen = F.pad(chosen, (0, num_neighbours - k))
    return chosen


class NeighbourAttention(nn.Module):
    """GAT-style attention of an item (slot 0) over itself and its neighbours [paper, eq. 4-6].

    ``x`` [n, 1 + N, in_dim], ``mask`` [n, 1 + N] (True = real) -> ``ELU(sum_i alpha_i W x_i)``
    [n, out_dim] and ``alpha`` [n, 1 + N]; masked slots get exactly zero weight.
    """

    def __init__(self, in_dim: int, out_dim: int, leaky_slope: float = 0.2) -> None:
        super().__init__()
        self.project = nn.Linear(in_dim, out_dim, bias=False)  # W
        self.score = nn.Linear(2 * out_dim, 1, bias=False)  # a
        self.leaky_slope = leaky_slope
        nn.init.xavier_uniform_(self.project.weight)
        nn.init.xavier_uniform_(self.score.weight)

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        h = self.project(x)  # W x_i, [n, 1 + N, out]
        query = h[:, :1].expand_as(h)  # W x_0, [n, 1 + N, out]
        e = F.leaky_relu(self.score(torch.cat([query, h], -1)).squeeze(-1), self.leaky_slope)  # e_i, [n, 1 + N]
        alpha = e.masked_fill(~mask, float("-inf")).softmax(-1)  # alpha_i = softmax_i(e_i), [n, 1 + N]
        return F.elu((alpha.unsqueeze(-1) * h).sum(1)), alpha  # ELU(sum_i alpha_i W x_i), [n, out]


@register("gme")
class GraphMetaEmbedding(Model, EmbeddingGenerator, NeedsProtocol):
    """The generator of every variant: ``generate(items, embedding)`` -> r_0 [n, k].

    Side data (:meth:`side_data`): ``categorical`` [V, Fc], ``lists.<name>`` [V, L] per list
    attribute, ``is_old`` [V] and ``neighbours`` [V, N] of :class:`ItemGraph`.
    """

    config_class = GMEConfig
    required_protocol = "cold_start"
    paper = (
        "Ouyang et al., Learning Graph Meta Embeddings for Cold-Start Ads in Click-Through Rate Prediction, "
        "SIGIR 2021, arXiv:2105.08909"
    )
    results_page = "docs/results/gme_movielens1m.md"

    @classmethod
    def side_data(cls, store: "Store", config: GMEConfig) -> dict[str, Tensor]:
        """Attributes of every item (from its first train or valid row) and its old-item neighbours;
        old items are those with train rows (their train row count breaks neighbour ties)."""
        schema, item = store.schema, config.item_feature
        cat_fields, list_fields = attribute_fields(schema, config.attributes)
        size = schema.vocab_size(schema.feature(item).vocab)
        is_old = torch.zeros(size, dtype=torch.bool)
        popularity = torch.zeros(size, dtype=torch.float64)
        categorical = torch.zeros(size, len(cat_fields), dtype=torch.long)
        lists = {name: torch.zeros(size, schema.feature(name).max_len, dtype=torch.long) for name in list_fields}
        for split in ("train", "valid"):
            view = store.split(split)
            ids = view.column(item).astype(np.int64)
            unique, first, counts = np.unique(ids, return_index=True, return_counts=True)
            batch = view.take(np.sort(first))
            batch_items = batch.categorical[:, schema.categorical_index(item)]
            for column, name in enumerate(cat_fields):
                categorical[batch_items, column] = batch.categorical[:, schema.categorical_index(name)]
            for name in list_fields:
                lists[name][batch_items] = batch.sequences[name]
            if split == "train":
                is_old[torch.from_numpy(unique)] = True
                popularity[torch.from_numpy(unique)] = torch.from_numpy(counts.astype(np.float64))
        neighbours = top_neighbours(categorical, list(lists.values()), is_old, popularity, config.num_neighbours)
        return {
            "categorical": categorical, "is_old": is_old, "neighbours": neighbours,
            **{f"lists.{name}": ids for name, ids in lists.items()},
        }  # fmt: skip

    def __init__(self, schema: Schema, config: GMEConfig, side: dict[str, Tensor] | None = None) -> None:
        super().__init__(schema, config, side)
        side = self.side
        _, list_fields = attribute_fields(schema, config.attributes)
        needed = ["categorical", "is_old", "neighbours", *(f"lists.{name}" for name in list_fields)]
        missing = [key for key in needed if key not in side]
        if missing:
            raise ValueError(f"gme: side data lacks {missing} (GraphMetaEmbedding.side_data(store, config) gives them)")
        self.item_vocab = schema.feature(config.item_feature).vocab
        if len(side["neighbours"]) != schema.vocab_size(self.item_vocab):
            raise ValueError(f"gme: an item graph of {len(side['neighbours'])} items for a vocabulary of {schema.vocab_size(self.item_vocab)}")
        lists = {name: side[f"lists.{name}"] for name in list_fields}
        self.graph = ItemGraph(schema, config.attributes, side["categorical"], lists, side["is_old"], side["neighbours"])
        k, u_dim = config.embedding_dim, self.graph.num_fields * config.embedding_dim
        meta_in = u_dim
        if config.variant == "gme_a":
            att_dim = config.attention_dim or 10 * self.graph.num_fields
            self.attention = NeighbourAttention(u_dim, att_dim, config.leaky_slope)
            meta_in = att_dim
        elif config.variant in ("gme_p", "gme_g"):
            self.attention = NeighbourAttention(k, k, config.leaky_slope)
        self.meta = nn.Linear(meta_in, k, bias=False)  # W_meta
        nn.init.xavier_uniform_(self.meta.weight)

    @property
    def item_feature(self) -> str:
        return self.config.item_feature

    def eg(self, u: Tensor) -> Tensor:
        return self.config.gamma * torch.tanh(self.meta(u))  # EG(u) = gamma tanh(W_meta u), [..., k]

    def generate(self, items: Tensor, embedding: FeatureEmbedding) -> Tensor:
        """Initial ID embeddings of ``items`` [n] (item-vocabulary ids) from the attribute rows of
        ``embedding`` (a backbone's table, of width ``embedding_dim``) -> [n, k]."""
        if embedding.dim != self.config.embedding_dim:
            raise ValueError(f"gme: a generator of width {self.config.embedding_dim} for a table of width {embedding.dim}")
        u0 = self.graph.attribute_vectors(items, embedding)  # [n, n_a k]
        variant = self.config.variant
        if variant == "meta_emb":
            return self.eg(u0)
        neighbours = self.graph.neighbours[items]  # [n, N]
        mask = torch.cat([torch.ones_like(neighbours[:, :1], dtype=torch.bool), neighbours != 0], 1)  # [n, 1 + N]
        if variant == "gme_a":
            z = torch.cat([u0.unsqueeze(1), self.graph.attribute_vectors(neighbours, embedding)], 1)  # [n, 1 + N, n_a k]
            z_tilde, _ = self.attention(z, mask)  # [n, att_dim]
            return self.eg(z_tilde)  # r_0 = gamma tanh(W_meta z~_0)
        g0 = self.eg(u0)  # [n, k]
        if variant == "gme_p":
            p = embedding.lookup(neighbours, self.item_vocab).detach()  # pre-trained ID embeddings, [n, N, k]
        else:
            p = self.eg(self.graph.attribute_vectors(neighbours, embedding))  # EG(u_i), [n, N, k]
        r0, _ = self.attention(torch.cat([g0.unsqueeze(1), p], 1), mask)  # [n, k]
        return r0

    forward = generate


def row_losses(model: SingleTaskModel, batch: Batch) -> Tensor:
    """Per-row binary cross-entropy of the model's predicted label -> [B]."""
    label = model.predicted_label
    return F.binary_cross_entropy_with_logits(model(batch)[label], batch.labels[label], reduction="none")


def meta_loss(
    generator: GraphMetaEmbedding, model: SingleTaskModel, batch_a: Batch, batch_b: Batch
) -> tuple[Tensor, dict[str, Tensor]]:
    """alpha l_a + (1 - alpha) l_b for two batches of the same old items [paper, eq. 7-9]; parts
    ``cold`` (l_a) and ``warm`` (l_b)."""
    config, embedding = generator.config, model.embedding
    column = generator.schema.categorical_index(generator.item_feature)
    items_a, items_b = batch_a.categorical[:, column], batch_b.categorical[:, column]
    unique, index_a = torch.unique(items_a, return_inverse=True)  # [n], [B_a]
    r0 = generator.generate(unique, embedding)  # [n, k]
    if config.inner_grad == "per_row":
        if not torch.equal(items_a, items_b):
            raise ValueError("GME per-row inner step: batch B must list the items of batch A row by row")
        rows_a = r0[index_a]  # one copy of r_0 per row, [B_a, k]
        with embedding.replaced(generator.item_feature, rows_a):
            cold_rows = row_losses(model, batch_a)  # [B_a]
        cold = cold_rows.mean()  # l_a
        (grad,) = torch.autograd.grad(cold, rows_a, create_graph=True)
        rows_b = rows_a - config.inner_lr * grad  # r_0' per row
    else:
        position = torch.searchsorted(unique, items_b.contiguous())
        if (position >= len(unique)).any() or not torch.equal(unique[position.clamp(max=len(unique) - 1)], items_b):
            raise ValueError("GME inner step: batch B holds items that batch A lacks")
        with embedding.replaced(generator.item_feature, r0[index_a]):
            cold_rows = row_losses(model, batch_a)  # [B_a]
        cold = cold_rows.mean()  # l_a
        counts = torch.bincount(index_a, minlength=len(unique)).clamp(min=1)  # rows per item
        per_item = torch.zeros(len(unique), dtype=cold_rows.dtype).index_add(0, index_a, cold_rows) / counts  # [n]
        (grad,) = torch.autograd.grad(per_item.sum(), r0, create_graph=True)  # each item's mean-loss gradient
        rows_b = (r0 - config.inner_lr * grad)[position]  # r_0' = r_0 - eta dl_a/dr_0, [B_b, k]
    with embedding.replaced(generator.item_feature, rows_b):
        warm = row_losses(model, batch_b).mean()  # l_b
    alpha = config.cold_loss_weight
    return alpha * cold + (1 - alpha) * warm, detached({"cold": cold, "warm": warm})


def write_generated(model: RankingModel, generator: GraphMetaEmbedding, items: np.ndarray | Tensor) -> None:
    """Store the generated embeddings of ``items`` [n] in the model's item-ID rows."""
    embedding = model.embedding
    ids = torch.as_tensor(items, device=embedding.table.weight.device)
    with torch.no_grad():
        vectors = generator.generate(ids, embedding)
        embedding.table.weight[ids + embedding.vocab_offset[generator.item_vocab]] = vectors
