"""Ids of a user's file survive reading and encoding: each encoded index decodes to the file's id."""

from __future__ import annotations

import csv
import tempfile
from pathlib import Path

import polars as pl
from hypothesis import given, settings
from hypothesis import strategies as st

from recforge.data.prepare import prepare
from recforge.data.schema import OOV
from recforge.data.sources import MISSING_WORDS, load_file
from recforge.data.splits import SPLITS, SplitConfig

INT64 = 2**63
COLUMNS = ("user_id", "item_id")

text_ids = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=8).filter(
    lambda s: s.strip() != "" and s.strip().lower() not in MISSING_WORDS
)
ids = st.one_of(
    st.integers(-(2**70), 2**70),  # beyond 64 bits too
    st.integers(0, 999).map(lambda n: f"{n:04d}"),  # leading zeros
    text_ids,  # unicode, quotes, separators, line breaks
)
tables = st.integers(5, 30).flatmap(
    lambda n: st.fixed_dictionaries(
        {c: st.lists(ids, min_size=n, max_size=n) for c in COLUMNS}
        | {"click": st.lists(st.integers(0, 1), min_size=n, max_size=n)}
    )
)
SCHEMA = {"features": [{"name": c, "kind": "categorical"} for c in COLUMNS], "labels": ["click"]}


def write_csv(path: Path, table: dict[str, list]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(table)
        writer.writerows(zip(*table.values()))


def write_parquet(path: Path, table: dict[str, list]) -> None:
    """Integer columns (within 64 bits) as Int64, the others as their text."""
    columns = {}
    for name, values in table.items():
        whole = all(isinstance(v, int) and -INT64 <= v < INT64 for v in values)
        columns[name] = pl.Series(name, values, dtype=pl.Int64) if whole else pl.Series(name, [str(v) for v in values])
    pl.DataFrame(columns).write_parquet(path)


def assert_round_trip(path: Path, expected: dict[str, list[str]], schema: dict) -> None:
    store = prepare(load_file(path, schema), path.with_suffix(".store"), SplitConfig(seed=0))
    for column in COLUMNS:
        vocab = store.vocabulary(column)
        decode = dict(zip(vocab["index"].to_list(), vocab["value"].to_list()))
        known = set(decode.values())
        for split in SPLITS:
            view = store.split(split)
            for row, code in zip(view.row[:].tolist(), view.column(column).tolist()):
                original = expected[column][row]
                if split == "train" or original in known:
                    assert decode.get(code) == original, (split, row)
                else:
                    assert code == OOV, (split, row)


@settings(max_examples=25, deadline=None)
@given(tables)
def test_ids_decode_to_the_text_of_the_file(table):
    expected = {c: [str(v) for v in table[c]] for c in COLUMNS}
    with tempfile.TemporaryDirectory() as folder:
        write_csv(Path(folder) / "log.csv", table)
        assert_round_trip(Path(folder) / "log.csv", expected, SCHEMA)
        write_parquet(Path(folder) / "log.parquet", table)
        assert_round_trip(Path(folder) / "log.parquet", expected, SCHEMA)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(-INT64, INT64 - 1), st.integers(0, 3)), min_size=5, max_size=30))
def test_integer_ids_decode_to_their_value_whatever_their_zeros(pairs):
    """Declared integer, ``"007"`` and ``"7"`` are one id."""
    written = [f"{'-' if n < 0 else ''}{'0' * zeros}{abs(n)}" for n, zeros in pairs]
    table = {"user_id": written, "item_id": written[::-1], "click": [n % 2 for n, _ in pairs]}
    expected = {"user_id": [str(n) for n, _ in pairs], "item_id": [str(n) for n, _ in pairs][::-1]}
    schema = {**SCHEMA, "features": [{**f, "dtype": "integer"} for f in SCHEMA["features"]]}
    with tempfile.TemporaryDirectory() as folder:
        write_csv(Path(folder) / "log.csv", table)
        assert_round_trip(Path(folder) / "log.csv", expected, schema)
