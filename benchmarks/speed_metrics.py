"""AUC, GAUC and full-corpus Recall/NDCG@50: recforge against scikit-learn and naive references."""

from __future__ import annotations

import time

import numpy as np
import torch
from _common import Row, parse_args, timeit, write_results
from sklearn.metrics import roc_auc_score

from recforge.evaluate.metrics import auc, full_ranking_metrics, gauc

KS = (50,)
NAIVE_GAUC_BUDGET_S = 60.0  # the naive GAUC loop runs on every group when it fits this estimate


def naive_gauc(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray, max_groups: int | None = None) -> float:
    """Row-weighted mean of scikit-learn's AUC over a loop of groups (the first ``max_groups``)."""
    order = np.argsort(groups, kind="stable")
    bounds = np.flatnonzero(np.diff(groups[order])) + 1
    total, weight = 0.0, 0
    for rows in np.split(order, bounds)[:max_groups]:
        y = labels[rows]
        if 0 < y.sum() < len(y):
            total += roc_auc_score(y, scores[rows]) * len(rows)
            weight += len(rows)
    return total / weight


def naive_ranks(users: torch.Tensor, items: torch.Tensor, targets: torch.Tensor, ptr: torch.Tensor,
                idx: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Target ranks by a full stable sort of each user's scores (excluded items at -inf)."""
    ranks = []
    for start in range(0, len(users), batch_size):
        stop = min(start + batch_size, len(users))
        scores = users[start:stop] @ items.T
        target = targets[start:stop, None]
        target_score = scores.gather(1, target)
        lengths = ptr[start + 1 : stop + 1] - ptr[start:stop]
        rows = torch.repeat_interleave(torch.arange(stop - start), lengths)
        scores[rows, idx[ptr[start] : ptr[stop]]] = float("-inf")
        scores.scatter_(1, target, target_score)
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices
        ranks.append((order == target).nonzero()[:, 1])
    return torch.cat(ranks)


def naive_metrics(ranks: torch.Tensor) -> dict[str, float]:
    ranks = ranks.double()
    metrics = {}
    for k in KS:
        hit = ranks < k
        metrics[f"recall@{k}"] = hit.double().mean().item()
        metrics[f"ndcg@{k}"] = torch.where(hit, 1.0 / torch.log2(ranks + 2.0), 0.0).mean().item()
    return metrics


def main() -> None:
    args = parse_args(__doc__)
    torch.set_num_threads(args.threads)
    n, n_groups = (20_000, 200) if args.quick else (1_000_000, 6_000)
    n_users, n_items, dim = (500, 5_000, 64) if args.quick else (10_000, 100_000, 64)
    gauc_subset, user_subset, batch_size = (50, 100, 100) if args.quick else (500, 1_024, 1_024)
    rng = np.random.default_rng(0)
    meta: dict[str, object] = {"seed": 0}
    rows: list[Row] = []

    # --- AUC: scores on a 1/1000 grid, so ties are frequent ------------------------------------
    labels = (rng.random(n) < 0.3).astype(np.float64)
    scores = np.round(rng.random(n) * 0.5 + labels * 0.2, 3)
    groups = rng.integers(0, n_groups, n)
    ours, reference = auc(labels, scores), roc_auc_score(labels, scores)
    assert abs(ours - reference) < 1e-6, (ours, reference)
    rows.append({"task": "auc", "name": "recforge", "seconds": timeit(lambda: auc(labels, scores))})
    rows.append({"task": "auc", "name": "scikit-learn", "seconds": timeit(lambda: roc_auc_score(labels, scores))})
    meta["auc"] = {"rows": n, "value": ours}

    # --- GAUC: naive loop over groups, each calling scikit-learn -------------------------------
    subset_rows = np.isin(groups, np.unique(groups)[:gauc_subset])
    start = time.perf_counter()
    naive_subset = naive_gauc(labels, scores, groups, gauc_subset)
    subset_s = time.perf_counter() - start
    ours_subset = gauc(labels[subset_rows], scores[subset_rows], groups[subset_rows])
    assert abs(ours_subset - naive_subset) < 1e-6, (ours_subset, naive_subset)
    total_groups = len(np.unique(groups))
    estimate_s = subset_s * total_groups / gauc_subset
    if estimate_s <= NAIVE_GAUC_BUDGET_S:
        start = time.perf_counter()
        naive_full = naive_gauc(labels, scores, groups)
        naive_s = time.perf_counter() - start
        ours_full = gauc(labels, scores, groups)
        assert abs(ours_full - naive_full) < 1e-6, (ours_full, naive_full)
        gauc_note = "naive loop measured on every group"
    else:
        naive_s = estimate_s
        gauc_note = f"naive loop measured on {gauc_subset} of {total_groups} groups, extrapolated linearly"
    rows.append({"task": "gauc", "name": "recforge", "seconds": timeit(lambda: gauc(labels, scores, groups))})
    rows.append({"task": "gauc", "name": "naive", "seconds": naive_s})
    meta["gauc"] = {"rows": n, "groups": total_groups, "value": gauc(labels, scores, groups), "note": gauc_note}

    # --- full-corpus Recall/NDCG@50 ----------------------------------------------------------
    g = torch.Generator().manual_seed(0)
    device = torch.device(args.device)
    users = torch.randn(n_users, dim, generator=g)
    items = torch.randn(n_items, dim, generator=g)
    targets = torch.randint(0, n_items, (n_users,), generator=g)
    counts = torch.poisson(torch.full((n_users,), 20.0), generator=g).long()
    ptr = torch.zeros(n_users + 1, dtype=torch.long)
    ptr[1:] = counts.cumsum(0)
    idx = torch.randint(0, n_items, (int(ptr[-1]),), generator=g)

    def ours_ranking(num_users: int) -> dict[str, float]:
        metrics = full_ranking_metrics(
            users[:num_users].to(device), items.to(device), targets[:num_users].to(device),
            ptr[: num_users + 1].to(device), idx.to(device), ks=KS, batch_size=batch_size,
        )
        return {key: metrics[key] for k in KS for key in (f"recall@{k}", f"ndcg@{k}")}

    start = time.perf_counter()
    naive_subset_ranks = naive_ranks(users[:user_subset], items, targets, ptr, idx, batch_size)
    naive_subset_s = time.perf_counter() - start
    reference_metrics, ours_metrics = naive_metrics(naive_subset_ranks), ours_ranking(user_subset)
    for key, value in reference_metrics.items():
        assert abs(ours_metrics[key] - value) < 1e-6, (key, ours_metrics[key], value)
    full_metrics: dict[str, float] = {}
    ours_s = timeit(lambda: full_metrics.update(ours_ranking(n_users)), repeat=1 if not args.quick else 2)
    rows.append({"task": f"recall/ndcg@{KS[0]}", "name": "recforge", "seconds": ours_s})
    rows.append({"task": f"recall/ndcg@{KS[0]}", "name": "naive", "seconds": naive_subset_s * n_users / user_subset})
    meta["full_ranking"] = {
        "users": n_users, "items": n_items, "dim": dim, "excluded_per_user": 20, "batch_size": batch_size,
        "metrics": full_metrics,
        "note": f"naive matmul + full argsort measured on {user_subset} of {n_users} users, extrapolated linearly",
    }

    write_results("speed_metrics", rows, meta, args=args, reference="recforge", figure="seconds", group="task")
    by_task = {(r["task"], r["name"]): r["seconds"] for r in rows}
    print("\n".join(f"{task:>16} {name:>13}: {s:9.4f} s" for (task, name), s in by_task.items()))
    gauc_s, ranking_s = by_task[("gauc", "recforge")], by_task[(f"recall/ndcg@{KS[0]}", "recforge")]
    print(f"target GAUC < 1 s: {gauc_s:.3f} s {'ok' if gauc_s < 1 else 'MISSED'}")
    print(f"target full-corpus eval < 10 s: {ranking_s:.3f} s {'ok' if ranking_s < 10 else 'MISSED'}")


if __name__ == "__main__":
    main()
