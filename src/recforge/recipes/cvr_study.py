"""The entire-space CVR study: funnel models x known-truth sources x seeds, and a bias sweep.

A study YAML names the models (registered name + params), the sources whose every exposure has
a known truth (``p_cvr`` and ``would_convert`` columns, evaluation only), a sweep of one knob of
one source, the split, the trainer's settings and the seeds. Each (source setting, seed, model)
is one ordinary experiment (:func:`recforge.experiment.run`) in its own run folder; the seed
draws the data, the split and the training. After training, the model's pCVR on the test split
is joined by raw row to the truth and scored with
:func:`~recforge.evaluate.metrics.entire_space_cvr_report`. A run whose ``study.json`` exists
for the same config is not trained again, so an interrupted study resumes.

Outputs: ``results`` (markdown, mean ± std over the seeds), a PNG of entire-space CVR AUC
against the swept knob beside it, ``results.json`` in the study folder, and the measured
section of ``model_doc`` (between its ``<!-- measured -->`` markers).
"""

from __future__ import annotations

import json
import math
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field

from recforge.config import DataConfig, ExperimentConfig, ModelSection
from recforge.data.splits import SplitConfig
from recforge.data.sources import load_source
from recforge.evaluate.metrics import entire_space_cvr_report
from recforge.experiment import load_model, prepare_store, run

MARK_BEGIN, MARK_END = "<!-- measured:begin -->", "<!-- measured:end -->"
TRUTH = ("p_cvr", "would_convert")


class StudyModel(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    label: str
    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class StudySource(BaseModel):
    model_config = ConfigDict(extra="forbid")

    label: str
    source: str
    options: dict[str, Any] = Field(default_factory=dict)


class StudySweep(StudySource):
    knob: str
    values: list[float]


class StudyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    title: str = "Entire-space CVR: ChorusCVR against ESMM, ESCM2 and DCMT"
    focus: str = "ChorusCVR"  # the model whose paired differences to the others are reported
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    models: list[StudyModel]
    sources: list[StudySource]
    sweep: StudySweep | None = None
    split: SplitConfig = Field(default_factory=SplitConfig)
    train: dict[str, Any] = Field(default_factory=dict)
    out: str = "runs/cvr_study"
    results: str = "docs/results/chorus_cvr.md"
    model_doc: str | None = "docs/models/chorus_cvr.md"
    command: str = ""  # the command that reproduces the study, quoted in the results
    discussion: str = ""  # where the results are discussed, linked from the results page


# metric key -> column title, in table order
COLUMNS = {
    "test_click_auc": "CTR AUC",
    "test_conversion_auc": "CVR AUC (clicked)",
    "test_ctcvr_auc": "CTCVR AUC",
    "es_cvr_auc": "ES-CVR AUC (all exposures)",
    "es_cvr_auc_unclicked": "ES-CVR AUC (unclicked)",
    "unclicked_calibration": "pred / true mean CVR (unclicked)",
}


def load_study(path: str | Path, overrides: list[str] | None = None) -> StudyConfig:
    from recforge.config import ConfigError, apply_overrides

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such study file")
    raw = apply_overrides(yaml.safe_load(path.read_text()) or {}, overrides or [])
    return StudyConfig.model_validate(raw)


def settings(study: StudyConfig) -> list[tuple[str, StudySource]]:
    """Every (key, source setting) the study trains on: the sources, then the sweep's points."""
    out = [(f"source{i}", s) for i, s in enumerate(study.sources)]
    if study.sweep is not None:
        sw = study.sweep
        for value in sw.values:
            point = StudySource(label=f"{sw.label} ({sw.knob}={value:g})", source=sw.source,
                                options={**sw.options, sw.knob: value})  # fmt: skip
            out.append((f"sweep-{sw.knob}-{value:g}", point))
    return out


def experiment(study: StudyConfig, source: StudySource, model: StudyModel, seed: int) -> ExperimentConfig:
    data = DataConfig(source=source.source, options={**source.options, "seed": seed},
                      split=study.split.model_copy(update={"seed": seed}))  # fmt: skip
    return ExperimentConfig(
        name=f"{study.name}-{model.label}-{seed}",
        data=data,
        model=ModelSection(name=model.name, params=model.params),
        train={**study.train, "seed": seed},
    )


def run_study(study: StudyConfig, log=print) -> dict:
    """Train and score every run (skipping finished ones); write results and the plot."""
    out = Path(study.out)
    store_root = out / "stores"
    results: dict[str, dict[str, dict[str, list[dict]]]] = {}
    for key, source in settings(study):
        results[key] = {}
        for seed in study.seeds:
            truth = None
            for model in study.models:
                config = experiment(study, source, model, seed)
                # keyed by the data's fingerprint (seed included): a sweep point equal to a listed
                # source shares its runs
                run_dir = out / f"{source.source}-{config.data.fingerprint()}" / _slug(model.label)
                record = run_dir / "study.json"
                stamp = config.model_dump(mode="json")
                if record.exists() and _same_run(json.loads(record.read_text())["config"], stamp):
                    metrics = json.loads(record.read_text())["metrics"]
                else:
                    if truth is None:
                        truth = _truth(config)
                    started = time.perf_counter()
                    trained = run(config, run_dir, store_root=store_root)
                    metrics = {k: v for k, v in trained.items() if k.startswith("test_") or k in ("epochs", "best_epoch")}
                    metrics |= _entire_space(config, run_dir, store_root, truth)
                    metrics["seconds"] = time.perf_counter() - started
                    metrics["seed"] = seed
                    record.write_text(json.dumps({"config": stamp, "metrics": metrics}, indent=2))
                log(f"{source.label} | {model.label} | seed {seed}: es_cvr_auc {metrics['es_cvr_auc']:.4f}, "
                    f"cvr_auc {metrics['test_conversion_auc']:.4f}")  # fmt: skip
                results[key].setdefault(model.label, []).append(metrics)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    write_results(study, results)
    return results


def _same_run(saved: dict, wanted: dict) -> bool:
    """Whether a finished run answers ``wanted``: same data, model and training (any name)."""
    return {k: v for k, v in saved.items() if k != "name"} == {k: v for k, v in wanted.items() if k != "name"}


def _truth(config: ExperimentConfig) -> pl.DataFrame:
    raw = load_source(config.data.source, **config.data.options)
    missing = [c for c in TRUTH if c not in raw.frame.columns]
    if missing:
        raise ValueError(f"{raw.origin}: the study needs the truth columns {missing} of every exposure")
    return raw.frame.select("click", *TRUTH)


@torch.inference_mode()
def _entire_space(config: ExperimentConfig, run_dir: Path, store_root: Path, truth: pl.DataFrame) -> dict[str, float]:
    """Entire-space CVR metrics of the run's saved model on the test split."""
    store = prepare_store(config.data, store_root)
    model = load_model(run_dir / "model")
    view = store.split("test")
    click_label = getattr(model.config, "click_label", "click")
    conversion_label = getattr(model.config, "conversion_label", "conversion")
    p_cvr = torch.cat([model.predict(model(b))[conversion_label] for b in view.batches(65536)]).numpy()
    rows = truth[np.asarray(view.row)]
    if not np.array_equal(rows["click"].to_numpy(), view.column(click_label).astype(np.int8)):
        raise ValueError(f"{run_dir}: the truth table does not line up with the store's test rows")
    return entire_space_cvr_report(rows["click"].to_numpy(), rows["would_convert"].to_numpy(),
                                   rows["p_cvr"].to_numpy(), p_cvr)  # fmt: skip


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label).strip("-").lower()


# --- report --------------------------------------------------------------------------------
def _mean_std(values: list[float]) -> str:
    arr = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    if arr.size == 0:
        return "n/a"
    return f"{arr.mean():.4f} ± {arr.std(ddof=1) if arr.size > 1 else 0.0:.4f}"


def _table(per_model: dict[str, list[dict]]) -> list[str]:
    lines = ["| model | " + " | ".join(COLUMNS.values()) + " | epochs | s / run |",
             "|---|" + "---:|" * (len(COLUMNS) + 2)]  # fmt: skip
    for label, runs in per_model.items():
        cells = [_mean_std([r.get(k) for r in runs]) for k in COLUMNS]
        epochs = np.mean([r.get("epochs", float("nan")) for r in runs])
        seconds = np.mean([r.get("seconds", float("nan")) for r in runs])
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {epochs:.1f} | {seconds:.0f} |")
    return lines


def _differences(per_model: dict[str, list[dict]], focus: str) -> list[str]:
    """ES-CVR AUC of ``focus`` minus each other model, paired by seed: mean ± std and wins."""
    if focus not in per_model:
        return []
    mine = {r["seed"]: r["es_cvr_auc"] for r in per_model[focus]}
    parts = []
    for label, runs in per_model.items():
        if label == focus:
            continue
        gaps = [mine[r["seed"]] - r["es_cvr_auc"] for r in runs if r["seed"] in mine]
        wins = sum(g > 0 for g in gaps)
        parts.append(f"{label} {_mean_std(gaps)} ({wins}/{len(gaps)} seeds ahead)")
    return [f"{focus} minus each model in ES-CVR AUC, paired by seed: " + "; ".join(parts) + ".", ""]


def write_results(study: StudyConfig, results: dict) -> None:
    path = Path(study.results)
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = dict(settings(study))
    lines = [f"# {study.title}", ""]
    lines += [
        f"Reproduce: `{study.command or 'recforge cvr-study <study.yaml>'}`. Machine: 2-core CPU "
        f"shared with other jobs, `{platform.python_implementation()} {platform.python_version()}`, "
        f"torch {torch.__version__}, one thread per run. Seeds {study.seeds}: each seed draws the "
        "data, the split and the training; cells are mean ± std (sample std) over the seeds.",
        "",
        "Metrics on the test split: CTR AUC over all exposures; CVR AUC on the clicked exposures "
        "(label: conversion); CTCVR AUC over all exposures (label: click x conversion); "
        "ES-CVR AUC: pCVR against the conversion every exposure *would* have had if clicked "
        "(known only in these simulated logs), over all exposures and over the unclicked ones; "
        "calibration: mean pCVR / mean true CVR on the unclicked exposures (1 = calibrated).",
        "",
        f"Train settings: `{json.dumps(study.train)}`; split {study.split.kind} "
        f"{list(study.split.ratios)}.",
        "",
    ]
    if study.discussion:
        lines += [f"What these numbers say, and how they compare with the paper: {study.discussion}.", ""]
    shown: dict[str, str] = {}  # (source, options) -> the title it was shown under
    for key, per_model in results.items():
        source = keys[key]
        setting = json.dumps([source.source, source.options], sort_keys=True)
        if setting in shown:  # a sweep point equal to a listed source: the same runs
            continue
        shown[setting] = source.label
        lines += [f"## {source.label}", "", f"Source `{source.source}` with `{json.dumps(source.options)}`.", ""]
        bayes = [r["es_cvr_bayes_auc"] for runs in per_model.values() for r in runs]
        lines += _table(per_model)
        lines += ["", f"Bayes ES-CVR AUC (the true p_cvr against would-convert): {_mean_std(bayes)}.", ""]
        lines += _differences(per_model, study.focus)
    if study.sweep is not None:
        lines += _sweep_section(study, results, path)
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    if study.model_doc:
        _update_model_doc(Path(study.model_doc), text)


def _sweep_section(study: StudyConfig, results: dict, results_path: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sw = study.sweep
    values = sw.values
    keys = [f"sweep-{sw.knob}-{v:g}" for v in values]
    lines = [f"## Sweep: ES-CVR AUC against `{sw.knob}` ({sw.label})", "",
             "| model | " + " | ".join(f"{sw.knob}={v:g}" for v in values) + " |",
             "|---|" + "---:|" * len(values)]  # fmt: skip
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for model in study.models:
        runs = [results.get(k, {}).get(model.label, []) for k in keys]
        lines.append(f"| {model.label} | " + " | ".join(_mean_std([r["es_cvr_auc"] for r in rs]) for rs in runs) + " |")
        means = [np.mean([r["es_cvr_auc"] for r in rs]) if rs else np.nan for rs in runs]
        stds = [np.std([r["es_cvr_auc"] for r in rs], ddof=1) if len(rs) > 1 else 0.0 for rs in runs]
        ax.errorbar(values, means, yerr=stds, marker="o", capsize=3, label=model.label)
    bayes = [np.mean([r["es_cvr_bayes_auc"] for rs in results.get(k, {}).values() for r in rs]) for k in keys]
    ax.plot(values, bayes, "k--", label="Bayes (true p_cvr)")
    lines.append("| Bayes (true p_cvr) | " + " | ".join(f"{b:.4f}" for b in bayes) + " |")
    ax.set_xlabel(f"{sw.knob} (0 = no conversion term in the click logit)")
    ax.set_ylabel("entire-space CVR AUC (test, mean ± std)")
    ax.set_title(f"{sw.label}: CVR AUC over all exposures")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = results_path.with_name(results_path.stem + "_bias_sweep.png")
    fig.savefig(png, dpi=120)
    plt.close(fig)
    lines += ["", f"![ES-CVR AUC against {sw.knob}]({png.name})", ""]
    return lines


def _update_model_doc(path: Path, results_text: str) -> None:
    """Replace the measured section of the model page (between the markers) with the results."""
    body = results_text.split("\n", 1)[1]  # without the results page's title
    body = body.replace("](chorus_cvr_bias_sweep.png)", "](../results/chorus_cvr_bias_sweep.png)")
    section = f"{MARK_BEGIN}\n{body.strip()}\n{MARK_END}"
    if path.exists() and MARK_BEGIN in path.read_text():
        text = path.read_text()
        head, rest = text.split(MARK_BEGIN, 1)
        tail = rest.split(MARK_END, 1)[1] if MARK_END in rest else ""
        path.write_text(head + section + tail)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"# ChorusCVR\n\n## Measured results\n\n{section}\n")
