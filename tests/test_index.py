"""The FAISS item index returns the inner-product top k, without excluded, padding or OOV items."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recforge.data.prepare import prepare
from recforge.data.sources import load_source
from recforge.data.splits import SplitConfig
from recforge.errors import CheckpointError, ConfigError, DataError
from recforge.evaluate.evaluators import RETRIEVAL_KS, FullRanking, seen_items
from recforge.models import build_model
from recforge.serve.index import FIRST_ITEM, ItemIndex, from_retriever
from recforge.train.optim import Optimizers

pytestmark = pytest.mark.usefixtures("single_thread")

KINDS = [("exact", {}), ("hnsw", {}), ("ivfpq", {"nlist": 64}), ("ivfpq", {"nlist": 64, "refine": 4})]


def brute_force(items: np.ndarray, users: np.ndarray, k: int, exclude: list[list[int]] | None = None):
    """Top ``k`` encoded ids and scores by numpy, padding, OOV and ``exclude`` left out."""
    scores = users @ items.T
    scores[:, :FIRST_ITEM] = -np.inf
    for row, seen in enumerate(exclude or []):
        scores[row, [i for i in seen if 0 <= i < len(items)]] = -np.inf
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return top, np.take_along_axis(scores, top, 1)


def clustered(n: int, dim: int, clusters: int, seed: int) -> np.ndarray:
    """Unit vectors around ``clusters`` random centres (fixed by seed 0), drawn with ``seed``."""
    centres = np.random.default_rng(0).standard_normal((clusters, dim))
    rng = np.random.default_rng(seed)
    vectors = centres[rng.integers(0, clusters, n)] + 0.4 * rng.standard_normal((n, dim))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def vectors():
    rng = np.random.default_rng(0)
    return rng.standard_normal((1000, 16)).astype(np.float32), rng.standard_normal((30, 16)).astype(np.float32)


def test_exact_search_is_the_brute_force_top_k(vectors):
    items, users = vectors
    ids, scores = ItemIndex.build(items, "exact").search(users, 20)
    expected_ids, expected_scores = brute_force(items, users, 20)
    assert ids.dtype == np.int64 and scores.dtype == np.float32 and ids.shape == scores.shape == (30, 20)
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind, params", KINDS)
def test_excluded_items_are_removed_and_k_items_still_returned(vectors, kind, params):
    items, users = vectors
    rng = np.random.default_rng(1)
    best, _ = brute_force(items, users, 40)
    # each user excludes some of its best items, plus padding, OOV and ids outside the vocabulary
    exclude = [[*rng.choice(best[row], rng.integers(0, 40), replace=False).tolist(), 0, 1, -5, 10**6] for row in range(len(users))]
    exclude[0] = []
    index = ItemIndex.build(items, kind, **params)
    if kind == "ivfpq":
        index.set_search_params(nprobe=1)  # too few items probed: short rows are searched again
    ids, scores = index.search(users, 30, exclude=exclude)
    assert ids.shape == (30, 30) and (ids >= FIRST_ITEM).all()
    assert all(len(set(row)) == 30 and not set(row) & set(seen) for row, seen in zip(ids.tolist(), exclude))
    assert (np.diff(scores, axis=1) <= 1e-6).all()
    if kind == "exact":
        expected_ids, expected_scores = brute_force(items, users, 30, exclude)
        np.testing.assert_array_equal(ids, expected_ids)
        np.testing.assert_allclose(scores, expected_scores, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind, params", KINDS)
def test_padding_and_oov_are_never_returned(kind, params):
    rng = np.random.default_rng(2)
    items = rng.standard_normal((300, 8)).astype(np.float32)
    users = rng.standard_normal((5, 8)).astype(np.float32)
    items[0], items[1] = 100 * users[0], 100 * users[1]  # the best scores of users 0 and 1
    ids, _ = ItemIndex.build(items, kind, **params).search(users, 298)
    assert (np.sort(ids, axis=1) == np.arange(FIRST_ITEM, 300)).all()  # every item once, no other id


def test_fewer_items_than_k_are_padded_with_minus_one():
    items = np.random.default_rng(3).standard_normal((7, 4)).astype(np.float32)  # 5 items
    ids, scores = ItemIndex.build(items).search(items[:2], 4, exclude=[[2, 3, 4], []])
    assert sorted(ids[0, :2]) == [5, 6] and (ids[0, 2:] == -1).all() and np.isneginf(scores[0, 2:]).all()
    np.testing.assert_array_equal(ids[1], brute_force(items, items[1:2], 4)[0][0])
    ids, _ = ItemIndex.build(items).search(items[:1], 8)
    assert sorted(ids[0, :5]) == [2, 3, 4, 5, 6] and (ids[0, 5:] == -1).all()


def test_hnsw_recall_at_50_against_exact():
    items, users = clustered(4000, 32, 40, seed=1), clustered(200, 32, 40, seed=2)
    exact, _ = ItemIndex.build(items, "exact").search(users, 50)
    approximate, _ = ItemIndex.build(items, "hnsw").search(users, 50)
    recall = np.mean([len(set(a) & set(b)) / 50 for a, b in zip(exact.tolist(), approximate.tolist())])
    assert recall >= 0.98


@pytest.mark.parametrize("kind, params", KINDS)
def test_save_and_load_give_identical_results(vectors, tmp_path, kind, params):
    items, users = vectors
    index = ItemIndex.build(items, kind, **params)
    if kind == "hnsw":
        index.set_search_params(ef_search=60)
    exclude = [[2, 3, int(row)] for row in range(2, 32)]
    index.save(tmp_path / "index")
    index.save(tmp_path / "index")  # a second save replaces the first
    loaded = ItemIndex.load(tmp_path / "index")
    assert (loaded.kind, loaded.params, loaded.num_items) == (kind, index.params, len(items))
    for got, expected in zip(loaded.search(users, 25, exclude), index.search(users, 25, exclude)):
        np.testing.assert_array_equal(got, expected)


def test_unreadable_or_missing_index_is_a_checkpoint_error(vectors, tmp_path):
    with pytest.raises(CheckpointError, match="no item index"):
        ItemIndex.load(tmp_path / "nothing")
    ItemIndex.build(vectors[0]).save(tmp_path / "index")
    spec = tmp_path / "index" / "index.json"
    spec.write_text(spec.read_text().replace('"num_items": 1000', '"num_items": 900'))
    with pytest.raises(CheckpointError, match="holds 998 items, index.json describes 898"):
        ItemIndex.load(tmp_path / "index")
    (tmp_path / "index" / "index.faiss").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="index.faiss: not a readable FAISS index"):
        ItemIndex.load(tmp_path / "index")


def test_bad_kinds_parameters_and_shapes_are_user_errors(vectors):
    items, users = vectors
    with pytest.raises(ConfigError, match="one of exact, hnsw, ivfpq"):
        ItemIndex.build(items, "annoy")
    with pytest.raises(ConfigError, match=r"unknown parameters \['ef'\]"):
        ItemIndex.build(items, "hnsw", ef=10)
    with pytest.raises(ConfigError, match="must divide the vector width 16"):
        ItemIndex.build(items, "ivfpq", subquantizers=5)
    with pytest.raises(ConfigError, match="training needs at least"):
        ItemIndex.build(items[:100], "ivfpq")
    with pytest.raises(ConfigError, match="not search parameters"):
        ItemIndex.build(items, "hnsw").set_search_params(m=8)
    with pytest.raises(DataError, match="must be"):
        ItemIndex.build(items[:2])
    index = ItemIndex.build(items)
    with pytest.raises(DataError, match=r"\[B, 16\]"):
        index.search(users[:, :8], 5)
    with pytest.raises(DataError, match="one list per user vector"):
        index.search(users, 5, exclude=[[2]])
    with pytest.raises(ConfigError, match="positive integer"):
        index.search(users, 0)


def test_two_tower_index_ranks_as_full_ranking(tmp_path):
    raw = load_source("synthetic", n_rows=6000, n_users=60, n_items=150, history_len=5, seed=3)
    store = prepare(raw, tmp_path / "store", SplitConfig())
    torch.manual_seed(0)
    model = build_model("two_tower", store.schema, {})
    optimizers = Optimizers(model, model.sparse_parameters())
    for batch in store.split("train").batches(256, shuffle=True):
        loss, _ = model.loss(model(batch), batch)
        optimizers.zero_grad()
        loss.backward()
        optimizers.step()
    model.eval()
    test, train = store.split("test"), store.split("train")
    targets = test.column("item_id").astype(np.int64)
    assert (targets >= FIRST_ITEM).all()  # every target is indexed (none is OOV)
    with torch.inference_mode():
        expected = FullRanking(store)(model, test)
        users = torch.cat([model.user_embedding(batch) for batch in test.batches(1024)]).numpy()
    ptr, idx = seen_items(train.column("user_id"), train.column("item_id"), test.column("user_id"))
    exclude = [[i for i in idx[ptr[r] : ptr[r + 1]] if i != targets[r]] for r in range(len(targets))]  # the target stays ranked
    ids, _ = from_retriever(model).search(users, max(RETRIEVAL_KS), exclude)
    hit = ids == targets[:, None]
    rank = np.where(hit.any(1), hit.argmax(1), max(RETRIEVAL_KS))
    for k in RETRIEVAL_KS:
        assert np.mean(rank < k) == pytest.approx(expected[f"recall@{k}"], abs=1e-12)
        assert np.mean(np.where(rank < k, 1 / np.log2(rank + 2), 0)) == pytest.approx(expected[f"ndcg@{k}"], abs=1e-9)
    assert 0 < expected["recall@10"] < expected["recall@50"] < 1
