"""Training throughput over lifelong histories (L = 1000) on the lifelong simulator: SEMINAR
(PSU pretraining and GSU/ESU fine-tuning) and TWIN against DIN's exact target attention over the
whole history: samples/s and the peak resident memory of a process that trains only that model."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import Row, parse_args, write_results

from recforge.data.prepare import prepare
from recforge.data.sources import lifelong_simulator
from recforge.data.splits import SplitConfig
from recforge.data.store import Store
from recforge.models import build_model
from recforge.train.optim import Optimizers

HISTORY_LEN = 1000
WARMUP_STEPS = 2
SEARCH = {"embedding_dim": 16, "top_k": 50, "heads": 4}
MODELS = {  # name in the table -> (model, params)
    "DIN": ("din", {"embedding_dim": 16}),
    "TWIN": ("twin", SEARCH),
    "SEMINAR fine-tuning": ("seminar", {**SEARCH, "text": None}),
    "SEMINAR PSU pretraining": ("seminar", {**SEARCH, "text": None, "pretrain": True}),
}


def child(store_path: str, label: str, steps: int, batch_size: int, threads: int) -> None:
    """Train ``label``'s model for ``steps`` steps; print its samples/s and peak RSS as JSON."""
    torch.set_num_threads(threads)
    store = Store.open(store_path)
    name, params = MODELS[label]
    torch.manual_seed(0)
    model = build_model(name, store.schema, params, store=store).train()
    optimizers = Optimizers(model, model.sparse_parameters())
    batches = store.split("train").batches(batch_size, shuffle=True, seed=0, epoch=0, drop_last=True)
    samples, start = 0, 0.0
    for step, batch in zip(range(WARMUP_STEPS + steps), batches):
        if step == WARMUP_STEPS:
            samples, start = 0, time.perf_counter()
        loss, _ = model.loss(model(batch), batch)
        optimizers.zero_grad()
        loss.backward()
        optimizers.step()
        samples += len(batch)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB (Linux)
    print(json.dumps({"train_samples_per_s": samples / seconds, "peak_rss_mib": peak}))


def main() -> None:
    args = parse_args(__doc__)
    steps, batch_size = (3, 64) if args.quick else (30, 256)
    options = {"n_users": 40, "min_events": 64, "max_events": 2048, "n_items": 5000, "n_clusters": 50} if args.quick else {
        "n_users": 300, "min_events": 64, "max_events": 4096, "n_items": 20_000, "n_clusters": 200}  # fmt: skip
    raw = lifelong_simulator.generate(history_len=HISTORY_LEN, seed=0, **options)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        store = prepare(raw, Path(tmp) / "store", SplitConfig(kind="random", ratios=(0.8, 0.1, 0.1), seed=42))
        for label in MODELS:
            command = [sys.executable, __file__, "--child", str(store.path), label, str(steps), str(batch_size), str(args.threads)]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            rows.append({"name": label, **json.loads(done.stdout.strip().splitlines()[-1])})
            print(f"{label:24s} {rows[-1]['train_samples_per_s']:8.0f} samples/s, peak RSS {rows[-1]['peak_rss_mib']:7.0f} MiB")
        train_rows = len(store.split("train"))
    meta = {"data": f"lifelong simulator, {train_rows} train rows", "history_len": HISTORY_LEN, "batch_size": batch_size,
            "steps": steps, "warmup_steps": WARMUP_STEPS, "models": {k: {"model": m, **p} for k, (m, p) in MODELS.items()}}  # fmt: skip
    write_results("lifelong_train", rows, meta, args=args, reference="DIN", figure="train_samples_per_s")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
    else:
        main()
