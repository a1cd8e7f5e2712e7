"""Small files a user would write: a CSV log, its schema and a config that trains on it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ENV = {"RECFORGE_QUIET": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}

SCHEMA = {
    "features": [
        {"name": "user_id", "kind": "categorical"},
        {"name": "item_id", "kind": "categorical"},
        {"name": "zip", "kind": "categorical"},
        {"name": "price", "kind": "numeric"},
    ],
    "labels": ["click"],
    "user": "user_id",
}

CONFIG = """name: mine
data:
  source: file
  options: {{path: {path}, schema: schema.json}}
  split: {{kind: random, seed: 0}}
model:
  name: {model}
train:
  epochs: 1
  batch_size: 64
  quiet: true
"""


def log_rows(n: int = 600, seed: int = 0) -> list[dict]:
    """A click log where users with even ids click items whose id is below 20."""
    rng = np.random.default_rng(seed)
    users, items = rng.integers(0, 40, n), rng.integers(0, 40, n)
    return [
        {"user_id": int(u), "item_id": int(i), "zip": f"{int(u) % 7:02d}", "price": round(float(p), 2),
         "click": int((u % 2 == 0) == (i < 20))}
        for u, i, p in zip(users, items, rng.uniform(1, 100, n))
    ]  # fmt: skip


def write_csv(path: Path, rows: list[dict]) -> None:
    columns = list(rows[0])
    path.write_text("\n".join([",".join(columns)] + [",".join(str(r[c]) for c in columns) for r in rows]) + "\n")


def user_files(folder: Path, model: str = "lr", data: str = "log.csv", schema: dict | None = None) -> None:
    """``log.csv``, ``schema.json`` and ``mine.yaml`` (a config training ``model`` on them)."""
    write_csv(folder / "log.csv", log_rows())
    (folder / "schema.json").write_text(json.dumps(schema or SCHEMA, indent=1))
    (folder / "mine.yaml").write_text(CONFIG.format(path=data, model=model))


def recforge(folder: Path, *argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``recforge argv`` in ``folder`` as the user would (exit code not checked)."""
    import os

    inherited = {k: v for k, v in os.environ.items() if k != "RECFORGE_DEBUG"}
    env = {**inherited, **ENV, **(env or {})}
    return subprocess.run([sys.executable, "-m", "recforge.cli", *argv], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


_TRAINED: dict[str, Path] = {}


def trained_run(folder: Path) -> None:
    """The user's files and ``run/``, a finished run of ``mine.yaml`` (trained once per process, then copied)."""
    if "run" not in _TRAINED:
        scratch = Path(tempfile.mkdtemp(prefix="recforge-trained-"))
        user_files(scratch)
        done = recforge(scratch, "train", "mine.yaml", "--out", "run")
        assert done.returncode == 0, done.stderr
        _TRAINED["run"] = scratch
    for name in ("log.csv", "schema.json", "mine.yaml"):
        shutil.copy(_TRAINED["run"] / name, folder / name)
    shutil.copytree(_TRAINED["run"] / "run", folder / "run")
