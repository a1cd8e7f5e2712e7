"""The schema: every column of a data set declared once.

A :class:`Schema` says which raw columns are features (and of which kind), which are labels,
which column holds the user (the group for GAUC and the owner of a timeline), the domain and
the event time. Features may share a vocabulary (``item_id`` and the history ``hist_item_id``
both use the ``item_id`` vocabulary), which also makes them share one embedding table.

After :func:`recforge.data.prepare.prepare` the schema also carries the fitted vocabulary sizes;
it is saved as ``schema.json`` beside the encoded store and inside every exported model.
"""

from __future__ import annotations

import hashlib
import json
from enum import Enum
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from recforge.errors import DataError, did_you_mean

PAD = 0  # index reserved for padding in every vocabulary
OOV = 1  # index for values unseen in the train split (or below the min-count)
N_RESERVED = 2


class Kind(str, Enum):
    CATEGORICAL = "categorical"  # one id per row
    NUMERIC = "numeric"  # one float per row, normalised on the train split
    SEQUENCE = "sequence"  # a list of ids per row, or a history view into the user's timeline
    EMBEDDING = "embedding"  # a pretrained vector looked up by the id of a categorical feature


class Feature(BaseModel):
    """One input feature.

    - ``vocab``: name of the vocabulary (and embedding table); defaults to the feature name.
    - ``max_len``: sequences are cut to their last ``max_len`` elements.
    - ``timeline``: for a history sequence, the categorical column whose past values (strictly
      before the sample's time, in the same user's timeline) make the sequence, ``[B, L]`` in a
      batch; or a list column (a query's tokens, empty for an event without one), whose last
      ``W`` (its ``max_len``) values per event make ``[B, L, W]``. Without it a sequence is a list
      column of the raw table.
    - ``where``: for a history, keep only the timeline's events whose raw columns equal these
      values (e.g. ``{"domain": "target", "click": 1}``: the user's earlier clicks in one domain).
      Histories with the same ``where`` share one filtered timeline.
    - ``key`` and ``dim``: for a pretrained embedding, the categorical feature whose value selects
      the vector, and the vector's width. The vector comes from one of three places: a raw column
      of the feature's name holding one vector per row (the default); ``text``, the raw columns
      whose values make the key's text, encoded by the sentence encoder at prepare time
      (:mod:`recforge.data.content`); or ``vectors``, a Parquet file of the user's own vectors
      with the key's column and a ``vector`` column.
    - ``text_from``: for a text embedding, ``"key"`` (the default) when the text columns describe
      the key and hold the same values on each of its rows (a title, a plot); ``"fit_rows"`` when
      each row brings its own text (a review) and the key's text is that of its rows in the
      fitting splits only, in time order: later rows are what is predicted and must not leak.
    - ``min_count``: values seen fewer times in the train split map to OOV.
    - ``dtype``: how the ids of a categorical or list-sequence column are read from a user's file
      (:func:`recforge.data.sources.load_file`): ``"string"`` (the default) keeps each id as the
      text of the file, so ``"07"`` and ``"7"`` are two ids (Parquet integers become their decimal
      text); ``"integer"`` reads them as 64-bit integers, so ``"07"`` and ``"7"`` are one id and
      a value that is not an integer, or is beyond the 64-bit range, is an error.
    """

    model_config = ConfigDict(extra="forbid")

    name: str
    kind: Kind
    vocab: str | None = None
    max_len: int | None = None
    timeline: str | None = None
    where: dict[str, str | int | float | bool] | None = None
    key: str | None = None
    dim: int | None = None
    min_count: int = 1
    dtype: Literal["string", "integer"] = "string"
    text: list[str] | None = None
    text_from: Literal["key", "fit_rows"] = "key"
    vectors: str | None = None

    @model_validator(mode="after")
    def _check(self) -> "Feature":
        if self.kind in (Kind.CATEGORICAL, Kind.SEQUENCE) and self.vocab is None:
            self.vocab = self.timeline if self.timeline else self.name
        if self.kind is Kind.SEQUENCE and not self.max_len:
            raise ValueError(f"sequence feature {self.name!r} needs max_len")
        if self.kind is not Kind.SEQUENCE and self.timeline is not None:
            raise ValueError(f"feature {self.name!r}: only sequences take a timeline")
        if self.where is not None and (self.timeline is None or not self.where):
            raise ValueError(f"feature {self.name!r}: where filters a timeline; it needs timeline and >= 1 column")
        if self.kind is Kind.EMBEDDING and (self.key is None or not self.dim):
            raise ValueError(f"embedding feature {self.name!r} needs key and dim")
        if (self.text is not None or self.vectors is not None) and self.kind is not Kind.EMBEDDING:
            raise ValueError(f"feature {self.name!r}: only embeddings take text or vectors")
        if self.text is not None and self.vectors is not None:
            raise ValueError(f"embedding feature {self.name!r}: give text or vectors, not both")
        if self.text is not None and not self.text:
            raise ValueError(f"embedding feature {self.name!r}: text needs at least one column")
        if self.min_count < 1:
            raise ValueError(f"feature {self.name!r}: min_count must be >= 1")
        if self.dtype != "string" and (self.kind not in (Kind.CATEGORICAL, Kind.SEQUENCE) or self.timeline):
            raise ValueError(f"feature {self.name!r}: only categorical and list-sequence ids take a dtype")
        return self

    @property
    def view(self) -> str:
        """Name of the timeline view a history reads: "" for all events, else a digest of ``where``."""
        if not self.where:
            return ""
        return hashlib.sha1(json.dumps(self.where, sort_keys=True).encode()).hexdigest()[:12]


class Schema(BaseModel):
    """Columns of a data set and, once prepared, the sizes of its vocabularies."""

    model_config = ConfigDict(extra="forbid")

    features: list[Feature]
    labels: list[str]
    user: str | None = None  # group column for GAUC and owner of timelines
    time: str | None = None  # event time; orders each user's timeline
    domain: str | None = None  # column holding the domain (scenario) of each row
    vocab_sizes: dict[str, int] = Field(default_factory=dict)  # filled by prepare
    domain_index: dict[str, int] = Field(default_factory=dict)  # filled by prepare: domain value -> id

    @model_validator(mode="after")
    def _check(self) -> "Schema":
        names = [f.name for f in self.features]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ValueError(f"schema: duplicate feature names {sorted(dupes)}")
        if not self.labels:
            raise ValueError("schema: at least one label is needed")
        by_name = {f.name: f for f in self.features}
        for f in self.features:
            if f.timeline is not None:
                source = by_name.get(f.timeline)
                if source is None or not (source.kind is Kind.CATEGORICAL or (source.kind is Kind.SEQUENCE and source.timeline is None)):
                    raise ValueError(
                        f"schema: sequence {f.name!r} draws on timeline {f.timeline!r}, "
                        "which must be a categorical or list feature"
                    )
                if f.vocab == f.timeline:  # the default: the timeline feature's own vocabulary
                    f.vocab = source.vocab
                elif f.vocab != source.vocab:
                    raise ValueError(
                        f"schema: history {f.name!r} has vocab {f.vocab!r} but its timeline {f.timeline!r} has {source.vocab!r}; "
                        "a history shares its timeline's vocabulary"
                    )
                if self.user is None or self.time is None:
                    raise ValueError(f"schema: history {f.name!r} needs the user and time columns")
            if f.kind is Kind.EMBEDDING:
                key = by_name.get(f.key or "")
                if key is None or key.kind is not Kind.CATEGORICAL:
                    raise ValueError(f"schema: embedding {f.name!r} needs categorical key {f.key!r}")
        for col in (self.user, self.domain):
            if col is not None and (col not in by_name or by_name[col].kind is not Kind.CATEGORICAL):
                raise ValueError(f"schema: {col!r} must also be declared as a categorical feature")
        return self

    # --- views -----------------------------------------------------------------------------
    def of_kind(self, kind: Kind) -> list[Feature]:
        return [f for f in self.features if f.kind is kind]

    @property
    def categorical(self) -> list[Feature]:
        return self.of_kind(Kind.CATEGORICAL)

    @property
    def numeric(self) -> list[Feature]:
        return self.of_kind(Kind.NUMERIC)

    @property
    def sequences(self) -> list[Feature]:
        return self.of_kind(Kind.SEQUENCE)

    @property
    def embeddings(self) -> list[Feature]:
        return self.of_kind(Kind.EMBEDDING)

    @property
    def histories(self) -> list[Feature]:
        return [f for f in self.sequences if f.timeline is not None]

    def feature(self, name: str) -> Feature:
        for f in self.features:
            if f.name == name:
                return f
        raise DataError(f"schema has no feature {name!r}; it has {[f.name for f in self.features]}")

    def categorical_index(self, name: str) -> int:
        """Column of ``name`` in ``Batch.categorical``."""
        return [f.name for f in self.categorical].index(name)

    @property
    def vocabs(self) -> list[str]:
        """Vocabulary names in first-use order (categorical, then sequence features)."""
        seen: dict[str, None] = {}
        for f in self.categorical + self.sequences:
            seen.setdefault(f.vocab or f.name, None)
        return list(seen)

    def domain_id(self, value: str | int) -> int:
        """Encoded id of a value of the domain column (seen in the train split); integer domains by value or text."""
        if str(value) not in self.domain_index:
            raise DataError(f"domain {value!r} has no id; the train split's domains are {sorted(self.domain_index)}")
        return self.domain_index[str(value)]

    def vocab_size(self, vocab: str) -> int:
        if vocab not in self.vocab_sizes:
            raise DataError(f"vocabulary {vocab!r} has no size: prepare the data first")
        return self.vocab_sizes[vocab]

    @property
    def history_views(self) -> dict[str, dict[str, str | int | float | bool]]:
        """Every timeline view the histories read: name -> filter ({} for all events)."""
        return {f.view: dict(f.where or {}) for f in self.histories}

    @property
    def content_embeddings(self) -> list[Feature]:
        """Embeddings whose vectors come from text or a vector file rather than a raw column."""
        return [f for f in self.embeddings if f.text is not None or f.vectors is not None]

    def raw_columns(self) -> list[str]:
        content = {f.name for f in self.content_embeddings}
        cols = [f.name for f in self.features if f.timeline is None and f.name not in content]
        cols += [c for f in self.content_embeddings for c in (f.text or []) if c not in cols]
        cols += [c for f in self.histories for c in (f.where or {}) if c not in cols]
        cols += [c for c in self.labels if c not in cols]
        if self.time is not None and self.time not in cols:
            cols.append(self.time)
        return cols

    # --- io --------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.model_dump_json(indent=2))

    @classmethod
    def parse(cls, data: object, origin: str = "schema") -> "Schema":
        """Validate ``data`` (a schema as JSON values); a :class:`DataError` names ``origin`` and each key at fault."""
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise DataError(f"{origin}: {_problems(err)}") from None

    @classmethod
    def load(cls, path: str | Path) -> "Schema":
        """Read a schema JSON file; a missing file, invalid JSON or a bad key is a :class:`DataError` naming the file."""
        path = Path(path)
        if not path.is_file():
            raise DataError(f"schema file not found: {path}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise DataError(f"{path}: not UTF-8 text") from None
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: line {err.lineno}, column {err.colno}: invalid JSON ({err.msg})") from None
        return cls.parse(data, str(path))


def _problems(err: ValidationError) -> str:
    """Each problem of ``err`` as ``key.path: message``, joined by "; "."""
    problems = []
    for e in err.errors(include_url=False):
        loc = e["loc"]
        if e["type"] == "extra_forbidden":
            known = list((Feature if loc[0] == "features" else Schema).model_fields)
            message = f"unknown key{did_you_mean(str(loc[-1]), known)}; keys: {', '.join(known)}"
        elif e["type"] == "model_type":
            message = "expected a JSON object"
        elif e["type"] in ("enum", "literal_error"):
            message = f"unknown {loc[-1]} {e['input']!r}; expected {e['ctx']['expected']}"
        else:
            message = e["msg"].removeprefix("Value error, ").removeprefix("schema: ")
        problems.append(": ".join(x for x in (".".join(str(p) for p in loc), message) if x))
    return "; ".join(problems)
