"""`recforge export`: a finished run's bundle as a serving bundle that checks itself.

```
BUNDLE/
  (the run's bundle files: model.safetensors, model.json, schema.json, vocab/, ...)
  model.onnx      the ranker's probabilities as an ONNX graph, when it exports and matches torch
  manifest.json   format and recforge version, model name, creation time, sha256 and size of
                  every other file, and what became of the ONNX export
```

The graph is exported by torch's ``torch.export``-based exporter (``dynamo=True``, which needs
``onnxscript``; the TorchScript exporter is deprecated) from a few test rows, with a dynamic batch
axis, and is kept only if ONNX Runtime's probabilities equal torch's within :data:`TOLERANCE` on
up to :data:`CHECK_ROWS` test rows of the run, its data read again and encoded with the bundle's
vocabularies. A model that is no ranker, fails to export or differs is served by torch; the
manifest says why. The bundle is written as one unit, ``manifest.json`` last.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import io
import json
import logging
import math
import re
import shutil
import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from recforge.bundle import bundle_folder, load_bundle
from recforge.config import load_config
from recforge.data.batch import Batch
from recforge.errors import CheckpointError, RecforgeError, RunError
from recforge.experiment import encoded_with_bundle
from recforge.files import install_directory, stage_directory
from recforge.models import Model
from recforge.models.capabilities import Ranker
from recforge.serve.scorer import MANIFEST, ONNX_GRAPH, OUTPUT_PREFIX, OnnxScorer, TorchScorer, batch_from_tensors, batch_tensors, input_names
from recforge.train.checkpoint import read_json

FORMAT_VERSION = 1
TOLERANCE = 1e-5  # largest |onnx - torch| probability a kept graph may show
CHECK_ROWS = 2048  # test rows the graph is checked on
TRACE_ROWS = 4  # rows the graph is exported from (more than 1, so that the batch axis stays dynamic)


class BatchGraph(nn.Module):
    """``model``'s probabilities of ``labels`` from the batch tensors, in :func:`input_names` order."""

    def __init__(self, model: Model, labels: list[str]) -> None:
        super().__init__()
        self.model = model
        self.labels = labels

    def forward(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        probabilities = self.model.predict(self.model(batch_from_tensors(tensors, self.model.schema)))
        return tuple(probabilities[label] for label in self.labels)


def export_run(run_dir: Path, out: Path) -> dict:
    """Write the serving bundle of the finished run ``run_dir`` to ``out`` and return its manifest.

    ``out`` may hold an earlier export (it is replaced); any other non-empty folder is refused.
    """
    if not run_dir.is_dir():
        raise RunError(f"{run_dir}: no such run folder")
    if not (run_dir / "metrics.json").is_file():
        raise RunError(f"{run_dir}: not a finished run (no readable metrics.json); train it to the end first")
    if out.exists() and not (out / MANIFEST).is_file() and (not out.is_dir() or any(out.iterdir())):
        raise RunError(f"{out}: exists and holds no exported bundle (no {MANIFEST}); choose another --out")
    bundle = bundle_folder(run_dir / "model")
    model = load_bundle(bundle)
    staging = stage_directory(out)
    try:
        shutil.copytree(bundle, staging, dirs_exist_ok=True)
        onnx = _export_checked(model, run_dir, bundle, staging / ONNX_GRAPH)
        manifest = {
            "format_version": FORMAT_VERSION,
            "recforge_version": importlib.metadata.version("recforge"),
            "model": model.registry_name,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "files": {path.relative_to(staging).as_posix(): _describe(path) for path in sorted(staging.rglob("*")) if path.is_file()},
            "onnx": onnx,
        }
        install_directory(staging, out, MANIFEST, json.dumps(manifest, indent=2))
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # left only when the export failed
    return manifest


def check_bundle(path: Path) -> dict:
    """The manifest of the exported bundle ``path`` once every file it lists is there with its size
    and sha256; else :class:`CheckpointError` naming the first file that is not."""
    if not (path / MANIFEST).is_file():
        raise CheckpointError(f"{path}: no exported bundle (no {MANIFEST}); write one with `recforge export RUN --out BUNDLE`")
    manifest = read_json(path / MANIFEST)
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION or not all(
        isinstance(manifest.get(key), dict) for key in ("files", "onnx")
    ):
        raise CheckpointError(f"{path / MANIFEST}: not a manifest of bundle format {FORMAT_VERSION}")
    for name, listed in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing (the manifest lists it)")
        found = _describe(file)
        if found["bytes"] != listed["bytes"]:
            raise CheckpointError(f"{file}: {found['bytes']} bytes, the manifest says {listed['bytes']} (the file is truncated or was changed)")
        if found["sha256"] != listed["sha256"]:
            raise CheckpointError(f"{file}: sha256 differs from the manifest (the file is corrupted or was changed)")
    return manifest


def export_graph(model: Model, trace: Batch, check: Batch, path: Path, tolerance: float = TOLERANCE) -> dict:
    """Export ``model``'s probabilities to the ONNX file ``path`` from the rows ``trace`` and keep it
    if ONNX Runtime's equal torch's within ``tolerance`` on the rows ``check``; the manifest's
    ``onnx`` record of the outcome (``path`` is removed when it is not kept)."""
    expected = TorchScorer(model).score(check)
    try:
        _write_graph(BatchGraph(model, list(expected)).eval(), trace, path)
        found = OnnxScorer(path, model.registry_name, model.schema).score(check)
    except Exception as err:  # the exporter's and ONNX Runtime's errors have no common type
        path.unlink(missing_ok=True)
        return _not_exported(f"the export failed: {_root_cause(err)}")
    diff = max(float(np.abs(found[label] - p).max()) for label, p in expected.items())
    if not diff <= tolerance:
        path.unlink()
        return {
            "exported": False,
            "reason": f"its probabilities differ from torch's by {diff:.3g} (more than {tolerance:g}) on {len(check)} test rows",
            "max_abs_diff": diff if math.isfinite(diff) else None,
            "rows_checked": len(check),
        }
    return {"exported": True, "reason": None, "max_abs_diff": diff, "rows_checked": len(check)}


def _export_checked(model: Model, run_dir: Path, bundle: Path, path: Path) -> dict:
    """The ``onnx`` record of exporting ``model`` to ``path``, checked on the run's test rows."""
    if not isinstance(model, Ranker):
        return _not_exported(f"{model.registry_name} is not a ranker; only a ranker's probabilities are exported")
    config = load_config(run_dir / "config.yaml")
    try:
        with encoded_with_bundle(config, bundle) as store:
            view = store.split("test")
            if not len(view):
                return _not_exported("the run's test split has no rows to check the graph on")
            trace = view.take(np.arange(TRACE_ROWS) % len(view))
            check = view.take(np.arange(min(len(view), CHECK_ROWS)))
    except RecforgeError as err:
        return _not_exported(f"the run's data could not be read to check the graph on: {err}")
    return export_graph(model, trace, check, path)


def _write_graph(graph: BatchGraph, trace: Batch, path: Path) -> None:
    schema = graph.model.schema
    tensors = tuple(batch_tensors(trace, schema))
    batch = torch.export.Dim.DYNAMIC  # a named Dim fails (and the exporter falls back to static shapes) on an input the model never reads
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)  # its notes on optional packages (torchvision) are no news to the user
    try:  # what the exporter prints (a failed export's partial graph) is not for the user: its error is recorded
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                graph, tensors, str(path), dynamo=True, external_data=False, verbose=False,
                input_names=input_names(schema), output_names=[OUTPUT_PREFIX + label for label in graph.labels],
                dynamic_shapes=(tuple({0: batch} for _ in tensors),),
            )  # fmt: skip
    finally:
        exporter_log.setLevel(level)


def _not_exported(reason: str) -> dict:
    return {"exported": False, "reason": reason, "max_abs_diff": None, "rows_checked": 0}


def _root_cause(err: BaseException) -> str:
    """The innermost cause of ``err`` as one line: its type, its first line and the model code it
    names (the exporter wraps the error that says what in the model it cannot export)."""
    while err.__cause__ is not None:
        err = err.__cause__
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    first = next((" ".join(line.split()) for line in text.splitlines() if line.strip()), "no message")
    where = re.search(r"Caused by: \((.+?)\)", text)
    return f"{type(err).__name__}: {first}" + (f" ({where.group(1)})" if where else "")


def _describe(path: Path) -> dict:
    """``{"sha256": hex digest, "bytes": size}`` of the file ``path``."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return {"sha256": digest.hexdigest(), "bytes": path.stat().st_size}
