"""QARM: Swing and trigger pairs against brute force, alignment, codes of new items, the code
features by hand, learning a planted content rule, the bundle round trip, config mistakes, and
``recforge train`` on a tiny store."""

from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F
import yaml
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from recforge.bundle import load_bundle, save_bundle
from recforge.cli import app
from recforge.data import pairs as pairs_module
from recforge.data.pairs import swing, top_neighbours, trigger_pairs
from recforge.data.prepare import prepare
from recforge.data.schema import Feature, Kind, Schema
from recforge.data.sources import RawDataset
from recforge.data.store import Store
from recforge.errors import ModelConfigError
from recforge.models import build_model
from recforge.models.base import make_config
from recforge.models.multimodal.qarm import QARM, QARMConfig, align, count_buckets, match_counts, prefix_ids
from recforge.train.optim import Optimizers

pytestmark = pytest.mark.usefixtures("single_thread")

N_USERS, N_ITEMS, EVENTS, DIM, CLUSTERS = 150, 120, 30, 8, 4
# small sizes for the tiny store: 2 RQ levels of 4 codewords (= the planted clusters), a pool of 32
TINY = {
    "embedding_dim": 8, "hidden": [32], "attention_hidden": [16], "align_hidden": [16], "align_dim": 8,
    "align_epochs": 5, "align_batch_size": 256, "align_lr": 3e-3, "u2i_rank": 8, "rq_levels": 2, "rq_size": 4,
    "vq_pool": 32, "vq_top_k": 4, "prefix_buckets": 64, "match_levels": 2,
}  # fmt: skip


def content_schema() -> Schema:
    return Schema(
        features=[
            Feature(name="user_id", kind=Kind.CATEGORICAL),
            Feature(name="item_id", kind=Kind.CATEGORICAL),
            Feature(name="item_text", kind=Kind.EMBEDDING, key="item_id", dim=DIM),
            Feature(name="hist_item_id", kind=Kind.SEQUENCE, timeline="item_id", max_len=10, where={"click": 1}),
        ],
        labels=["click"],
        user="user_id",
        time="t",
    )


def content_frame(seed: int = 0) -> pl.DataFrame:
    """Items in 4 content clusters (their vector: the cluster's centre plus noise); each user
    prefers one cluster and clicks its items with probability 0.85, the others' with 0.1."""
    rng = np.random.default_rng(seed)
    centres = 3.0 * rng.normal(size=(CLUSTERS, DIM))
    cluster = np.arange(N_ITEMS) % CLUSTERS
    vectors = (centres[cluster] + 0.3 * rng.normal(size=(N_ITEMS, DIM))).astype(np.float32)
    user = np.repeat(np.arange(N_USERS), EVENTS)
    item = rng.integers(0, N_ITEMS, size=len(user))
    liked = cluster[item] == rng.integers(0, CLUSTERS, size=N_USERS)[user]
    click = rng.random(len(user)) < np.where(liked, 0.85, 0.1)
    return pl.DataFrame({
        "user_id": [f"u{u}" for u in user], "item_id": [f"i{i}" for i in item],
        "item_text": pl.Series(vectors[item].tolist(), dtype=pl.List(pl.Float32)),
        "t": np.tile(np.arange(EVENTS), N_USERS), "click": click.astype(np.int8),
    })  # fmt: skip


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    return prepare(RawDataset(content_frame(), content_schema(), "tiny"), tmp_path_factory.mktemp("qarm") / "store")


@pytest.fixture(scope="module")
def side(store) -> dict[str, torch.Tensor]:
    return QARM.side_data(store, make_config("qarm", TINY))


def batches_of(store: Store, split: str):
    view = store.split(split)
    return view.take(np.arange(len(view)))


def train(model: QARM, store: Store, epochs: int) -> None:
    torch.manual_seed(0)
    optimizers = Optimizers(model, model.sparse_parameters(), lr=0.01, sparse_lr=0.1)
    model.train()
    for epoch in range(epochs):
        for batch in store.split("train").batches(128, shuffle=True, seed=0, epoch=epoch):
            loss, _ = model.loss(model(batch), batch)
            optimizers.zero_grad()
            loss.backward()
            optimizers.step()
    model.eval()


# --- pairs -------------------------------------------------------------------------------------


def brute_swing(users, items, num_items, alpha, user_power):
    baskets: dict[int, set[int]] = {}
    for u, i in zip(users.tolist(), items.tolist()):
        baskets.setdefault(u, set()).add(i)
    s = np.zeros((num_items, num_items))
    for i in range(num_items):
        for j in range(num_items):
            if i == j:
                continue
            both = [u for u, b in baskets.items() if i in b and j in b]
            for u, v in combinations(sorted(both), 2):
                w = (len(baskets[u]) * len(baskets[v])) ** -user_power
                s[i, j] += w / (alpha + len(baskets[u] & baskets[v]))
    return s


@pytest.mark.parametrize(("alpha", "user_power"), [(1.0, 0.0), (0.5, 0.5)])
def test_swing_matches_brute_force_in_one_block_and_in_many(monkeypatch, alpha, user_power):
    rng = np.random.default_rng(3)
    users, items = rng.integers(0, 9, size=60), rng.integers(0, 12, size=60)  # duplicates count once
    expected = brute_swing(users, items, 12, alpha, user_power)
    assert expected.max() > 0
    np.testing.assert_allclose(swing(users, items, 12, alpha, user_power).toarray(), expected, rtol=1e-12)
    monkeypatch.setattr(pairs_module, "_PAIRS_PER_BLOCK", 20)  # two users per block
    monkeypatch.setattr(pairs_module, "_TRIPLES_PER_BLOCK", 5)  # one user per block
    np.testing.assert_allclose(swing(users, items, 12, alpha, user_power).toarray(), expected, rtol=1e-12)


def test_top_neighbours_keeps_the_best_k_per_row_best_first():
    s = np.array([[0, 3, 1, 3], [2, 0, 0, 0], [0, 0, 0, 0], [1, 2, 5, 0]], dtype=float)
    rows, cols, vals = top_neighbours(sp.csr_matrix(s), 2)
    assert list(zip(rows.tolist(), cols.tolist(), vals.tolist())) == [(0, 1, 3), (0, 3, 3), (1, 0, 2), (3, 2, 5), (3, 1, 2)]


def test_trigger_is_the_most_similar_earlier_positive_within_the_window():
    vectors = np.array([[0, 0], [1, 0], [0, 1], [1, 1], [1, 0.1]], dtype=np.float32)
    users = np.array([7, 7, 7, 7, 7, 8, 8])
    items = np.array([1, 2, 3, 4, 2, 4, 1])
    time = np.array([0, 1, 2, 2, 3, 5, 6])
    trigger, target = trigger_pairs(users, items, time, vectors, window=2)
    # user 7: item 2 <- 1 (the only earlier); 3 and 4 share time 2, so both see only (1, 2): 3 <- 1 (a tie: the
    # first), 4 <- 1 (cos 0.99); item 2 at time 3 sees the last two (3, 4): 3; user 8: 1 <- 4, user 7's not seen
    assert list(zip(trigger.tolist(), target.tolist())) == [(1, 2), (1, 3), (1, 4), (3, 2), (4, 1)]


# --- stage 1: alignment --------------------------------------------------------------------------


def test_alignment_loss_falls_on_real_pairs(store, side):
    report = build_model("qarm", store.schema, TINY, side=side).side_report()
    assert report["pairs_u2i"] > 500 and report["pairs_i2i"] > 500
    assert report["align_loss_after"] < 0.9 * report["align_loss_before"], report


def test_alignment_brings_paired_items_together_and_is_seeded():
    generator = torch.Generator().manual_seed(0)
    vectors = torch.randn(40, 6, generator=generator)
    pairs = torch.stack([torch.arange(0, 40, 2), torch.arange(1, 40, 2)], 1)  # item 2k with 2k + 1
    config = QARMConfig(align_hidden=[16], align_dim=8, align_epochs=30, align_batch_size=8, align_lr=1e-2)
    head, history = align(vectors, pairs, config)
    assert history.shape == (2,) and history[1] < 0.3 * history[0]
    m = F.normalize(head(vectors), dim=1)
    assert float((m[0::2] * m[1::2]).sum(1).mean()) > 0.8
    again, _ = align(vectors, pairs, config)
    assert all(torch.equal(a, b) for a, b in zip(head.state_dict().values(), again.state_dict().values()))
    assert not any(p.requires_grad for p in head.parameters())


# --- stage 2: codes ------------------------------------------------------------------------------


def test_codes_of_new_items_are_the_nearest_centroids_and_pool_items(store, side):
    model = build_model("qarm", store.schema, TINY, side=side).eval()
    x = torch.randn(50, DIM, generator=torch.Generator().manual_seed(5))
    x[0] = 0  # a new item without content has no code
    new = torch.ones(50, dtype=torch.long)  # OOV
    with torch.no_grad():
        rq, vq = model.target_codes(new, x)
        m = F.normalize(model.head(x), dim=1)
    residual, expected = m.clone(), []
    for centroids in side["rq_centroids"]:  # brute force: argmin of the L2 distance per level
        code = torch.cdist(residual, centroids).argmin(1)
        residual = residual - centroids[code]
        expected.append(code + 1)
    expected = torch.stack(expected, 1)
    expected[0] = 0
    assert torch.equal(rq, expected)
    top = (m @ side["vq_pool"].T).argsort(1, descending=True)[:, : TINY["vq_top_k"]] + 1
    top[0] = 0
    assert torch.equal(vq, top)
    known = torch.arange(2, 52)  # vocabulary items take the frozen table's codes
    with torch.no_grad():
        rq_known, vq_known = model.target_codes(known, x)
    assert torch.equal(rq_known, side["rq_codes"][known]) and torch.equal(vq_known, side["vq_codes"][known])


def test_rq_codes_recover_the_content_clusters_and_the_report_counts_them(store, side):
    vocab = store.vocabulary("item_id")
    raw = np.array([int(v[1:]) for v in vocab["value"].to_list()])
    index = torch.tensor(vocab["index"].to_numpy())
    first = side["rq_codes"][index, 0]
    cluster = torch.from_numpy(raw % CLUSTERS)
    assert len(torch.unique(torch.stack([first, cluster], 1), dim=0)) == CLUSTERS  # one level-1 code per cluster
    assert (side["rq_codes"][:2] == 0).all() and (side["vq_codes"][:2] == 0).all()  # pad and OOV: no code
    report = build_model("qarm", store.schema, TINY, side=side).side_report()
    assert report["rq_usage_l1"] == 1.0 and report["rq_collision_l1"] == 1.0
    assert report["rq_collision_l2"] <= report["rq_collision_l1"] and 0 < report["vq_usage"] <= 1
    assert report["items_coded"] == N_ITEMS


# --- stage 3: code features by hand ------------------------------------------------------------


def test_prefix_ids_by_hand():
    codes = torch.tensor([[1, 2, 3], [1, 2, 4], [0, 0, 0]])
    # radix 5: length 2 has 25 <= 32 prefixes, exact: 1 * 5 + 2 = 7; length 3 has 125 > 32, hashed:
    # 1 * 25 + 2 * 5 + 3 = 38 -> 38 * 48271 mod (2^31 - 1) = 1834298 -> mod 32 = 26; 39 -> 1882569 mod 32 = 9
    assert prefix_ids(codes, size=4, buckets=32).tolist() == [[7, 26], [7, 9], [0, 0]]
    assert prefix_ids(codes, size=4, buckets=125).tolist() == [[7, 38], [7, 39], [0, 0]]  # everything fits: exact


def test_match_counts_and_buckets_by_hand():
    target = torch.tensor([[1, 2, 3], [0, 0, 0]])
    history = torch.tensor([
        [[1, 2, 3], [1, 2, 4], [1, 3, 3], [2, 2, 3], [0, 0, 0]],
        [[0, 0, 0], [0, 0, 0], [1, 2, 3], [0, 0, 0], [0, 0, 0]],
    ])  # fmt: skip
    # row 0: c_1 = 1 shared by 3 items, (1, 2) by 2, (1, 2, 3) by 1 (a shared c_3 alone does not count);
    # row 1: a target without code matches nothing, padding included
    assert match_counts(history, target, 3).tolist() == [[3, 2, 1], [0, 0, 0]]
    counts = torch.tensor([0, 1, 2, 3, 4, 7, 8, 50])
    assert count_buckets(counts, 50).tolist() == [0, 1, 2, 2, 3, 3, 4, 6]


# --- the ranker --------------------------------------------------------------------------------


def test_learns_the_planted_content_rule_beyond_popularity(store, side):
    torch.manual_seed(0)
    model = build_model("qarm", store.schema, TINY, side=side)
    train(model, store, epochs=4)
    test = batches_of(store, "test")
    with torch.inference_mode():
        p = model.predict(model(test))["click"]
    labels = test.labels["click"].numpy()
    train_view = store.split("train")
    items, clicks = train_view.column("item_id"), train_view.column("click")
    rate = np.bincount(items, weights=clicks, minlength=N_ITEMS + 2) / np.maximum(np.bincount(items, minlength=N_ITEMS + 2), 1)
    popularity = roc_auc_score(labels, rate[test.categorical[:, 1].numpy()])
    auc = roc_auc_score(labels, p.numpy())
    assert auc > 0.75 and auc > popularity + 0.15, (auc, popularity)  # the Bayes AUC is about 0.84


@pytest.mark.parametrize(
    "params",
    [
        {"content": "none"},
        {"content": "vector", "aligned": False},
        {"content": "vector"},
        {"aligned": False},
        {"codes": "vq"},
        {"codes": "rq", "match_levels": 0},
        {"item_id_embedding": False, "align_pairs": "i2i", "align_reconstruction": 0.5},
    ],
)
def test_every_study_switch_builds_and_trains_a_step(store, params):
    torch.manual_seed(0)
    model = build_model("qarm", store.schema, TINY | params, store=store)
    batch = store.split("train").take(np.arange(64))
    loss, parts = model.loss(model(batch), batch)
    loss.backward()
    assert torch.isfinite(loss) and set(parts) == {"click"}
    assert [n for n, p in model.named_parameters() if p.grad is None] == []  # the frozen encoder and codebooks are buffers
    assert not any(n.startswith(("head.", "quantizer.")) for n in model.state_dict())  # ... kept in the side data
    if params.get("content") == "none":
        assert model.side == {} and model.side_report() == {}


def test_rebuilt_from_its_bundle_alone(store, side, tmp_path):
    torch.manual_seed(0)
    model = build_model("qarm", store.schema, TINY, side=side)
    train(model, store, epochs=1)
    save_bundle(model, store, tmp_path / "model")
    rebuilt = load_bundle(tmp_path / "model")
    batch = batches_of(store, "test")
    with torch.inference_mode():
        assert torch.equal(model(batch)["click"], rebuilt(batch)["click"])
    assert rebuilt.side_report() == model.side_report() and rebuilt.side_report()["align_loss_after"] > 0
    assert set(rebuilt.side) == set(model.side)


def test_side_data_is_deterministic(store, side):
    again = QARM.side_data(store, make_config("qarm", TINY))
    assert set(again) == set(side) and all(torch.equal(again[k], side[k]) for k in side)


def test_config_and_data_mistakes_give_the_exact_message(store):
    with pytest.raises(ModelConfigError, match=r"^model.params.vq_top_k: must be <= vq_pool \(1024\), got 2000$"):
        make_config("qarm", {"vq_top_k": 2000})
    with pytest.raises(ModelConfigError, match=r"^model.params.match_levels: must be in \[0, rq_levels=3\], got 4$"):
        make_config("qarm", {"match_levels": 4})
    with pytest.raises(ModelConfigError, match=r"^model.params.codes: Input should be 'vq', 'rq' or 'both' \(got 'pq'\)$"):
        make_config("qarm", {"codes": "pq"})
    schema = content_schema()
    schema.features = [f for f in schema.features if f.name != "item_text"]
    schema.vocab_sizes = store.schema.vocab_sizes
    with pytest.raises(
        ModelConfigError,
        match=r"^model.params.content_feature: qarm needs 'item_text' an embedding feature keyed by 'item_id'; "
        r"the schema's embeddings are \[\]$",
    ):
        build_model("qarm", schema, {}, side={})
    with pytest.raises(
        ModelConfigError,
        match=r"^model.params.rq_size: 256 codewords per level need at least 256 train items with content; the store has 120$",
    ):
        build_model("qarm", store.schema, TINY | {"rq_size": 256}, store=store)


def test_recforge_train_runs_qarm_on_a_tiny_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    content_frame(seed=1).write_parquet(tmp_path / "data.parquet")
    content_schema().save(tmp_path / "schema.json")
    config = {
        "name": "tiny_qarm",
        "data": {"source": "file", "options": {"path": str(tmp_path / "data.parquet"), "schema": str(tmp_path / "schema.json")}},
        "model": {"name": "qarm", "params": TINY},
        "train": {"epochs": 1, "batch_size": 128, "seed": 1, "quiet": True, "num_threads": 1},
    }
    (tmp_path / "qarm.yaml").write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["train", str(tmp_path / "qarm.yaml"), "--out", "run"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert 0.5 < metrics["test_click_auc"] <= 1.0
    assert Path(tmp_path / "run" / "model" / "side.safetensors").exists()
    assert 0 < metrics["side_rq_usage_l1"] <= 1 and 0 <= metrics["side_rq_collision_l2"] <= 1  # the code report
