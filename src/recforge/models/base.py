"""The model contract and the registry.

A model is an ``nn.Module`` built from ``(schema, config)``; ``config`` is a dataclass of its
hyper-parameters whose defaults follow the paper. ``forward(batch)`` returns a dict with one
logit tensor per task, keyed by label name, plus named auxiliary tensors; ``loss(outputs,
batch)`` returns the total loss and its named parts as floats.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recforge.data.batch import Batch
from recforge.data.schema import Schema

_REGISTRY: dict[str, type["Model"]] = {}


@dataclasses.dataclass
class ModelConfig:
    """Base for every model's hyper-parameters."""

    embedding_dim: int = 16


class Model(nn.Module):
    """Base class of every recforge model."""

    config_class: ClassVar[type[ModelConfig]] = ModelConfig
    #: "ranking" models output one logit per label; "retrieval" models also expose
    #: ``user_embedding(batch)`` and ``item_embeddings()`` for full-corpus evaluation.
    task: ClassVar[str] = "ranking"

    def __init__(self, schema: Schema, config: ModelConfig) -> None:
        super().__init__()
        self.schema = schema
        self.config = config

    def label_to_predict(self, label: str | None) -> str:
        """The label a single-task model predicts: ``label``, or the schema's first label."""
        label = label or self.schema.labels[0]
        if label not in self.schema.labels:
            raise ValueError(f"{type(self).__name__}: label {label!r} is not one of the schema's labels {self.schema.labels}")
        return label

    def loss(self, outputs: dict[str, Tensor], batch: Batch) -> tuple[Tensor, dict[str, float]]:
        """Default: binary cross-entropy summed over every label the model predicts."""
        parts: dict[str, Tensor] = {}
        for label in self.schema.labels:
            if label in outputs:
                parts[label] = F.binary_cross_entropy_with_logits(outputs[label], batch.labels[label])
        total = torch.stack(list(parts.values())).sum()
        return total, {k: float(v.detach()) for k, v in parts.items()}

    def predict(self, outputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """Probabilities per label from the forward outputs."""
        return {k: torch.sigmoid(outputs[k]) for k in self.schema.labels if k in outputs}


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


def build_model(name: str, schema: Schema, params: dict[str, Any] | None = None) -> Model:
    """Build a registered model; ``params`` override its config defaults (unknown keys fail)."""
    models = registered()
    if name not in models:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(models)}")
    cls = models[name]
    known = {f.name for f in dataclasses.fields(cls.config_class)}
    unknown = set(params or {}) - known
    if unknown:
        raise ValueError(f"model {name!r}: unknown config keys {sorted(unknown)}; known: {sorted(known)}")
    return cls(schema, cls.config_class(**(params or {})))
