"""Public data sets: each module reads the originals and returns a :class:`RawDataset`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl

from recforge.data.schema import Schema


@dataclass
class RawDataset:
    """A raw table (one row per sample) and the schema that declares its columns."""

    frame: pl.DataFrame
    schema: Schema
    origin: str  # file or generator the rows came from, named in error messages
