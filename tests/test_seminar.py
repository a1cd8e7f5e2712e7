"""SEMINAR: the PSU losses against hand computations, the fusion, restoring the PSU tables, and
learning a planted rule through the search over a long history."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from recforge.data.batch import Batch
from recforge.data.schema import Feature, Kind, Schema
from recforge.errors import ModelConfigError
from recforge.models import build_model
from recforge.models.lifelong.seminar import alignment_loss, relevance_loss

pytestmark = pytest.mark.usefixtures("single_thread")

N_ITEMS, N_WORDS, N_GENRES, L, W = 40, 12, 5, 30, 3
V = N_ITEMS + 2  # with pad and OOV
SMALL = {"embedding_dim": 8, "heads": 2, "top_k": 5, "hidden": [16], "attributes": ["genre"], "align_chunk": 16}


def test_alignment_loss_equals_its_formula_on_three_items():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    b = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    tau = 0.5
    an = [[x / math.hypot(*v) for x in v] for v in a.tolist()]
    bn = [[x / math.hypot(*v) for x in v] for v in b.tolist()]
    dot = lambda x, y: sum(p * q for p, q in zip(x, y))  # noqa: E731
    sims = [[(dot(an[i], an[j]) + dot(bn[i], bn[j])) / (2 * tau) for j in range(3)] for i in range(3)]
    soft = [[math.exp(x) / sum(math.exp(y) for y in row) for x in row] for row in sims]  # T, row-wise
    expected = 0.0
    for forward in (True, False):  # CE(S, T) and CE(Sᵀ, Tᵀ)
        for i in range(3):
            logits = [(dot(an[i], bn[j]) if forward else dot(bn[i], an[j])) / tau for j in range(3)]
            targets = [soft[i][j] if forward else soft[j][i] for j in range(3)]
            log_norm = math.log(sum(math.exp(x) for x in logits))
            expected += -sum(t * (x - log_norm) for t, x in zip(targets, logits)) / 3 / 2
    assert alignment_loss(a, b, tau).item() == pytest.approx(expected, rel=1e-5)
    assert alignment_loss(a[:1], b[:1], tau).item() == 0.0
    # aligned channels cost less than crossed ones
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    assert alignment_loss(x, x, 0.05) < alignment_loss(x, x[torch.randperm(16)], 0.05)


def test_relevance_loss_equals_its_formula_masks_empty_queries_and_falls_when_positives_get_closer():
    q = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])  # [1, 3, 2]
    i = torch.tensor([[[1.0, 1.0], [1.0, 0.0], [0.0, 3.0]]])
    has_query = torch.tensor([[True, True, False]])
    negatives = torch.tensor([[[1, 2], [2, 0], [0, 1]]])
    tau = 0.1
    cos = lambda x, y: sum(p * r for p, r in zip(x, y)) / math.hypot(*x) / math.hypot(*y)  # noqa: E731
    expected = 0.0
    for l in (0, 1):  # event 2 has no query: not scored
        s = [cos(q[0, l].tolist(), i[0, l].tolist()) / tau] + [cos(q[0, l].tolist(), i[0, n].tolist()) / tau for n in negatives[0, l].tolist()]
        expected += -(s[0] - math.log(sum(math.exp(v) for v in s))) / 2
    assert relevance_loss(q, i, has_query, negatives, tau).item() == pytest.approx(expected, rel=1e-5)
    closer = i.clone()
    closer[0, :2] = 0.5 * closer[0, :2] + 0.5 * q[0, :2]  # positives move toward their queries
    assert relevance_loss(q, closer, has_query, negatives, tau) < relevance_loss(q, i, has_query, negatives, tau)
    assert relevance_loss(q, i, torch.zeros_like(has_query), negatives, tau).item() == 0.0


# --- a tiny (query, item) world -------------------------------------------------------------------
K = torch.arange(V) - 2  # item index k = id - 2 (pad / OOV rows unused)
GENRE = K % N_GENRES + 2  # each item's genre id
FLAG = (K // N_GENRES) % 2  # and a binary flag that its text shows


def world_schema() -> Schema:
    """Users, items with a genre and a text vector, query tokens and both histories."""
    schema = Schema(
        features=[
            Feature(name="user_id", kind=Kind.CATEGORICAL),
            Feature(name="item_id", kind=Kind.CATEGORICAL),
            Feature(name="genre", kind=Kind.CATEGORICAL),
            Feature(name="query", kind=Kind.SEQUENCE, max_len=W),
            Feature(name="hist_item_id", kind=Kind.SEQUENCE, timeline="item_id", max_len=L),
            Feature(name="hist_query", kind=Kind.SEQUENCE, timeline="query", max_len=L),
            Feature(name="item_text", kind=Kind.EMBEDDING, key="item_id", dim=6),
        ],
        labels=["click"], user="user_id", time="t",
    )  # fmt: skip
    schema.vocab_sizes = {"user_id": 52, "item_id": V, "genre": N_GENRES + 2, "query": N_WORDS + 2}
    return schema


@pytest.fixture(scope="module")
def schema() -> Schema:
    return world_schema()


@pytest.fixture(scope="module")
def side() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    text = torch.randn(V, 6, generator=g)
    text[:, 0] = 2.0 * FLAG - 1.0
    return {"text": text, "attributes.genre": GENRE.clone()}


def planted(n: int, seed: int) -> Batch:
    """Click iff the target's flag is the user's preferred flag in the target's genre, which only
    the history's events of that genre reveal (90% of them carry it): about 1 event in 5 is relevant,
    so the search stage must find them."""
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(2, V, (n,), generator=g)
    hist = torch.randint(2, V, (n, L), generator=g)
    prefer = torch.randint(0, 2, (n, 1), generator=g)
    same = GENRE[hist] == GENRE[items][:, None]  # [n, L]
    flag = torch.where(torch.rand(n, L, generator=g) < 0.9, prefer, 1 - prefer)
    relevant = (GENRE[items] - 2)[:, None] + N_GENRES * flag + 2 * N_GENRES * torch.randint(0, N_ITEMS // (2 * N_GENRES), (n, L), generator=g) + 2
    hist = torch.where(same, relevant, hist)
    hist = hist * (torch.arange(L)[None, :] >= torch.randint(0, L // 2, (n, 1), generator=g))  # 15 to 30 events
    click = (FLAG[items] == prefer[:, 0]).float()
    tokens = torch.randint(2, N_WORDS + 2, (n, L, W), generator=g) * (torch.rand(n, L, 1, generator=g) < 0.5) * (hist != 0)[..., None]
    return Batch(
        categorical=torch.stack([torch.randint(2, 52, (n,), generator=g), items, GENRE[items]], 1),
        numeric=torch.zeros(n, 0),
        sequences={"query": torch.zeros(n, W, dtype=torch.long), "hist_item_id": hist, "hist_query": tokens},
        labels={"click": click},
    )


def fit(model, train: Batch, steps: int) -> None:
    """Adam 1e-2 on batches of 128 rows drawn from ``train``; ends in eval mode."""
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


def test_fusion_is_the_global_gate_over_the_modalities_and_the_pair_mixes_in_the_query(schema, side):
    torch.manual_seed(0)
    model = build_model("seminar", schema, {**SMALL, "pretrain": True}, side=side)
    items = torch.tensor([[3, 0, 7]])
    tokens = torch.tensor([[[0, 0, 4], [0, 0, 0], [0, 0, 0]]])
    pair, channels, e_q, e_item = model.pairs(items, tokens)
    g = model.gate(model.gate_query).softmax(-1)[0]
    e_id = model.embedding.lookup(items, "item_id")
    e_txt = model.modalities.text_projection(side["text"][items])
    e_attr = model.embedding.lookup(GENRE[items], "genre")
    assert torch.allclose(e_item, g[0] * e_id + g[1] * e_txt + g[2] * e_attr, atol=1e-6)
    assert torch.allclose(e_q[0, 0], model.embedding.lookup(torch.tensor(4), "query"), atol=1e-6)
    assert torch.allclose(pair[0, 0], 0.5 * e_q[0, 0] + 0.5 * e_item[0, 0], atol=1e-6)
    assert torch.allclose(pair[0, 2], 0.5 * e_item[0, 2], atol=1e-6)  # an event without a query
    assert channels.shape == (1, 3, 3, 8)


def test_pretraining_gives_the_three_losses_and_fine_tuning_one(schema, side):
    batch = planted(64, seed=1)
    for pretrain, parts in ((True, {"next", "align", "relevance"}), (False, {"click"})):
        torch.manual_seed(0)
        model = build_model("seminar", schema, {**SMALL, "pretrain": pretrain}, side=side).train()
        loss, got = model.loss(model(batch), batch)
        assert set(got) == parts and torch.isfinite(loss)
        loss.backward()
    model.eval()
    with torch.inference_mode():
        assert set(model(batch)) == {"click"}  # evaluation scores the click only


def test_restoring_the_psu_tables_changes_the_start_of_fine_tuning(schema, side):
    torch.manual_seed(0)
    psu = build_model("seminar", schema, {**SMALL, "pretrain": True}, side=side)
    with torch.no_grad():
        for p in psu.parameters():
            p.add_(0.1)
    torch.manual_seed(1)
    fresh = build_model("seminar", schema, SMALL, side=side)
    torch.manual_seed(1)
    restored = build_model("seminar", schema, SMALL, side=side)
    restored.restore_pretrained(psu)
    state, before = restored.state_dict(), fresh.state_dict()
    assert torch.equal(state["embedding.table.weight"], psu.state_dict()["embedding.table.weight"])
    assert torch.equal(state["gate.weight"], psu.state_dict()["gate.weight"])
    assert not torch.equal(state["embedding.table.weight"], before["embedding.table.weight"])
    kept = [k for k in state if k.startswith(("mlp.", "search.", "projections."))]
    assert kept and all(torch.equal(state[k], before[k]) for k in kept)  # the new parts keep their start
    assert torch.equal(state["projections.0.weight"], torch.eye(8))
    batch = planted(32, seed=2)
    fresh.eval(), restored.eval()
    with torch.inference_mode():
        assert not torch.allclose(fresh(batch)["click"], restored(batch)["click"])


def test_seminar_learns_a_rule_that_only_the_searched_events_reveal(schema, side):
    from sklearn.metrics import roc_auc_score

    train, test = planted(4000, seed=3), planted(1000, seed=4)
    torch.manual_seed(0)
    model = build_model("seminar", schema, {**SMALL, "embedding_dim": 16, "top_k": 10}, side=side)
    fit(model, train, steps=300)
    with torch.inference_mode():
        p = torch.sigmoid(model(test)["click"])
    auc = roc_auc_score(test.labels["click"], p)
    rate = test.labels["click"].mean()
    assert auc > 0.8, auc
    assert F.binary_cross_entropy(p, test.labels["click"]) < F.binary_cross_entropy(rate.expand(len(p)), test.labels["click"])


def perturbed(model):
    """The model with every weight moved off its start (projections no longer identity)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def test_the_channel_keys_sum_to_each_event_key(schema, side):
    torch.manual_seed(0)
    model = perturbed(build_model("seminar", schema, SMALL, side=side))
    batch = planted(16, seed=6)
    items, tokens = batch.sequences["hist_item_id"], batch.sequences["hist_query"]
    pair = model.pairs(items, tokens)[0]  # [B, L, D]
    item_keys, token_keys = model.channel_keys()  # [V, M, D], [V_q, D]
    real = (tokens != 0).unsqueeze(-1)
    from_channels = item_keys[items].sum(2) + (token_keys[tokens] * real).sum(2) / real.sum(2).clamp(min=1)
    torch.testing.assert_close(from_channels, pair, rtol=1e-5, atol=1e-6)


def test_pq_search_with_lossless_codes_and_a_full_short_list_is_the_exact_search(schema, side):
    torch.manual_seed(0)
    exact = perturbed(build_model("seminar", schema, SMALL, side=side))
    pq = build_model("seminar", schema, {**SMALL, "gsu": "pq", "pq_codewords": 256, "pq_shortlist": L}, side=side)
    pq.load_state_dict(exact.state_dict())
    pq.eval()
    batch = planted(64, seed=7)
    with torch.no_grad():
        index, valid = exact.searched(batch)
        got, got_valid = pq.searched(batch)
        probe = exact.search.probe(exact.pairs(batch.categorical[:, 1:2], None)[0].squeeze(1))
        history = exact.pairs(batch.sequences["hist_item_id"], batch.sequences["hist_query"])[0]
        exact_scores = torch.einsum("bhd,bld->bhl", probe, history)
        torch.testing.assert_close(pq.approximate_scores(probe, batch), exact_scores, rtol=1e-4, atol=1e-5)
    # the same events up to ties (a history repeats items): the same scores kept
    assert torch.equal(got_valid, valid)
    kept = exact_scores.gather(-1, got).masked_fill(~valid, 0).sort(-1).values
    torch.testing.assert_close(kept, exact_scores.gather(-1, index).masked_fill(~valid, 0).sort(-1).values)
    assert torch.allclose(pq(batch)["click"], exact(batch)["click"])


def test_pq_search_with_4bit_codes_keeps_the_exact_top_k_and_follows_the_weights(schema, side):
    torch.manual_seed(0)
    model = perturbed(build_model("seminar", schema, {**SMALL, "gsu": "pq", "pq_shortlist": 10}, side=side))
    batch = planted(256, seed=8)
    with torch.no_grad():
        got, got_valid = model.searched(batch)
        model.config.gsu = "exact"
        index, valid = model.searched(batch)
        model.config.gsu = "pq"
    kept = [len(set(a[m].tolist()) & set(b[n].tolist())) for a, m, b, n in zip(got.flatten(0, 1), got_valid.flatten(0, 1), index.flatten(0, 1), valid.flatten(0, 1))]
    assert sum(kept) / valid.sum().item() > 0.95  # 0.99 (0.88 from the codes alone, no re-rank)
    codes = model.index()["item_codes"]
    assert codes.dtype == torch.uint8 and codes.shape == (V, 3 * 4) and int(codes.max()) < 16
    assert model.index() is model.index()  # built once for the same weights
    fit(model, planted(512, seed=9), steps=3)  # training changes the weights and drops the codes
    assert not torch.equal(model.index()["item_codes"], codes)


@pytest.mark.parametrize(
    ("params", "error"),
    [
        ({"heads": 0}, "^model.params.heads: must be >= 1, got 0$"),
        ({"alpha": 1.5}, r"^model.params.alpha: must be in \[0, 1\], got 1.5$"),
        ({"query_history": "query"}, "^model.params.query_history: seminar needs 'query' a list timeline"),
        ({"text": "genre"}, "^model.params.text: seminar needs 'genre' an embedding keyed by 'item_id'$"),
        ({"gsu": "fast"}, "^model.params.gsu: 'exact' or 'pq', got 'fast'$"),
        ({"pq_subspaces": 3}, "^model.params.pq_subspaces: 3 must divide embedding_dim=8$"),
        ({"pq_shortlist": 4}, r"^model.params.pq_shortlist: the short list \(4\) must hold at least top_k=5 events$"),
    ],
)
def test_mistakes_name_the_key(schema, side, params, error):
    with pytest.raises(ModelConfigError, match=error):
        build_model("seminar", schema, {**SMALL, **params}, side=side)
