"""Study protocols: what one run of a study does, as plug-ins registered by name.

A protocol has typed parameters (a pydantic model, unknown keys fail) and one method,
``run(cell, out) -> records``: it trains and evaluates the run described by ``cell`` in the
folder ``out`` and returns long-format records ``{split, metric, value, group}`` (``group``: a
mapping of names to text, e.g. a domain, a warm-up phase or a method). The study engine owns
everything around it (grids, fingerprints, claiming, resume, aggregation, pages) and never
looks inside a protocol.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from recforge.config import ConfigError, ExperimentConfig
from recforge.errors import did_you_mean

_PROTOCOLS: dict[str, type["Protocol"]] = {}


class Params(BaseModel):
    """Base of a protocol's parameter section."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


@dataclasses.dataclass
class Cell:
    """One run of a study: labels for the tables and the experiment it resolves to."""

    dataset: str
    variant: str
    seed: int
    config: ExperimentConfig
    group: dict[str, str]  # set by the grid (e.g. a sweep point): added to every record
    extra: dict[str, Any]  # the variant's protocol-specific settings
    store_root: Path


def record(split: str, metric: str, value: float, **group: str) -> dict[str, Any]:
    return {"split": split, "metric": metric, "value": float(value), "group": dict(group)}


class Protocol(ABC):
    name: ClassVar[str]
    Params: ClassVar[type[Params]] = Params
    #: settings a variant may carry for this protocol (validated per variant)
    VariantParams: ClassVar[type[Params]] = Params

    def __init__(self, params: Params) -> None:
        self.params = params

    @abstractmethod
    def run(self, cell: Cell, out: Path) -> list[dict[str, Any]]: ...


def register_protocol(cls: type[Protocol]) -> type[Protocol]:
    if cls.name in _PROTOCOLS:
        raise ValueError(f"protocol {cls.name!r} registered twice")
    _PROTOCOLS[cls.name] = cls
    return cls


def protocols() -> dict[str, type[Protocol]]:
    from recforge.protocols import cold_start, cross_domain, entire_space_cvr, pretrain_finetune, standard  # noqa: F401

    return dict(_PROTOCOLS)


def get_protocol(name: str) -> type[Protocol]:
    known = protocols()
    if name not in known:
        raise ConfigError(f"unknown protocol {name!r}{did_you_mean(name, known)}; known: {sorted(known)}")
    return known[name]
