"""`recforge ...`: a thin command line over the library."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from recforge.config import ExperimentConfig, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Industrial recommender models: prepare, train, evaluate.")
console = Console()

STORE_ROOT = Path("runs/stores")

_QUICKSTART_TRAIN = {"epochs": 2, "batch_size": 4096, "lr": 0.002, "monitor": "valid_click_auc"}
QUICKSTART = {
    "synthetic": {
        "name": "quickstart_synthetic_deepfm",
        "data": {"source": "synthetic", "options": {"n_rows": 300_000, "seed": 0}, "split": {"kind": "random", "seed": 0}},
        "model": {"name": "deepfm", "params": {}},
        "train": _QUICKSTART_TRAIN,
    },
    "movielens-1m": {
        "name": "quickstart_movielens1m_deepfm",
        "data": {"source": "movielens-1m", "options": {"history_len": 0}, "split": {"kind": "random", "seed": 42}},
        "model": {"name": "deepfm", "params": {}},
        "train": _QUICKSTART_TRAIN,
    },
}


def _fail(err: Exception) -> None:
    console.print(f"[bold red]error:[/] {err}")
    raise typer.Exit(code=2)


def _table(title: str, metrics: dict) -> Table:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    return table


@app.command()
def quickstart(
    data: Annotated[str, typer.Option(help="synthetic (generated, no files needed) or movielens-1m")] = "synthetic",
    out: Annotated[Path, typer.Option(help="run folder")] = Path("runs/quickstart"),
    rows: Annotated[Optional[int], typer.Option(help="rows of the generated log (synthetic only)")] = None,
) -> None:
    """Train DeepFM on a generated industrial-style log (or MovieLens-1M) and print its metrics."""
    from recforge.experiment import run

    if data not in QUICKSTART:
        _fail(ValueError(f"--data must be one of {sorted(QUICKSTART)}"))
    config = ExperimentConfig.model_validate(QUICKSTART[data])
    if rows is not None:
        if data != "synthetic":
            _fail(ValueError("--rows sets the size of the generated log; it applies to --data synthetic"))
        # keep the default log's density (30 rows per user, 60 per item) and ~100 steps an epoch
        config.data.options.update(n_rows=rows, n_users=max(rows // 30, 10), n_items=max(rows // 60, 10))
        config.train["batch_size"] = int(min(max(rows // 100, 128), 4096))
    try:
        metrics = run(config, out / data, store_root=STORE_ROOT)
    except (ValueError, FileNotFoundError) as err:
        _fail(err)
    console.print(_table(f"{config.name} (run folder {out / data})", metrics))


@app.command()
def prepare(config: Path, set_: Annotated[Optional[list[str]], typer.Option("--set", help="key=value override")] = None) -> None:
    """Encode the data set of CONFIG into its store."""
    from recforge.experiment import prepare_store

    try:
        cfg = load_config(config, set_)
        store = prepare_store(cfg.data, STORE_ROOT)
    except (ValueError, FileNotFoundError) as err:
        _fail(err)
    sizes = {split: len(store.split(split)) for split in ("train", "valid", "test")}
    console.print(f"store [bold]{store.path}[/]: rows {sizes}, vocabularies {store.schema.vocab_sizes}")


@app.command()
def train(
    config: Path,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="key=value override, e.g. train.lr=0.001")] = None,
    out: Annotated[Optional[Path], typer.Option(help="run folder (default runs/<config name>)")] = None,
    resume: Annotated[bool, typer.Option(help="continue from the run folder's last checkpoint")] = False,
) -> None:
    """Train the model of CONFIG; writes metrics.json, model/ and report.md to the run folder."""
    from recforge.experiment import run

    try:
        cfg = load_config(config, set_)
        metrics = run(cfg, out or Path("runs") / cfg.name, resume=resume, store_root=STORE_ROOT)
    except (ValueError, FileNotFoundError) as err:
        _fail(err)
    if metrics:
        console.print(_table(cfg.name, metrics))


@app.command()
def evaluate(run_dir: Path, split: Annotated[str, typer.Option(help="train, valid or test")] = "test") -> None:
    """Recompute the metrics of a finished run from its saved model."""
    from recforge.experiment import evaluate_run

    try:
        metrics = evaluate_run(run_dir, split, STORE_ROOT)
    except (ValueError, FileNotFoundError, KeyError) as err:
        _fail(err)
    console.print(_table(f"{run_dir} ({split})", metrics))
    print(json.dumps(metrics))


@app.command()
def models() -> None:
    """List the registered models and their default hyper-parameters."""
    from recforge.models import registered

    table = Table(title="models")
    table.add_column("name")
    table.add_column("task")
    table.add_column("defaults")
    for name, cls in registered().items():
        defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory() for f in dataclasses.fields(cls.config_class)}
        table.add_row(name, cls.task, json.dumps(defaults))
    console.print(table)


@app.command("cvr-study")
def cvr_study(
    study: Path,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="key=value override, e.g. seeds=[0]")] = None,
) -> None:
    """Train the funnel models of STUDY on the known-truth sources and write the results pages."""
    from recforge.recipes.cvr_study import load_study, run_study

    try:
        config = load_study(study, set_)
        run_study(config, log=console.print)
    except (ValueError, FileNotFoundError, KeyError) as err:
        _fail(err)
    console.print(f"wrote {config.results}" + (f" and {config.model_doc}" if config.model_doc else ""))


@app.command()
def study(
    config: Path,
    runs: Annotated[Path, typer.Option(help="folder of the study's run folders")] = Path("runs/studies"),
    report_only: Annotated[bool, typer.Option(help="only rewrite the pages from the runs done so far")] = False,
    seed: Annotated[Optional[list[int]], typer.Option(help="train only this seed (repeatable)")] = None,
    group: Annotated[Optional[list[str]], typer.Option(help="train only this variant group (repeatable)")] = None,
) -> None:
    """Train every model x seed of a study config (skipping finished runs) and write its pages."""
    from recforge.study import run_study

    try:
        summary = run_study(config, runs, STORE_ROOT, report_only=report_only, seeds=seed, groups=group)
    except (ValueError, FileNotFoundError, KeyError) as err:
        _fail(err)
    console.print_json(json.dumps(summary))


@app.command("cross-domain-rec")
def cross_domain_rec(
    config: Path,
    out: Annotated[Path, typer.Option(help="root of the run folders")] = Path("runs/cross_domain"),
    dataset: Annotated[Optional[list[str]], typer.Option(help="train only the data set with this label (repeatable)")] = None,
    report_only: Annotated[bool, typer.Option(help="write the report from the finished runs, train nothing")] = False,
) -> None:
    """Run a cross-domain table (data sets x models x seeds) of CONFIG and write it into its report."""
    from recforge.recipes.cross_domain import run_table

    try:
        run_table(config, out, STORE_ROOT, only=dataset, train=not report_only)
    except (ValueError, FileNotFoundError) as err:
        _fail(err)


@app.command("cold-start")
def cold_start(
    config: Path,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="key=value override, e.g. seeds=[0]")] = None,
    backbone: Annotated[Optional[list[str]], typer.Option(help="run only this backbone (repeatable)")] = None,
    results: Annotated[Optional[Path], typer.Option(help="results JSON; finished runs in it are kept (default: the report's .json)")] = None,
    report_only: Annotated[bool, typer.Option(help="run nothing; rewrite the report from the results JSON")] = False,
) -> None:
    """Item cold start (GME / MetaEmb): pre-train each backbone, meta-train the generators, evaluate cold and after warm-ups a, b, c; writes the report table and plot."""
    from recforge.recipes.cold_start import load_cold_start_config, run_cold_start

    try:
        cfg = load_cold_start_config(config, set_)
        command = " ".join(["recforge cold-start", str(config), *(f"--set {o}" for o in set_ or []), *(f"--backbone {b}" for b in backbone or [])])
        run_cold_start(cfg, STORE_ROOT, backbones=backbone, results_path=results, command=command, report_only=report_only)
    except (ValueError, FileNotFoundError) as err:
        _fail(err)
    console.print(f"report written to [bold]{cfg.report}[/]")


if __name__ == "__main__":
    app()
