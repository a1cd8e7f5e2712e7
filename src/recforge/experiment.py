"""One experiment, end to end: source -> store -> model -> trainer -> metrics and report."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import polars as pl
import torch
import yaml

from recforge.bundle import bundle_folder, load_bundle, save_bundle
from recforge.config import DataConfig, ExperimentConfig, load_config
from recforge.data import inputs
from recforge.data.prepare import Fitted, prepare
from recforge.data.sources import load_source
from recforge.data.splits import SPLITS, SplitConfig
from recforge.data.store import STAMP_FILE, Store
from recforge.errors import ConfigError, RunError
from recforge.files import take_lock, versions, wait_for_lock, write_atomic
from recforge.models import build_model
from recforge.models.base import model_class, protocol_of
from recforge.train import distributed
from recforge.train.trainer import TrainConfig, Trainer, resume_point, seed_everything


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
        vector_files = [Path(f.vectors) for f in raw.schema.content_embeddings if f.vectors is not None and Path(f.vectors).is_file()]
        found = inputs.describe([*raw.inputs, *folder_files, *vector_files])
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


RUN_FILES = ("config.yaml", "metrics.json", "report.md", "metrics.jsonl")
RUN_FOLDERS = ("model", "last", "best")
LOCK_FILE = ".lock"


def run(
    config: ExperimentConfig,
    out: Path,
    resume: bool = False,
    overwrite: bool = False,
    store_root: Path = Path("runs/stores"),
) -> dict:
    """Train ``config`` into ``out``: metrics.jsonl and checkpoints while training, then model/,
    config.yaml, report.md and, last, metrics.json, which marks the run finished.

    ``out`` is locked (``out/.lock``, held by rank 0) while this runs, so a second run into it fails
    at once. A folder that holds an earlier run's outputs is refused unless ``resume`` continues
    that run from its last checkpoint or ``overwrite`` deletes those outputs first; the other files
    in ``out`` are never touched.
    """
    required = protocol_of(model_class(config.model.name))
    if required is not None:
        raise ConfigError(
            f"model {config.model.name!r} trains under the {required!r} protocol: run it with "
            f"`recforge study SPEC.yaml` and `protocol: {required}` in the spec"
        )
    if resume and overwrite:
        raise ConfigError("--resume continues the run in the folder and --overwrite deletes it: pass one of them")
    context = distributed.setup()
    lock = out / LOCK_FILE
    if context.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if not take_lock(lock):
            raise RunError(
                f"{out}: another process (pid {_holder(lock)}) is writing this run folder; "
                "wait for it to end or choose another --out"
            )
    try:
        if context.is_main:  # one process encodes the data; the others wait for it
            _claim_outputs(out, resume, overwrite)
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
        metrics |= {f"side_{name}": value for name, value in model.side_report().items()}
        (out / "metrics.json").unlink(missing_ok=True)  # not finished while the outputs below are rewritten
        save_bundle(model, store, out / "model")
        write_atomic(out / "config.yaml", yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
        write_atomic(out / "report.md", report(config, metrics))
        write_atomic(out / "metrics.json", json.dumps(metrics, indent=2))
        return metrics
    finally:
        if context.is_main:
            lock.unlink(missing_ok=True)


def _holder(lock: Path) -> str:
    """The pid that the lock file ``lock`` names (see :func:`recforge.files.take_lock`)."""
    try:
        return str(json.loads(lock.read_text())["pid"])
    except (OSError, ValueError, KeyError):  # released, or being written, meanwhile
        return "unknown"


def _run_outputs(out: Path) -> list[Path]:
    """What runs wrote in ``out``, with what interrupted writes left."""
    paths = [path for name in RUN_FILES for path in (out / name, *sorted(out.glob(f".{name}.*.tmp")))]
    paths += [path for name in RUN_FOLDERS for path in versions(out / name)]
    return [path for path in paths if path.exists()]


def _claim_outputs(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse ``out`` when it holds a run, unless ``resume`` (it has a checkpoint) or ``overwrite`` (delete it)."""
    found = _run_outputs(out)
    if found and not (resume or overwrite):
        names = ", ".join(path.name for path in found)
        raise RunError(
            f"{out}: already holds a run ({names}); pass --overwrite to delete its outputs first, or --resume to continue it"
        )
    if overwrite:
        for path in found:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    if resume:
        resume_point(out)  # no checkpoint: fail before the data is prepared


@contextmanager
def encoded_with_bundle(config: ExperimentConfig, bundle: Path) -> Iterator[Store]:
    """A run's data, read again through its ``config`` and encoded with the vocabularies and
    normalisers of ``bundle`` (never fitted anew), as a store in a temporary folder."""
    with tempfile.TemporaryDirectory(prefix="recforge-encoded-") as scratch:
        raw = load_source(config.data.source, **config.data.options)
        yield prepare(raw, Path(scratch) / "store", config.data.split, fitted=Fitted.load(bundle))


def evaluate_run(run_dir: Path, split: str = "test") -> dict:
    """Recompute a finished run's metrics on ``split`` from its bundle alone.

    The run's data is read again through its config and encoded with the bundle's vocabularies and
    normalisers (never fitted anew); ``<split>_oov_values`` counts the values no vocabulary entry
    holds, and ``<split>_oov_<feature>`` each feature's share of them.
    """
    if split not in SPLITS:
        raise RunError(f"--split must be one of {', '.join(SPLITS)}, not {split!r}")
    try:
        json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        raise RunError(f"{run_dir}: not a finished run (no readable metrics.json); train it to the end first") from None
    config = load_config(run_dir / "config.yaml")
    model, bundle = load_bundle(run_dir / "model"), bundle_folder(run_dir / "model")
    with encoded_with_bundle(config, bundle) as store:
        metrics = Trainer(model, store, TrainConfig(**config.train), store.path).evaluate(split)
        oov = json.loads((store.path / "oov.json").read_text())[split]
    return metrics | {f"{split}_oov_values": sum(oov.values())} | {f"{split}_oov_{k}": n for k, n in oov.items() if n}


def score_file(run_dir: Path, data: Path, out: Path, batch_size: int = 4096) -> dict:
    """Write the predictions of a finished run's ranker (``run_dir``: its run folder, or a bundle
    written by ``recforge export``, whose manifest is checked first) for every row of the table ``data``.

    ``data`` is read with the bundle's schema (its label columns may be absent) and encoded with the
    bundle's vocabularies and normalisers. ``out`` (Parquet, written atomically) holds ``row`` (the
    0-based row of ``data``) and one probability column per predicted label, in the table's order.
    Histories are built from the rows of ``data`` alone. Returns the row count and the
    out-of-vocabulary counts per feature.
    """
    from recforge.data.sources import load_file
    from recforge.models.capabilities import Ranker

    if not run_dir.is_dir():
        raise RunError(f"{run_dir}: no such run folder")
    if (run_dir / "manifest.json").is_file():  # an exported bundle
        from recforge.serve.export import check_bundle

        check_bundle(run_dir)
        bundle = run_dir
    else:
        bundle = bundle_folder(run_dir / "model")
    model = load_bundle(bundle)
    if not isinstance(model, Ranker):
        raise RunError(f"{run_dir}: model {model.registry_name!r} ranks no rows (it is not a ranker); score writes a ranker's probabilities")
    fitted = Fitted.load(bundle)
    raw = load_file(data, fitted.schema, require_labels=False)
    with tempfile.TemporaryDirectory(prefix="recforge-score-") as scratch:
        store = prepare(raw, Path(scratch) / "store", SplitConfig(ratios=(0.0, 0.0, 1.0)), fitted=fitted)
        view = store.split("test")
        columns: dict[str, list[np.ndarray]] = {}
        with torch.inference_mode():
            for batch in view.batches(batch_size):
                for name, prob in model.predict(model(batch)).items():
                    columns.setdefault(name, []).append(prob.float().numpy())
        order = np.argsort(view.row)
        frame = pl.DataFrame({"row": np.asarray(view.row)[order]} | {n: np.concatenate(p)[order] for n, p in columns.items()})
        oov = json.loads((store.path / "oov.json").read_text())["test"]
    staging = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    frame.write_parquet(staging)
    os.replace(staging, out)
    return {"rows": frame.height, "oov_values": sum(oov.values())} | {f"oov_{k}": n for k, n in oov.items() if n}


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
