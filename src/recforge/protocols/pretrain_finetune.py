"""``pretrain_finetune``: pretrain a model, then fine-tune a fresh one from its tables.

Stage 1 trains the cell's experiment with the study's ``pretrain`` overrides applied (e.g.
``model.params.pretrain=true``, ``train.epochs=1``) into ``out/pretrain``; stage 2 builds the cell's
own model, calls its :meth:`~recforge.models.capabilities.Pretrainable.restore_pretrained` with the
stage-1 model, and trains it into ``out/finetune``; each stage's bundle is its folder's ``model``. Both stages are
evaluated pointwise (AUC, GAUC, LogLoss), or with ``evaluation: candidates`` by
:class:`~recforge.evaluate.evaluators.CandidateRanking` (each held-out item against ``negatives``
sampled items; HIT@K, NDCG@K, MRR). A variant with
``pretrained: false`` skips stage 1 (the "without pretraining" ablation). Both stages start from
the same seed. Records: stage 2's metrics as the standard protocol's (split valid / test / fit),
stage 1's under the group ``stage: pretrain``.

A stage that finished is kept: its metrics are written last and atomically (``metrics.json``)
with its bundle, so a study resumed after a kill trains only what is missing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, ValidationError

from recforge.bundle import load_bundle, save_bundle
from recforge.data.sources import load_source
from recforge.data.sources.lifelong_simulator import relevance_mask
from recforge.config import ConfigError, ExperimentConfig, apply_overrides, problems
from recforge.experiment import prepare_store
from recforge.files import write_atomic
from recforge.data.store import Store
from recforge.errors import ModelConfigError
from recforge.evaluate.evaluators import CandidateRanking, Evaluator
from recforge.evaluate.metrics import auc
from recforge.models import Model, build_model
from recforge.models.base import make_config
from recforge.models.capabilities import Pretrainable, Searcher
from recforge.protocols import Cell, Params, Protocol, record, register_protocol
from recforge.protocols.standard import metric_records
from recforge.train.trainer import TrainConfig, Trainer, seed_everything


class PretrainFinetuneParams(Params):
    pretrain: list[str]  # a.b.c=value overrides that turn a cell's experiment into its pretraining run
    evaluation: Literal["pointwise", "candidates"] = "pointwise"  # candidates: CandidateRanking
    item: str = "item_id"  # candidates: the ranked item and
    item_features: list[str] = Field(default_factory=list)  # the features that go with it
    negatives: int = Field(99, ge=1)
    eval_seed: int = 0
    valid_rows: int | None = Field(2000, ge=1)  # candidates: valid rows ranked while training


class PretrainVariant(Params):
    pretrained: bool = True  # False: fine-tune from the initial weights (no stage 1)


@register_protocol
class PretrainFinetune(Protocol):
    name = "pretrain_finetune"
    Params = PretrainFinetuneParams
    VariantParams = PretrainVariant

    def run(self, cell: Cell, out: Path) -> list[dict[str, Any]]:
        return self.train(cell, out)[0]

    def train(self, cell: Cell, out: Path) -> tuple[list[dict[str, Any]], Model, Store]:
        """Both stages of ``cell`` -> (records, the fine-tuned model, the store)."""
        config = cell.config
        variant = PretrainVariant.model_validate(cell.extra)
        store = prepare_store(config.data, cell.store_root)
        evaluator = self.evaluator(store)
        records: list[dict[str, Any]] = []
        source = None
        if variant.pretrained:
            raw = apply_overrides(config.model_dump(mode="json"), self.params.pretrain)
            try:
                pretrain_config = ExperimentConfig.model_validate(raw)
                make_config(pretrain_config.model.name, pretrain_config.model.params)
            except ValidationError as err:
                raise ConfigError(f"{cell.variant}: params.pretrain: {problems(err)}") from None
            except ModelConfigError as err:
                raise ConfigError(f"{cell.variant}: params.pretrain: {err}") from None
            source, metrics = _stage(pretrain_config, store, out / "pretrain", evaluator)
            records += [{**r, "group": {**r["group"], "stage": "pretrain"}} for r in metric_records(metrics)]
        model, metrics = _stage(config, store, out / "finetune", evaluator, source)
        return records + metric_records(metrics), model, store

    def evaluator(self, store: Store) -> Evaluator | None:
        p = self.params
        if p.evaluation == "pointwise":
            return None  # the model's own
        return CandidateRanking(store, p.item, p.item_features, p.negatives, p.eval_seed, p.valid_rows)


def _stage(
    config: ExperimentConfig, store: Store, out: Path, evaluator: Evaluator | None, source: Model | None = None
) -> tuple[Model, dict[str, float]]:
    """Train one stage into ``out`` (or read it back when it finished before) -> (model, metrics)."""
    done = out / "metrics.json"
    if done.exists():
        return load_bundle(out / "model"), json.loads(done.read_text())
    train_config = TrainConfig(**config.train)
    if train_config.num_threads:
        torch.set_num_threads(train_config.num_threads)
    seed_everything(train_config.seed)
    model = build_model(config.model.name, store.schema, config.model.params, store=store)
    if source is not None:
        if not isinstance(model, Pretrainable):
            raise ConfigError(f"model {config.model.name!r} cannot be fine-tuned from a pretrained model (it is not pretrainable)")
        model.restore_pretrained(source)
    metrics = Trainer(model, store, train_config, out, evaluator).fit()
    save_bundle(model, store, out / "model")
    write_atomic(done, json.dumps(metrics, indent=2))
    return model, metrics


@register_protocol
class LifelongRecall(PretrainFinetune):
    """``pretrain_finetune`` on the lifelong simulator, plus the search stage's recall of the
    planted relevant events on the test rows (a :class:`~recforge.models.capabilities.Searcher`):
    ``gsu_recall``, the share of a row's relevant events among those its heads kept (their union),
    averaged over the rows with at least one; beside it the same for as many of the latest events as
    the heads kept (``recent_recall``) and the expected share for as many drawn at random
    (``random_recall``). Every model also gets the AUC of the true click probability on the test
    rows (record ``bayes_auc``, the best reachable)."""

    name = "lifelong_recall"

    def run(self, cell: Cell, out: Path) -> list[dict[str, Any]]:
        config = cell.config
        if config.data.source != "lifelong-simulator":
            raise ConfigError(f"{cell.variant}: the lifelong_recall protocol reads the truth of data.source lifelong-simulator, not {config.data.source!r}")
        records, model, store = self.train(cell, out)
        frame = load_source(config.data.source, **config.data.options).frame
        view = store.split("test")
        test_rows = frame[np.asarray(view.row)]
        records.append(record("test", "bayes_auc", auc(test_rows["click"].to_numpy(), test_rows["p_click"].to_numpy())))
        if not isinstance(model, Searcher):
            return records
        model.eval()
        history = model.config.history
        length = store.schema.feature(history).max_len
        found: dict[str, list[np.ndarray]] = {"gsu_recall": [], "recent_recall": [], "random_recall": []}
        with torch.inference_mode():
            for rows in np.array_split(np.arange(len(view)), max(1, len(view) // 512)):
                batch = view.take(rows)
                index, valid = model.searched(batch)  # [B, H, K]
                kept = torch.zeros(len(rows), length + 1, dtype=torch.bool)  # slot L takes the empty picks
                kept.scatter_(1, index.masked_fill(~valid, length).flatten(1), True)
                kept = kept[:, :length]  # the union of the heads' events: [B, L]
                relevant = torch.from_numpy(relevance_mask(frame, np.asarray(view.row)[rows], length))
                real = batch.sequences[history] != 0
                count, n_kept = relevant.sum(1), kept.sum(1)
                has = count > 0
                recent = torch.arange(length) >= length - n_kept[:, None]  # right-aligned: the n_kept latest slots
                found["gsu_recall"].append(((kept & relevant).sum(1)[has] / count[has]).numpy())
                found["recent_recall"].append(((recent & relevant).sum(1)[has] / count[has]).numpy())
                found["random_recall"].append((n_kept[has] / real.sum(1)[has].clamp(min=1)).double().numpy())
        values = {name: np.concatenate(parts) for name, parts in found.items()}
        records += [record("test", name, float(v.mean())) for name, v in values.items()]
        return records + [record("test", "relevant_rows", float(len(values["gsu_recall"])))]
