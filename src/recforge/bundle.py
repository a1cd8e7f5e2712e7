"""A model bundle: everything needed to rebuild a trained model, and nothing else.

```
model/
  model.safetensors   the weights (state dict)
  side.safetensors    the model's side data (interaction index, item graph ...), when it has any
  model.json          {"name": registered name, "params": the full resolved config}
  schema.json         the schema of the encoded data
  vocab/              the vocabularies (one Parquet file each)
  normalisers.json    the numeric normalisers
  embedding/          the vector tables of embeddings from text or a vector file, with their keys
```

:func:`load_bundle` rebuilds the model from these files alone: no store, no training data. A
bundle is replaced as one unit, ``model.json`` last, like a checkpoint (see
:mod:`recforge.train.checkpoint`): at every instant ``model/`` or ``model.old/`` is complete.
Unreadable files fail as :class:`~recforge.errors.CheckpointError` naming the file.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from safetensors.torch import save_file

from recforge.data.schema import Schema
from recforge.data.store import Store
from recforge.errors import CheckpointError
from recforge.models import Model, build_model
from recforge.files import find_complete, install_directory, stage_directory
from recforge.train.checkpoint import read_json, read_tensors

WEIGHTS, SIDE, SPEC = "model.safetensors", "side.safetensors", "model.json"


def save_bundle(model: Model, store: Store, path: Path) -> None:
    """Write the bundle of ``model`` (trained on ``store``) to ``path``, replacing what was there."""
    staging = stage_directory(path)
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, staging / WEIGHTS)
    if model.side:
        save_file({k: v.detach().contiguous().cpu() for k, v in model.side.items()}, staging / SIDE)
    store.schema.save(staging / "schema.json")
    shutil.copytree(store.path / "vocab", staging / "vocab")
    shutil.copy(store.path / "normalisers.json", staging / "normalisers.json")
    for f in store.schema.content_embeddings:
        (staging / "embedding").mkdir(exist_ok=True)
        for name in (f"{f.name}.npy", f"{f.name}.keys.parquet"):
            shutil.copy(store.path / "embedding" / name, staging / "embedding" / name)
    spec = {"name": model.registry_name, "params": dataclasses.asdict(model.config)}
    install_directory(staging, path, SPEC, json.dumps(spec, indent=2))


def bundle_folder(path: Path) -> Path:
    """The complete bundle saved at ``path``: ``path`` itself, or the ``model.old`` a killed save left."""
    found = find_complete(path, SPEC)
    if found is None:
        raise CheckpointError(f"{path}: no model bundle (no {SPEC})")
    return found


def load_bundle(path: Path) -> Model:
    """The model of the bundle at ``path`` (or of the ``model.old`` a killed save left), in eval mode."""
    found = bundle_folder(path)
    spec = read_json(found / SPEC)
    side = read_tensors(found / SIDE) if (found / SIDE).exists() else {}
    model = build_model(spec["name"], Schema.load(found / "schema.json"), spec["params"], side=side)
    model.load_state_dict(read_tensors(found / WEIGHTS))
    return model.eval()
