"""DeepFM training from a memory-mapped store larger than the memory budget vs a small in-RAM store.

The big store (default 30M rows x 26 int32 categorical columns, ~3.7 GB on disk) is written
chunk by chunk with ``np.lib.format.open_memmap`` in the layout of ``recforge.data.store``;
every configuration trains in a fresh subprocess so that its peak RSS is its own.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

N_CAT = 26
N_NUMERIC = 2
WARMUP_STEPS = 3


# --- a minimal valid store, written by hand ---------------------------------------------------
def store_schema(vocab_sizes: list[int], n_numeric: int = N_NUMERIC, names: list[str] | None = None):
    """Schema of ``N`` categorical columns (``vocab_sizes`` rows each, ids included) and numerics."""
    from recforge.data.schema import Feature, Kind, Schema

    names = names or [f"c{i}" for i in range(len(vocab_sizes))]
    features = [Feature(name=n, kind=Kind.CATEGORICAL) for n in names]
    features += [Feature(name=f"n{j}", kind=Kind.NUMERIC) for j in range(n_numeric)]
    return Schema(features=features, labels=["click"], vocab_sizes=dict(zip(names, map(int, vocab_sizes))))


def write_store(path: Path, schema, n_rows: int, fill, chunk: int = 1 << 20) -> None:
    """Write ``schema.json`` and ``splits/{train,valid,test}``; ``fill(start, stop)`` returns the
    train rows' ``(categorical int32 [n, F], numeric float32 [n, P], labels float32 [n, 1])``.
    valid and test are empty."""
    n_cat, n_num = len(schema.categorical), len(schema.numeric)
    for split in ("train", "valid", "test"):
        n = n_rows if split == "train" else 0
        root = path / "splits" / split
        root.mkdir(parents=True, exist_ok=True)
        cat = np.lib.format.open_memmap(root / "categorical.npy", "w+", np.int32, (n, n_cat))
        num = np.lib.format.open_memmap(root / "numeric.npy", "w+", np.float32, (n, n_num))
        lab = np.lib.format.open_memmap(root / "labels.npy", "w+", np.float32, (n, len(schema.labels)))
        row = np.lib.format.open_memmap(root / "row.npy", "w+", np.int64, (n,))
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            cat[start:stop], num[start:stop], lab[start:stop] = fill(start, stop)
            row[start:stop] = np.arange(start, stop)
        for array in (cat, num, lab, row):
            array.flush()
        del cat, num, lab, row
    schema.save(path / "schema.json")


def random_fill(vocab_sizes: list[int], seed: int):
    """Uniform ids in [2, V) per column, standard-normal numerics, 10% positive labels."""
    high = np.asarray(vocab_sizes, dtype=np.int64)

    def fill(start: int, stop: int):
        rng = np.random.default_rng([seed, start])
        n = stop - start
        cat = (2 + rng.integers(0, high - 2, size=(n, len(high)))).astype(np.int32)
        num = rng.standard_normal((n, N_NUMERIC), dtype=np.float32)
        lab = (rng.random((n, 1)) < 0.1).astype(np.float32)
        return cat, num, lab

    return fill


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# --- memory readings ----------------------------------------------------------------------------
def status_kib(*keys: str) -> dict[str, int]:
    """Fields of /proc/self/status in KiB (VmRSS, RssAnon, RssFile, ...); empty off Linux."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in keys:
                out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


def peak_rss_bytes() -> int:
    """This process's peak resident set (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# --- the child: one configuration ---------------------------------------------------------------
def child(store_path: str, in_ram: bool, steps: int, batch_size: int, threads: int) -> dict:
    import torch

    from recforge.data.store import Store
    from recforge.models import build_model
    from recforge.train.optim import Optimizers

    torch.set_num_threads(threads)
    baseline = status_kib("VmRSS")["VmRSS"] * 1024
    split = Store.open(store_path).split("train")
    if in_ram:  # the whole split read into anonymous memory; same batching code
        split.categorical, split.numeric = np.array(split.categorical), np.array(split.numeric)
        split.labels, split.row = np.array(split.labels), np.array(split.row)

    def batches() -> Iterator:
        epoch = 0
        while True:
            yield from split.batches(batch_size, shuffle=True, seed=0, epoch=epoch, drop_last=True)
            epoch += 1

    torch.manual_seed(0)
    model = build_model("deepfm", split.schema)
    optimizers = Optimizers(model, model.sparse_parameters())
    stream = batches()
    peak_anon = peak_file = 0
    samples, start = 0, 0.0
    for step in range(WARMUP_STEPS + steps):
        if step == WARMUP_STEPS:
            samples, start = 0, time.perf_counter()
        batch = next(stream)
        loss, _ = model.loss(model(batch), batch)
        optimizers.zero_grad()
        loss.backward()
        optimizers.step()
        samples += len(batch)
        mem = status_kib("RssAnon", "RssFile")
        peak_anon = max(peak_anon, mem.get("RssAnon", 0) * 1024)
        peak_file = max(peak_file, mem.get("RssFile", 0) * 1024)
    sps = samples / (time.perf_counter() - start)
    return {"samples_per_s": sps, "peak_rss": peak_rss_bytes(), "peak_anon": peak_anon, "peak_file": peak_file,
            "baseline_rss": baseline, "rows": len(split)}


def run_child(script: str, argv: list[str], threads: int) -> dict:
    env = os.environ | {"OMP_NUM_THREADS": str(threads)}
    done = subprocess.run([sys.executable, script, "--child", *argv], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"child {argv} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        path, in_ram, steps, batch, threads = sys.argv[2:7]
        print(json.dumps(child(path, in_ram == "1", int(steps), int(batch), int(threads))))
        return

    from _common import Row, parse_args, write_results

    args = parse_args(__doc__)
    if args.device != "cpu":
        raise SystemExit("scale_rows measures CPU memory; run it with --device cpu")
    big_rows, small_rows, steps, batch_size, repeats = (
        (60_000, 20_000, 5, 256, 1) if args.quick else (30_000_000, 1_000_000, 200, 4096, 2)
    )
    vocab_sizes = [10 ** (1 + i % 5) + 2 for i in range(N_CAT)]  # 12 .. 100002 rows per column
    schema = store_schema(vocab_sizes)
    script = str(Path(__file__).resolve())
    with tempfile.TemporaryDirectory(dir=os.environ.get("RECFORGE_BENCH_TMP")) as tmp:
        stores = {}
        write_s = {}
        for name, n in (("memory-mapped", big_rows), ("in-RAM", small_rows)):
            start = time.perf_counter()
            write_store(Path(tmp) / name, schema, n, random_fill(vocab_sizes, seed=1))
            write_s[name] = time.perf_counter() - start
            stores[name] = Path(tmp) / name
        sizes = {name: dir_bytes(p) for name, p in stores.items()}
        def report(rounds: int) -> None:
            rows: list[Row] = [
                {
                    "name": name,
                    "train_samples_per_s": r["samples_per_s"],
                    "rows": r["rows"],
                    "store_bytes": sizes[name],
                    "peak_rss_bytes": r["peak_rss"],
                    "peak_rss_anon_bytes": r["peak_anon"],
                    "peak_rss_file_bytes": r["peak_file"],
                    "baseline_rss_bytes": r["baseline_rss"],
                }
                for name, r in best.items()
            ]
            meta = {
                "columns": f"{N_CAT} int32 categorical (vocabularies 10..1e5 cycling), {N_NUMERIC} float32 numeric, 1 label",
                "store": "written by hand chunk by chunk (open_memmap) in recforge's store layout; uniform random ids",
                "write_s": write_s,
                "model": "deepfm (defaults: embedding 16, hidden [256, 128]), recforge Optimizers",
                "steps": steps, "warmup_steps": WARMUP_STEPS, "batch_size": batch_size, "repeats": f"{rounds} of {repeats} (results are written after every round)",
                "batches": "SplitView.batches(shuffle=True, drop_last=True): a full permutation of the rows per epoch, "
                "each batch one sorted fancy-index of the memory map",
                "in-RAM": "the small store's arrays copied into anonymous memory (np.array) before training",
                "peak_rss_bytes": "ru_maxrss of the child (includes page-cache pages of the memory map that the process "
                "touched: RssFile); peak_rss_anon_bytes / _file_bytes: max of RssAnon / RssFile sampled after every step",
                "page_cache": "the big store was just written, so its pages are mostly in the page cache: this measures the "
                "memory-mapped read path, not a cold disk",
                "baseline_rss_bytes": "RSS of the child after importing torch and recforge, before opening the store",
            }
            write_results("scale_rows", rows, meta, args=args, reference="in-RAM", figure="train_samples_per_s")

        best: dict[str, dict] = {}
        for round_ in range(repeats):  # A, B, A, B: keep each one's best
            for name, path in stores.items():
                argv = [str(path), "1" if name == "in-RAM" else "0", str(steps), str(batch_size), str(args.threads)]
                result = run_child(script, argv, args.threads)
                print(f"{name:14s} {result['samples_per_s']:9.0f} samples/s  peak RSS {result['peak_rss'] / 2**20:7.0f} MiB"
                      f"  (anon {result['peak_anon'] / 2**20:.0f}, file {result['peak_file'] / 2**20:.0f})", flush=True)
                if name not in best or result["samples_per_s"] > best[name]["samples_per_s"]:
                    best[name] = result
            report(round_ + 1)
    mm, ram = best["memory-mapped"], best["in-RAM"]
    ratio = mm["samples_per_s"] / ram["samples_per_s"]
    print(f"big store {sizes['memory-mapped'] / 2**30:.2f} GiB; mmap peak RSS {mm['peak_rss'] / 2**30:.2f} GiB "
          f"(anon {mm['peak_anon'] / 2**30:.2f} GiB)")
    print(f"target throughput >= 0.8x in-RAM: {ratio:.2f}x {'ok' if ratio >= 0.8 else 'MISSED'}")


if __name__ == "__main__":
    main()
