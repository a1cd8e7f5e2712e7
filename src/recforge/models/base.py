"""The model contract and the registry.

A registered model is an ``nn.Module`` built from ``(schema, config, side)``:

- ``config`` is a dataclass of its hyper-parameters whose defaults follow the paper; its field
  types (``Literal`` choices included) are checked when it is built from plain values, and
  ``__post_init__`` checks what types cannot say, raising ``ModelConfigError("<field>: <problem>")``;
  a model's ``__init__`` raises ``ModelConfigError("model.params.<field>: ...")`` for parameters
  the data's schema cannot serve;
- ``side`` is the data a model needs beyond its weights (an interaction index, an item graph),
  computed once from the training data by ``side_data(store, config)`` and kept as named
  tensors, so that the model is rebuilt from its saved bundle alone.

``forward(batch)`` returns a dict with one logit tensor per task, keyed by label name, plus named
auxiliary tensors; ``loss(outputs, batch)`` returns the total loss and its named parts as
detached tensors (no host synchronisation per part). What else a model can do is declared by the
capability classes of :mod:`recforge.models.capabilities` it derives from.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar

import pydantic
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recforge.config import problems
from recforge.data.batch import Batch
from recforge.data.schema import Schema
from recforge.errors import ModelConfigError, did_you_mean
from recforge.models.capabilities import NeedsProtocol, Ranker
from recforge.models.features import FeatureEmbedding

if TYPE_CHECKING:
    from recforge.data.store import Store

_REGISTRY: dict[str, type["Model"]] = {}


@dataclasses.dataclass
class ModelConfig:
    """Base for every model's hyper-parameters."""

    embedding_dim: int = 16

    def __post_init__(self) -> None:
        if self.embedding_dim < 1:
            raise ModelConfigError(f"embedding_dim: must be >= 1, got {self.embedding_dim}")


class Model(nn.Module):
    """Base class of every registered model."""

    config_class: ClassVar[type] = ModelConfig
    registry_name: ClassVar[str]
    #: the paper the model follows (title and venue) and its results page, for the model zoo
    paper: ClassVar[str] = ""
    results_page: ClassVar[str] = ""

    def __init__(self, schema: Schema, config: Any, side: dict[str, Tensor] | None = None) -> None:
        super().__init__()
        self.schema = schema
        self.config = config
        self.side = dict(side or {})

    @classmethod
    def side_data(cls, store: "Store", config: Any) -> dict[str, Tensor]:
        """The tensors the model needs beyond its weights, computed from ``store``'s training data."""
        return {}

    def side_report(self) -> dict[str, float]:
        """Figures about the side data (codebook use, pair counts ...), written beside the run's metrics as ``side_<name>``."""
        return {}

    @classmethod
    def needs_side_data(cls) -> bool:
        return cls.side_data.__func__ is not Model.side_data.__func__  # type: ignore[attr-defined]

    def sparse_parameters(self) -> list[nn.Parameter]:
        """The embedding tables, trained by the row-wise sparse optimiser (every ``nn.Embedding``
        and ``nn.EmbeddingBag`` with ``sparse=True`` and every feature table); the rest is dense."""
        return [
            m.weight if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) else m.table.weight
            for m in self.modules()
            if (isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse) or isinstance(m, FeatureEmbedding)
        ]

    def loss(self, outputs: dict[str, Tensor], batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """Default: binary cross-entropy summed over every label the model predicts."""
        parts: dict[str, Tensor] = {}
        for label in self.schema.labels:
            if label in outputs:
                parts[label] = F.binary_cross_entropy_with_logits(outputs[label], batch.labels[label])
        total = torch.stack(list(parts.values())).sum()
        return total, detached(parts)


class RankingModel(Model, Ranker):
    """A model that predicts a probability per label from its logits.

    ``embedding`` is its table of field embeddings: a cold-start generator reads item attributes
    from it and writes the rows of new items into it.
    """

    embedding: FeatureEmbedding

    def predict(self, outputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """Probabilities per label from the forward outputs."""
        return {k: torch.sigmoid(outputs[k]) for k in self.schema.labels if k in outputs}


@dataclasses.dataclass
class SingleTaskConfig(ModelConfig):
    """Hyper-parameters of a ranker of one label."""

    label: str | None = None  # the label to predict; None = the schema's first label


class SingleTaskModel(RankingModel):
    """A ranker of one label, ``predicted_label``: the config's ``label``, or the schema's first label."""

    predicted_label: str

    def __init__(self, schema: Schema, config: SingleTaskConfig, side: dict[str, Tensor] | None = None) -> None:
        super().__init__(schema, config, side)
        label = config.label or schema.labels[0]
        if label not in schema.labels:
            raise ModelConfigError(f"model.params.label: {self.registry_name} predicts {label!r}, not one of the data's labels {schema.labels}")
        self.predicted_label = label


def detached(parts: dict[str, Tensor]) -> dict[str, Tensor]:
    """Loss parts as detached tensors: logged without a host synchronisation per part."""
    return {name: value.detach() for name, value in parts.items()}


def register(name: str):
    """Class decorator: make a model buildable by ``name``."""

    def wrap(cls: type[Model]) -> type[Model]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        cls.registry_name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def registered() -> dict[str, type[Model]]:
    import recforge.models  # noqa: F401  (imports every model module, filling the registry)

    return dict(sorted(_REGISTRY.items()))


def model_class(name: str) -> type[Model]:
    """The model registered as ``name``; an unknown name fails with the closest registered one."""
    models = registered()
    if name not in models:
        raise ModelConfigError(f"model.name: unknown model {name!r}{did_you_mean(name, models)}; `recforge models` lists them")
    return models[name]


def make_config(name: str, params: dict[str, Any] | None = None) -> Any:
    """The validated config of model ``name``: ``params`` over its defaults, each value checked
    against its field's type; a wrong key or value fails naming it (``model.params.<key>: ...``)."""
    cls = model_class(name)
    known = [f.name for f in dataclasses.fields(cls.config_class)]
    unknown = [key for key in params or {} if key not in known]
    if unknown:
        raise ModelConfigError("; ".join(
            f"model.params.{key}: not a parameter of {name}{did_you_mean(key, known) or '; `recforge models` lists them'}"
            for key in unknown
        ))  # fmt: skip
    try:
        return pydantic.TypeAdapter(cls.config_class).validate_python(dict(params or {}))
    except pydantic.ValidationError as err:
        raise ModelConfigError(problems(err, "model.params")) from None


def build_model(
    name: str,
    schema: Schema,
    params: dict[str, Any] | None = None,
    store: "Store | None" = None,
    side: dict[str, Tensor] | None = None,
) -> Model:
    """Build a registered model; ``params`` override its config defaults.

    A model with side data takes it from ``side`` (a bundle) or computes it from ``store``.
    """
    cls = model_class(name)
    config = make_config(name, params)
    if side is None and cls.needs_side_data():
        if store is None:
            raise ModelConfigError(f"model {name!r} needs side data computed from a store (or loaded from its bundle)")
        side = cls.side_data(store, config)
    return cls(schema, config, side)


def protocol_of(cls: type[Model]) -> str | None:
    """The study protocol a model needs, or None when ``recforge train`` trains it."""
    return cls.required_protocol if issubclass(cls, NeedsProtocol) else None
