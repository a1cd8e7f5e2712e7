"""Train / valid / test assignment of rows: random, temporal (global time cut), leave-one-out."""

from __future__ import annotations

from typing import Literal

import numpy as np
import polars as pl
from pydantic import BaseModel, ConfigDict, model_validator

from recforge.data.schema import Schema

SPLITS = ("train", "valid", "test")


class SplitConfig(BaseModel):
    """How rows are assigned to splits.

    - ``random``: a seeded permutation cut by ``ratios``.
    - ``temporal``: one global time cut; rows at or after the ``ratios`` quantiles of time go to
      valid and test (rows sharing a timestamp stay together).
    - ``leave_one_out``: per user, the last event is test, the one before it valid, the rest
      train (ties in time broken by row order).
    - ``column``: the raw table's ``column`` names each row's split (train, valid, test, or
      history: an event that is in the users' timelines but no split's sample), as a data
      source that builds its own protocol sets it.
    """

    model_config = ConfigDict(extra="forbid")

    kind: Literal["random", "temporal", "leave_one_out", "column"] = "random"
    ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 0
    column: str = "split"

    @model_validator(mode="after")
    def _check(self) -> "SplitConfig":
        if min(self.ratios) < 0 or abs(sum(self.ratios) - 1.0) > 1e-6:
            raise ValueError(f"split ratios must be >= 0 and sum to 1, got {self.ratios}")
        return self


def assign_splits(frame: pl.DataFrame, schema: Schema, config: SplitConfig) -> np.ndarray:
    """Split code per row: 0 train, 1 valid, 2 test, -1 history only -> [N] int8."""
    n = frame.height
    if config.kind == "column":
        return split_from_column(frame, config.column)
    if config.kind == "random":
        order = np.random.default_rng(config.seed).permutation(n)
        return _cut(order, n, config.ratios)
    if schema.time is None:
        raise ValueError(f"a {config.kind} split needs the schema's time column")
    time = frame[schema.time].to_numpy()
    if config.kind == "temporal":
        train_end, valid_end = np.quantile(time, [config.ratios[0], config.ratios[0] + config.ratios[1]])
        codes = np.zeros(n, dtype=np.int8)
        codes[time >= train_end] = 1
        codes[time >= valid_end] = 2
        if config.ratios[1] == 0:
            codes[codes == 1] = 2 if config.ratios[2] > 0 else 0
        return codes
    if schema.user is None:
        raise ValueError("a leave_one_out split needs the schema's user column")
    # rank of each event from the end of its user's timeline: 0 = last
    from_end = (
        frame.select(pl.col(schema.user), pl.col(schema.time), pl.int_range(pl.len()).alias("_row"))
        .with_columns(
            pl.struct(schema.time, "_row").rank("ordinal", descending=True).over(schema.user).alias("_r")
        )["_r"]
        .to_numpy()
        - 1
    )
    codes = np.zeros(n, dtype=np.int8)
    codes[from_end == 1] = 1
    codes[from_end == 0] = 2
    return codes


def _cut(order: np.ndarray, n: int, ratios: tuple[float, float, float]) -> np.ndarray:
    n_train = int(round(ratios[0] * n))
    n_valid = int(round(ratios[1] * n))
    codes = np.full(n, 2, dtype=np.int8)
    codes[order[:n_train]] = 0
    codes[order[n_train : n_train + n_valid]] = 1
    return codes


#: values of a split column and their codes; "history" rows feed timelines only
SPLIT_CODES = {"train": 0, "valid": 1, "test": 2, "history": -1}


def split_from_column(frame: pl.DataFrame, column: str) -> np.ndarray:
    """Split codes read from ``column`` (train / valid / test / history) -> [N] int8."""
    if column not in frame.columns:
        raise ValueError(f"a column split needs the column {column!r}; the table has {frame.columns}")
    values = frame[column].cast(pl.String)
    bad = ~values.is_in(list(SPLIT_CODES)) | values.is_null()
    if bad.any():
        row = int(bad.arg_true()[0])
        raise ValueError(f"split column {column!r}, row {row}: {values[row]!r} is not one of {list(SPLIT_CODES)}")
    return values.replace_strict(SPLIT_CODES, return_dtype=pl.Int8).to_numpy()
