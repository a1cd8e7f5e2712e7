"""Two-tower retrieval with in-batch sampled softmax and logQ correction.
Sampling-Bias-Corrected Neural Modeling for Large Corpus Item Recommendations.
Xinyang Yi, Ji Yang, Lichan Hong, Derek Zhiyuan Cheng, Lukasz Heldt, Aditee Kumthekar, Zhe Zhao,
Li Wei, Ed Chi. RecSys 2019.

Follows the paper: a user (query) tower and an item tower, both outputs L2-normalised, scored by
``s(x, y) = <u(x), v(y)> / tau``; the batch softmax uses the other items of the batch as
negatives with the corrected logit ``s^c(x_i, y_j) = s(x_i, y_j) - log(p_j)``, where ``p_j``, the
probability that item ``j`` is in a batch, comes from the streaming frequency estimator
(Algorithm 2): ``B[y] <- (1 - alpha) B[y] + alpha (t - A[y])``, ``A[y] <- t``, ``p = 1 / B[y]``.

Chosen here: the estimator keeps one slot per item id (no hashing); ``A`` and ``B`` start at 0
and ``B`` is clamped to >= 1 so ``p <= 1`` (an item first seen at step t starts at
``B = alpha t``, so items met in the first ``1 / alpha`` steps start at ``p = 1``); it is updated by each training-mode forward, never in
evaluation; ``tau = 0.05``, ``alpha = 0.01``, ``embedding_dim = 32``; an in-batch item equal to the row's positive is masked out
(it is not a negative); every row counts as one positive pair with weight 1 (the paper weights
by reward); the user tower is an MLP ``[128] -> 64`` over the ``user_features`` (categorical
ids embedded, numeric values as they are) and the mean of the ``history`` item embeddings
(when the schema has it); the item tower is an MLP ``[128] -> 64`` over the ``item_feature``
embedding only, so that ``item_embeddings()`` can embed the whole vocabulary.

Outputs: ``forward`` gives ``{"user": [B, D], "item": [B, D]}`` (normalised); ``logits`` gives the
corrected, masked in-batch logits the loss uses; ``user_embedding(batch)`` and
``item_embeddings()`` serve full-corpus evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recforge.data.batch import Batch
from recforge.data.schema import Kind, Schema
from recforge.errors import ModelConfigError
from recforge.models.base import Model, ModelConfig, detached, register
from recforge.models.capabilities import Retriever
from recforge.models.features import FeatureEmbedding
from recforge.nn.mlp import MLP, Activation


class FrequencyEstimator(nn.Module):
    """Streaming estimate of each item's per-batch probability (Yi et al. 2019, Algorithm 2).

    ``last_seen`` is A (the step an item was last in a batch), ``interval`` is B (the moving
    average of the steps between its appearances); ``p(y) = 1 / B[y]``. Buffers are saved with
    the model, so a resumed run keeps its estimates.
    """

    def __init__(self, num_items: int, alpha: float) -> None:
        super().__init__()
        self.alpha = alpha
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("last_seen", torch.zeros(num_items, dtype=torch.long))
        self.register_buffer("interval", torch.zeros(num_items))

    @torch.no_grad()
    def update(self, ids: Tensor) -> None:
        self.step += 1  # t
        ids = ids.unique()
        gap = (self.step - self.last_seen[ids]).float()  # t - A[y]
        self.interval[ids] = (1 - self.alpha) * self.interval[ids] + self.alpha * gap  # B[y]
        self.last_seen[ids] = self.step  # A[y] <- t

    def log_prob(self, ids: Tensor) -> Tensor:
        return -self.interval[ids].clamp(min=1.0).log()  # log p = -log B


@dataclass
class TwoTowerConfig(ModelConfig):
    embedding_dim: int = 32
    user_features: list[str] = field(default_factory=lambda: ["user_id"])  # categorical or numeric
    history: str = "hist_item_id"  # mean-pooled into the user tower when the schema has it
    item_feature: str = "item_id"
    hidden: list[int] = field(default_factory=lambda: [128])
    out_dim: int = 64
    activation: Activation = "relu"
    dropout: float = 0.0
    temperature: float = 0.05
    logq_correction: bool = True
    frequency_alpha: float = 0.01  # learning rate of the streaming frequency estimator


@register("two_tower")
class TwoTower(Model, Retriever):
    config_class = TwoTowerConfig
    paper = "Yi et al., Sampling-Bias-Corrected Neural Modeling for Large Corpus Item Recommendations, RecSys 2019"
    results_page = "docs/results/baselines.md"

    def __init__(self, schema: Schema, config: TwoTowerConfig, side: dict[str, Tensor] | None = None) -> None:
        super().__init__(schema, config, side)
        d = config.embedding_dim
        user = [schema.feature(name) for name in config.user_features]
        bad = [f.name for f in user if f.kind not in (Kind.CATEGORICAL, Kind.NUMERIC)]
        if bad:
            raise ModelConfigError(f"model.params.user_features: two_tower reads categorical or numeric features, not {bad}")
        self.user_categorical = [schema.categorical_index(f.name) for f in user if f.kind is Kind.CATEGORICAL]
        numeric = [f.name for f in schema.numeric]
        self.user_numeric = [numeric.index(f.name) for f in user if f.kind is Kind.NUMERIC]
        self.history = config.history if config.history in {f.name for f in schema.sequences} else None
        item = schema.feature(config.item_feature)
        if item.kind is not Kind.CATEGORICAL:
            raise ModelConfigError(f"model.params.item_feature: two_tower needs a categorical feature, {config.item_feature!r} is not one")
        if self.history is not None and schema.feature(self.history).vocab != item.vocab:
            raise ModelConfigError(f"model.params.history: two_tower needs {self.history!r} to share the vocabulary of {item.name!r}")
        self.item_index = schema.categorical_index(item.name)
        self.item_vocab = item.vocab
        self.num_items = schema.vocab_size(item.vocab)

        self.embedding = FeatureEmbedding(schema, d)
        user_in = (len(self.user_categorical) + (self.history is not None)) * d + len(self.user_numeric)
        self.user_tower = MLP(user_in, config.hidden, config.dropout, config.activation, out_dim=config.out_dim)
        self.item_tower = MLP(d, config.hidden, config.dropout, config.activation, out_dim=config.out_dim)
        self.frequency = FrequencyEstimator(self.num_items, config.frequency_alpha)

    @property
    def item_feature(self) -> str:
        return self.config.item_feature

    def user_embedding(self, batch: Batch) -> Tensor:
        parts = [self.embedding.fields(batch)[:, self.user_categorical].flatten(1)]  # [B, Fu * D]
        if self.history is not None:
            ids = batch.sequences[self.history]  # [B, L]
            count = (ids != 0).sum(1, keepdim=True).clamp(min=1)  # [B, 1]
            parts.append(self.embedding.sequence(batch, self.history).sum(1) / count)  # mean: [B, D]
        parts.append(batch.numeric[:, self.user_numeric])  # [B, Fn_u]
        return F.normalize(self.user_tower(torch.cat(parts, 1)), dim=-1)  # [B, out_dim]

    def _items(self, ids: Tensor) -> Tensor:
        return F.normalize(self.item_tower(self.embedding.lookup(ids, self.item_vocab)), dim=-1)  # [..., out_dim]

    def item_embeddings(self) -> Tensor:
        """Every id of the item vocabulary (row i = id i, padding and OOV included) -> [num_items, D]."""
        ids = torch.arange(self.num_items, device=self.frequency.interval.device)
        return torch.cat([self._items(chunk) for chunk in ids.split(65536)])

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        items = batch.categorical[:, self.item_index]  # [B]
        if self.training:
            self.frequency.update(items)
        return {"user": self.user_embedding(batch), "item": self._items(items)}

    def logits(self, outputs: dict[str, Tensor], batch: Batch) -> Tensor:
        """In-batch logits ``[B, B]``: row i's positive is column i; same-item columns are -inf."""
        items = batch.categorical[:, self.item_index]  # [B]
        s = outputs["user"] @ outputs["item"].T / self.config.temperature  # s(x_i, y_j): [B, B]
        if self.config.logq_correction:
            s = s - self.frequency.log_prob(items)  # s^c(x_i, y_j) = s(x_i, y_j) - log p_j
        duplicate = (items[:, None] == items[None, :]) & ~torch.eye(len(items), dtype=torch.bool, device=s.device)
        return s.masked_fill(duplicate, float("-inf"))

    def loss(self, outputs: dict[str, Tensor], batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        logits = self.logits(outputs, batch)  # [B, B]
        loss = F.cross_entropy(logits, torch.arange(len(logits), device=logits.device))
        return loss, detached({"softmax": loss})
