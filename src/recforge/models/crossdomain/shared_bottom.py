"""Shared-bottom multi-domain model: one shared embedding and bottom MLP, one tower per domain.

The classic hard-parameter-sharing baseline of multi-task and cross-domain CTR (Caruana,
"Multitask Learning", Machine Learning 28(1), 1997; the "shared-bottom" rows of MMoE, PLE and the cross-domain papers
this library implements). Every field is embedded in one table shared by the domains (list
features and histories mean-pooled, as in DNN), a bottom MLP is shared, and each domain has its
own tower; a row is scored by its own domain's tower. Trained on the rows of every domain with
``sum_d w_d * mean BCE over the rows of d`` (each domain weighted 1 by default), evaluated on
whichever domains the evaluation split holds. Chosen defaults: ``embedding_dim=10`` (as MiNet),
bottom ``[256]``, towers ``[128]``, ReLU.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from recforge.data.batch import Batch
from recforge.data.schema import Schema
from recforge.errors import ModelConfigError
from recforge.models.base import SingleTaskConfig, SingleTaskModel, detached, register
from recforge.models.features import FeatureEmbedding
from recforge.nn.losses import per_domain_bce
from recforge.nn.mlp import MLP, Activation


@dataclass
class SharedBottomConfig(SingleTaskConfig):
    embedding_dim: int = 10
    domains: list[str] = field(default_factory=lambda: ["target", "source"])  # one tower each
    domain_weights: list[float] | None = None  # loss weight per domain; None = 1 each
    bottom_hidden: list[int] = field(default_factory=lambda: [256])
    tower_hidden: list[int] = field(default_factory=lambda: [128])
    dropout: float = 0.0
    activation: Activation = "relu"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.domain_weights is not None and len(self.domain_weights) != len(self.domains):
            raise ModelConfigError(f"domain_weights: {len(self.domain_weights)} weights for {len(self.domains)} domains")


@register("shared_bottom")
class SharedBottom(SingleTaskModel):
    config_class = SharedBottomConfig
    paper = "Caruana, Multitask Learning, Machine Learning 1997"
    results_page = "docs/results/minet_movielens1m.md"

    def __init__(self, schema: Schema, config: SharedBottomConfig, side: dict[str, Tensor] | None = None) -> None:
        super().__init__(schema, config, side)
        if schema.domain is None:
            raise ModelConfigError("model.name: shared_bottom needs data with a domain column; this schema has none")
        weights = config.domain_weights or [1.0] * len(config.domains)
        self.domain_ids = [schema.domain_id(d) for d in config.domains]
        self.weights = dict(zip(self.domain_ids, weights))
        d = config.embedding_dim
        self.embedding = FeatureEmbedding(schema, d)
        in_dim = self.embedding.flat_dim
        self.bottom = MLP(in_dim, config.bottom_hidden, config.dropout, config.activation)
        self.towers = nn.ModuleList(
            MLP(self.bottom.out_dim, config.tower_hidden, config.dropout, config.activation, out_dim=1)
            for _ in config.domains
        )
        self.register_buffer("tower_of_domain", self._tower_lookup(schema), persistent=False)

    def _tower_lookup(self, schema: Schema) -> Tensor:
        """Tower index per domain id; domains without a tower use the first one."""
        lookup = torch.zeros(schema.vocab_size(schema.feature(schema.domain).vocab), dtype=torch.long)
        lookup[torch.tensor(self.domain_ids)] = torch.arange(len(self.domain_ids))
        return lookup

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        h = self.bottom(self.embedding.flat(batch))  # shared bottom: [B, H]
        logits = torch.cat([tower(h) for tower in self.towers], 1)  # every tower: [B, T]
        own = self.tower_of_domain[batch.domain]  # [B]
        return {self.predicted_label: logits.gather(1, own.unsqueeze(1)).squeeze(1)}  # the row's own tower: [B]

    def loss(self, outputs: dict[str, Tensor], batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        label = self.predicted_label
        total, parts = per_domain_bce(outputs[label], batch.labels[label], batch.domain, self.weights)
        names = dict(zip(self.domain_ids, self.config.domains))
        return total, detached({names[i]: v for i, v in parts.items()})
