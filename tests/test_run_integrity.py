"""Run folders and checkpoints that survive kills, re-runs and two writers at once."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from recforge.bundle import load_bundle
from recforge.cli import app
from recforge.train import checkpoint
from recforge.train.checkpoint import MODEL_FILE, STATE_FILE, find_checkpoint, load_checkpoint, save_checkpoint

# every file-system call a save makes that can be the last one before a kill
OS_CALLS = ("mkdir", "fsync", "replace", "rename", "unlink", "rmdir")
WRITERS = ("save_model", "save_file")  # the tensor files, written by safetensors

TINY = """
name: tiny
data:
  source: synthetic
  options: {n_rows: 6000, n_users: 300, n_items: 200, history_len: 10, seed: 1}
  split: {kind: random, seed: 1}
model:
  name: deepfm
  params: {hidden: [32], embedding_dim: 8}
train:
  epochs: 2
  batch_size: 256
  seed: 1
  quiet: true
"""


def version(step: int) -> tuple[nn.Module, dict]:
    """The model and optimiser state that checkpoint ``step`` holds."""
    torch.manual_seed(step)
    return nn.Linear(4, 2), {"step": step, "sum": torch.full((4,), float(step))}


def save(last: Path, step: int) -> None:
    model, optimizer_state = version(step)
    save_checkpoint(last, model, {"step": step}, optimizer_state)


def assert_holds(found: Path, steps: set[int]) -> None:
    """``found`` is a complete checkpoint of one of ``steps``: every file loads and matches."""
    model = nn.Linear(4, 2)
    state, optimizer_state = load_checkpoint(found, model)
    assert state["step"] in steps, (found, state)
    expected, expected_optimizer = version(state["step"])
    assert torch.equal(model.weight, expected.weight) and torch.equal(model.bias, expected.bias)
    assert optimizer_state["step"] == state["step"] and torch.equal(optimizer_state["sum"], expected_optimizer["sum"])


def save_in_child(last: Path, step: int, kill_before: int) -> int:
    """Fork a child that resumes from ``last`` (when it holds a checkpoint) and saves ``step`` there,
    SIGKILLing itself just before its ``kill_before``-th file-system call; the calls it made when
    it was not killed, else -1."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            found = find_checkpoint(last)
            if found is not None:
                load_checkpoint(found, nn.Linear(4, 2))
            calls = [0]

            def dying(function):
                def call(*args, **kwargs):
                    if calls[0] == kill_before:
                        os.kill(os.getpid(), signal.SIGKILL)
                    calls[0] += 1
                    return function(*args, **kwargs)

                return call

            for name in OS_CALLS:
                setattr(os, name, dying(getattr(os, name)))
            for name in WRITERS:
                setattr(checkpoint, name, dying(getattr(checkpoint, name)))
            save(last, step)
            os._exit(min(calls[0], 100))
        except BaseException:
            os._exit(101)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
        return -1
    assert os.WEXITSTATUS(status) < 100, "the child failed or made too many calls"
    return os.WEXITSTATUS(status)


def only_old(root: Path) -> None:
    """What a save killed between its renames leaves: step 1 in last.old, no last, a half-written last.tmp."""
    save(root / "last", 1)
    os.replace(root / "last", root / "last.old")
    (root / "last.tmp").mkdir()
    (root / "last.tmp" / STATE_FILE).write_text('{"state": {"st')


def previous_and_old(root: Path) -> None:
    """What a save killed before discarding last.old leaves: step 1 in last.old, step 2 in last."""
    for step in (1, 2):
        save(root / f"step{step}", step)
    os.replace(root / "step2", root / "last")
    os.replace(root / "step1", root / "last.old")


SCENARIOS = {
    "no checkpoint yet": (lambda root: None, set()),
    "a previous checkpoint": (lambda root: save(root / "last", 1), {1}),
    "last and last.old": (previous_and_old, {1, 2}),
    "resumed from last.old": (only_old, {1}),
}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_a_save_killed_at_any_call_leaves_a_complete_checkpoint(tmp_path, scenario):
    prepare, before = SCENARIOS[scenario]
    prepare(tmp_path / "unbroken")
    calls = save_in_child(tmp_path / "unbroken" / "last", 9, kill_before=-1)
    assert calls > 5
    assert_holds(find_checkpoint(tmp_path / "unbroken" / "last"), {9})
    for kill_before in range(calls):
        root = tmp_path / f"killed-{kill_before}"
        prepare(root)
        assert save_in_child(root / "last", 9, kill_before) == -1
        found = find_checkpoint(root / "last")
        if found is None:  # only before the first checkpoint is complete
            assert not before, f"no checkpoint after a kill before call {kill_before}"
        else:
            assert_holds(found, before | {9})
        save(root / "last", 10)  # the next save recovers
        assert_holds(find_checkpoint(root / "last"), {10})
        assert sorted(p.name for p in root.iterdir() if p.name.startswith("last")) == ["last"]


def test_a_half_written_staging_folder_is_never_read(tmp_path):
    (tmp_path / "last.tmp").mkdir()
    (tmp_path / "last.tmp" / MODEL_FILE).write_bytes(b"\0" * 10)
    assert find_checkpoint(tmp_path / "last") is None
    save(tmp_path / "last", 3)
    assert_holds(find_checkpoint(tmp_path / "last"), {3})


# --- run folders through the command line ------------------------------------------------------
runner = CliRunner()


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.yaml").write_text(TINY)
    return tmp_path


def test_overwrite_replaces_a_runs_outputs_and_keeps_the_users_files(workdir):
    assert runner.invoke(app, ["train", "tiny.yaml", "--out", "run"]).exit_code == 0
    (workdir / "run" / "notes.md").write_text("mine")
    (workdir / "run" / "model.old").mkdir()  # left by a bundle save killed between its renames
    refused = runner.invoke(app, ["train", "tiny.yaml", "--out", "run", "--set", "train.epochs=1"])
    assert refused.exit_code == 2 and "pass --overwrite to delete its outputs first" in refused.output

    result = runner.invoke(app, ["train", "tiny.yaml", "--out", "run", "--set", "train.epochs=1", "--overwrite"])
    assert result.exit_code == 0, result.output
    assert (workdir / "run" / "notes.md").read_text() == "mine"
    assert not (workdir / "run" / "model.old").exists()
    log = [json.loads(line) for line in (workdir / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log if r["event"] == "eval"] == [1]  # nothing of the first run's two epochs
    assert json.loads((workdir / "run" / "metrics.json").read_text())["epochs"] == 1
    assert sorted(p.name for p in (workdir / "run").iterdir()) == sorted(
        ["notes.md", "config.yaml", "metrics.json", "report.md", "metrics.jsonl", "model", "last", "best"]
    )


def test_resume_extends_a_finished_run(workdir):
    assert runner.invoke(app, ["train", "tiny.yaml", "--out", "run", "--set", "train.epochs=1"]).exit_code == 0
    result = runner.invoke(app, ["train", "tiny.yaml", "--out", "run", "--resume"])
    assert result.exit_code == 0, result.output
    log = [json.loads(line) for line in (workdir / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log if r["event"] == "eval"] == [1, 2]
    assert json.loads((workdir / "run" / "metrics.json").read_text())["epochs"] == 2


def test_two_trainings_into_one_folder_at_once_one_wins(workdir):
    env = os.environ | {"RECFORGE_QUIET": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "recforge.cli", "train", "tiny.yaml", "--out", "run"]
    processes = [subprocess.Popen(command, cwd=workdir, env=env, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outcomes = sorted((p.wait(timeout=300), p.stderr.read()) for p in processes)

    assert [code for code, _ in outcomes] == [0, 2], outcomes
    message = outcomes[1][1].strip()
    assert re.fullmatch(  # the loser meets the winner's lock, or (when it starts late) the winner's finished run
        r"error: run: (another process \(pid \d+\) is writing this run folder; wait for it to end or choose another --out"
        r"|already holds a run .*; pass --overwrite to delete its outputs first, or --resume to continue it)",
        message,
    ), message
    metrics = json.loads((workdir / "run" / "metrics.json").read_text())
    assert metrics["epochs"] == 2
    load_bundle(workdir / "run" / "model")
    assert not (workdir / "run" / ".lock").exists()

