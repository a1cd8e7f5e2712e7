"""Bulk scoring of a Parquet file (`score_file`) against the trainer's evaluation of the same rows."""

from __future__ import annotations

import cProfile
import os
import pstats
import resource
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch
from _common import Row, parse_args, write_results

from recforge.bundle import bundle_folder, save_bundle
from recforge.data.prepare import Fitted, prepare
from recforge.data.sources import load_file, synthetic
from recforge.data.splits import SplitConfig
from recforge.experiment import score_file
from recforge.models import build_model
from recforge.study.runs import environment
from recforge.train.trainer import TrainConfig, Trainer

MODELS = ("deepfm", "din")
HISTORY_LEN = 20
BATCH_SIZES = (65536, 4096)  # the default of both sides, and one whose tensors stay off fresh mmap pages
# where a score_file call spends its time: (file suffix, function) of the profile
PHASES = {
    "load bundle": ("recforge/bundle.py", "load_bundle"),
    "read file": ("recforge/data/sources/__init__.py", "load_file"),
    "encode (prepare)": ("recforge/data/prepare.py", "prepare"),
    "make batches": ("recforge/data/store.py", "take"),
    "model forward": ("torch/nn/modules/module.py", "_wrapped_call_impl"),
    "write parquet": ("polars/dataframe/frame.py", "write_parquet"),
}


def timed(fn) -> tuple[float, int]:
    """Seconds and minor page faults of one call of ``fn``."""
    faults, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    fn()
    return time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults


def profile_phases(fn) -> dict[str, float]:
    """Cumulative seconds of each of :data:`PHASES` during one call of ``fn``, and the total (under the profiler)."""
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.runcall(fn)
    total = time.perf_counter() - start
    stats = pstats.Stats(profiler).stats
    phases = {name: sum(entry[3] for (path, _, func), entry in stats.items() if path.endswith(suffix) and func == function)
              for name, (suffix, function) in PHASES.items()}  # fmt: skip
    return phases | {"total": total}


def main() -> None:
    args = parse_args(__doc__)
    torch.set_num_threads(args.threads)
    n_rows, repeat = (5_000, 1) if args.quick else (200_000, 5)
    raw = synthetic.generate(n_rows=n_rows, history_len=HISTORY_LEN)
    rows: list[Row] = []
    profiles: dict[str, dict[str, float]] = {}
    start_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train_store = prepare(raw, tmp / "train_store")
        table = tmp / "rows.parquet"
        raw.frame.drop(raw.schema.labels).write_parquet(table)  # rows to score: no labels
        for name in MODELS:
            torch.manual_seed(0)
            model = build_model(name, train_store.schema).eval()
            run = tmp / name
            save_bundle(model, train_store, run / "model")
            # the same rows, encoded by the bundle into a store whose test split holds them all
            fitted = Fitted.load(bundle_folder(run / "model"))
            store = prepare(load_file(table, fitted.schema, require_labels=False), tmp / f"{name}_store",
                            SplitConfig(ratios=(0.0, 0.0, 1.0)), fitted=fitted)  # fmt: skip
            out = run / "scores.parquet"
            for batch_size in BATCH_SIZES:
                trainer = Trainer(model, store, TrainConfig(quiet=True, eval_batch_size=batch_size), tmp / f"{name}_eval")
                evaluate = score = (float("inf"), 0)
                for _ in range(repeat):  # interleaved: both sides see the same load of the machine
                    evaluate = min(evaluate, timed(lambda: trainer.evaluate("test")))
                    score = min(score, timed(lambda: score_file(run, table, out, batch_size=batch_size)))
                (evaluate_s, _), (score_s, _) = evaluate, score
                group = f"{name}, batch {batch_size}"
                profiles[group] = min((profile_phases(lambda: score_file(run, table, out, batch_size=batch_size)) for _ in range(2)),
                                      key=lambda phases: phases["total"])  # fmt: skip
                for label, (spent, faults) in (("Trainer.evaluate", evaluate), ("score_file", score)):
                    rows.append({"model": group, "name": label, "rows_per_s": n_rows / spent, "seconds": spent, "minor_page_faults": faults})
                print(f"{group}: Trainer.evaluate {n_rows / evaluate_s:9.0f} rows/s, score_file {n_rows / score_s:9.0f} rows/s "
                      f"({evaluate_s / score_s:.2f}x)", flush=True)  # fmt: skip
                print("  score_file profile (s): " + ", ".join(f"{k} {v:.2f}" for k, v in profiles[group].items()), flush=True)
            view = store.split("test")
            with torch.inference_mode():
                direct = model.predict(model(view.take(np.arange(len(view)))))
            scored, order = pl.read_parquet(out), np.argsort(view.row)
            agree = max(float(np.abs(scored[label].to_numpy() - p.numpy()[order]).max()) for label, p in direct.items())
            print(f"{name}: max |score_file - model on the store's rows| {agree:.1e}", flush=True)
    total_s = time.perf_counter() - start_all
    meta = {
        "environment": environment(),
        "rows": n_rows,
        "data": f"synthetic.generate(n_rows={n_rows}, history_len={HISTORY_LEN}), labels dropped from the scored file",
        "batch_sizes": BATCH_SIZES,
        "repeat": repeat,
        "score_file_profile_s": profiles,
        "total_s": total_s,
    }
    write_results("bulk_score", rows, meta, args=args, reference="Trainer.evaluate", figure="rows_per_s", group="model")
    machine = meta["environment"]
    phases = next(iter(profiles.values()))
    speed = {(row["model"], row["name"]): row["rows_per_s"] for row in rows}
    small, default = min(BATCH_SIZES), max(BATCH_SIZES)
    against_default = ", ".join(
        f"{name} {speed[(f'{name}, batch {small}', 'score_file')] / speed[(f'{name}, batch {default}', 'Trainer.evaluate')]:.2f}x"
        for name in MODELS
    )
    encoding = ", ".join(
        f"{group} {(spent['read file'] + spent['encode (prepare)']) / spent['total']:.0%}" for group, spent in profiles.items()
    )
    header = [
        "# bulk_score",
        "",
        f"`{shlex.join(['python', *sys.argv])}`, {total_s:.0f} s on {machine['cpu']}, {machine['cores']} cores, "
        f"{args.threads} torch threads (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}).",
        f"{meta['data']}; untrained DeepFM and DIN (defaults); each batch size on both sides (65536 is the default",
        f"of both), best of {repeat} interleaved calls. `score_file`: end to end (bundle, Parquet, encoding, predictions,",
        "Parquet out); `Trainer.evaluate`: the same rows already encoded into a store's test split, predictions and",
        "metrics. Ratio = rows/s over Trainer.evaluate's at the same batch size.",
        "",
        f"score_file at batch {small} against Trainer.evaluate at its default {default}: {against_default}.",
        f"Share of a score_file call spent reading and encoding the file (work Trainer.evaluate does not do): {encoding}.",
        "",
        "Profile of one score_file call (cumulative seconds, the faster of two):",
        "",
        "| model | " + " | ".join(phases) + " |",
        "|" + "---|" * (len(phases) + 1),
        *(f"| {group} | " + " | ".join(f"{v:.2f}" for v in spent.values()) + " |" for group, spent in profiles.items()),
        "",
    ]
    table_md = (args.out / "bulk_score.md").read_text()
    (args.out / "bulk_score.md").write_text("\n".join(header) + "\n" + table_md)


if __name__ == "__main__":
    main()
