"""The training loop: optimisers, epochs, evaluation, early stopping, checkpoints, resume.

The trainer knows the model only through the :class:`~recforge.models.Model` contract, and the
data only through the store's split views. ``out_dir`` receives::

    metrics.jsonl   one JSON object per line: "train" (every ``log_every`` steps), "eval"
                    (each epoch's validation) and "final" (best weights on valid and test)
    last/           the latest checkpoint: model.safetensors, optimizer.safetensors, state.json
    best/           the weights with the best monitored metric: model.safetensors, state.json

Each checkpoint records every setting that shapes the run (:attr:`Trainer.shape`: the data's
fingerprint and split, the model's name and parameters, the trajectory settings, the monitor
and the world size); a run resumes only under the same, and a RunError names the one that
differs. ``epochs`` is not among them: a resumed run may train longer.

Reproducibility: the order of the batches is fixed by ``(seed, epoch)`` in the store, and the
python, numpy and torch generators are re-seeded before every step from ``(seed, rank, step)``.
A checkpoint therefore needs no generator state, and a run resumed from any checkpoint
(mid-epoch ones skip the batches already done) takes the very steps of an unbroken run and ends
with the same weights and metrics, bit for bit (on the same hardware and thread count).

Evaluation runs under ``torch.inference_mode()`` in batches of ``eval_batch_size``, by the
evaluator the model's declared capability picks (:func:`~recforge.evaluate.evaluators.evaluator_for`)
unless the caller (a study protocol) passes its own.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import pydantic
import torch
from pydantic import AfterValidator, Field
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import Tensor

from recforge.data.candidates import ItemSwap
from recforge.data.schema import Kind
from recforge.data.store import SplitView, Store
from recforge.errors import ConfigError, DataError, RunError
from recforge.evaluate.evaluators import Evaluator, evaluator_for
from recforge.files import versions
from recforge.models.base import Model
from recforge.train import distributed
from recforge.train.checkpoint import find_checkpoint, load_checkpoint, load_weights, read_checkpoint_state, save_checkpoint
from recforge.train.optim import Optimizers

QUIET_ENV = "RECFORGE_QUIET"  # set to a non-empty value other than "0" to silence the trainer

# train settings that shape the run: the sequence of steps and the choice of the best weights
_SHAPING = ("batch_size", "lr", "weight_decay", "sparse_lr", "clip_norm", "seed", "monitor", "mode", "negatives", "negative_item",
            "negative_features")  # fmt: skip


@pydantic.dataclasses.dataclass(config=pydantic.ConfigDict(extra="forbid"))
class TrainConfig:
    """Settings of a training run; each is checked against its type and bounds when it is set.

    - ``sparse_lr``: learning rate of the row-wise Adagrad on sparse embedding tables (``lr``
      and ``weight_decay`` are AdamW's, for every other parameter).
    - ``clip_norm``: the dense gradients' norm is clipped to it (None: no clipping).
    - ``patience``: stop after this many epochs without improvement of ``monitor`` (None: never).
    - ``monitor``: a metric name of ``evaluate("valid")``, e.g. ``valid_click_auc``, checked by
      one validation before the first step; None picks its first one (the AUC of the first
      predicted label, or recall@10). ``mode``: max or min.
    - ``checkpoint_every_steps``: also checkpoint every this many steps (0: at epoch ends only).
    - ``num_threads``: torch intra-op threads (None: torch's default).
    - ``negatives``: for data of positives only, each train row is followed by this many copies
      whose ``negative_item`` (and its ``negative_features``, and its item-keyed vectors) is an
      item its user never had in train, drawn uniformly among the train items, every label 0
      (0: the rows as they are). A batch then trains ``batch_size x (1 + negatives)`` rows.
    - ``quiet``: no progress bar or epoch lines (also when ``RECFORGE_QUIET`` is set).
    """

    epochs: Annotated[int, Field(ge=0)] = 10
    batch_size: Annotated[int, Field(ge=1)] = 2048
    lr: Annotated[float, Field(gt=0)] = 1e-3
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    sparse_lr: Annotated[float, Field(gt=0)] = 0.05
    clip_norm: Annotated[float, Field(gt=0)] | None = 10.0
    seed: int = 0
    patience: Annotated[int, Field(ge=1)] | None = 2
    monitor: str | None = None
    mode: Literal["max", "min"] = "max"
    eval_batch_size: Annotated[int, Field(ge=1)] = 65536
    checkpoint_every_steps: Annotated[int, Field(ge=0)] = 1000
    num_threads: Annotated[int, Field(ge=1)] | None = None
    log_every: Annotated[int, Field(ge=1)] = 100
    device: Annotated[str, AfterValidator(distributed.check_device)] = "cpu"
    negatives: Annotated[int, Field(ge=0)] = 0
    negative_item: str = "item_id"
    negative_features: list[str] = Field(default_factory=list)
    quiet: bool = False


@dataclass
class TrainState:
    """Where a run stands; saved in every checkpoint."""

    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # batches of the current epoch done by each rank
    global_step: int = 0
    best_value: float | None = None
    best_epoch: int | None = None
    bad_epochs: int = 0  # evaluations since the last improvement
    stopped: bool = False  # early stopping ended the run
    log_bytes: int = 0  # length of metrics.jsonl when the checkpoint was taken


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """Trains ``model`` on ``store``'s train split, validating on its valid split.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) the model is wrapped in DistributedDataParallel and
    each rank trains on its shard of every epoch; rank 0 evaluates, logs and checkpoints.
    """

    def __init__(
        self, model: Model, store: Store, config: TrainConfig, out_dir: str | Path, evaluator: Evaluator | None = None
    ) -> None:
        self.config = config
        self.store = store
        self.out_dir = Path(out_dir)
        self.last_dir = self.out_dir / "last"
        self.best_dir = self.out_dir / "best"
        self.log_path = self.out_dir / "metrics.jsonl"
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.context = distributed.setup()
        self.device = distributed.device_for(self.context, config.device)
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)
        self.model = model.to(self.device)
        self.network = distributed.wrap(self.model, self.context, self.device)
        self.evaluator = evaluator or evaluator_for(model, store, config.eval_batch_size)
        self.swap = _item_swap(store, config) if config.negatives else None
        self.optimizers = Optimizers(
            self.model,
            self.model.sparse_parameters(),
            lr=config.lr,
            weight_decay=config.weight_decay,
            sparse_lr=config.sparse_lr,
            clip_norm=config.clip_norm,
        )
        self.verbose = self.context.is_main and not config.quiet and os.environ.get(QUIET_ENV, "") in ("", "0")
        self.console = Console(stderr=True, quiet=not self.verbose)

    @property
    def is_main(self) -> bool:
        """Whether this process is rank 0, the one that evaluates, logs and checkpoints."""
        return self.context.is_main

    # --- training ------------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> dict[str, float]:
        """Train, early-stop on ``monitor`` and end with the best weights loaded.

        ``resume`` continues from the checkpoint in ``out_dir/last`` (a RunError when there is
        none, or when a setting of :attr:`shape` differs); otherwise the run starts afresh and
        replaces the checkpoints and log that ``out_dir`` held. Nothing is written before these
        checks and that of ``monitor`` pass. Returns the best weights' metrics on valid and test,
        with ``best_epoch``, ``epochs`` (completed) and ``steps``.
        """
        train = self.store.split("train")
        steps_per_epoch = train.num_batches(self.config.batch_size, self.context.world_size)
        if steps_per_epoch == 0:
            raise DataError(f"{self.store.path}: the train split has too few rows for one batch per rank")
        if len(self.store.split("valid")) == 0:
            raise DataError(f"{self.store.path}: the valid split is empty; early stopping needs it")

        if resume:
            state = self._resume()
        else:
            self._check_monitor()
            state = TrainState()
            if self.context.is_main:
                self._clear_outputs()

        bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[speed]} samples/s"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            disable=not (self.verbose and self.console.is_terminal),
        )
        with bar:
            while state.epoch < self.config.epochs and not state.stopped:
                self._train_epoch(state, train, steps_per_epoch, bar)
                self._end_epoch(state)

        results: dict[str, float] = {"epochs": state.epoch, "steps": state.global_step}
        if state.best_epoch is not None:
            distributed.barrier(self.context)  # rank 0 has written best/
            load_weights(self.best_dir, self.model)
            results["best_epoch"] = state.best_epoch
        results |= self._evaluate_on_main("valid")
        if len(self.store.split("test")):
            results |= self._evaluate_on_main("test")
        self._log({"event": "final", **results})
        return results

    def _train_epoch(self, state: TrainState, train: SplitView, steps_per_epoch: int, bar: Progress) -> None:
        config, context = self.config, self.context
        self.network.train()
        task = bar.add_task(
            f"epoch {state.epoch + 1}/{config.epochs}",
            total=steps_per_epoch,
            completed=state.step_in_epoch,
            loss="-",
            speed="-",
        )
        window = _LossWindow()
        batches = train.batches(
            config.batch_size,
            shuffle=True,
            seed=config.seed,
            epoch=state.epoch,
            rank=context.rank,
            world_size=context.world_size,
            start=state.step_in_epoch,
        )
        for batch in batches:
            self._seed_step(state.global_step)
            if self.swap is not None:
                batch = self.swap.with_negatives(np.random.default_rng([config.seed, context.rank, state.global_step]), batch, config.negatives)
            batch = batch.to(self.device)
            outputs = self.network(batch)
            loss, parts = self.model.loss(outputs, batch)
            self.optimizers.zero_grad()
            loss.backward()
            self.optimizers.step()
            state.global_step += 1
            state.step_in_epoch += 1
            window.add(loss.detach(), parts, len(batch) * context.world_size)
            bar.advance(task)
            if state.global_step % config.log_every == 0 or state.step_in_epoch == steps_per_epoch:
                record = window.flush()
                if not math.isfinite(record["loss"]):
                    raise FloatingPointError(
                        f"training loss is {record['loss']} at epoch {state.epoch + 1}, step {state.global_step}"
                    )
                self._log({"event": "train", "epoch": state.epoch + 1, "step": state.global_step, **record})
                bar.update(task, loss=f"{record['loss']:.4f}", speed=f"{record['samples_per_s']:,.0f}")
            every = config.checkpoint_every_steps
            if every and state.global_step % every == 0 and state.step_in_epoch < steps_per_epoch:
                self._save_last(state)
        state.epoch += 1
        state.step_in_epoch = 0

    def _seed_step(self, step: int) -> None:
        """Seed every generator a step may draw from with a function of (seed, rank, step)."""
        seed = int(np.random.SeedSequence([self.config.seed, self.context.rank, step]).generate_state(1)[0])
        random.seed(seed)
        np.random.seed(seed)
        torch.default_generator.manual_seed(seed)  # torch.manual_seed would also queue every idle backend
        if self.device.type == "cuda":
            torch.cuda.manual_seed(seed)  # the current device's generator

    def _end_epoch(self, state: TrainState) -> None:
        metrics = self._evaluate_on_main("valid")
        monitor = self.config.monitor or next(iter(metrics))
        value = metrics[monitor]
        improved = state.best_value is None or self._better(value, state.best_value)
        if improved:
            state.best_value, state.best_epoch, state.bad_epochs = value, state.epoch, 0
            if self.context.is_main:
                best = {"epoch": state.epoch, "step": state.global_step, "monitor": monitor, "metrics": metrics}
                save_checkpoint(self.best_dir, self.model, best)
        else:
            state.bad_epochs += 1
            state.stopped = self.config.patience is not None and state.bad_epochs >= self.config.patience
        self._log({"event": "eval", "epoch": state.epoch, "step": state.global_step, "improved": improved, **metrics})
        mark = " (best)" if improved else (" - early stop" if state.stopped else "")
        self.console.print(f"epoch {state.epoch}: {monitor} {value:.5f}{mark}")
        self._save_last(state)

    def _better(self, value: float, best: float) -> bool:
        if math.isnan(value):
            return False
        if math.isnan(best):
            return True
        return value > best if self.config.mode == "max" else value < best

    def _check_monitor(self) -> None:
        """Fail before the first step when ``monitor`` names no metric of the validation."""
        if self.config.monitor is None:
            return
        names = list(self._evaluate_on_main("valid"))
        if self.config.monitor not in names:
            raise ConfigError(f"train.monitor: {self.config.monitor!r} is not a validation metric; choose one of {names}")

    # --- checkpoints and logs ------------------------------------------------------------------
    @cached_property
    def shape(self) -> dict[str, Any]:
        """Every setting that shapes the run, keyed as in an experiment config (module docstring)."""
        split = self.store.path / "split.json"
        shape: dict[str, Any] = {"model.name": getattr(self.model, "registry_name", type(self.model).__name__)}
        shape |= {f"model.params.{k}": v for k, v in dataclasses.asdict(self.model.config).items()}
        shape |= {f"data.split.{k}": v for k, v in (json.loads(split.read_text()) if split.exists() else {}).items()}
        if self.store.fingerprint:  # stores prepared by older versions have none
            shape["data.fingerprint"] = self.store.fingerprint
        shape |= {f"train.{name}": getattr(self.config, name) for name in _SHAPING}
        shape["world_size"] = self.context.world_size
        return json.loads(json.dumps(shape, default=str))  # as a checkpoint reads it back

    def _save_last(self, state: TrainState) -> None:
        if not self.context.is_main:
            return
        state.log_bytes = self.log_path.stat().st_size if self.log_path.exists() else 0
        payload = {"train": dataclasses.asdict(state), "config": dataclasses.asdict(self.config), "shape": self.shape}
        save_checkpoint(self.last_dir, self.model, payload, self.optimizers.state_dict())

    def _resume(self) -> TrainState:
        found = resume_point(self.out_dir)
        recorded = read_checkpoint_state(found).get("shape", {})
        for key, value in self.shape.items():
            if key in recorded and recorded[key] != value:
                raise RunError(f"{found}: cannot resume: {key} was {recorded[key]!r}, now {value!r}")
        saved, optimizer_state = load_checkpoint(found, self.model)
        self.optimizers.load_state_dict(optimizer_state)
        state = TrainState(**saved["train"])
        if self.context.is_main and self.log_path.exists():
            with self.log_path.open("r+b") as log:  # drop what was logged after the checkpoint
                log.truncate(state.log_bytes)
        distributed.barrier(self.context)  # every rank has read last/ before rank 0 replaces it
        return state

    def _clear_outputs(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for path in versions(self.last_dir) + versions(self.best_dir):
            shutil.rmtree(path, ignore_errors=True)
        self.log_path.unlink(missing_ok=True)

    def _log(self, record: dict) -> None:
        if self.context.is_main:
            with self.log_path.open("a") as log:
                log.write(json.dumps(record) + "\n")

    # --- evaluation ----------------------------------------------------------------------------
    def _evaluate_on_main(self, split: str) -> dict[str, float]:
        metrics = self.evaluate(split) if self.context.is_main else None
        return distributed.broadcast_json(metrics, self.context)

    def evaluate(self, split: str) -> dict[str, float]:
        """Metrics of the model on ``split`` ("train", "valid" or "test"), keyed ``<split>_<metric>``."""
        view = self.store.split(split)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                metrics = self.evaluator(self.model, view)
        finally:
            self.model.train(was_training)
        return {f"{split}_{name}": value for name, value in metrics.items()}


def resume_point(out_dir: str | Path) -> Path:
    """The checkpoint a resumed run in ``out_dir`` continues from; a RunError when there is none."""
    found = find_checkpoint(Path(out_dir) / "last")
    if found is None:
        raise RunError(f"{out_dir}: no checkpoint to resume from; train without --resume to start afresh")
    return found


class _LossWindow:
    """Mean loss, loss parts and throughput since the last flush."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.loss: Tensor | float = 0.0
        self.parts: dict[str, Tensor | float] = defaultdict(float)
        self.steps = 0
        self.samples = 0
        self.started = time.perf_counter()

    def add(self, loss: Tensor, parts: dict[str, Tensor], samples: int) -> None:
        self.loss = self.loss + loss  # stays on the device: no synchronisation per step
        for name, value in parts.items():  # detached tensors: summed on the device too
            self.parts[name] += value
        self.steps += 1
        self.samples += samples

    def flush(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        record = {
            "loss": float(self.loss) / self.steps,
            **{f"loss_{name}": float(total) / self.steps for name, total in self.parts.items()},
            "samples_per_s": self.samples / elapsed,
        }
        self._reset()
        return record


def _item_swap(store: Store, config: TrainConfig) -> ItemSwap:
    """The sampler of ``config.negatives``, its features checked against the schema."""
    schema = store.schema
    names = {f.name: f for f in schema.features}
    item = names.get(config.negative_item)
    if item is None or item.kind is not Kind.CATEGORICAL:
        raise ConfigError(f"train.negative_item: {config.negative_item!r} is not a categorical feature of the data; negatives replace the item of a row")
    if schema.user is None:
        raise ConfigError("train.negatives: the data has no user column (negatives are items the user never had)")
    for name in config.negative_features:
        f = names.get(name)
        if f is None or not (f.kind is Kind.CATEGORICAL or (f.kind is Kind.SEQUENCE and f.timeline is None)) or name == item.name:
            raise ConfigError(f"train.negative_features: {name!r} is not a categorical or list feature of the data")
    return ItemSwap(store, item.name, config.negative_features)
