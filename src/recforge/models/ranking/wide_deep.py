"""Wide & Deep Learning for Recommender Systems.
Heng-Tze Cheng, Levent Koc, Jeremiah Harmsen, Tal Shaked, Tushar Chandra, et al. DLRS @ RecSys 2016,
arXiv:1606.07792.

    P(Y = 1 | x) = sigmoid(w_wide^T [x, phi(x)] + w_deep^T a^(lf) + b)                  (eq. 3)

Follows the paper: a wide linear model and a deep MLP over the field embeddings, trained jointly
and summed into one logit. [reconstructed] The wide part takes the raw sparse features only (a
weight per id, a list feature the mean of its items' weights, a weight per numeric feature):
the paper's hand-made cross-product transformations phi(x) are data-specific and left out.
Chosen defaults: ``embedding_dim=16``, ``hidden=[256, 128]``, ReLU, ``dropout=0.1``; one
optimiser for both parts (the paper used FTRL for the wide and AdaGrad for the deep part).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from recforge.data.batch import Batch
from recforge.data.schema import Schema
from recforge.models.base import SingleTaskModel, register
from recforge.models.features import FeatureEmbedding
from recforge.models.ranking.dnn import DNNConfig
from recforge.models.ranking.lr import FirstOrder
from recforge.nn.mlp import MLP


@dataclass
class WideDeepConfig(DNNConfig):
    """Wide & Deep has the DNN's settings (embedding size, MLP, label)."""


@register("wide_deep")
class WideDeep(SingleTaskModel):
    config_class = WideDeepConfig
    paper = "Cheng et al., Wide & Deep Learning for Recommender Systems, DLRS @ RecSys 2016, arXiv:1606.07792"
    results_page = "docs/results/gme_movielens1m.md"

    def __init__(self, schema: Schema, config: WideDeepConfig, side: dict[str, Tensor] | None = None) -> None:
        super().__init__(schema, config, side)
        d = config.embedding_dim
        self.wide = FirstOrder(schema)
        self.embedding = FeatureEmbedding(schema, d)
        in_dim = self.embedding.flat_dim
        self.deep = MLP(in_dim, config.hidden, config.dropout, config.activation, config.batch_norm, out_dim=1)

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        a = self.embedding.flat(batch)  # [B, in_dim]
        return {self.predicted_label: self.wide(batch) + self.deep(a).squeeze(-1)}  # eq. 3, as a logit
