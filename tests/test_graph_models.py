"""Graph retrievers: LightGCN, FREEDOM and EM3 on FREEDOM — their graphs against hand
computations, learning a planted rule under full-corpus ranking, rebuilding from a bundle, and
config mistakes."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from recforge.bundle import load_bundle, save_bundle
from recforge.data.prepare import prepare
from recforge.data.schema import Feature, Kind, Schema
from recforge.data.sources import RawDataset
from recforge.data.splits import SplitConfig
from recforge.data.store import Store
from recforge.errors import ModelConfigError
from recforge.evaluate.evaluators import FullRanking, evaluator_for
from recforge.models import build_model
from recforge.models.base import make_config
from recforge.models.multimodal.freedom import degree_sensitive_prune, knn_graph
from recforge.models.retrieval.lightgcn import bipartite_adjacency, propagate, sample_negatives, symmetric_weights, train_edges
from recforge.text.encoder import model_dir
from recforge.train.optim import Optimizers

pytestmark = pytest.mark.usefixtures("single_thread")

N_USERS, N_ITEMS, PER_USER, DIM = 60, 40, 8, 8
VECTORS = {"text": None, "vectors": ["item_text"]}  # EM3's tokens from the raw vector column (no text)
MODELS = {
    "lightgcn": {},
    "freedom": {},
    "em3_freedom": VECTORS,
    "em3_freedom/mean-no-cic": {**VECTORS, "fusion": "mean", "cic_weight": 0.0},
}


def planted(text: bool = False) -> RawDataset:
    """User u likes the items of group u % 4 (item i is in group i % 4): 8 of its 10 per user, in
    random order. ``item_text`` is a vector near its group's centre or, with ``text``, a title."""
    rng = np.random.default_rng(0)
    rows = [(f"u{u}", f"i{i}", t) for u in range(N_USERS)
            for t, i in enumerate(rng.choice(np.arange(u % 4, N_ITEMS, 4), PER_USER, replace=False))]  # fmt: skip
    frame = pl.DataFrame(rows, schema=["user_id", "item_id", "t"], orient="row").with_columns(click=pl.lit(1, dtype=pl.Int8))
    if text:
        words = ["guitar strings", "drum sticks", "piano keys", "violin bow"]
        frame = frame.with_columns(pl.col("item_id").str.slice(1).cast(pl.Int64).map_elements(
            lambda i: f"{words[i % 4]} number {i}", return_dtype=pl.String).alias("title"))  # fmt: skip
        content = Feature(name="item_text", kind=Kind.EMBEDDING, key="item_id", dim=384, text=["title"])
    else:
        centres = rng.normal(size=(4, DIM))
        vectors = {f"i{i}": (centres[i % 4] + 0.3 * rng.normal(size=DIM)).tolist() for i in range(N_ITEMS)}
        frame = frame.with_columns(pl.col("item_id").replace_strict(vectors, return_dtype=pl.List(pl.Float64)).alias("item_text"))
        content = Feature(name="item_text", kind=Kind.EMBEDDING, key="item_id", dim=DIM)
    features = [Feature(name="user_id", kind=Kind.CATEGORICAL), Feature(name="item_id", kind=Kind.CATEGORICAL), content]
    return RawDataset(frame, Schema(features=features, labels=["click"], user="user_id", time="t"), "planted")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    return prepare(planted(), tmp_path_factory.mktemp("graph") / "store", SplitConfig(kind="leave_one_out"))


def build(name: str, store: Store, **params):
    torch.manual_seed(0)
    return build_model(name.split("/")[0], store.schema, {**MODELS[name], **params}, store=store)


def fit(model, store: Store, epochs: int, lr: float = 0.01) -> None:
    optimizers = Optimizers(model, model.sparse_parameters(), lr=lr)
    model.train()
    for epoch in range(epochs):
        for step, batch in enumerate(store.split("train").batches(128, shuffle=True, seed=0, epoch=epoch)):
            torch.manual_seed(1000 * epoch + step)
            loss, _ = model.loss(model(batch), batch)
            optimizers.zero_grad()
            loss.backward()
            optimizers.step()
    model.eval()


# --- graphs against hand computations ----------------------------------------------------------


def test_bipartite_adjacency_is_the_symmetric_normalisation():
    edges = torch.tensor([[2, 2, 3, 4, 4, 4], [2, 3, 3, 2, 3, 4]])  # (user, item); users 0, 1 and item 0, 1 have none
    users, items = 5, 6
    a = torch.zeros(users + items, users + items)
    a[edges[0], users + edges[1]] = 1.0
    a[users + edges[1], edges[0]] = 1.0
    degree = a.sum(1)
    inv = torch.where(degree > 0, degree.rsqrt(), torch.zeros_like(degree))
    dense = inv[:, None] * a * inv[None, :]  # D^-1/2 A D^-1/2
    adjacency = bipartite_adjacency(edges, users, items)
    torch.testing.assert_close(adjacency.to_dense(), dense)
    torch.testing.assert_close(symmetric_weights(edges, users, items), dense[edges[0], users + edges[1]])
    ego = torch.randn(users + items, 3)
    torch.testing.assert_close(propagate(adjacency, ego, 2), (ego + dense @ ego + dense @ dense @ ego) / 3)


def test_train_edges_are_the_distinct_train_pairs(store):
    edges = train_edges(store, "user_id", "item_id")
    train = store.split("train")
    pairs = set(zip(train.column("user_id").tolist(), train.column("item_id").tolist()))
    assert edges.shape == (2, len(pairs)) and set(zip(*edges.tolist())) == pairs
    keys = edges[0] * store.schema.vocab_size("item_id") + edges[1]
    assert torch.equal(keys, keys.sort().values)  # sorted by (user, item): the negative sampler's index


def test_negatives_avoid_the_users_train_items(store):
    edges = train_edges(store, "user_id", "item_id")
    num_items = store.schema.vocab_size("item_id")
    seen = edges[0] * num_items + edges[1]
    users = edges[0].repeat(20)
    torch.manual_seed(0)
    negatives = sample_negatives(users, seen, num_items, draws=8)
    assert negatives.min() >= 2 and negatives.max() < num_items
    assert not torch.isin(users * num_items + negatives, seen).any()  # 8 draws among 34 unseen of 40: all found
    assert len(negatives.unique()) == N_ITEMS


def test_degree_sensitive_pruning_keeps_the_expected_fraction_and_drops_popular_edges():
    # user 2 has 30 items (a popular user), users 3..12 one item each
    edges = torch.tensor([[2] * 30 + list(range(3, 13)), list(range(2, 32)) + list(range(32, 42))])
    weights = symmetric_weights(edges, 13, 42)
    torch.manual_seed(0)
    kept = torch.zeros(edges.shape[1])
    expected = int(40 * (1.0 - 0.8))  # int(E (1 - p)) as the official code: 7 (the float product is 7.99...)
    for _ in range(400):
        pruned = degree_sensitive_prune(edges, weights, 0.8)
        assert pruned.shape == (2, expected)
        assert len(set(zip(*pruned.tolist()))) == pruned.shape[1]  # without replacement
        kept += (edges[:, :, None] == pruned[:, None, :]).all(0).any(1)
    rate = kept / 400
    assert rate[30:].mean() > 3 * rate[:30].mean()  # weight 1 vs 1/sqrt(30): the popular user's edges go first
    assert abs(rate.sum().item() - expected) < 1e-6


def test_freedom_trains_on_a_fresh_pruned_graph_and_ranks_on_the_full_one(store):
    model = build("freedom", store)
    edges = model.edges.shape[1]
    model.train()
    first, second = model.graph(), model.graph()
    assert first._nnz() == second._nnz() == 2 * int(edges * (1.0 - 0.8))
    assert not torch.equal(first.indices(), second.indices())
    kept = first.indices()[:, first.indices()[0] < model.num_users]  # (user, U + item) half
    assert torch.allclose(first.values()[first.indices()[0] < model.num_users],
                          symmetric_weights(kept - torch.tensor([[0], [model.num_users]]), model.num_users, model.num_items))  # fmt: skip
    model.eval()
    assert model.graph() is model.adjacency


def test_knn_graph_equals_brute_force_top_k():
    g = torch.Generator().manual_seed(0)
    vectors = torch.randn(30, 5, generator=g)
    vectors[[0, 1, 17]] = 0.0  # padding, OOV and an item without content
    index, weight = knn_graph(vectors, k=4)
    valid = [i for i in range(30) if vectors[i].norm() > 0]
    unit = vectors / vectors.norm(dim=1, keepdim=True).clamp(min=1e-12)
    for i in range(30):
        found = set(index[1, index[0] == i].tolist())
        if i not in valid:
            assert not found and i not in index[1]
            continue
        similarity = {j: float(unit[i] @ unit[j]) for j in valid}
        assert found == set(sorted(similarity, key=similarity.get, reverse=True)[:4])  # itself included
    torch.testing.assert_close(weight, torch.full_like(weight, 0.25))  # D^-1/2 A D^-1/2 with row degree k
    small, _ = knn_graph(vectors[:4], k=10)  # fewer non-zero rows than k: every one of them
    assert small.shape == (2, 4)


def test_freedom_adds_the_knn_propagated_item_ids(store):
    model = build("freedom", store).eval()
    with torch.no_grad():
        users, items = super(type(model), model).propagated(model.adjacency)  # LightGCN part
        dense = model.item_graph.to_dense()
        torch.testing.assert_close(model.item_embeddings(), items + dense @ model.item_table.weight)
    assert dense[2:].sum(1).allclose(torch.ones(N_ITEMS)) and (dense[:2] == 0).all()


# --- learning, full-corpus ranking -------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_learns_the_planted_rule_under_full_ranking(store, name):
    model = build(name, store)
    evaluate = evaluator_for(model, store)
    assert isinstance(evaluate, FullRanking)
    fit(model, store, epochs=15)
    with torch.inference_mode():
        after = evaluate(model, store.split("test"))
    # 4 unseen items of the user's group among 32 candidates: random gets ~0.31, popularity ~0.28
    assert after["recall@10"] > 0.9 and after["recall@10"] > after["popular_recall@10"] + 0.5, after


def test_loss_parts(store):
    model = build("em3_freedom", store, content_bpr_weight=1e-3, l2_weight=1e-4)
    batch = store.split("train").take(np.arange(64))
    model.train()
    outputs = model(batch)
    assert outputs["user"].shape == outputs["pos"].shape == (64, 64 + 64)  # [u_id ; u_c]
    assert outputs["cic_content"].shape == (N_ITEMS, 64)
    loss, parts = model.loss(outputs, batch)
    assert set(parts) == {"bpr", "l2", "content_bpr", "cic"} and not any(p.requires_grad for p in parts.values())
    loss.backward()
    for name in ("item_content.fqformer.queries", "item_content.output.weight", "cic_content.weight", "content_projection.weight"):
        assert dict(model.named_parameters())[name].grad is not None, name
    assert set(build("lightgcn", store)(batch)) == {"user", "pos", "neg", "negative"}


def test_em3_reads_text_token_states(tmp_path, monkeypatch):
    """Item titles through the content pipeline: the sentence vectors build the kNN graph, the
    token states feed the FQ-Former."""
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "models").symlink_to(model_dir().parent)
    monkeypatch.setenv("RECFORGE_CACHE", str(tmp_path / "cache"))
    store = prepare(planted(text=True), tmp_path / "store", SplitConfig(kind="leave_one_out"))
    model = build_model("em3_freedom", store.schema, {"text_tokens": 8, "embedding_dim": 16, "fq_dim": 16}, store=store)
    side = model.side
    assert side["text_states"].shape == (N_ITEMS + 2, 8, 384) and side["text_states"].dtype == torch.float16
    assert not side["text_mask"][:2].any() and side["text_mask"][2:, :2].all()
    assert side["content"].shape == (N_ITEMS + 2, 384)
    vocab = store.vocabulary("item_id")
    group = {row["index"]: int(row["value"][1:]) % 4 for row in vocab.iter_rows(named=True) if row["index"] >= 2}
    index = side["knn_index"]
    same = [group[int(i)] == group[int(j)] for i, j in index.T.tolist()]
    assert np.mean(same) > 0.9  # titles of a group share their words
    fit(model, store, epochs=2)
    with torch.inference_mode():
        assert model.item_embeddings().shape == (N_ITEMS + 2, 32)


# --- bundles and config mistakes ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["lightgcn", "freedom", "em3_freedom"])
def test_rebuilt_from_its_bundle(store, name, tmp_path):
    model = build(name, store)
    fit(model, store, epochs=1)
    save_bundle(model, store, tmp_path / "model")
    rebuilt = load_bundle(tmp_path / "model")
    assert set(rebuilt.side) == set(model.side) and all(torch.equal(rebuilt.side[k], model.side[k]) for k in model.side)
    batch = store.split("test").take(np.arange(16))
    with torch.inference_mode():
        assert torch.equal(rebuilt.user_embedding(batch), model.user_embedding(batch))
        assert torch.equal(rebuilt.item_embeddings(), model.item_embeddings())
    assert torch.equal(rebuilt.adjacency.to_dense(), model.adjacency.to_dense())


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("lightgcn", {"num_layers": -1}, r"^model.params.num_layers: must be >= 0, got -1$"),
        ("lightgcn", {"l2_weight": -0.1}, r"^model.params.l2_weight: must be >= 0, got -0.1$"),
        ("lightgcn", {"negative_draws": 0}, r"^model.params.negative_draws: must be >= 1, got 0$"),
        ("freedom", {"edge_dropout": 1.0}, r"^model.params.edge_dropout: must be in \[0, 1\), got 1.0$"),
        ("freedom", {"knn_k": 0}, r"^model.params.knn_k: must be >= 1, got 0$"),
        ("freedom", {"content_bpr_weight": -1}, r"^model.params.content_bpr_weight: must be >= 0, got -1.0$"),
        ("em3_freedom", {"fq_heads": 3}, r"^model.params.fq_heads: must divide fq_dim=64, got 3$"),
        ("em3_freedom", {"text": None}, r"^model.params.text: an item needs at least one modality token \(text, vectors or attributes\)$"),
        ("em3_freedom", {"text_tokens": 1}, r"^model.params.text_tokens: must be in \[2, 256\], got 1$"),
        ("em3_freedom", {"fusion": "sum"}, r"^model.params.fusion: Input should be 'fqformer' or 'mean' \(got 'sum'\)$"),
        ("em3_freedom", {"cic_temperature": 0}, r"^model.params.cic_temperature: must be > 0, got 0.0$"),
        ("em3_freedom", {"fq_dropout": 1.0}, r"^model.params.fq_dropout: must be in \[0, 1\), got 1.0$"),
    ],
)
def test_config_mistakes(name, params, message):
    with pytest.raises(ModelConfigError, match=message):
        make_config(name, params)


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("lightgcn", {"user_feature": "visitor"}, r"^model.params.user_feature: lightgcn needs a categorical feature, the data has no categorical 'visitor'$"),
        ("lightgcn", {"item_feature": "item_text"}, r"^model.params.item_feature: lightgcn needs a categorical feature, the data has no categorical 'item_text'$"),
        ("freedom", {"content_feature": "poster"}, r"^model.params.content_feature: freedom needs an embedding feature keyed by 'item_id', the data has no such 'poster'$"),
        ("em3_freedom", {"text": "item_text"}, r"^model.params.text: em3_freedom needs an embedding made from text keyed by 'item_id', not 'item_text'$"),
        ("em3_freedom", {"text": None, "vectors": ["user_id"]}, r"^model.params.vectors: em3_freedom needs an embedding keyed by 'item_id', not 'user_id'$"),
        ("em3_freedom", {**VECTORS, "attributes": ["item_text"]}, r"^model.params.attributes: em3_freedom reads categorical or list item fields, not 'item_text'$"),
    ],
)
def test_data_mistakes(store, name, params, message):
    with pytest.raises(ModelConfigError, match=message):
        build_model(name, store.schema, params, store=store)


def test_a_model_without_its_side_data_says_what_it_lacks(store):
    with pytest.raises(ValueError, match=r"^lightgcn: side data lacks \['edges'\] \(LightGCN.side_data\(store, config\) gives them\)$"):
        build_model("lightgcn", store.schema, side={})
    with pytest.raises(ValueError, match=r"^freedom: side data lacks \['knn_index', 'knn_weight', 'content'\]"):
        build_model("freedom", store.schema, side={"edges": torch.tensor([[2], [2]])})


@pytest.mark.real_data
@pytest.mark.parametrize("model, epochs", [("freedom", 40), ("em3_freedom", 15)])
def test_real_musical_instruments_full_ranking_beats_most_popular(real_data, tmp_path, model, epochs) -> None:
    """FREEDOM and EM3 on FREEDOM, trained through the real text pipeline (train-split reviews through
    the sentence encoder), rank the held-out review's item better than popularity does."""
    from recforge.config import ExperimentConfig
    from recforge.experiment import run

    real_data("amazon-musical-instruments-5core")
    config = ExperimentConfig.model_validate({
        "name": model,
        "data": {"source": "amazon-musical-instruments", "options": {"label_threshold": 1, "history_len": 0},
                 "split": {"kind": "leave_one_out"}},
        "model": {"name": model, "params": {}},
        "train": {"epochs": epochs, "batch_size": 2048, "lr": 0.001, "seed": 0, "quiet": True, "num_threads": 1,
                  "checkpoint_every_steps": 0},
    })  # fmt: skip
    metrics = run(config, tmp_path / "run", store_root=tmp_path / "stores")
    assert metrics["test_recall@20"] > metrics["test_popular_recall@20"] + 0.01, metrics
