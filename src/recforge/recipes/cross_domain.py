"""Cross-domain recommendation protocol: per-domain sampled ranking, dual-target and cold-start users.

Works on any interaction table with user, item and domain columns, encoded into a store with
the ``cross_domain`` split (per-(user, domain) leave-one-out, optional cold-start users).

Evaluation follows the UniCDR code: every valid / test row (a user's held-out item in one
domain) is ranked against 999 items of the same domain drawn uniformly without replacement
among the domain's train items the user has not interacted with (fixed by ``eval_seed``, the
same for every model and training seed); HR@10 and NDCG@10 by
:func:`~recforge.evaluate.metrics.sampled_ranking_metrics` (ties count against the target).
Rows whose user has no train item in the row's domain are cold-start rows and are reported
apart (``<domain>_cold_...``). A held-out item without train interactions has no embedding and
is skipped (``skipped_unseen_targets`` counts them); the most-popular ranking under the same
candidates is reported as ``popular_...``.

Training reuses :class:`~recforge.train.trainer.Trainer` (its loop, early stopping and
checkpoints); :class:`CrossDomainTrainer` only replaces its evaluation with the protocol
above. :class:`SingleDomain` turns a registered model (the two-tower retriever) into a
single-domain baseline: it trains on the rows of one domain and sees only that domain's items
in its history.

:func:`run_table` runs a table of a study config (data sets x variants x seeds), caches every
run's metrics, and writes the table (mean ± std over seeds) into a markdown report with a plot.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor

from recforge.config import DataConfig
from recforge.data.batch import Batch
from recforge.data.cross_domain import DomainInteractions
from recforge.data.store import SplitView, Store
from recforge.evaluate.metrics import sampled_ranking_metrics
from recforge.experiment import claim_run, prepare_store, release_run
from recforge.models import Model, build_model
from recforge.study import mean_std, mean_std_cell
from recforge.train.trainer import TrainConfig, Trainer, seed_everything

KS = (10,)
SHOWN = ("hr@10", "ndcg@10")


# --- evaluation -------------------------------------------------------------------------------
@dataclasses.dataclass
class Candidates:
    """The rankable rows of one split: row index, domain position, cold flag, [N, 1 + negatives]
    candidate items (target first)."""

    rows: np.ndarray
    domain: np.ndarray
    cold: np.ndarray
    items: np.ndarray
    skipped: int


def sample_candidates(
    view: SplitView, data: DomainInteractions, item: str, negatives: int, seed: int, max_rows: int | None = None
) -> Candidates:
    """Targets of ``view`` and their sampled negatives (see the module docstring).

    ``max_rows``: keep at most this many rows per (domain, warm / cold) group, a seeded subset
    (validation during training).
    """
    schema = view.schema
    generator = np.random.default_rng(seed)
    users = view.column(schema.user).astype(np.int64)
    targets = view.column(item).astype(np.int64)
    domains = data.domain_of_code[view.column(schema.domain).astype(np.int64)]
    rankable = (domains >= 0) & (data.item_domain[targets] == domains)
    counts = data.counts()
    cold = np.zeros(len(users), dtype=bool)
    cold[rankable] = counts[users[rankable], domains[rankable]] == 0
    seen_keys = np.repeat(np.arange(len(data.ptr) - 1) // data.num_domains, np.diff(data.ptr)) * data.num_items + data.items
    seen_keys.sort()
    all_rows, all_items = [], []
    for d in range(data.num_domains):
        pool = data.domain_items[data.domain_ptr[d] : data.domain_ptr[d + 1]]
        for group in (False, True):
            rows = np.flatnonzero(rankable & (domains == d) & (cold == group))
            if max_rows is not None and len(rows) > max_rows:
                rows = np.sort(generator.choice(rows, max_rows, replace=False))
            if len(rows) == 0:
                continue
            draws = min(negatives, len(pool) - int(counts[users[rows], d].max()) - 1)
            if draws < 1:
                raise ValueError(f"domain {data.domain_names[d]!r} has too few items to sample negatives")
            chosen = [_negatives(generator, pool, users[chunk], targets[chunk], seen_keys, data.num_items, draws)
                      for chunk in np.array_split(rows, max(1, len(rows) // 2048))]  # fmt: skip
            all_rows.append(rows)
            all_items.append(np.concatenate([targets[rows][:, None], np.concatenate(chosen)], 1))
    if not all_rows:
        raise ValueError(f"split {view.name!r} has no rankable rows")
    width = min(a.shape[1] for a in all_items)
    rows = np.concatenate(all_rows)
    return Candidates(
        rows=rows,
        domain=domains[rows],
        cold=cold[rows],
        items=np.concatenate([a[:, :width] for a in all_items]),
        skipped=int((~rankable).sum()),
    )


def _negatives(
    generator: np.random.Generator, pool: np.ndarray, users: np.ndarray, targets: np.ndarray, seen_keys: np.ndarray,
    num_items: int, draws: int,
) -> np.ndarray:  # fmt: skip
    """``draws`` distinct items of ``pool`` per row, uniform, none the row's target or a train item
    of its user -> [R, draws]. Rejection sampling from 2 x draws (+ 64) draws per row; a row left
    short (small pools) is redrawn by ranking random keys over the whole pool."""
    width = 2 * draws + 64
    picks = pool[generator.integers(0, len(pool), (len(users), width))]  # [R, W]
    order = np.argsort(picks, axis=1, kind="stable")
    ordered = np.take_along_axis(picks, order, 1)
    repeat = np.zeros_like(ordered, dtype=bool)
    repeat[:, 1:] = ordered[:, 1:] == ordered[:, :-1]  # later copies of a value
    duplicate = np.empty_like(repeat)
    np.put_along_axis(duplicate, order, repeat, 1)
    keys = users[:, None] * num_items + picks
    at = np.minimum(np.searchsorted(seen_keys, keys), len(seen_keys) - 1)
    valid = ~duplicate & (seen_keys[at] != keys) & (picks != targets[:, None])
    first = np.argsort(~valid, axis=1, kind="stable")[:, :draws]  # the first valid draws, in draw order
    chosen = np.take_along_axis(picks, first, 1)
    short = np.flatnonzero(valid.sum(1) < draws)
    if len(short):  # rank random keys over the whole pool, excluded items last
        keys = users[short, None] * num_items + pool[None, :]  # [S, P]
        at = np.minimum(np.searchsorted(seen_keys, keys), len(seen_keys) - 1)
        excluded = (seen_keys[at] == keys) | (pool[None, :] == targets[short, None])
        ranked = np.argsort(generator.random(keys.shape) + excluded, axis=1)[:, :draws]
        chosen[short] = pool[ranked]
    return chosen


def ranking_metrics(
    user_vectors: Tensor, item_vectors: Tensor, candidates: Candidates, domain_names: list[str], item_count: np.ndarray
) -> dict[str, float]:
    """HR@10 / NDCG@10 per domain and group (warm, cold), their means, and the popularity reference."""
    items = torch.from_numpy(candidates.items)
    scores = torch.cat(
        [
            torch.bmm(item_vectors[chunk_items], users.unsqueeze(-1)).squeeze(-1)  # <u, v_c>: [n, C]
            for users, chunk_items in zip(user_vectors.split(512), items.split(512))
        ]
    )
    popular = torch.from_numpy(item_count.astype(np.float32))[items]  # [N, C]
    metrics: dict[str, float] = {"skipped_unseen_targets": float(candidates.skipped)}
    means: dict[str, list[float]] = {}
    for d, name in enumerate(domain_names):
        for cold in (False, True):
            mask = torch.from_numpy((candidates.domain == d) & (candidates.cold == cold))
            if not mask.any():
                continue
            group = f"{name}_cold" if cold else name
            metrics[f"{group}_rows"] = float(mask.sum())
            for prefix, values in (("", scores), ("popular_", popular)):
                ranked = sampled_ranking_metrics(values[mask, 0], values[mask, 1:], ks=KS)
                for key in SHOWN:
                    metrics[f"{prefix}{group}_{key}"] = ranked[key]
                    means.setdefault(f"{prefix}{'cold_' if cold else ''}{key}", []).append(ranked[key])
    return {key: float(np.mean(values)) for key, values in means.items()} | metrics


class CrossDomainTrainer(Trainer):
    """The core trainer with the cross-domain evaluation protocol (module docstring)."""

    def __init__(
        self,
        model: Model,
        store: Store,
        config: TrainConfig,
        out_dir: str | Path,
        data: DomainInteractions,
        item: str = "item_id",
        eval_negatives: int = 999,
        eval_seed: int = 0,
        eval_rows: int = 4096,
        candidates: dict[str, Candidates] | None = None,
        valid_rows: int | None = None,
    ) -> None:
        super().__init__(model, store, config, out_dir)
        self.data, self.item = data, item
        self.eval_negatives, self.eval_seed, self.eval_rows = eval_negatives, eval_seed, eval_rows
        self.valid_rows = valid_rows
        self.candidates = candidates if candidates is not None else {}

    def candidates_of(self, split: str) -> Candidates:
        if split not in self.candidates:
            seed = self.eval_seed * 3 + ("train", "valid", "test").index(split)
            limit = self.valid_rows if split == "valid" else None
            view = self.store.split(split)
            self.candidates[split] = sample_candidates(view, self.data, self.item, self.eval_negatives, seed, limit)
        return self.candidates[split]

    def evaluate(self, split: str) -> dict[str, float]:
        candidates = self.candidates_of(split)
        view = self.store.split(split)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                users = torch.cat(
                    [self.model.user_embedding(view.take(rows).to(self.device)).float().cpu() for rows in np.array_split(candidates.rows, max(1, -(-len(candidates.rows) // self.eval_rows)))]
                )
                items = self.model.item_embeddings().float().cpu()
                metrics = ranking_metrics(users, items, candidates, self.data.domain_names, self.data.item_count)
        finally:
            self.model.train(was_training)
        return {f"{split}_{name}": value for name, value in metrics.items()}


# --- single-domain baseline -------------------------------------------------------------------
def take_rows(batch: Batch, keep: Tensor) -> Batch:
    """The rows of ``batch`` where ``keep`` is True."""

    def pick(value: Any) -> Any:
        if isinstance(value, Tensor):
            return value[keep]
        if isinstance(value, dict):
            return {k: v[keep] for k, v in value.items()}
        return value

    return Batch(**{f.name: pick(getattr(batch, f.name)) for f in dataclasses.fields(batch)})


class SingleDomain(Model):
    """A registered retrieval model trained on one domain's rows, its histories cut to that domain."""

    task = "retrieval"

    def __init__(self, inner: Model, data: DomainInteractions, domain: int) -> None:
        super().__init__(inner.schema, inner.config)
        self.inner, self.domain = inner, domain
        self.domain_index = inner.schema.categorical_index(inner.schema.domain)
        self.register_buffer("domain_of_code", torch.from_numpy(data.domain_of_code), persistent=False)
        self.register_buffer("item_domain", torch.from_numpy(data.item_domain), persistent=False)

    def _own(self, batch: Batch) -> Batch:
        sequences = {
            name: ids.masked_fill(self.item_domain[ids] != self.domain, 0) for name, ids in batch.sequences.items()
        }  # other domains' (and unseen) items are padding
        return dataclasses.replace(batch, sequences=sequences)

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        keep = self.domain_of_code[batch.categorical[:, self.domain_index]] == self.domain
        return {"rows": keep} | self.inner(self._own(take_rows(batch, keep)))

    def loss(self, outputs: dict[str, Tensor], batch: Batch) -> tuple[Tensor, dict[str, float]]:
        keep = outputs["rows"]
        if keep.sum() < 2:  # nothing of this domain (or a single row, no in-batch negative) in the batch
            return torch.zeros((), requires_grad=True), {}
        return self.inner.loss(outputs, take_rows(batch, keep))

    def user_embedding(self, batch: Batch) -> Tensor:
        return self.inner.user_embedding(self._own(batch))

    def item_embeddings(self) -> Tensor:
        return self.inner.item_embeddings()


# --- study configs ----------------------------------------------------------------------------
class DatasetSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    label: str
    source: str
    options: dict[str, Any] = Field(default_factory=dict)
    split: dict[str, Any] = Field(default_factory=dict)  # overrides of the table's split


class VariantSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    label: str
    model: str
    params: dict[str, Any] = Field(default_factory=dict)
    train: dict[str, Any] = Field(default_factory=dict)  # overrides of the table's train section
    single_domain: bool = False  # one model per domain, trained on that domain only
    domain_params: dict[str, dict[str, Any]] = Field(default_factory=dict)  # single-domain: per-domain overrides of params
    datasets: list[str] | None = None  # labels of the data sets it runs on (None: all)

    @model_validator(mode="after")
    def _domain_params_need_single_domain(self) -> "VariantSpec":
        if self.domain_params and not self.single_domain:
            raise ValueError(f"{self.label}: domain_params applies to single_domain variants only")
        return self


class TableConfig(BaseModel):
    """One results table: data sets x variants x seeds under one protocol."""

    model_config = ConfigDict(extra="forbid")

    name: str
    title: str
    report: str  # markdown file; the table goes between <!-- table:NAME --> markers
    datasets: list[DatasetSpec]
    variants: list[VariantSpec]
    split: dict[str, Any] = Field(default_factory=lambda: {"kind": "cross_domain"})
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    train: dict[str, Any] = Field(default_factory=dict)
    item: str = "item_id"
    eval_negatives: int = 999
    eval_seed: int = 0
    valid_rows: int | None = 2000  # validation rows per (domain, group) used for early stopping
    groups: list[str] = Field(default_factory=lambda: ["warm"])  # warm and / or cold rows in the table
    references: list[str] = Field(default_factory=list)  # variant labels: tabulate each variant's change against them

    @classmethod
    def load(cls, path: str | Path) -> "TableConfig":
        return cls.model_validate(yaml.safe_load(Path(path).read_text()))


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def run_variant(
    store: Store, data: DomainInteractions, variant: VariantSpec, table: TableConfig, seed: int, out: Path,
    candidates: dict[str, Candidates],
) -> dict[str, float]:  # fmt: skip
    """Train one variant with one seed; its test and valid metrics (one model per domain when single-domain)."""
    train = TrainConfig(**({"checkpoint_every_steps": 0, "quiet": True} | table.train | variant.train | {"seed": seed}))
    if not variant.single_domain:
        seed_everything(seed)
        model = build_model(variant.model, store.schema, variant.params)
        if hasattr(model, "bind"):
            model.bind(data)
        return _fit(model, store, train, out, data, table, candidates)
    unknown = sorted(set(variant.domain_params) - set(data.domain_names))
    if unknown:
        raise ValueError(f"{variant.label}: domain_params names unknown domains {unknown}; known: {data.domain_names}")
    metrics: dict[str, float] = {}
    for d, name in enumerate(data.domain_names):
        seed_everything(seed)
        params = variant.params | variant.domain_params.get(name, {})
        model = SingleDomain(build_model(variant.model, store.schema, params), data, d)
        valid = CrossDomainTrainer(model, store, train, out / name, data, table.item, table.eval_negatives,
                                   table.eval_seed, candidates=candidates, valid_rows=table.valid_rows).candidates_of("valid")  # fmt: skip
        cold = "cold_" if train.monitor and "cold" in train.monitor and (valid.cold & (valid.domain == d)).any() else ""
        own = dataclasses.replace(train, monitor=f"valid_{name}_{cold}ndcg@10")  # this domain's rows
        found = _fit(model, store, own, out / name, data, table, candidates)
        metrics |= {k: v for k, v in found.items() if re.match(rf"(valid|test)_(popular_)?{re.escape(name)}_", k)}
        metrics[f"epochs_{name}"] = found["epochs"]
    return metrics


def _fit(
    model: Model, store: Store, train: TrainConfig, out: Path, data: DomainInteractions, table: TableConfig,
    candidates: dict[str, Candidates],
) -> dict[str, float]:  # fmt: skip
    trainer = CrossDomainTrainer(
        model, store, train, out, data, table.item, table.eval_negatives, table.eval_seed,
        candidates=candidates, valid_rows=table.valid_rows,
    )  # fmt: skip
    metrics = trainer.fit()
    for name in ("last", "best"):  # the metrics are what a study keeps
        shutil.rmtree(out / name, ignore_errors=True)
    return metrics


def run_folder(out_root: Path, table: TableConfig, dataset: DatasetSpec, variant: VariantSpec, seed: int) -> Path:
    """``<root>/<data set>/<variant>-<hash>/seed<k>``: the hash covers everything that shapes the
    run, so that tables sharing a run (same data, model, training and protocol) share its folder
    (empty ``domain_params`` are left out of it: a variant without them keeps its folder)."""
    shape = {
        "data": [dataset.source, dataset.options, {**table.split, **dataset.split}],
        "variant": variant.model_dump(exclude={"label", "datasets"} | ({"domain_params"} if not variant.domain_params else set())),
        "train": table.train,
        "protocol": [table.item, table.eval_negatives, table.eval_seed, table.valid_rows],
    }
    digest = hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:10]
    return out_root / _slug(dataset.label) / f"{_slug(variant.label)}-{digest}" / f"seed{seed}"


def run_table(
    config_path: str | Path,
    out_root: Path = Path("runs/cross_domain"),
    store_root: Path = Path("runs/stores"),
    only: list[str] | None = None,
    train: bool = True,
) -> dict:
    """Run the table's (seed, data set, variant) runs, seed by seed, skipping finished ones; then
    write the report from every finished run.

    ``only``: labels of the data sets to train (the report still shows every finished run);
    ``train=False`` only writes the report.
    """
    table = TableConfig.load(config_path)
    known = {d.label for d in table.datasets}
    unknown = sorted(set(only or []) - known)
    if unknown:
        raise ValueError(f"{config_path}: no data set labelled {unknown}; known: {sorted(known)}")
    prepared: dict[str, tuple[Store, DomainInteractions, dict[str, Candidates]]] = {}
    for seed in table.seeds if train else []:
        for dataset in table.datasets:
            if only is not None and dataset.label not in only:
                continue
            for variant in table.variants:
                out = run_folder(out_root, table, dataset, variant, seed)
                if (variant.datasets is not None and dataset.label not in variant.datasets) or (out / "metrics.json").exists():
                    continue
                if not claim_run(out):  # another process is running it
                    continue
                if dataset.label not in prepared:
                    split = {**table.split, **dataset.split}
                    store = prepare_store(DataConfig(source=dataset.source, options=dataset.options, split=split), store_root)
                    prepared[dataset.label] = (store, DomainInteractions.from_store(store, table.item), {})
                store, data, candidates = prepared[dataset.label]
                metrics = run_variant(store, data, variant, table, seed, out, candidates)
                (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
                release_run(out)
                print(f"[{table.name}] {dataset.label} / {variant.label} / seed {seed}: "
                      + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith("test_") and k.endswith("ndcg@10")),
                      flush=True)  # fmt: skip
    results = collect(table, out_root)
    if not results:  # nothing finished yet (or every run held by other processes): leave the report as it is
        if not train:
            raise ValueError(f"{config_path}: no finished run of table {table.name!r} under {out_root}; nothing to report")
        return results
    (out_root / "tables").mkdir(parents=True, exist_ok=True)
    (out_root / "tables" / f"{table.name}.json").write_text(json.dumps(results, indent=2))
    write_report(table, results, Path(config_path))
    return results


def collect(table: TableConfig, out_root: Path) -> dict[str, dict[str, list[dict[str, float]]]]:
    """Metrics of every finished run of the table: data set -> variant -> one dict per seed."""
    results: dict[str, dict[str, list[dict[str, float]]]] = {}
    for dataset in table.datasets:
        for variant in table.variants:
            for seed in table.seeds:
                done = run_folder(out_root, table, dataset, variant, seed) / "metrics.json"
                if done.exists():
                    results.setdefault(dataset.label, {}).setdefault(variant.label, []).append(json.loads(done.read_text()))
    return results


# --- report -----------------------------------------------------------------------------------
def _columns(table: TableConfig, results: dict) -> list[tuple[str, str]]:
    """(data set label, metric group) columns: every domain (and its cold rows when asked)."""
    columns = []
    for dataset in table.datasets:
        if dataset.label not in results:
            continue
        runs = next(iter(results[dataset.label].values()))
        domains = [k[len("test_") : -len("_rows")] for k in runs[0] if k.startswith("test_") and k.endswith("_rows")]
        for group in domains:
            is_cold = group.endswith("_cold")
            if ("cold" if is_cold else "warm") in table.groups:
                columns.append((dataset.label, group))
    return columns


def render_table(table: TableConfig, results: dict) -> tuple[str, dict]:
    """Markdown of the table: one block per metric (rows: models, columns: data set and domain;
    test split, mean ± std over seeds), the change against each reference; and the NDCG@10 means."""
    columns = _columns(table, results)
    labels = [v.label for v in table.variants] + ["most popular (same candidates)"]
    values: dict[tuple[str, str, str, str], list[float]] = {}  # (model, data set, group, metric) -> per seed
    for variant in table.variants:
        for label, group in columns:
            for run in results[label].get(variant.label, []):
                for m in SHOWN:
                    values.setdefault((variant.label, label, group, m), []).append(run[f"test_{group}_{m}"])
                    values.setdefault((labels[-1], label, group, m), [run[f"test_popular_{group}_{m}"]])
    header = "| model | " + " | ".join(f"{label} {group.replace('_cold', ' (cold users)')}" for label, group in columns) + " |"
    rule = "|---" + "|---:" * len(columns) + "|"
    blocks, means = [], {}
    for m in reversed(SHOWN):  # NDCG@10 first
        lines = [f"Test {m.upper()}:", "", header, rule]
        for model in labels:
            cells = []
            for column in columns:
                found = values.get((model, *column, m), [])
                if not found:
                    cells.append("—")
                    continue
                seeds = "" if len(found) == len(table.seeds) or model == labels[-1] else f" (n={len(found)})"
                cells.append(mean_std_cell(found) + seeds)
                means.setdefault(m, {}).setdefault(model, {})[column] = mean_std(found)[0]
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
        blocks.append("\n".join(lines))
    ndcg = means.get("ndcg@10", {})
    for reference in table.references:
        ref = ndcg.get(reference, {})
        lines = [f"Change of the mean test NDCG@10 against {reference}:", "", header, rule]
        for model in labels[:-1]:
            if model == reference or model not in ndcg:
                continue
            cells = [f"{100 * (ndcg[model][c] / ref[c] - 1):+.1f}%" if c in ndcg[model] and c in ref else "—" for c in columns]
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks), ndcg


def plot_table(table: TableConfig, means: dict, path: Path) -> None:
    """Grouped bars: mean test NDCG@10 per model and column."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(means)
    columns = list(dict.fromkeys(c for values in means.values() for c in values))
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(columns) + 2), 4.8))
    for k, label in enumerate(labels):
        ax.bar(np.arange(len(columns)) + k * width, [means[label].get(c, np.nan) for c in columns], width, label=label)
    ax.set_xticks(np.arange(len(columns)) + 0.4 - width / 2)
    ax.set_xticklabels([f"{a}\n{b.replace('_cold', ' (cold)')}" for a, b in columns], fontsize=8)
    ax.set_ylabel("test NDCG@10 (1 + 999 sampled)")
    ax.set_title(table.title, fontsize=10)
    ncol = min(3, max(1, len(columns) - 1))  # a narrow plot stacks its legend
    ax.legend(fontsize=7, ncol=ncol, loc="upper center", bbox_to_anchor=(0.5, -0.14), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")  # the legend below the axes included
    plt.close(fig)


def write_report(table: TableConfig, results: dict, config_path: Path) -> None:
    """Put the table (and a link to its plot) between its markers in ``table.report``."""
    report = Path(table.report)
    text, means = render_table(table, results)
    image = report.with_name(f"{report.stem}_{table.name}.png")
    plot_table(table, means, image)
    seeds = ", ".join(map(str, table.seeds))
    section = (
        f"<!-- table:{table.name} -->\n### {table.title}\n\n"
        f"Reproduce: `recforge cross-domain-rec {config_path.as_posix()}` (seeds {seeds}; mean ± std over seeds; "
        f"test split; sampled ranking, 1 positive + {table.eval_negatives} negatives).\n\n"
        f"{text}\n\n![{table.title}]({image.name})\n<!-- /table:{table.name} -->"
    )
    current = report.read_text() if report.exists() else ""
    pattern = re.compile(rf"<!-- table:{re.escape(table.name)} -->.*?<!-- /table:{re.escape(table.name)} -->", re.S)
    updated = pattern.sub(lambda _: section, current) if pattern.search(current) else current.rstrip() + ("\n\n" if current else "") + section + "\n"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(updated)
