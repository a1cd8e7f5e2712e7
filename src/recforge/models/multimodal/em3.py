"""EM3: End-to-end training of Multimodal Model and ranking Model.
Xiuqi Deng, Lu Xu, Xiyao Li, Jinkai Yu, Erpeng Xue, Zhongyuan Wang, Di Zhang, Zhaojie Liu,
Guorui Zhou, Yang Song, Na Mou, Shen Jiang, Han Li (Kuaishou). arXiv:2404.06078, 2024.
The official code (``em3e2e-anonymous/em3``) covers the public, graph-based variant only; this is
the industrial CTR variant (sec. 3.4 of the spec).

Follows the paper:

- a frozen modality encoder whose token states are computed once and cached; the
  **FQ-Former** (:class:`~recforge.nn.fqformer.FQFormer`, learnable queries and modality tokens
  in joint self-attention, no FFN [official code]) fuses an item's tokens into its content
  embedding ``e_c = Linear(Q·D -> D)(flatten(Z[:, :Q]))`` [official code], trained end-to-end
  with the ranking loss; the target item's ``e_c`` is a ranking feature [paper];
- the **user content-interest sequence**: every history item through the same FQ-Former
  weights plus the sequence's own LoRA deltas (``W + s B A``, rank 8, on the Q/K/V/O
  projections; :class:`~recforge.nn.lora.LoRA`), which alone learn from that path, pooled by
  target attention against the target's ``e_c`` [paper; placement and rank reconstructed];
- **Content-ID-Contrastive** learning (:func:`content_id_contrastive`): ``e_c`` aligned with the
  ranker's item-ID embedding, ``L = BCE_ctr + λ L_CIC`` [paper; λ = 0.1 reconstructed].

Chosen here [reconstructed]:

- the ranker is DIN (:mod:`recforge.models.ranking.din`): its ID history pooled against the
  target's ID embedding, plus the content interest above; the MLP reads every field embedding
  (the target's ID embedding among them), the ID interest, the target's ``e_c``, the content
  interest and the numeric features;
- the modality tokens of an item: the frozen sentence encoder's token states of its text
  (``text``, ``text_tokens`` word pieces, projected 384 -> D), one token per item vector
  (``vectors``: other embeddings keyed by the item, each projected to D) and one per item
  attribute (``attributes``: categorical fields, or list fields mean-pooled, with their own
  D-wide embeddings); an absent token (padding, an item without text or value) is masked;
- the content path runs once per distinct item of a batch (target items; history items), so
  the 384-d states are projected once per item, not once per row;
- the content sequence is the history's last ``min(sequence_length, max_len)`` items (spec:
  100-1000);
- CIC is computed over the batch's distinct target items, with heads ``Lin_c: D -> d`` and
  ``Lin_id: d -> d`` (d = ``embedding_dim``) and 16 sampled in-batch negatives [official code];
  a sampled negative is never the item itself (the official code may draw it);
- defaults D = 64, 4 queries, 2 layers, 8 heads, τ = 0.1 (spec sec. 3.4 / 7); DIN's own defaults
  otherwise.

Ablations: ``lora=False`` runs the sequence through the shared FQ-Former weights (trained by both
paths); ``fusion="mean"`` replaces the FQ-Former by the masked mean of the tokens followed by a
linear layer (with ``lora=False``: there are no projections to adapt); ``cic_weight=0`` drops CIC.

Side data (:meth:`EM3.side_data`), rows indexed by the target's vocabulary (V items):
``text_states`` [V, T, 384] float16 and ``text_mask`` [V, T] bool; ``vectors.<name>`` [V, dim]
float32; ``attributes.<name>`` [V] (categorical) or [V, max_len] (list) int64 ids.
Inference cache: ``e_c`` depends on the item and the weights only, so in eval mode without
gradients (evaluation, scoring, the server) both paths' ``e_c`` of every item are computed once,
[V, D] each, and looked up; ``train()`` and ``load_state_dict`` drop the tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recforge.data.batch import Batch
from recforge.data.content import token_states
from recforge.data.schema import Kind, Schema
from recforge.errors import ModelConfigError
from recforge.models.base import SingleTaskConfig, SingleTaskModel, detached, register
from recforge.models.features import FeatureEmbedding
from recforge.nn.attention import TargetAttention
from recforge.nn.fqformer import FQFormer
from recforge.nn.lora import LoRA
from recforge.nn.mlp import MLP, Activation

if TYPE_CHECKING:
    from recforge.data.store import Store

TEXT_DIM = 384  # width of the sentence encoder's token states
MAX_TEXT_TOKENS = 256  # the encoder's longest input


def content_id_contrastive(content: Tensor, identity: Tensor, temperature: float, num_negatives: int | None = None) -> Tensor:
    """Content-ID-Contrastive loss of N items (spec 3.2): row i of ``content`` [N, D] and of
    ``identity`` [N, D] (the projected e_c and ID embedding) are a positive pair; after L2
    normalisation ``h_c``, ``h_id``,

        L_CIC = 1/2 [CE((h_c·h_id⁺, h_c·h_id⁻...) / τ) + CE((h_id·h_c⁺, h_id·h_c⁻...) / τ)]

    with every other item as a negative (``num_negatives=None``: the in-batch InfoNCE) or
    ``num_negatives`` other items drawn uniformly with replacement per item (the official code's
    16), the same draws in both directions. Fewer than 2 items give 0. -> scalar.
    """
    n = content.shape[0]
    if n < 2:
        return content.new_zeros(())
    h_c, h_id = F.normalize(content, dim=-1, eps=1e-5), F.normalize(identity, dim=-1, eps=1e-5)  # [N, D]
    if num_negatives is None:
        logits = h_c @ h_id.T / temperature  # [N, N]: row i = (h_c_i · h_id_j)_j, positive on the diagonal
        target = torch.arange(n, device=content.device)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
    draws = torch.randint(1, n, (n, num_negatives), device=content.device)
    negatives = (torch.arange(n, device=content.device)[:, None] + draws) % n  # [N, K], never i itself
    positive = (h_c * h_id).sum(-1, keepdim=True)  # [N, 1]
    c2i = torch.cat([positive, torch.einsum("nd,nkd->nk", h_c, h_id[negatives])], 1) / temperature  # [N, 1 + K]
    i2c = torch.cat([positive, torch.einsum("nd,nkd->nk", h_id, h_c[negatives])], 1) / temperature  # [N, 1 + K]
    first = content.new_zeros(n, dtype=torch.long)
    return 0.5 * (F.cross_entropy(c2i, first) + F.cross_entropy(i2c, first))


@dataclass
class EM3Config(SingleTaskConfig):
    embedding_dim: int = 16
    history: str = "hist_item_id"  # the behaviour sequence (ID interest and content sequence)
    target: str = "item_id"  # the candidate (same vocabulary); keys every content feature
    text: str | None = "item_text"  # an embedding feature made from text, keyed by target; None = no text tokens
    text_tokens: int = 32  # T: word pieces per item text ([CLS] and [SEP] included)
    vectors: list[str] = field(default_factory=list)  # other embeddings keyed by target: one token each
    attributes: list[str] = field(default_factory=list)  # categorical or list item fields: one token each
    fusion: Literal["fqformer", "mean"] = "fqformer"
    fq_dim: int = 64  # D
    num_queries: int = 4  # Q
    fq_layers: int = 2
    fq_heads: int = 8
    fq_attention_dropout: float = 0.0
    fq_dropout: float = 0.0  # on the attention output before the residual (the code's hidden_dropout)
    lora: bool = True  # False = the sequence shares the FQ-Former weights
    lora_rank: int = 8
    lora_alpha: float | None = None  # None = rank (scale 1)
    sequence_length: int = 100  # L: last history items of the content sequence
    cic_weight: float = 0.1  # λ; 0 = no CIC
    cic_temperature: float = 0.1  # τ
    cic_negatives: int | None = 16  # sampled in-batch negatives per item; None = all others
    attention_hidden: list[int] = field(default_factory=lambda: [80, 40])
    attention_activation: Activation = "prelu"
    attention_softmax: bool = False
    hidden: list[int] = field(default_factory=lambda: [200, 80])
    activation: Activation = "dice"
    dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 2 <= self.text_tokens <= MAX_TEXT_TOKENS:
            raise ModelConfigError(f"text_tokens: must be in [2, {MAX_TEXT_TOKENS}], got {self.text_tokens}")
        if self.text is None and not self.vectors and not self.attributes:
            raise ModelConfigError("text: an item needs at least one modality token (text, vectors or attributes)")
        for name in ("fq_dim", "num_queries", "fq_layers", "fq_heads", "lora_rank", "sequence_length"):
            if getattr(self, name) < 1:
                raise ModelConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.fq_dim % self.fq_heads:
            raise ModelConfigError(f"fq_heads: must divide fq_dim={self.fq_dim}, got {self.fq_heads}")
        if self.lora and self.fusion == "mean":
            raise ModelConfigError("lora: LoRA adapts the FQ-Former's projections; fusion 'mean' has none (set lora: false)")
        if self.cic_weight < 0:
            raise ModelConfigError(f"cic_weight: must be >= 0, got {self.cic_weight}")
        if self.cic_temperature <= 0:
            raise ModelConfigError(f"cic_temperature: must be > 0, got {self.cic_temperature}")
        if self.cic_negatives is not None and self.cic_negatives < 1:
            raise ModelConfigError(f"cic_negatives: must be >= 1 (or null for every other item), got {self.cic_negatives}")


def check_content_features(schema: Schema, config: EM3Config) -> None:
    """Every content feature is keyed by the target; every attribute is a categorical or list field."""
    for name in ([config.text] if config.text else []) + list(config.vectors):
        f = schema.feature(name)
        param = "text" if name == config.text else "vectors"
        if f.kind is not Kind.EMBEDDING or f.key != config.target or (param == "text" and f.text is None):
            kind = "an embedding made from text" if param == "text" else "an embedding"
            raise ModelConfigError(f"model.params.{param}: em3 needs {name!r} {kind} keyed by {config.target!r}")
    for name in config.attributes:
        f = schema.feature(name)
        if f.kind is not Kind.CATEGORICAL and (f.kind is not Kind.SEQUENCE or f.timeline is not None):
            raise ModelConfigError(f"model.params.attributes: em3 reads categorical or list item fields, not {name!r}")


def modality_side(store: "Store", item: str, text: str | None, text_tokens: int, vectors: list[str], attributes: list[str]) -> dict[str, Tensor]:
    """The cached modality inputs of every item of ``item``'s vocabulary: ``text_states`` [V, T, 384]
    and ``text_mask`` [V, T], ``vectors.<name>`` [V, dim], ``attributes.<name>`` [V] or [V, L]."""
    side: dict[str, Tensor] = {}
    if text is not None:
        states, mask = token_states(store.texts_by_vocab(text), text_tokens)  # [V, T, 384], [V, T]
        side["text_states"], side["text_mask"] = torch.from_numpy(states), torch.from_numpy(mask)
    for name in vectors:
        side[f"vectors.{name}"] = torch.from_numpy(store.vectors_by_vocab(name))  # [V, dim]
    for name, ids in store.item_features(item, attributes).items():
        side[f"attributes.{name}"] = torch.from_numpy(ids)
    return side


def check_modality_side(
    schema: Schema, side: dict[str, Tensor], model: str, owner: str,
    item: str, text: str | None, text_tokens: int, vectors: list[str], attributes: list[str],
) -> None:  # fmt: skip
    """``side`` holds every table :func:`modality_side` gives for these settings, one row per item,
    ``text_tokens`` tokens per text; ``owner`` names the class whose ``side_data`` computes them."""
    needed = (["text_states", "text_mask"] if text else []) + [f"vectors.{n}" for n in vectors]
    needed += [f"attributes.{n}" for n in attributes]
    missing = [key for key in needed if key not in side]
    if missing:
        raise ValueError(f"{model}: side data lacks {missing} ({owner}.side_data(store, config) gives them)")
    size = schema.vocab_size(schema.feature(item).vocab)
    wrong = [key for key in needed if side[key].shape[0] != size]
    if wrong:
        raise ValueError(f"{model}: side tables {wrong} do not have one row per {item} ({size})")
    if text and side["text_states"].shape[1:] != (text_tokens, TEXT_DIM):
        raise ValueError(
            f"{model}: side text_states are [V, {', '.join(map(str, side['text_states'].shape[1:]))}], "
            f"expected [V, {text_tokens}, {TEXT_DIM}] (text_tokens, the encoder's width)"
        )


class ItemContent(nn.Module):
    """An item's content embedding from its cached modality tokens: ``items [U] -> e_c [U, D]``.

    Tokens ``[U, M, D]``: the text's T token states projected 384 -> D, one projected token per
    item vector, one embedded token per attribute; fused by the FQ-Former (``e_c = Linear(Q·D ->
    D)`` of the query outputs) or, with ``fusion="mean"``, by their masked mean and ``Linear(D -> D)``.
    """

    def __init__(self, schema: Schema, config: EM3Config, side: dict[str, Tensor]) -> None:
        super().__init__()
        d = config.fq_dim
        self.has_text = config.text is not None
        if self.has_text:
            self.register_buffer("text_states", side["text_states"], persistent=False)  # [V, T, 384] float16
            self.register_buffer("text_mask", side["text_mask"], persistent=False)  # [V, T]
            self.text_projection = nn.Linear(TEXT_DIM, d)
        for i, name in enumerate(config.vectors):
            self.register_buffer(f"vectors_{i}", side[f"vectors.{name}"], persistent=False)  # [V, dim]
        self.vector_projections = nn.ModuleList(nn.Linear(schema.feature(n).dim, d) for n in config.vectors)
        for i, name in enumerate(config.attributes):
            self.register_buffer(f"attributes_{i}", side[f"attributes.{name}"], persistent=False)  # [V] or [V, L]
        sizes = [schema.vocab_size(schema.feature(n).vocab) for n in config.attributes]
        self.attribute_offsets = [int(s) for s in np.cumsum([0, *sizes])[:-1]]  # first row of each attribute
        self.attribute_table = nn.Embedding(sum(sizes), d) if sizes else None  # pad ids are masked, never read
        if config.fusion == "fqformer":
            self.fqformer = FQFormer(
                d, config.num_queries, config.fq_layers, config.fq_heads, config.fq_attention_dropout, config.fq_dropout
            )
            self.output = nn.Linear(config.num_queries * d, d)
            nn.init.xavier_uniform_(self.output.weight)  # as the code's mm_proj
        else:
            self.fqformer = None
            self.output = nn.Linear(d, d)

    def tokens(self, items: Tensor) -> tuple[Tensor, Tensor]:
        """The modality tokens of ``items`` [U] -> ([U, M, D], mask [U, M] bool)."""
        tokens, masks = [], []
        if self.has_text:
            tokens.append(self.text_projection(self.text_states[items].float()))  # [U, T, 384] -> [U, T, D]
            masks.append(self.text_mask[items])  # [U, T]
        for i, projection in enumerate(self.vector_projections):
            v = getattr(self, f"vectors_{i}")[items]  # [U, dim]
            tokens.append(projection(v).unsqueeze(1))  # [U, 1, D]
            masks.append((v != 0).any(-1, keepdim=True))  # a key without content has the zero vector
        for i, offset in enumerate(self.attribute_offsets):
            ids = getattr(self, f"attributes_{i}")[items]  # [U] or [U, L]
            ids = ids.unsqueeze(-1) if ids.dim() == 1 else ids  # [U, L]
            real = ids != 0
            e = self.attribute_table(ids + offset) * real.unsqueeze(-1)  # [U, L, D]
            tokens.append((e.sum(1) / real.sum(1, keepdim=True).clamp(min=1)).unsqueeze(1))  # mean of the values: [U, 1, D]
            masks.append(real.any(1, keepdim=True))  # [U, 1]
        return torch.cat(tokens, 1), torch.cat(masks, 1)

    def forward(self, items: Tensor) -> Tensor:
        x, mask = self.tokens(items)  # [U, M, D], [U, M]
        if self.fqformer is None:
            pooled = (x * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)  # masked mean: [U, D]
            return self.output(pooled)  # [U, D]
        z = self.fqformer(x, mask)  # query outputs: [U, Q, D]
        return self.output(z.flatten(1))  # e_c = Linear(Q·D -> D): [U, D]


@register("em3")
class EM3(SingleTaskModel):
    config_class = EM3Config
    paper = "Deng et al., End-to-end training of Multimodal Model and ranking Model, arXiv:2404.06078"
    results_page = "docs/results/em3.md"

    @classmethod
    def side_data(cls, store: "Store", config: EM3Config) -> dict[str, Tensor]:
        """The cached modality inputs of every item (see the module docstring)."""
        check_content_features(store.schema, config)
        return modality_side(store, config.target, config.text, config.text_tokens, config.vectors, config.attributes)

    def __init__(self, schema: Schema, config: EM3Config, side: dict[str, Tensor] | None = None) -> None:
        super().__init__(schema, config, side)
        history, target = schema.feature(config.history), schema.feature(config.target)
        if history.kind is not Kind.SEQUENCE or target.kind is not Kind.CATEGORICAL or history.vocab != target.vocab:
            raise ModelConfigError(
                f"model.params.history: em3 needs history {config.history!r} a sequence and target {config.target!r} "
                "a categorical feature of the same vocabulary"
            )
        check_content_features(schema, config)
        check_modality_side(schema, self.side, "em3", "EM3", config.target, config.text, config.text_tokens, config.vectors, config.attributes)
        self.target_index = schema.categorical_index(config.target)
        self.other_sequences = [i for i, f in enumerate(schema.sequences) if f.name != config.history]
        self.content_length = min(config.sequence_length, history.max_len or config.sequence_length)
        d, dc = config.embedding_dim, config.fq_dim
        self.embedding = FeatureEmbedding(schema, d)
        self.id_attention = TargetAttention(d, config.attention_hidden, config.attention_activation, config.attention_softmax)
        self.content = ItemContent(schema, config, self.side)  # target side: e_c
        self.sequence_content = (
            LoRA(self.content, [f"fqformer.{p}" for p in self.content.fqformer.attention_projections], config.lora_rank, config.lora_alpha)
            if config.lora
            else None
        )  # the content sequence: the same weights plus its own deltas
        self.content_attention = TargetAttention(dc, config.attention_hidden, config.attention_activation, config.attention_softmax)
        if config.cic_weight > 0:
            self.cic_content = nn.Linear(dc, d)  # Lin_c
            self.cic_id = nn.Linear(d, d)  # Lin_id
        in_dim = (len(schema.categorical) + len(self.other_sequences) + 1) * d + 2 * dc + len(schema.numeric)
        self.mlp = MLP(in_dim, config.hidden, config.dropout, config.activation, out_dim=1)
        self._content_tables: tuple[Tensor, Tensor] | None = None  # (target path, sequence path) e_c per item

    CACHE_CHUNK = 4096  # items per pass when the inference tables are built

    def train(self, mode: bool = True) -> "EM3":
        if mode:
            self._content_tables = None  # the weights are about to change
        return super().train(mode)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self._content_tables = None
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def content_tables(self) -> tuple[Tensor, Tensor]:
        """``e_c`` of every item through the target path and the sequence path: ([V, D], [V, D]),
        built once per set of weights (eval mode, no gradients)."""
        if self._content_tables is None:
            size = self.schema.vocab_size(self.schema.feature(self.config.target).vocab)
            items = torch.arange(size, device=self.content.output.weight.device)
            sequence = self.sequence_content or self.content
            chunks = items.split(self.CACHE_CHUNK)
            self._content_tables = (
                torch.cat([self.content(chunk) for chunk in chunks]), torch.cat([sequence(chunk) for chunk in chunks])
            )  # fmt: skip
        return self._content_tables

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        cfg = self.config
        fields = self.embedding.fields(batch)  # [B, F, d]
        target_ids = batch.categorical[:, self.target_index]  # [B]
        history = self.embedding.sequence(batch, cfg.history)  # [B, H, d]
        id_interest = self.id_attention(history, fields[:, self.target_index], batch.sequences[cfg.history] != 0)  # [B, d]
        sequence = batch.sequences[cfg.history][:, -self.content_length :]  # [B, L]
        targets, target_inverse = torch.unique(target_ids, return_inverse=True)  # distinct targets [U_t]
        if not self.training and not torch.is_grad_enabled():  # inference: e_c looked up per item
            target_table, sequence_table = self.content_tables()  # [V, D] each
            e_targets, e_sequence = target_table[targets], sequence_table[sequence]  # [U_t, D], [B, L, D]
        elif self.sequence_content is None:  # one shared encoder: every distinct item once
            items, inverse = torch.unique(torch.cat([targets, sequence.flatten()]), return_inverse=True)  # [U]
            e_items = self.content(items)  # [U, D]
            e_targets, e_sequence = e_items[inverse[: len(targets)]], e_items[inverse[len(targets) :]].view(*sequence.shape, -1)
        else:
            e_targets = self.content(targets)  # e_c: [U_t, D]
            seen, sequence_inverse = torch.unique(sequence, return_inverse=True)  # [U_s]
            e_sequence = self.sequence_content(seen)[sequence_inverse]  # through W + s B A: [B, L, D]
        e_target = e_targets[target_inverse]  # [B, D]
        content_interest = self.content_attention(e_sequence, e_target, sequence != 0)  # [B, D]
        lists = self.embedding.pooled_sequences(batch)[:, self.other_sequences]  # [B, S - 1, d]
        x = torch.cat([fields.flatten(1), lists.flatten(1), id_interest, e_target, content_interest, batch.numeric], 1)
        return {self.predicted_label: self.mlp(x).squeeze(-1), "cic_items": targets, "cic_content": e_targets}

    def loss(self, outputs: dict[str, Tensor], batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        cfg, label = self.config, self.predicted_label
        parts = {label: F.binary_cross_entropy_with_logits(outputs[label], batch.labels[label])}  # BCE_ctr
        total = parts[label]
        if cfg.cic_weight > 0:
            e_id = self.embedding.lookup(outputs["cic_items"], self.schema.feature(cfg.target).vocab)  # [U, d]
            parts["cic"] = content_id_contrastive(
                self.cic_content(outputs["cic_content"]), self.cic_id(e_id), cfg.cic_temperature, cfg.cic_negatives
            )  # L_CIC
            total = total + cfg.cic_weight * parts["cic"]  # L = BCE_ctr + λ L_CIC
        return total, detached(parts)
