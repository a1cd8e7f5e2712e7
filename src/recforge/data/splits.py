"""Train / valid / test assignment of rows: random, temporal (global time cut), leave-one-out,
cold start (old items train, new items' first samples valid, their later samples test)."""

from __future__ import annotations

from typing import Literal

import numpy as np
import polars as pl
from pydantic import BaseModel, ConfigDict, model_validator

from recforge.data.schema import Schema
from recforge.data.sources import locate
from recforge.errors import DataError

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
    - ``cross_domain``: see :func:`cross_domain_split` (uses ``item``, ``cold_domain`` and
      ``cold_user_ratio``).
    - ``cold_start``: items (column ``item``) with at least ``old_min_count`` rows are old: all
      their rows are train. Items with ``new_min_count`` to ``old_min_count - 1`` rows are new:
      their first ``warm_rows`` rows in time are valid (the warm-up data), the rest test. The
      rows must be in time order (the recipe ranks a split's rows by their row index), and every
      item must be old or new; a source filters rarer items out explicitly.

    ``fit_on`` names the splits whose rows fit vocabularies and normalisers; a cold-start
    protocol adds "valid" so that new items, known before their warm-up, get their own ids.
    """

    model_config = ConfigDict(extra="forbid")

    kind: Literal["random", "temporal", "leave_one_out", "column", "cross_domain", "cold_start"] = "random"
    ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 0
    fit_on: tuple[str, ...] = ("train",)
    column: str = "split"
    item: str = "item_id"  # cross_domain and cold_start: the item column
    cold_domain: str | None = None  # cross_domain: the domain whose cold-start users are held out
    cold_user_ratio: float = 0.0  # cross_domain: share of the overlapping users made cold there
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


def assign_splits(frame: pl.DataFrame, schema: Schema, config: SplitConfig, origin: str = "table") -> np.ndarray:
    """Split code per row: 0 train, 1 valid, 2 test, -1 history only -> [N] int8.

    A table the split cannot divide raises :class:`DataError` naming ``origin`` (the file the rows came from).
    """
    try:
        return _assign(frame, schema, config, origin)
    except DataError:
        raise
    except ValueError as err:
        raise DataError(f"{origin}: {err}") from None


def _assign(frame: pl.DataFrame, schema: Schema, config: SplitConfig, origin: str) -> np.ndarray:
    n = frame.height
    if config.kind == "column":
        return split_from_column(frame, config.column, origin)
    if config.kind == "random":
        order = np.random.default_rng(config.seed).permutation(n)
        return _cut(order, n, config.ratios)
    if config.kind == "cross_domain":
        return cross_domain_split(frame, schema, config)
    if schema.time is None:
        raise ValueError(f"a {config.kind} split needs the schema's time column")
    if config.kind == "cold_start":
        return _cold_start(frame, schema.time, config, origin)
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


def split_from_column(frame: pl.DataFrame, column: str, origin: str = "table") -> np.ndarray:
    """Split codes read from ``column`` (train / valid / test / history) -> [N] int8."""
    if column not in frame.columns:
        raise ValueError(f"a column split needs the column {column!r}; the table has {frame.columns}")
    values = frame[column].cast(pl.String)
    bad = ~values.is_in(list(SPLIT_CODES)) | values.is_null()
    if bad.any():
        row = int(bad.arg_true()[0])
        raise DataError(f"{origin}: split column {column!r}, {locate(origin, row)}: {values[row]!r} is not one of {list(SPLIT_CODES)}")
    return values.replace_strict(SPLIT_CODES, return_dtype=pl.Int8).to_numpy()


def cross_domain_split(frame: pl.DataFrame, schema: Schema, config: SplitConfig) -> np.ndarray:
    """Split code per row (0 train, 1 valid, 2 test) of a multi-domain interaction table -> [N] int8.

    Needs the schema's user and domain columns and the ``config.item`` column; rows are ordered
    by the schema's time column when it has one, else by row order.

    - Per (user, domain), leave-one-out over the distinct items: the last interaction is test
      and the one before it valid, so that every (user, domain) keeps at least one train item
      (test needs 2 distinct items, valid 3). Every row of a held-out (user, domain, item)
      interaction follows it, so no interaction is in train and in valid or test.
    - Cold-start users: when ``cold_domain`` is set, ``cold_user_ratio`` of the users that have
      rows in ``cold_domain`` and in another domain (drawn with ``seed``) lose their train rows
      there: all their ``cold_domain`` rows go to valid (the first half of them) or test (the
      second half); their other domains are split as above.
    """
    if schema.user is None or schema.domain is None:
        raise ValueError("a cross_domain split needs the schema's user and domain columns")
    if config.item not in frame.columns:
        raise ValueError(f"a cross_domain split needs the item column {config.item!r}; the table has {frame.columns}")
    if not 0.0 <= config.cold_user_ratio < 1.0:
        raise ValueError(f"cold_user_ratio must be in [0, 1), got {config.cold_user_ratio}")
    user, domain, item = schema.user, schema.domain, config.item
    time = [schema.time] if schema.time is not None else []
    rows = frame.select(user, domain, item, *time).with_columns(pl.int_range(pl.len()).alias("_row"))
    pair = [user, domain]
    # each distinct interaction is placed at its last occurrence; rank 0 = the last of its pair
    interactions = rows.group_by([*pair, item]).agg(pl.col([*time, "_row"]).max()).with_columns(
        pl.struct(*time, "_row").rank("ordinal", descending=True).over(pair).sub(1).alias("_from_end"),
        pl.len().over(pair).alias("_n"),
    ).with_columns(
        pl.when((pl.col("_from_end") == 0) & (pl.col("_n") >= 2))
        .then(2)
        .when((pl.col("_from_end") == 1) & (pl.col("_n") >= 3))
        .then(1)
        .otherwise(0)
        .cast(pl.Int8)
        .alias("_code")
    )
    coded = rows.join(interactions.select(*pair, item, "_code"), on=[*pair, item], how="left")
    if config.cold_domain is not None and config.cold_user_ratio > 0:
        coded = _hold_out_cold_users(coded, user, domain, config)
    return coded.sort("_row")["_code"].to_numpy().astype(np.int8)


def _hold_out_cold_users(coded: pl.DataFrame, user: str, domain: str, config: SplitConfig) -> pl.DataFrame:
    """Move all ``cold_domain`` rows of a seeded share of the overlapping users to valid / test."""
    cold = str(config.cold_domain)
    domains = coded[domain].cast(pl.String)
    if cold not in set(domains.unique().to_list()):
        raise ValueError(f"cold_domain {cold!r} is not a value of the domain column {domain!r}")
    in_cold = coded.filter(domains == cold)[user].unique()
    elsewhere = coded.filter(domains != cold)[user].unique()
    overlapping = np.sort(in_cold.filter(in_cold.is_in(elsewhere.implode())).to_numpy())
    n_cold = int(round(config.cold_user_ratio * len(overlapping)))
    chosen = np.random.default_rng(config.seed).permutation(len(overlapping))[:n_cold]
    held = pl.DataFrame({user: overlapping[chosen], "_cold_code": np.where(np.arange(n_cold) < n_cold // 2, 1, 2).astype(np.int8)})
    held = held.with_columns(pl.col(user).cast(coded[user].dtype))
    coded = coded.join(held, on=user, how="left")
    is_cold_row = (pl.col(domain).cast(pl.String) == cold) & pl.col("_cold_code").is_not_null()
    return coded.with_columns(pl.when(is_cold_row).then(pl.col("_cold_code")).otherwise(pl.col("_code")).alias("_code"))


def _cold_start(frame: pl.DataFrame, time_column: str, config: SplitConfig, origin: str) -> np.ndarray:
    if config.item not in frame.columns:
        raise ValueError(f"cold_start split: item column {config.item!r} is not in the table {frame.columns}")
    time = frame[time_column].to_numpy()
    if len(time) > 1 and (np.diff(time) < 0).any():
        row = int(np.flatnonzero(np.diff(time) < 0)[0]) + 1
        raise ValueError(f"cold_start split: rows must be in time order; column {time_column!r}, {locate(origin, row)} goes back in time")
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
