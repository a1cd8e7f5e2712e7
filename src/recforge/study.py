"""A study: several experiment configs (variants) x several seeds, summarised as mean ± std.

A study config (YAML) names the variants (an experiment config plus ``--set``-style overrides),
the seeds, the reference variant that gains are measured against, the metrics to report and the
pages to write. Every (variant, seed) run trains into ``<runs>/<study>/<variant>/seed<k>`` with
:func:`recforge.experiment.run`; a run whose ``metrics.json`` exists is not trained again, so an
interrupted study continues where it stopped. After every run the pages are rewritten from the
runs done so far: each page is a hand-written template whose ``{{results}}`` line is replaced by
the tables (mean ± std over seeds, sample std), a PNG plot and the command that reproduces them.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field

from recforge.config import ConfigError, load_config

PLACEHOLDER = "{{results}}"


class Variant(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str  # row label in the tables
    config: str  # experiment config, relative to the study config's folder
    set: list[str] = Field(default_factory=list)  # overrides, e.g. model.params.long_term=false
    group: str = "main"  # variants of one group share a table


class Page(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str  # the page written (relative to the working directory)
    template: str  # hand-written markdown with a {{results}} line (relative to the study config)


class StudyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    command: str  # the command that reproduces the study, quoted on the pages
    seeds: list[int]
    seed_keys: list[str] = Field(default_factory=lambda: ["train.seed"])  # set to each run's seed
    variants: list[Variant]
    reference: str  # variant whose test AUC the gains are measured against
    label: str  # the predicted label: metrics are <split>_<label>_<metric>
    plot: str  # PNG path (relative to the working directory)
    pages: list[Page]


def load_study(path: str | Path) -> StudyConfig:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such study config")
    study = StudyConfig.model_validate(yaml.safe_load(path.read_text()))
    names = [v.name for v in study.variants]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: variant names repeat: {names}")
    if study.reference not in names:
        raise ConfigError(f"{path}: reference {study.reference!r} is not a variant ({names})")
    return study


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def run_study(
    path: str | Path,
    runs: Path,
    store_root: Path,
    report_only: bool = False,
    seeds: list[int] | None = None,
    groups: list[str] | None = None,
) -> dict:
    """Train every missing (variant, seed) run, then write the pages; returns the summary.

    ``seeds`` and ``groups`` restrict the runs trained (not the pages) to some seeds and variant
    groups, e.g. to share a study among processes or machines that write into one ``runs`` folder.
    """
    from recforge.experiment import claim_run, release_run, run

    path = Path(path)
    study = load_study(path)
    root = runs / study.name
    for seed in seeds or []:
        if seed not in study.seeds:
            raise ConfigError(f"{path}: seed {seed} is not one of the study's seeds {study.seeds}")
    known_groups = list(dict.fromkeys(v.group for v in study.variants))
    for group in groups or []:
        if group not in known_groups:
            raise ConfigError(f"{path}: group {group!r} is not one of the study's groups {known_groups}")
    # every seed of the first group before the next group, so that an early stop leaves whole tables
    order = [
        (v, s)
        for g in known_groups
        if not groups or g in groups
        for s in study.seeds
        if not seeds or s in seeds
        for v in study.variants
        if v.group == g
    ]
    for variant, seed in order:
        out = root / slug(variant.name) / f"seed{seed}"
        if report_only or (out / "metrics.json").exists() or not claim_run(out):  # done, or another process runs it
            continue
        config = load_config(path.parent / variant.config, [*variant.set, *(f"{k}={seed}" for k in study.seed_keys)])
        started = time.perf_counter()
        run(config, out, store_root=store_root)
        (out / "wall.json").write_text(json.dumps({"seconds": time.perf_counter() - started}))
        release_run(out)
        write_pages(study, path, root)
    return write_pages(study, path, root)


def collect(study: StudyConfig, root: Path) -> dict[str, list[dict]]:
    """Per variant, the metrics of each finished seed (with ``seconds``, the run's wall time)."""
    found: dict[str, list[dict]] = {}
    for variant in study.variants:
        rows = []
        for seed in study.seeds:
            out = root / slug(variant.name) / f"seed{seed}"
            if (out / "metrics.json").exists():
                metrics = json.loads((out / "metrics.json").read_text())
                wall = json.loads((out / "wall.json").read_text())["seconds"] if (out / "wall.json").exists() else math.nan
                rows.append({"seed": seed, "seconds": wall, **metrics})
        found[variant.name] = rows
    return found


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std, NaNs skipped; std is NaN for fewer than two values."""
    array = np.asarray(values, dtype=float)
    if len(array) == 0 or np.isnan(array).all():
        return math.nan, math.nan
    return float(np.nanmean(array)), float(np.nanstd(array, ddof=1)) if len(array) > 1 else math.nan


def mean_std_cell(values: list[float], digits: int = 4) -> str:
    """A table cell: ``mean ± std``, the mean alone for one value, ``n/a`` for none."""
    mean, std = mean_std(values)
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def summarise(study: StudyConfig, found: dict[str, list[dict]]) -> dict[str, dict[str, float]]:
    """Mean and std of each variant's metrics, and its gain in test AUC over the reference."""
    label = study.label
    ref = {r["seed"]: r[f"test_{label}_auc"] for r in found[study.reference]}
    summary = {}
    for name, rows in found.items():
        if not rows:
            continue
        entry = {}
        for key in (f"valid_{label}_auc", f"test_{label}_auc", f"test_{label}_logloss", f"test_{label}_gauc"):
            entry[key], entry[f"{key}_std"] = mean_std([r.get(key, math.nan) for r in rows])
        paired = [r[f"test_{label}_auc"] - ref[r["seed"]] for r in rows if r["seed"] in ref]
        entry["delta_auc"], entry["delta_auc_std"] = mean_std(paired)
        ref_auc = mean_std(list(ref.values()))[0]
        entry["rela_impr"] = (entry[f"test_{label}_auc"] - 0.5) / (ref_auc - 0.5) - 1.0 if ref else math.nan
        entry["runs"] = len(rows)
        summary[name] = entry
    return summary


def tables(study: StudyConfig, found: dict[str, list[dict]]) -> str:
    label = study.label
    lines = []
    for group in dict.fromkeys(v.group for v in study.variants):
        lines += [
            f"### {group}",
            "",
            f"| model | seeds | best epoch | valid AUC | test AUC | test LogLoss | test GAUC | Δ test AUC vs {study.reference} | RelaImpr | minutes / run |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        ref = {r["seed"]: r[f"test_{label}_auc"] for r in found[study.reference]}
        ref_auc = mean_std(list(ref.values()))[0]
        for variant in (v for v in study.variants if v.group == group):
            rows = found[variant.name]
            if not rows:
                lines.append(f"| {variant.name} | 0 | not run | | | | | | | |")
                continue
            test_auc = [r[f"test_{label}_auc"] for r in rows]
            paired = [r[f"test_{label}_auc"] - ref[r["seed"]] for r in rows if r["seed"] in ref]
            mean_auc = mean_std(test_auc)[0]
            rela = f"{100 * ((mean_auc - 0.5) / (ref_auc - 0.5) - 1):+.2f}%" if ref else "n/a"
            lines.append(
                f"| {variant.name} | {len(rows)} | {mean_std_cell([r.get('best_epoch', math.nan) for r in rows], 1)} "
                f"| {mean_std_cell([r[f'valid_{label}_auc'] for r in rows])} | {mean_std_cell(test_auc)} "
                f"| {mean_std_cell([r[f'test_{label}_logloss'] for r in rows])} "
                f"| {mean_std_cell([r.get(f'test_{label}_gauc', math.nan) for r in rows])} "
                f"| {_signed(paired)} | {rela} | {mean_std_cell([r['seconds'] / 60 for r in rows], 1)} |"
            )
        lines.append("")
    return "\n".join(lines)


def _signed(values: list[float]) -> str:
    mean, std = mean_std(values)
    if math.isnan(mean):
        return "n/a"
    return f"{mean:+.4f}" if math.isnan(std) else f"{mean:+.4f} ± {std:.4f}"


def plot(study: StudyConfig, found: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [v.name for v in study.variants if found[v.name]]
    stats = [mean_std([r[f"test_{study.label}_auc"] for r in found[n]]) for n in names]
    groups = {v.name: v.group for v in study.variants}
    colours = {g: c for g, c in zip(dict.fromkeys(groups.values()), ["tab:blue", "tab:orange", "tab:green", "tab:red"])}
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(names)), 4.0))
    means = [m for m, _ in stats]
    errors = [0.0 if math.isnan(s) else s for _, s in stats]
    ax.bar(range(len(names)), means, yerr=errors, capsize=4, color=[colours[groups[n]] for n in names])
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    low = min(m - e for m, e in zip(means, errors))
    high = max(m + e for m, e in zip(means, errors))
    ax.set_ylim(low - 0.2 * (high - low + 1e-3), high + 0.2 * (high - low + 1e-3))
    ax.set_ylabel(f"test {study.label} AUC (mean ± std over seeds)")
    ax.set_title(study.name)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_pages(study: StudyConfig, path: Path, root: Path) -> dict:
    found = collect(study, root)
    if not any(found.values()):
        return {}
    plot_path = Path(study.plot)
    plot(study, found, plot_path)
    for page in study.pages:
        target = Path(page.path)
        relative_plot = os.path.relpath(plot_path, target.parent)
        block = "\n".join(
            [
                tables(study, found),
                f"![test AUC per model]({relative_plot})",
                "",
                f"Reproduce: `{study.command}`",
            ]
        )
        template = (path.parent / page.template).read_text()
        if PLACEHOLDER not in template:
            raise ConfigError(f"{path.parent / page.template}: no {PLACEHOLDER} line")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(template.replace(PLACEHOLDER, block))
    summary = summarise(study, found)
    (root / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
