"""One experiment, end to end: source -> store -> model -> trainer -> metrics and report."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from recforge.bundle import load_bundle, save_bundle
from recforge.config import DataConfig, ExperimentConfig
from recforge.data.prepare import prepare
from recforge.data.sources import load_source
from recforge.data.store import Store
from recforge.files import wait_for_lock, write_atomic
from recforge.models import build_model
from recforge.models.base import model_class, protocol_of
from recforge.train import distributed
from recforge.train.trainer import TrainConfig, Trainer, seed_everything


def prepare_store(data: DataConfig, root: Path = Path("runs/stores")) -> Store:
    """Open the store of ``data``, encoding it first unless an identical one exists."""
    path = data.store_path(root)
    stamp = path / "data.json"
    wanted = data.model_dump(mode="json", exclude={"store"})
    if stamp.exists() and json.loads(stamp.read_text()) == wanted:
        return Store.open(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_name(path.name + ".lock")
    wait_for_lock(lock)  # processes preparing one store take turns; the later ones find it done
    try:
        if stamp.exists() and json.loads(stamp.read_text()) == wanted:
            return Store.open(path)
        store = prepare(load_source(data.source, **data.options), path, data.split)
        write_atomic(stamp, json.dumps(wanted, indent=2))
        return store
    finally:
        lock.unlink(missing_ok=True)


def run(config: ExperimentConfig, out: Path, resume: bool = False, store_root: Path = Path("runs/stores")) -> dict:
    """Train ``config`` into ``out`` and write metrics.json, model/ and report.md there."""
    required = protocol_of(model_class(config.model.name))
    if required is not None:
        raise ValueError(
            f"model {config.model.name!r} trains under the {required!r} protocol: run it with "
            f"`recforge study SPEC.yaml` and `protocol: {required}` in the spec"
        )
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
    model = build_model(config.model.name, store.schema, config.model.params, store=store)
    trainer = Trainer(model, store, train_config, out)
    metrics = trainer.fit(resume=resume)
    if not trainer.is_main:
        return {}
    save_bundle(model, store, out / "model")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "report.md").write_text(report(config, metrics))
    return metrics


def evaluate_run(run_dir: Path, split: str = "test", store_root: Path = Path("runs/stores")) -> dict:
    """Reload a finished run's model and recompute its metrics on ``split``."""
    config = ExperimentConfig.model_validate(yaml.safe_load((run_dir / "config.yaml").read_text()))
    store = prepare_store(config.data, store_root)
    model = load_bundle(run_dir / "model")
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
