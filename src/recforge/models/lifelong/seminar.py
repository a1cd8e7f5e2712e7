"""SEMINAR: Search Enhanced Multi-modal Interest Network and Approximate Retrieval for Lifelong
Sequential Recommendation. Kaiming Shen, Xichen Ding, Zixiang Zheng, Yuqi Gong, Qianqian Li,
Zhongyi Liu, Guannan Zhang (Ant Group). arXiv:2407.10714, 2024.

Follows the paper:

- the lifelong history is a sequence of (query, item) pairs; a recommendation event has an empty
  query (``query_history``: a list timeline of query tokens, all 0 for such an event);
- an item is fused from its modalities (``e_id``, the projected frozen text vector ``e_txt``, the
  attribute channel ``e_attr``) and paired with its query: ``e_pair = α e_q + (1 - α) e_item``;
- the **Pretraining Search Unit** (``pretrain: true``) learns the tables with three losses:
  next (query, item) pair, multi-modal alignment, query-item relevance (:meth:`SEMINAR.loss`);
- fine-tuning (``pretrain: false``) restores the PSU tables (:meth:`SEMINAR.restore_pretrained`)
  and adds one projection ``G_m`` per modality; a TWIN-style multi-head GSU picks the top-K events
  per head, an exact ESU attends over them, and an MLP scores ``[u; e_t; fields]``;
- approximate retrieval (§3.5, ``gsu: pq``): each modality's keys quantised by its own k-means PQ
  codebooks, uint8 codes per item, the GSU scored from lookup tables (:meth:`SEMINAR.approximate_scores`),
  a short list re-ranked exactly.

Follows the official code: one global modality gate ``g = softmax(W_g w_c)`` (not per item);
the masked mean of the query tokens; α = 0.5; the targets' queries empty ("recommendation mode");
the logit MLP 128 -> 64 -> 1 (ReLU); the next-pair loss as BCE with one sampled negative; the
relevance loss's 5 negatives from other positions of the same sequence and τ = 0.05; the alignment
loss's soft targets from the two channels' own similarities.

Chosen here [reconstructed]:

- the relevance loss is the InfoNCE ``-log(e^{s+} / (e^{s+} + Σ e^{s-}))`` over events with a
  query only (the released code returns ``mean(pos / neg)``, whose minimum pushes positives
  apart, and scores empty queries);
- the alignment loss's soft targets are ``softmax((A Aᵀ + B Bᵀ) / (2τ))``, divided by τ as its
  logits are (the code multiplies by τ, which makes the targets nearly uniform and teaches no
  alignment); it runs over the batch's distinct history items in chunks of ``align_chunk`` (the
  code: B·L positions in 1,000 chunks, duplicates included);
- ``G_m`` are full D x D, trainable, identity-initialised (the code's Amazon run freezes them at a
  random init); the query has its own ``G_q``;
- the next-pair task scores the row's own target (its label) plus, for each positive row, one item
  drawn uniformly from the vocabulary as a negative (the code draws an item the user never
  touched; a uniform item of a 3.7k-item vocabulary rarely is one);
- the MLP also reads every other field embedding (user, context, the target's list fields), as
  the other rankers of the library do, so that the comparison with DIN is about the history;
- the attribute channel is the mean of the item's attribute embeddings (genres, year, director:
  categorical or list item fields);
- §3.5 quantises both the probe and the keys (the pair tables of
  :class:`~recforge.nn.longseq.MultiModalProductQuantizedKeys`); here the probe stays exact (ADC), more
  accurate at the same 4-bit codes. The query channel is coded per token (the mean over an event's
  tokens is exact in the table scores). Training always searches exactly; the codes are rebuilt from
  the weights at the first evaluation after they change. In the model the history's exact pair
  vectors are still computed (the ESU and the re-rank read them), so ``gsu: pq`` here measures the
  approximate search's quality; its speed is ``benchmarks/pq_attention.py``'s.

Side data (:meth:`SEMINAR.side_data`), rows indexed by the target's vocabulary (V items):
``text`` [V, 384] (the frozen sentence-encoder vector of each item) and ``attributes.<name>``
[V] or [V, max_len] ids.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recforge.data.batch import Batch
from recforge.data.schema import Kind, Schema
from recforge.errors import ModelConfigError
from recforge.models.base import SingleTaskConfig, SingleTaskModel, detached, register
from recforge.models.capabilities import Pretrainable, Searcher
from recforge.models.features import FeatureEmbedding
from recforge.nn.longseq import MultiHeadSearch, ProductQuantizedKeys, adc_scores, gather_events, top_k
from recforge.nn.mlp import MLP

if TYPE_CHECKING:
    from recforge.data.store import Store

MODALITIES = ("id", "text", "attributes")


@dataclass
class SEMINARConfig(SingleTaskConfig):
    embedding_dim: int = 64  # D
    history: str = "hist_item_id"  # the items of the lifelong sequence
    query_history: str | None = "hist_query"  # its queries (a list timeline); None = no query channel
    target: str = "item_id"
    text: str | None = "item_text"  # an embedding keyed by target (the frozen text vector); None = no text
    attributes: list[str] = field(default_factory=list)  # categorical or list item fields
    alpha: float = 0.5  # e_pair = α e_q + (1 - α) e_item
    heads: int = 4  # H
    top_k: int = 50  # K events per head
    pretrain: bool = False  # True: the PSU and its losses; False: fine-tuning (BCE)
    next_weight: float = 1.0  # w_1
    align_weight: float = 1.0  # w_2 (the code: 0.1 on Amazon)
    relevance_weight: float = 1.0  # w_3
    align_temperature: float = 0.05
    align_chunk: int = 256  # distinct items per alignment chunk
    relevance_temperature: float = 0.05
    relevance_negatives: int = 5
    hidden: list[int] = field(default_factory=lambda: [128, 64])
    dropout: float = 0.0
    gsu: str = "exact"  # at evaluation: "exact" scores or "pq" (§3.5: codes, short list, exact re-rank)
    pq_subspaces: int = 4  # S per modality (D / S dimensions each)
    pq_codewords: int = 16  # C per sub-space (4-bit codes)
    pq_shortlist: int = 200  # N events per head re-ranked exactly

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.alpha <= 1.0:
            raise ModelConfigError(f"alpha: must be in [0, 1], got {self.alpha}")
        if self.gsu not in ("exact", "pq"):
            raise ModelConfigError(f"gsu: 'exact' or 'pq', got {self.gsu!r}")
        if self.embedding_dim % self.pq_subspaces:
            raise ModelConfigError(f"pq_subspaces: {self.pq_subspaces} must divide embedding_dim={self.embedding_dim}")
        if not 1 <= self.pq_codewords <= 256:
            raise ModelConfigError(f"pq_codewords: uint8 codes hold 1..256 codewords, got {self.pq_codewords}")
        if self.pq_shortlist < self.top_k:
            raise ModelConfigError(f"pq_shortlist: the short list ({self.pq_shortlist}) must hold at least top_k={self.top_k} events")
        for name in ("heads", "top_k", "align_chunk", "relevance_negatives"):
            if getattr(self, name) < 1:
                raise ModelConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("align_temperature", "relevance_temperature"):
            if getattr(self, name) <= 0:
                raise ModelConfigError(f"{name}: must be > 0, got {getattr(self, name)}")


def alignment_loss(a: Tensor, b: Tensor, temperature: float) -> Tensor:
    """Multi-modal alignment of N items seen through two channels, ``a`` and ``b`` [N, D]:
    with ``â, b̂`` L2-normalised, logits ``S = â b̂ᵀ / τ``, soft targets
    ``T = softmax((â âᵀ + b̂ b̂ᵀ) / (2τ))`` (row-wise), the symmetric cross-entropy
    ``1/2 [CE(S, T) + CE(Sᵀ, Tᵀ)]``, each averaged over its rows. Fewer than 2 items give 0. -> scalar."""
    if a.shape[0] < 2:
        return a.new_zeros(())
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    logits = a @ b.T / temperature  # [N, N]
    targets = ((a @ a.T + b @ b.T) / (2 * temperature)).softmax(-1).detach()  # [N, N]
    forward = -(targets * logits.log_softmax(-1)).sum(-1).mean()
    backward = -(targets.T * logits.T.log_softmax(-1)).sum(-1).mean()
    return 0.5 * (forward + backward)


def relevance_loss(query: Tensor, item: Tensor, has_query: Tensor, negatives: Tensor, temperature: float) -> Tensor:
    """Query-item relevance InfoNCE over the events of B sequences: ``query``, ``item`` [B, L, D],
    ``has_query`` [B, L] (events with a non-empty query and an item), ``negatives`` [B, L, N]
    positions of other events of the same sequence. With cosine similarities ``s = cos / τ``:
    ``L = mean over events with a query of -log(e^{s(q_l, i_l)} / (e^{s(q_l, i_l)} + Σ_n e^{s(q_l, i_n)}))``.
    No event with a query gives 0. -> scalar."""
    if not has_query.any():
        return query.new_zeros(())
    q, i = F.normalize(query, dim=-1), F.normalize(item, dim=-1)  # [B, L, D]
    positive = (q * i).sum(-1, keepdim=True)  # [B, L, 1]
    others = torch.gather(i, 1, negatives.flatten(1).unsqueeze(-1).expand(-1, -1, i.shape[-1]))  # [B, L·N, D]
    negative = torch.einsum("bld,blnd->bln", q, others.view(*negatives.shape, -1))  # [B, L, N]
    logits = torch.cat([positive, negative], -1) / temperature  # [B, L, 1 + N]
    loss = -logits.log_softmax(-1)[..., 0]  # [B, L]
    return loss[has_query].mean()


class Modalities(nn.Module):
    """Per-item modality embeddings ``[U] -> [U, M, D]`` in the order of ``names``: the item's ID
    embedding, its frozen text vector through ``Linear(384 -> D)``, the mean of its attribute
    embeddings; the query tokens ``[..., W] -> [..., D]`` by masked mean. The ID, attribute and
    query tables are the model's field embeddings, passed in."""

    def __init__(self, schema: Schema, config: SEMINARConfig, side: dict[str, Tensor]) -> None:
        super().__init__()
        self.item_vocab = schema.feature(config.target).vocab
        self.names = ["id"] + (["text"] if config.text else []) + (["attributes"] if config.attributes else [])
        if config.text:
            self.register_buffer("text", side["text"], persistent=False)  # [V, 384]
            self.text_projection = nn.Linear(side["text"].shape[1], config.embedding_dim)
        self.attributes = []
        for i, name in enumerate(config.attributes):
            self.register_buffer(f"attributes_{i}", side[f"attributes.{name}"], persistent=False)  # [V] or [V, L]
            self.attributes.append(schema.feature(name).vocab)
        self.query_vocab = schema.feature(config.query_history).vocab if config.query_history else None

    def items(self, ids: Tensor, embedding: FeatureEmbedding) -> Tensor:
        """``ids`` [U] -> [U, M, D], the ID and attribute tables read from ``embedding``."""
        channels = [embedding.lookup(ids, self.item_vocab)]  # e_id
        if "text" in self.names:
            channels.append(self.text_projection(self.text[ids]))  # e_txt: [U, D]
        if self.attributes:
            total, count = 0, 0
            for i, vocab in enumerate(self.attributes):
                values = getattr(self, f"attributes_{i}")[ids]  # [U] or [U, L]
                values = values.unsqueeze(-1) if values.dim() == 1 else values
                real = (values != 0).unsqueeze(-1)
                total = total + (embedding.lookup(values, vocab) * real).sum(1)  # [U, D]
                count = count + real.sum(1)
            channels.append(total / count.clamp(min=1))  # e_attr: [U, D]
        return torch.stack(channels, 1)  # [U, M, D]

    def query(self, tokens: Tensor, embedding: FeatureEmbedding) -> Tensor:
        """Masked mean of the query tokens: [..., W] -> [..., D] (0 for an empty query)."""
        real = (tokens != 0).unsqueeze(-1)
        return (embedding.lookup(tokens, self.query_vocab) * real).sum(-2) / real.sum(-2).clamp(min=1)


@register("seminar")
class SEMINAR(SingleTaskModel, Pretrainable, Searcher):
    config_class = SEMINARConfig
    paper = (
        "Shen et al., SEMINAR: Search Enhanced Multi-modal Interest Network and Approximate Retrieval "
        "for Lifelong Sequential Recommendation, arXiv:2407.10714"
    )
    results_page = "docs/results/seminar.md"
    pretrained_prefixes = ("embedding.", "modalities.text_projection.", "gate_query", "gate.")  # the PSU tables

    @classmethod
    def side_data(cls, store: "Store", config: SEMINARConfig) -> dict[str, Tensor]:
        """The frozen text vector and the attribute ids of every item (see the module docstring)."""
        check_features(store.schema, config)
        side = {f"attributes.{name}": torch.from_numpy(ids) for name, ids in store.item_features(config.target, config.attributes).items()}
        if config.text:
            side["text"] = torch.from_numpy(store.vectors_by_vocab(config.text))
        return side

    def __init__(self, schema: Schema, config: SEMINARConfig, side: dict[str, Tensor] | None = None) -> None:
        super().__init__(schema, config, side)
        check_features(schema, config)
        missing = (["text"] if config.text else []) + [f"attributes.{n}" for n in config.attributes]
        missing = [key for key in missing if key not in self.side]
        if missing:
            raise ValueError(f"seminar: side data lacks {missing} (SEMINAR.side_data(store, config) gives them)")
        d = config.embedding_dim
        self.target_index = schema.categorical_index(config.target)
        histories = {config.history, config.query_history}
        self.other_sequences = [i for i, f in enumerate(schema.sequences) if f.name not in histories]
        self.embedding = FeatureEmbedding(schema, d)
        self.modalities = Modalities(schema, config, self.side)
        m = len(self.modalities.names)
        self.gate_query = nn.Parameter(torch.randn(1, d) * 0.02)  # w_c
        self.gate = nn.Linear(d, m)  # W_g: g = softmax(W_g w_c)
        # fine-tuning's per-modality projections G_m (and G_q), identity-initialised
        self.projections = None if config.pretrain else nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(m + 1))
        if self.projections is not None:
            for p in self.projections:
                nn.init.eye_(p.weight)
        self.search = MultiHeadSearch(d, config.heads, config.top_k)  # GSU top-K per head, exact ESU over them
        in_dim = (len(schema.categorical) + len(self.other_sequences) + 2) * d + len(schema.numeric)
        self.mlp = MLP(in_dim, config.hidden, config.dropout, "relu", out_dim=1)
        self._index: dict[str, Tensor] | None = None  # the PQ codes of the current weights (gsu: pq)
        self.register_load_state_dict_post_hook(lambda module, _: setattr(module, "_index", None))

    def train(self, mode: bool = True) -> "SEMINAR":
        self._index = None  # the weights may change: the codes are rebuilt at the next evaluation
        return super().train(mode)

    def restore_pretrained(self, source: "SEMINAR") -> None:
        """Start from a pretrained PSU's tables (the embeddings, the text projection and the gate);
        the GSU/ESU, the MLP and ``G_m`` keep their initial values."""
        state = {k: v for k, v in source.state_dict().items() if k.startswith(self.pretrained_prefixes)}
        mine = self.state_dict()
        wrong = sorted(k for k, v in state.items() if k not in mine or mine[k].shape != v.shape)
        if wrong or not state:
            raise ModelConfigError(f"model.params: the pretrained SEMINAR's tables {wrong or 'none'} do not fit this model")
        self.load_state_dict(state, strict=False)

    # --- the pieces of forward --------------------------------------------------------------
    def fused(self, channels: Tensor) -> Tensor:
        """``e_item = Σ_m g_m G_m e_m``: [..., M, D] -> [..., D] (``G_m`` only when fine-tuning)."""
        g = self.gate(self.gate_query).softmax(-1).squeeze(0)  # [M]
        if self.projections is not None:
            channels = torch.stack([p(channels[..., k, :]) for k, p in enumerate(self.projections[:-1])], -2)
        return (channels * g[:, None]).sum(-2)

    def pairs(self, items: Tensor, tokens: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
        """The events' (query, item) embeddings: ``items`` [B, L] (0 = pad), ``tokens`` [B, L, W]
        -> (e_pair [B, L, D], per-modality channels [B, L, M, D], e_q [B, L, D] or None, e_item [B, L, D])."""
        distinct, inverse = torch.unique(items, return_inverse=True)  # each distinct item once: [U]
        channels = self.modalities.items(distinct, self.embedding)[inverse]  # [B, L, M, D]
        e_item = self.fused(channels)  # [B, L, D]
        if tokens is None:
            return (1 - self.config.alpha) * e_item, channels, None, e_item
        e_q = self.modalities.query(tokens, self.embedding)  # [B, L, D]
        if self.projections is not None:
            e_q = self.projections[-1](e_q)  # G_q
        return self.config.alpha * e_q + (1 - self.config.alpha) * e_item, channels, e_q, e_item

    def score(self, batch: Batch, targets: Tensor, history: Tensor, mask: Tensor) -> Tensor:
        """Logits of ``targets`` [B] (empty queries) against the history pairs [B, L, D]."""
        e_t, _, _, _ = self.pairs(targets.unsqueeze(1), None)  # e_pair of the target: [B, 1, D]
        e_t = e_t.squeeze(1)  # [B, D]
        indices, valid = self.gsu(batch, e_t, history, mask)  # GSU top-K per head: [B, H, K]
        u = self.search.attend(e_t, gather_events(history, indices), valid)  # ESU -> W_O: [B, D]
        fields = self.embedding.fields(batch)  # [B, F, D]
        lists = self.embedding.pooled_sequences(batch)[:, self.other_sequences]  # [B, S, D]
        x = torch.cat([fields.flatten(1), lists.flatten(1), u, e_t, batch.numeric], 1)
        return self.mlp(x).squeeze(-1)  # [B]

    def searched(self, batch: Batch) -> tuple[Tensor, Tensor]:
        items = batch.sequences[self.config.history]
        tokens = batch.sequences[self.config.query_history] if self.config.query_history else None
        history = self.pairs(items, tokens)[0]
        e_t = self.pairs(batch.categorical[:, self.target_index].unsqueeze(1), None)[0].squeeze(1)
        return self.gsu(batch, e_t, history, items != 0)

    # --- the GSU: exact, or approximate (§3.5) ----------------------------------------------
    def gsu(self, batch: Batch, e_t: Tensor, history: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Top-K events per head ``(indices, valid)`` [B, H, K]: exact scores while training and with
        ``gsu: exact``; with ``gsu: pq`` at evaluation, the ``pq_shortlist`` best by the codes'
        scores (:meth:`approximate_scores`), re-ranked exactly."""
        if self.training or self.config.gsu == "exact":
            return self.search.select(e_t, history, mask)
        with torch.no_grad():
            probe = self.search.probe(e_t)  # [B, H, D]
            approximate = self.approximate_scores(probe, batch).masked_fill(~mask.unsqueeze(1), -math.inf)
            short, short_valid = top_k(approximate, mask.unsqueeze(1), self.config.pq_shortlist)  # [B, H, N]
            exact = torch.einsum("bhd,bhnd->bhn", probe, gather_events(history, short))  # [B, H, N]
            picked, valid = top_k(exact, short_valid, self.config.top_k)  # [B, H, K] into the short list
            return short.gather(-1, picked), valid

    def channel_keys(self) -> tuple[Tensor, Tensor | None]:
        """The GSU keys channel by channel: every item's ``(1 - α) g_m G_m e_m`` [V, M, D] and every
        query token's ``α G_q e_tok`` [V_q, D] (None without queries). An event's ``e_pair`` is the
        sum of its item's channels plus the mean over its query tokens, so a probe's score of an
        event is the sum of its scores of these keys."""
        cfg = self.config
        vocab = self.schema.vocab_size(self.modalities.item_vocab)
        channels = self.modalities.items(torch.arange(vocab, device=self.gate_query.device), self.embedding)  # [V, M, D]
        if self.projections is not None:
            channels = torch.stack([p(channels[:, k]) for k, p in enumerate(self.projections[:-1])], 1)
        g = self.gate(self.gate_query).softmax(-1).squeeze(0)  # [M]
        items = (1 - cfg.alpha) * channels * g[:, None]
        if not cfg.query_history:
            return items, None
        vocab = self.schema.vocab_size(self.modalities.query_vocab)
        tokens = self.embedding.lookup(torch.arange(vocab, device=items.device), self.modalities.query_vocab)  # [V_q, D]
        if self.projections is not None:
            tokens = self.projections[-1](tokens)  # G_q
        return items, cfg.alpha * tokens

    def index(self) -> dict[str, Tensor]:
        """Per-modality PQ of the current weights' keys (k-means codebooks per sub-space, uint8
        codes per item and per query token), built on first use after the weights change."""
        if self._index is None:
            cfg = self.config
            with torch.no_grad():
                items, tokens = self.channel_keys()
                quantizers = [
                    ProductQuantizedKeys(cfg.embedding_dim, cfg.pq_subspaces, min(cfg.pq_codewords, len(items))).fit(items[:, m])
                    for m in range(items.shape[1])
                ]
                index = {
                    "item_books": torch.stack([q.codebooks for q in quantizers]),  # [M, S, C, D / S]
                    "item_codes": torch.cat([q.encode(items[:, m]) for m, q in enumerate(quantizers)], 1),  # [V, M·S]
                }
                if tokens is not None:
                    q = ProductQuantizedKeys(cfg.embedding_dim, cfg.pq_subspaces, min(cfg.pq_codewords, len(tokens))).fit(tokens)
                    index |= {"token_books": q.codebooks, "token_codes": q.encode(tokens)}  # [S, C, D / S], [V_q, S]
            self._index = index
        return self._index

    def approximate_scores(self, probe: Tensor, batch: Batch) -> Tensor:
        """ADC scores of the history's events from the codes: ``Σ_{m,s} LUT_m[s, code_{m,s}(item)]``
        plus the mean over the event's query tokens of ``Σ_s LUT_q[s, code_s(token)]``, the tables
        ``LUT[s, c] = <probe_s, C_s[c]>``: probe [B, H, D] -> [B, H, L]."""
        cfg, index = self.config, self.index()
        b, h, _ = probe.shape
        parts = probe.view(b, h, cfg.pq_subspaces, -1)  # [B, H, S, D / S]
        items = batch.sequences[cfg.history]  # [B, L]
        lut = torch.einsum("bhsd,mscd->bhmsc", parts, index["item_books"]).flatten(2, 3)  # [B, H, M·S, C]
        scores = adc_scores(lut, index["item_codes"][items])  # [B, H, L]
        if "token_codes" in index:
            tokens = batch.sequences[cfg.query_history]  # [B, L, W]
            lut = torch.einsum("bhsd,scd->bhsc", parts, index["token_books"])  # [B, H, S, C]
            per_token = adc_scores(lut, index["token_codes"][tokens.flatten(1)]).view(b, h, *tokens.shape[1:])  # [B, H, L, W]
            real = (tokens != 0).unsqueeze(1)
            scores = scores + (per_token * real).sum(-1) / real.sum(-1).clamp(min=1)
        return scores

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        cfg = self.config
        items = batch.sequences[cfg.history]  # [B, L]
        tokens = batch.sequences[cfg.query_history] if cfg.query_history else None  # [B, L, W]
        mask = items != 0  # [B, L]
        history, channels, e_q, e_item = self.pairs(items, tokens)  # [B, L, D]
        targets = batch.categorical[:, self.target_index]  # [B]
        out = {self.predicted_label: self.score(batch, targets, history, mask)}
        if cfg.pretrain and self.training:
            negatives = torch.randint(2, self.schema.vocab_size(self.modalities.item_vocab), targets.shape, device=targets.device)
            out |= {"negative_logit": self.score(batch, negatives, history, mask), "items": items, "channels": channels}
            if e_q is not None:
                out |= {"e_q": e_q, "e_item": e_item, "has_query": mask & (tokens != 0).any(-1)}
        return out

    def loss(self, outputs: dict[str, Tensor], batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        cfg, label = self.config, self.predicted_label
        y = batch.labels[label]
        if not (cfg.pretrain and "negative_logit" in outputs):
            parts = {label: F.binary_cross_entropy_with_logits(outputs[label], y)}
            return parts[label], detached(parts)
        positive = y == 1
        logits = torch.cat([outputs[label], outputs["negative_logit"][positive]])
        labels = torch.cat([y, torch.zeros_like(y[positive])])
        parts = {"next": F.binary_cross_entropy_with_logits(logits, labels)}  # L_next
        parts["align"] = self.alignment(outputs["items"], outputs["channels"])  # L_align
        total = cfg.next_weight * parts["next"] + cfg.align_weight * parts["align"]
        if "e_q" in outputs:
            parts["relevance"] = self.relevance(outputs["e_q"], outputs["e_item"], outputs["has_query"])  # L_rel
            total = total + cfg.relevance_weight * parts["relevance"]
        return total, detached(parts)

    def alignment(self, items: Tensor, channels: Tensor) -> Tensor:
        """L_align over every pair of modality channels of the batch's distinct history items,
        in chunks of ``align_chunk`` items; 0 with one channel."""
        m = channels.shape[-2]
        if m < 2:
            return channels.new_zeros(())
        flat_items, flat = items.flatten(), channels.flatten(0, 1)  # [B·L], [B·L, M, D]
        distinct, first = _first_positions(flat_items)
        keep = first[distinct != 0]
        per_item = flat[keep[torch.randperm(len(keep), device=keep.device)]]  # [U, M, D], shuffled into chunks
        losses = [
            alignment_loss(chunk[:, i], chunk[:, j], self.config.align_temperature)
            for chunk in per_item.split(self.config.align_chunk)
            for i in range(m)
            for j in range(i + 1, m)
        ]
        return torch.stack(losses).mean() if losses else channels.new_zeros(())

    def relevance(self, e_q: Tensor, e_item: Tensor, has_query: Tensor) -> Tensor:
        """L_rel with ``relevance_negatives`` other positions of the same sequence per event."""
        b, length = has_query.shape
        if length < 2:
            return e_q.new_zeros(())
        n = self.config.relevance_negatives
        offsets = torch.randint(1, length, (b, length, n), device=e_q.device)  # never the event itself
        negatives = (torch.arange(length, device=e_q.device)[None, :, None] + offsets) % length
        return relevance_loss(e_q, e_item, has_query, negatives, self.config.relevance_temperature)


def _first_positions(values: Tensor) -> tuple[Tensor, Tensor]:
    """Distinct values of a 1-D tensor and the first position of each."""
    distinct, inverse = torch.unique(values, return_inverse=True)
    positions = torch.arange(len(values), device=values.device)
    first = torch.full((len(distinct),), len(values), device=values.device).scatter_reduce(0, inverse, positions, "amin")
    return distinct, first


def check_features(schema: Schema, config: SEMINARConfig) -> None:
    """The history and target share a vocabulary; the query history is a list timeline; the
    text is an embedding keyed by the target; attributes are categorical or list fields."""
    history, target = schema.feature(config.history), schema.feature(config.target)
    if history.kind is not Kind.SEQUENCE or target.kind is not Kind.CATEGORICAL or history.vocab != target.vocab:
        raise ModelConfigError(
            f"model.params.history: seminar needs history {config.history!r} a sequence and target {config.target!r} "
            "a categorical feature of the same vocabulary"
        )
    if config.query_history is not None:
        q = schema.feature(config.query_history)
        source = schema.feature(q.timeline) if q.timeline else None
        if source is None or source.kind is not Kind.SEQUENCE or q.where != history.where:
            raise ModelConfigError(
                f"model.params.query_history: seminar needs {config.query_history!r} a list timeline (query tokens per "
                f"event) over the same events as {config.history!r}"
            )
    if config.text is not None:
        f = schema.feature(config.text)
        if f.kind is not Kind.EMBEDDING or f.key != config.target:
            raise ModelConfigError(f"model.params.text: seminar needs {config.text!r} an embedding keyed by {config.target!r}")
    for name in config.attributes:
        f = schema.feature(name)
        if f.kind is not Kind.CATEGORICAL and (f.kind is not Kind.SEQUENCE or f.timeline is not None):
            raise ModelConfigError(f"model.params.attributes: seminar reads categorical or list item fields, not {name!r}")
