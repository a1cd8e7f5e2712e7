"""`recforge serve`: the real server, over HTTP, on a DIN bundle exported from a tiny synthetic run."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import polars as pl
import pytest
import torch

from recforge.config import ExperimentConfig
from recforge.data.prepare import Fitted, timeline_view
from recforge.data.schema import OOV, Schema
from recforge.data.sources import load_source
from recforge.data.store import Store
from recforge.experiment import run, score_file
from recforge.serve.app import score_parts
from recforge.serve.batching import Batcher
from recforge.serve.encode import RowEncoder, RowError
from recforge.serve.export import export_run
from recforge.serve.index import ItemIndex
from recforge.serve.scorer import load_scorer

OPTIONS = {"n_rows": 6000, "n_users": 300, "n_items": 200, "history_len": 10, "seed": 1}
CONFIG = {
    "name": "tiny_din",
    "data": {"source": "synthetic", "options": OPTIONS, "split": {"kind": "random", "seed": 1}},
    "model": {"name": "din"},
    "train": {"epochs": 1, "batch_size": 256, "lr": 0.003, "seed": 1, "quiet": True},
}
MAX_ROWS = 64


@pytest.fixture(scope="module")
def exported(tmp_path_factory, single_thread) -> SimpleNamespace:
    """A trained tiny DIN run, its exported bundle, its store and the raw synthetic rows."""
    root = tmp_path_factory.mktemp("serve")
    config = ExperimentConfig.model_validate(CONFIG)
    run(config, root / "run", store_root=root / "stores")
    export_run(root / "run", root / "bundle")
    raw = load_source("synthetic", **OPTIONS).frame
    return SimpleNamespace(root=root, run=root / "run", bundle=root / "bundle", store=Store.open(config.data.store_path(root / "stores")), raw=raw)


def request_rows(frame: pl.DataFrame, fields: list[str]) -> list[dict]:
    """The rows of ``frame`` as a client sends them: each history the user's earlier items in ``frame``."""
    frame = frame.with_row_index("_row")
    order, start, end = timeline_view(frame, "user_id", "timestamp", np.ones(frame.height, dtype=bool))
    items = frame["item_id"].to_numpy()[order]
    rows = frame.select([f for f in fields if f in frame.columns]).to_dicts()
    for row, s, e in zip(rows, start, end):
        row["hist_item_id"] = items[s:e].tolist()
    return rows


class Server:
    """``recforge serve BUNDLE`` in a subprocess on a free loopback port, ready once /health answers."""

    def __init__(self, bundle: Path, log: Path, *options: str) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        command = [sys.executable, "-m", "recforge.cli", "serve", str(bundle), "--port", str(self.port), *options]
        with log.open("w") as out:
            self.process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.process.poll() is None, log.read_text()
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        raise AssertionError(f"the server did not start: {log.read_text()}")

    def score(self, rows: list[dict], client: httpx.Client | None = None) -> httpx.Response:
        return (client or httpx).post(f"{self.url}/score", json={"rows": rows}, timeout=30)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def server(exported) -> Server:
    started = Server(exported.bundle, exported.root / "server.log", "--backend", "torch", "--max-rows", str(MAX_ROWS))
    yield started
    started.stop()


@pytest.fixture(scope="module")
def scored(exported) -> SimpleNamespace:
    """200 raw rows, the request rows a client builds from them and `score_file`'s predictions."""
    frame = exported.raw.head(200)
    frame.drop("click", "conversion").write_parquet(exported.root / "rows.parquet")
    score_file(exported.run, exported.root / "rows.parquet", exported.root / "predictions.parquet")
    expected = pl.read_parquet(exported.root / "predictions.parquet").sort("row")["click"].to_numpy()
    fields = list(RowEncoder(Fitted.load(exported.bundle)).features)
    return SimpleNamespace(rows=request_rows(frame, fields), click=expected)


def test_row_encoder_matches_the_training_store(exported):
    view = exported.store.split("test")
    picked = np.arange(0, len(view), 11)
    order, _, _ = timeline_view(exported.raw, "user_id", "timestamp", np.ones(exported.raw.height, dtype=bool))
    items = exported.raw["item_id"].to_numpy()[order]  # the store's timeline, as raw ids
    encoder = RowEncoder(Fitted.load(exported.bundle))
    rows = exported.raw[view.row[picked]].select([f for f in encoder.features if f in exported.raw.columns]).to_dicts()
    for row, at in zip(rows, picked):
        row["hist_item_id"] = items[view.hist_start[at] : view.hist_end[at]].tolist()
    assert any(row["hist_item_id"] for row in rows) and any(not row["hist_item_id"] for row in rows)
    batch, oov = encoder.encode(rows)
    expected = view.take(picked)
    assert torch.equal(batch.categorical, expected.categorical)
    assert torch.equal(batch.numeric, expected.numeric)
    assert torch.equal(batch.sequences["hist_item_id"], expected.sequences["hist_item_id"])
    assert torch.equal(batch.domain, expected.domain) and torch.equal(batch.group, expected.group)
    assert oov == {name: int((batch.categorical[:, j] == OOV).sum()) for j, name in enumerate(["user_id", "item_id", "domain", *(f"f{i}" for i in range(8))])} | {
        "hist_item_id": int((batch.sequences["hist_item_id"] == OOV).sum())
    }


def test_ids_follow_the_training_dtype_rules():
    schema = Schema.parse({
        "features": [
            {"name": "zip", "kind": "categorical"},
            {"name": "shop", "kind": "categorical", "dtype": "integer"},
            {"name": "price", "kind": "numeric"},
            {"name": "seen", "kind": "sequence", "timeline": "zip", "max_len": 3},
        ],
        "labels": ["click"], "user": "zip", "time": "t",
    })  # fmt: skip
    vocab = lambda values: pl.DataFrame({"value": values, "count": [1] * len(values), "index": list(range(2, len(values) + 2))})  # noqa: E731
    encoder = RowEncoder(Fitted(schema, {"zip": vocab(["07", "7", "x"]), "shop": vocab(["7", "-3"])}, {"price": {"mean": 1.0, "std": 2.0}}))
    row = {"zip": "07", "shop": 7, "price": 3, "seen": []}
    batch, oov = encoder.encode([row, row | {"zip": 7, "shop": "07"}, row | {"zip": "7", "shop": "-3"}, row | {"zip": "y", "seen": ["x", "07", 7, "q"]}])
    assert batch.categorical.tolist() == [[2, 2], [3, 2], [3, 3], [OOV, 2]]
    assert batch.sequences["seen"].tolist() == [[0, 0, 0], [0, 0, 0], [0, 0, 0], [2, 3, OOV]]
    assert batch.numeric[:, 0].tolist() == [1.0] * 4 and oov == {"zip": 1, "shop": 0, "seen": 1}
    refused = {
        "zip": [3.0, True, None, "NaN", ["7"]],
        "shop": ["7.0", "x", 2**63, 1.5],
        "price": ["3", True, float("nan"), float("inf"), 10**400, None],
        "seen": ["7", None, [7.0]],
    }
    for field, values in refused.items():
        for value in values:
            with pytest.raises(RowError) as err:
                encoder.encode([row, row | {field: value}])
            assert [loc[:2] for loc, _ in err.value.problems] == [(1, field)], (field, value)
    with pytest.raises(RowError, match="field required"):
        encoder.encode([{"zip": "7", "shop": 7, "price": 1.0}])


def test_batched_scores_equal_unbatched(exported, scored):
    """Single-row requests scored concurrently, in batches, give each row's unbatched probability:
    bit for bit whatever rows share its batch, within float32 rounding of the batch size's kernels."""
    encoder = RowEncoder(Fitted.load(exported.bundle))
    for backend in ("torch", "onnx"):
        scorer = load_scorer(exported.bundle, backend)
        alone = [scorer.score(encoder.encode([row])[0])["click"] for row in scored.rows]
        sizes: list[int] = []

        async def concurrently() -> list:
            with ThreadPoolExecutor(1) as executor:
                batcher = Batcher(partial(score_parts, encoder, scorer), lambda rows: rows.n, executor, 32, 5.0, observe=sizes.append)
                results = await asyncio.gather(*(batcher.submit(encoder.parse([row])) for row in scored.rows))
                await batcher.close()
            return results

        batched = [predictions["click"] for predictions, _ in asyncio.run(concurrently())]
        assert max(sizes) == 32 and sum(sizes) == len(scored.rows)
        np.testing.assert_allclose(np.concatenate(batched), np.concatenate(alone), rtol=0, atol=1e-6, err_msg=backend)
        bounds = np.cumsum([0, *sizes])  # batches hold consecutive submissions: score each in reverse order
        reordered = [scorer.score(encoder.encode(scored.rows[a:b][::-1])[0])["click"][::-1] for a, b in zip(bounds, bounds[1:])]
        np.testing.assert_array_equal(np.concatenate(batched), np.concatenate(reordered), err_msg=backend)


def test_served_scores_equal_score_file(server, scored):
    chunks = [scored.rows[i : i + MAX_ROWS] for i in range(0, len(scored.rows), MAX_ROWS)]
    singles = [[row] for row in scored.rows[:40]]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(server.score, chunks + singles))
    assert all(answer.status_code == 200 for answer in answers)
    click = [answer.json()["predictions"]["click"] for answer in answers]
    np.testing.assert_allclose(np.concatenate(click[: len(chunks)]), scored.click, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.concatenate(click[len(chunks) :]), scored.click[:40], rtol=0, atol=1e-6)


def test_bad_input_is_422_naming_the_field(server, scored):
    row = scored.rows[5]
    cases = {
        b"{rows": ["body"],
        b"[1, 2]": ["body"],
        b"": ["body"],
        b'{"rows": [{"n0": 1, "n0": 2}]}': ["body"],
        json.dumps({}).encode(): ["body", "rows"],
        json.dumps({"rows": {"user_id": 1}}).encode(): ["body", "rows"],
        json.dumps({"rows": []}).encode(): ["body", "rows"],
        json.dumps({"rows": [row] * (MAX_ROWS + 1)}).encode(): ["body", "rows"],
        json.dumps({"rows": [row], "k": 3}).encode(): ["body", "k"],
        json.dumps({"rows": [row, 7]}).encode(): ["body", "rows", 1],
        json.dumps({"rows": [{k: v for k, v in row.items() if k != "n2"}]}).encode(): ["body", "rows", 0, "n2"],
        json.dumps({"rows": [row | {"price": 1.0}]}).encode(): ["body", "rows", 0, "price"],
        json.dumps({"rows": [row, row | {"n1": "0.5"}]}).encode(): ["body", "rows", 1, "n1"],
        json.dumps({"rows": [row | {"n1": True}]}).encode(): ["body", "rows", 0, "n1"],
        json.dumps({"rows": [row | {"n3": None}]}).encode(): ["body", "rows", 0, "n3"],
        json.dumps({"rows": [row | {"n0": float("nan")}]}).encode(): ["body", "rows", 0, "n0"],
        json.dumps({"rows": [row | {"n0": float("-inf")}]}).encode(): ["body", "rows", 0, "n0"],
        json.dumps({"rows": [row | {"item_id": 3.0}]}).encode(): ["body", "rows", 0, "item_id"],
        json.dumps({"rows": [row | {"f2": False}]}).encode(): ["body", "rows", 0, "f2"],
        json.dumps({"rows": [row | {"hist_item_id": 3}]}).encode(): ["body", "rows", 0, "hist_item_id"],
        json.dumps({"rows": [row | {"hist_item_id": "3 4"}]}).encode(): ["body", "rows", 0, "hist_item_id"],
        json.dumps({"rows": [row | {"hist_item_id": [1, 2.5]}]}).encode(): ["body", "rows", 0, "hist_item_id", 1],
    }
    for body, loc in cases.items():
        answer = httpx.post(f"{server.url}/score", content=body, headers={"content-type": "application/json"})
        assert answer.status_code == 422, (body[:80], answer.text)
        detail = answer.json()["detail"]
        assert detail[0]["loc"] == loc and detail[0]["msg"], (body[:80], detail)
    assert httpx.post(f"{server.url}/admin/reload", json={"bundle": 3}).status_code == 422
    assert server.score([row]).status_code == 200


def test_unseen_ids_score_as_oov_and_are_counted(server, scored):
    def oov_total(feature: str) -> float:
        lines = httpx.get(f"{server.url}/metrics").text.splitlines()
        return sum(float(line.split()[-1]) for line in lines if line.startswith(f'recforge_oov_values_total{{feature="{feature}"}}'))

    row = scored.rows[7] | {"hist_item_id": [3, 4]}
    before = oov_total("item_id"), oov_total("hist_item_id")
    answer = server.score([row | {"item_id": "no such item", "hist_item_id": [3, "gone", -1]}, row | {"item_id": 10**30}])
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["oov"]["item_id"] == 2 and body["oov"]["hist_item_id"] == 2 and body["oov"]["user_id"] == 0
    assert oov_total("item_id") == before[0] + 2 and oov_total("hist_item_id") == before[1] + 2
    first, second = body["predictions"]["click"]
    alike = server.score([row | {"item_id": "another unseen item", "hist_item_id": [3, "x", "y"]}]).json()["predictions"]["click"][0]
    assert first == alike and second != server.score([row]).json()["predictions"]["click"][0]


def test_metadata_and_metrics(server, exported):
    metadata = httpx.get(f"{server.url}/metadata").json()
    manifest = (exported.bundle / "manifest.json").read_bytes()
    assert metadata["model"] == "din" and metadata["backend"] == "torch"
    assert metadata["sha256"] == __import__("hashlib").sha256(manifest).hexdigest()
    assert metadata["recforge"] and metadata["schema"]["labels"] == ["click", "conversion"]
    assert set(metadata["fields"]) == {"user_id", "item_id", "domain", *(f"f{i}" for i in range(8)), *(f"n{j}" for j in range(4)), "hist_item_id"}
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("recforge_requests_total", "recforge_request_seconds_bucket", "recforge_batch_rows_bucket", "recforge_oov_values"):
        assert name in text, name


def test_reload_under_load_loses_no_request(server, exported, scored):
    copy, broken = exported.root / "bundle-copy", exported.root / "bundle-broken"
    shutil.copytree(exported.bundle, copy, dirs_exist_ok=True)
    shutil.copytree(exported.bundle, broken, dirs_exist_ok=True)
    with (broken / "model.safetensors").open("r+b") as weights:
        weights.seek(100)
        weights.write(b"\x00\x01\x02")
    expected = scored.click[:8].tolist()
    answers: list[tuple[int, list]] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client() as session:
            while not stop.is_set():
                answer = server.score(scored.rows[:8], session)
                answers.append((answer.status_code, answer.json()["predictions"]["click"] if answer.status_code == 200 else answer.text))

    threads = [threading.Thread(target=client) for _ in range(6)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.3)
        moved = httpx.post(f"{server.url}/admin/reload", json={"bundle": str(copy)}, timeout=60)
        assert moved.status_code == 200 and moved.json()["bundle"] == str(copy.resolve())
        refused = httpx.post(f"{server.url}/admin/reload", json={"bundle": str(broken)}, timeout=60)
        assert refused.status_code == 422 and "sha256" in refused.json()["detail"][0]["msg"]
        assert refused.json()["detail"][0]["loc"] == ["body", "bundle"]
        before = httpx.get(f"{server.url}/metadata").json()
        assert before["bundle"] == str(copy.resolve())
        server.process.send_signal(signal.SIGHUP)  # reads the path served now again
        deadline = time.monotonic() + 30
        while httpx.get(f"{server.url}/metadata").json()["loaded_at"] == before["loaded_at"]:
            assert time.monotonic() < deadline, server.log.read_text()
            time.sleep(0.1)
        back = httpx.post(f"{server.url}/admin/reload", json={"bundle": str(exported.bundle)}, timeout=60)
        assert back.status_code == 200
        time.sleep(0.3)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert len(answers) > 20
    assert all(status == 200 for status, _ in answers), [a for a in answers if a[0] != 200][:3]
    for _, click in answers:
        np.testing.assert_allclose(click, expected, rtol=0, atol=1e-6)
    text = httpx.get(f"{server.url}/metrics").text
    assert 'recforge_reloads_total{outcome="ok"} 3.0' in text and 'recforge_reloads_total{outcome="refused"} 1.0' in text


def test_kill_9_then_restart_serves_the_same_predictions(exported, scored):
    first = Server(exported.bundle, exported.root / "killed.log")
    try:
        before = first.score(scored.rows[:MAX_ROWS]).json()
    finally:
        first.stop(signal.SIGKILL)
    assert first.process.returncode == -signal.SIGKILL
    second = Server(exported.bundle, exported.root / "restarted.log")
    try:
        assert httpx.get(f"{second.url}/metadata").json()["backend"] == "onnx"
        assert second.score(scored.rows[:MAX_ROWS]).json() == before
    finally:
        second.stop()


def test_serve_refuses_a_folder_that_is_no_exported_bundle(exported):
    from typer.testing import CliRunner

    from recforge.cli import app

    refused = CliRunner().invoke(app, ["serve", str(exported.run / "model")])
    assert refused.exit_code == 2 and "no exported bundle" in refused.output
    refused = CliRunner().invoke(app, ["serve", str(exported.bundle), "--max-batch", "0"])
    assert refused.exit_code == 2 and "--max-batch must be >= 1" in refused.output


def test_recommend_returns_the_retrievers_best_items(exported, scored, server):
    config = ExperimentConfig.model_validate(CONFIG | {"name": "tiny_two_tower", "model": {"name": "two_tower"}})
    run(config, exported.root / "retriever-run", store_root=exported.root / "stores")
    export_run(exported.root / "retriever-run", exported.root / "retriever")
    encoder = RowEncoder(Fitted.load(exported.root / "retriever"))
    scorer = load_scorer(exported.root / "retriever", "torch")
    users = [{k: v for k, v in row.items() if k != "item_id"} for row in scored.rows[:6]]
    names = encoder.id_names("item_id")
    vectors = scorer.user_vectors(encoder.encode_parsed([encoder.parse(users, frozenset(["item_id"]))])[0])
    best, _ = ItemIndex.build(scorer.item_vectors()).search(vectors, 5)
    retriever = Server(exported.root / "retriever", exported.root / "retriever.log")
    try:
        answer = httpx.post(f"{retriever.url}/recommend", json={"rows": users, "k": 5})
        assert answer.status_code == 200, answer.text
        assert answer.json()["items"] == names[best].tolist()
        exclude = [[names[best[0, 0]], int(names[best[0, 2]]), "no such item"]] + [[]] * 5
        answer = httpx.post(f"{retriever.url}/recommend", json={"rows": users, "k": 5, "exclude": exclude}).json()
        kept = [names[i] for i in best[0] if i not in (best[0, 0], best[0, 2])]
        assert answer["items"][0][:3] == kept and not {names[best[0, 0]], names[best[0, 2]]} & set(answer["items"][0])
        assert answer["items"][1:] == names[best[1:]].tolist() and len(answer["scores"][0]) == 5
        bad = httpx.post(f"{retriever.url}/recommend", json={"rows": users[:1], "k": 5, "exclude": [[1.5]]})
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "exclude", 0, 0]
        assert httpx.post(f"{retriever.url}/score", json={"rows": scored.rows[:1]}).status_code == 409
    finally:
        retriever.stop()
    assert httpx.post(f"{server.url}/recommend", json={"rows": users, "k": 5}).status_code == 409
