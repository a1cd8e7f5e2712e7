"""``standard``: train the cell's experiment with the trainer and record its metrics.

Each metric ``<split>_<name>`` of the run (valid and test, from the best weights) becomes a record
of that split; ``epochs``, ``best_epoch`` and ``steps`` are records of the split ``fit``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from recforge.experiment import run
from recforge.protocols import Cell, Protocol, record, register_protocol

SPLITS = ("train", "valid", "test")


def metric_records(metrics: dict[str, float]) -> list[dict[str, Any]]:
    """``{valid_click_auc: v}`` -> a record of split valid, metric click_auc; others of split fit."""
    out = []
    for key, value in metrics.items():
        split, _, name = key.partition("_")
        out.append(record(split, name, value) if split in SPLITS and name else record("fit", key, value))
    return out


@register_protocol
class Standard(Protocol):
    name = "standard"

    def run(self, cell: Cell, out: Path) -> list[dict[str, Any]]:
        return metric_records(run(cell.config, out, overwrite=True, store_root=cell.store_root))  # the engine claimed the folder
