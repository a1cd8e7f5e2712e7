"""One experiment, end to end: source -> store -> model -> trainer -> metrics and report."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import yaml
from safetensors.torch import load_file, save_file

from recforge.config import DataConfig, ExperimentConfig
from recforge.data.prepare import prepare
from recforge.data.sources import load_source
from recforge.data.store import Store
from recforge.models import Model, build_model
from recforge.train import distributed
from recforge.train.trainer import TrainConfig, Trainer, seed_everything

RUN_LOCK = "running.pid"  # a run folder held by a live process holds its pid here


def prepare_store(data: DataConfig, root: Path = Path("runs/stores")) -> Store:
    """Open the store of ``data``, encoding it first unless an identical one exists."""
    path = data.store_path(root)
    stamp = path / "data.json"
    if stamp.exists() and json.loads(stamp.read_text()) == data.model_dump(mode="json", exclude={"store"}):
        return Store.open(path)
    raw = load_source(data.source, **data.options)
    store = prepare(raw, path, data.split)
    stamp.write_text(json.dumps(data.model_dump(mode="json", exclude={"store"}), indent=2))
    return store


def claim_run(out: Path) -> bool:
    """Mark the run folder ``out`` as taken by this process; False when a live process holds it.

    Lets several processes work through one study or table: each skips the runs another holds.
    """
    out.mkdir(parents=True, exist_ok=True)
    lock = out / RUN_LOCK
    if lock.exists():
        try:
            os.kill(int(lock.read_text()), 0)
            return False
        except (ProcessLookupError, ValueError):
            pass  # left by a process that died
    lock.write_text(str(os.getpid()))
    return True


def release_run(out: Path) -> None:
    """Undo :func:`claim_run` once the run is done."""
    (out / RUN_LOCK).unlink(missing_ok=True)


def run(config: ExperimentConfig, out: Path, resume: bool = False, store_root: Path = Path("runs/stores")) -> dict:
    """Train ``config`` into ``out`` and write metrics.json, model/ and report.md there."""
    context = distributed.setup()
    if context.is_main:  # one process encodes the data; the others wait for it
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
        store = prepare_store(config.data, store_root)
    distributed.barrier(context)
    if not context.is_main:
        store = Store.open(config.data.store_path(store_root))
    train_config = TrainConfig(**config.train)
    seed_everything(train_config.seed)
    model = build_model(config.model.name, store.schema, config.model.params)
    trainer = Trainer(model, store, train_config, out)
    metrics = trainer.fit(resume=resume)
    if not trainer.is_main:
        return {}
    save_model(model, config, store, out / "model")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "report.md").write_text(report(config, metrics))
    return metrics


def save_model(model: Model, config: ExperimentConfig, store: Store, path: Path) -> None:
    """Weights (safetensors), schema, vocabularies and normalisers: all that scoring needs."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path / "model.safetensors")
    (path / "model.json").write_text(json.dumps({"name": config.model.name, "params": config.model.params}, indent=2))
    store.schema.save(path / "schema.json")
    shutil.copytree(store.path / "vocab", path / "vocab")
    shutil.copy(store.path / "normalisers.json", path / "normalisers.json")


def load_model(path: Path) -> Model:
    from recforge.data.schema import Schema

    spec = json.loads((path / "model.json").read_text())
    model = build_model(spec["name"], Schema.load(path / "schema.json"), spec["params"])
    model.load_state_dict(load_file(path / "model.safetensors"))
    return model.eval()


def evaluate_run(run_dir: Path, split: str = "test", store_root: Path = Path("runs/stores")) -> dict:
    """Reload a finished run's model and recompute its metrics on ``split``."""
    config = ExperimentConfig.model_validate(yaml.safe_load((run_dir / "config.yaml").read_text()))
    store = prepare_store(config.data, store_root)
    model = load_model(run_dir / "model")
    trainer = Trainer(model, store, TrainConfig(**config.train), run_dir)
    return trainer.evaluate(split)


def report(config: ExperimentConfig, metrics: dict) -> str:
    lines = [
        f"# {config.name}",
        "",
        f"- data: `{config.data.source}` {json.dumps(config.data.options)}, split {config.data.split.kind} "
        f"{list(config.data.split.ratios)} seed {config.data.split.seed}",
        f"- model: `{config.model.name}` {json.dumps(config.model.params)}",
        f"- train: {json.dumps(config.train)}",
        "",
        "| metric | value |",
        "| --- | ---: |",
    ]
    lines += [f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
    return "\n".join(lines) + "\n"
