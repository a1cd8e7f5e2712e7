"""DIN: Deep Interest Network for Click-Through Rate Prediction.
Guorui Zhou, Chengru Song, Xiaoqiang Zhu, Ying Fan, Han Zhu, Xiao Ma, Yanghui Yan, Junqi Jin,
Han Li, Kun Gai. KDD 2018, arXiv:1706.06978.

Follows the paper: the behaviour history ``e_1..e_H`` (``history``, e.g. ``hist_item_id``) is
pooled by the local activation unit against the candidate ``v_A`` (``target``, e.g. ``item_id``,
which shares the history's vocabulary and hence its embeddings):
``v_U(A) = sum_j a(e_j, v_A) e_j`` (eq. 3) with unnormalised weights and padding masked
(:class:`~recforge.nn.attention.TargetAttention`); the pooled vector is concatenated with every
other field embedding (user profile, candidate, context) and fed to an MLP ``[200, 80]`` with
Dice activations and a logit output.

Chosen here: the activation unit's MLP is ``[80, 40]`` (official code) with PReLU (paper's
fig. 2; the official code uses sigmoid); a single history of one id kind (the paper
concatenates goods and category ids); other list features (e.g. genres) are mean-pooled fields;
numeric features are concatenated to the MLP input; ``embedding_dim=16``; mini-batch aware
regularisation is not built (use the sparse optimiser's weight decay).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from recforge.data.batch import Batch
from recforge.data.schema import Kind, Schema
from recforge.errors import ModelConfigError
from recforge.models.base import SingleTaskConfig, SingleTaskModel, register
from recforge.models.features import FeatureEmbedding
from recforge.nn.attention import TargetAttention
from recforge.nn.mlp import MLP, Activation


@dataclass
class DINConfig(SingleTaskConfig):
    embedding_dim: int = 16
    history: str = "hist_item_id"  # the behaviour sequence attended over
    target: str = "item_id"  # the categorical feature it attends to (same vocabulary)
    attention_hidden: list[int] = field(default_factory=lambda: [80, 40])
    attention_activation: Activation = "prelu"
    attention_softmax: bool = False  # the paper: no softmax, keep interest intensity
    hidden: list[int] = field(default_factory=lambda: [200, 80])
    activation: Activation = "dice"
    dropout: float = 0.0


@register("din")
class DIN(SingleTaskModel):
    config_class = DINConfig
    paper = "Zhou et al., Deep Interest Network for Click-Through Rate Prediction, KDD 2018, arXiv:1706.06978"
    results_page = "docs/results/baselines.md"

    def __init__(self, schema: Schema, config: DINConfig, side: dict[str, Tensor] | None = None) -> None:
        super().__init__(schema, config, side)
        history, target = schema.feature(config.history), schema.feature(config.target)
        if history.kind is not Kind.SEQUENCE or target.kind is not Kind.CATEGORICAL or history.vocab != target.vocab:
            raise ModelConfigError(
                f"model.params.history: din needs history {config.history!r} a sequence and target {config.target!r} "
                "a categorical feature of the same vocabulary"
            )
        self.target_index = schema.categorical_index(config.target)
        self.other_sequences = [i for i, f in enumerate(schema.sequences) if f.name != config.history]
        d = config.embedding_dim
        self.embedding = FeatureEmbedding(schema, d)
        self.attention = TargetAttention(
            d, config.attention_hidden, config.attention_activation, config.attention_softmax
        )
        in_dim = (len(schema.categorical) + len(self.other_sequences) + 1) * d + len(schema.numeric)
        self.mlp = MLP(in_dim, config.hidden, config.dropout, config.activation, out_dim=1)

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        fields = self.embedding.fields(batch)  # [B, F, D]
        target = fields[:, self.target_index]  # v_A: [B, D]
        history = self.embedding.sequence(batch, self.config.history)  # e_j: [B, L, D]
        mask = batch.sequences[self.config.history] != 0  # [B, L]
        interest = self.attention(history, target, mask)  # v_U(A) = sum_j a(e_j, v_A) e_j: [B, D]
        lists = self.embedding.pooled_sequences(batch)[:, self.other_sequences]  # [B, S - 1, D]
        x = torch.cat([fields.flatten(1), lists.flatten(1), interest, batch.numeric], 1)  # [B, in_dim]
        return {self.predicted_label: self.mlp(x).squeeze(-1)}  # [B]
