"""The command line end to end: train, evaluate, models, errors, quickstart."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from recforge.cli import app

runner = CliRunner()

TINY = """
name: tiny_{model}
data:
  source: synthetic
  options: {{n_rows: 6000, n_users: 300, n_items: 200, history_len: 10, seed: 1}}
  split: {{kind: random, seed: 1}}
model:
  name: {model}
train:
  epochs: 2
  batch_size: 256
  lr: 0.003
  seed: 1
  quiet: true
"""


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_config(path: Path, model: str) -> Path:
    config = path / f"{model}.yaml"
    config.write_text(TINY.format(model=model))
    return config


def test_train_writes_run_folder_and_evaluate_reproduces_it(workdir):
    config = write_config(workdir, "din")
    result = runner.invoke(app, ["train", str(config), "--out", "run", "--set", "train.epochs=1"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((workdir / "run" / "metrics.json").read_text())
    assert metrics["epochs"] == 1 and 0.5 < metrics["test_click_auc"] <= 1.0
    for name in ("model.safetensors", "model.json", "schema.json", "normalisers.json", "vocab/item_id.parquet"):
        assert (workdir / "run" / "model" / name).exists(), name
    assert "test_click_auc" in (workdir / "run" / "report.md").read_text()
    result = runner.invoke(app, ["evaluate", "run"])
    assert result.exit_code == 0, result.output
    again = json.loads(result.output.strip().splitlines()[-1])
    for key in ("test_click_auc", "test_click_logloss", "test_click_gauc"):
        assert again[key] == pytest.approx(metrics[key], abs=1e-9)


def test_prepare_reports_the_store(workdir):
    result = runner.invoke(app, ["prepare", str(write_config(workdir, "deepfm"))])
    assert result.exit_code == 0, result.output
    assert "train" in result.output and "item_id" in result.output
    assert len(list((workdir / "runs" / "stores").iterdir())) == 1


def test_models_lists_every_baseline():
    result = runner.invoke(app, ["models"], terminal_width=300)
    assert result.exit_code == 0
    for name in ("lr", "fm", "deepfm", "dcnv2", "din", "esmm", "mmoe", "two_tower"):
        assert f"│ {name} " in result.output


def test_unknown_config_key_is_a_clear_error(workdir):
    config = write_config(workdir, "deepfm")
    result = runner.invoke(app, ["train", str(config), "--set", "train.learning_rate=1"])
    assert result.exit_code == 2
    assert "train.learning_rate: not a trainer setting" in result.output
    result = runner.invoke(app, ["train", str(config), "--set", "model.params.hiden=[8]"])
    assert result.exit_code == 2 and "model.params.hiden: not a parameter of deepfm (did you mean 'hidden'?)" in result.output


def test_quickstart_runs_from_the_installed_command_without_data(tmp_path):
    executable = shutil.which("recforge") or pytest.skip("the recforge console script is not installed")
    env = {k: v for k, v in os.environ.items() if k != "RECFORGE_DATA"}
    done = subprocess.run(
        [executable, "quickstart", "--rows", "20000", "--out", str(tmp_path / "qs")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    metrics = json.loads((tmp_path / "qs" / "synthetic" / "metrics.json").read_text())
    assert metrics["test_click_auc"] > 0.6
    assert "test_click_auc" in done.stdout


@pytest.mark.real_data
def test_deepfm_learns_movielens_100k(workdir, real_data):
    real_data("movielens-100k")
    config = workdir / "ml100k.yaml"
    config.write_text(
        "name: ml100k\n"
        "data: {source: movielens-100k, options: {history_len: 0}, split: {seed: 0}}\n"
        "model: {name: deepfm}\n"
        "train: {epochs: 3, batch_size: 1024, lr: 0.002, quiet: true}\n"
    )
    result = runner.invoke(app, ["train", str(config), "--out", "run"])
    assert result.exit_code == 0, result.output
    log = [json.loads(line) for line in (workdir / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if r["event"] == "train"]
    assert losses[-1] < losses[0] - 0.02
    assert json.loads((workdir / "run" / "metrics.json").read_text())["test_click_auc"] > 0.75


def test_cli_module_entry_point_runs():
    done = subprocess.run([sys.executable, "-m", "recforge", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "quickstart" in done.stdout


@pytest.mark.real_data
def test_two_tower_beats_most_popular_on_beauty(workdir, real_data):
    real_data("amazon-sequential-s3rec")
    result = runner.invoke(
        app,
        ["train", str(Path(__file__).parents[1] / "configs/baselines/beauty_two_tower.yaml"), "--out", "run",
         "--set", "train.epochs=3", "--set", "train.quiet=true"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    metrics = json.loads((workdir / "run" / "metrics.json").read_text())
    for metric in ("recall@10", "ndcg@10"):
        assert metrics[f"test_{metric}"] > 1.5 * metrics[f"test_popular_{metric}"]
