"""UniCDR and its UniCDR+ extensions: one model for cross-domain recommendation scenarios.

UniCDR: "Towards Universal Cross-Domain Recommendation". Jiangxia Cao, Shaoshuai Li, Bowen Yu,
Xiaobo Guo, Tingwen Liu, Bin Wang. WSDM 2023 (no arXiv id; official code ``cjx96/UniCDR``).
UniCDR+: "A Unified Framework for Cross-Domain Recommendation". Jiangxia Cao, Shen Wang, Gaode
Chen, Rui Huang, Shuang Yang, Zhaojie Liu, Guorui Zhou. arXiv 2409.04540 (2024; no code).

Part by part:

- [official code] Per domain d a user table U_d and an item table V_d (here one item table whose
  rows are domain-specific, item ids being qualified by their domain) and one shared user table
  U_s; ``embedding_dim`` 128.
- [official code] Aggregator ``agg(e, {v_j}) = lambda_a e + (1 - lambda_a) W_agg pool({v_j})``,
  lambda_a = 0.5, pool = masked mean or user attention ``softmax_j(tanh(W_att v_j)^T e)``.
  Differences: padding gets zero attention weight here (the official masked softmax gives padded
  slots weight exp(0) in the normaliser) and no dropout on the attention weights. The EASE
  ``item_similarity`` pool is not built: it needs the dense inverse of the item Gram matrix
  (30k-53k items per Amazon domain, 4-11 GB), beyond this project's machines.
- [official code] Domain-specific user ``u_d = Dropout(agg_d(U_d[u], items of u in d))``;
  domain-shared user ``u_s = Dropout(agg_s(U_s[u], items of u in the other domains))``
  (domain masking); at evaluation the shared aggregator sees every domain
  (``eval_shared_domains="all"``, the intra scenarios) or only the other ones (``"other"``, the
  cold-start scenario). Interaction masking: each training step samples
  ``min(max_context, floor((1 - mask_rate) n))`` of the user's n items per domain (0.1, 10);
  evaluation takes up to ``eval_max_context`` (50) of them.
- [official code] Infomax critic per domain, ``nn.Bilinear(d, d, 1)`` on (u_d, u_s): positive the
  same user's pair, negative u_d of another row of the same domain (a random in-batch roll);
  ``L_critic = BCE(D+, 1) + BCE(D-, 0)``. User ``u = u_d + u_s`` (Eq. 13); score ``<u, V[i]>``
  with dropout on the item vectors in training; ``L = lambda [BCE(s+, 1) + BCE(s-, 0)] +
  (1 - lambda) L_critic``, lambda = 0.4, 10 uniformly sampled negatives of the row's domain that
  the user has not interacted with.
- Target leak: the official code means to remove the training target from its own context
  but its ``list.remove`` never matches (context entries are [item, score] pairs), so the target
  stays. Here it is removed (``official_target_leak=False``); ``True`` reproduces the code in
  training. At evaluation the target never enters any context (train items only, and the
  target masked out explicitly).
- Ablations (``user_parts``): ``"specific"`` = target-only (u = u_d, no critic), ``"shared"`` =
  source-only (u = u_s built from the other domains only, also at evaluation; no critic).

UniCDR+ extensions, each behind its own switch; their forms are [reconstructed]:

1. ``side_features``: ``e = ID + sum_f E_f(x_f)`` for users and items. The side features are
   the store's named categorical columns plus derived log2 buckets of the user's train count per
   domain and of the item's train popularity.
2. ``item_graph``: item-item co-occurrence graph over every domain's train interactions, symmetric
   normalisation, ``e~ = mean_{k=0..2} A^k e`` (first hop cut to 10 neighbours, the result to 20
   entries per item, applied as a weighted bag of the item table).
3. ``aggregator="self_attention"``: one SASRec block (learned positions, causal mask, 1 head, FFN;
   :class:`~recforge.nn.sequence.SelfAttentionPool`) over the context, masked mean of its
   outputs as the pool. The target-attention aggregator is not built: its user vector depends
   on the candidate, which the dot-product retrieval head (kept for full-rank serving, as the
   spec says) cannot take.
4. ``soft_contrastive``: ``L_soft = -sum_i sum_j q_ij log softmax_j(<u_d^i, u_s^j> / tau)`` over the
   batch with L2-normalised vectors, ``q = (1 - eps) I + eps softmax_j(cos(h_i, h_j) / 0.1)``, h
   the user's multi-hot train history (all domains); tau = 0.2, eps = 0.1, weight 0.1.
5. ``multi_behaviour``: an MMoE head (4 experts) over ``[u; v; u * v]`` with one tower per label of
   the schema (behaviour), loss ``behaviour_weight * sum_b BCE_b`` on the positive and the sampled
   negatives; retrieval keeps the dot product.

The model needs the train interactions: ``UniCDR.side_data(store, config)`` gives them (a
:class:`~recforge.data.cross_domain.DomainInteractions` of the train split, with the side
features of ``user_side_columns`` / ``item_side_columns`` and, with ``item_graph``, the item
graph) as the named tensors the model is built from, so that it is rebuilt from its saved
weights and side data alone. It trains under the ``cross_domain`` protocol. Outputs of
``forward`` in training: ``pos`` [B], ``neg`` [B, N], and the critic, soft-contrastive and
behaviour logits when enabled; ``user_embedding(batch)`` / ``item_embeddings()`` serve
evaluation.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recforge.data.batch import Batch
from recforge.data.cross_domain import DomainInteractions
from recforge.data.schema import Schema
from recforge.errors import ModelConfigError
from recforge.models.base import Model, ModelConfig, detached, register
from recforge.models.capabilities import NeedsProtocol, Retriever
from recforge.nn.experts import MixtureOfExperts
from recforge.nn.sequence import SelfAttentionPool, segment_sample

if TYPE_CHECKING:
    from recforge.data.store import Store

Aggregator = Literal["mean", "user_attention", "self_attention"]


@dataclass
class UniCDRConfig(ModelConfig):
    embedding_dim: int = 128
    user_feature: str = "user_id"
    item_feature: str = "item_id"
    aggregator: Aggregator = "user_attention"
    lambda_a: float = 0.5  # weight of the ID embedding in the aggregator
    dropout: float = 0.3
    mask_rate: float = 0.1  # interaction masking
    max_context: int = 10  # items per domain in a training context
    eval_max_context: int = 50
    num_negatives: int = 10
    lambda_loss: float = 0.4  # weight of the recommendation loss against the critic's
    init_std: float = 0.1
    sparse_embeddings: bool = True  # row-wise sparse updates (the core optimiser's Adagrad rows); False: AdamW
    user_parts: Literal["both", "specific", "shared"] = "both"  # specific: target-only; shared: source-only
    eval_shared_domains: Literal["all", "other"] = "all"  # all: the intra scenarios; other: cold-start users
    official_target_leak: bool = False
    # UniCDR+ extensions
    side_features: bool = False
    user_side_columns: list[str] = field(default_factory=list)
    item_side_columns: list[str] = field(default_factory=list)
    item_graph: bool = False
    graph_hops: int = 2
    soft_contrastive: bool = False
    soft_weight: float = 0.1
    soft_tau: float = 0.2
    soft_eps: float = 0.1
    soft_history_tau: float = 0.1
    multi_behaviour: bool = False
    num_experts: int = 4
    expert_hidden: list[int] = field(default_factory=lambda: [64])
    behaviour_weight: float = 0.4


class BehaviourAggregator(nn.Module):
    """``agg(e, {v_j}) = lambda_a e + (1 - lambda_a) W_agg pool({v_j})``: [B, D], [B, L, D], [B, L] -> [B, D]."""

    def __init__(self, dim: int, kind: Aggregator, lambda_a: float, max_len: int, dropout: float) -> None:
        super().__init__()
        self.kind, self.lambda_a = kind, lambda_a
        self.w_agg = nn.Linear(dim, dim, bias=False)
        if kind == "user_attention":
            self.w_att = nn.Linear(dim, dim)
        if kind == "self_attention":
            self.block = SelfAttentionPool(dim, max_len, dropout)

    def pool(self, ids: Tensor, items: Tensor, mask: Tensor) -> Tensor:
        weight = mask.unsqueeze(-1).float()  # [B, L, 1]
        if self.kind == "mean":
            return (items * weight).sum(1) / weight.sum(1).clamp(min=1.0)
        if self.kind == "user_attention":
            key = torch.tanh(self.w_att(items))  # [B, L, D]
            logits = (key @ ids.unsqueeze(-1)).squeeze(-1)  # (tanh(W_att v_j))^T e: [B, L]
            att = logits.masked_fill(~mask, -math.inf).softmax(-1).nan_to_num(0.0)  # empty rows -> 0
            return (att.unsqueeze(-1) * items).sum(1)
        return self.block(items, mask)

    def forward(self, ids: Tensor, items: Tensor, mask: Tensor) -> Tensor:
        return self.lambda_a * ids + (1 - self.lambda_a) * self.w_agg(self.pool(ids, items, mask))


@register("unicdr")
class UniCDR(Model, Retriever, NeedsProtocol):
    config_class = UniCDRConfig
    required_protocol = "cross_domain"
    paper = "Cao et al., Towards Universal Cross-Domain Recommendation, WSDM 2023"
    results_page = "docs/results/unicdr_amazon.md"

    @classmethod
    def side_data(cls, store: "Store", config: UniCDRConfig) -> dict[str, Tensor]:
        """The train interactions of ``store`` (:meth:`DomainInteractions.to_tensors`)."""
        data = DomainInteractions.from_store(
            store, config.item_feature, tuple(config.user_side_columns), tuple(config.item_side_columns)
        )
        if config.item_graph:
            data.build_item_graph(hops=config.graph_hops)
        return data.to_tensors()

    def __init__(self, schema: Schema, config: UniCDRConfig, side: dict[str, Tensor] | None = None) -> None:
        super().__init__(schema, config, side)
        if schema.domain is None:
            raise ModelConfigError("model.name: unicdr needs data with a domain column; this schema has none")
        d = config.embedding_dim
        self.user_index = schema.categorical_index(config.user_feature)
        self.item_index = schema.categorical_index(config.item_feature)
        self.domain_index = schema.categorical_index(schema.domain)
        self.num_users = schema.vocab_size(schema.feature(config.user_feature).vocab)
        self.num_items = schema.vocab_size(schema.feature(config.item_feature).vocab)
        self.num_domains = schema.vocab_size(schema.feature(schema.domain).vocab) - 2  # without PAD and OOV
        self._register_interactions()
        n_dom = self.num_domains
        sparse = config.sparse_embeddings
        self.specific_users = nn.Embedding(self.num_users * n_dom, d, sparse=sparse)  # U_d[u] at row u * D + d
        self.shared_users = nn.Embedding(self.num_users, d, sparse=sparse)  # U_s
        self.items = nn.Embedding(self.num_items, d, sparse=sparse)  # V_d, rows of domain d's items
        for table in (self.specific_users, self.shared_users, self.items):
            nn.init.normal_(table.weight, std=config.init_std)
        width = n_dom * config.eval_max_context
        self.specific_aggregators = nn.ModuleList(
            BehaviourAggregator(d, config.aggregator, config.lambda_a, width, config.dropout) for _ in range(n_dom)
        )
        self.shared_aggregator = BehaviourAggregator(d, config.aggregator, config.lambda_a, width, config.dropout)
        self.critics = nn.ModuleList(nn.Bilinear(d, d, 1) for _ in range(n_dom))
        if config.multi_behaviour:
            self.behaviour_mixture = MixtureOfExperts(3 * d, config.num_experts, len(schema.labels), config.expert_hidden)
            self.behaviour_towers = nn.ModuleList(nn.Linear(self.behaviour_mixture.out_dim, 1) for _ in schema.labels)
        if config.side_features:  # E_f of every side feature, one table
            sizes = self.side["user_side_sizes"].tolist() + self.side["item_side_sizes"].tolist()
            self.side_table = nn.Embedding(sum(sizes), d, sparse=sparse)
            nn.init.normal_(self.side_table.weight, std=config.init_std)

    @property
    def item_feature(self) -> str:
        return self.config.item_feature

    def _register_interactions(self) -> None:
        """The train interactions of ``side`` as (non-persistent) buffers that follow the model's device."""
        side, config = self.side, self.config
        if not side:
            raise ValueError("unicdr: needs the train interactions as side data (UniCDR.side_data(store, config))")
        shape = (len(side["ptr"]) - 1, len(side["item_domain"]), len(side["domain_ptr"]) - 1)
        if shape != (self.num_users * self.num_domains, self.num_items, self.num_domains):
            raise ValueError(
                f"unicdr: interactions of {shape[0]} (user, domain) segments, {shape[1]} items, {shape[2]} domains do not "
                f"match the schema's {self.num_users} x {self.num_domains}, {self.num_items}, {self.num_domains}"
            )
        for name in ("ptr", "domain_of_code", "domain_ptr", "domain_items"):
            self.register_buffer(name, side[name], persistent=False)
        self.register_buffer("context_items", side["items"], persistent=False)
        segment_of_entry = torch.repeat_interleave(torch.arange(len(self.ptr) - 1), torch.diff(self.ptr))
        seen_keys = (segment_of_entry // self.num_domains) * self.num_items + self.context_items  # sorted
        self.register_buffer("seen_keys", seen_keys, persistent=False)
        if config.side_features:
            sizes = torch.cat([side["user_side_sizes"], side["item_side_sizes"]])
            offsets = torch.cumsum(sizes, 0) - sizes  # row of each feature's first value in the side table
            n_user = len(side["user_side_sizes"])
            self.register_buffer("user_side", side["user_side"] + offsets[:n_user], persistent=False)
            self.register_buffer("item_side", side["item_side"] + offsets[n_user:], persistent=False)
        if config.item_graph:
            if "item_neighbours" not in side:
                raise ValueError("unicdr: item_graph needs the item graph in the side data")
            self.register_buffer("item_neighbours", side["item_neighbours"], persistent=False)
            self.register_buffer("item_weights", side["item_weights"], persistent=False)

    # --- representations ----------------------------------------------------------------------
    def item_vectors(self, ids: Tensor) -> Tensor:
        """V[i] (+ side features, item-graph propagation when on) -> [..., D]."""
        if self.config.item_graph:
            flat = ids.reshape(-1)
            # e~_i = sum_k M_ik e_k, M = mean_{h=0..H} A^h (top entries): [N, D]; a dense gradient
            # (K rows per item make a sparse one costly to coalesce; untouched rows get zero steps)
            vectors = F.embedding_bag(
                self.item_neighbours[flat], self.items.weight, per_sample_weights=self.item_weights[flat], mode="sum",
            ).reshape(*ids.shape, -1)  # fmt: skip
        else:
            vectors = self.items(ids)
        if self.config.side_features:
            vectors = vectors + self.side_table(self.item_side[ids]).sum(-2)  # e = ID + sum_f E_f(x_f)
        return vectors * (ids != 0).unsqueeze(-1)

    def _user_side(self, users: Tensor) -> Tensor | float:
        return self.side_table(self.user_side[users]).sum(-2) if self.config.side_features else 0.0

    def _context(self, users: Tensor, domain: int, take_mask: Tensor, exclude: Tensor | None) -> Tensor:
        """Items of ``users`` in ``domain`` (rows where ``take_mask``), masked and sampled -> [B, W]."""
        config = self.config
        segment = users * self.num_domains + domain
        count = self.ptr[segment + 1] - self.ptr[segment]  # [B]
        if self.training:  # interaction masking: min(maxlen, floor((1 - rate) n)) items
            take = torch.minimum(torch.full_like(count, config.max_context), (count * (1 - config.mask_rate)).floor().long())
            width = config.max_context
        else:
            take, width = count.clamp(max=config.eval_max_context), config.eval_max_context
        items = segment_sample(self.ptr, self.context_items, segment, take * take_mask, width, self.training)
        if exclude is not None:
            items = items.masked_fill(items == exclude[:, None], 0)  # the target never describes itself
        return items  # [B, W]

    def user_parts(self, users: Tensor, domains: Tensor, targets: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """(u_d, u_s) of rows (user, domain position, target item) -> [B, D] each (None when unused)."""
        config = self.config
        keep_target = self.training and config.official_target_leak
        exclude = None if keep_target else targets
        specific = shared = None
        if config.user_parts in ("both", "specific"):
            ids = self.specific_users(users * self.num_domains + domains) + self._user_side(users)  # U_d[u]: [B, D]
            context = torch.stack([self._context(users, d, domains == d, exclude) for d in range(self.num_domains)]).sum(0)
            agg = torch.zeros_like(ids)
            for d, aggregator in enumerate(self.specific_aggregators):
                rows = domains == d
                if rows.any():
                    agg[rows] = aggregator(ids[rows], self.item_vectors(context[rows]), context[rows] != 0)
            specific = F.dropout(agg, config.dropout, self.training)  # u_d
        if config.user_parts in ("both", "shared"):
            ids = self.shared_users(users) + self._user_side(users)  # U_s[u]: [B, D]
            see_own = not self.training and config.user_parts == "both" and config.eval_shared_domains == "all"
            parts = [self._context(users, d, (domains != d) | see_own, exclude) for d in range(self.num_domains)]
            context = torch.cat(parts, 1)  # [B, D * W]
            shared = F.dropout(self.shared_aggregator(ids, self.item_vectors(context), context != 0), config.dropout, self.training)
        return specific, shared

    def _rows(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        users = batch.categorical[:, self.user_index]
        domains = self.domain_of_code[batch.categorical[:, self.domain_index]]
        if (domains < 0).any():
            raise ValueError("unicdr: rows with a domain unseen in training")
        return users, domains, batch.categorical[:, self.item_index]

    def user_embedding(self, batch: Batch) -> Tensor:
        """u = u_d + u_s (Eq. 13) of each row's user in the row's domain -> [B, D]."""
        specific, shared = self.user_parts(*self._rows(batch))
        return sum(part for part in (specific, shared) if part is not None)

    def item_embeddings(self) -> Tensor:
        """Every id of the item vocabulary -> [num_items, D] (padding row zero)."""
        ids = torch.arange(self.num_items, device=self.items.weight.device)
        return torch.cat([self.item_vectors(chunk) for chunk in ids.split(65536)])

    # --- training -----------------------------------------------------------------------------
    def sample_negatives(self, users: Tensor, domains: Tensor) -> Tensor:
        """``num_negatives`` items of each row's domain the user has no train interaction with -> [B, N]."""
        start, stop = self.domain_ptr[domains], self.domain_ptr[domains + 1]  # [B]
        shape = (len(users), self.config.num_negatives)

        def draw() -> Tensor:
            offset = (torch.rand(shape, device=users.device) * (stop - start)[:, None]).long()
            return self.domain_items[start[:, None] + offset]

        negatives = draw()
        for _ in range(3):  # resample the few that the user has seen
            keys = users[:, None] * self.num_items + negatives
            at = torch.searchsorted(self.seen_keys, keys).clamp(max=len(self.seen_keys) - 1)
            seen = self.seen_keys[at] == keys
            if not seen.any():
                break
            negatives = torch.where(seen, draw(), negatives)
        return negatives

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        users, domains, targets = self._rows(batch)
        specific, shared = self.user_parts(users, domains, targets)
        user = sum(part for part in (specific, shared) if part is not None)  # u = u_d + u_s: [B, D]
        out = {"user": user}
        if not self.training:
            return out
        negatives = self.sample_negatives(users, domains)  # [B, N]
        positive = F.dropout(self.item_vectors(targets), self.config.dropout, True)  # [B, D]
        negative = F.dropout(self.item_vectors(negatives), self.config.dropout, True)  # [B, N, D]
        out["pos"] = (user * positive).sum(-1)  # <u, V[i]>: [B]
        out["neg"] = (user.unsqueeze(1) * negative).sum(-1)  # [B, N]
        if specific is not None and shared is not None:
            out |= self._critic(specific, shared, domains)
            if self.config.soft_contrastive:
                out["soft_logits"] = F.normalize(specific, dim=-1) @ F.normalize(shared, dim=-1).T / self.config.soft_tau
                out["soft_targets"] = self._soft_targets(users)
        if self.config.multi_behaviour:
            out["behaviour_pos"] = self._behaviours(user, positive)  # [B, T]
            out["behaviour_neg"] = self._behaviours(user.unsqueeze(1).expand_as(negative), negative)  # [B, N, T]
        return out

    def _critic(self, specific: Tensor, shared: Tensor, domains: Tensor) -> dict[str, Tensor]:
        """Bilinear critic D_d(u_d, u_s): the row's own pair, and u_d of another row of its domain."""
        order = torch.argsort(domains, stable=True)
        sorted_domains = domains[order]
        counts = torch.bincount(sorted_domains, minlength=self.num_domains)
        starts = torch.cumsum(counts, 0) - counts
        size = counts[sorted_domains]  # [B] rows of the row's domain
        rank = torch.arange(len(order), device=domains.device) - starts[sorted_domains]
        shift = 1 + (torch.rand(self.num_domains, device=domains.device) * (counts - 1).clamp(min=0)).long()  # in [1, g - 1]
        partner = torch.empty_like(order)
        partner[order] = order[starts[sorted_domains] + (rank + shift[sorted_domains]) % size]  # same domain, another row
        rows = torch.arange(len(domains), device=domains.device)
        projected = torch.stack([shared @ c.weight[0].T for c in self.critics])[domains, rows]  # W_d u_s: [B, D]
        bias = torch.cat([c.bias for c in self.critics])[domains]  # [B]
        positive = (specific * projected).sum(-1) + bias  # u_d^T W_d u_s + b
        negative = (specific[partner] * projected).sum(-1) + bias
        return {"critic_pos": positive, "critic_neg": negative}

    def _soft_targets(self, users: Tensor) -> Tensor:
        """q = (1 - eps) I + eps softmax_j(cos(h_i, h_j) / tau_h), h the multi-hot train history -> [B, B]."""
        first, last = self.ptr[users * self.num_domains], self.ptr[(users + 1) * self.num_domains]  # [B]
        length = last - first
        rows = torch.repeat_interleave(torch.arange(len(users), device=users.device), length)
        entries = torch.repeat_interleave(first - torch.cumsum(length, 0) + length, length) + torch.arange(
            int(length.sum()), device=users.device
        )
        with warnings.catch_warnings():  # torch flags its sparse kernels as beta on every call
            warnings.filterwarnings("ignore", message="Sparse (invariant checks|CSR tensor support)")
            history = torch.sparse_coo_tensor(
                torch.stack([rows, self.context_items[entries]]), torch.ones(len(rows), device=users.device),
                (len(users), self.num_items),
            ).coalesce()  # fmt: skip
            overlap = torch.sparse.mm(history, history.t()).to_dense()  # |H_i & H_j|: [B, B]
        norm = length.float().clamp(min=1).sqrt()
        cosine = overlap / (norm[:, None] * norm[None, :])
        eps = self.config.soft_eps
        return (1 - eps) * torch.eye(len(users), device=users.device) + eps * (cosine / self.config.soft_history_tau).softmax(-1)

    def _behaviours(self, user: Tensor, item: Tensor) -> Tensor:
        """MMoE over [u; v; u * v], one tower per behaviour -> [..., T] logits."""
        x = torch.cat([user, item, user * item], -1)
        flat = x.reshape(-1, x.shape[-1])
        logits = [tower(mixed) for tower, mixed in zip(self.behaviour_towers, self.behaviour_mixture(flat))]
        return torch.cat(logits, -1).reshape(*x.shape[:-1], -1)

    def loss(self, outputs: dict[str, Tensor], batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        config = self.config
        pos, neg = outputs["pos"], outputs["neg"]
        rec = F.binary_cross_entropy_with_logits(pos, torch.ones_like(pos)) + F.binary_cross_entropy_with_logits(
            neg, torch.zeros_like(neg)
        )  # BCE(s+, 1) + BCE(s-, 0)
        parts = {"rec": rec}
        total = config.lambda_loss * rec
        if "critic_pos" in outputs:
            critic = F.binary_cross_entropy_with_logits(
                outputs["critic_pos"], torch.ones_like(outputs["critic_pos"])
            ) + F.binary_cross_entropy_with_logits(outputs["critic_neg"], torch.zeros_like(outputs["critic_neg"]))
            parts["critic"] = critic
            total = total + (1 - config.lambda_loss) * critic  # L = lambda L_rec + (1 - lambda) L_critic
        if "soft_logits" in outputs:
            soft = -(outputs["soft_targets"] * outputs["soft_logits"].log_softmax(-1)).sum(-1).mean()
            parts["soft"] = soft
            total = total + config.soft_weight * soft
        if "behaviour_pos" in outputs:
            labels = torch.stack([batch.labels[name] for name in self.schema.labels], -1)  # [B, T]
            behaviour = (
                F.binary_cross_entropy_with_logits(outputs["behaviour_pos"], labels, reduction="none").mean(0).sum()
                + F.binary_cross_entropy_with_logits(
                    outputs["behaviour_neg"], torch.zeros_like(outputs["behaviour_neg"]), reduction="none"
                ).mean((0, 1)).sum()
            )  # sum_b BCE_b
            parts["behaviour"] = behaviour
            total = total + config.behaviour_weight * behaviour
        return total, detached(parts)
