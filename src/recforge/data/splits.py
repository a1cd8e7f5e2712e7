"""Train / valid / test assignment of rows: random, temporal (global time cut), leave-one-out,
cold start (old items train, new items' first samples valid, their later samples test)."""

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
    - ``cold_start``: items (column ``item``) with at least ``old_min_count`` rows are old: all
      their rows are train. Items with ``new_min_count`` to ``old_min_count - 1`` rows are new:
      their first ``warm_rows`` rows in time are valid (the warm-up data), the rest test. The
      rows must be in time order (the recipe ranks a split's rows by their row index), and every
      item must be old or new; a source filters rarer items out explicitly.

    ``fit_on`` names the splits whose rows fit vocabularies and normalisers; a cold-start
    protocol adds "valid" so that new items, known before their warm-up, get their own ids.
    """

    model_config = ConfigDict(extra="forbid")

    kind: Literal["random", "temporal", "leave_one_out", "cold_start"] = "random"
    ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 0
    fit_on: tuple[str, ...] = ("train",)
    item: str = "item_id"
    old_min_count: int = 300
    new_min_count: int = 80
    warm_rows: int = 60

    @model_validator(mode="after")
    def _check(self) -> "SplitConfig":
        if min(self.ratios) < 0 or abs(sum(self.ratios) - 1.0) > 1e-6:
            raise ValueError(f"split ratios must be >= 0 and sum to 1, got {self.ratios}")
        if "train" not in self.fit_on or not set(self.fit_on) <= set(SPLITS):
            raise ValueError(f"split fit_on must include 'train' and name only {SPLITS}, got {self.fit_on}")
        if not 0 < self.warm_rows < self.new_min_count < self.old_min_count:
            raise ValueError(
                "cold_start split needs 0 < warm_rows < new_min_count < old_min_count, got "
                f"{self.warm_rows}, {self.new_min_count}, {self.old_min_count}"
            )
        return self


def assign_splits(frame: pl.DataFrame, schema: Schema, config: SplitConfig) -> np.ndarray:
    """Split code per row: 0 train, 1 valid, 2 test -> [N] int8."""
    n = frame.height
    if config.kind == "random":
        order = np.random.default_rng(config.seed).permutation(n)
        return _cut(order, n, config.ratios)
    if schema.time is None:
        raise ValueError(f"a {config.kind} split needs the schema's time column")
    if config.kind == "cold_start":
        return _cold_start(frame, schema.time, config)
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


def _cold_start(frame: pl.DataFrame, time_column: str, config: SplitConfig) -> np.ndarray:
    if config.item not in frame.columns:
        raise ValueError(f"cold_start split: item column {config.item!r} is not in the table {frame.columns}")
    time = frame[time_column].to_numpy()
    if len(time) > 1 and (np.diff(time) < 0).any():
        row = int(np.flatnonzero(np.diff(time) < 0)[0]) + 1
        raise ValueError(f"cold_start split: rows must be in time order; row {row} of column {time_column!r} goes back in time")
    item = frame[config.item].to_numpy()
    count = frame.select(pl.len().over(config.item)).to_series().to_numpy()
    rare = count < config.new_min_count
    if rare.any():
        row = int(np.flatnonzero(rare)[0])
        raise ValueError(
            f"cold_start split: {config.item} {frame[config.item][row]!r} (row {row}) has {count[row]} rows, fewer than "
            f"new_min_count={config.new_min_count}; filter such items out in the source"
        )
    rank = rank_within(item)
    codes = np.where(rank < config.warm_rows, 1, 2).astype(np.int8)
    codes[count >= config.old_min_count] = 0
    return codes


def rank_within(keys: np.ndarray) -> np.ndarray:
    """0-based rank of each row among the rows with the same key, in row order -> [N] int64."""
    order = np.argsort(keys, kind="stable")  # rows grouped by key, row order kept within a key
    sorted_keys = keys[order]
    starts = np.r_[True, sorted_keys[1:] != sorted_keys[:-1]]
    group_start = np.maximum.accumulate(np.where(starts, np.arange(len(keys)), 0))
    rank = np.empty(len(keys), dtype=np.int64)
    rank[order] = np.arange(len(keys)) - group_start
    return rank
