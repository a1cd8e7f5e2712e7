"""Mistakes in data files and schemas."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import polars as pl

from recforge.data.sources import SOURCES
from tests.bad_input import Case
from tests.bad_input.files import CONFIG, SCHEMA, log_rows, user_files

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
         "keys: name, kind, vocab, max_len, timeline, where, key, dim, min_count, dtype"),
    Case("data", "a misspelt option of a public data set", data_section("movielens-1m", "{histroy_len: 20}"), PREPARE,
         "data.options: unknown option 'histroy_len' for source 'movielens-1m' (did you mean 'history_len'?); "
         "options: label_threshold, history_len, root"),
    Case("data", "an unknown data source", data_section("movielens1m", "{}"), PREPARE,
         f"data.source: unknown data source 'movielens1m' (did you mean 'movielens-1m'?); known: {', '.join(SOURCES)}"),
    Case("data", "a data file that is not there", lambda f: user_files(f, data="logs.csv"), PREPARE, "data file not found: logs.csv"),
]  # fmt: skip
