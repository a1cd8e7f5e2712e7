"""What a model can do, declared by the base classes it derives from (never probed with ``hasattr``).

The trainer picks an evaluator from these, the study protocols pick what to run, serving picks
what to export:

- :class:`Ranker`: one probability per predicted label (``predict``): pointwise AUC, GAUC,
  LogLoss.
- :class:`Funnel`: a ranker that predicts a click, a post-click conversion and their product
  ``ctcvr``: the conversion is scored on the clicked rows only, ``ctcvr`` on every row.
- :class:`Retriever`: a user vector per row and a vector per item of the item vocabulary, scored
  by the dot product: full-corpus or sampled ranking.
- :class:`EmbeddingGenerator`: a module that writes initial ID embeddings of new items into a
  ranker's table (cold start); it trains only under the ``cold_start`` protocol.
- :class:`FederatedSplit`: which parameters are global (averaged by the server) and which stay
  on the client.
- :class:`Pretrainable`: fine-tuned from a pretrained model of its own class, whose tables it
  restores (the ``pretrain_finetune`` protocol).
- :class:`Searcher`: a search stage keeps K events of a long history per head; its recall of the
  truly relevant events is measured on simulated data (the ``lifelong_recall`` protocol).

Each capability is an abstract base: a model class that declares one without implementing its
methods cannot be built. A model that cannot train by the plain ``recforge train`` loop names the
protocol it needs in ``required_protocol``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from torch import Tensor, nn

from recforge.data.batch import Batch


class Ranker(ABC):
    """Predicts one probability per label: ``predict(outputs) -> {label: [B]}``."""

    @abstractmethod
    def predict(self, outputs: dict[str, Tensor]) -> dict[str, Tensor]:
        ...


class Funnel(Ranker):
    """A click -> conversion funnel: ``predict`` holds the click, the conversion and ``ctcvr``."""

    @abstractmethod
    def funnel_labels(self) -> tuple[str, str] | None:
        """``(click label, conversion label)``, or None when this instance predicts no funnel."""


class Retriever(ABC):
    """Dot-product retrieval: ``user_embedding(batch) -> [B, D]``, ``item_embeddings() -> [I, D]``
    (row i = id i of the vocabulary of ``item_feature``)."""

    item_feature: str

    @abstractmethod
    def user_embedding(self, batch: Batch) -> Tensor:
        ...

    @abstractmethod
    def item_embeddings(self) -> Tensor:
        ...


class EmbeddingGenerator(ABC):
    """Generates initial ID embeddings: ``generate(items [n], table) -> [n, D]``."""

    @abstractmethod
    def generate(self, items: Tensor, table: nn.Module) -> Tensor:
        ...


class FederatedSplit(ABC):
    """Names of the parameters the server aggregates; every other parameter stays on the client."""

    @abstractmethod
    def global_parameter_names(self) -> list[str]:
        ...


class Pretrainable(ABC):
    """Fine-tuned from a pretrained model of its own class (the ``pretrain_finetune`` protocol):
    ``restore_pretrained(source)`` copies the pretrained tables into this model."""

    @abstractmethod
    def restore_pretrained(self, source: nn.Module) -> None:
        ...


class Searcher(ABC):
    """Scores a long history through a search stage: ``searched(batch)`` gives the events it kept,
    (index [B, H, K] into the history, valid [B, H, K]), one set per head."""

    @abstractmethod
    def searched(self, batch: Batch) -> tuple[Tensor, Tensor]:
        ...


class NeedsProtocol:
    """A model that trains only under a study protocol (``recforge study`` with ``protocol: <name>``)."""

    required_protocol: ClassVar[str]


def capabilities(model_class: type) -> list[str]:
    """The capability names a model class declares, in a fixed order."""
    names = {"ranker": Ranker, "funnel": Funnel, "retriever": Retriever, "embedding generator": EmbeddingGenerator,
             "federated split": FederatedSplit, "pretrainable": Pretrainable, "searcher": Searcher}  # fmt: skip
    return [name for name, cls in names.items() if issubclass(model_class, cls)]
