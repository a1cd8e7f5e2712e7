"""Raw JSON rows -> a :class:`~recforge.data.batch.Batch`, encoded as the model's training rows were.

A row is a JSON object holding every input of the model under its raw column name, and nothing
else (no labels, no time): one id per categorical feature, one number per numeric feature, a
list of ids per sequence, a list of ``dim`` numbers per pretrained embedding (except an embedding
from text or a vector file: the model's table gives its key's vector, zero for a key it has not
seen, which is counted as OOV). A history is the
list of the user's raw item ids (of the history's timeline feature), oldest first, newest last;
a history over a list feature (the events' query tokens) is one list of ids per event, as many
events as the item history over the same events holds.

The rules are those of training (:func:`recforge.data.sources.load_file` and
:mod:`recforge.data.prepare`):

- an id is a JSON string or integer; with the feature's dtype ``"string"`` an integer becomes its
  decimal text (``7`` and ``"7"`` are one id, ``"07"`` another), with ``"integer"`` a string must
  spell an integer (``"07"`` and ``7`` are one id). Floats, booleans, null and ids spelled
  ``nan``/``null``/``none`` are refused, never coerced;
- a number is a JSON integer or float, finite; it is normalised with the training mean and std;
- an id absent from the vocabulary encodes as OOV (1); sequences keep their last ``max_len``
  ids, right-aligned and left-padded with 0.

Every problem is a :class:`RowError` listing ``(location, message)`` pairs, the location being
``(row, field)`` or ``(row, field, position)``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain

import numpy as np
import polars as pl
import torch

from recforge.data.batch import Batch
from recforge.data.prepare import Fitted
from recforge.data.schema import N_RESERVED, OOV, PAD, Feature, Kind
from recforge.data.sources import MISSING_WORDS
from recforge.data.store import last_window
from recforge.errors import DataError

Location = tuple[int | str, ...]
_MISSING_WORDS = frozenset(MISSING_WORDS)


class RowError(DataError):
    """Rows that cannot be encoded; ``problems`` holds each ``(location, message)``."""

    def __init__(self, problems: list[tuple[Location, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{'.'.join(map(str, loc))}: {msg}" for loc, msg in problems))


def json_type(value: object) -> str:
    """The JSON name of a parsed value's type, for messages."""
    names = {str: "a string", bool: "a boolean", int: "an integer", float: "a float", list: "a list", dict: "an object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


class VocabularyLookup:
    """Every vocabulary of a bundle as one sorted index, built once: (vocabulary, id text) -> index.

    The match of preparation (an id's text equals a stored value; else OOV), made for many small
    requests: one binary search per request over all of its ids, never a hash table of the whole
    vocabulary rebuilt per call.
    """

    def __init__(self, vocabularies: dict[str, pl.DataFrame]) -> None:
        # "<k>\x00<value>": the first NUL ends the prefix, so keys of two vocabularies never meet
        self.prefix = {vocab: f"{k}\x00" for k, vocab in enumerate(vocabularies)}
        keys = pl.concat(
            table.select((pl.lit(self.prefix[vocab]) + pl.col("value").cast(pl.String)).alias("key"), pl.col("index").cast(pl.Int32))
            for vocab, table in vocabularies.items()
        ).sort("key")
        self.keys, self.index = keys["key"], keys["index"]

    def __call__(self, ids: list[tuple[str, list[str]]]) -> list[np.ndarray]:
        """The index of every id of each ``(vocabulary, id texts)`` -> one int32 array each."""
        keys = pl.Series(list(chain.from_iterable(map(self.prefix[vocab].__add__, texts) for vocab, texts in ids)), dtype=pl.String)
        codes = np.full(len(keys), OOV, dtype=np.int32)
        if len(keys) and len(self.keys):
            position = self.keys.search_sorted(keys).clip(0, len(self.keys) - 1)
            found = (self.keys.gather(position) == keys).to_numpy()
            codes[found] = self.index.gather(position).to_numpy()[found]
        return np.split(codes, np.cumsum([len(texts) for _, texts in ids])[:-1])


@dataclass
class Rows:
    """Rows read by :meth:`RowEncoder.parse`: per feature the text of its ids (a sequence's: all of
    them and the length [n] of each row's list), its float64 numbers [n] or float32 vectors [n, D];
    a padded feature's codes (int32 [n]). Rows encoded together leave out the same features."""

    n: int
    columns: dict[str, list[str] | tuple[list[str], np.ndarray] | tuple[list[str], np.ndarray, np.ndarray] | np.ndarray]


def _concat(parts: list) -> list[str] | tuple | np.ndarray:
    """The columns of several :class:`Rows` of one feature as one column (a list history's:
    ids, events per row, ids per event)."""
    if len(parts) == 1:
        return parts[0]
    if isinstance(parts[0], tuple):
        ids = list(chain.from_iterable(part[0] for part in parts))
        return ids, *(np.concatenate([part[k] for part in parts]) for k in range(1, len(parts[0])))
    if isinstance(parts[0], list):
        return list(chain.from_iterable(parts))
    return np.concatenate(parts)


class RowEncoder:
    """Encodes raw rows with a bundle's (or store's) vocabularies, normalisers and schema."""

    def __init__(self, fitted: Fitted) -> None:
        self.schema = fitted.schema
        self.listed = {f.name for f in self.schema.histories if self.schema.feature(f.timeline).kind is Kind.SEQUENCE}
        # a list history's events are those of an item history over the same view: equal counts
        self.siblings = {
            name: next((h.name for h in self.schema.histories if h.name not in self.listed and h.view == self.schema.feature(name).view), None)
            for name in self.listed
        }  # fmt: skip
        self.vocabularies = fitted.vocabularies
        self.lookup = VocabularyLookup(fitted.vocabularies)
        self.mean = np.array([fitted.normalisers[f.name]["mean"] for f in self.schema.numeric], dtype=np.float64)
        self.std = np.array([fitted.normalisers[f.name]["std"] for f in self.schema.numeric], dtype=np.float64)
        content = {f.name for f in self.schema.content_embeddings}  # looked up by key, not sent
        self.features = {f.name: f for f in self.schema.features if f.name not in content}
        self._expected = frozenset(self.features)
        self.content = {
            f.name: (VocabularyLookup({f.name: keys.select(pl.col("key").alias("value"), pl.int_range(N_RESERVED, pl.len() + N_RESERVED).alias("index"))}),
                     np.concatenate([np.zeros((N_RESERVED, f.dim), dtype=np.float32), vectors]))
            for f in self.schema.content_embeddings
            for keys, vectors in [fitted.content[f.name]]
        }  # fmt: skip

    @property
    def fields(self) -> dict[str, str]:
        """Every field a row holds -> what it holds, in words."""
        return {name: _describe(f, self._id_dtype(f), name in self.listed) for name, f in self.features.items()}

    def encode(self, rows: list) -> tuple[Batch, dict[str, int]]:
        """The batch of ``rows`` and, per categorical and sequence feature, how many of the ids the
        model sees are OOV. Raises :class:`RowError` listing the problems (at most one per field)."""
        batch, (oov,) = self.encode_parsed([self.parse(rows)])
        return batch, oov

    def parse(self, rows: list, padded: frozenset[str] = frozenset()) -> Rows:
        """``rows`` checked and read (ids as text, numbers as floats), not yet looked up; raises
        :class:`RowError` listing the problems (at most one per field and kind of problem).

        ``padded`` names categorical features the rows leave out, encoded as padding (0): the item
        of a retriever's request for items."""
        if not isinstance(rows, list):
            raise RowError([((), f"expected a list of rows, got {json_type(rows)}")])
        if not rows:
            raise RowError([((), "no rows: send at least one")])
        self._check_fields(rows, padded)
        problems: list[tuple[Location, str]] = []
        columns: dict = {name: np.full(len(rows), PAD, dtype=np.int32) for name in padded}
        for name, f in self.features.items():
            if name in padded:
                continue
            column = [row[name] for row in rows]
            try:
                if f.kind is Kind.CATEGORICAL:
                    columns[name] = self._ids(column, f, lambda i, name=name: (i, name))
                elif name in self.listed:
                    columns[name] = self._event_lists(column, f)
                elif f.kind is Kind.SEQUENCE:
                    columns[name] = self._id_lists(column, f)
                elif f.kind is Kind.NUMERIC:
                    columns[name] = _floats(column, lambda i, name=name: (i, name), "a number")
                else:
                    columns[name] = _vectors(column, f)
            except RowError as err:
                problems += err.problems
        for name, sibling in self.siblings.items():
            if sibling is None or name not in columns or sibling not in columns:
                continue
            differ = np.flatnonzero(columns[name][1] != columns[sibling][1])
            if len(differ):
                i = int(differ[0])
                problems.append(((i, name), f"{columns[name][1][i]} events, but {sibling} holds {columns[sibling][1][i]}: one list of ids per event of {sibling}"))
        if problems:
            raise RowError(problems)
        return Rows(len(rows), columns)

    def encode_parsed(self, parts: list[Rows]) -> tuple[Batch, list[dict[str, int]]]:
        """One batch of the rows of every part, in order, and each part's OOV counts (one lookup
        over all of their ids)."""
        schema, n = self.schema, sum(part.n for part in parts)
        column = {name: _concat([part.columns[name] for part in parts]) for name in self.features}
        given = [f for f in schema.categorical if isinstance(column[f.name], list)]  # the others are padding codes
        codes = iter(self.lookup([(f.vocab, column[f.name]) for f in given] + [(f.vocab, column[f.name][0]) for f in schema.sequences]))
        categorical = np.zeros((n, len(schema.categorical)), dtype=np.int64)
        for j, f in enumerate(schema.categorical):
            categorical[:, j] = next(codes) if isinstance(column[f.name], list) else column[f.name]
        absent = {f.name: categorical[:, j] == OOV for j, f in enumerate(schema.categorical)}
        sequences = {}
        for f in schema.sequences:
            values = np.concatenate(([PAD], next(codes)))  # a leading pad: the array is never empty
            if f.name in self.listed:  # each event's last W ids, then the row's last L events: [n, L, W]
                tokens = _offsets(column[f.name][2])
                events = last_window(values, tokens[:-1] + 1, tokens[1:] + 1, schema.feature(f.timeline).max_len)
                values = np.concatenate([np.zeros_like(events[:1]), events])  # a leading empty event
            offsets = _offsets(column[f.name][1])
            window = last_window(values, offsets[:-1] + 1, offsets[1:] + 1, f.max_len).astype(np.int64)
            sequences[f.name] = torch.from_numpy(window)
            absent[f.name] = (window == OOV).reshape(n, -1).sum(axis=1)
        embeddings = {f.name: torch.from_numpy(column[f.name]) for f in schema.embeddings if f.name in column}
        for name, (lookup, vectors) in self.content.items():  # a key without content: the zero vector
            f = schema.feature(name)
            key = column[f.key]
            if isinstance(key, list):
                (rows,) = lookup([(name, key)])
                absent[name] = ~vectors[rows].any(axis=1)
            else:  # the key is left out (padding)
                rows, absent[name] = np.full(n, PAD, dtype=np.int32), np.zeros(n, dtype=bool)
            embeddings[name] = torch.from_numpy(vectors[rows])
        starts = np.cumsum([0] + [part.n for part in parts[:-1]])
        per_part = {name: np.add.reduceat(flags.astype(np.int64), starts) for name, flags in absent.items()}
        oov = [{name: int(counts[k]) for name, counts in per_part.items()} for k in range(len(parts))]
        numeric = np.stack([column[f.name] for f in schema.numeric], axis=1) if schema.numeric else np.zeros((n, 0))
        categorical = torch.from_numpy(categorical)
        names = [f.name for f in schema.categorical]
        batch = Batch(
            categorical=categorical,
            numeric=torch.from_numpy(((numeric - self.mean) / self.std).astype(np.float32)),
            sequences=sequences,
            embeddings=embeddings,
            group=categorical[:, names.index(schema.user)] if schema.user else None,
            domain=categorical[:, names.index(schema.domain)] if schema.domain else None,
            row=torch.arange(n),
        )
        return batch, oov

    def id_lists(self, name: str, lists: list) -> list[np.ndarray]:
        """The codes of lists of ids of feature ``name`` (read as its ids are), one array per list;
        a :class:`RowError` locates a problem as ``(list, position)``."""
        f = self.features[name]
        try:
            texts, lengths = self._id_lists(lists, f)
        except RowError as err:
            raise RowError([(tuple(part for part in loc if part != name), msg) for loc, msg in err.problems]) from None
        (codes,) = self.lookup([(f.vocab, texts)])
        return np.split(codes, np.cumsum(lengths)[:-1])

    def id_names(self, name: str) -> np.ndarray:
        """The raw id of every code of feature ``name``'s vocabulary (None for padding and OOV):
        its text, or an integer for the dtype ``"integer"``."""
        table = self.vocabularies[self.features[name].vocab]
        names = np.full(self.schema.vocab_size(self.features[name].vocab), None, dtype=object)
        values = table["value"].cast(pl.Int64 if self._id_dtype(self.features[name]) == "integer" else pl.String)
        names[table["index"].to_numpy()] = values.to_list()
        return names

    # --- checks -----------------------------------------------------------------------------
    def _check_fields(self, rows: list, padded: frozenset[str]) -> None:
        """Every row an object with exactly the model's fields (less the ``padded`` ones)."""
        expected = self._expected - padded
        odd = [i for i, row in enumerate(rows) if type(row) is not dict or row.keys() != expected]
        problems: dict[tuple[str, str], tuple[Location, str]] = {}
        for i in odd:
            row = rows[i]
            if type(row) is not dict:
                problems.setdefault(("", "object"), ((i,), f"expected an object, got {json_type(row)}"))
                continue
            for name in (name for name in self.features if name not in row and name not in padded):
                problems.setdefault((name, "missing"), ((i, name), "field required"))
            for name in sorted(row.keys() - expected):
                problems.setdefault((name, "unknown"), ((i, name), f"unknown field; a row holds {', '.join(n for n in self.features if n not in padded)}"))
        if problems:
            raise RowError(sorted(problems.values(), key=lambda p: p[0][0]))

    def _id_dtype(self, f: Feature) -> str:
        """``"string"`` or ``"integer"``: the dtype of a feature's ids (a history's: its timeline's)."""
        return self.features[f.timeline].dtype if f.timeline else f.dtype

    def _ids(self, column: list, f: Feature, where: Callable[[int], Location]) -> list[str]:
        """The text of each id as training reads it: its own, or an integer's decimal text."""
        kinds = set(map(type, column))
        if not kinds <= {str, int}:
            i = next(i for i, v in enumerate(column) if type(v) not in (str, int))
            raise RowError([(where(i), f"expected an id (a string or an integer), got {json_type(column[i])}")])
        if self._id_dtype(f) == "integer":
            return _integer_texts(column, kinds, where)
        if str in kinds and any(map(_MISSING_WORDS.__contains__, map(str.lower, map(str.strip, filter(str.__instancecheck__, column))))):
            i = next(i for i, v in enumerate(column) if type(v) is str and v.strip().lower() in _MISSING_WORDS)
            raise RowError([(where(i), f"{column[i]!r} looks like a missing value; give it an id of its own (e.g. 'unknown')")])
        return list(map(str, column)) if int in kinds else column

    def _id_lists(self, column: list, f: Feature) -> tuple[list[str], np.ndarray]:
        """A list of ids per row -> (the text of every id, in row order; the lengths [B])."""
        if not set(map(type, column)) <= {list}:
            i = next(i for i, v in enumerate(column) if type(v) is not list)
            raise RowError([((i, f.name), f"expected a list of ids, got {json_type(column[i])}")])
        offsets = np.zeros(len(column) + 1, dtype=np.int64)
        np.cumsum(np.fromiter(map(len, column), dtype=np.int64, count=len(column)), out=offsets[1:])

        def where(k: int) -> Location:
            row = int(np.searchsorted(offsets, k, side="right")) - 1
            return (row, f.name, k - int(offsets[row]))

        return self._ids(list(chain.from_iterable(column)), f, where), np.diff(offsets)

    def _event_lists(self, column: list, f: Feature) -> tuple[list[str], np.ndarray, np.ndarray]:
        """A list of id lists per row (one per event) -> (the text of every id, in order; the
        events of each row [B]; the ids of each event [E])."""
        if not set(map(type, column)) <= {list}:
            i = next(i for i, v in enumerate(column) if type(v) is not list)
            raise RowError([((i, f.name), f"expected a list of id lists (one per event), got {json_type(column[i])}")])
        for i, events in enumerate(column):
            if not set(map(type, events)) <= {list}:
                k = next(k for k, v in enumerate(events) if type(v) is not list)
                raise RowError([((i, f.name, k), f"expected a list of ids (the event's), got {json_type(events[k])}")])
        per_row = np.fromiter(map(len, column), dtype=np.int64, count=len(column))
        events = list(chain.from_iterable(column))
        per_event = np.fromiter(map(len, events), dtype=np.int64, count=len(events))
        rows, starts = np.repeat(np.arange(len(column)), per_row), _offsets(per_row)[:-1]
        ids = _offsets(per_event)

        def where(k: int) -> Location:
            event = int(np.searchsorted(ids, k, side="right")) - 1
            row = int(rows[event])
            return (row, f.name, event - int(starts[row]), k - int(ids[event]))

        return self._ids(list(chain.from_iterable(events)), f, where), per_row, per_event


def _offsets(lengths: np.ndarray) -> np.ndarray:
    """Lengths [n] -> their running offsets [n + 1], starting at 0."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


def _integer_texts(column: list, kinds: set, where: Callable[[int], Location]) -> list[str]:
    """Ids of the dtype ``"integer"``: 64-bit integers, strings parsed as training parses them."""
    if str in kinds:
        parsed = pl.Series(column, dtype=pl.String, strict=False).cast(pl.Int64, strict=False)
        if parsed.null_count():
            i = int(parsed.is_null().arg_true()[0])
            problem = "is not an integer" if type(column[i]) is str else "is beyond the 64-bit integer range"
            raise RowError([(where(i), f"{column[i]!r} {problem}")])
        column = parsed.to_list()
    elif column and (min(column) < -(2**63) or max(column) >= 2**63):
        i = next(i for i, v in enumerate(column) if not -(2**63) <= v < 2**63)
        raise RowError([(where(i), f"{column[i]} is beyond the 64-bit integer range")])
    return list(map(str, column))


def _describe(f: Feature, dtype: str, listed: bool) -> str:
    ids = "string or integer ids" if dtype == "string" else "integer ids"
    if f.kind is Kind.CATEGORICAL:
        return f"one id ({ids})"
    if f.kind is Kind.NUMERIC:
        return "a finite number"
    if f.kind is Kind.EMBEDDING:
        return f"a list of {f.dim} finite numbers"
    held = f"the user's earlier {f.timeline} ids, newest last" if f.timeline else f"a list of {ids}"
    if listed:
        held = f"the user's earlier {f.timeline} lists, one list of ids per event, newest last"
    return f"{held} (the last {f.max_len} are used)"


def _floats(column: list, where: Callable[[int], Location], what: str) -> np.ndarray:
    """JSON numbers -> float64, refusing anything else and NaN or infinity."""
    if not set(map(type, column)) <= {int, float}:
        i = next(i for i, v in enumerate(column) if type(v) not in (int, float))
        raise RowError([(where(i), f"expected {what}, got {json_type(column[i])}")])
    try:
        values = np.array(column, dtype=np.float64)
    except OverflowError:  # an integer beyond the float range
        i = next(i for i, v in enumerate(column) if abs(v) > sys.float_info.max)
        raise RowError([(where(i), "is beyond the range of a 64-bit float")]) from None
    bad = ~np.isfinite(values)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise RowError([(where(i), f"{column[i]} is not a finite number")])
    return values


def _vectors(column: list, f: Feature) -> np.ndarray:
    """A list of ``dim`` numbers per row -> [B, dim] float32."""
    lengths = [len(v) if type(v) is list else -1 for v in column]
    if any(n != f.dim for n in lengths):
        i = next(i for i, n in enumerate(lengths) if n != f.dim)
        got = f"{lengths[i]} numbers" if lengths[i] >= 0 else json_type(column[i])
        raise RowError([((i, f.name), f"expected a list of {f.dim} numbers, got {got}")])
    values = _floats(list(chain.from_iterable(column)), lambda k: (k // f.dim, f.name, k % f.dim), "a number")
    return values.reshape(len(column), f.dim).astype(np.float32)
