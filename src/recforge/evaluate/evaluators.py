"""Evaluators: the metrics of a model on one split, chosen by what the model declares it can do.

- :class:`Pointwise` (a :class:`~recforge.models.capabilities.Ranker`): every prediction that
  names a label of the batch is scored against it: ``<label>_auc``, ``_logloss`` and, when the
  store has a user column, ``_gauc``.
- :class:`FunnelEvaluator` (a :class:`~recforge.models.capabilities.Funnel`): the click on every
  row, the post-click conversion on the clicked rows only, and ``ctcvr`` against click x
  conversion on every row.
- :class:`FullRanking` (a :class:`~recforge.models.capabilities.Retriever`): each row is a
  (user, item) interaction whose user vector ranks its item against the whole item vocabulary,
  the user's train items excluded (``recall@K``, ``ndcg@K``, ``hr@K``, ``mrr``), with the
  most-popular ranking under the same protocol as ``popular_*``.
- :class:`SampledRanking`: each held-out (user, domain) item ranked against ``negatives`` items of
  its domain drawn uniformly among the domain's train items the user has not interacted with
  (fixed by a seed, the same for every model); HR@10 / NDCG@10 per domain and warm / cold users.

- :class:`CandidateRanking` (a :class:`~recforge.models.capabilities.Ranker`): each held-out
  row's item scored by the ranker against ``negatives`` items drawn uniformly among the train
  items its user never had (fixed by a seed, the same for every model), the row's other inputs
  unchanged and the item's own features (``item_features``, item-keyed embeddings) those of each
  candidate: HIT@K (``hr@K``), NDCG@K, MRR, and the most-popular reference as ``popular_*``.

An evaluator is called as ``evaluator(model, view) -> {metric: value}`` with the model in eval mode
under ``torch.inference_mode()`` (the trainer does both); keys carry no split prefix.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from recforge.data.cross_domain import DomainInteractions
from recforge.data.candidates import ItemSwap, unseen_items
from recforge.data.schema import OOV, PAD
from recforge.data.store import SplitView, Store
from recforge.evaluate.metrics import classification_report, full_ranking_metrics, sampled_ranking_metrics
from recforge.models.base import Model
from recforge.models.capabilities import Funnel, Ranker, Retriever
from recforge.errors import DataError

CTCVR = "ctcvr"
RETRIEVAL_KS = (10, 20, 50)
SAMPLED_KS = (10,)
SAMPLED_SHOWN = ("hr@10", "ndcg@10")
SPLITS_ORDER = ("train", "valid", "test")
_SCORE_BLOCK = 1 << 24  # user x item scores computed at once in full-corpus evaluation


class Evaluator(Protocol):
    def __call__(self, model: Model, view: SplitView) -> dict[str, float]: ...


def evaluator_for(model: Model, store: Store, batch_size: int = 65536) -> Evaluator:
    """The evaluator of ``model``'s declared capability."""
    if isinstance(model, Funnel) and model.funnel_labels() is not None:
        return FunnelEvaluator(batch_size)
    if isinstance(model, Ranker):
        return Pointwise(batch_size)
    if isinstance(model, Retriever):
        return FullRanking(store, batch_size)
    raise TypeError(f"{type(model).__name__} declares no capability that an evaluator scores (ranker, funnel or retriever)")


def _predictions(model: Model, view: SplitView, batch_size: int) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor | None]:
    """Probabilities per predicted name, labels per name and the GAUC groups of every row of ``view``."""
    predictions: dict[str, list[Tensor]] = defaultdict(list)
    labels: dict[str, list[Tensor]] = defaultdict(list)
    groups: list[Tensor] = []
    device = next(model.parameters()).device
    for batch in view.batches(batch_size):
        for name, prob in model.predict(model(batch.to(device))).items():
            predictions[name].append(prob.float().cpu())
        for name, label in batch.labels.items():
            labels[name].append(label)
        if batch.group is not None:
            groups.append(batch.group)
    probs = {name: torch.cat(parts) for name, parts in predictions.items()}
    return probs, {name: torch.cat(parts) for name, parts in labels.items()}, torch.cat(groups) if groups else None


@dataclasses.dataclass
class Pointwise:
    batch_size: int = 65536

    def __call__(self, model: Model, view: SplitView) -> dict[str, float]:
        probs, labels, groups = _predictions(model, view, self.batch_size)
        targets = {name: labels[name] for name in probs if name in labels}
        return classification_report(targets, probs, groups)


@dataclasses.dataclass
class FunnelEvaluator:
    batch_size: int = 65536

    def __call__(self, model: Model, view: SplitView) -> dict[str, float]:
        click, conversion = model.funnel_labels()
        probs, labels, groups = _predictions(model, view, self.batch_size)
        targets = {name: labels[name] for name in probs if name in labels}
        if CTCVR in probs and CTCVR not in labels:
            targets[CTCVR] = labels[click] * labels[conversion]
        return classification_report(targets, probs, groups, {conversion: labels[click] > 0.5})


@dataclasses.dataclass
class FullRanking:
    store: Store
    batch_size: int = 65536

    def __call__(self, model: Model, view: SplitView) -> dict[str, float]:
        item_feature = model.item_feature
        device = next(model.parameters()).device
        user_vectors = torch.cat([model.user_embedding(batch.to(device)) for batch in view.batches(self.batch_size)])
        item_vectors = model.item_embeddings()
        exclude_ptr = exclude_idx = None
        user = self.store.schema.user
        train = self.store.split("train")
        if user is not None:
            ptr, idx = seen_items(train.column(user), train.column(item_feature), view.column(user))
            exclude_ptr, exclude_idx = torch.from_numpy(ptr), torch.from_numpy(idx)
        targets = torch.from_numpy(view.column(item_feature).astype(np.int64))

        def rank(users: Tensor, items: Tensor) -> dict[str, float]:
            return full_ranking_metrics(
                users, items, targets, exclude_ptr, exclude_idx, ks=RETRIEVAL_KS,
                batch_size=max(1, _SCORE_BLOCK // len(items)), excluded_item_ids=(PAD, OOV),
            )  # fmt: skip

        # the most-popular reference under the same protocol: every user gets the train counts
        counts = np.bincount(train.column(item_feature), minlength=len(item_vectors))
        popular = rank(torch.ones(len(targets), 1), torch.from_numpy(counts.astype(np.float32))[:, None])
        return rank(user_vectors, item_vectors) | {f"popular_{k}": v for k, v in popular.items()}


def seen_items(
    train_users: np.ndarray, train_items: np.ndarray, query_users: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """For each query row, its user's items in the train split, as CSR ``(ptr [Q + 1], idx)``."""
    train_users = train_users.astype(np.int64)
    query_users = query_users.astype(np.int64)
    items_by_user = train_items.astype(np.int64)[np.argsort(train_users, kind="stable")]
    num_users = int(max(train_users.max(initial=-1), query_users.max(initial=-1))) + 1
    counts = np.bincount(train_users, minlength=num_users)
    user_start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    lengths = counts[query_users]
    ptr = np.zeros(len(query_users) + 1, dtype=np.int64)
    np.cumsum(lengths, out=ptr[1:])
    idx = items_by_user[np.repeat(user_start[query_users] - ptr[:-1], lengths) + np.arange(ptr[-1])]
    return ptr, idx


# --- sampled ranking -----------------------------------------------------------------------------
@dataclasses.dataclass
class Candidates:
    """The rankable rows of one split: row index, domain position, cold flag, [N, 1 + negatives]
    candidate items (target first)."""

    rows: np.ndarray
    domain: np.ndarray
    cold: np.ndarray
    items: np.ndarray
    skipped: int


def sample_candidates(
    view: SplitView, data: DomainInteractions, item: str, negatives: int, seed: int, max_rows: int | None = None
) -> Candidates:
    """Targets of ``view`` and their sampled negatives (see the module docstring).

    ``max_rows``: keep at most this many rows per (domain, warm / cold) group, a seeded subset
    (validation during training).
    """
    schema = view.schema
    generator = np.random.default_rng(seed)
    users = view.column(schema.user).astype(np.int64)
    targets = view.column(item).astype(np.int64)
    domains = data.domain_of_code[view.column(schema.domain).astype(np.int64)]
    rankable = (domains >= 0) & (data.item_domain[targets] == domains)
    counts = data.counts()
    cold = np.zeros(len(users), dtype=bool)
    cold[rankable] = counts[users[rankable], domains[rankable]] == 0
    seen_keys = np.repeat(np.arange(len(data.ptr) - 1) // data.num_domains, np.diff(data.ptr)) * data.num_items + data.items
    seen_keys.sort()
    all_rows, all_items = [], []
    for d in range(data.num_domains):
        pool = data.domain_items[data.domain_ptr[d] : data.domain_ptr[d + 1]]
        for group in (False, True):
            rows = np.flatnonzero(rankable & (domains == d) & (cold == group))
            if max_rows is not None and len(rows) > max_rows:
                rows = np.sort(generator.choice(rows, max_rows, replace=False))
            if len(rows) == 0:
                continue
            draws = min(negatives, len(pool) - int(counts[users[rows], d].max()) - 1)
            if draws < 1:
                raise DataError(f"domain {data.domain_names[d]!r} has too few items to sample negatives")
            chosen = [unseen_items(generator, pool, users[chunk], targets[chunk], seen_keys, data.num_items, draws)
                      for chunk in np.array_split(rows, max(1, len(rows) // 2048))]  # fmt: skip
            all_rows.append(rows)
            all_items.append(np.concatenate([targets[rows][:, None], np.concatenate(chosen)], 1))
    if not all_rows:
        raise DataError(f"split {view.name!r} has no rankable rows")
    width = min(a.shape[1] for a in all_items)
    rows = np.concatenate(all_rows)
    return Candidates(
        rows=rows,
        domain=domains[rows],
        cold=cold[rows],
        items=np.concatenate([a[:, :width] for a in all_items]),
        skipped=int((~rankable).sum()),
    )


def ranking_metrics(
    user_vectors: Tensor, item_vectors: Tensor, candidates: Candidates, domain_names: list[str], item_count: np.ndarray
) -> dict[str, float]:
    """HR@10 / NDCG@10 per domain and group (warm, cold), their means, and the popularity reference."""
    items = torch.from_numpy(candidates.items)
    scores = torch.cat(
        [
            torch.bmm(item_vectors[chunk_items], users.unsqueeze(-1)).squeeze(-1)  # <u, v_c>: [n, C]
            for users, chunk_items in zip(user_vectors.split(512), items.split(512))
        ]
    )
    popular = torch.from_numpy(item_count.astype(np.float32))[items]  # [N, C]
    metrics: dict[str, float] = {"skipped_unseen_targets": float(candidates.skipped)}
    means: dict[str, list[float]] = {}
    for d, name in enumerate(domain_names):
        for cold in (False, True):
            mask = torch.from_numpy((candidates.domain == d) & (candidates.cold == cold))
            if not mask.any():
                continue
            group = f"{name}_cold" if cold else name
            metrics[f"{group}_rows"] = float(mask.sum())
            for prefix, values in (("", scores), ("popular_", popular)):
                ranked = sampled_ranking_metrics(values[mask, 0], values[mask, 1:], ks=SAMPLED_KS)
                for key in SAMPLED_SHOWN:
                    metrics[f"{prefix}{group}_{key}"] = ranked[key]
                    means.setdefault(f"{prefix}{'cold_' if cold else ''}{key}", []).append(ranked[key])
    return {key: float(np.mean(values)) for key, values in means.items()} | metrics


class SampledRanking:
    """Sampled ranking of a retriever over the domains of ``data`` (module docstring).

    ``candidates_of(view)`` draws (once per split) the candidates: seed ``3 * seed + split``;
    ``valid_rows`` keeps a seeded subset of at most that many rows per (domain, warm / cold)
    group of the valid split (validation during training).
    """

    def __init__(
        self, data: DomainInteractions, item: str = "item_id", negatives: int = 999, seed: int = 0,
        valid_rows: int | None = None, batch_rows: int = 4096,
    ) -> None:  # fmt: skip
        self.data, self.item, self.negatives, self.seed = data, item, negatives, seed
        self.valid_rows, self.batch_rows = valid_rows, batch_rows
        self.candidates: dict[str, Candidates] = {}

    def candidates_of(self, view: SplitView) -> Candidates:
        if view.name not in self.candidates:
            seed = self.seed * 3 + ("train", "valid", "test").index(view.name)
            limit = self.valid_rows if view.name == "valid" else None
            self.candidates[view.name] = sample_candidates(view, self.data, self.item, self.negatives, seed, limit)
        return self.candidates[view.name]

    def __call__(self, model: Model, view: SplitView) -> dict[str, float]:
        candidates = self.candidates_of(view)
        device = next(model.parameters()).device
        chunks = np.array_split(candidates.rows, max(1, -(-len(candidates.rows) // self.batch_rows)))
        users = torch.cat([model.user_embedding(view.take(rows).to(device)).float().cpu() for rows in chunks])
        items = model.item_embeddings().float().cpu()
        return ranking_metrics(users, items, candidates, self.data.domain_names, self.data.item_count)


CANDIDATE_KS = (1, 5, 10, 50)


class CandidateRanking:
    """Sampled ranking of a ranker's scores (module docstring). ``valid_rows``: rank a seeded
    subset of at most this many valid rows (validation during training)."""

    def __init__(
        self, store: Store, item: str = "item_id", item_features: list[str] | None = None, negatives: int = 99,
        seed: int = 0, valid_rows: int | None = None, batch_rows: int = 128, ks: tuple[int, ...] = CANDIDATE_KS,
        label: str | None = None,
    ) -> None:  # fmt: skip
        schema = store.schema
        if schema.user is None:
            raise DataError(f"{store.path}: candidate ranking needs a user column (the negatives are items the user never had)")
        self.store, self.item, self.negatives, self.seed = store, item, negatives, seed
        self.valid_rows, self.batch_rows, self.ks = valid_rows, batch_rows, ks
        self.label = label or schema.labels[0]  # the ranker's prediction that orders the candidates
        self.swap = ItemSwap(store, item, item_features)
        self.candidates: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def candidates_of(self, view: SplitView) -> tuple[np.ndarray, np.ndarray]:
        """(rows [N], items [N, 1 + negatives], target first), drawn once per split."""
        if view.name not in self.candidates:
            generator = np.random.default_rng([self.seed, SPLITS_ORDER.index(view.name)])
            rows = np.arange(len(view))
            if view.name == "valid" and self.valid_rows is not None and len(rows) > self.valid_rows:
                rows = np.sort(generator.choice(rows, self.valid_rows, replace=False))
            users = view.column(self.store.schema.user).astype(np.int64)[rows]
            targets = view.column(self.item).astype(np.int64)[rows]
            swap = self.swap
            if len(swap.pool) <= self.negatives:
                raise DataError(f"{self.store.path}: {len(swap.pool)} items with train rows are too few for {self.negatives} negatives")
            chosen = [unseen_items(generator, swap.pool, users[chunk], targets[chunk], swap.seen_keys, swap.num_items, self.negatives)
                      for chunk in np.array_split(np.arange(len(rows)), max(1, len(rows) // 2048))]  # fmt: skip
            self.candidates[view.name] = rows, np.concatenate([targets[:, None], np.concatenate(chosen)], 1)
        return self.candidates[view.name]

    def __call__(self, model: Model, view: SplitView) -> dict[str, float]:
        rows, items = self.candidates_of(view)
        device = next(model.parameters()).device
        scores = []
        for chunk in np.array_split(np.arange(len(rows)), max(1, -(-len(rows) // self.batch_rows))):
            candidates = torch.from_numpy(items[chunk])
            batch = self.swap.expanded(view.take(rows[chunk]), candidates).to(device)
            scores.append(model.predict(model(batch))[self.label].float().cpu().view(len(chunk), -1))
        scores = torch.cat(scores)  # [N, C]
        popular = torch.from_numpy(self.swap.item_count.astype(np.float32))[torch.from_numpy(items)]
        ranked = sampled_ranking_metrics(scores[:, 0], scores[:, 1:], ks=self.ks)
        reference = sampled_ranking_metrics(popular[:, 0], popular[:, 1:], ks=self.ks)
        keep = [f"hr@{k}" for k in self.ks] + [f"ndcg@{k}" for k in self.ks] + ["mrr"]
        return {k: ranked[k] for k in keep} | {f"popular_{k}": reference[k] for k in keep} | {"ranked_rows": float(len(rows))}
