"""Approximate retrieval (FAISS HNSW, IVF-PQ) against exact search: recall@50, queries/s, build time."""

from __future__ import annotations

import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch
from _common import Row, parse_args, timeit, write_results

from recforge.data.prepare import prepare
from recforge.data.sources import load_source
from recforge.data.splits import SplitConfig
from recforge.models import build_model
from recforge.serve.index import ItemIndex
from recforge.study.runs import environment
from recforge.train.optim import Optimizers

K = 50
WIDTH = 64  # the two-tower's out_dim
CLUSTERS = 1000
SPECTRUM_DECAY = 14.0  # direction j has scale exp(-j / 14): 90% of the variance in 16 of 64 directions
SPREAD = 0.5  # within-cluster scale relative to the spread of the centres
EF_SEARCH = (64, 128, 256)
NPROBE = (16, 32, 64)
REFINE = 4


def clustered(n: int, seed: int) -> np.ndarray:
    """Unit vectors of a Gaussian mixture with a decaying spectrum, randomly rotated (the mixture
    is fixed; ``seed`` draws the points)."""
    rng = np.random.default_rng(0)
    scales = np.exp(-np.arange(WIDTH) / SPECTRUM_DECAY).astype(np.float32)
    rotation = np.linalg.qr(rng.standard_normal((WIDTH, WIDTH)))[0].astype(np.float32)
    centres = rng.standard_normal((CLUSTERS, WIDTH)).astype(np.float32) * scales
    rng = np.random.default_rng(seed)
    points = np.empty((n, WIDTH), dtype=np.float32)
    for start in range(0, n, 1 << 18):
        stop = min(n, start + (1 << 18))
        noise = rng.standard_normal((stop - start, WIDTH), dtype=np.float32) * scales
        chunk = (centres[rng.integers(0, CLUSTERS, stop - start)] + SPREAD * noise) @ rotation
        points[start:stop] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
    return points


def top16_variance(vectors: np.ndarray) -> float:
    """Share of the variance held by the 16 leading principal directions (of at most 50k rows)."""
    sample = vectors[:: max(1, len(vectors) // 50_000)].astype(np.float64)
    values = np.linalg.svd(sample - sample.mean(0), compute_uv=False) ** 2
    return float(values[:16].sum() / values.sum())


def two_tower_vectors(quick: bool, queries: int) -> tuple[np.ndarray, np.ndarray, str, str, float]:
    """Item vectors ([V, 64], pad and OOV rows first) and user vectors of a two-tower trained for
    one epoch, the data's name and source, and the seconds spent."""
    data = os.environ.get("RECFORGE_DATA")
    found = bool(data) and (Path(data) / "amazon-sequential-s3rec").is_dir()
    if found and not quick:
        raw, name, split = load_source("amazon-beauty", history_len=50), "amazon-beauty", SplitConfig(kind="leave_one_out")
        source = "amazon-beauty (S3-Rec release), leave-one-out, queries: the first test rows' users"
    else:
        raw, name, split = load_source("synthetic", n_rows=20_000, n_items=3_000), "synthetic source", SplitConfig()
        source = f"synthetic source, 20k rows ({'--quick' if found else 'amazon-sequential-s3rec not found under $RECFORGE_DATA'})"
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        store = prepare(raw, Path(tmp) / "store", split)
        torch.manual_seed(0)
        model = build_model("two_tower", store.schema, {})
        optimizers = Optimizers(model, model.sparse_parameters())
        for batch in store.split("train").batches(1024, shuffle=True, seed=0):  # one epoch
            loss, _ = model.loss(model(batch), batch)
            optimizers.zero_grad()
            loss.backward()
            optimizers.step()
        model.eval()
        test = store.split("test")
        with torch.inference_mode():
            users = model.user_embedding(test.take(np.arange(min(queries, len(test))))).numpy()
            items = model.item_embeddings().numpy()
    return items, users, f"two-tower {name}", source, time.perf_counter() - start


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / truth.shape[1] for a, b in zip(found.tolist(), truth.tolist())]))


def measure(data: str, items: np.ndarray, users: np.ndarray, repeat: int) -> list[Row]:
    """Exact, HNSW (each ef_search) and IVF-PQ (each nprobe, without and with refinement) on one set."""
    rows: list[Row] = []

    def build(kind: str, **params) -> tuple[ItemIndex, float]:
        start = time.perf_counter()
        index = ItemIndex.build(items, kind, **params)
        return index, time.perf_counter() - start

    def add(name: str, index: ItemIndex, build_s: float, truth: np.ndarray | None) -> np.ndarray:
        found = index.search(users, K)[0]
        seconds = timeit(lambda: index.search(users, K), repeat)
        rows.append({"data": data, "name": name, "recall_at_50": 1.0 if truth is None else recall(found, truth),
                     "queries_per_s": len(users) / seconds, "build_s": build_s, "items": len(items) - 2})  # fmt: skip
        print(f"{data:40s} {name:28s} recall@50 {rows[-1]['recall_at_50']:.4f} {rows[-1]['queries_per_s']:9.0f} q/s  build {build_s:6.1f} s", flush=True)
        return found

    exact, build_s = build("exact")
    truth = add("exact", exact, build_s, None)
    del exact
    hnsw, build_s = build("hnsw")
    for ef in EF_SEARCH:
        hnsw.set_search_params(ef_search=ef)
        add(f"hnsw M=32 ef_search={ef}", hnsw, build_s, truth)
    del hnsw
    for refine in (0, REFINE):
        ivf, build_s = build("ivfpq", refine=refine)
        for nprobe in NPROBE:
            ivf.set_search_params(nprobe=nprobe)
            label = f"ivfpq nprobe={nprobe}" + (f" refine={refine}" if refine else "")
            add(f"{label} (nlist={ivf.params['nlist']}, m={ivf.params['subquantizers']})", ivf, build_s, truth)
        del ivf
    return rows


def main() -> None:
    args = parse_args(__doc__)
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    queries = 100 if args.quick else 1000
    sizes = (5_000,) if args.quick else (100_000, 1_000_000)
    start = time.perf_counter()
    items, users, trained, source, train_s = two_tower_vectors(args.quick, queries)
    rows = measure(trained, items, users, repeat=3)
    spectra = {trained: top16_variance(items[2:])}
    for n in sizes:
        data = f"synthetic clustered {n:,}"
        items = np.concatenate([np.zeros((2, WIDTH), np.float32), clustered(n, seed=1)])  # pad and OOV rows
        spectra[data] = top16_variance(items[2:])
        rows += measure(data, items, clustered(queries, seed=2), repeat=2 if n >= 1_000_000 else 3)
        del items
    total_s = time.perf_counter() - start
    meta = {
        "environment": environment() | {"faiss": faiss.__version__, "faiss_threads": args.threads},
        "queries_per_batch": queries,
        "k": K,
        "two_tower_data": source,
        "two_tower_train_s": train_s,
        "top16_variance_share": spectra,
        "synthetic": f"{CLUSTERS} Gaussian clusters, direction scales exp(-j/{SPECTRUM_DECAY}), spread {SPREAD}, L2-normalised",
        "total_s": total_s,
    }
    write_results("retrieval", rows, meta, args=args, reference="exact", figure="queries_per_s", group="data")
    machine = meta["environment"]
    header = [
        "# retrieval",
        "",
        f"`{shlex.join(['python', *sys.argv])}` (RECFORGE_DATA={os.environ.get('RECFORGE_DATA', 'unset')}), "
        f"{total_s:.0f} s on {machine['cpu']}, {machine['cores']} cores, {args.threads} threads, faiss {faiss.__version__}.",
        f"Batches of {queries} queries, k = {K}; recall@50 against exact search (`IndexFlatIP`) of the same "
        "queries; queries_per_s is the best of the timed batches; ratio = queries/s over exact's on the same data.",
        f"Two-tower: {source}, one epoch ({train_s:.0f} s with data preparation). Synthetic: {meta['synthetic']}.",
        "Share of variance in the 16 leading directions: " + ", ".join(f"{k} {v:.2f}" for k, v in spectra.items()) + ".",
        "",
    ]
    table = (args.out / "retrieval.md").read_text()
    (args.out / "retrieval.md").write_text("\n".join(header) + "\n" + table)


if __name__ == "__main__":
    main()
