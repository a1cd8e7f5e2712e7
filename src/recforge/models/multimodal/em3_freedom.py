"""EM3 on FREEDOM: the public-dataset variant of EM3 (End-to-end training of Multimodal Model and
ranking Model; Deng et al., Kuaishou, arXiv:2404.06078), as in its official code
``em3e2e-anonymous/em3`` (``src/models/em3.py``, built on MMRec's FREEDOM).

Follows the official code:

- **ID branch**: FREEDOM (:mod:`recforge.models.multimodal.freedom`): LightGCN over the
  degree-pruned user-item graph (2 layers, mean of layers, ``p = 0.8`` pruned per training
  draw, the full graph in evaluation) plus the item ID embeddings propagated once over the
  frozen kNN item graph ``S`` (``k = 10``) built from the item content vectors;
- **content branch**: each item's modality tokens fused by the FQ-Former
  (:class:`~recforge.nn.fqformer.FQFormer`: learnable queries and tokens in joint
  self-attention, no FFN) into ``e_c = Linear(Q·D -> D)(flatten(query outputs))``, computed for
  every item at every step and trained end to end; ``e_c`` propagated over the same user-item
  graph with users starting at zero (``[0 ; E_c]``, mean of layers) plus ``S E_c``;
- **score**: ``<[u_id ; u_c], [i_id ; i_c]>``, trained by BPR;
- **CIC**: ``L = BPR + lambda L_CIC`` with ``L_CIC`` between every item's content
  representation ``i_c`` and its ID representation ``i_id`` through linear heads, 16 sampled
  negatives per item, ``tau = 0.1``, ``lambda = 1e-3``
  (:func:`recforge.models.multimodal.em3.content_id_contrastive`);
- no content BPR term (FREEDOM's ``lambda`` is 0 here; when set, the content vector is projected
  to the ``[ID ; content]`` width), no L2; D = 64, 1 query, 1 layer, 4
  heads, dropout 0.8 on the attention output (the code's best Baby setting).

Chosen here:

- the modality tokens (:class:`recforge.models.multimodal.em3.ItemContent`): the frozen
  sentence encoder's token states of the item's text (``text``, ``text_tokens`` word pieces,
  projected 384 -> D), one projected token per item vector (``vectors``) and one embedded
  token per item attribute (``attributes``); the official code fuses two pooled vectors (image
  and text), which ``text: null, vectors: [<text vector>, <image vector>]`` reproduces;
- the kNN loop over ``S`` uses the content of the previous layer (the official code re-reads
  ``e_c`` at every layer, which only matters for ``knn_layers > 1``);
- a CIC negative is never the item itself (the official code may draw it); padding and OOV
  rows take no part in CIC.

Ablations: ``fusion: mean`` replaces the FQ-Former by the masked mean of the tokens and a linear
layer; ``cic_weight: 0`` drops CIC.

Side data (:meth:`EM3FREEDOM.side_data`): FREEDOM's (``edges``, ``knn_index``, ``knn_weight``,
``content``) plus ``text_states`` [V, T, 384] float16 and ``text_mask`` [V, T], ``vectors.<name>``
[V, dim], ``attributes.<name>`` [V] or [V, max_len].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn

from recforge.data.batch import Batch
from recforge.data.schema import N_RESERVED, Kind, Schema
from recforge.errors import ModelConfigError
from recforge.models.base import register
from recforge.models.multimodal.em3 import (
    MAX_TEXT_TOKENS, ItemContent, check_modality_side, content_id_contrastive, modality_side,
)
from recforge.models.multimodal.freedom import FREEDOM, FREEDOMConfig
from recforge.models.retrieval.lightgcn import propagate

if TYPE_CHECKING:
    from recforge.data.store import Store


@dataclass
class EM3FREEDOMConfig(FREEDOMConfig):
    content_bpr_weight: float = 0.0  # the official EM3 drops FREEDOM's content BPR
    text: str | None = "item_text"  # an embedding made from text, keyed by item_feature: its token states
    text_tokens: int = 32  # T: word pieces per item text (the code's max_txt_len)
    vectors: list[str] = field(default_factory=list)  # embeddings keyed by item_feature: one token each
    attributes: list[str] = field(default_factory=list)  # categorical or list item fields: one token each
    fusion: Literal["fqformer", "mean"] = "fqformer"
    fq_dim: int = 64  # D
    num_queries: int = 1  # Q (the code's grid: 1, 2)
    fq_layers: int = 1
    fq_heads: int = 4
    fq_attention_dropout: float = 0.0
    fq_dropout: float = 0.8  # the code's hidden_dropout_prob (grid: 0.5, 0.8)
    cic_weight: float = 1e-3  # lambda; 0 = no CIC
    cic_temperature: float = 0.1  # tau (grid: 0.1, 0.5)
    cic_negatives: int | None = 16  # sampled negatives per item; None = every other item

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 2 <= self.text_tokens <= MAX_TEXT_TOKENS:
            raise ModelConfigError(f"text_tokens: must be in [2, {MAX_TEXT_TOKENS}], got {self.text_tokens}")
        if self.text is None and not self.vectors and not self.attributes:
            raise ModelConfigError("text: an item needs at least one modality token (text, vectors or attributes)")
        for name in ("fq_dim", "num_queries", "fq_layers", "fq_heads"):
            if getattr(self, name) < 1:
                raise ModelConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.fq_dim % self.fq_heads:
            raise ModelConfigError(f"fq_heads: must divide fq_dim={self.fq_dim}, got {self.fq_heads}")
        for name in ("fq_attention_dropout", "fq_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ModelConfigError(f"{name}: must be in [0, 1), got {getattr(self, name)}")
        if self.cic_weight < 0:
            raise ModelConfigError(f"cic_weight: must be >= 0, got {self.cic_weight}")
        if self.cic_temperature <= 0:
            raise ModelConfigError(f"cic_temperature: must be > 0, got {self.cic_temperature}")
        if self.cic_negatives is not None and self.cic_negatives < 1:
            raise ModelConfigError(f"cic_negatives: must be >= 1 (or null for every other item), got {self.cic_negatives}")


def check_modalities(schema: Schema, config: EM3FREEDOMConfig, model: str) -> None:
    """``text`` and ``vectors`` are embeddings keyed by the item (``text`` made from text);
    ``attributes`` are categorical or list fields."""
    known = {f.name: f for f in schema.features}
    for param, names in (("text", [config.text] if config.text else []), ("vectors", config.vectors)):
        for name in names:
            f = known.get(name)
            if f is None or f.kind is not Kind.EMBEDDING or f.key != config.item_feature or (param == "text" and f.text is None):
                kind = "an embedding made from text" if param == "text" else "an embedding"
                raise ModelConfigError(f"model.params.{param}: {model} needs {kind} keyed by {config.item_feature!r}, not {name!r}")
    for name in config.attributes:
        f = known.get(name)
        if f is None or (f.kind is not Kind.CATEGORICAL and (f.kind is not Kind.SEQUENCE or f.timeline is not None)):
            raise ModelConfigError(f"model.params.attributes: {model} reads categorical or list item fields, not {name!r}")


@register("em3_freedom")
class EM3FREEDOM(FREEDOM):
    config_class = EM3FREEDOMConfig
    paper = "Deng et al., End-to-end training of Multimodal Model and ranking Model, arXiv:2404.06078 (public variant, on FREEDOM)"
    results_page = "docs/results/em3.md"

    @classmethod
    def side_data(cls, store: "Store", config: EM3FREEDOMConfig) -> dict[str, Tensor]:
        check_modalities(store.schema, config, cls.registry_name)
        modalities = modality_side(store, config.item_feature, config.text, config.text_tokens, config.vectors, config.attributes)
        return super().side_data(store, config) | modalities

    def __init__(self, schema: Schema, config: EM3FREEDOMConfig, side: dict[str, Tensor] | None = None) -> None:
        check_modalities(schema, config, self.registry_name)
        super().__init__(schema, config, side)
        check_modality_side(
            schema, self.side, "em3_freedom", "EM3FREEDOM",
            config.item_feature, config.text, config.text_tokens, config.vectors, config.attributes,
        )  # fmt: skip
        self.item_content = ItemContent(schema, config, self.side)  # e_c of every item
        if config.cic_weight:
            self.cic_content = nn.Linear(config.fq_dim, config.embedding_dim)  # Lin_c
            self.cic_id = nn.Linear(config.embedding_dim, config.embedding_dim)  # Lin_id

    @property
    def score_dim(self) -> int:
        return self.config.embedding_dim + self.config.fq_dim  # [ID ; content]

    def branches(self, adjacency: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """ID users [U, D], ID items [I, D], content users [U, D_c], content items [I, D_c]."""
        user_id, item_id = super().propagated(adjacency)  # FREEDOM: u_id, e_i + S E_item
        e_c = self.item_content(torch.arange(self.num_items, device=self.edges.device))  # [I, D_c]
        ego = torch.cat([e_c.new_zeros(self.num_users, e_c.shape[1]), e_c])  # [0 ; E_c]: [U + I, D_c]
        content = propagate(adjacency, ego, self.config.num_layers)  # [U + I, D_c]
        return user_id, item_id, content[: self.num_users], content[self.num_users :] + self.over_items(e_c)

    def propagated(self, adjacency: Tensor) -> tuple[Tensor, Tensor]:
        user_id, item_id, user_c, item_c = self.branches(adjacency)
        return torch.cat([user_id, user_c], 1), torch.cat([item_id, item_c], 1)  # [u_id ; u_c], [i_id ; i_c]

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        user_id, item_id, user_c, item_c = self.branches(self.graph())
        outputs = self.outputs(batch, torch.cat([user_id, user_c], 1), torch.cat([item_id, item_c], 1))
        if self.config.cic_weight:
            outputs |= {"cic_content": item_c[N_RESERVED:], "cic_id": item_id[N_RESERVED:]}  # real items: [I - 2, .]
        return outputs

    def loss(self, outputs: dict[str, Tensor], batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        total, parts = super().loss(outputs, batch)  # BPR (+ FREEDOM's terms when set)
        cfg = self.config
        if cfg.cic_weight:
            cic = content_id_contrastive(
                self.cic_content(outputs["cic_content"]), self.cic_id(outputs["cic_id"]), cfg.cic_temperature, cfg.cic_negatives
            )  # L_CIC
            parts["cic"] = cic.detach()
            total = total + cfg.cic_weight * cic  # L = BPR + lambda L_CIC
        return total, parts
