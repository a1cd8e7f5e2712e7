"""Helpers shared by the benchmark scripts: arguments, timing and result files."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

Row = dict[str, Any]


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default: 2)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the smoke test")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="results folder")
    return parser.parse_args()


def timeit(fn: Callable[[], object], repeat: int = 3) -> float:
    """Best wall time of ``repeat`` calls of ``fn``, in seconds."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_results(
    name: str,
    rows: Sequence[Row],
    meta: dict[str, Any],
    *,
    args: argparse.Namespace,
    reference: str,
    figure: str,
    group: str | None = None,
) -> None:
    """Write ``<out>/<name>.json``, ``.md`` and ``.png``.

    Every row gets ``ratio``: its ``figure`` over that of the row named ``reference`` (within the
    same ``group`` value when ``group`` is given). The markdown table shows the ratio with every
    figure's absolute value beside it; the plot shows ``figure`` per row.
    """
    references = {row.get(group) if group else None: row[figure] for row in rows if row["name"] == reference}
    rows = [{**row, "ratio": row[figure] / references[row.get(group) if group else None]} for row in rows]
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    payload = {"rows": rows, "device": args.device, "threads": args.threads, "meta": meta}
    (out / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")

    keys = [group] if group else []
    figures = [k for k in rows[0] if k not in {"name", "ratio", *keys}]
    header = [*keys, "name", f"{figure} vs {reference}", *figures]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [*(row[k] for k in keys), row["name"], f"{row['ratio']:.3g}x", *(row[k] for k in figures)]
        lines.append("| " + " | ".join(_fmt(c) for c in cells) + " |")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")

    labels = [f"{row[group]}\n{row['name']}" if group else row["name"] for row in rows]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(rows)), 3.5))
    values = [row[figure] for row in rows]
    ax.bar(labels, values, color="tab:blue")
    if max(values) > 100 * min(values) > 0:
        ax.set_yscale("log")
    ax.set_ylabel(figure)
    ax.set_title(f"{name} ({args.device}, {args.threads} threads)")
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=100)
    plt.close(fig)
