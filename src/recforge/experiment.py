"""One experiment, end to end: source -> store -> model -> trainer -> metrics and report."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import yaml

from recforge.bundle import load_bundle, save_bundle
from recforge.config import DataConfig, ExperimentConfig, load_config
from recforge.data import inputs
from recforge.data.prepare import Fitted, prepare
from recforge.data.splits import SPLITS
from recforge.errors import RunError
from recforge.data.sources import load_source
from recforge.data.store import STAMP_FILE, Store
from recforge.files import wait_for_lock, write_atomic
from recforge.models import build_model
from recforge.models.base import model_class, protocol_of
from recforge.train import distributed
from recforge.train.trainer import TrainConfig, Trainer, seed_everything


def _notice(line: str) -> None:
    print(line, file=sys.stderr)


def prepare_store(data: DataConfig, root: Path = Path("runs/stores"), notice=_notice) -> Store:
    """Open the store of ``data``, encoding it first unless one prepared from the same config and
    the same input content exists; ``notice`` receives the one line that says why a store is
    prepared again."""
    path = data.store_path(root)
    stamp = path / STAMP_FILE
    wanted = data.model_dump(mode="json", exclude={"store"})
    if _stale(stamp, wanted) is None:
        return Store.open(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_name(path.name + ".lock")
    wait_for_lock(lock)  # processes preparing one store take turns; the later ones find it done
    try:
        reason = _stale(stamp, wanted)
        if reason is None:
            return Store.open(path)
        if stamp.exists():
            notice(f"store {path}: {reason}; preparing it again")
            stamp.unlink()  # readers without the lock see no store until the new one is complete
        with inputs.reading() as folder_files:
            raw = load_source(data.source, **data.options)
        found = inputs.describe([*raw.inputs, *folder_files])
        store = prepare(raw, path, data.split)
        document = {"config": wanted, "inputs": found, "fingerprint": inputs.fingerprint(wanted, found)}
        write_atomic(stamp, json.dumps(document, indent=1))
        return store
    finally:
        lock.unlink(missing_ok=True)


def _stale(stamp: Path, wanted: dict) -> str | None:
    """Why the store stamped by ``stamp`` is not the one ``wanted`` describes, or None when it is."""
    try:
        document = json.loads(stamp.read_text())
    except FileNotFoundError:
        return "not prepared"
    except ValueError:
        return "its stamp is unreadable"
    if not isinstance(document, dict) or "fingerprint" not in document:
        return "it was prepared without a record of its inputs"
    if document["config"] != wanted:
        return "its data config differs"
    reason, refreshed = inputs.check(document["inputs"])
    if reason is None and refreshed != document["inputs"]:  # touched but unchanged: remember the new times
        write_atomic(stamp, json.dumps({**document, "inputs": refreshed}, indent=1))
    return reason


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


def evaluate_run(run_dir: Path, split: str = "test") -> dict:
    """Recompute a finished run's metrics on ``split`` from its bundle alone.

    The run's data is read again through its config and encoded with the bundle's vocabularies and
    normalisers (never fitted anew); ``<split>_oov_values`` counts the values no vocabulary entry
    holds, and ``<split>_oov_<feature>`` each feature's share of them.
    """
    if split not in SPLITS:
        raise RunError(f"--split must be one of {', '.join(SPLITS)}, not {split!r}")
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "model").is_dir():
        raise RunError(f"{run_dir}: not a finished run (it needs config.yaml and model/)")
    config = load_config(run_dir / "config.yaml")
    model = load_bundle(run_dir / "model")
    with tempfile.TemporaryDirectory(prefix="recforge-evaluate-") as scratch:
        raw = load_source(config.data.source, **config.data.options)
        store = prepare(raw, Path(scratch) / "store", config.data.split, fitted=Fitted.load(run_dir / "model"))
        metrics = Trainer(model, store, TrainConfig(**config.train), scratch).evaluate(split)
        oov = json.loads((store.path / "oov.json").read_text())[split]
    return metrics | {f"{split}_oov_values": sum(oov.values())} | {f"{split}_oov_{k}": n for k, n in oov.items() if n}


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
