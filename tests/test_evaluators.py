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
