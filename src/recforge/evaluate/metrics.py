"""Offline evaluation metrics for ranking (CTR-style) and retrieval models.

Every metric is vectorised over rows, users and groups. Inputs may be numpy arrays or torch
tensors; results are Python floats (or dicts of them). Labels are binary: a label above 0.5 is
positive.

Ranks are 0-based throughout: rank 0 is the top of the list.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

ArrayLike = np.ndarray | Tensor | Sequence[float]

_MAX_EXACT_FLOAT32_COUNT = 2**24


def _to_numpy(values: ArrayLike, dtype: type = np.float64) -> np.ndarray:
    if isinstance(values, Tensor):
        values = values.detach().cpu()
        if values.is_floating_point():
            values = values.double()
        values = values.numpy()
    return np.asarray(values, dtype=dtype).reshape(-1)


def _tie_averaged_ranks(run_starts: np.ndarray) -> np.ndarray:
    """1-based average rank of every position of a sorted array.

    ``run_starts`` is a boolean mask over the sorted positions, True where a run of equal keys
    begins (always at 0); every position of a run gets the run's mean rank.
    """
    start_positions = np.flatnonzero(run_starts)
    run_lengths = np.diff(np.append(start_positions, len(run_starts)))
    run_mean_rank = start_positions + (run_lengths + 1) / 2.0
    return np.repeat(run_mean_rank, run_lengths)


def auc(labels: ArrayLike, scores: ArrayLike) -> float:
    """ROC AUC from the Mann-Whitney U statistic; tied scores get their average rank.

    Equals ``sklearn.metrics.roc_auc_score``. NaN when only one class is present.
    """
    positive = _to_numpy(labels) > 0.5
    score = _to_numpy(scores)
    num_pos = int(positive.sum())
    num_neg = len(positive) - num_pos
    if num_pos == 0 or num_neg == 0:
        return float("nan")
    order = np.argsort(score, kind="stable")
    sorted_scores = score[order]
    run_starts = np.empty(len(score), dtype=bool)
    run_starts[0] = True
    run_starts[1:] = sorted_scores[1:] != sorted_scores[:-1]
    ranks = _tie_averaged_ranks(run_starts)
    positive_rank_sum = ranks[positive[order]].sum()
    u_statistic = positive_rank_sum - num_pos * (num_pos + 1) / 2.0
    return float(u_statistic / (num_pos * num_neg))


def logloss(labels: ArrayLike, probs: ArrayLike, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy, probabilities clipped to ``[eps, 1 - eps]``."""
    label = _to_numpy(labels)
    prob = np.clip(_to_numpy(probs), eps, 1.0 - eps)
    return float(-np.mean(label * np.log(prob) + (1.0 - label) * np.log1p(-prob)))


def group_aucs(labels: ArrayLike, scores: ArrayLike, groups: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """AUC and row count of every group that has both classes.

    Rows are sorted by (group, score) once; tie-averaged ranks within each group and the
    per-group Mann-Whitney U come from segment sums. Groups with a single class are dropped.
    Returns ``(aucs, sizes)``, one entry per kept group, in ascending group order.
    """
    positive = _to_numpy(labels) > 0.5
    score = _to_numpy(scores)
    group = groups.detach().cpu().numpy() if isinstance(groups, Tensor) else np.asarray(groups)
    group = group.reshape(-1)
    n = len(score)
    if n == 0:
        return np.empty(0), np.empty(0)
    order = np.lexsort((score, group))
    sorted_scores, sorted_groups, sorted_positive = score[order], group[order], positive[order]

    group_starts = np.empty(n, dtype=bool)
    group_starts[0] = True
    group_starts[1:] = sorted_groups[1:] != sorted_groups[:-1]
    run_starts = group_starts.copy()
    run_starts[1:] |= sorted_scores[1:] != sorted_scores[:-1]

    group_index = np.cumsum(group_starts) - 1
    group_offsets = np.flatnonzero(group_starts)
    ranks_in_group = _tie_averaged_ranks(run_starts) - group_offsets[group_index]

    sizes = np.bincount(group_index).astype(np.float64)
    num_pos = np.bincount(group_index, weights=sorted_positive.astype(np.float64))
    positive_rank_sum = np.bincount(group_index, weights=ranks_in_group * sorted_positive)
    num_neg = sizes - num_pos
    kept = (num_pos > 0) & (num_neg > 0)
    u_statistic = positive_rank_sum[kept] - num_pos[kept] * (num_pos[kept] + 1) / 2.0
    return u_statistic / (num_pos[kept] * num_neg[kept]), sizes[kept]


def gauc(labels: ArrayLike, scores: ArrayLike, groups: ArrayLike) -> float:
    """Group AUC: per-group AUC weighted by group row count; single-class groups are skipped.

    NaN when no group has both classes.
    """
    aucs, sizes = group_aucs(labels, scores, groups)
    if len(aucs) == 0:
        return float("nan")
    return float((aucs * sizes).sum() / sizes.sum())


def uauc(labels: ArrayLike, scores: ArrayLike, groups: ArrayLike) -> float:
    """Unweighted mean of per-group AUC; single-class groups are skipped.

    NaN when no group has both classes.
    """
    aucs, _ = group_aucs(labels, scores, groups)
    if len(aucs) == 0:
        return float("nan")
    return float(aucs.mean())


def _rank_metrics(ranks: Tensor, ks: Sequence[int]) -> dict[str, float]:
    """Recall, NDCG and hit rate at each K, and MRR, for one relevant item per row."""
    ranks = ranks.double()
    gains = 1.0 / torch.log2(ranks + 2.0)
    metrics: dict[str, float] = {}
    for k in ks:
        hit = ranks < k
        hit_rate = hit.double().mean().item()
        metrics[f"recall@{k}"] = hit_rate
        metrics[f"ndcg@{k}"] = torch.where(hit, gains, 0.0).mean().item()
        metrics[f"hr@{k}"] = hit_rate
    metrics["mrr"] = (1.0 / (ranks + 1.0)).mean().item()
    return metrics


@torch.inference_mode()
def full_ranking_metrics(
    user_vectors: Tensor,
    item_vectors: Tensor,
    targets: Tensor,
    exclude_ptr: Tensor | None = None,
    exclude_idx: Tensor | None = None,
    ks: Sequence[int] = (10, 20, 50),
    batch_size: int = 1024,
    excluded_item_ids: Sequence[int] = (),
) -> dict[str, float]:
    """Leave-one-out retrieval metrics, each user's target ranked against the whole corpus.

    Scores are ``user_vectors @ item_vectors.T`` ([U, D] x [I, D]). For user ``u`` the items
    ``exclude_idx[exclude_ptr[u]:exclude_ptr[u + 1]]`` (CSR, e.g. training items) and every item of
    ``excluded_item_ids`` (e.g. padding and OOV ids) are never ranked; the target itself is always
    ranked, even when listed.

    The target's 0-based rank is the number of ranked items with a strictly greater score plus
    the number of other ranked items with an equal score and a lower item index: the position a
    stable sort by (descending score, ascending item index) gives it.

    Returns ``recall@K``, ``ndcg@K`` and ``hr@K`` for each K (with one target, recall equals hit
    rate), and ``mrr`` over the full ranking.
    """
    device = item_vectors.device
    items = item_vectors.float()
    num_users, num_items = user_vectors.shape[0], items.shape[0]
    if num_items > _MAX_EXACT_FLOAT32_COUNT:
        raise ValueError(f"at most {_MAX_EXACT_FLOAT32_COUNT} items can be ranked, got {num_items}")
    targets = torch.as_tensor(targets, dtype=torch.long, device=device)
    item_ids = torch.arange(num_items, device=device)
    always_excluded = torch.as_tensor(list(excluded_item_ids), dtype=torch.long, device=device)
    if exclude_ptr is not None:
        exclude_ptr = torch.as_tensor(exclude_ptr, dtype=torch.long, device=device)
        exclude_idx = torch.as_tensor(exclude_idx, dtype=torch.long, device=device)

    # Comparisons are written as float32 0/1 and summed in float32: much faster than bool
    # reductions, and exact since every partial count stays below 2**24.
    scores_buffer = torch.empty(min(batch_size, num_users), num_items, device=device)
    indicator_buffer = torch.empty_like(scores_buffer)
    ranks = []
    for start in range(0, num_users, batch_size):
        stop = min(start + batch_size, num_users)
        batch_users = user_vectors[start:stop].to(device, torch.float32)
        scores = torch.mm(batch_users, items.T, out=scores_buffer[: stop - start])  # [B, I]
        indicator = indicator_buffer[: stop - start]
        target = targets[start:stop, None]  # [B, 1]
        target_score = scores.gather(1, target)  # [B, 1]

        scores[:, always_excluded] = float("-inf")
        if exclude_ptr is not None:
            row_lengths = exclude_ptr[start + 1 : stop + 1] - exclude_ptr[start:stop]
            rows = torch.repeat_interleave(torch.arange(stop - start, device=device), row_lengths)
            columns = exclude_idx[exclude_ptr[start] : exclude_ptr[stop]]
            scores[rows, columns] = float("-inf")
        scores.scatter_(1, target, target_score)

        rank = torch.gt(scores, target_score, out=indicator).sum(1)
        equal = torch.eq(scores, target_score, out=indicator)
        tied_rows = (equal.sum(1) > 1).nonzero().squeeze(1)  # the target always equals itself
        earlier = item_ids < target[tied_rows]  # [T, I]
        rank[tied_rows] += (equal[tied_rows] * earlier).sum(1)
        ranks.append(rank.long())
    return _rank_metrics(torch.cat(ranks), ks)


@torch.inference_mode()
def sampled_ranking_metrics(
    pos_scores: ArrayLike, neg_scores: ArrayLike, ks: Sequence[int] = (10, 20, 50)
) -> dict[str, float]:
    """Sampled-protocol retrieval metrics: each positive ranked among itself and N negatives.

    ``pos_scores`` is [U], ``neg_scores`` is [U, N]. Ties are pessimistic: the 0-based rank is the
    number of negatives scoring greater than or equal to the positive. Same keys as
    :func:`full_ranking_metrics`.
    """
    positive = torch.as_tensor(pos_scores).reshape(-1, 1)
    negative = torch.as_tensor(neg_scores)
    ranks = (negative >= positive).sum(1)
    return _rank_metrics(ranks, ks)


def classification_report(
    labels: Mapping[str, ArrayLike],
    probs: Mapping[str, ArrayLike],
    groups: ArrayLike | None = None,
    rows: Mapping[str, ArrayLike] | None = None,
) -> dict[str, float]:
    """``<label>_auc`` and ``<label>_logloss`` for every label, plus ``<label>_gauc`` with groups.

    ``rows`` optionally restricts a label to the rows where its boolean mask is true (e.g. a
    post-click conversion is scored on clicked rows only); other labels use every row.
    """
    report: dict[str, float] = {}
    masks = rows or {}
    for name, label in labels.items():
        label_, prob, group = _to_numpy(label), _to_numpy(probs[name]), groups
        if name in masks:
            keep = _to_numpy(masks[name], dtype=bool)
            label_, prob = label_[keep], prob[keep]
            if groups is not None:
                group = _to_numpy(groups, dtype=np.int64)[keep]
        report[f"{name}_auc"] = auc(label_, prob)
        report[f"{name}_logloss"] = logloss(label_, prob)
        if groups is not None:
            report[f"{name}_gauc"] = gauc(label_, prob, group)
    return report


# --- funnel (exposure -> click -> conversion) metrics ------------------------------------------
def cvr_auc(click: ArrayLike, conversion: ArrayLike, p_cvr: ArrayLike) -> float:
    """Post-click CVR AUC: the conversion label against pCVR on the clicked rows only."""
    clicked = _to_numpy(click) > 0.5
    return auc(_to_numpy(conversion)[clicked], _to_numpy(p_cvr)[clicked])


def ctcvr_auc(click: ArrayLike, conversion: ArrayLike, p_ctcvr: ArrayLike) -> float:
    """CTCVR AUC over every exposure, label click * conversion."""
    return auc(_to_numpy(click) * _to_numpy(conversion), p_ctcvr)


def entire_space_cvr_report(
    click: ArrayLike, would_convert: ArrayLike, true_cvr: ArrayLike, p_cvr: ArrayLike
) -> dict[str, float]:
    """CVR quality over the whole exposure space, where the truth of every exposure is known.

    ``would_convert`` is the conversion each exposure would have had if clicked (observed only on
    clicked rows in a real log), ``true_cvr`` its true probability, ``p_cvr`` the model's pCVR.

    - ``es_cvr_auc``: AUC of pCVR against ``would_convert`` over all exposures;
    - ``es_cvr_auc_unclicked``: the same on the unclicked exposures only;
    - ``es_cvr_bayes_auc``: AUC of ``true_cvr`` itself, the ceiling a model can approach;
    - ``es_cvr_logloss``: LogLoss of pCVR against ``would_convert`` over all exposures;
    - ``unclicked_pred_cvr``, ``unclicked_true_cvr``: mean pCVR and mean true CVR on the
      unclicked exposures; ``unclicked_calibration`` is their ratio (1 = calibrated).
    """
    unclicked = _to_numpy(click) <= 0.5
    target, truth, pred = _to_numpy(would_convert), _to_numpy(true_cvr), _to_numpy(p_cvr)
    pred_mean = float(pred[unclicked].mean()) if unclicked.any() else float("nan")
    true_mean = float(truth[unclicked].mean()) if unclicked.any() else float("nan")
    return {
        "es_cvr_auc": auc(target, pred),
        "es_cvr_auc_unclicked": auc(target[unclicked], pred[unclicked]),
        "es_cvr_bayes_auc": auc(target, truth),
        "es_cvr_logloss": logloss(target, pred),
        "unclicked_pred_cvr": pred_mean,
        "unclicked_true_cvr": true_mean,
        "unclicked_calibration": pred_mean / true_mean if true_mean > 0 else float("nan"),
    }
