"""Two-stage lifelong rankers (SIM hard / soft, ETA, TWIN, QIN): each GSU against a naive
selection, the ESU against its formula, and each model learning a rule only the searched events show."""

from __future__ import annotations

import pytest
import torch
from sklearn.metrics import roc_auc_score

from recforge.data.batch import Batch
from recforge.errors import ModelConfigError
from recforge.models import build_model
from recforge.models.lifelong.search import TargetESU, gather_events, top_events
from tests.test_seminar import GENRE, L, planted

pytestmark = pytest.mark.usefixtures("single_thread")
SMALL = {"embedding_dim": 16, "heads": 2, "top_k": 10, "hidden": [32]}


def test_top_events_are_the_best_real_events_and_mark_the_missing():
    scores = torch.tensor([[0.5, 2.0, -1.0, 3.0], [1.0, 9.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    index, valid = top_events(scores, mask, 2)
    assert index[0].tolist() == [1, 0] and valid[0].tolist() == [True, True]  # the pad (3.0) is never chosen
    assert index[1, 0].item() == 0 and valid[1].tolist() == [True, False]
    values = torch.arange(2 * 4 * 3).view(2, 4, 3)
    assert torch.equal(gather_events(values, index), torch.stack([values[b, index[b]] for b in range(2)]))


def test_target_esu_equals_a_per_head_softmax():
    torch.manual_seed(0)
    esu = TargetESU(8, 2)
    target, events = torch.randn(3, 8), torch.randn(3, 5, 8)
    valid = torch.tensor([[True] * 5, [True, True, False, False, False], [False] * 5])
    got = esu(target, events, valid)
    heads = []
    for h in range(2):
        part = slice(4 * h, 4 * h + 4)
        q, k, v = esu.query(target)[:, part], esu.key(events)[..., part], esu.value(events)[..., part]
        s = torch.einsum("bd,bkd->bk", q, k) / 2.0
        w = torch.where(valid, s, torch.tensor(float("-inf"))).softmax(-1).nan_to_num(0.0)
        heads.append(torch.einsum("bk,bkd->bd", w, v))
    assert torch.allclose(got, esu.output(torch.cat(heads, -1)), atol=1e-6)
    assert torch.allclose(got[2], esu.output.bias, atol=1e-6)  # no event: zero heads


@pytest.fixture(scope="module")
def schema():
    from tests.test_seminar import schema as make

    return make.__wrapped__()


def test_sim_hard_keeps_the_last_events_of_the_targets_attribute(schema):
    model = build_model("sim_hard", schema, {**SMALL, "attribute": "genre", "top_k": 3}, side={"attribute": GENRE.clone()})
    batch = planted(20, seed=9)
    history = model.embedding.sequence(batch, "hist_item_id")
    index, valid = model.select(batch, None, history, batch.sequences["hist_item_id"] != 0)
    for b in range(20):
        items = batch.sequences["hist_item_id"][b]
        same = [l for l in range(L) if items[l] != 0 and GENRE[items[l]] == GENRE[batch.categorical[b, 1]]]
        assert sorted(index[b][valid[b]].tolist()) == same[-3:]


def test_eta_scores_events_by_agreeing_signature_bits(schema):
    model = build_model("eta", schema, {**SMALL, "hash_bits": 16})
    target, history = torch.randn(4, 16), torch.randn(4, 6, 16)
    index, _ = model.select(None, target, history, torch.ones(4, 6, dtype=torch.bool))
    t_bits, h_bits = (target @ model.planes > 0), (history @ model.planes > 0)
    agree = torch.tensor([[int((h_bits[b, l] == t_bits[b]).sum()) for l in range(6)] for b in range(4)])
    assert torch.equal(agree.gather(1, index).min(1).values, agree.sort(1, descending=True).values[:, :SMALL["top_k"]].min(1).values)


def _fit(model, train: Batch, steps: int = 250) -> None:
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(5)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(train), (128,), generator=g)
        batch = Batch(categorical=train.categorical[idx], numeric=train.numeric[idx],
                      sequences={k: v[idx] for k, v in train.sequences.items()}, labels={"click": train.labels["click"][idx]})  # fmt: skip
        loss, _ = model.loss(model(batch), batch)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()


@pytest.mark.parametrize(
    ("name", "params", "side"),
    [("sim_hard", {"attribute": "genre"}, {"attribute": GENRE.clone()}), ("sim_soft", {}, None), ("eta", {}, None),
     ("twin", {}, None), ("qin", {"query_history": "hist_query"}, None)],
)  # fmt: skip
def test_each_learns_a_rule_that_only_the_searched_events_reveal(schema, name, params, side):
    train, test = planted(4000, seed=3), planted(1000, seed=4)
    torch.manual_seed(0)
    model = build_model(name, schema, {**SMALL, **params}, side=side)
    _fit(model, train)
    with torch.inference_mode():
        p = torch.sigmoid(model(test)["click"])
    auc = roc_auc_score(test.labels["click"], p)
    assert auc > 0.7


def test_mistakes_name_the_key(schema):
    with pytest.raises(ModelConfigError, match="^model.params.attribute: sim_hard searches by a categorical item field, not 'query'$"):
        build_model("sim_hard", schema, {**SMALL, "attribute": "query"}, side={"attribute": GENRE.clone()})
    with pytest.raises(ModelConfigError, match="^model.params.heads: must divide embedding_dim=16, got 3$"):
        build_model("twin", schema, {**SMALL, "heads": 3})
