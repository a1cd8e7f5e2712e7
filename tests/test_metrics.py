import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import log_loss, roc_auc_score

from recforge.evaluate.metrics import (
    auc,
    classification_report,
    full_ranking_metrics,
    gauc,
    group_aucs,
    logloss,
    sampled_ranking_metrics,
    uauc,
)


def naive_group_aucs(labels, scores, groups):
    aucs, sizes = [], []
    for g in np.unique(groups):
        rows = groups == g
        if len(np.unique(labels[rows])) == 2:
            aucs.append(roc_auc_score(labels[rows], scores[rows]))
            sizes.append(rows.sum())
    return np.array(aucs), np.array(sizes)


def naive_rank_metrics(ranks, ks):
    metrics = {}
    for k in ks:
        metrics[f"recall@{k}"] = sum(r < k for r in ranks) / len(ranks)
        metrics[f"ndcg@{k}"] = sum(1 / math.log2(r + 2) for r in ranks if r < k) / len(ranks)
        metrics[f"hr@{k}"] = metrics[f"recall@{k}"]
    metrics["mrr"] = sum(1 / (r + 1) for r in ranks) / len(ranks)
    return metrics


def naive_full_ranks(users, items, targets, excluded_per_user, always_excluded):
    ranks = []
    for u, target in enumerate(targets.tolist()):
        scores = (users[u] @ items.T).tolist()
        excluded = (set(excluded_per_user[u]) | set(always_excluded)) - {target}
        ranked = sorted((j for j in range(len(items)) if j not in excluded), key=lambda j: (-scores[j], j))
        ranks.append(ranked.index(target))
    return ranks


def to_csr(lists):
    ptr = torch.tensor([0] + [len(x) for x in lists]).cumsum(0)
    idx = torch.tensor([j for x in lists for j in x], dtype=torch.long)
    return ptr, idx


def assert_metrics_close(actual, expected):
    assert actual.keys() == expected.keys()
    for key in expected:
        assert actual[key] == pytest.approx(expected[key], abs=1e-6), key


def test_auc_matches_sklearn_with_heavy_ties():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 5000)
    scores = np.round(rng.random(5000) * 0.5 + labels * 0.2, 1)
    expected = roc_auc_score(labels, scores)
    assert auc(labels, scores) == pytest.approx(expected, abs=1e-9)
    as_tensors = torch.from_numpy(labels).float(), torch.from_numpy(scores).float()
    assert auc(*as_tensors) == pytest.approx(expected, abs=1e-6)


def test_auc_of_one_class_is_nan():
    assert math.isnan(auc(np.ones(5), np.arange(5.0)))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.integers(-3, 3)), min_size=2, max_size=40))
def test_auc_equals_sklearn_on_small_tied_inputs(rows):
    labels = np.array([r[0] for r in rows])
    scores = np.array([r[1] for r in rows], dtype=float)
    if len(np.unique(labels)) < 2:
        assert math.isnan(auc(labels, scores))
    else:
        assert auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-9)


def test_logloss_matches_sklearn_with_clipping():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 1000)
    probs = rng.random(1000)
    probs[:10] = 0.0
    probs[10:20] = 1.0
    eps = 1e-7
    expected = log_loss(labels, np.clip(probs, eps, 1 - eps))
    assert logloss(labels, probs, eps=eps) == pytest.approx(expected, abs=1e-9)
    assert logloss(torch.from_numpy(labels), torch.from_numpy(probs)) == pytest.approx(expected, abs=1e-9)


def test_gauc_and_uauc_match_per_group_sklearn():
    rng = np.random.default_rng(2)
    n = 4000
    groups = rng.choice(rng.integers(0, 10**9, 150), n)  # sparse, unsorted ids
    labels = rng.integers(0, 2, n)
    labels[np.isin(groups, np.unique(groups)[:20])] = 1  # one-class groups are skipped
    scores = np.round(rng.random(n) + 0.3 * labels, 1)

    aucs, sizes = naive_group_aucs(labels, scores, groups)
    actual_aucs, actual_sizes = group_aucs(labels, scores, groups)
    np.testing.assert_allclose(actual_aucs, aucs, atol=1e-9)
    np.testing.assert_array_equal(actual_sizes, sizes)
    assert gauc(labels, scores, groups) == pytest.approx((aucs * sizes).sum() / sizes.sum(), abs=1e-9)
    assert uauc(labels, scores, groups) == pytest.approx(aucs.mean(), abs=1e-9)
    assert gauc(torch.from_numpy(labels), torch.from_numpy(scores), torch.from_numpy(groups)) == pytest.approx(
        gauc(labels, scores, groups), abs=1e-12
    )


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 2), st.integers(0, 3)), min_size=1, max_size=40))
def test_gauc_equals_naive_on_small_tied_inputs(rows):
    labels, scores, groups = (np.array(column) for column in zip(*rows))
    aucs, sizes = naive_group_aucs(labels, scores.astype(float), groups)
    if len(aucs) == 0:
        assert math.isnan(gauc(labels, scores, groups))
        assert math.isnan(uauc(labels, scores, groups))
    else:
        assert gauc(labels, scores, groups) == pytest.approx((aucs * sizes).sum() / sizes.sum(), abs=1e-9)
        assert uauc(labels, scores, groups) == pytest.approx(aucs.mean(), abs=1e-9)


@pytest.mark.parametrize("batch_size", [7, 1024])
def test_full_ranking_matches_naive_sort_with_exclusions_and_ties(batch_size):
    generator = torch.Generator().manual_seed(3)
    num_users, num_items = 40, 30
    # Small integer vectors: exact dot products with many ties.
    users = torch.randint(-2, 3, (num_users, 4), generator=generator).float()
    items = torch.randint(-2, 3, (num_items, 4), generator=generator).float()
    targets = torch.randint(2, num_items, (num_users,), generator=generator)
    targets[0] = 1  # a target among the always-excluded ids is still ranked
    lengths = torch.randint(0, 8, (num_users,), generator=generator).tolist()
    excluded_per_user = [torch.randint(0, num_items, (n,), generator=generator).tolist() for n in lengths]
    for u in range(0, num_users, 3):
        excluded_per_user[u].append(int(targets[u]))  # the target in its own exclusion list
    ptr, idx = to_csr(excluded_per_user)
    ks = (1, 5, 10)

    actual = full_ranking_metrics(
        users, items, targets, ptr, idx, ks=ks, batch_size=batch_size, excluded_item_ids=(0, 1)
    )
    ranks = naive_full_ranks(users.numpy(), items.numpy(), targets, excluded_per_user, (0, 1))
    assert_metrics_close(actual, naive_rank_metrics(ranks, ks))


def test_full_ranking_breaks_ties_by_item_index():
    users, items = torch.zeros(3, 2), torch.zeros(6, 2)  # every score ties
    targets = torch.tensor([2, 5, 3])
    ptr, idx = to_csr([[0, 1], [2, 5], []])
    # ranked items with a lower index: user 0 -> none; user 1 -> 0, 1, 3, 4; user 2 -> 0, 1, 2
    ranks = [0, 4, 3]
    actual = full_ranking_metrics(users, items, targets, ptr, idx, ks=(1, 4))
    assert_metrics_close(actual, naive_rank_metrics(ranks, (1, 4)))


def test_full_ranking_without_exclusions():
    generator = torch.Generator().manual_seed(4)
    users = torch.randint(-2, 3, (10, 3), generator=generator).float()
    items = torch.randint(-2, 3, (12, 3), generator=generator).float()
    targets = torch.randint(0, 12, (10,), generator=generator)
    ranks = naive_full_ranks(users.numpy(), items.numpy(), targets, [[] for _ in range(10)], ())
    assert_metrics_close(full_ranking_metrics(users, items, targets, ks=(3,)), naive_rank_metrics(ranks, (3,)))


def test_sampled_ranking_counts_ties_against_the_positive():
    pos_scores = torch.tensor([3.0, 1.0, 0.5])
    neg_scores = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [0.5, 0.6, 0.1]])
    # ranks: 1 (one tie), 0, 2 (one tie, one greater)
    expected = {
        "recall@1": 1 / 3,
        "ndcg@1": 1 / 3,
        "hr@1": 1 / 3,
        "recall@2": 2 / 3,
        "ndcg@2": (1 + 1 / math.log2(3)) / 3,
        "hr@2": 2 / 3,
        "mrr": (1 / 2 + 1 + 1 / 3) / 3,
    }
    assert_metrics_close(sampled_ranking_metrics(pos_scores, neg_scores, ks=(1, 2)), expected)
    assert_metrics_close(sampled_ranking_metrics(pos_scores.numpy(), neg_scores.numpy(), ks=(1, 2)), expected)


def test_classification_report():
    rng = np.random.default_rng(5)
    groups = rng.integers(0, 20, 500)
    labels = {"click": rng.integers(0, 2, 500), "like": rng.integers(0, 2, 500)}
    probs = {"click": rng.random(500), "like": rng.random(500)}
    report = classification_report(labels, probs, groups)
    assert set(report) == {f"{t}_{m}" for t in labels for m in ("auc", "logloss", "gauc")}
    assert report["like_auc"] == auc(labels["like"], probs["like"])
    assert report["click_logloss"] == logloss(labels["click"], probs["click"])
    assert report["click_gauc"] == gauc(labels["click"], probs["click"], groups)
    assert set(classification_report(labels, probs)) == {f"{t}_{m}" for t in labels for m in ("auc", "logloss")}
