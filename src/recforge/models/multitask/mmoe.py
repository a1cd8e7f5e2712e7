"""MMoE: Modeling Task Relationships in Multi-task Learning with Multi-gate Mixture-of-Experts.
Jiaqi Ma, Zhe Zhao, Xinyang Yi, Jilin Chen, Lichan Hong, Ed H. Chi. KDD 2018.

Follows the paper: shared experts ``f_i``, one softmax gate per task ``g^k(x) = softmax(W_gk x)``
and one tower per task, ``y_k = h^k(sum_i g^k(x)_i f_i(x))``
(:class:`~recforge.nn.experts.MixtureOfExperts`); the loss is the sum of the per-task BCEs, each
task trained on every row. Chosen defaults: 4 experts of ``[128]``, towers ``[64]``, ReLU,
``embedding_dim=16``; the input is the concatenation of the field embeddings (list features
mean-pooled), and the numeric features.

Outputs: one logit per label (``labels``, default all the schema's labels); ``predict`` gives the
probability per label and, when both ``click_label`` and ``conversion_label`` are predicted (a
funnel: ``funnel_labels()``), ``ctcvr``. Funnel semantics: the conversion tower is trained on ALL exposures against the
conversion label, which is 0 on unclicked rows, so its probability already estimates
``p(click & conversion | x)`` = pCTCVR, not the post-click pCVR. Hence ``ctcvr`` is that
probability itself, NOT ``p(click) * p(conversion)`` (which would count the click twice); the
``conversion`` entry means the same thing. For a post-click pCVR use ESMM.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from recforge.data.batch import Batch
from recforge.data.schema import Schema
from recforge.errors import ModelConfigError
from recforge.models.base import ModelConfig, RankingModel, register
from recforge.models.capabilities import Funnel
from recforge.models.features import FeatureEmbedding
from recforge.nn.experts import MixtureOfExperts
from recforge.nn.mlp import MLP, Activation


@dataclass
class MMoEConfig(ModelConfig):
    embedding_dim: int = 16
    labels: list[str] | None = None  # tasks; None = every label of the schema
    num_experts: int = 4
    expert_hidden: list[int] = field(default_factory=lambda: [128])
    tower_hidden: list[int] = field(default_factory=lambda: [64])
    dropout: float = 0.0
    activation: Activation = "relu"
    click_label: str = "click"
    conversion_label: str = "conversion"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.click_label == self.conversion_label:
            raise ModelConfigError(f"conversion_label: must differ from click_label, both are {self.click_label!r}")


@register("mmoe")
class MMoE(RankingModel, Funnel):
    config_class = MMoEConfig
    paper = "Ma et al., Modeling Task Relationships in Multi-task Learning with Multi-gate Mixture-of-Experts, KDD 2018"
    results_page = "docs/results/baselines.md"

    def __init__(self, schema: Schema, config: MMoEConfig, side: dict[str, Tensor] | None = None) -> None:
        super().__init__(schema, config, side)
        self.labels = list(config.labels or schema.labels)
        unknown = [label for label in self.labels if label not in schema.labels]
        if unknown:
            raise ModelConfigError(f"model.params.labels: mmoe predicts {unknown}, not among the data's labels {schema.labels}")
        self.embedding = FeatureEmbedding(schema, config.embedding_dim)
        in_dim = self.embedding.flat_dim
        self.moe = MixtureOfExperts(
            in_dim, config.num_experts, len(self.labels), config.expert_hidden, config.dropout, config.activation
        )
        self.towers = nn.ModuleList(
            MLP(self.moe.out_dim, config.tower_hidden, config.dropout, config.activation, out_dim=1)
            for _ in self.labels
        )

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        x = self.embedding.flat(batch)  # [B, in_dim]
        mixed = self.moe(x)  # per task f^k(x): [B, H]
        return {label: tower(h).squeeze(-1) for label, tower, h in zip(self.labels, self.towers, mixed)}  # y_k: [B]

    def funnel_labels(self) -> tuple[str, str] | None:
        pair = (self.config.click_label, self.config.conversion_label)
        return pair if set(pair) <= set(self.labels) else None

    def predict(self, outputs: dict[str, Tensor]) -> dict[str, Tensor]:
        probs = super().predict(outputs)
        if self.funnel_labels() is not None:
            probs["ctcvr"] = probs[self.config.conversion_label]  # trained on all exposures: p(click & conversion)
        return probs
