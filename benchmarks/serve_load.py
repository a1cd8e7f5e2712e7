"""Serving under load: concurrent clients against `recforge serve` on loopback.

DeepFM and DIN (history 50) are trained for one epoch on the synthetic log and exported
(`export_run`, ONNX when it matches torch). Each (model, backend) is served twice, one server
at a time: with dynamic batching (`--max-batch 256 --max-wait-ms 2`) and with one forward pass
per request (`--max-batch 1`). ``--clients`` closed-loop clients (one keep-alive connection
each, a minimal HTTP/1.1 client on asyncio so that the load generator costs little CPU) send
``--rows`` rows per `POST /score` for ``--duration`` seconds after ``--warmup`` seconds;
throughput, latency percentiles and errors (non-200 answers, broken connections) count the
measured window only. ``rows/forward`` is the server's own mean batch size (from /metrics).

Server and load generator share the machine's cores: the figures are those of this machine,
not of a server with cores of its own. Writes ``<out>/serve_load.json`` and ``<out>/serve_load.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from recforge.config import ExperimentConfig
from recforge.data.prepare import timeline_view
from recforge.data.sources import load_source
from recforge.experiment import run
from recforge.serve.export import export_run

MODELS = {"deepfm": 0, "din": 50}  # model -> history length
MODES = {"batched": ["--max-batch", "256", "--max-wait-ms", "2"], "per-request": ["--max-batch", "1"]}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=200, help="concurrent clients (default 200)")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per server (default 10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load before measuring (default 2)")
    parser.add_argument("--rows", type=int, default=1, help="rows per request (default 1)")
    parser.add_argument("--threads", type=int, default=1, help="the server's torch / ONNX Runtime threads (OMP_NUM_THREADS, default 1)")
    parser.add_argument("--backends", default="onnx,torch", help="comma-separated backends (default onnx,torch)")
    parser.add_argument("--train-rows", type=int, default=100_000, help="rows of the synthetic log (default 100000)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="results folder")
    args = parser.parse_args()
    if args.quick:
        args.clients, args.duration, args.warmup, args.train_rows = min(args.clients, 20), 1.0, 0.5, 5_000
    return args


def options(history_len: int, n_rows: int) -> dict:
    return {"n_rows": n_rows, "n_users": max(n_rows // 30, 10), "n_items": max(n_rows // 60, 10), "history_len": history_len, "seed": 0}


def export_model(model: str, history_len: int, n_rows: int, root: Path) -> Path:
    """Train ``model`` for one epoch on the synthetic log and export it; the bundle's folder."""
    config = ExperimentConfig.model_validate({
        "name": f"serve_{model}",
        "data": {"source": "synthetic", "options": options(history_len, n_rows), "split": {"kind": "random", "seed": 0}},
        "model": {"name": model},
        "train": {"epochs": 1, "batch_size": 2048, "lr": 0.002, "seed": 0, "quiet": True},
    })  # fmt: skip
    run(config, root / f"{model}-run", store_root=root / "stores")
    export_run(root / f"{model}-run", root / model)
    return root / model


def request_bodies(history_len: int, n_rows: int, rows_per_request: int, count: int = 512) -> list[bytes]:
    """``count`` bodies of ``rows_per_request`` rows drawn from the log; histories: the user's earlier items."""
    frame = load_source("synthetic", **options(history_len, n_rows)).frame
    fields = ["user_id", "item_id", "domain", *(f"f{i}" for i in range(8)), *(f"n{j}" for j in range(4))]
    picked = np.random.default_rng(0).choice(frame.height, size=count * rows_per_request)
    rows = frame[picked].select(fields).to_dicts()
    if history_len:
        order, start, end = timeline_view(frame, "user_id", "timestamp", np.ones(frame.height, dtype=bool))
        items = frame["item_id"].to_numpy()[order]
        for row, at in zip(rows, picked):
            row["hist_item_id"] = items[max(start[at], end[at] - history_len) : end[at]].tolist()
    return [json.dumps({"rows": rows[k : k + rows_per_request]}).encode() for k in range(0, len(rows), rows_per_request)]


class Server:
    """`recforge serve` in a subprocess on a free loopback port."""

    def __init__(self, bundle: Path, arguments: list[str], threads: int, log: Path) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
        self.command = [sys.executable, "-m", "recforge.cli", "serve", str(bundle), "--port", str(self.port), *arguments]
        with log.open("w") as out:
            self.process = subprocess.Popen(self.command, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while asyncio.run(get(self.port, "/health"))[0] != 200:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start: {log.read_text()}")
            time.sleep(0.2)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> tuple[int, bytes]:
    """Send one HTTP/1.1 request on a keep-alive connection -> (status, body)."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:"))
    return int(head[9:12]), await reader.readexactly(length)


async def get(port: int, path: str) -> tuple[int, bytes]:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return 0, b""
    try:
        return await exchange(reader, writer, f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    finally:
        writer.close()


async def load(port: int, bodies: list[bytes], clients: int, warmup: float, duration: float) -> dict:
    """Closed-loop clients for ``warmup + duration`` seconds -> latencies and errors of the last ``duration``."""
    requests = [b"POST /score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body) for body in bodies]
    begin = time.perf_counter()
    measure_from, stop_at = begin + warmup, begin + warmup + duration
    latencies: list[float] = []
    errors = 0

    async def client(k: int) -> None:
        nonlocal errors
        connection = None
        while time.perf_counter() < stop_at:
            try:
                connection = connection or await asyncio.open_connection("127.0.0.1", port)
                start = time.perf_counter()
                status, _ = await exchange(*connection, requests[k % len(requests)])
                ok = status == 200
            except (OSError, asyncio.IncompleteReadError):
                start, ok, connection = time.perf_counter(), False, None
                await asyncio.sleep(0.01)  # reconnect, without spinning on a server that is gone
            if start >= measure_from and time.perf_counter() <= stop_at:
                if ok:
                    latencies.append(time.perf_counter() - start)
                else:
                    errors += 1
            k += clients
        if connection is not None:
            connection[1].close()

    await asyncio.gather(*(client(k) for k in range(clients)))
    return {"latencies": np.array(latencies), "errors": errors}


def mean_batch_rows(port: int) -> float:
    """The server's mean rows per forward pass, from its /metrics."""
    text = asyncio.run(get(port, "/metrics"))[1].decode()
    value = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line.startswith("recforge_batch_rows_")}
    return value["recforge_batch_rows_sum"] / max(value["recforge_batch_rows_count"], 1.0)


def measure(bundle: Path, backend: str, mode: str, bodies: list[bytes], args: argparse.Namespace, log: Path) -> dict:
    server = Server(bundle, ["--backend", backend, *MODES[mode]], args.threads, log)
    try:
        found = asyncio.run(load(server.port, bodies, args.clients, args.warmup, args.duration))
        rows_per_forward = mean_batch_rows(server.port)
    finally:
        server.stop()
    latencies = found["latencies"] * 1000
    p50, p95, p99 = np.percentile(latencies, [50, 95, 99]) if len(latencies) else (float("nan"),) * 3
    return {
        "requests_per_s": len(latencies) / args.duration,
        "rows_per_s": len(latencies) * args.rows / args.duration,
        "p50_ms": float(p50), "p95_ms": float(p95), "p99_ms": float(p99),
        "errors": found["errors"], "rows_per_forward": rows_per_forward,
    }  # fmt: skip


def markdown(rows: list[dict], ratios: list[dict], skipped: list[str], args: argparse.Namespace) -> str:
    command = "python benchmarks/serve_load.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    lines = [
        "# serve_load",
        "",
        f"Command: `{command.strip()}`",
        "",
        f"{args.clients} closed-loop clients, {args.rows} row(s) per request, {args.duration:g} s measured after "
        f"{args.warmup:g} s of warm-up, loopback; the server and the load generator share {os.cpu_count()} CPU cores; "
        f"server threads (OMP_NUM_THREADS) {args.threads}; synthetic log of {args.train_rows} rows.",
        "",
        "| model | backend | mode | requests/s | rows/s | p50 ms | p95 ms | p99 ms | errors | rows/forward |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['backend']} | {r['mode']} | {r['requests_per_s']:.0f} | {r['rows_per_s']:.0f} | {r['p50_ms']:.1f} | "
            f"{r['p95_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']} | {r['rows_per_forward']:.1f} |"
        )
    lines += ["", "Dynamic batching against one forward pass per request, same model and backend:", "",
              "| model | backend | throughput batched / per-request | p99 batched / per-request |", "|---|---|---:|---:|"]  # fmt: skip
    lines += [f"| {r['model']} | {r['backend']} | {r['throughput_ratio']:.2f}x | {r['p99_ratio']:.2f}x |" for r in ratios]
    lines += ["", *(f"Not measured: {reason}." for reason in skipped)] if skipped else []
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    backends = args.backends.split(",")
    rows, ratios, skipped = [], [], []
    with tempfile.TemporaryDirectory(prefix="recforge-serve-load-") as scratch:
        root = Path(scratch)
        for model, history_len in MODELS.items():
            bundle = export_model(model, history_len, args.train_rows, root)
            bodies = request_bodies(history_len, args.train_rows, args.rows)
            onnx = json.loads((bundle / "manifest.json").read_text())["onnx"]
            for backend in backends:
                if backend == "onnx" and not onnx["exported"]:
                    skipped.append(f"{model} on onnx: the bundle holds no ONNX graph ({' '.join(onnx['reason'].split())})")
                    print(skipped[-1], flush=True)
                    continue
                found = {}
                for mode in MODES:
                    found[mode] = measure(bundle, backend, mode, bodies, args, root / f"{model}-{backend}-{mode}.log")
                    rows.append({"model": model, "backend": backend, "mode": mode, **found[mode]})
                    print(json.dumps(rows[-1]), flush=True)
                ratios.append({
                    "model": model, "backend": backend,
                    "throughput_ratio": found["batched"]["requests_per_s"] / found["per-request"]["requests_per_s"],
                    "p99_ratio": found["batched"]["p99_ms"] / found["per-request"]["p99_ms"],
                })  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()} | {"cpu_count": os.cpu_count()}
    (args.out / "serve_load.json").write_text(json.dumps({"rows": rows, "ratios": ratios, "skipped": skipped, "meta": meta}, indent=2) + "\n")
    (args.out / "serve_load.md").write_text(markdown(rows, ratios, skipped, args))
    print(markdown(rows, ratios, skipped, args))


if __name__ == "__main__":
    main()
