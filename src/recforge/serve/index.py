"""Top-k retrieval of encoded items over FAISS, scored by the inner product (a two-tower's score).

Row ``i`` of the item vectors is encoded item id ``i``; the padding and OOV rows (ids 0 and 1)
are never indexed, so they are never returned. Kinds and their parameters:

- ``exact``: ``IndexFlatIP``, every item scored.
- ``hnsw``: ``IndexHNSWFlat``; ``m`` = 32 links per node, ``ef_construction`` = 40 (FAISS's
  default) and ``ef_search`` = 128 candidates kept while searching (raised to the number of
  results fetched when that is larger). Scores are exact inner products of the items found.
- ``ivfpq``: ``IndexIVFPQ`` over an inner-product coarse quantizer; ``nlist`` = 4 sqrt(V)
  lists, ``nprobe`` = 32 lists scanned per query, ``subquantizers`` = the largest divisor of D
  not above D / 2 (two dimensions per code byte at ``bits`` = 8), k-means trained on
  ``train_points`` = min(V, 64 nlist) items drawn with ``seed``. ``refine`` > 0 keeps the
  float vectors and re-scores ``refine`` x k PQ candidates exactly (0: PQ scores, no vectors
  kept; its value can change after building, not whether it is 0). PQ scores alone cap the
  recall (about 0.90 at 50 of 1M 64-wide items in ``benchmarks/retrieval.py``; 0.999 with
  ``refine`` = 4).

:meth:`ItemIndex.search` removes each user's excluded items from the results by fetching k plus
the longest exclusion list and filtering; rows that an approximate search leaves short (an IVF
probe reaching too few items) are searched again exhaustively, so every row holds exactly k
items whenever the vocabulary has k items it may return. Missing results are -1 with score -inf.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import faiss
import numpy as np
import torch

from recforge.data.schema import OOV, PAD
from recforge.errors import CheckpointError, ConfigError, DataError
from recforge.files import find_complete, install_directory, stage_directory
from recforge.models.capabilities import Retriever
from recforge.train.checkpoint import read_json

FIRST_ITEM = max(PAD, OOV) + 1  # encoded id of index position 0
INDEX_FILE, SPEC_FILE = "index.faiss", "index.json"
KINDS = ("exact", "hnsw", "ivfpq")
_SEARCH_PARAMS = {"exact": (), "hnsw": ("ef_search",), "ivfpq": ("nprobe", "refine")}


def _default_params(kind: str, num_indexed: int, dim: int) -> dict[str, Any]:
    """The parameters of ``kind`` and their defaults for ``num_indexed`` vectors of width ``dim``."""
    if kind == "hnsw":
        return {"m": 32, "ef_construction": 40, "ef_search": 128}
    if kind == "ivfpq":
        nlist = max(1, min(num_indexed, round(4 * math.sqrt(num_indexed))))
        subquantizers = next(m for m in range(max(1, dim // 2), 0, -1) if dim % m == 0)
        return {"nlist": nlist, "nprobe": 32, "subquantizers": subquantizers, "bits": 8, "refine": 0,
                "train_points": min(num_indexed, 64 * nlist), "seed": 0}  # fmt: skip
    return {}


class ItemIndex:
    """A FAISS index over the items of one vocabulary (module docstring); build with :meth:`build`."""

    def __init__(self, index: faiss.Index, kind: str, params: dict[str, Any], num_items: int) -> None:
        self.index, self.kind, self.params, self.num_items = index, kind, params, num_items
        self.dim = index.d
        self._apply_search_params()

    @classmethod
    def build(cls, item_vectors: np.ndarray, kind: str = "exact", **params: Any) -> ItemIndex:
        """Index ``item_vectors`` [V, D] (row i = encoded item i) as ``kind`` with ``params``."""
        vectors = np.asarray(item_vectors)
        if vectors.ndim != 2 or len(vectors) <= FIRST_ITEM or vectors.shape[1] == 0:
            raise DataError(f"item vectors must be [V, D] with V > {FIRST_ITEM} (padding and OOV rows first), got shape {vectors.shape}")
        if not np.isfinite(vectors).all():
            raise DataError("item vectors hold NaN or infinite values")
        items = np.ascontiguousarray(vectors[FIRST_ITEM:], dtype=np.float32)
        resolved = _resolve(kind, params, len(items), items.shape[1])
        index = _new_index(kind, resolved, items)
        index.add(items)
        return cls(index, kind, resolved, len(vectors))

    def set_search_params(self, **params: Any) -> None:
        """Change the search-time parameters (``ef_search``; ``nprobe``, ``refine``) of this index."""
        unknown = sorted(set(params) - set(_SEARCH_PARAMS[self.kind]))
        if unknown:
            raise ConfigError(f"{self.kind} index: {unknown} are not search parameters; it has {list(_SEARCH_PARAMS[self.kind])}")
        if "refine" in params and (params["refine"] > 0) != (self.params["refine"] > 0):
            raise ConfigError("ivfpq index: refine switches between 0 and > 0 only when the index is built")
        _check_integers(self.kind, params)
        self.params = {**self.params, **{name: int(value) for name, value in params.items()}}
        self._apply_search_params()

    def search(
        self, user_vectors: np.ndarray, k: int, exclude: Sequence[Sequence[int]] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` best items of each user vector [B, D] -> (encoded ids [B, k] int64, scores [B, k] float32).

        ``exclude[b]`` lists encoded ids never returned to user ``b`` (e.g. its seen items); ids
        outside the vocabulary's items are ignored. Results are in descending score order.
        """
        queries = np.ascontiguousarray(user_vectors, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise DataError(f"user vectors must be [B, {self.dim}], got shape {np.shape(user_vectors)}")
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise ConfigError(f"k must be a positive integer, got {k!r}")
        ptr, excluded = self._exclusions(exclude, len(queries))
        lengths = np.diff(ptr)
        labels, scores = self._fetch(queries, min(self.index.ntotal, k + int(lengths.max(initial=0))), exhaustive=False)
        ids, top, found = _filter(labels, scores, ptr, excluded, k, self.index.ntotal)
        short = np.flatnonzero(found < np.minimum(k, self.index.ntotal - lengths))
        if len(short):
            sub_ptr = np.concatenate([[0], np.cumsum(lengths[short])])
            sub_excluded = np.concatenate([excluded[ptr[r] : ptr[r + 1]] for r in short])
            fetch = min(self.index.ntotal, k + int(lengths[short].max()))
            labels, scores = self._fetch(queries[short], fetch, exhaustive=True)
            ids[short], top[short], _ = _filter(labels, scores, sub_ptr, sub_excluded, k, self.index.ntotal)
        return np.where(ids >= 0, ids + FIRST_ITEM, -1), top

    def save(self, path: str | Path) -> None:
        """Write the index to the folder ``path`` (``index.faiss``, then ``index.json``), replacing it as one unit."""
        path = Path(path)
        staging = stage_directory(path)
        faiss.write_index(self.index, str(staging / INDEX_FILE))
        spec = {"kind": self.kind, "params": self.params, "num_items": self.num_items, "dim": self.dim,
                "faiss": faiss.__version__}  # fmt: skip
        install_directory(staging, path, SPEC_FILE, json.dumps(spec, indent=2))

    @classmethod
    def load(cls, path: str | Path) -> ItemIndex:
        """The index saved at ``path`` (or the complete ``<path>.old`` an interrupted save left)."""
        folder = find_complete(Path(path), SPEC_FILE)
        if folder is None:
            raise CheckpointError(f"{path}: no item index (no {SPEC_FILE})")
        spec = read_json(folder / SPEC_FILE)
        try:
            index = faiss.read_index(str(folder / INDEX_FILE))
        except RuntimeError as err:
            raise CheckpointError(f"{folder / INDEX_FILE}: not a readable FAISS index ({str(err).splitlines()[0]})") from None
        try:
            kind, params, num_items = spec["kind"], dict(spec["params"]), int(spec["num_items"])
            known = kind in KINDS and set(_SEARCH_PARAMS[kind]) <= set(params)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{folder / SPEC_FILE}: lacks kind, params or num_items") from None
        if not known:
            raise CheckpointError(f"{folder / SPEC_FILE}: kind {kind!r} with parameters {sorted(params)} is not an index kind")
        if index.ntotal != num_items - FIRST_ITEM:
            raise CheckpointError(f"{folder}: {INDEX_FILE} holds {index.ntotal} items, {SPEC_FILE} describes {num_items - FIRST_ITEM}")
        return cls(index, kind, params, num_items)

    # --- internals -----------------------------------------------------------------------------
    def _apply_search_params(self) -> None:
        if self.kind == "hnsw":
            self.index.hnsw.efSearch = self.params["ef_search"]
        elif self.kind == "ivfpq":
            faiss.extract_index_ivf(self.index).nprobe = self.params["nprobe"]
            if self.params["refine"]:
                self.index.k_factor = self.params["refine"]

    def _fetch(self, queries: np.ndarray, fetch: int, exhaustive: bool) -> tuple[np.ndarray, np.ndarray]:
        """FAISS's ``fetch`` best index positions; ``exhaustive`` searches every item (every IVF list,
        the flat vectors under an HNSW graph)."""
        if not exhaustive or self.kind == "exact":
            scores, labels = self.index.search(queries, fetch)
        elif self.kind == "hnsw":
            scores, labels = faiss.downcast_index(self.index.storage).search(queries, fetch)
        else:
            every_list = faiss.SearchParametersIVF(nprobe=faiss.extract_index_ivf(self.index).nlist)
            if self.params["refine"]:
                params = faiss.IndexRefineSearchParameters(k_factor=self.params["refine"], base_index_params=every_list)
                scores, labels = self.index.search(queries, fetch, params=params)
            else:
                scores, labels = self.index.search(queries, fetch, params=every_list)
        return labels, scores

    def _exclusions(self, exclude: Sequence[Sequence[int]] | None, rows: int) -> tuple[np.ndarray, np.ndarray]:
        """Each row's distinct excluded index positions as CSR ``(ptr [B + 1], positions)``."""
        if exclude is None:
            return np.zeros(rows + 1, dtype=np.int64), np.zeros(0, dtype=np.int64)
        if len(exclude) != rows:
            raise DataError(f"exclude must hold one list per user vector: {len(exclude)} lists for {rows} vectors")
        lengths = np.fromiter((len(items) for items in exclude), dtype=np.int64, count=rows)
        flat = np.fromiter((item for items in exclude for item in items), dtype=np.int64, count=int(lengths.sum()))
        inside = (flat >= FIRST_ITEM) & (flat < self.num_items)
        num_indexed = self.index.ntotal
        keys = np.unique(np.repeat(np.arange(rows), lengths)[inside] * num_indexed + flat[inside] - FIRST_ITEM)
        ptr = np.zeros(rows + 1, dtype=np.int64)
        np.cumsum(np.bincount(keys // num_indexed, minlength=rows), out=ptr[1:])
        return ptr, keys % num_indexed


def from_retriever(model: Retriever, kind: str = "exact", **params: Any) -> ItemIndex:
    """An index over ``model.item_embeddings()`` (the retriever's whole item vocabulary)."""
    with torch.inference_mode():
        vectors = model.item_embeddings().float().cpu().numpy()
    return ItemIndex.build(vectors, kind, **params)


def _resolve(kind: str, params: dict[str, Any], num_indexed: int, dim: int) -> dict[str, Any]:
    """``params`` over the kind's defaults, checked."""
    if kind not in KINDS:
        raise ConfigError(f"index kind must be one of {', '.join(KINDS)}, not {kind!r}")
    resolved = _default_params(kind, num_indexed, dim)
    unknown = sorted(set(params) - set(resolved))
    if unknown:
        raise ConfigError(f"{kind} index: unknown parameters {unknown}; it takes {sorted(resolved)}")
    if kind == "ivfpq" and "nlist" in params and "train_points" not in params:
        resolved["train_points"] = min(num_indexed, 64 * params["nlist"])
    resolved |= params
    _check_integers(kind, resolved)
    resolved = {name: int(value) for name, value in resolved.items()}
    if kind == "ivfpq":
        if dim % resolved["subquantizers"]:
            raise ConfigError(f"ivfpq index: subquantizers ({resolved['subquantizers']}) must divide the vector width {dim}")
        needed = max(resolved["nlist"], 2 ** resolved["bits"])
        if min(num_indexed, resolved["train_points"]) < needed:
            raise ConfigError(
                f"ivfpq index: training needs at least max(nlist, 2**bits) = {needed} items, "
                f"got {min(num_indexed, resolved['train_points'])}; lower nlist or bits, or use kind exact or hnsw"
            )
    return resolved


def _check_integers(kind: str, params: dict[str, Any]) -> None:
    """Every parameter is an integer, >= 0 for ``refine`` and ``seed`` and >= 1 for the others."""
    bad = {name: value for name, value in params.items()
           if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < (0 if name in ("refine", "seed") else 1)}  # fmt: skip
    if bad:
        raise ConfigError(f"{kind} index: parameters must be integers, >= 0 for refine and seed and >= 1 otherwise; got {bad}")


def _new_index(kind: str, params: dict[str, Any], items: np.ndarray) -> faiss.Index:
    """An empty (trained) FAISS index of ``kind`` for ``items``."""
    dim = items.shape[1]
    if kind == "exact":
        return faiss.IndexFlatIP(dim)
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, params["m"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params["ef_construction"]
        return index
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFPQ(quantizer, dim, params["nlist"], params["subquantizers"], params["bits"], faiss.METRIC_INNER_PRODUCT)
    sample = np.random.default_rng(params["seed"]).choice(len(items), min(len(items), params["train_points"]), replace=False)
    index.train(items[np.sort(sample)])
    return faiss.IndexRefineFlat(index) if params["refine"] else index


def _filter(
    labels: np.ndarray, scores: np.ndarray, ptr: np.ndarray, excluded: np.ndarray, k: int, num_indexed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The first ``k`` results of each row that are neither missing (-1) nor excluded (CSR
    ``ptr``, ``excluded``) -> (positions [B, k], scores [B, k], valid results found [B])."""
    rows, width = labels.shape
    if width < k:
        labels = np.pad(labels, ((0, 0), (0, k - width)), constant_values=-1)
        scores = np.pad(scores, ((0, 0), (0, k - width)), constant_values=-np.inf)
    valid = labels >= 0
    if len(excluded):
        excluded_keys = np.sort(np.repeat(np.arange(rows), np.diff(ptr)) * num_indexed + excluded)
        keys = np.arange(rows)[:, None] * num_indexed + labels
        at = np.minimum(np.searchsorted(excluded_keys, keys), len(excluded_keys) - 1)
        valid &= excluded_keys[at] != keys
    first = np.argsort(~valid, axis=1, kind="stable")[:, :k]  # valid results first, in score order
    kept = np.take_along_axis(valid, first, 1)
    positions = np.where(kept, np.take_along_axis(labels, first, 1), -1)
    top = np.where(kept, np.take_along_axis(scores, first, 1), -np.inf).astype(np.float32)
    return positions, top, valid.sum(1)
