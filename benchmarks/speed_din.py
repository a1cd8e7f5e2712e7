"""DIN training throughput (history length 100): the recforge store against in-memory tensors."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from _common import Row, parse_args, write_results

from recforge.data.batch import Batch
from recforge.data.prepare import prepare
from recforge.data.sources import RawDataset, movielens, synthetic
from recforge.data.store import SplitView
from recforge.models import build_model
from recforge.train.optim import Optimizers

HISTORY_LEN = 100
WARMUP_STEPS = 2


def load_data(quick: bool) -> tuple[RawDataset, str]:
    data = os.environ.get("RECFORGE_DATA")
    found = bool(data) and (Path(data) / "movielens-1m").is_dir()
    if found and not quick:
        return movielens.load("1m", history_len=HISTORY_LEN), "movielens-1m"
    n_rows = 5_000 if quick else 1_000_000
    reason = "--quick" if found else "movielens-1m not found under $RECFORGE_DATA"
    return synthetic.generate(n_rows=n_rows, history_len=HISTORY_LEN), f"synthetic, {n_rows} rows ({reason})"


def materialise(split: SplitView, chunk: int = 65_536) -> Batch:
    """The whole split as one in-memory batch, built chunk by chunk."""
    parts = [split.take(np.arange(i, min(i + chunk, len(split)))) for i in range(0, len(split), chunk)]
    return Batch(
        categorical=torch.cat([p.categorical for p in parts]),
        numeric=torch.cat([p.numeric for p in parts]),
        sequences={k: torch.cat([p.sequences[k] for p in parts]) for k in parts[0].sequences},
        labels={k: torch.cat([p.labels[k] for p in parts]) for k in parts[0].labels},
        group=torch.cat([p.group for p in parts]) if parts[0].group is not None else None,
    )


def sliced_batches(full: Batch, batch_size: int, seed: int) -> Iterator[Batch]:
    """Endless shuffled batches sliced from in-memory tensors."""
    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(full), generator=g)
        for k in range(len(full) // batch_size):
            rows = order[k * batch_size : (k + 1) * batch_size]
            yield Batch(
                categorical=full.categorical[rows],
                numeric=full.numeric[rows],
                sequences={name: v[rows] for name, v in full.sequences.items()},
                labels={name: v[rows] for name, v in full.labels.items()},
                group=full.group[rows] if full.group is not None else None,
            )


def store_batches(split: SplitView, batch_size: int, seed: int) -> Iterator[Batch]:
    """Endless shuffled batches read from the store, epoch after epoch."""
    epoch = 0
    while True:
        yield from split.batches(batch_size, shuffle=True, seed=seed, epoch=epoch, drop_last=True)
        epoch += 1


def train_throughput(split: SplitView, batches: Iterator[Batch], steps: int, device: torch.device) -> float:
    """Training samples per second over ``steps`` steps, after a short warm-up."""
    torch.manual_seed(0)
    model = build_model("din", split.schema).to(device)
    optimizers = Optimizers(model, model.sparse_parameters())
    samples, start = 0, 0.0
    for step in range(WARMUP_STEPS + steps):
        if step == WARMUP_STEPS:
            samples, start = 0, time.perf_counter()
        batch = next(batches).to(device)
        loss, _ = model.loss(model(batch), batch)
        optimizers.zero_grad()
        loss.backward()
        optimizers.step()
        samples += len(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return samples / (time.perf_counter() - start)


def main() -> None:
    args = parse_args(__doc__)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    steps, batch_size = (5, 256) if args.quick else (100, 4096)
    raw, source = load_data(args.quick)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        store = prepare(raw, Path(tmp) / "store")
        prepare_s = time.perf_counter() - start
        train = store.split("train")

        recforge_sps = train_throughput(train, store_batches(train, batch_size, seed=0), steps, device)
        start = time.perf_counter()
        full = materialise(train)
        materialise_s = time.perf_counter() - start
        plain_sps = train_throughput(train, sliced_batches(full, batch_size, seed=0), steps, device)

        history_bytes = full.sequences["hist_item_id"].nbytes
        store_bytes = sum(v.nbytes for v in store.timeline.values()) + train.hist_start.nbytes + train.hist_end.nbytes
    rows: list[Row] = [
        {"name": "recforge", "train_samples_per_s": recforge_sps, "history_bytes": store_bytes},
        {"name": "plain PyTorch", "train_samples_per_s": plain_sps, "history_bytes": history_bytes},
    ]
    meta = {
        "data": source,
        "train_rows": len(train),
        "history_len": HISTORY_LEN,
        "steps": steps,
        "warmup_steps": WARMUP_STEPS,
        "batch_size": batch_size,
        "prepare_s": prepare_s,
        "materialise_s": materialise_s,
        "history_bytes": "recforge: int32 timeline (all splits) + int64 (start, end) of the train rows; "
        "plain PyTorch: the [N, 100] int64 history tensor of the train rows",
    }
    write_results("speed_din", rows, meta, args=args, reference="plain PyTorch", figure="train_samples_per_s")
    ratio = recforge_sps / plain_sps
    print(f"data: {source}, {len(train)} train rows")
    print(f"recforge      {recforge_sps:10.0f} samples/s, history storage {store_bytes / 2**20:8.1f} MiB")
    print(f"plain PyTorch {plain_sps:10.0f} samples/s, history tensor  {history_bytes / 2**20:8.1f} MiB")
    print(f"target recforge >= 0.8x plain: {ratio:.2f}x {'ok' if ratio >= 0.8 else 'MISSED'}")


if __name__ == "__main__":
    main()
