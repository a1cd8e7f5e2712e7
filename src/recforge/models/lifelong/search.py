"""Two-stage lifelong-sequence rankers: a general search unit (GSU) picks K of the L events of a
long history, an exact search unit (ESU) attends over them. One file per paper's GSU:

- SIM (Pi et al., Search-based User Interest Modeling with Lifelong Sequential Behavior Data for
  CTR Prediction, CIKM 2020, arXiv:2006.05639): ``sim_hard``, the last K events sharing the
  target's attribute (category search); ``sim_soft``, the top K by the inner product of the
  target's and the events' embeddings;
- ETA (Chen et al., Efficient Long Sequential User Data Modeling for Click-Through Rate
  Prediction, arXiv:2108.04468): the top K by the Hamming distance of SimHash signatures;
- TWIN (Chang et al., TWIN: TWo-stage Interest Network for Lifelong User Behavior Modeling in CTR
  Prediction at Kuaishou, KDD 2023, arXiv:2302.02352): the top K by the ESU's own attention scores
  (consistent GSU and ESU), per head;
- QIN (Guo et al., Query-dominant User Interest Network for Large-Scale Search Ranking, CIKM 2023,
  arXiv:2308.06501): the top K by relevance to the current query (the target item when the
  row has no query), then attention over the query and target fused.

Shared here: every field embedding, the ESU ``u`` (multi-head softmax target attention over the
selected events, :meth:`~recforge.nn.longseq.MultiHeadSearch.attend`; TWIN searches with its heads) and an MLP over
``[fields; lists; u; e_t]`` with ReLU. Chosen here [reconstructed]: the soft search and SimHash
read the same item embeddings as the ESU, without gradient (SIM trains a separate GSU embedding
with an auxiliary loss; ETA hashes the ESU embeddings, as here); SimHash planes are fixed at
initialisation (seeded by ``hash_seed``) and saved with the weights; the signatures of the history
are computed per batch from the current embeddings (a server would store them per item).
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from recforge.data.batch import Batch
from recforge.data.schema import Kind, Schema
from recforge.errors import ModelConfigError
from recforge.models.base import SingleTaskConfig, SingleTaskModel, register
from recforge.models.capabilities import Searcher
from recforge.models.features import FeatureEmbedding
from recforge.nn.longseq import MultiHeadSearch, SimHash, gather_events, top_k
from recforge.nn.mlp import MLP

if TYPE_CHECKING:
    from recforge.data.store import Store


@dataclass
class SearchConfig(SingleTaskConfig):
    embedding_dim: int = 16
    history: str = "hist_item_id"
    target: str = "item_id"
    top_k: int = 50  # K events kept by the GSU
    heads: int = 4  # of the ESU
    hidden: list[int] = field(default_factory=lambda: [200, 80])
    dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.top_k < 1 or self.heads < 1:
            raise ModelConfigError(f"top_k: top_k and heads must be >= 1, got {self.top_k} and {self.heads}")


class SearchRanker(SingleTaskModel):
    """A GSU (:meth:`select`) then an ESU over a long history, scored by an MLP."""

    config_class = SearchConfig
    results_page = "docs/results/seminar.md"

    def __init__(self, schema: Schema, config: SearchConfig, side: dict[str, Tensor] | None = None) -> None:
        super().__init__(schema, config, side)
        history, target = schema.feature(config.history), schema.feature(config.target)
        if history.kind is not Kind.SEQUENCE or target.kind is not Kind.CATEGORICAL or history.vocab != target.vocab:
            raise ModelConfigError(
                f"model.params.history: {self.registry_name} needs history {config.history!r} a sequence and target "
                f"{config.target!r} a categorical feature of the same vocabulary"
            )
        self.target_index = schema.categorical_index(config.target)
        self.history_names = {f.name for f in schema.histories}
        own = self.own_sequences(config)
        self.other_sequences = [i for i, f in enumerate(schema.sequences) if f.name not in self.history_names | own]
        d = config.embedding_dim
        self.embedding = FeatureEmbedding(schema, d)
        self.esu = MultiHeadSearch(d, config.heads, config.top_k)  # its attend() is the ESU
        in_dim = (len(schema.categorical) + len(self.other_sequences) + 1) * d + len(schema.numeric)
        self.mlp = MLP(in_dim, config.hidden, config.dropout, "relu", out_dim=1)

    @staticmethod
    def own_sequences(config: SearchConfig) -> set[str]:
        """Sequences the model reads itself, not pooled into the MLP's input (beside the histories)."""
        return set()

    @abstractmethod
    def interest(self, batch: Batch, target: Tensor, history: Tensor, mask: Tensor) -> Tensor:
        """The user's interest in the target: ``[B, D], [B, L, D], [B, L] -> [B, D]``."""

    def history(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """(the history's embeddings [B, L, D], its mask [B, L])."""
        return self.embedding.sequence(batch, self.config.history), batch.sequences[self.config.history] != 0

    def inputs(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        """(e_t [B, D], the history's embeddings [B, L, D], its mask [B, L])."""
        target = self.embedding.lookup(batch.categorical[:, self.target_index], self.schema.feature(self.config.target).vocab)
        return target, *self.history(batch)

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        fields = self.embedding.fields(batch)  # [B, F, D]
        target = fields[:, self.target_index]  # e_t: [B, D]
        history, mask = self.history(batch)  # [B, L, D], [B, L]
        u = self.interest(batch, target, history, mask)  # [B, D]
        lists = self.embedding.pooled_sequences(batch)[:, self.other_sequences]  # [B, S, D]
        x = torch.cat([fields.flatten(1), lists.flatten(1), u, batch.numeric], 1)
        return {self.predicted_label: self.mlp(x).squeeze(-1)}  # [B]


class SelectThenAttend(SearchRanker, Searcher):
    """GSU indices from :meth:`select`, then the ESU over the selected events."""

    @abstractmethod
    def select(self, batch: Batch, target: Tensor, history: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """-> (index [B, K], valid [B, K])."""

    def interest(self, batch: Batch, target: Tensor, history: Tensor, mask: Tensor) -> Tensor:
        index, valid = self.select(batch, target, history, mask)
        return self.esu.attend(target, gather_events(history, index), valid)

    def searched(self, batch: Batch) -> tuple[Tensor, Tensor]:
        target, history, mask = self.inputs(batch)
        index, valid = self.select(batch, target, history, mask)
        return index.unsqueeze(1), valid.unsqueeze(1)  # one head


# --- SIM ----------------------------------------------------------------------------------------
@dataclass
class SIMHardConfig(SearchConfig):
    attribute: str = "category"  # the categorical item field searched by (the paper: category)


@register("sim_hard")
class SIMHard(SelectThenAttend):
    """SIM, hard search: the last K events whose item shares the target's ``attribute``."""

    config_class = SIMHardConfig
    paper = "Pi et al., Search-based User Interest Modeling with Lifelong Sequential Behavior Data for CTR Prediction, CIKM 2020, arXiv:2006.05639"

    @classmethod
    def side_data(cls, store: "Store", config: SIMHardConfig) -> dict[str, Tensor]:
        """``attribute`` [V]: the attribute id of every item."""
        _check_attribute(store.schema, config)
        return {"attribute": torch.from_numpy(store.item_features(config.target, [config.attribute])[config.attribute])}

    def __init__(self, schema: Schema, config: SIMHardConfig, side: dict[str, Tensor] | None = None) -> None:
        super().__init__(schema, config, side)
        _check_attribute(schema, config)
        if "attribute" not in self.side:
            raise ValueError("sim_hard: side data lacks 'attribute' (SIMHard.side_data(store, config) gives it)")
        self.register_buffer("attribute", self.side["attribute"], persistent=False)  # [V]

    def select(self, batch: Batch, target: Tensor, history: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        items = batch.sequences[self.config.history]  # [B, L], oldest first
        same = self.attribute[items] == self.attribute[batch.categorical[:, self.target_index]].unsqueeze(1)  # [B, L]
        recency = torch.arange(items.shape[1], device=items.device, dtype=torch.float32).expand_as(items)
        return top_k(recency, mask & same, self.config.top_k)


def _check_attribute(schema: Schema, config: SIMHardConfig) -> None:
    if config.attribute not in {f.name for f in schema.categorical}:
        raise ModelConfigError(f"model.params.attribute: sim_hard searches by a categorical item field, not {config.attribute!r}")


@register("sim_soft")
class SIMSoft(SelectThenAttend):
    """SIM, soft search: the top K events by ``e_t · e_l`` (embeddings without gradient)."""

    paper = SIMHard.paper

    def select(self, batch: Batch, target: Tensor, history: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        scores = torch.einsum("bd,bld->bl", target.detach(), history.detach())  # [B, L]
        return top_k(scores, mask, self.config.top_k)


# --- ETA ----------------------------------------------------------------------------------------
@dataclass
class ETAConfig(SearchConfig):
    hash_bits: int = 64  # m hyperplanes (a multiple of 64)
    hash_seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.hash_bits < 64 or self.hash_bits % 64:
            raise ModelConfigError(f"hash_bits: a positive multiple of 64, got {self.hash_bits}")


@register("eta")
class ETA(SelectThenAttend):
    """ETA: the top K events by the Hamming distance of SimHash signatures ``sign(R e)``."""

    config_class = ETAConfig
    paper = "Chen et al., Efficient Long Sequential User Data Modeling for Click-Through Rate Prediction, arXiv:2108.04468"

    def __init__(self, schema: Schema, config: ETAConfig, side: dict[str, Tensor] | None = None) -> None:
        super().__init__(schema, config, side)
        self.hash = SimHash(config.embedding_dim, config.hash_bits, config.hash_seed)

    def select(self, batch: Batch, target: Tensor, history: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            return self.hash.select(self.hash.signatures(target), self.hash.signatures(history), mask, self.config.top_k)


# --- TWIN ---------------------------------------------------------------------------------------
@register("twin")
class TWIN(SearchRanker, Searcher):
    """TWIN: the GSU ranks events by the ESU's own multi-head attention scores (consistent search)."""

    paper = "Chang et al., TWIN: TWo-stage Interest Network for Lifelong User Behavior Modeling in CTR Prediction at Kuaishou, KDD 2023, arXiv:2302.02352"

    def interest(self, batch: Batch, target: Tensor, history: Tensor, mask: Tensor) -> Tensor:
        return self.esu(target, history, mask)

    def searched(self, batch: Batch) -> tuple[Tensor, Tensor]:
        return self.esu.select(*self.inputs(batch))


# --- QIN ----------------------------------------------------------------------------------------
@dataclass
class QINConfig(SearchConfig):
    query: str | None = None  # the row's query tokens (a list feature of the history's query vocabulary); None = no query
    query_history: str | None = None  # the events' query tokens (a list timeline, e.g. hist_query); None = items only


@register("qin")
class QIN(SearchRanker, Searcher):
    """QIN: the relevance search unit keeps the K events most similar to the current query (the
    target item for a row without one), matching both the event's item and its query; the fused
    attention unit attends with the query and the target summed."""

    config_class = QINConfig
    paper = "Guo et al., Query-dominant User Interest Network for Large-Scale Search Ranking, CIKM 2023, arXiv:2308.06501"

    def __init__(self, schema: Schema, config: QINConfig, side: dict[str, Tensor] | None = None) -> None:
        super().__init__(schema, config, side)
        for key in ("query", "query_history"):
            name = getattr(config, key)
            if name is not None and name not in {f.name for f in schema.sequences}:
                raise ModelConfigError(f"model.params.{key}: qin needs {name!r} a sequence of query tokens")

    @staticmethod
    def own_sequences(config: QINConfig) -> set[str]:
        return {config.query} - {None}

    def _query(self, batch: Batch, name: str) -> tuple[Tensor, Tensor]:
        tokens = batch.sequences[name]  # [B, W] or [B, L, W]
        real = (tokens != 0).unsqueeze(-1)
        e = (self.embedding.sequence(batch, name) * real).sum(-2) / real.sum(-2).clamp(min=1)  # masked mean
        return e, real.squeeze(-1).any(-1)  # [..., D], has a query

    def relevant(self, batch: Batch, target: Tensor, history: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The relevance search unit: (the probe [B, D], index [B, K], valid [B, K])."""
        cfg = self.config
        probe = target
        if cfg.query is not None:
            e_q, has = self._query(batch, cfg.query)  # [B, D], [B]
            probe = torch.where(has.unsqueeze(-1), e_q, target)  # rows without a query search by the target
        events = history
        if cfg.query_history is not None:
            events = history + self._query(batch, cfg.query_history)[0]  # item + its query: [B, L, D]
        scores = torch.einsum("bd,bld->bl", probe, events)  # relevance to the query: [B, L]
        return probe, *top_k(scores, mask, cfg.top_k)

    def interest(self, batch: Batch, target: Tensor, history: Tensor, mask: Tensor) -> Tensor:
        probe, index, valid = self.relevant(batch, target, history, mask)
        return self.esu.attend(probe + target, gather_events(history, index), valid)  # fused query and target

    def searched(self, batch: Batch) -> tuple[Tensor, Tensor]:
        _, index, valid = self.relevant(batch, *self.inputs(batch))
        return index.unsqueeze(1), valid.unsqueeze(1)
