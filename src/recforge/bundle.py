"""A model bundle: everything needed to rebuild a trained model, and nothing else.

```
model/
  model.safetensors   the weights (state dict)
  side.safetensors    the model's side data (interaction index, item graph ...), when it has any
  model.json          {"name": registered name, "params": the full resolved config}
  schema.json         the schema of the encoded data
  vocab/              the vocabularies (one Parquet file each)
  normalisers.json    the numeric normalisers
```

:func:`load_bundle` rebuilds the model from these files alone: no store, no training data.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from recforge.data.schema import Schema
from recforge.data.store import Store
from recforge.models import Model, build_model

WEIGHTS, SIDE, SPEC = "model.safetensors", "side.safetensors", "model.json"


def save_bundle(model: Model, store: Store, path: Path) -> None:
    """Write the bundle of ``model`` (trained on ``store``) to ``path``, replacing what was there."""
    staging = path.with_name(path.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, staging / WEIGHTS)
    if model.side:
        save_file({k: v.detach().contiguous().cpu() for k, v in model.side.items()}, staging / SIDE)
    spec = {"name": model.registry_name, "params": dataclasses.asdict(model.config)}
    (staging / SPEC).write_text(json.dumps(spec, indent=2))
    store.schema.save(staging / "schema.json")
    shutil.copytree(store.path / "vocab", staging / "vocab")
    shutil.copy(store.path / "normalisers.json", staging / "normalisers.json")
    shutil.rmtree(path, ignore_errors=True)
    staging.rename(path)


def load_bundle(path: Path) -> Model:
    """The model of the bundle at ``path``, in eval mode."""
    spec = json.loads((path / SPEC).read_text())
    side = load_file(path / SIDE) if (path / SIDE).exists() else {}
    model = build_model(spec["name"], Schema.load(path / "schema.json"), spec["params"], side=side)
    model.load_state_dict(load_file(path / WEIGHTS))
    return model.eval()
