"""Experiment configs: YAML <-> pydantic, with ``--set a.b=c`` overrides.

An experiment names its data (a source and its options, a split), one model (a registered
name and hyper-parameters overriding its config defaults) and the trainer's settings.
Unknown keys are errors at every level.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from recforge.data.splits import SplitConfig
from recforge.errors import ConfigError, RecforgeError, did_you_mean

if TYPE_CHECKING:
    from recforge.train.trainer import TrainConfig


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


def problems(err: ValidationError, within: str = "") -> str:
    """A validation error in one line: ``key.path: message`` for each problem, the keys under ``within``.

    A rule of a whole section (a model validator, a dataclass's ``__post_init__``) has no key of its
    own; under ``within`` its message starts with the key it is about (``embedding_dim: must be ...``).
    """
    return "; ".join(_problem(e, within) for e in err.errors(include_url=False))


def _problem(error: Any, within: str) -> str:
    path = ".".join(str(p) for p in error["loc"])
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] not in ("value_error", "missing", "extra_forbidden"):
        message += f" (got {error['input']!r})"
    if not path:
        return f"{within}.{message}" if within else message
    key = f"{within}.{path}" if within else path
    return f"{key}: {message}"


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        dotted, equals, value = item.partition("=")
        keys = dotted.strip().split(".")
        if not equals or not all(keys):
            raise ConfigError(f"--set {item!r}: not of the form key=value (e.g. --set train.lr=0.001)")
        node = raw
        for key in keys[:-1]:
            if node.get(key) is None:
                node[key] = {}
            node = node[key]
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {key!r} is not a section")
        try:
            node[keys[-1]] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({getattr(err, 'problem', err)})") from None
    return raw


def read_mapping(path: Path, overrides: list[str], missing: str, not_mapping: str) -> dict[str, Any]:
    """The YAML mapping at ``path`` with ``overrides`` applied; ``missing`` / ``not_mapping`` complete the errors."""
    if not path.exists():
        raise ConfigError(f"{path}: {missing}")
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, not a YAML file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (not UTF-8)") from None
    except yaml.YAMLError as err:
        mark, opened = getattr(err, "problem_mark", None), getattr(err, "context_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        since = f" ({err.context} from line {opened.line + 1})" if opened is not None else ""
        raise ConfigError(f"{path}: {where}not valid YAML: {getattr(err, 'problem', None) or err}{since}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        kind = {list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}.get(type(raw), "a value")
        raise ConfigError(f"{path}: {not_mapping}, not {kind}")
    return apply_overrides(raw, overrides)


def train_config(settings: dict[str, Any]) -> "TrainConfig":
    """The trainer's settings from a config's ``train`` section; errors start with the key (``train.lr: ...``)."""
    from recforge.train.trainer import TrainConfig  # the trainer owns its settings

    known = list(TrainConfig.__dataclass_fields__)
    unknown = [key for key in settings if key not in known]
    if unknown:
        hints = [did_you_mean(key, known) for key in unknown]
        listing = "" if all(hints) else f"; known: {', '.join(known)}"
        raise ConfigError("; ".join(f"train.{key}: not a trainer setting{hint}" for key, hint in zip(unknown, hints)) + listing)
    try:
        return TrainConfig(**settings)
    except ValidationError as err:
        raise ConfigError(problems(err, "train")) from None


def resolve(config: ExperimentConfig) -> tuple[Any, "TrainConfig"]:
    """The model's config and the trainer's settings of ``config``, each checked; errors start with the key."""
    from recforge.models.base import make_config

    return make_config(config.model.name, config.model.params), train_config(config.train)


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """The experiment config at ``path`` with ``overrides``, its model and trainer settings checked."""
    path = Path(path)
    raw = read_mapping(path, overrides or [], "no such config file", "a config is a mapping of sections (name, data, model, train)")
    try:
        config = ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"{path}: {problems(err)}") from None
    try:
        resolve(config)
    except RecforgeError as err:
        raise type(err)(f"{path}: {err}") from None
    return config
