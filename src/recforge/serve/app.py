"""The HTTP service of an exported model bundle: FastAPI, run by ``recforge serve`` on uvicorn.

- ``POST /score`` ``{"rows": [row, ...]}`` -> ``{"predictions": {label: [p, ...]}, "oov": {feature: n}}``:
  a ranker's probabilities, each row as :mod:`recforge.serve.encode` reads it; ``oov`` counts, per
  feature, the ids of the request that the model's vocabularies do not hold (scored as OOV).
- ``POST /recommend`` ``{"rows": [...], "k": k, "exclude": [[item id, ...], ...]}`` ->
  ``{"items": [[id, ...], ...], "scores": [[s, ...], ...], "oov": {...}}``: a retriever's ``k``
  best items per row (rows without the item feature; ``exclude``, optional, one list per row),
  from an exact inner-product index over its item vectors (:mod:`recforge.serve.index`). A row
  gets fewer than ``k`` items only where its exclusions leave fewer. A model that cannot do what
  an endpoint asks is answered 409.
- ``GET /health``; ``GET /metadata``: the model, its schema and fields, the bundle's digest, the
  backend and the recforge version; ``GET /metrics``: Prometheus text.
- ``POST /admin/reload`` ``{"bundle": path}`` (or ``{}`` for the path served now), and SIGHUP,
  which reloads the path served now: the new bundle is checked and loaded beside the old one,
  then replaces it in one step. Requests already begun finish on the old bundle; a bundle that
  fails its check is refused (422) and the old one keeps serving.

Concurrent requests are scored together (:mod:`recforge.serve.batching`). Bad input is answered
422 with ``{"detail": [{"loc": [...], "msg": ...}]}``, ``loc`` starting at ``body``; nothing is
coerced.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.metadata
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

from recforge.data.prepare import Fitted
from recforge.errors import ConfigError, RecforgeError
from recforge.serve.batching import Batcher
from recforge.models.capabilities import Ranker, Retriever
from recforge.serve.encode import Location, RowEncoder, RowError, Rows, json_type
from recforge.serve.export import check_bundle
from recforge.serve.index import ItemIndex
from recforge.serve.scorer import MANIFEST, OnnxScorer, Scorer, TorchScorer, load_scorer

PATHS = ("/score", "/recommend", "/health", "/metadata", "/metrics", "/admin/reload")
Predictions = tuple[dict[str, np.ndarray], dict[str, int]]  # probabilities per label, OOV counts
Recommendations = tuple[np.ndarray, np.ndarray, dict[str, int]]  # item codes [n, k], scores [n, k], OOV counts


@dataclass
class Query:
    """A request for items: the users' rows, how many items each, the item codes each excludes."""

    rows: Rows
    k: int
    exclude: list[np.ndarray]


@dataclass
class Retrieval:
    """What a retriever's bundle serves besides: an exact index over its item vectors."""

    index: ItemIndex
    item_feature: str
    item_names: np.ndarray  # the raw id of every item code
    batcher: Batcher[Query, Recommendations]


@dataclass
class Served:
    """One loaded bundle: its scorer, its encoder and the batchers of its requests."""

    path: Path
    manifest: dict
    scorer: Scorer
    encoder: RowEncoder
    batcher: Batcher[Rows, Predictions] | None  # None: the model ranks no rows
    retrieval: Retrieval | None  # None: the model retrieves no items
    digest: str  # sha256 of the manifest, which holds the sha256 of every other file
    loaded_at: float

    async def close(self) -> None:
        """Finish the requests this bundle holds."""
        for batcher in (self.batcher, self.retrieval.batcher if self.retrieval else None):
            if batcher is not None:
                await batcher.close()


def score_parts(encoder: RowEncoder, scorer: Scorer, parts: list[Rows]) -> list[Predictions]:
    """Score the rows of every part as one batch -> each part's probabilities and OOV counts."""
    batch, oov = encoder.encode_parsed(parts)
    scores = scorer.score(batch)
    bounds = np.cumsum([part.n for part in parts])[:-1]
    split = {label: np.split(probabilities, bounds) for label, probabilities in scores.items()}
    return [({label: split[label][k] for label in split}, oov[k]) for k in range(len(parts))]


def recommend_parts(encoder: RowEncoder, scorer: Scorer, index: ItemIndex, parts: list[Query]) -> list[Recommendations]:
    """The best items for the users of every query, searched as one batch."""
    batch, oov = encoder.encode_parsed([query.rows for query in parts])
    exclude = [codes for query in parts for codes in query.exclude]
    items, scores = index.search(scorer.user_vectors(batch), max(query.k for query in parts), exclude)
    bounds = np.cumsum([query.rows.n for query in parts])[:-1]
    found = zip(parts, np.split(items, bounds), np.split(scores, bounds), oov)
    return [(codes[:, : query.k], best[:, : query.k], counts) for query, codes, best, counts in found]


class Metrics:
    """The service's Prometheus metrics, in a registry of their own."""

    def __init__(self, max_batch: int) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("recforge_requests", "HTTP requests answered", ["path", "status"], registry=self.registry)
        self.latency = Histogram(
            "recforge_request_seconds", "Time to answer an HTTP request", ["path"], registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
        )  # fmt: skip
        self.oov = Counter("recforge_oov_values", "Ids absent from the model's vocabularies, scored as OOV", ["feature"], registry=self.registry)
        sizes = sorted({2**k for k in range(max_batch.bit_length())} | {max_batch})
        self.batch_rows = Histogram("recforge_batch_rows", "Rows per forward pass", registry=self.registry, buckets=sizes)
        self.reloads = Counter("recforge_reloads", "Bundle reloads", ["outcome"], registry=self.registry)

    def exposition(self) -> bytes:
        """The text format; with ``PROMETHEUS_MULTIPROC_DIR`` set, the sum over every worker process."""
        if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)


class Service:
    """The bundle served now and its replacement by a reload."""

    def __init__(self, bundle: Path, backend: str, max_batch: int, max_wait_ms: float, metrics: Metrics) -> None:
        self.backend, self.max_batch, self.max_wait_ms, self.metrics = backend, max_batch, max_wait_ms, metrics
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="recforge-model")  # one forward at a time
        self._reloading = asyncio.Lock()
        self.current = self.load(bundle)

    def load(self, bundle: Path) -> Served:
        """Check and load ``bundle`` (raises the :class:`RecforgeError` of a bundle that fails)."""
        bundle = Path(bundle).resolve()
        manifest = check_bundle(bundle)
        digest = hashlib.sha256((bundle / MANIFEST).read_bytes()).hexdigest()
        scorer, encoder = load_scorer(bundle, self.backend), RowEncoder(Fitted.load(bundle))
        model = scorer.model if isinstance(scorer, TorchScorer) else None
        batcher = retrieval = None
        if isinstance(scorer, OnnxScorer) or isinstance(model, Ranker):
            batcher = self._batcher(partial(score_parts, encoder, scorer), lambda rows: rows.n)
        if isinstance(model, Retriever):
            index = ItemIndex.build(scorer.item_vectors())
            retrieval = Retrieval(
                index, model.item_feature, encoder.id_names(model.item_feature),
                self._batcher(partial(recommend_parts, encoder, scorer, index), lambda query: query.rows.n),
            )  # fmt: skip
        return Served(bundle, manifest, scorer, encoder, batcher, retrieval, digest, time.time())

    def _batcher(self, process, size) -> Batcher:
        return Batcher(process, size, self.executor, self.max_batch, self.max_wait_ms, observe=self.metrics.batch_rows.observe)

    async def reload(self, bundle: Path | None = None) -> Served:
        """Serve ``bundle`` (default: the path served now, read again) once it is loaded; the old
        bundle finishes the requests it holds. Raises the error of a bundle that fails its check."""
        async with self._reloading:  # one reload at a time
            try:
                served = await asyncio.to_thread(self.load, bundle or self.current.path)
            except RecforgeError:
                self.metrics.reloads.labels("refused").inc()
                raise
            old, self.current = self.current, served
            self.metrics.reloads.labels("ok").inc()
        await old.close()
        return served


def create_app(
    bundle: Path,
    backend: str = "auto",
    max_batch: int = 256,
    max_wait_ms: float = 2.0,
    max_rows: int = 1024,
    workers: int = 1,
) -> FastAPI:
    """The service of the exported ``bundle`` (checked and loaded now; raises the
    :class:`RecforgeError` of a bundle that fails its check). With ``workers`` > 1 each worker
    process holds its own app and a reload is SIGHUP to the parent process, which replaces the
    workers one by one."""
    metrics = Metrics(max_batch)
    service = Service(bundle, backend, max_batch, max_wait_ms, metrics)
    on_signal = threading.current_thread() is threading.main_thread() and workers == 1
    reloads: set[asyncio.Task] = set()  # held until done, so that none is collected while running

    def reload_on_signal() -> None:
        task = asyncio.get_running_loop().create_task(_reload_on_signal(service))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if on_signal:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reload_on_signal)
        yield
        if on_signal:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        await service.current.close()
        service.executor.shutdown(wait=False)

    app = FastAPI(title="recforge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    app.add_middleware(_Observed, metrics=metrics)

    @app.exception_handler(RowError)
    async def unprocessable(request: Request, err: RowError) -> JSONResponse:
        return JSONResponse({"detail": [{"loc": list(loc), "msg": msg} for loc, msg in err.problems]}, status_code=422)

    def parse_rows(served: Served, rows: list, padded: frozenset[str] = frozenset()) -> Rows:
        if len(rows) > max_rows:
            raise RowError([(("body", "rows"), f"{len(rows)} rows; a request holds at most {max_rows} (--max-rows)")])
        try:
            return served.encoder.parse(rows, padded)
        except RowError as err:
            raise RowError([(("body", "rows", *loc), msg) for loc, msg in err.problems]) from None

    def answer(body: dict, oov: dict[str, int]) -> Response:
        for feature, n in oov.items():
            if n:
                metrics.oov.labels(feature).inc(n)
        return Response(json.dumps(body | {"oov": oov}), media_type="application/json")

    @app.post("/score")
    async def score(request: Request) -> Response:
        rows = _fields(await _body(request), {"rows": list})["rows"]
        served = service.current
        if served.batcher is None:
            return _unable(f"model {served.scorer.model_name!r} ranks no rows (it is not a ranker); POST /recommend asks it for items")
        predictions, oov = await served.batcher.submit(parse_rows(served, rows))
        return answer({"predictions": {label: p.tolist() for label, p in predictions.items()}}, oov)

    @app.post("/recommend")
    async def recommend(request: Request) -> Response:
        body = _fields(await _body(request), {"rows": list, "k": int}, {"exclude": list})
        served = service.current
        retrieval = served.retrieval
        if retrieval is None:
            return _unable(f"model {served.scorer.model_name!r} retrieves no items (it is not a retriever served by torch); POST /score ranks rows")
        k, most = body["k"], retrieval.index.index.ntotal
        if not 1 <= k <= most:
            raise RowError([(("body", "k"), f"{k} items asked for; k is from 1 to the {most} items of the index")])
        rows = parse_rows(served, body["rows"], frozenset([retrieval.item_feature]))
        exclude = body.get("exclude", [[]] * rows.n)
        if len(exclude) != rows.n:
            raise RowError([(("body", "exclude"), f"{len(exclude)} lists for {rows.n} rows; give one list of item ids per row")])
        try:
            codes = served.encoder.id_lists(retrieval.item_feature, exclude)
        except RowError as err:
            raise RowError([(("body", "exclude", *loc), msg) for loc, msg in err.problems]) from None
        items, scores, oov = await retrieval.batcher.submit(Query(rows, k, codes))
        found = items >= 0  # fewer than k items where exclusions leave too few
        names = [retrieval.item_names[row[keep]].tolist() for row, keep in zip(items, found)]
        return answer({"items": names, "scores": [row[keep].tolist() for row, keep in zip(scores, found)]}, oov)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": service.current.scorer.model_name}

    @app.get("/metadata")
    async def metadata() -> dict:
        served = service.current
        return {
            "model": served.scorer.model_name,
            "backend": served.scorer.backend,
            "bundle": str(served.path),
            "sha256": served.digest,
            "weights_sha256": served.manifest["files"]["model.safetensors"]["sha256"],
            "exported": served.manifest["created"],
            "recforge": importlib.metadata.version("recforge"),
            "loaded_at": served.loaded_at,
            "fields": served.encoder.fields,
            "schema": served.encoder.schema.model_dump(mode="json"),
            "endpoints": [path for path, able in (("/score", served.batcher), ("/recommend", served.retrieval)) if able],
            "limits": {"max_rows": max_rows, "max_batch": max_batch, "max_wait_ms": max_wait_ms},
        }

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/admin/reload")
    async def reload(request: Request) -> JSONResponse:
        if workers > 1:
            return JSONResponse({"detail": f"{workers} worker processes: reload them with SIGHUP to the parent process (pid {os.getppid()})"}, status_code=409)
        path = _fields(await _body(request), {}, {"bundle": str}).get("bundle")
        try:
            served = await service.reload(Path(path) if path else None)
        except RecforgeError as err:
            raise RowError([(("body", "bundle"), f"refused, still serving {service.current.path}: {err}")]) from None
        return JSONResponse({"bundle": str(served.path), "model": served.scorer.model_name, "sha256": served.digest})

    return app


async def _reload_on_signal(service: Service) -> None:
    try:
        served = await service.reload()
    except RecforgeError as err:
        print(f"recforge serve: SIGHUP: reload refused, still serving {service.current.path}: {err}", file=sys.stderr, flush=True)
    else:
        print(f"recforge serve: SIGHUP: serving {served.path} (sha256 {served.digest})", file=sys.stderr, flush=True)


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object that names each key once."""
    found = dict(pairs)
    if len(found) != len(pairs):
        seen: set[str] = set()
        twice = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise ValueError(f"key {twice!r} given twice in one object")
    return found


async def _body(request: Request) -> dict:
    """The request's JSON object (NaN and infinities read as floats, for the checks to name)."""
    raw = await request.body()
    try:
        body = json.loads(raw, object_pairs_hook=_unique_keys) if raw else None
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
        raise RowError([(("body",), f"not valid JSON: {err}")]) from None
    if not isinstance(body, dict):
        raise RowError([(("body",), "expected a JSON object")])
    return body


def _fields(body: dict, required: dict[str, type], optional: dict[str, type] | None = None) -> dict:
    """``body``, checked to hold the ``required`` fields and maybe the ``optional`` ones, of their types."""
    kinds = required | (optional or {})
    problems: list[tuple[Location, str]] = [
        (("body", key), f"unknown field; the body holds {', '.join(kinds)}") for key in body if key not in kinds
    ]
    for name, kind in kinds.items():
        if name not in body:
            if name in required:
                problems.append((("body", name), "field required"))
        elif type(body[name]) is not kind:  # not isinstance: a boolean is no integer here
            problems.append((("body", name), f"expected {_KIND_NAMES[kind]}, got {json_type(body[name])}"))
    if problems:
        raise RowError(problems)
    return body


_KIND_NAMES = {list: "a list", int: "an integer", str: "a string"}


def _unable(reason: str) -> JSONResponse:
    """409: the bundle served now cannot do what the request asks."""
    return JSONResponse({"detail": reason}, status_code=409)


class _Observed:
    """ASGI middleware counting each HTTP request by path and status and timing it."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def sending(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            path = scope["path"] if scope["path"] in PATHS else "other"
            self.metrics.requests.labels(path, str(status)).inc()
            self.metrics.latency.labels(path).observe(time.perf_counter() - start)


OPTIONS_ENV = "RECFORGE_SERVE_OPTIONS"  # the options of create_app, as JSON, for each worker process


def serve(
    bundle: Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: int = 1,
    backend: str = "auto",
    max_batch: int = 256,
    max_wait_ms: float = 2.0,
    max_rows: int = 1024,
) -> None:
    """Run the service of ``bundle`` on uvicorn until interrupted; the bundle is checked before the
    port is bound. With ``workers`` > 1 the worker processes share the port and their metrics."""
    import uvicorn

    least = {"port": (port, 0), "workers": (workers, 1), "max-batch": (max_batch, 1), "max-rows": (max_rows, 1), "max-wait-ms": (max_wait_ms, 0)}
    low = [f"--{name} must be >= {bound}, not {value}" for name, (value, bound) in least.items() if value < bound]
    if low:
        raise ConfigError("; ".join(low))
    options = {"backend": backend, "max_batch": max_batch, "max_wait_ms": max_wait_ms, "max_rows": max_rows}
    run = {"host": host, "port": port, "access_log": False, "timeout_graceful_shutdown": 10}
    if workers == 1:
        uvicorn.run(create_app(bundle, **options), **run)
        return
    check_bundle(Path(bundle))
    metrics_dir = tempfile.mkdtemp(prefix="recforge-serve-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # read by prometheus_client in each worker
    os.environ[OPTIONS_ENV] = json.dumps({"bundle": str(Path(bundle).resolve()), "workers": workers, **options})
    try:
        uvicorn.run(f"{__name__}:app_from_environment", factory=True, workers=workers, **run)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def app_from_environment() -> FastAPI:
    """The app of a worker process, from the options :func:`serve` left in the environment."""
    options = json.loads(os.environ[OPTIONS_ENV])
    return create_app(Path(options.pop("bundle")), **options)
