"""MiNet: Mixed Interest Network for Cross-Domain Click-Through Rate Prediction.
Wentao Ouyang, Xiuwu Zhang, Lei Zhao, Jinmei Luo, Yu Zhang, Heng Zou, Zhaojie Liu, Yanlong Du.
CIKM 2020, arXiv:2008.02974 (official code: oywtece/minet, TensorFlow).

Three user interests feed the target-domain CTR tower:

- long-term cross-domain interest ``p_u``: the user's feature embeddings, shared by both
  domains [paper];
- short-term source interest ``a_s``: the recent positives of the source domain pooled by
  item-level attention against the target item ``q_t`` and the user, with a low-rank
  source->target transfer matrix ``M = H_a H_b`` (inner dimension 10) [paper][official code];
- short-term target interest ``a_t``: the recent positives of the target domain pooled the
  same way without transfer matrix [paper][official code].

Interest-level attention weighs each interest by ``v_x = exp(g_x^T ReLU(V_x [q_t, p_u, a_s,
a_t]) + b_x)``, unnormalised, with ``b_u`` initialised to 1 and ``b_s = b_t = 0``, hidden size 64
[official code]; the target tower is an MLP ``[256, 128]`` with ReLU on
``[q_t, v_u p_u, v_t a_t, v_s a_s]``; an auxiliary source tower ``[256, 128]`` scores source
rows from ``[q_s, p_u]``; ``L = L_t + gamma L_s`` with ``gamma = 1`` [paper][official code].
One embedding table (dimension 10) serves both domains [paper][official code].

Differences and reconstructions:

- padded history items are masked in the item-level softmax (the official code does not mask
  them); a row without history gets a zero interest vector;
- the item-level attention's hidden size is 64, the interest-level one's [reconstructed];
- the exponent of ``v_x`` is clamped at 15 so that an outlier cannot overflow [reconstructed];
- training: one stream of mixed batches (target and source rows in their natural proportion,
  about 1:2 on the MovieLens split, close to the code's 32 target + 64 source per step), each
  domain's BCE averaged over its own rows; the library's AdamW + row-wise Adagrad replace the
  code's Adagrad 0.02 [reconstructed];
- serving scores the target tower only; the source tower is training-only [reconstructed];
- each interest and each attention level can be switched off for the ablations: a dropped
  interest leaves the tower input (a dropped short-term interest also leaves the
  interest-attention input; ``p_u`` stays an input of both attention levels, as in the
  equations); without interest-level attention ``v_x = 1``; without item-level attention a
  history is mean-pooled.

Items (candidate and history) are the concatenated embeddings of ``item_fields`` (e.g. movie
id, first genre, year), the history features listing the same fields in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from torch import Tensor, nn

from recforge.data.batch import Batch
from recforge.data.schema import Kind, Schema
from recforge.errors import ModelConfigError
from recforge.models.base import SingleTaskConfig, SingleTaskModel, detached, register
from recforge.models.features import FeatureEmbedding
from recforge.nn.losses import per_domain_bce
from recforge.nn.mlp import MLP

_MAX_EXPONENT = 15.0


def masked_softmax(scores: Tensor, mask: Tensor) -> Tensor:
    """Softmax over the real items (``mask`` True) of each row; all-padding rows get zeros -> [B, L]."""
    weights = scores.masked_fill(~mask, torch.finfo(scores.dtype).min).softmax(-1)  # [B, L]
    return weights * mask


class ItemAttention(nn.Module):
    """Item-level attention of MiNet (eqs. for ``a_s`` and ``a_t``).

    ``score_i = h^T ReLU(W [r_i, q, p, (M r_i) * q])`` with ``M = H_a H_b`` when ``transfer_rank``
    is set (source histories, whose items live in another domain) and ``M = I`` otherwise
    (target histories); the weights are a softmax over the real items.
    """

    def __init__(self, item_dim: int, query_dim: int, user_dim: int, hidden: int, transfer_rank: int | None) -> None:
        super().__init__()
        if transfer_rank is None and item_dim != query_dim:
            raise ValueError("without a transfer matrix the history items and the query need the same width")
        self.transfer = (
            nn.Sequential(nn.Linear(item_dim, transfer_rank, bias=False), nn.Linear(transfer_rank, query_dim, bias=False))
            if transfer_rank
            else nn.Identity()
        )  # M = H_a H_b: [D_s] -> [D_t]
        self.score = nn.Sequential(
            nn.Linear(item_dim + 2 * query_dim + user_dim, hidden), nn.ReLU(), nn.Linear(hidden, 1)
        )  # h^T ReLU(W [.])

    def weights(self, items: Tensor, query: Tensor, user: Tensor, mask: Tensor) -> Tensor:
        """``items`` [B, L, D_r], ``query`` [B, D_q], ``user`` [B, D_u], ``mask`` [B, L] -> [B, L]."""
        q = query.unsqueeze(1).expand(-1, items.shape[1], -1)  # [B, L, D_q]
        p = user.unsqueeze(1).expand(-1, items.shape[1], -1)  # [B, L, D_u]
        x = torch.cat([items, q, p, self.transfer(items) * q], -1)  # [r_i, q, p, (M r_i) * q]: [B, L, .]
        return masked_softmax(self.score(x).squeeze(-1), mask)  # alpha = softmax_i(score_i): [B, L]

    def forward(self, items: Tensor, query: Tensor, user: Tensor, mask: Tensor) -> Tensor:
        alpha = self.weights(items, query, user, mask)  # [B, L]
        return (alpha.unsqueeze(-1) * items).sum(1)  # a = sum_i alpha_i r_i: [B, D_r]


def mean_pool(items: Tensor, mask: Tensor) -> Tensor:
    """Mean of the real items -> [B, D] (zeros for a row without any)."""
    m = mask.unsqueeze(-1).to(items.dtype)  # [B, L, 1]
    return (items * m).sum(1) / m.sum(1).clamp(min=1.0)


class InterestAttention(nn.Module):
    """Interest-level attention: ``v_x = exp(g_x^T ReLU(V_x c) + b_x)`` per interest ``x``."""

    def __init__(self, context_dim: int, num_interests: int, hidden: int, bias_init: list[float]) -> None:
        super().__init__()
        self.hidden = nn.ModuleList(nn.Linear(context_dim, hidden) for _ in range(num_interests))  # V_x
        self.out = nn.ModuleList(nn.Linear(hidden, 1, bias=False) for _ in range(num_interests))  # g_x
        self.bias = nn.Parameter(torch.tensor(bias_init, dtype=torch.float32))  # b_x: [X]

    def forward(self, context: Tensor) -> Tensor:
        """``context`` [B, C] -> interest weights [B, X]."""
        scores = torch.cat([g(torch.relu(v(context))) for v, g in zip(self.hidden, self.out)], -1)  # [B, X]
        return torch.exp((scores + self.bias).clamp(max=_MAX_EXPONENT))  # v_x


@dataclass
class MiNetConfig(SingleTaskConfig):
    embedding_dim: int = 10
    user_fields: list[str] = field(default_factory=lambda: ["user_id", "gender", "age", "occupation", "zip"])
    item_fields: list[str] = field(default_factory=lambda: ["item_id", "genre", "year"])
    target_history: list[str] = field(
        default_factory=lambda: ["hist_target_item_id", "hist_target_genre", "hist_target_year"]
    )
    source_history: list[str] = field(
        default_factory=lambda: ["hist_source_item_id", "hist_source_genre", "hist_source_year"]
    )
    target_domain: str = "target"
    source_domain: str = "source"
    attention_hidden: int = 64
    transfer_rank: int = 10
    tower_hidden: list[int] = field(default_factory=lambda: [256, 128])
    source_weight: float = 1.0  # gamma
    long_term: bool = True  # p_u
    short_term_source: bool = True  # a_s
    short_term_target: bool = True  # a_t
    item_attention: bool = True  # False: histories are mean-pooled
    interest_attention: bool = True  # False: v_x = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (self.long_term or self.short_term_source or self.short_term_target):
            raise ModelConfigError("long_term: at least one interest (long_term, short_term_source, short_term_target) must be on")


@register("minet")
class MiNet(SingleTaskModel):
    config_class = MiNetConfig
    paper = "Ouyang et al., MiNet: Mixed Interest Network for Cross-Domain Click-Through Rate Prediction, CIKM 2020, arXiv:2008.02974"
    results_page = "docs/results/minet_movielens1m.md"

    def __init__(self, schema: Schema, config: MiNetConfig, side: dict[str, Tensor] | None = None) -> None:
        super().__init__(schema, config, side)
        if schema.domain is None:
            raise ModelConfigError("model.name: minet needs data with a domain column; this schema has none")
        self.target_id = schema.domain_id(config.target_domain)
        self.source_id = schema.domain_id(config.source_domain)
        for key, histories in (("target_history", config.target_history), ("source_history", config.source_history)):
            for name in histories:
                if schema.feature(name).kind is not Kind.SEQUENCE:
                    raise ModelConfigError(f"model.params.{key}: minet reads sequence features, {name!r} is not one")
            vocabs = [schema.feature(n).vocab for n in histories]
            if vocabs != [schema.feature(n).vocab for n in config.item_fields]:
                raise ModelConfigError(f"model.params.{key}: {histories} must list the vocabularies of item_fields {config.item_fields}")
        self.interests = [
            name
            for name, on in (("long_term", config.long_term), ("source", config.short_term_source), ("target", config.short_term_target))
            if on
        ]
        d = config.embedding_dim
        self.user_index = [schema.categorical_index(n) for n in config.user_fields]
        self.item_index = [schema.categorical_index(n) for n in config.item_fields]
        user_dim, item_dim = d * len(config.user_fields), d * len(config.item_fields)
        self.embedding = FeatureEmbedding(schema, d)
        self.source_attention = ItemAttention(item_dim, item_dim, user_dim, config.attention_hidden, config.transfer_rank)
        self.target_attention = ItemAttention(item_dim, item_dim, user_dim, config.attention_hidden, None)
        widths = {"long_term": user_dim, "source": item_dim, "target": item_dim}
        if config.interest_attention:
            biases = {"long_term": 1.0, "source": 0.0, "target": 0.0}  # b_u = 1, b_s = b_t = 0
            context_dim = item_dim + user_dim + sum(widths[x] for x in ("source", "target") if x in self.interests)
            self.interest_attention = InterestAttention(
                context_dim, len(self.interests), config.attention_hidden, [biases[x] for x in self.interests]
            )
        self.target_tower = MLP(item_dim + sum(widths[x] for x in self.interests), config.tower_hidden, out_dim=1)
        self.source_tower = MLP(item_dim + user_dim, config.tower_hidden, out_dim=1)

    def _history(self, batch: Batch, names: list[str]) -> tuple[Tensor, Tensor]:
        items = torch.cat([self.embedding.sequence(batch, n) for n in names], -1)  # r_i: [B, L, D_r]
        return items, batch.sequences[names[0]] != 0  # mask: [B, L]

    def interests_of(self, batch: Batch) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """The target item ``q_t`` [B, D_t], the user ``p_u`` [B, D_u] and each interest [B, .]."""
        fields = self.embedding.fields(batch)  # [B, F, D]
        query = fields[:, self.item_index].flatten(1)  # q_t: [B, D_t]
        user = fields[:, self.user_index].flatten(1)  # p_u: [B, D_u]
        interests = {"long_term": user}
        for name, attention, histories in (
            ("source", self.source_attention, self.config.source_history),
            ("target", self.target_attention, self.config.target_history),
        ):
            if name in self.interests:
                items, mask = self._history(batch, histories)
                pooled = attention(items, query, user, mask) if self.config.item_attention else mean_pool(items, mask)
                interests[name] = pooled  # a_s, a_t: [B, D_r]
        return query, user, {x: interests[x] for x in self.interests}

    def target_logit(self, batch: Batch) -> Tensor:
        query, user, interests = self.interests_of(batch)
        parts = list(interests.values())
        if self.config.interest_attention:
            short_term = [interests[x] for x in ("source", "target") if x in interests]
            v = self.interest_attention(torch.cat([query, user, *short_term], -1))  # v_x: [B, X]
            parts = [v[:, i : i + 1] * part for i, part in enumerate(parts)]  # v_x * interest_x
        m_t = torch.cat([query, *parts], -1)  # [q_t, v_u p_u, v_s a_s, v_t a_t]: [B, .]
        return self.target_tower(m_t).squeeze(-1)  # [B]

    def source_logit(self, batch: Batch) -> Tensor:
        fields = self.embedding.fields(batch)  # [B, F, D]
        m_s = torch.cat([fields[:, self.item_index].flatten(1), fields[:, self.user_index].flatten(1)], -1)  # [q_s, p_u]
        return self.source_tower(m_s).squeeze(-1)  # [B]

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        """Each row's logit from its own domain's tower (source rows: the auxiliary tower)."""
        is_target = batch.domain == self.target_id  # [B]
        logit = batch.numeric.new_zeros(len(batch))  # [B]
        target_rows = is_target.nonzero().squeeze(-1)
        source_rows = (~is_target).nonzero().squeeze(-1)
        if len(target_rows):
            logit = logit.index_put((target_rows,), self.target_logit(_rows(batch, target_rows)))
        if len(source_rows):
            logit = logit.index_put((source_rows,), self.source_logit(_rows(batch, source_rows)))
        return {self.predicted_label: logit}

    def loss(self, outputs: dict[str, Tensor], batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        weights = {self.target_id: 1.0, self.source_id: self.config.source_weight}  # L = L_t + gamma L_s
        label = self.predicted_label
        total, parts = per_domain_bce(outputs[label], batch.labels[label], batch.domain, weights)
        return total, detached({"target": parts[self.target_id], "source": parts[self.source_id]})


def _rows(batch: Batch, rows: Tensor) -> Batch:
    """The sub-batch of the given rows."""

    def pick(value):
        if isinstance(value, dict):
            return {k: v[rows] for k, v in value.items()}
        return None if value is None else value[rows]

    return Batch(**{f.name: pick(getattr(batch, f.name)) for f in fields(batch)})
