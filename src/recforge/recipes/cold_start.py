"""The cold-start protocol of GME (Ouyang et al., SIGIR 2021) and MetaEmb (Pan et al., SIGIR 2019).

Data: a ``cold_start`` split (see :class:`~recforge.data.splits.SplitConfig`): old items' rows
are train, new items' first ``3 x shot`` rows are valid (warm-up batches a, b, c of ``shot`` rows
per item, in time order), their later rows test. For every backbone and seed:

1. pre-train the backbone on the old items with the library's trainer (the paper: 1 epoch);
2. freeze it; for every generator, meta-train it on the old items' first ``4 x shot`` rows
   (batches a-d of each old item): ``meta_items`` items per step, the loss of
   :func:`~recforge.models.coldstart.gme.meta_loss` on their (a, b) rows, then on (b, c);
3. cold: write the generated embeddings of the new items into the backbone's item rows
   ("random" keeps their random initial rows) and evaluate on the test rows;
4. warm-up a, b, c: train only the new items' item-ID rows on that batch (Adam, one epoch),
   evaluate after each.

The backbone is pre-trained once per seed and shared by all methods. Results go to a JSON file
(one record per backbone, seed, method and phase) from which the markdown table and the plot
are written.
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from recforge.config import ConfigError, DataConfig, apply_overrides
from recforge.data.schema import OOV
from recforge.data.splits import rank_within
from recforge.data.store import SplitView, Store
from recforge.models import Model, build_model
from recforge.models.coldstart.gme import GMEConfig, GraphMetaEmbedding, ItemGraph, feature_embedding, meta_loss
from recforge.train.trainer import TrainConfig, Trainer, seed_everything

METHODS = ("random", "meta_emb", "gme_p", "gme_g", "gme_a")
METHOD_NAMES = {"random": "random init", "meta_emb": "MetaEmb", "gme_p": "GME-P", "gme_g": "GME-G", "gme_a": "GME-A"}
PHASES = ("cold", "warm-a", "warm-b", "warm-c")


class ColdStartConfig(BaseModel):
    """A cold-start experiment: data, backbones, generators and the protocol's settings."""

    model_config = ConfigDict(extra="forbid")

    name: str
    data: DataConfig
    item: str = "item_id"
    attributes: list[str]  # the item's attribute fields: u and the graph
    backbones: dict[str, dict[str, Any]]  # registered ranking model -> its params
    methods: list[str] = Field(default_factory=lambda: list(METHODS))
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    train: dict[str, Any] = Field(default_factory=dict)  # backbone pre-training (TrainConfig)
    generator: dict[str, Any] = Field(default_factory=dict)  # GMEConfig, shared by the variants
    num_neighbours: int = 10
    shot: int = 20  # rows per item in each of batches a, b, c (d)
    meta_items: int = 3  # old items per meta step (3 x 20 = 60 rows, as the official code)
    meta_lr: float = 5e-3
    meta_epochs: int = 1
    warm_lr: float = 1e-3
    warm_batch_size: int = 128
    report: str = "docs/results/cold_start.md"
    runs: str = "runs/cold_start"


def load_cold_start_config(path: str | Path, overrides: list[str] | None = None) -> ColdStartConfig:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such config file")
    raw = apply_overrides(yaml.safe_load(path.read_text()) or {}, overrides or [])
    try:
        config = ColdStartConfig.model_validate(raw)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors(include_url=False))
        raise ConfigError(f"{path}: {problems}") from None
    unknown = sorted(set(config.methods) - set(METHODS))
    if unknown:
        raise ConfigError(f"{path}: methods: unknown {unknown}; known: {list(METHODS)}")
    if config.data.split.kind != "cold_start" or "valid" not in config.data.split.fit_on:
        raise ConfigError(f"{path}: data.split needs kind cold_start and fit_on [train, valid] (new items need their own ids)")
    if 3 * config.shot != config.data.split.warm_rows:
        raise ConfigError(f"{path}: data.split.warm_rows must be 3 x shot = {3 * config.shot}")
    return config


# --- data -----------------------------------------------------------------------------------
def phase_rows(view: SplitView, item: str, shot: int, phases: int) -> tuple[np.ndarray, np.ndarray]:
    """Items of ``view`` and their rows per phase: ``(items [n], rows [phases, n, shot])``.

    Phase ``p`` of an item is its rows ``p * shot`` to ``(p + 1) * shot - 1`` in time order. Every
    item must have ``phases * shot`` rows.
    """
    items = view.column(item).astype(np.int64)
    rank = rank_within(items)
    keep = np.flatnonzero(rank < phases * shot)
    unique, counts = np.unique(items[keep], return_counts=True)
    if (counts < phases * shot).any():
        short = unique[counts < phases * shot][0]
        raise ValueError(f"{view.store.path} split {view.name}: item {short} has fewer than {phases * shot} rows")
    order = keep[np.lexsort((rank[keep], items[keep]))]  # by item, then rank
    rows = order.reshape(len(unique), phases, shot).transpose(1, 0, 2)  # [phases, n, shot]
    return unique, np.ascontiguousarray(rows)


def build_item_graph(store: Store, item: str, attributes: list[str], num_neighbours: int) -> ItemGraph:
    """Attributes of every item (from its first row) and its old-item neighbours."""
    schema = store.schema
    size = schema.vocab_size(schema.feature(item).vocab)
    lists: dict[str, torch.Tensor] = {}
    is_old = torch.zeros(size, dtype=torch.bool)
    popularity = torch.zeros(size, dtype=torch.float64)
    cat_fields = [a for a in attributes if a in {f.name for f in schema.categorical}]
    list_fields = [a for a in attributes if a not in cat_fields]
    categorical = torch.zeros(size, len(cat_fields), dtype=torch.long)
    for name in list_fields:
        lists[name] = torch.zeros(size, schema.feature(name).max_len, dtype=torch.long)
    for split in ("train", "valid"):
        view = store.split(split)
        ids = view.column(item).astype(np.int64)
        unique, first, counts = np.unique(ids, return_index=True, return_counts=True)
        batch = view.take(np.sort(first))
        batch_items = batch.categorical[:, schema.categorical_index(item)]
        for column, name in enumerate(cat_fields):
            categorical[batch_items, column] = batch.categorical[:, schema.categorical_index(name)]
        for name in list_fields:
            lists[name][batch_items] = batch.sequences[name]
        if split == "train":
            is_old[torch.from_numpy(unique)] = True
            popularity[torch.from_numpy(unique)] = torch.from_numpy(counts.astype(np.float64))
    return ItemGraph(schema, attributes, categorical, lists, is_old, popularity, num_neighbours)


# --- stages ---------------------------------------------------------------------------------
def freeze(model: nn.Module) -> None:
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)


def meta_train(
    generator: GraphMetaEmbedding, model: Model, view: SplitView, rows: np.ndarray, config: ColdStartConfig, seed: int
) -> list[dict[str, float]]:
    """Meta-train ``generator`` on the old items' batches ``rows`` [4, n, shot]; returns the mean losses per pass."""
    optimizer = torch.optim.Adam(generator.parameters(), lr=config.meta_lr)
    generator.train()
    log = []
    n = rows.shape[1]
    for epoch in range(config.meta_epochs):
        order = np.random.default_rng([seed, epoch]).permutation(n)
        for first, second in ((0, 1), (1, 2)):
            totals = {"cold": 0.0, "warm": 0.0}
            steps = 0
            for start in range(0, n, config.meta_items):
                chosen = order[start : start + config.meta_items]
                batch_a = view.take(rows[first, chosen].reshape(-1))
                batch_b = view.take(rows[second, chosen].reshape(-1))
                loss, parts = meta_loss(generator, model, batch_a, batch_b)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                totals = {k: totals[k] + parts[k] for k in totals}
                steps += 1
            log.append({"epoch": epoch, "pair": f"{'abcd'[first]}{'abcd'[second]}", **{k: v / steps for k, v in totals.items()}})
    generator.eval()
    return log


def write_generated(model: Model, generator: GraphMetaEmbedding, items: np.ndarray) -> None:
    """Store the generated embeddings of ``items`` in the model's item-ID rows."""
    embedding = feature_embedding(model)
    ids = torch.from_numpy(items)
    with torch.no_grad():
        vectors = generator(ids, embedding)
        embedding.table.weight[ids + embedding.vocab_offset[generator.item_vocab]] = vectors


def warm_up(model: Model, item: str, items: np.ndarray, view: SplitView, rows: np.ndarray, lr: float, batch_size: int, seed: int) -> float:
    """One epoch of Adam on ``rows`` of ``view`` that updates only the item-ID rows of ``items``.

    The rows are copied out as the only trainable tensor, fed to the frozen model through
    ``FeatureEmbedding.replaced`` and written back: nothing else of the model can change.
    Returns the mean training loss.
    """
    embedding = feature_embedding(model)
    schema = model.schema
    offset = embedding.vocab_offset[schema.feature(item).vocab]
    ids = torch.from_numpy(items)
    slot = torch.full((schema.vocab_size(schema.feature(item).vocab),), -1, dtype=torch.long)
    slot[ids] = torch.arange(len(ids))
    trained = nn.Parameter(embedding.table.weight[ids + offset].detach().clone())  # [n, k]
    optimizer = torch.optim.Adam([trained], lr=lr)
    column = schema.categorical_index(item)
    label = model.label_to_predict(getattr(model.config, "label", None))
    order = np.random.default_rng(seed).permutation(rows)
    total = 0.0
    for start in range(0, len(order), batch_size):
        batch = view.take(np.sort(order[start : start + batch_size]))
        positions = slot[batch.categorical[:, column]]
        if (positions < 0).any():
            raise ValueError(f"warm-up rows hold item {int(batch.categorical[positions.argmin(), column])} outside the trained items")
        with embedding.replaced(item, trained[positions]):
            loss = nn.functional.binary_cross_entropy_with_logits(model(batch)[label], batch.labels[label])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total += float(loss.detach()) * len(batch)
    with torch.no_grad():
        embedding.table.weight[ids + offset] = trained.detach()
    return total / len(rows)


# --- the protocol ---------------------------------------------------------------------------
def run_cold_start(
    config: ColdStartConfig,
    store_root: Path = Path("runs/stores"),
    backbones: list[str] | None = None,
    results_path: Path | None = None,
    command: str = "",
    report_only: bool = False,
) -> list[dict[str, Any]]:
    """Run every backbone x seed x method; results are appended to ``results_path`` as they come.

    Runs already in ``results_path`` are kept and not repeated; the report is rewritten from
    all of its records (``command`` is quoted in it as the way to reproduce them).
    ``report_only`` runs nothing and only rewrites the report.
    """
    from recforge.experiment import prepare_store

    torch.set_num_threads(int(config.train.get("num_threads") or torch.get_num_threads()))
    store = prepare_store(config.data, store_root)
    schema = store.schema
    item_vocab = schema.feature(config.item).vocab
    old_view, new_view = store.split("train"), store.split("valid")
    old_items, old_rows = phase_rows(old_view, config.item, config.shot, 4)
    new_items, new_rows = phase_rows(new_view, config.item, config.shot, 3)
    if (new_items == OOV).any() or np.intersect1d(old_items, new_items).size:
        raise ValueError(f"{store.path}: new items must have ids of their own (fit the vocabularies on train and valid)")
    graph = build_item_graph(store, config.item, config.attributes, config.num_neighbours)
    results_path = results_path or Path(config.report).with_suffix(".json")
    records: list[dict[str, Any]] = json.loads(results_path.read_text()) if results_path.exists() else []
    done = {(r["backbone"], r["seed"], r["method"]) for r in records}
    backbones = backbones or list(config.backbones)
    unknown = [b for b in backbones if b not in config.backbones]
    if unknown:
        raise ValueError(f"backbones {unknown} are not in the config's backbones {list(config.backbones)}")
    for seed in [] if report_only else config.seeds:  # the first seed of every backbone first
        for backbone in backbones:
            todo = [m for m in config.methods if (backbone, seed, m) not in done]
            if not todo:
                continue
            started = time.perf_counter()
            seed_everything(seed)
            model = build_model(backbone, schema, config.backbones[backbone])
            train_config = TrainConfig(**{**config.train, "seed": seed, "quiet": True})
            trainer = Trainer(model, store, train_config, Path(config.runs) / f"{backbone}-seed{seed}")
            pretrain = trainer.fit()
            freeze(model)
            pretrained = copy.deepcopy(model.state_dict())
            embedding_dim = feature_embedding(model).dim
            for method in todo:
                model.load_state_dict(pretrained)
                meta_log: list[dict[str, float]] = []
                method_started = time.perf_counter()
                if method != "random":
                    seed_everything(seed)
                    generator = GraphMetaEmbedding(graph, config.item, embedding_dim, GMEConfig(**{**config.generator, "variant": method}))
                    meta_log = meta_train(generator, model, old_view, old_rows, config, seed)
                    write_generated(model, generator, new_items)
                phases = {"cold": trainer.evaluate("test")}
                for p, phase in enumerate(PHASES[1:]):
                    warm_up(model, config.item, new_items, new_view, new_rows[p].reshape(-1), config.warm_lr, config.warm_batch_size, seed)
                    phases[phase] = trainer.evaluate("test")
                for phase, metrics in phases.items():
                    records.append(
                        {
                            "backbone": backbone, "seed": seed, "method": method, "phase": phase,
                            "auc": metrics["test_click_auc"], "logloss": metrics["test_click_logloss"],
                            "gauc": metrics.get("test_click_gauc"),
                        }
                    )  # fmt: skip
                records[-1]["meta_log"] = meta_log
                records[-1]["seconds"] = time.perf_counter() - method_started
                records[-1]["pretrain"] = {k: v for k, v in pretrain.items() if isinstance(v, (int, float))}
                results_path.parent.mkdir(parents=True, exist_ok=True)
                results_path.write_text(json.dumps(records, indent=1))
            print(f"{backbone} seed {seed}: {time.perf_counter() - started:.0f}s", flush=True)
            write_report(records, config, Path(config.report), (len(old_items), len(new_items)), store, command)
    if records:
        write_report(records, config, Path(config.report), (len(old_items), len(new_items)), store, command)
    return records


# --- the report -----------------------------------------------------------------------------
def summarise(records: list[dict[str, Any]]) -> pl.DataFrame:
    """Mean and std over seeds of AUC and logloss per backbone, method and phase."""
    frame = pl.DataFrame([{k: r[k] for k in ("backbone", "seed", "method", "phase", "auc", "logloss")} for r in records])
    return frame.group_by(["backbone", "method", "phase"], maintain_order=True).agg(
        pl.col("auc").mean().alias("auc_mean"), pl.col("auc").std(ddof=1).alias("auc_std"),
        pl.col("logloss").mean().alias("logloss_mean"), pl.col("logloss").std(ddof=1).alias("logloss_std"),
        pl.col("seed").n_unique().alias("seeds"),
    )  # fmt: skip


def _cell(mean: float, std: float | None, digits: int = 4) -> str:
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if std is not None and not math.isnan(std) else f"{mean:.{digits}f}"


def write_report(
    records: list[dict[str, Any]],
    config: ColdStartConfig,
    path: Path,
    item_counts: tuple[int, int],
    store: Store,
    command: str = "",
) -> None:
    """The markdown table (and the AUC plot beside it) of every finished backbone x method."""
    summary = summarise(records)
    path.parent.mkdir(parents=True, exist_ok=True)
    plot = path.with_suffix(".png")
    _plot(summary, plot)
    sizes = {split: len(store.split(split)) for split in ("train", "valid", "test")}
    lines = [
        f"# {config.name}: item cold start on {config.data.source}",
        "",
        "Test rows of the new items; AUC and logloss, mean ± std over the seeds "
        "(the `seeds` column), after the generated (or random) initial ID embedding (cold) and after "
        "each warm-up batch a, b, c (only the new items' ID rows trained).",
        "",
        f"- data: `{config.data.source}` {json.dumps(config.data.options)}; old items {item_counts[0]} "
        f"({sizes['train']} rows), new items {item_counts[1]} ({sizes['valid']} warm-up rows, {sizes['test']} test rows)",
        f"- item attributes (u and graph): {', '.join(config.attributes)}; {config.num_neighbours} neighbours",
        f"- pre-training: {json.dumps(config.train)}",
        f"- meta-training: lr {config.meta_lr}, {config.meta_epochs} epoch(s) of pairs (a, b) and (b, c), "
        f"{config.meta_items} items x {config.shot} rows per step, generator {json.dumps(config.generator)}",
        f"- warm-up: Adam lr {config.warm_lr}, batch {config.warm_batch_size}, one epoch per batch",
        f"- machine: {platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch thread(s)",
    ]
    if command:
        lines.append(f"- reproduce: `{command}`")
    lines.append("")
    for backbone in summary["backbone"].unique(maintain_order=True):
        part = summary.filter(pl.col("backbone") == backbone)
        lines += [f"## {backbone}", "", "| method | seeds | " + " | ".join(f"{p} AUC | {p} logloss" for p in PHASES) + " |"]
        lines.append("| --- | ---: | " + " | ".join("---: | ---:" for _ in PHASES) + " |")
        for method in [m for m in METHODS if m in part["method"].to_list()]:
            rows = {r["phase"]: r for r in part.filter(pl.col("method") == method).iter_rows(named=True)}
            cells = []
            for phase in PHASES:
                r = rows[phase]
                cells += [_cell(r["auc_mean"], r["auc_std"]), _cell(r["logloss_mean"], r["logloss_std"])]
            lines.append(f"| {METHOD_NAMES[method]} | {rows['cold']['seeds']} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [f"![AUC across the phases]({plot.name})", ""]
    path.write_text("\n".join(lines))


def _plot(summary: pl.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backbones = summary["backbone"].unique(maintain_order=True).to_list()
    fig, axes = plt.subplots(1, len(backbones), figsize=(4 * len(backbones), 3.6), squeeze=False)
    for ax, backbone in zip(axes[0], backbones):
        part = summary.filter(pl.col("backbone") == backbone)
        for method in [m for m in METHODS if m in part["method"].to_list()]:
            rows = {r["phase"]: r for r in part.filter(pl.col("method") == method).iter_rows(named=True)}
            means = [rows[p]["auc_mean"] for p in PHASES]
            stds = [rows[p]["auc_std"] or 0.0 for p in PHASES]
            ax.errorbar(range(len(PHASES)), means, yerr=stds, marker="o", capsize=3, label=METHOD_NAMES[method])
        ax.set_xticks(range(len(PHASES)), PHASES)
        ax.set_title(backbone)
        ax.set_ylabel("test AUC (new items)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
