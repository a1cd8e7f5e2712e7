"""Mistakes in data files and schemas."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import polars as pl

from recforge.data.sources import SOURCES
from tests.bad_input import Case
from tests.bad_input.files import CONFIG, SCHEMA, log_rows, user_files, write_csv

PREPARE = ("prepare", "mine.yaml")
INTEGER_ITEMS = {**SCHEMA, "features": [{**f, "dtype": "integer"} if f["name"] == "item_id" else f for f in SCHEMA["features"]]}


def field(line: int, column: str, text: str, schema: dict | None = None) -> Callable[[Path], None]:
    """The user's files with the field of ``column`` on ``line`` of log.csv written as ``text``."""

    def write(folder: Path) -> None:
        user_files(folder, schema=schema)
        lines = (folder / "log.csv").read_text().splitlines()
        fields = lines[line - 1].split(",")
        fields[lines[0].split(",").index(column)] = text
        lines[line - 1] = ",".join(fields)
        (folder / "log.csv").write_text("\n".join(lines) + "\n")

    return write


def log_text(text: str) -> Callable[[Path], None]:
    """The user's files with log.csv holding ``text``."""

    def write(folder: Path) -> None:
        user_files(folder)
        (folder / "log.csv").write_text(text)

    return write


def without_column(column: str) -> Callable[[Path], None]:
    def write(folder: Path) -> None:
        user_files(folder)
        pl.read_csv(folder / "log.csv", infer_schema=False).drop(column).write_csv(folder / "log.csv")

    return write


def parquet_log(schema: dict, **columns: list) -> Callable[[Path], None]:
    """The user's files training on log.parquet: the click log with ``columns`` added or replaced."""

    def write(folder: Path) -> None:
        user_files(folder, data="log.parquet", schema=schema)
        (folder / "log.csv").unlink()
        rows = log_rows()
        pl.DataFrame(rows).with_columns(pl.Series(name, values) for name, values in columns.items()).write_parquet(folder / "log.parquet")

    return write


def schema_text(text: str) -> Callable[[Path], None]:
    def write(folder: Path) -> None:
        user_files(folder)
        (folder / "schema.json").write_text(text)

    return write


def data_section(source: str, options: str) -> Callable[[Path], None]:
    """The user's files with mine.yaml's data section reading ``source`` with ``options``."""

    def write(folder: Path) -> None:
        user_files(folder)
        config = CONFIG.format(path="log.csv", model="lr")
        config = config.replace("source: file", f"source: {source}").replace("{path: log.csv, schema: schema.json}", options)
        (folder / "mine.yaml").write_text(config)

    return write


def with_schema(schema: dict) -> Callable[[Path], None]:
    return lambda folder: user_files(folder, schema=schema)


TAGS = {**SCHEMA, "features": [*SCHEMA["features"], {"name": "tags", "kind": "sequence", "max_len": 3}]}
N = len(log_rows())
TEXT = {**SCHEMA, "features": [*SCHEMA["features"], {"name": "item_text", "kind": "embedding", "key": "item_id", "dim": 384, "text": ["title"]}]}
VECTORS = {**SCHEMA, "features": [*SCHEMA["features"], {"name": "item_vector", "kind": "embedding", "key": "item_id", "dim": 4, "vectors": "vectors.parquet"}]}


def with_titles(title: Callable[[int, int], str]) -> Callable[[Path], None]:
    """The user's files with a ``title`` column (``title(row, item_id)``) that makes each item's text."""

    def write(folder: Path) -> None:
        user_files(folder, schema=TEXT)
        write_csv(folder / "log.csv", [{**row, "title": title(k, row["item_id"])} for k, row in enumerate(log_rows())])

    return write


def with_vectors(vector: Callable[[int], list[float]], items: range = range(40)) -> Callable[[Path], None]:
    """The user's files with ``vectors.parquet`` holding ``vector(item_id)`` for ``items``."""

    def write(folder: Path) -> None:
        user_files(folder, schema=VECTORS)
        pl.DataFrame({"item_id": list(items), "vector": [vector(i) for i in items]}).write_parquet(folder / "vectors.parquet")

    return write

CASES = [
    Case("data", "a price written with a decimal comma", field(7, "price", '"3,5"'), PREPARE,
         "log.csv: column 'price', line 7: '3,5' is not a number"),
    Case("data", "an empty data file", log_text(""), PREPARE, "data file log.csv is empty"),
    Case("data", "a data file with only its header", log_text("user_id,item_id,zip,price,click\n"), PREPARE,
         "data file log.csv has no rows"),
    Case("data", "a column of the schema missing from the file", without_column("zip"), PREPARE,
         "schema.json: data file log.csv lacks the schema's columns ['zip'] (features.2.name); "
         "it has ['user_id', 'item_id', 'price', 'click']"),
    Case("data", "an empty field", field(9, "item_id", ""), PREPARE, "log.csv: column 'item_id', line 9: missing value"),
    Case("data", "NaN written as an id", field(12, "zip", "NaN"), PREPARE,
         "log.csv: column 'zip', line 12: 'NaN' looks like a missing value; give those rows an id of their own (e.g. 'unknown')"),
    Case("data", "a label that is not 0 or 1", field(5, "click", "2"), PREPARE, "log.csv: column 'click', line 5: '2' is not 0 or 1"),
    Case("data", "an id beyond 64 bits in a column declared integer", field(4, "item_id", "99999999999999999999", INTEGER_ITEMS),
         PREPARE, "log.csv: column 'item_id', line 4: '99999999999999999999' is beyond the 64-bit integer range"),
    Case("data", "a Parquet sequence column holding lists of lists", parquet_log(TAGS, tags=[[[1, 2], [3]]] * N), PREPARE,
         "log.parquet: column 'tags' holds List(List(Int64)); a sequence column holds one list of ids per row"),
    Case("data", "a Parquet id column of floats", parquet_log(SCHEMA, item_id=[1.0, 2.0, 3.0, 4.5] + [1.0] * (N - 4)), PREPARE,
         "log.parquet: column 'item_id', row 4: 4.5 is not an integer id"),
    Case("data", "a schema that is not valid JSON", schema_text(json.dumps(SCHEMA, indent=1).replace('],\n "user"', ']\n "user"')),
         PREPARE, "schema.json: line 23, column 2: invalid JSON (Expecting ',' delimiter)"),
    Case("data", "a feature of an unknown kind",
         with_schema({**SCHEMA, "features": [*SCHEMA["features"][:2], {"name": "zip", "kind": "categorial"}, SCHEMA["features"][3]]}),
         PREPARE, "schema.json: features.2.kind: unknown kind 'categorial'; "
         "expected 'categorical', 'numeric', 'sequence' or 'embedding'"),
    Case("data", "a misspelt key in the schema",
         with_schema({**SCHEMA, "features": [*SCHEMA["features"][:3], {"name": "price", "knd": "numeric"}]}), PREPARE,
         "schema.json: features.3.kind: Field required; features.3.knd: unknown key (did you mean 'kind'?); "
         "keys: name, kind, vocab, max_len, timeline, where, key, dim, min_count, dtype, text, text_from, vectors"),
    Case("data", "a misspelt option of a public data set", data_section("movielens-1m", "{histroy_len: 20}"), PREPARE,
         "data.options: unknown option 'histroy_len' for source 'movielens-1m' (did you mean 'history_len'?); "
         "options: label_threshold, history_len, root, text, extras_root, query_words"),
    Case("data", "an unknown data source", data_section("movielens1m", "{}"), PREPARE,
         f"data.source: unknown data source 'movielens1m' (did you mean 'movielens-1m'?); known: {', '.join(SOURCES)}"),
    Case("data", "an item text column missing from the file", lambda f: user_files(f, schema=TEXT), PREPARE,
         "schema.json: data file log.csv lacks the schema's columns ['title'] (features.4.text.0); "
         "it has ['user_id', 'item_id', 'zip', 'price', 'click']"),
    Case("data", "an item whose text is empty", with_titles(lambda k, i: "" if i == 7 else f"item number {i}"), PREPARE,
         "log.csv: text of 'item_text' is empty for item_id '7' (line 39): columns ['title'] hold no text"),
    Case("data", "an item given two different texts", with_titles(lambda k, i: f"item {i}" + (" (new edition)" if i == 5 and k > 300 else "")), PREPARE,
         "log.csv: text of 'item_text' differs for item_id '5' (line 33 and line 340); columns ['title'] describe the item_id "
         "and must be equal on its rows (or set text_from: fit_rows)"),
    Case("data", "a vector file of the wrong width", with_vectors(lambda i: [0.5, 1.0, 1.5]), PREPARE,
         "vectors.parquet: row 1 (item_id 0): vector has 3 numbers, expected 4 (the width of 'item_vector')"),
    Case("data", "NaN in a vector", with_vectors(lambda i: [0.5, float("nan") if i == 3 else 1.0, 1.5, 2.0]), PREPARE,
         "vectors.parquet: row 4 (item_id 3): vector holds NaN or infinity"),
    Case("data", "an item with no vector", with_vectors(lambda i: [0.5, 1.0, 1.5, 2.0], range(39)), PREPARE,
         "vectors.parquet: no vector for item_id '39', which the data holds (1 keys without one)"),
    Case("data", "a data file that is not there", lambda f: user_files(f, data="logs.csv"), PREPARE, "data file not found: logs.csv"),
]  # fmt: skip
