"""Experiment configs: YAML <-> pydantic, with ``--set a.b=c`` overrides.

An experiment names its data (a source and its options, a split), one model (a registered
name and hyper-parameters overriding its config defaults) and the trainer's settings.
Unknown keys are errors at every level.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from recforge.data.splits import SplitConfig
from recforge.errors import ConfigError


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: str
    options: dict[str, Any] = Field(default_factory=dict)
    split: SplitConfig = Field(default_factory=SplitConfig)
    store: str | None = None  # where the encoded store lives; default: a folder keyed by this section

    def fingerprint(self) -> str:
        payload = self.model_dump(exclude={"store"}, mode="json")
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]

    def store_path(self, root: Path = Path("runs/stores")) -> Path:
        return Path(self.store) if self.store else root / f"{self.source}-{self.fingerprint()}"


class ModelSection(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class ExperimentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    data: DataConfig
    model: ModelSection
    train: dict[str, Any] = Field(default_factory=dict)  # checked against TrainConfig


def problems(err: ValidationError) -> str:
    """A validation error in one line: ``key.path: message`` for each problem."""
    return "; ".join(
        ": ".join(x for x in (".".join(str(p) for p in e["loc"]), e["msg"].removeprefix("Value error, ")) if x)
        for e in err.errors(include_url=False)
    )


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        dotted, value = item.split("=", 1)
        keys = dotted.strip().split(".")
        node = raw
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {key!r} is not a section")
        node[keys[-1]] = yaml.safe_load(value)
    return raw


def read_mapping(path: Path, overrides: list[str], missing: str, not_mapping: str) -> dict[str, Any]:
    """The YAML mapping at ``path`` with ``overrides`` applied; ``missing`` / ``not_mapping`` complete the errors."""
    if not path.exists():
        raise ConfigError(f"{path}: {missing}")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: {not_mapping}")
    return apply_overrides(raw, overrides)


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    path = Path(path)
    raw = read_mapping(path, overrides or [], "no such config file", "a config is a mapping of sections")
    try:
        config = ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"{path}: {problems(err)}") from None
    from recforge.train.trainer import TrainConfig  # the trainer owns its settings

    known = set(TrainConfig.__dataclass_fields__)
    unknown = set(config.train) - known
    if unknown:
        raise ConfigError(f"{path}: train: unknown key(s) {sorted(unknown)}; known: {sorted(known)}")
    return config
