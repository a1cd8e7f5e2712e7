"""`recforge ...`: a thin command line over the library."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from recforge.config import ExperimentConfig, load_config
from recforge.errors import DEBUG_ENV, ConfigError, RecforgeError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False, help="Industrial recommender models: prepare, train, evaluate.")
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


def _fail(err: RecforgeError) -> None:
    """Print ``err`` as one line on stderr and exit with code 2 (``RECFORGE_DEBUG=1``: the traceback)."""
    if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
        raise err
    typer.echo(f"error: {' '.join(str(err).split())}", err=True)
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
        _fail(ConfigError(f"--data must be one of {sorted(QUICKSTART)}"))
    config = ExperimentConfig.model_validate(QUICKSTART[data])
    if rows is not None:
        if data != "synthetic":
            _fail(ConfigError("--rows sets the size of the generated log; it applies to --data synthetic"))
        # keep the default log's density (30 rows per user, 60 per item) and ~100 steps an epoch
        config.data.options.update(n_rows=rows, n_users=max(rows // 30, 10), n_items=max(rows // 60, 10))
        config.train["batch_size"] = int(min(max(rows // 100, 128), 4096))
    try:
        metrics = run(config, out / data, overwrite=True, store_root=STORE_ROOT)  # a demo: each call starts afresh
    except RecforgeError as err:
        _fail(err)
    console.print(_table(f"{config.name} (run folder {out / data})", metrics))


@app.command()
def prepare(config: Path, set_: Annotated[Optional[list[str]], typer.Option("--set", help="key=value override")] = None) -> None:
    """Encode the data set of CONFIG into its store."""
    from recforge.experiment import prepare_store

    try:
        cfg = load_config(config, set_)
        store = prepare_store(cfg.data, STORE_ROOT)
    except RecforgeError as err:
        _fail(err)
    sizes = {split: len(store.split(split)) for split in ("train", "valid", "test")}
    console.print(f"store [bold]{store.path}[/]: rows {sizes}, vocabularies {store.schema.vocab_sizes}")


@app.command()
def train(
    config: Path,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="key=value override, e.g. train.lr=0.001")] = None,
    out: Annotated[Optional[Path], typer.Option(help="run folder (default runs/<config name>)")] = None,
    resume: Annotated[bool, typer.Option(help="continue from the run folder's last checkpoint")] = False,
    overwrite: Annotated[bool, typer.Option(help="first delete the outputs of an earlier run in the run folder (other files stay)")] = False,
) -> None:
    """Train the model of CONFIG; writes metrics.json, model/ and report.md to the run folder."""
    from recforge.experiment import run

    try:
        cfg = load_config(config, set_)
        metrics = run(cfg, out or Path("runs") / cfg.name, resume=resume, overwrite=overwrite, store_root=STORE_ROOT)
    except RecforgeError as err:
        _fail(err)
    if metrics:
        console.print(_table(cfg.name, metrics))


@app.command()
def evaluate(run_dir: Path, split: Annotated[str, typer.Option(help="train, valid or test")] = "test") -> None:
    """Recompute the metrics of a finished run from its saved model."""
    from recforge.experiment import evaluate_run

    try:
        metrics = evaluate_run(run_dir, split)
    except RecforgeError as err:
        _fail(err)
    console.print(_table(f"{run_dir} ({split})", metrics))
    unseen = {k.removeprefix(f"{split}_oov_"): n for k, n in metrics.items() if k.startswith(f"{split}_oov_") and k != f"{split}_oov_values"}
    if unseen:
        typer.echo(f"note: {metrics[f'{split}_oov_values']} value(s) of the {split} split are not in the model's vocabularies "
                   f"and were encoded as OOV: {unseen}", err=True)  # fmt: skip
    print(json.dumps(metrics))


@app.command()
def score(
    run_dir: Path,
    data: Path,
    out: Annotated[Path, typer.Option(help="Parquet file of the predictions")] = Path("predictions.parquet"),
) -> None:
    """Write the predictions of a finished run's model (RUN_DIR: the run folder or its exported bundle) for every row of DATA (CSV or Parquet)."""
    from recforge.experiment import score_file

    try:
        summary = score_file(run_dir, data, out)
    except RecforgeError as err:
        _fail(err)
    console.print(f"{summary['rows']} rows scored into {out}; out-of-vocabulary values: {summary['oov_values']}")
    print(json.dumps(summary))


@app.command()
def export(
    path: Annotated[Path, typer.Argument(help="the finished run folder (with --check: the exported bundle)")],
    out: Annotated[Optional[Path], typer.Option(help="bundle folder to write")] = None,
    check: Annotated[bool, typer.Option(help="verify every file of the bundle PATH against its manifest; write nothing")] = False,
) -> None:
    """Write a finished run's model as a serving bundle (with an ONNX graph when it matches torch), or --check one."""
    from recforge.serve.export import check_bundle, export_run

    try:
        if check:
            if out is not None:
                raise ConfigError("--check verifies the bundle PATH and writes nothing: leave out --out")
            manifest = check_bundle(path)
            typer.echo(f"{path}: {len(manifest['files'])} files verified")
            return
        if out is None:
            raise ConfigError("--out names the bundle folder to write: recforge export RUN --out BUNDLE")
        manifest = export_run(path, out)
    except RecforgeError as err:
        _fail(err)
    onnx = manifest["onnx"]
    if onnx["exported"]:
        typer.echo(f"{out}: {len(manifest['files'])} files; model.onnx matches torch within {onnx['max_abs_diff']:.2g} on {onnx['rows_checked']} test rows")
    else:
        typer.echo(f"{out}: {len(manifest['files'])} files")
        typer.echo(f"note: no model.onnx: {' '.join(onnx['reason'].split())}; the bundle is served by torch", err=True)


@app.command()
def serve(
    bundle: Annotated[Path, typer.Argument(help="an exported bundle (recforge export RUN --out BUNDLE)")],
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8000,
    workers: Annotated[int, typer.Option(help="worker processes (a reload is then SIGHUP to the parent)")] = 1,
    max_batch: Annotated[int, typer.Option(help="most rows scored in one forward pass")] = 256,
    max_wait_ms: Annotated[float, typer.Option(help="longest wait for more requests to join a batch")] = 2.0,
    max_rows: Annotated[int, typer.Option(help="most rows one request may hold")] = 1024,
    backend: Annotated[str, typer.Option(help="auto (ONNX when exported), onnx or torch")] = "auto",
) -> None:
    """Serve an exported bundle over HTTP: POST /score (a ranker) or /recommend (a retriever), GET /health, /metadata and /metrics; POST /admin/reload or SIGHUP swaps the bundle."""
    from recforge.serve.app import serve as run_service

    try:
        run_service(bundle, host, port, workers, backend, max_batch, max_wait_ms, max_rows)
    except RecforgeError as err:
        _fail(err)


@app.command()
def models(markdown: Annotated[bool, typer.Option(help="print the model-zoo table in markdown")] = False) -> None:
    """List the registered models: capabilities, protocol, paper and default hyper-parameters."""
    from recforge.models import registered
    from recforge.models.zoo import zoo_markdown, zoo_rows

    if markdown:
        print(zoo_markdown())
        return
    table = Table(title="models")
    for column in ("name", "family", "capabilities", "protocol", "defaults"):
        table.add_column(column)
    for row in zoo_rows():
        defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory() for f in dataclasses.fields(registered()[row["name"]].config_class)}
        table.add_row(row["name"], row["family"], ", ".join(row["capabilities"]), row["protocol"], json.dumps(defaults))
    console.print(table)


@app.command()
def study(
    spec: Path,
    runs: Annotated[Path, typer.Option(help="folder of the run folders (shared by every study)")] = Path("runs/studies"),
    report_only: Annotated[bool, typer.Option(help="train nothing; rewrite the pages from the records")] = False,
    jobs: Annotated[int, typer.Option(help="runs trained at once, each in its own process")] = 1,
    seed: Annotated[Optional[list[int]], typer.Option(help="train only this seed (repeatable)")] = None,
    dataset: Annotated[Optional[list[str]], typer.Option(help="train only the data set with this label (repeatable)")] = None,
) -> None:
    """Run every missing cell of a study spec (data sets x variants x seeds under its protocol) and write its pages."""
    from recforge.study import run_study

    try:
        found = run_study(spec, runs, STORE_ROOT, report_only=report_only, jobs=jobs, seeds=seed, datasets=dataset,
                          log=lambda line: console.print(line, markup=False, soft_wrap=True))  # fmt: skip
    except RecforgeError as err:
        _fail(err)
    console.print(f"{len(found['runs'])} finished runs")


if __name__ == "__main__":
    app()
