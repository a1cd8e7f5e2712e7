"""Checkpoints: safetensors for tensors, JSON for everything else; nothing is unpickled.

A checkpoint is a directory::

    model.safetensors       the model's state dict
    optimizer.safetensors   every tensor of the optimiser state (absent when none is saved)
    state.json              {"state": caller's JSON state, "optimizer": the optimiser state's
                            structure, its tensors replaced by references into the file above}

A directory that marks a state (a checkpoint, a model bundle) is replaced as one unit. Its files
are written to ``<name>.tmp`` beside it and flushed to disk, its marker file (``state.json``)
last; then :func:`install_directory`

1. renames a complete ``<name>`` to ``<name>.old``, discarding an older ``<name>.old`` first
   (when ``<name>`` is absent, a killed save left ``<name>.old`` as the complete one: it stays);
2. renames ``<name>.tmp`` to ``<name>``;
3. discards ``<name>.old``.

A directory is discarded by renaming it ``<name>.trash`` before deleting it, so a half-deleted
one is never taken for complete. At every instant ``<name>`` or ``<name>.old`` is complete, and
:func:`find_complete` returns it (``<name>`` first); ``.tmp`` and ``.trash`` are never read.
Unreadable files fail as :class:`~recforge.errors.CheckpointError` naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import Tensor, nn

from recforge.errors import CheckpointError
from recforge.files import find_complete, install_directory, stage_directory

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
    staging = stage_directory(final)
    save_model(model, str(staging / MODEL_FILE))
    document: dict[str, Any] = {"state": state}
    if optimizer_state is not None:
        tensors: dict[str, Tensor] = {}
        document["optimizer"] = _encode(optimizer_state, (), tensors)
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(staging / OPTIMIZER_FILE))
    install_directory(staging, final, STATE_FILE, json.dumps(document, indent=1))


def find_checkpoint(directory: str | Path) -> Path | None:
    """The complete checkpoint saved at ``directory`` (or the one a killed save was replacing)."""
    return find_complete(Path(directory), STATE_FILE)


def load_checkpoint(directory: str | Path, model: nn.Module) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Load the weights into ``model`` (in place); return ``(state, optimizer_state or None)``."""
    path = Path(directory)
    document = read_json(path / STATE_FILE)
    load_weights(path, model)
    optimizer_state = None
    if "optimizer" in document:
        optimizer_state = _decode(document["optimizer"], read_tensors(path / OPTIMIZER_FILE))
    return document["state"], optimizer_state


def read_checkpoint_state(directory: str | Path) -> dict[str, Any]:
    """The JSON state a checkpoint was saved with, without reading its tensors."""
    return read_json(Path(directory) / STATE_FILE)["state"]


def load_weights(directory: str | Path, model: nn.Module) -> None:
    """Copy a checkpoint's weights into ``model``'s tensors, wherever they live (strict)."""
    path = Path(directory) / MODEL_FILE
    try:
        load_model(model, str(path), strict=True)
    except (FileNotFoundError, SafetensorError) as err:
        raise _unreadable(path, err) from None


def read_tensors(path: Path) -> dict[str, Tensor]:
    """The tensors of the safetensors file ``path``."""
    try:
        return load_file(path)
    except (FileNotFoundError, SafetensorError) as err:
        raise _unreadable(path, err) from None


def read_json(path: Path) -> Any:
    """The JSON document in ``path``."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as err:
        raise _unreadable(path, err) from None
    except ValueError as err:  # not JSON, or not UTF-8
        raise CheckpointError(f"{path}: not a readable JSON file ({err})") from None


def _unreadable(path: Path, err: Exception) -> CheckpointError:
    if isinstance(err, FileNotFoundError):
        return CheckpointError(f"{path}: missing")
    return CheckpointError(f"{path}: not a readable safetensors file ({err})")


# --- optimiser states as JSON and tensors --------------------------------------------------------
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
