"""Evaluators are chosen by the model's declared capability and score what they say."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss, roc_auc_score

from recforge.data.prepare import prepare
from recforge.data.sources import load_source
from recforge.data.splits import SplitConfig
from recforge.evaluate.evaluators import FullRanking, FunnelEvaluator, Pointwise, evaluator_for
from recforge.models import build_model

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    raw = load_source("synthetic", n_rows=4000, n_users=100, n_items=60, history_len=5)
    return prepare(raw, tmp_path_factory.mktemp("s") / "store", SplitConfig())


@pytest.mark.parametrize("name, kind", [("lr", Pointwise), ("esmm", FunnelEvaluator), ("mmoe", FunnelEvaluator), ("two_tower", FullRanking)])
def test_evaluator_follows_the_declared_capability(store, name, kind):
    assert isinstance(evaluator_for(build_model(name, store.schema, {}), store), kind)


def test_mmoe_without_both_funnel_labels_is_scored_pointwise(store):
    assert isinstance(evaluator_for(build_model("mmoe", store.schema, {"labels": ["click"]}), store), Pointwise)


def test_funnel_scores_conversion_on_clicked_rows_and_ctcvr_on_all(store):
    torch.manual_seed(0)
    model = build_model("esmm", store.schema, {}).eval()
    view = store.split("test")
    with torch.inference_mode():
        metrics = FunnelEvaluator(batch_size=500)(model, view)
        probs = model.predict(model(view.take(np.arange(len(view)))))
    click, conversion = view.column("click").astype(float), view.column("conversion").astype(float)
    clicked = click > 0.5
    assert metrics["conversion_auc"] == pytest.approx(roc_auc_score(conversion[clicked], probs["conversion"].numpy()[clicked]), abs=1e-9)
    assert metrics["ctcvr_auc"] == pytest.approx(roc_auc_score(click * conversion, probs["ctcvr"].numpy()), abs=1e-9)
    assert metrics["click_logloss"] == pytest.approx(log_loss(click, probs["click"].numpy().astype(np.float64)), abs=1e-6)
    # the pointwise evaluator would score the conversion on every row: a different number
    pointwise = Pointwise(batch_size=500)(model, view)
    assert pointwise["conversion_auc"] != metrics["conversion_auc"] and "ctcvr_auc" not in pointwise


# --- candidate ranking of a ranker ------------------------------------------------------------------
def _genre_store(tmp_path):
    """Users rate items whose genre is the item id mod 4; leave-one-out by time."""
    import polars as pl

    from recforge.data.schema import Feature, Schema
    from recforge.data.sources import RawDataset

    rng = np.random.default_rng(0)
    n = 3000
    frame = pl.DataFrame({"user_id": rng.integers(0, 60, n), "item_id": rng.integers(0, 150, n), "t": np.arange(n),
                          "click": np.ones(n, dtype=np.int8)}).with_columns(genre=pl.col("item_id") % 4)  # fmt: skip
    schema = Schema(features=[Feature(name="user_id", kind="categorical"), Feature(name="item_id", kind="categorical"),
                              Feature(name="genre", kind="categorical"),
                              Feature(name="hist_item_id", kind="sequence", timeline="item_id", max_len=5)],
                    labels=["click"], user="user_id", time="t")  # fmt: skip
    return prepare(RawDataset(frame, schema, "memory"), tmp_path / "s", SplitConfig(kind="leave_one_out"))


def test_candidate_ranking_scores_each_candidate_as_its_own_row(tmp_path):
    from recforge.evaluate.evaluators import CandidateRanking
    from recforge.evaluate.metrics import sampled_ranking_metrics

    store = _genre_store(tmp_path)
    torch.manual_seed(0)
    model = build_model("din", store.schema, {"embedding_dim": 4, "hidden": [8], "attention_hidden": [4]}).eval()
    evaluator = CandidateRanking(store, item_features=["genre"], negatives=20, seed=3, batch_rows=7)
    view = store.split("test")
    rows, items = evaluator.candidates_of(view)
    assert items.shape == (len(view), 21) and np.array_equal(items[:, 0], view.column("item_id"))
    train = store.split("train")
    seen = set(zip(train.column("user_id").tolist(), train.column("item_id").tolist()))
    users = view.column("user_id")[rows]
    for r in range(len(rows)):  # negatives: distinct, never the target or an item the user had in train
        negs = items[r, 1:].tolist()
        assert len(set(negs)) == 20 and items[r, 0] not in negs and not any((users[r], i) in seen for i in negs)
    assert np.array_equal(CandidateRanking(store, negatives=20, seed=3).candidates_of(view)[1], items)  # fixed by the seed
    genre_of = store.item_features("item_id", ["genre"])["genre"]
    naive = np.zeros(items.shape, dtype=np.float32)  # reference: one batch per candidate, item and genre set by hand
    with torch.inference_mode():
        for c in range(items.shape[1]):
            batch = view.take(rows)
            batch.categorical[:, 1] = torch.from_numpy(items[:, c])
            batch.categorical[:, 2] = torch.from_numpy(genre_of[items[:, c]])
            naive[:, c] = model.predict(model(batch))["click"].numpy()
        got = evaluator(model, view)
    expected = sampled_ranking_metrics(torch.from_numpy(naive[:, 0]), torch.from_numpy(naive[:, 1:]), ks=(1, 5, 10, 50))
    for key in ("hr@1", "hr@5", "hr@10", "ndcg@5", "ndcg@10", "mrr"):
        assert got[key] == pytest.approx(expected[key], abs=1e-6), key
    assert got["ranked_rows"] == len(view) and 0 <= got["popular_mrr"] <= 1
