"""UniCDR / UniCDR+, the Amazon cross-domain source, the cross_domain split and the cross-domain recipe."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from safetensors.torch import load_file, save_file

from recforge.data.cross_domain import DomainInteractions
from recforge.data.prepare import prepare
from recforge.data.schema import Feature, Kind, Schema
from recforge.data.sources import RawDataset, load_source
from recforge.data.sources import amazon_crossdomain
from recforge.data.splits import SplitConfig, assign_splits
from recforge.models import build_model
from recforge.models.crossdomain.unicdr import BehaviourAggregator
from recforge.train.optim import Optimizers
from recforge.train.trainer import TrainConfig, Trainer


# --- tiny generated data ----------------------------------------------------------------------
def cross_domain_frame(n_users: int = 80, per_domain: int = 8, n_items: int = 24, seed: int = 0) -> pl.DataFrame:
    """Two domains; a user's group (4 groups) decides which items it picks in both domains."""
    rng = np.random.default_rng(seed)
    rows = []
    for domain in ("a", "b"):
        for user in range(n_users):
            group = user % 4
            liked = np.arange(group * n_items // 4, (group + 1) * n_items // 4)
            picks = rng.choice(liked, size=per_domain, replace=True)
            rows += [(user, f"{domain}:{item}", domain, pos) for pos, item in enumerate(picks)]
    frame = pl.DataFrame(rows, schema=["user_id", "item_id", "domain", "t"], orient="row")
    return frame.with_columns(pl.lit(1, dtype=pl.Int8).alias("click"))


def cross_domain_schema(history: int = 0) -> Schema:
    features = [Feature(name=c, kind=Kind.CATEGORICAL) for c in ("user_id", "item_id", "domain")]
    if history:
        features.append(Feature(name="hist_item_id", kind=Kind.SEQUENCE, timeline="item_id", max_len=history))
    return Schema(features=features, labels=["click"], user="user_id", time="t", domain="domain")


@pytest.fixture
def store(tmp_path):
    raw = RawDataset(cross_domain_frame(), cross_domain_schema(history=5), "memory")
    return prepare(raw, tmp_path / "store", SplitConfig(kind="cross_domain"))


@pytest.fixture
def data(store):
    return DomainInteractions.from_store(store)


def small(**params):
    return {"embedding_dim": 16, "num_negatives": 4, "dropout": 0.0, **params}


# --- source -----------------------------------------------------------------------------------
def _write_pair(root: Path, a_train: str, b_train: str, a_test: str = "0\t5\t1\n1\t6\t1\n", b_test: str = "0\t9\t1\n1\t8\t1\n") -> Path:
    for folder, train, test in (("sport_cloth", a_train, a_test), ("cloth_sport", b_train, b_test)):
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / "train.txt").write_text(train)
        (root / folder / "test_original.txt").write_text(test)
    return root


def test_amazon_crossdomain_reads_both_domains_in_order(tmp_path):
    root = _write_pair(tmp_path, "0\t1\t1\n1\t1\t1\n0\t2\t1\n", "1\t1\t1\n0\t3\t1\n")
    ds = amazon_crossdomain.load("sport_cloth", root=root)
    f = ds.frame
    assert f.columns == ["user_id", "item_id", "domain", "position", "click"]
    user0 = f.filter(pl.col("user_id") == 0)
    assert user0.filter(pl.col("domain") == "sport")["item_id"].to_list() == ["sport:1", "sport:2", "sport:5"]
    assert user0.filter(pl.col("domain") == "sport")["position"].to_list() == [0, 1, 2]
    assert user0.filter(pl.col("domain") == "cloth")["item_id"].to_list() == ["cloth:3", "cloth:9"]
    assert f.height == 3 + 2 + 2 + 2 and f["click"].unique().to_list() == [1]
    assert ds.schema.domain == "domain" and ds.schema.user == "user_id" and ds.schema.time == "position"
    # the held-out row is each (user, domain)'s last: the split's test rows are the file's
    codes = assign_splits(f, ds.schema, SplitConfig(kind="cross_domain"))
    assert f.filter(pl.Series(codes == 2))["item_id"].sort().to_list() == ["cloth:8", "cloth:9", "sport:5", "sport:6"]


@pytest.mark.parametrize(
    ("train", "error"),
    [
        ("0\t1\t1\n0\t2\n", r"sport_cloth/train\.txt, line 2: expected 3 tab-separated fields"),
        ("0\t1\t1\nx\t2\t1\n", r"sport_cloth/train\.txt, line 2: user_id 'x' is not a non-negative integer"),
        ("0\t1\t1\n\n1\t-4\t1\n", r"sport_cloth/train\.txt, line 3: item_id '-4'"),
        ("0\t1\t1\n1\t2\t0\n", r"sport_cloth/train\.txt, line 2: third field '0'"),
        ("", r"sport_cloth/train\.txt is empty"),
    ],
)
def test_amazon_crossdomain_bad_lines_name_file_and_line(tmp_path, train, error):
    root = _write_pair(tmp_path, train, "0\t3\t1\n1\t3\t1\n")
    with pytest.raises(ValueError, match=error):
        amazon_crossdomain.load("sport_cloth", root=root)


def test_amazon_crossdomain_user_sets_must_match_and_pair_known(tmp_path):
    root = _write_pair(tmp_path, "0\t1\t1\n1\t1\t1\n", "0\t3\t1\n", b_test="0\t9\t1\n")
    with pytest.raises(ValueError, match="must hold the same users"):
        amazon_crossdomain.load("sport_cloth", root=root)
    with pytest.raises(ValueError, match="unknown pair"):
        amazon_crossdomain.load("sport_game", root=root)


def test_amazon_crossdomain_real_pair(real_data):
    root = real_data("amazon-crossdomain-disencdr")
    ds = load_source("amazon-cross-sport-phone", root=root)
    f = ds.frame
    assert f.height == 50558 + 4998 + 42446 + 4998
    assert f["user_id"].n_unique() == 4998
    assert f.group_by("domain").len().sort("domain")["len"].to_list() == [42446 + 4998, 50558 + 4998]
    codes = assign_splits(f, ds.schema, SplitConfig(kind="cross_domain"))
    assert (codes == 2).sum() == 2 * 4998 and (codes == 1).sum() == 2 * 4998  # every user has >= 4 items per domain


# --- split ------------------------------------------------------------------------------------
def test_cross_domain_split_leave_one_out_without_overlap():
    frame = cross_domain_frame(n_users=40, per_domain=6, seed=3)  # items repeat within a user
    codes = assign_splits(frame, cross_domain_schema(), SplitConfig(kind="cross_domain"))
    f = frame.with_columns(pl.Series("split", codes))
    keys = ["user_id", "domain", "item_id"]
    train = f.filter(pl.col("split") == 0).select(keys).unique()
    held = f.filter(pl.col("split") > 0).select(keys).unique()
    assert train.join(held, on=keys, how="inner").height == 0  # no interaction both in train and held out
    per_pair = f.group_by("user_id", "domain").agg(
        pl.col("item_id").filter(pl.col("split") == 2).n_unique().alias("test"),
        pl.col("item_id").filter(pl.col("split") == 1).n_unique().alias("valid"),
        pl.col("item_id").filter(pl.col("split") == 0).n_unique().alias("train"),
        pl.col("item_id").n_unique().alias("distinct"),
    )
    assert (per_pair["train"] >= 1).all()
    assert per_pair.filter(pl.col("distinct") >= 2)["test"].to_list() == [1] * per_pair.filter(pl.col("distinct") >= 2).height
    assert (per_pair.filter(pl.col("distinct") >= 3)["valid"] == 1).all()
    # the test interaction is the last distinct one in time
    last = f.sort("t").group_by("user_id", "domain").agg(pl.col("item_id").last(), pl.col("split").last())
    assert (last.join(per_pair, on=["user_id", "domain"]).filter(pl.col("distinct") >= 2)["split"] == 2).all()


def test_cross_domain_split_cold_users_have_no_target_train_rows():
    frame = cross_domain_frame(n_users=50, seed=1)
    config = SplitConfig(kind="cross_domain", cold_domain="b", cold_user_ratio=0.2, seed=7)
    codes = assign_splits(frame, cross_domain_schema(), config)
    f = frame.with_columns(pl.Series("split", codes))
    target = f.filter(pl.col("domain") == "b")
    train_users = set(target.filter(pl.col("split") == 0)["user_id"])
    cold = set(range(50)) - train_users
    assert len(cold) == 10  # 20% of the 50 overlapping users
    cold_rows = target.filter(pl.col("user_id").is_in(list(cold)))
    assert cold_rows.height == 10 * 8 and set(cold_rows["split"]) == {1, 2}  # every target row held out
    assert cold_rows.group_by("user_id").agg(pl.col("split").n_unique())["split"].to_list() == [1] * 10
    assert set(cold_rows.filter(pl.col("split") == 1)["user_id"]).isdisjoint(cold_rows.filter(pl.col("split") == 2)["user_id"])
    source = f.filter(pl.col("domain") == "a")
    assert set(source.filter(pl.col("split") == 0)["user_id"]) >= cold  # they keep their source history
    assert np.array_equal(codes, assign_splits(frame, cross_domain_schema(), config))  # seeded
    with pytest.raises(ValueError, match="cold_domain 'c'"):
        assign_splits(frame, cross_domain_schema(), SplitConfig(kind="cross_domain", cold_domain="c", cold_user_ratio=0.2))


def test_interactions_index_needs_domain_specific_items(tmp_path):
    frame = cross_domain_frame(n_users=20).with_columns(pl.col("item_id").str.replace(r"^[ab]:", "x:"))
    store = prepare(RawDataset(frame, cross_domain_schema(), "memory"), tmp_path / "s", SplitConfig(kind="cross_domain"))
    with pytest.raises(ValueError, match=r"item \['x:\d+'\] occurs in several domains"):
        DomainInteractions.from_store(store)


# --- model parts ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mean", "user_attention", "self_attention"])
def test_aggregator_ignores_padding(kind):
    torch.manual_seed(0)
    agg = BehaviourAggregator(8, kind, 0.5, 12, 0.0).eval()
    ids, items = torch.randn(3, 8), torch.randn(3, 4, 8)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    items = items * mask.unsqueeze(-1)
    padded = torch.cat([items, torch.randn(3, 5, 8)], 1)  # garbage behind the mask
    padded_mask = torch.cat([mask, torch.zeros(3, 5, dtype=torch.bool)], 1)
    assert torch.allclose(agg(ids, items, mask), agg(ids, padded, padded_mask), atol=1e-6)
    assert torch.allclose(agg(ids, items, mask)[2], 0.5 * ids[2])  # no items: lambda_a e
    if kind == "mean":
        expected = 0.5 * ids[0] + 0.5 * agg.w_agg(items[0, :3].mean(0))
        assert torch.allclose(agg(ids, items, mask)[0], expected, atol=1e-6)


def _spy_contexts(model, monkeypatch):
    """Record every context the model builds: per call [B, W] item ids (D specific calls, one per
    domain, then D shared ones)."""
    seen: list[torch.Tensor] = []
    original = model._context

    def spy(*args, **kwargs):
        ids = original(*args, **kwargs)
        seen.append(ids.clone())
        return ids

    monkeypatch.setattr(model, "_context", spy)
    return seen


def _parts(seen, num_domains=2):
    """(specific, shared) contexts of the last user_parts call -> [B, W], [B, D * W]."""
    return torch.stack(seen[-2 * num_domains : -num_domains]).sum(0), torch.cat(seen[-num_domains:], 1)


def test_interaction_and_domain_masking(store, data, monkeypatch):
    model = build_model("unicdr", store.schema, small(max_context=3), store=store).train()
    seen = _spy_contexts(model, monkeypatch)
    batch = store.split("train").take(np.arange(64))
    users, domains, targets = model._rows(batch)
    counts = torch.from_numpy(data.counts())[users, domains]
    model.user_parts(users, domains, targets)
    specific, shared = _parts(seen)
    own = (specific != 0).sum(1)
    expected = torch.minimum(torch.full_like(counts, 3), (counts * 0.9).floor().long())
    # min(maxlen, floor(0.9 n)) items drawn, minus the target when drawn
    assert ((own == expected) | (own == expected - 1)).all()
    item_domain = torch.from_numpy(data.item_domain)
    assert (item_domain[specific[specific != 0]] == domains[:, None].expand_as(specific)[specific != 0]).all()
    other = item_domain[shared]
    assert not ((other == domains[:, None]) & (shared != 0)).any()  # domain masking in training
    assert (shared != 0).any()
    # evaluation: the shared aggregator sees every domain ("all"), or only the others
    seen.clear()
    model.eval().user_parts(users, domains, targets)
    shared = _parts(seen)[1]
    assert ((item_domain[shared] == domains[:, None]) & (shared != 0)).any()
    model.config.eval_shared_domains = "other"
    seen.clear()
    model.user_parts(users, domains, targets)
    shared = _parts(seen)[1]
    assert not ((item_domain[shared] == domains[:, None]) & (shared != 0)).any()


def test_target_never_in_its_own_context(store, data, monkeypatch):
    """The official code's leak (the target stays in its training context) is fixed; at
    evaluation the target is masked even if the user also has it among train items."""
    model = build_model("unicdr", store.schema, small(max_context=50, mask_rate=0.0), store=store).train()
    seen = _spy_contexts(model, monkeypatch)
    batch = store.split("train").take(np.arange(len(store.split("train"))))
    users, domains, targets = model._rows(batch)
    model.user_parts(users, domains, targets)
    assert all(not (ids == targets[:, None]).any() for ids in seen)
    model.config.official_target_leak = True  # parity with the official code: the target leaks
    seen.clear()
    model.user_parts(users, domains, targets)
    assert (_parts(seen)[0] == targets[:, None]).any(1).all()  # every row's full context holds its target

    # evaluation rows whose target is one of the user's train items: the user vector does not
    # depend on the target's embedding
    model.config.official_target_leak = False
    model.eval()
    seen.clear()
    u1 = model.user_parts(users, domains, targets)
    assert all(not (ids == targets[:, None]).any() for ids in seen)
    for row in range(0, len(targets), 37):
        saved = model.items.weight[targets[row]].detach().clone()
        with torch.no_grad():
            model.items.weight[targets[row]] += 5.0
        u2 = model.user_parts(users, domains, targets)
        assert all(torch.equal(a[row], b[row]) for a, b in zip(u1, u2))
        with torch.no_grad():
            model.items.weight[targets[row]] = saved
    # the check can fail: with the leak the row's vector moves with its target's embedding
    model.config.official_target_leak = True
    model.train()
    torch.manual_seed(0)
    leaky = model.user_parts(users, domains, targets)[0]
    with torch.no_grad():
        model.items.weight[targets[0]] += 5.0
    torch.manual_seed(0)
    assert not torch.allclose(leaky[0], model.user_parts(users, domains, targets)[0][0])


def test_eval_rows_never_see_their_target(store, data, monkeypatch):
    model = build_model("unicdr", store.schema, small(), store=store).eval()
    seen = _spy_contexts(model, monkeypatch)
    for split in ("valid", "test"):
        view = store.split(split)
        batch = view.take(np.arange(len(view)))
        seen.clear()
        model.user_embedding(batch)
        targets = batch.categorical[:, store.schema.categorical_index("item_id")]
        assert len(seen) == 4 and all(not (ids == targets[:, None]).any() for ids in seen)


def test_critic_negative_is_another_row_of_the_same_domain(store, data):
    model = build_model("unicdr", store.schema, small(), store=store)
    domains = torch.tensor([0, 1, 0, 0, 1, 1, 1])
    specific = torch.arange(7, dtype=torch.float).unsqueeze(1).repeat(1, 16)
    shared = torch.ones(7, 16)
    with torch.no_grad():
        for critic in model.critics:
            critic.weight.zero_()
            critic.weight[0, 0, 0] = 1.0  # D(x, y) = x_0 y_0 + b
            critic.bias.zero_()
    for _ in range(20):
        out = model._critic(specific, shared, domains)
        assert torch.equal(out["critic_pos"], torch.arange(7, dtype=torch.float))
        partner = out["critic_neg"].long()
        assert (partner != torch.arange(7)).all() and torch.equal(domains[partner], domains)


def test_soft_targets_hand_computed(store, data):
    model = build_model("unicdr", store.schema, small(soft_contrastive=True, soft_eps=0.1), store=store)
    users = torch.tensor([2, 3])
    q = model._soft_targets(users)
    counts = data.counts()
    items = [set(data.items[data.ptr[u * 2] : data.ptr[(u + 1) * 2]].tolist()) for u in (2, 3)]
    cos = len(items[0] & items[1]) / np.sqrt(len(items[0]) * len(items[1]))
    assert counts[2].sum() == len(items[0])
    off = np.exp(cos / 0.1) / (np.exp(cos / 0.1) + np.exp(1 / 0.1))
    expected = torch.tensor([[0.9 + 0.1 * (1 - off), 0.1 * off], [0.1 * off, 0.9 + 0.1 * (1 - off)]], dtype=torch.float)
    assert torch.allclose(q, expected, atol=1e-5)


def test_loss_is_the_weighted_sum_of_its_parts(store, data):
    model = build_model("unicdr", store.schema, small(lambda_loss=0.4), store=store).train()
    batch = store.split("train").take(np.arange(32))
    torch.manual_seed(0)
    out = model(batch)
    total, parts = model.loss(out, batch)
    assert set(parts) == {"rec", "critic"} and not any(part.requires_grad for part in parts.values())
    assert total.item() == pytest.approx(0.4 * float(parts["rec"]) + 0.6 * float(parts["critic"]), rel=1e-5)
    rec = torch.nn.functional.binary_cross_entropy_with_logits
    expected = rec(out["pos"], torch.ones(32)) + rec(out["neg"], torch.zeros_like(out["neg"]))
    assert float(parts["rec"]) == pytest.approx(float(expected.detach()), rel=1e-5)
    negatives = model.sample_negatives(*model._rows(batch)[:2])
    users, domains, _ = model._rows(batch)
    assert (torch.from_numpy(data.item_domain)[negatives] == domains[:, None]).all()


def _train_steps(model, store, steps=40, lr=3e-3, sparse_lr=0.1):
    optimizers = Optimizers(model, model.sparse_parameters(), lr=lr, sparse_lr=sparse_lr, clip_norm=10.0)
    view = store.split("train")
    losses = []
    for step in range(steps):
        torch.manual_seed(step)
        batch = view.take(np.random.default_rng(step).permutation(len(view))[:128])
        total, _ = model.loss(model(batch), batch)
        optimizers.zero_grad()
        total.backward()
        optimizers.step()
        losses.append(total.item())
    return losses


EXTENSIONS = {
    "side_features": {"side_features": True},
    "item_graph": {"item_graph": True},
    "self_attention": {"aggregator": "self_attention"},
    "soft_contrastive": {"soft_contrastive": True},
    "multi_behaviour": {"multi_behaviour": True},
}


@pytest.mark.parametrize("name", list(EXTENSIONS))
def test_each_extension_changes_the_model_and_trains(store, data, name):
    torch.manual_seed(0)
    base = build_model("unicdr", store.schema, small(), store=store)
    torch.manual_seed(0)
    model = build_model("unicdr", store.schema, small(**EXTENSIONS[name]), store=store)
    batch = store.split("train").take(np.arange(64))
    base_names = {n for n, _ in base.named_parameters()}
    names = {n for n, _ in model.named_parameters()}
    model.train()
    torch.manual_seed(1)
    out = model(batch)
    _, parts = model.loss(out, batch)
    if name in ("side_features", "multi_behaviour", "self_attention"):
        assert names - base_names  # new parameters
    if name == "soft_contrastive":
        assert "soft" in parts
    if name == "multi_behaviour":
        assert "behaviour" in parts
    if name in ("item_graph", "side_features"):
        ids = torch.arange(2, 10)
        assert not torch.allclose(model.item_vectors(ids), base.item_vectors(ids))
    losses = _train_steps(model, store)
    assert np.isfinite(losses).all()
    assert np.mean(losses[-8:]) < np.mean(losses[:8])


def test_interactions_round_trip_through_tensors(data):
    data.build_item_graph()
    tensors = data.to_tensors()
    assert tensors["ptr"].dtype == tensors["user_side_sizes"].dtype == torch.int64 and tensors["item_weights"].dtype == torch.float32
    back = DomainInteractions.from_tensors(tensors, data.domain_names)
    for name, value in vars(data).items():
        if isinstance(value, np.ndarray):
            assert np.array_equal(getattr(back, name), value) and getattr(back, name).dtype == value.dtype, name
        else:
            assert getattr(back, name) == value, name
    with pytest.raises(ValueError, match="1 domain names for an index of 2 domains"):
        DomainInteractions.from_tensors(tensors, ["a"])


def test_rebuilt_from_its_side_data_and_weights(store, tmp_path):
    """What a bundle keeps (the config, the state dict and the side tensors) rebuilds the model."""
    params = small(side_features=True, item_graph=True, aggregator="self_attention", multi_behaviour=True, item_side_columns=["domain"])
    torch.manual_seed(0)
    model = build_model("unicdr", store.schema, params, store=store)
    assert {"ptr", "items", "item_neighbours", "item_weights", "user_side_sizes"} <= set(model.side)
    assert model.side["item_side"].shape[1] == 2  # the popularity bucket and the named column
    _train_steps(model, store, steps=3)
    save_file(model.state_dict(), tmp_path / "model.safetensors")
    save_file(model.side, tmp_path / "side.safetensors")
    torch.manual_seed(1)  # other initial weights, all overwritten
    rebuilt = build_model("unicdr", store.schema, params, side=load_file(tmp_path / "side.safetensors"))
    rebuilt.load_state_dict(load_file(tmp_path / "model.safetensors"))
    batch = store.split("test").take(np.arange(len(store.split("test"))))
    model.eval(), rebuilt.eval()
    with torch.no_grad():
        assert torch.equal(model.user_embedding(batch), rebuilt.user_embedding(batch))
        assert torch.equal(model.item_embeddings(), rebuilt.item_embeddings())
    with pytest.raises(ValueError, match="needs side data computed from a store"):
        build_model("unicdr", store.schema, params)


def test_item_graph_rows_are_the_mean_of_powers(data):
    data.build_item_graph(hop_top_k=1000, top_k=1000, hops=2)
    from scipy import sparse

    user_of = np.repeat(np.arange(len(data.ptr) - 1) // data.num_domains, np.diff(data.ptr))
    x = sparse.csr_matrix((np.ones(len(data.items)), (user_of, data.items)), shape=(data.num_users, data.num_items)).toarray()
    co = x.T @ x
    np.fill_diagonal(co, 0)
    d = co.sum(1)
    inv = np.where(d > 0, 1 / np.sqrt(np.maximum(d, 1e-12)), 0)
    a = inv[:, None] * co * inv[None, :]
    m = (np.eye(len(a)) + a + a @ a) / 3
    dense = np.zeros_like(m)
    rows = np.repeat(np.arange(len(m)), data.item_neighbours.shape[1])
    np.add.at(dense, (rows, data.item_neighbours.ravel()), data.item_weights.ravel())
    assert np.allclose(dense, m, atol=1e-5)
    assert (data.item_neighbours[:, 0] == np.arange(len(m))).all()  # the item itself first


# --- recipe -----------------------------------------------------------------------------------
def test_sampled_candidates_are_unseen_items_of_the_domain(store, data):
    from recforge.evaluate.evaluators import sample_candidates

    view = store.split("test")
    for negatives in (5, 1000):  # 1000: more than a domain holds, the small-pool path
        cands = sample_candidates(view, data, "item_id", negatives, seed=0)
        users = view.column("user_id")[cands.rows]
        targets = view.column("item_id")[cands.rows]
        assert (cands.items[:, 0] == targets).all()
        negs = cands.items[:, 1:]
        assert (data.item_domain[negs] == cands.domain[:, None]).all()
        assert all(len(set(row)) == len(row) for row in cands.items)  # distinct, target not among them
        counts = data.counts()
        for row, user, domain in zip(negs, users, cands.domain):
            segment = user * data.num_domains + domain
            assert not set(row) & set(data.items[data.ptr[segment] : data.ptr[segment + 1]])
        if negatives == 5:
            assert negs.shape[1] == 5
        else:  # as many as the fullest row leaves
            pool = np.diff(data.domain_ptr)
            assert negs.shape[1] == min(pool[d] - counts[:, d].max() - 1 for d in range(2))


def test_unicdr_beats_popularity_and_single_domain_two_tower_trains(store, data, tmp_path):
    from recforge.evaluate.evaluators import SampledRanking
    from recforge.protocols.cross_domain import SingleDomain

    config = TrainConfig(epochs=6, batch_size=64, lr=3e-3, sparse_lr=0.1, patience=None, quiet=True, checkpoint_every_steps=0, monitor="valid_ndcg@10")
    torch.manual_seed(0)
    model = build_model("unicdr", store.schema, small(embedding_dim=16), store=store)
    metrics = Trainer(model, store, config, tmp_path / "u", SampledRanking(data, negatives=15)).fit()
    assert metrics["test_ndcg@10"] > metrics["test_popular_ndcg@10"] + 0.1
    assert metrics["test_a_rows"] + metrics["test_b_rows"] + metrics["test_skipped_unseen_targets"] == len(store.split("test"))
    torch.manual_seed(0)
    tower = SingleDomain(build_model("two_tower", store.schema, {"history": "hist_item_id"}), data, 0)
    result = Trainer(tower, store, config, tmp_path / "t", SampledRanking(data, negatives=15)).fit()
    assert np.isfinite(result["test_a_ndcg@10"])


def test_unicdr_beats_popularity_on_a_small_real_pair(real_data, tmp_path):
    """Sport-Phone cut to its items with >= 10 interactions (users keeping >= 3 per domain)."""
    from recforge.evaluate.evaluators import SampledRanking

    raw = load_source("amazon-cross-sport-phone", root=real_data("amazon-crossdomain-disencdr"))
    frame = raw.frame.filter(pl.len().over("item_id") >= 10)
    frame = frame.filter(pl.len().over("user_id", "domain") >= 3)
    frame = frame.filter(pl.col("domain").n_unique().over("user_id") == 2)
    store = prepare(RawDataset(frame, raw.schema, raw.origin), tmp_path / "store", SplitConfig(kind="cross_domain"))
    data = DomainInteractions.from_store(store)
    torch.manual_seed(0)
    model = build_model("unicdr", store.schema, {"embedding_dim": 32}, store=store)
    config = TrainConfig(epochs=2, batch_size=256, sparse_lr=0.1, patience=None, quiet=True, checkpoint_every_steps=0, monitor="valid_ndcg@10", num_threads=1)
    metrics = Trainer(model, store, config, tmp_path / "run", SampledRanking(data, negatives=199, valid_rows=300)).fit()
    for domain in ("sport", "phone"):
        assert metrics[f"test_{domain}_ndcg@10"] > metrics[f"test_popular_{domain}_ndcg@10"] + 0.005
        assert metrics[f"test_{domain}_hr@10"] > metrics[f"test_popular_{domain}_hr@10"]
