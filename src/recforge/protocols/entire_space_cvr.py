"""``entire_space_cvr``: a funnel model trained as usual, then its pCVR scored over every exposure.

For the sources whose every exposure has a known truth (``p_cvr`` and ``would_convert`` columns,
evaluation only: the simulator and the semi-synthetic MovieLens funnel), the model's pCVR on the
test split is joined by raw row to the truth and scored with
:func:`~recforge.evaluate.metrics.entire_space_cvr_report` (ES-CVR AUC over all exposures and the
unclicked ones, calibration, and the Bayes AUC of the true p_cvr). The trainer's own metrics are
recorded as by the ``standard`` protocol.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from recforge.bundle import load_bundle
from recforge.data.sources import load_source
from recforge.errors import DataError, ModelConfigError
from recforge.evaluate.metrics import entire_space_cvr_report
from recforge.experiment import prepare_store, run
from recforge.models.capabilities import Funnel
from recforge.protocols import Cell, Protocol, record, register_protocol
from recforge.protocols.standard import metric_records

TRUTH = ("p_cvr", "would_convert")


@register_protocol
class EntireSpaceCVR(Protocol):
    name = "entire_space_cvr"

    def run(self, cell: Cell, out: Path) -> list[dict[str, Any]]:
        config = cell.config
        raw = load_source(config.data.source, **config.data.options)
        missing = [c for c in TRUTH if c not in raw.frame.columns]
        if missing:
            raise DataError(f"{raw.origin}: the entire_space_cvr protocol needs the truth columns {missing} of every exposure")
        truth = raw.frame.select("click", *TRUTH)
        metrics = run(config, out, overwrite=True, store_root=cell.store_root)  # the engine claimed the folder
        scores = entire_space(config, out / "model", cell.store_root, truth)
        return metric_records(metrics) + [record("test", name, value) for name, value in scores.items()]


@torch.inference_mode()
def entire_space(config, bundle: Path, store_root: Path, truth: pl.DataFrame) -> dict[str, float]:
    """Entire-space CVR metrics of the bundle's model on the test split."""
    store = prepare_store(config.data, store_root)
    model = load_bundle(bundle)
    if not isinstance(model, Funnel) or model.funnel_labels() is None:
        raise ModelConfigError(f"model {config.model.name!r} predicts no click -> conversion funnel")
    click_label, conversion_label = model.funnel_labels()
    view = store.split("test")
    p_cvr = torch.cat([model.predict(model(b))[conversion_label] for b in view.batches(65536)]).numpy()
    rows = truth[np.asarray(view.row)]
    if not np.array_equal(rows["click"].to_numpy(), view.column(click_label).astype(np.int8)):
        raise ValueError(f"{bundle}: the truth table does not line up with the store's test rows")
    return entire_space_cvr_report(rows["click"].to_numpy(), rows["would_convert"].to_numpy(),
                                   rows["p_cvr"].to_numpy(), p_cvr)  # fmt: skip
