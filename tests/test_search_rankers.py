"""Two-stage lifelong rankers (SIM hard / soft, ETA, TWIN, QIN): each GSU against a naive
selection, the ESU against its formula, and each model learning a rule only the searched events show."""

from __future__ import annotations

import pytest
import torch
from sklearn.metrics import roc_auc_score

from recforge.errors import ModelConfigError
from recforge.models import build_model
from tests.test_seminar import GENRE, L, fit, planted, world_schema

pytestmark = pytest.mark.usefixtures("single_thread")
SMALL = {"embedding_dim": 16, "heads": 2, "top_k": 10, "hidden": [32]}


@pytest.fixture(scope="module")
def schema():
    return world_schema()


def test_sim_hard_keeps_the_last_events_of_the_targets_attribute(schema):
    model = build_model("sim_hard", schema, {**SMALL, "attribute": "genre", "top_k": 3}, side={"attribute": GENRE.clone()})
    batch = planted(20, seed=9)
    history = model.embedding.sequence(batch, "hist_item_id")
    index, valid = model.select(batch, None, history, batch.sequences["hist_item_id"] != 0)
    for b in range(20):
        items = batch.sequences["hist_item_id"][b]
        same = [l for l in range(L) if items[l] != 0 and GENRE[items[l]] == GENRE[batch.categorical[b, 1]]]
        assert sorted(index[b][valid[b]].tolist()) == same[-3:]


def test_eta_keeps_the_events_nearest_in_hamming_distance(schema):
    model = build_model("eta", schema, {**SMALL, "hash_bits": 64, "top_k": 3})
    target, history = torch.randn(4, 16), torch.randn(4, 6, 16)
    index, valid = model.select(None, target, history, torch.ones(4, 6, dtype=torch.bool))
    t_bits, h_bits = (target @ model.hash.planes > 0), (history @ model.hash.planes > 0)
    distance = torch.tensor([[int((h_bits[b, l] != t_bits[b]).sum()) for l in range(6)] for b in range(4)])
    assert valid.all()
    assert torch.equal(distance.gather(1, index).max(1).values, distance.sort(1).values[:, 2])  # the 3 nearest


@pytest.mark.parametrize(
    ("name", "params", "side"),
    [("sim_hard", {"attribute": "genre"}, {"attribute": GENRE.clone()}), ("sim_soft", {}, None), ("eta", {}, None),
     ("twin", {}, None), ("qin", {"query": "query", "query_history": "hist_query"}, None)],
)  # fmt: skip
def test_each_learns_a_rule_that_only_the_searched_events_reveal(schema, name, params, side):
    train, test = planted(4000, seed=3), planted(1000, seed=4)
    torch.manual_seed(0)
    model = build_model(name, schema, {**SMALL, **params}, side=side)
    fit(model, train, steps=250)
    with torch.inference_mode():
        p = torch.sigmoid(model(test)["click"])
    # without the history a click is a coin flip (AUC 0.5); sim_hard searches by the very attribute the rule reads
    assert roc_auc_score(test.labels["click"], p) > (0.95 if name == "sim_hard" else 0.6)


def test_mistakes_name_the_key(schema):
    with pytest.raises(ModelConfigError, match="^model.params.attribute: sim_hard searches by a categorical item field, not 'query'$"):
        build_model("sim_hard", schema, {**SMALL, "attribute": "query"}, side={"attribute": GENRE.clone()})
    with pytest.raises(ModelConfigError, match="^model.params.hash_bits: a positive multiple of 64, got 32$"):
        build_model("eta", schema, {**SMALL, "hash_bits": 32})
