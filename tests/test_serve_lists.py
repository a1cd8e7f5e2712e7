"""Rows whose history holds a list per event (the events' query tokens), encoded for the scorer as
the training store encodes them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recforge.data.prepare import Fitted, prepare, timeline_view
from recforge.data.schema import OOV
from recforge.data.sources import lifelong_simulator
from recforge.data.splits import SplitConfig
from recforge.models import build_model
from recforge.serve.encode import RowEncoder, RowError

pytestmark = pytest.mark.usefixtures("single_thread")

OPTIONS = {"n_users": 30, "min_events": 40, "max_events": 200, "n_items": 400, "n_clusters": 10, "interests_per_user": 2,
           "history_len": 12, "seed": 3}  # fmt: skip


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    raw = lifelong_simulator.generate(**OPTIONS)
    store = prepare(raw, tmp_path_factory.mktemp("lists") / "store", SplitConfig(kind="random", ratios=(0.8, 0.1, 0.1), seed=0))
    view = store.split("test")
    picked = np.arange(0, len(view), 7)
    order, _, _ = timeline_view(raw.frame, "user_id", "timestamp", np.ones(raw.frame.height, dtype=bool))
    items, queries = raw.frame["item_id"].to_numpy()[order], raw.frame["query"].to_list()
    queries = [queries[i] for i in order]  # the timeline's queries, as raw tokens
    rows = raw.frame[view.row[picked]].select("user_id", "item_id", "query").to_dicts()
    for row, at in zip(rows, picked):
        start, end = int(view.hist_start[at]), int(view.hist_end[at])
        row["hist_item_id"], row["hist_query"] = items[start:end].tolist(), queries[start:end]
    return store, view, picked, rows


def test_list_histories_encode_as_the_training_store(world):
    store, view, picked, rows = world
    assert any(any(q for q in row["hist_query"]) for row in rows) and any(len(row["hist_query"]) > 12 for row in rows)
    batch, oov = RowEncoder(Fitted.load(store.path)).encode(rows)
    expected = view.take(picked)
    assert batch.sequences["hist_query"].shape == (len(rows), 12, lifelong_simulator.QUERY_LEN)
    for name in ("query", "hist_item_id", "hist_query"):
        assert torch.equal(batch.sequences[name], expected.sequences[name]), name
    assert torch.equal(batch.categorical, expected.categorical)
    assert oov["hist_query"] == int((batch.sequences["hist_query"] == OOV).sum())
    torch.manual_seed(0)
    model = build_model("seminar", store.schema, {"embedding_dim": 8, "top_k": 4, "heads": 2, "text": None, "hidden": [8]}, store=store).eval()
    with torch.inference_mode():
        assert torch.equal(model(batch)["click"], model(expected)["click"])  # the scorer sees the training rows


def test_a_list_history_must_hold_one_list_per_event(world):
    store, _, _, rows = world
    encoder = RowEncoder(Fitted.load(store.path))
    row = next(row for row in rows if row["hist_item_id"])
    with pytest.raises(RowError) as err:
        encoder.encode([row, row | {"hist_query": row["hist_query"][1:]}])
    n = len(row["hist_item_id"])
    assert err.value.problems == [((1, "hist_query"), f"{n - 1} events, but hist_item_id holds {n}: one list of ids per event of hist_item_id")]
    with pytest.raises(RowError) as err:
        encoder.encode([row | {"hist_query": [[]] * (n - 1) + ["7"]}])
    assert err.value.problems == [((0, "hist_query", n - 1), "expected a list of ids (the event's), got a string")]
    with pytest.raises(RowError) as err:
        encoder.encode([row | {"hist_query": [[]] * (n - 1) + [[1.5]]}])
    assert err.value.problems == [((0, "hist_query", n - 1, 0), "expected an id (a string or an integer), got a float")]
    assert "one list of ids per event" in encoder.fields["hist_query"]
