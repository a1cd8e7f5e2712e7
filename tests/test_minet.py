"""MiNet, the shared-bottom model, the per-domain loss and the study runner."""

from __future__ import annotations

import json
import math

import numpy as np
import polars as pl
import pytest
import torch

from recforge.data.prepare import prepare
from recforge.data.schema import Feature, Schema
from recforge.data.sources import RawDataset
from recforge.data.splits import SplitConfig
from recforge.models import build_model
from recforge.models.crossdomain.minet import InterestAttention, ItemAttention, masked_softmax
from recforge.nn.losses import per_domain_bce
from recforge.train.optim import Optimizers
from recforge.train.trainer import TrainConfig, Trainer
from recforge.errors import DataError

ITEM_FIELDS = ("item_id", "genre")
MINET_FIELDS = {
    "user_fields": ["user_id"],
    "item_fields": list(ITEM_FIELDS),
    "target_history": ["hist_target_item_id", "hist_target_genre"],
    "source_history": ["hist_source_item_id", "hist_source_genre"],
    "embedding_dim": 8,
    "attention_hidden": 16,
}


def two_domain_schema() -> Schema:
    features = [Feature(name=c, kind="categorical") for c in ("user_id", *ITEM_FIELDS, "domain")]
    features += [
        Feature(name=f"hist_{d}_{f}", kind="sequence", timeline=f, max_len=n, where={"domain": d, "like": 1})
        for d, n in (("target", 5), ("source", 8))
        for f in ITEM_FIELDS
    ]
    return Schema(features=features, labels=["like"], user="user_id", time="t", domain="domain")


def two_domain_frame(n_users: int = 160, per_user: int = 40, seed: int = 0) -> pl.DataFrame:
    """Each user likes one of 4 genres in both domains; the genre is not a user feature, so a
    model must read it from the histories (or learn it per user id)."""
    rng = np.random.default_rng(seed)
    n = n_users * per_user
    user = np.repeat(np.arange(n_users), per_user)
    taste = rng.integers(0, 4, n_users)[user]
    is_target = rng.random(n) < 0.35
    item = np.where(is_target, rng.integers(0, 24, n), rng.integers(24, 96, n))
    genre = item % 4
    like = ((genre == taste) ^ (rng.random(n) < 0.1)).astype(np.int8)
    frame = pl.DataFrame(
        {
            "user_id": user,
            "item_id": item,
            "genre": genre.astype(str).astype(object),
            "domain": np.where(is_target, "target", "source").astype(object),
            "t": np.tile(np.arange(per_user), n_users),
            "like": like,
        }
    )
    from_end = (
        pl.col("t").rank("ordinal", descending=True).over("user_id", "domain") - 1
    )
    split = (
        pl.when(pl.col("domain") == "source").then(pl.lit("train"))
        .when(from_end == 0).then(pl.lit("test"))
        .when(from_end == 1).then(pl.lit("valid"))
        .otherwise(pl.lit("train"))
    )  # fmt: skip
    return frame.with_columns(split=split)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    raw = RawDataset(two_domain_frame(), two_domain_schema(), "memory")
    return prepare(raw, tmp_path_factory.mktemp("two_domain") / "store", SplitConfig(kind="column"))


def fit(model, store, tmp_path, epochs: int = 3, lr: float = 0.01) -> dict:
    torch.manual_seed(0)
    config = TrainConfig(epochs=epochs, batch_size=256, lr=lr, sparse_lr=0.1, patience=None, quiet=True, num_threads=1, checkpoint_every_steps=0)
    return Trainer(model, store, config, tmp_path).fit()


# --- attention --------------------------------------------------------------------------------


@pytest.mark.parametrize("transfer_rank", [None, 3])
def test_item_attention_gives_padding_zero_weight_and_ignores_padded_values(transfer_rank):
    torch.manual_seed(0)
    attention = ItemAttention(item_dim=6, query_dim=6, user_dim=4, hidden=8, transfer_rank=transfer_rank)
    items, query, user = torch.randn(3, 5, 6), torch.randn(3, 6), torch.randn(3, 4)
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 0, 0, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    weights = attention.weights(items, query, user, mask)
    assert torch.all(weights[~mask] == 0)
    assert torch.allclose(weights.sum(1), torch.tensor([1.0, 1.0, 0.0]))
    assert torch.allclose(weights[1, 4], torch.tensor(1.0))
    pooled = attention(items, query, user, mask)
    changed = items.clone()
    changed[~mask] = torch.randn(int((~mask).sum()), 6) * 100  # anything in the padded slots
    assert torch.equal(attention(changed, query, user, mask), pooled)
    assert torch.equal(pooled[2], torch.zeros(6))  # no history: a zero interest


def test_masked_softmax_by_hand():
    scores = torch.tensor([[1.0, 2.0, 50.0]])
    weights = masked_softmax(scores, torch.tensor([[True, True, False]]))
    e = math.exp(1.0)
    assert torch.allclose(weights, torch.tensor([[1 / (1 + e), e / (1 + e), 0.0]]))


def test_interest_attention_is_exp_of_score_plus_bias():
    attention = InterestAttention(context_dim=4, num_interests=3, hidden=5, bias_init=[1.0, 0.0, 0.0])
    for layer in attention.out:
        torch.nn.init.zeros_(layer.weight)
    v = attention(torch.randn(2, 4))
    assert torch.allclose(v, torch.tensor([[math.e, 1.0, 1.0]] * 2))  # unnormalised, b_u = 1
    torch.nn.init.constant_(attention.out[1].weight, 1.0)
    context = torch.randn(1, 4)
    hidden = torch.relu(attention.hidden[1](context)).sum()
    assert torch.allclose(attention(context)[0, 1], torch.exp(hidden))


def test_per_domain_bce_by_hand():
    logit = torch.tensor([0.0, 0.0, math.log(3.0), 0.0])
    label = torch.tensor([1.0, 0.0, 1.0, 1.0])
    domain = torch.tensor([3, 3, 2, 2])
    total, parts = per_domain_bce(logit, label, domain, {3: 1.0, 2: 0.5})
    target = math.log(2.0)  # both rows at p = 1/2
    source = (math.log(4 / 3) + math.log(2.0)) / 2  # p = 3/4 and 1/2, label 1
    assert math.isclose(float(parts[3]), target, rel_tol=1e-6) and math.isclose(float(parts[2]), source, rel_tol=1e-6)
    assert math.isclose(float(total), target + 0.5 * source, rel_tol=1e-6)
    empty, _ = per_domain_bce(logit[:2], label[:2], domain[:2], {3: 1.0, 2: 1.0})  # no source rows: adds 0
    assert math.isclose(float(empty), target, rel_tol=1e-6)


# --- MiNet ------------------------------------------------------------------------------------


def test_minet_output_ignores_the_padding_row_of_the_tables(store):
    torch.manual_seed(0)
    model = build_model("minet", store.schema, MINET_FIELDS).eval()
    batch = store.split("test").take(np.arange(len(store.split("test"))))
    assert (batch.sequences["hist_target_item_id"] == 0).any()  # some histories are padded
    before = model(batch)["like"]
    with torch.no_grad():
        for vocab in ITEM_FIELDS:
            model.embedding.table.weight[model.embedding.vocab_offset[vocab]] = 5.0  # the PAD rows
    assert torch.allclose(model(batch)["like"], before)


def test_minet_scores_target_rows_with_the_target_tower_and_source_rows_with_the_auxiliary(store):
    torch.manual_seed(0)
    model = build_model("minet", store.schema, MINET_FIELDS).eval()
    train = store.split("train")
    batch = train.take(np.arange(512))
    is_target = batch.domain == store.schema.domain_id("target")
    assert is_target.any() and (~is_target).any()
    before = model(batch)["like"]
    with torch.no_grad():
        for p in model.source_tower.parameters():
            p.add_(1.0)
    after = model(batch)["like"]
    assert torch.equal(after[is_target], before[is_target]) and not torch.allclose(after[~is_target], before[~is_target])


@pytest.fixture(scope="module")
def trained(store, tmp_path_factory):
    """MiNet trained for 3 epochs on the planted data, and its training log."""
    out = tmp_path_factory.mktemp("minet_run")
    model = build_model("minet", store.schema, MINET_FIELDS)
    metrics = fit(model, store, out, epochs=3)
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return model.eval(), metrics, log


def test_minet_learns_the_planted_taste_and_beats_chance(trained):
    _, metrics, log = trained
    assert metrics["test_like_auc"] > 0.7 and metrics["valid_like_auc"] > 0.7  # chance: 0.5
    losses = [r["loss_target"] for r in log if r["event"] == "train"]
    assert losses[-1] < losses[0] - 0.05


@pytest.mark.parametrize(
    "switch", ["long_term", "short_term_source", "short_term_target", "interest_attention", "item_attention"]
)
def test_each_minet_branch_can_be_ablated(store, trained, switch):
    full = trained[0]
    torch.manual_seed(0)
    ablated = build_model("minet", store.schema, {**MINET_FIELDS, switch: False})
    kept = ablated.state_dict()
    ablated.load_state_dict({k: v for k, v in full.state_dict().items() if k in kept and v.shape == kept[k].shape}, strict=False)
    batch = store.split("valid").take(np.arange(len(store.split("valid"))))
    ablated.eval()
    with torch.no_grad():
        assert not torch.allclose(full(batch)["like"], ablated(batch)["like"], atol=1e-3)
    # the ablated model still trains: its loss on a training batch falls
    ablated.train()
    optimizer = Optimizers(ablated, ablated.sparse_parameters(), lr=0.01, weight_decay=0.0, sparse_lr=0.1, clip_norm=None)
    train = store.split("train").take(np.arange(1024))
    losses = []
    for _ in range(15):
        loss, _ = ablated.loss(ablated(train), train)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.02


def test_minet_needs_one_interest_and_a_domain_column(store):
    off = {"long_term": False, "short_term_source": False, "short_term_target": False}
    with pytest.raises(ValueError, match="at least one interest"):
        build_model("minet", store.schema, {**MINET_FIELDS, **off})
    with pytest.raises(DataError, match="domain 'ads' has no id"):
        build_model("minet", store.schema, {**MINET_FIELDS, "target_domain": "ads"})


# --- shared-bottom ----------------------------------------------------------------------------


def test_shared_bottom_routes_rows_to_their_domain_tower_and_learns(store, tmp_path):
    torch.manual_seed(0)
    model = build_model("shared_bottom", store.schema, {"embedding_dim": 8, "bottom_hidden": [32], "tower_hidden": [16]})
    batch = store.split("train").take(np.arange(512))
    is_target = batch.domain == store.schema.domain_id("target")
    model.eval()
    before = model(batch)["like"]
    with torch.no_grad():
        for p in model.towers[1].parameters():  # the source tower
            p.add_(1.0)
    after = model(batch)["like"]
    assert torch.equal(after[is_target], before[is_target]) and not torch.allclose(after[~is_target], before[~is_target])
    trained = build_model("shared_bottom", store.schema, {"embedding_dim": 8})
    assert fit(trained, store, tmp_path)["test_like_auc"] > 0.7


# --- on MovieLens-1M (real data) --------------------------------------------------------------


def test_minet_trains_on_movielens_two_domain(real_data, tmp_path):
    from recforge.data.sources import load_source

    raw = load_source("movielens-1m-two-domain", root=real_data("movielens-1m"))
    raw = RawDataset(raw.frame.filter(pl.col("user_id") <= 300), raw.schema, raw.origin)
    store = prepare(raw, tmp_path / "store", SplitConfig(kind="column"))
    assert len(store.split("valid")) == len(store.split("test")) == raw.frame.filter(pl.col("split") == "test").height
    model = build_model("minet", store.schema, {})
    torch.manual_seed(0)
    config = TrainConfig(epochs=1, batch_size=1024, lr=0.003, patience=None, quiet=True, num_threads=1, checkpoint_every_steps=0)
    metrics = Trainer(model, store, config, tmp_path / "run").fit()
    assert metrics["valid_like_auc"] > 0.6 and metrics["test_like_auc"] > 0.6  # chance: 0.5


# --- the study runner -------------------------------------------------------------------------
