"""DNN: the embedding-and-MLP CTR model, the baseline every deep CTR paper starts from.

As in YouTube-DNN (Covington et al., RecSys 2016) and the "DNN" rows of the CTR papers this
library implements (GME, MiNet): every field is embedded, the embeddings and numeric features
are concatenated and fed to an MLP whose output is the logit. A list feature (genres, a
history) is one field, the mean of its items' embeddings. Chosen defaults: ``embedding_dim=16``,
``hidden=[256, 128]``, ReLU, ``dropout=0.1``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from recforge.data.batch import Batch
from recforge.data.schema import Schema
from recforge.models.base import SingleTaskConfig, SingleTaskModel, register
from recforge.models.features import FeatureEmbedding
from recforge.nn.mlp import MLP, Activation


@dataclass
class DNNConfig(SingleTaskConfig):
    embedding_dim: int = 16
    hidden: list[int] = field(default_factory=lambda: [256, 128])
    dropout: float = 0.1
    activation: Activation = "relu"
    batch_norm: bool = False


@register("dnn")
class DNN(SingleTaskModel):
    config_class = DNNConfig
    paper = "Covington et al., Deep Neural Networks for YouTube Recommendations, RecSys 2016"
    results_page = "docs/results/minet_movielens1m.md"

    def __init__(self, schema: Schema, config: DNNConfig, side: dict[str, Tensor] | None = None) -> None:
        super().__init__(schema, config, side)
        d = config.embedding_dim
        self.embedding = FeatureEmbedding(schema, d)
        in_dim = self.embedding.flat_dim
        self.deep = MLP(in_dim, config.hidden, config.dropout, config.activation, config.batch_norm, out_dim=1)

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        x = self.embedding.flat(batch)  # [B, in_dim]
        return {self.predicted_label: self.deep(x).squeeze(-1)}
