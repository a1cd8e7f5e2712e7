"""The one study dialect: data sets x variants x seeds (x an optional sweep) under one protocol.

```yaml
name: minet_movielens1m            # names the records file and the page marker
title: MiNet against its baselines
protocol: standard                 # a registered protocol; `params:` is its typed section
params: {}
seeds: [0, 1, 2]
seed_keys: [train.seed]            # where each run's seed is written
defaults: {data: {...}, model: {...}, train: {...}}   # sections every run starts from
datasets:                          # optional: label + data section
  - {label: Sport-Phone, data: {source: amazon-cross-sport-phone, options: {...}}}
variants:                          # each: an experiment config and / or inline sections, overrides
  - {label: DNN, config: movielens1m_dnn.yaml, set: [model.params.dropout=0.2], group: main}
sweep: {dataset: Funnel simulator, key: data.options.selection_bias, values: [0.0, 1.0]}
reference: DNN                     # default reference of the tables' deltas
tables: [...]                      # pivots of the records (see TableSpec)
pages: [docs/results/minet_movielens1m.md]
```

A run's sections are merged in this order: ``defaults``, the variant's ``config`` file, the data
set's ``data``, the variant's inline ``data`` / ``model`` / ``train``, its ``set`` overrides, the
spec's ``set`` overrides, the sweep value and the seed. Paths are relative to the spec's folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from recforge.config import ConfigError, problems, read_mapping


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class DatasetSpec(_Strict):
    label: str
    data: dict[str, Any] = Field(default_factory=dict)


class VariantSpec(_Strict):
    label: str
    group: str = "main"
    config: str | None = None  # an experiment config (name / data / model / train)
    data: dict[str, Any] = Field(default_factory=dict)
    model: dict[str, Any] = Field(default_factory=dict)
    train: dict[str, Any] = Field(default_factory=dict)
    set: list[str] = Field(default_factory=list)  # a.b.c=value overrides of the merged run
    params: dict[str, Any] = Field(default_factory=dict)  # the protocol's per-variant settings
    datasets: list[str] | None = None  # labels of the data sets it runs on (None: all)


class SweepSpec(_Strict):
    dataset: str  # the data set whose copies sweep the key
    key: str  # dotted key of the run, e.g. data.options.selection_bias
    values: list[Any]
    name: str | None = None  # the group name in the records (default: the key's last part)

    @property
    def group(self) -> str:
        return self.name or self.key.split(".")[-1]


class MetricSpec(_Strict):
    metric: str
    title: str | None = None
    digits: int = 4
    split: str | None = None  # default: the table's split

    @property
    def heading(self) -> str:
        return self.title or self.metric


class Comparison(_Strict):
    metric: str
    reference: str | None = None  # a row; default the study's reference
    kind: Literal["delta", "relative", "relaimpr"] = "delta"
    title: str | None = None


class ExtraRow(_Strict):
    """A row of records that belong to no one variant (e.g. the most-popular scorer), found by
    ``where``; with ``study``, a row of another study's records (a method measured elsewhere on
    the same test rows), its metrics named by ``metrics`` (this table's metric -> that study's)."""

    title: str
    where: dict[str, list[str]] = Field(default_factory=dict)
    metric: str | None = None  # read this metric in every column instead of the column's own
    prefix: str = ""  # or read the column's metric with this prefix (e.g. popular_)
    study: str | None = None  # path of the other study's spec
    metrics: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _listed(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and isinstance(raw.get("where"), dict):
            raw = {**raw, "where": {k: [str(x) for x in (v if isinstance(v, list) else [v])] for k, v in raw["where"].items()}}
        return raw


class TableSpec(_Strict):
    """A pivot of the records: one row per variant (or per value of a group), one column per
    metric (crossed with the values of ``across``), optionally one block per value of ``blocks``."""

    title: str
    split: str = "test"
    metrics: list[MetricSpec]
    rows: str = "variant"  # "variant" or a group name
    row_titles: dict[str, str] = Field(default_factory=dict)
    across: list[str] = Field(default_factory=list)  # group names (or "dataset") whose values become columns
    blocks: str | None = None  # "dataset", "variant" or a group name: one sub-table per value
    where: dict[str, list[str]] = Field(default_factory=dict)  # keep records whose group / dataset / variant is listed
    variants: list[str] | None = None  # rows kept (rows = variant)
    seeds_column: bool = True
    compare: list[Comparison] = Field(default_factory=list)
    extra_rows: list[ExtraRow] = Field(default_factory=list)
    plot: bool = False

    @model_validator(mode="before")
    @classmethod
    def _metric_shorthand(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and isinstance(raw.get("metrics"), list):
            raw = {**raw, "metrics": [{"metric": m} if isinstance(m, str) else m for m in raw["metrics"]]}
        if isinstance(raw, dict) and isinstance(raw.get("where"), dict):
            raw = {**raw, "where": {k: [str(x) for x in (v if isinstance(v, list) else [v])] for k, v in raw["where"].items()}}
        if isinstance(raw, dict) and isinstance(raw.get("across"), str):
            raw = {**raw, "across": [raw["across"]]}
        return raw


class StudySpec(_Strict):
    name: str
    title: str = ""
    command: str | None = None  # quoted on the pages; default `recforge study <spec>`
    notes: str = ""  # a paragraph under the title
    protocol: str = "standard"
    params: dict[str, Any] = Field(default_factory=dict)
    seeds: list[int] = Field(default_factory=lambda: [0])
    seed_keys: list[str] = Field(default_factory=lambda: ["train.seed"])
    defaults: dict[str, Any] = Field(default_factory=dict)
    set: list[str] = Field(default_factory=list)  # overrides of every run, after the variant's own
    datasets: list[DatasetSpec] = Field(default_factory=list)
    variants: list[VariantSpec]
    sweep: SweepSpec | None = None
    reference: str | None = None
    tables: list[TableSpec] = Field(default_factory=list)
    pages: list[str] = Field(default_factory=list)
    records: str | None = None  # default docs/results/records/<name>.json

    @model_validator(mode="after")
    def _labels(self) -> "StudySpec":
        for kind, labels in (("variant", [v.label for v in self.variants]), ("data set", [d.label for d in self.datasets])):
            repeated = sorted({x for x in labels if labels.count(x) > 1})
            if repeated:
                raise ValueError(f"{kind} labels repeat: {repeated}")
        variants = [v.label for v in self.variants]
        datasets = [d.label for d in self.datasets]
        if self.reference is not None and self.reference not in variants:
            raise ValueError(f"reference {self.reference!r} is not a variant ({variants})")
        for variant in self.variants:
            unknown = sorted(set(variant.datasets or []) - set(datasets))
            if unknown:
                raise ValueError(f"variant {variant.label!r}: unknown data sets {unknown}; known: {datasets}")
        if self.sweep is not None and self.sweep.dataset not in datasets:
            raise ValueError(f"sweep: unknown data set {self.sweep.dataset!r}; known: {datasets}")
        return self

    @property
    def records_path(self) -> Path:
        return Path(self.records or f"docs/results/records/{self.name}.json")


def load_spec(path: str | Path, overrides: list[str] | None = None) -> StudySpec:
    path = Path(path)
    raw = read_mapping(path, overrides or [], "no such study spec", "a study spec is a mapping")
    try:
        return StudySpec.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"{path}: {problems(err)}") from None
