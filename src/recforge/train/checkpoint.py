"""Checkpoints: safetensors for tensors, JSON for everything else; nothing is unpickled.

A checkpoint is a directory::

    model.safetensors       the model's state dict
    optimizer.safetensors   every tensor of the optimiser state (absent when none is saved)
    state.json              {"state": caller's JSON state, "optimizer": the optimiser state's
                            structure, its tensors replaced by references into the file above}

It is written as one unit: the files go to ``<name>.tmp`` beside it, are flushed to disk, and
the directory takes the place of the previous one by ``os.replace`` (the previous one is first
renamed ``<name>.old`` and removed last). A process killed at any moment leaves either the new
checkpoint or the previous one, which :func:`find_checkpoint` picks up.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, load_model, save_file, save_model
from torch import Tensor, nn

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"


def save_checkpoint(
    directory: str | Path,
    model: nn.Module,
    state: dict[str, Any],
    optimizer_state: dict[str, Any] | None = None,
) -> None:
    """Atomically write ``model``'s weights, the JSON-serialisable ``state`` and an optimiser state.

    ``optimizer_state`` is any nesting of dicts (str or int keys), lists and tuples whose leaves
    are tensors or JSON values, e.g. ``torch.optim.Optimizer.state_dict()``.
    """
    final = Path(directory)
    staging = final.with_name(final.name + ".tmp")
    previous = final.with_name(final.name + ".old")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)

    save_model(model, str(staging / MODEL_FILE))
    document: dict[str, Any] = {"state": state}
    if optimizer_state is not None:
        tensors: dict[str, Tensor] = {}
        document["optimizer"] = _encode(optimizer_state, (), tensors)
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(staging / OPTIMIZER_FILE))
    (staging / STATE_FILE).write_text(json.dumps(document, indent=1))
    for path in staging.iterdir():
        _fsync(path)
    _fsync(staging)

    shutil.rmtree(previous, ignore_errors=True)
    if final.exists():
        os.replace(final, previous)
    os.replace(staging, final)
    _fsync(final.parent)
    shutil.rmtree(previous, ignore_errors=True)


def find_checkpoint(directory: str | Path) -> Path | None:
    """The complete checkpoint saved at ``directory`` (or the one a killed save was replacing)."""
    final = Path(directory)
    for candidate in (final, final.with_name(final.name + ".old")):
        if (candidate / STATE_FILE).is_file():
            return candidate
    return None


def load_checkpoint(directory: str | Path, model: nn.Module) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Load the weights into ``model`` (in place); return ``(state, optimizer_state or None)``."""
    path = Path(directory)
    document = json.loads((path / STATE_FILE).read_text())
    load_weights(path, model)
    optimizer_state = None
    if "optimizer" in document:
        tensors = load_file(str(path / OPTIMIZER_FILE))
        optimizer_state = _decode(document["optimizer"], tensors)
    return document["state"], optimizer_state


def load_weights(directory: str | Path, model: nn.Module) -> None:
    """Copy a checkpoint's weights into ``model``'s tensors, wherever they live (strict)."""
    load_model(model, str(Path(directory) / MODEL_FILE), strict=True)


def _encode(value: Any, path: tuple[str, ...], tensors: dict[str, Tensor]) -> Any:
    """JSON form of a nested value: tensors become ``{"tensor": key}``, dicts ``{"dict": [[k, v], ...]}``.

    Every JSON object in the result is one of these two markers, so decoding is unambiguous and
    integer dict keys (optimiser states are keyed by parameter index) survive.
    """
    if isinstance(value, Tensor):
        key = "/".join(path)
        tensors[key] = value
        return {"tensor": key}
    if isinstance(value, dict):
        return {"dict": [[k, _encode(v, (*path, str(k)), tensors)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return [_encode(v, (*path, str(i)), tensors) for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store {type(value).__name__} at {'/'.join(path)!r} in a checkpoint")


def _decode(value: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(value, dict):
        if "tensor" in value:
            return tensors[value["tensor"]]
        return {k: _decode(v, tensors) for k, v in value["dict"]}
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    return value


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
