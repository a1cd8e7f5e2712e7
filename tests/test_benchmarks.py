"""Smoke test: every benchmark script runs at --quick sizes and writes its results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("name", ["speed_metrics", "speed_din", "scale_vocab", "scale_rows", "speed_ddp", "bulk_score", "retrieval", "speed_text", "pq_attention", "lifelong_train"])
def test_benchmark_quick(name: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RECFORGE_DATA"}
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / f"{name}.py"), "--quick", "--out", str(tmp_path)],
        env=env, timeout=60, capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / f"{name}.json").read_text())
    assert result["rows"] and all("name" in row and "ratio" in row for row in result["rows"])
    assert {"device", "threads", "meta"} <= result.keys()
    assert (tmp_path / f"{name}.md").exists() and (tmp_path / f"{name}.png").exists()


def test_speed_deepfm_quick(tmp_path: Path) -> None:
    data = os.environ.get("RECFORGE_DATA")
    if not data or not (Path(data) / "movielens-1m").is_dir():
        pytest.skip("needs $RECFORGE_DATA/movielens-1m")
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "speed_deepfm.py"), "--quick", "--out", str(tmp_path)],
        timeout=300, capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "speed_deepfm.json").read_text())
    rows = {row["name"]: row for row in result["rows"]}
    assert set(rows) == {"recforge", "plain-pytorch"}
    for row in rows.values():
        assert not row["error"], row["error"]
        assert row["train_samples_per_s"] > 0 and row["wall_s"] > 0 and 0.0 <= row["test_auc"] <= 1.0
    assert (tmp_path / "speed_deepfm.md").exists() and (tmp_path / "speed_deepfm.png").exists()


def test_serve_load_quick(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RECFORGE_DATA"}
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "serve_load.py"), "--quick", "--out", str(tmp_path)],
        env=env, timeout=240, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "serve_load.json").read_text())
    assert {row["mode"] for row in result["rows"]} == {"batched", "per-request"}
    assert all(row["errors"] == 0 and row["requests_per_s"] > 0 for row in result["rows"])
    assert (tmp_path / "serve_load.md").exists()
