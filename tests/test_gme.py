"""GME / MetaEmb generators, the cold-start split and the warm-up protocol on tiny generated data."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch
from safetensors.torch import load_file, save_file

from recforge.data.prepare import prepare
from recforge.data.schema import Feature, Kind, Schema
from recforge.data.sources import RawDataset
from recforge.data.splits import SplitConfig, assign_splits, rank_within
from recforge.models import build_model
from recforge.models.base import make_config
from recforge.models.coldstart.gme import GraphMetaEmbedding, NeighbourAttention, meta_loss, top_neighbours, write_generated

SHOT = 10
N_OLD, N_NEW, OLD_ROWS, NEW_ROWS = 12, 6, 90, 50
ATTRIBUTES = ["year", "genres"]


pytestmark = pytest.mark.usefixtures("single_thread")


def cold_start_split() -> SplitConfig:
    return SplitConfig(kind="cold_start", fit_on=("train", "valid"), old_min_count=80, new_min_count=40, warm_rows=3 * SHOT)


def tiny_raw(seed: int = 0) -> RawDataset:
    """Old items 0..11 (90 rows each) and new items 100..105 (50 rows each), in time order.

    An item's click rate is set by its genre (4 genres, two per item) and year (3 years), so
    that attributes carry what an item's ID embedding should learn.
    """
    rng = np.random.default_rng(seed)
    items = np.r_[np.repeat(np.arange(N_OLD), OLD_ROWS), np.repeat(100 + np.arange(N_NEW), NEW_ROWS)]
    rng.shuffle(items)
    item_key = np.where(items >= 100, items - 100 + N_OLD, items)
    genre_a, year = item_key % 4, item_key % 3
    genre_b = (genre_a + 1 + item_key % 2) % 4
    logit = np.array([-1.5, -0.5, 0.5, 1.5])[genre_a] + np.array([-0.5, 0.0, 0.5])[year]
    users = rng.integers(0, 30, len(items))
    click = (rng.random(len(items)) < 1 / (1 + np.exp(-(logit + 0.3 * (users % 2))))).astype(np.int8)
    frame = pl.DataFrame(
        {
            "user_id": users,
            "item_id": items,
            "year": [str(1990 + y) for y in year],
            "genres": [[f"g{a}", f"g{b}"] for a, b in zip(genre_a, genre_b)],
            "timestamp": np.arange(len(items)),
            "click": click,
        }
    )
    schema = Schema(
        features=[
            Feature(name="user_id", kind=Kind.CATEGORICAL),
            Feature(name="item_id", kind=Kind.CATEGORICAL),
            Feature(name="year", kind=Kind.CATEGORICAL),
            Feature(name="genres", kind=Kind.SEQUENCE, max_len=3),
        ],
        labels=["click"],
        user="user_id",
        time="timestamp",
    )
    return RawDataset(frame=frame, schema=schema, origin="tiny")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return prepare(tiny_raw(), tmp_path_factory.mktemp("gme") / "store", cold_start_split())


@pytest.fixture(scope="module")
def side(store):
    """The item graph of the generators (their side data)."""
    return GraphMetaEmbedding.side_data(store, make_config("gme", generator_params()))


def generator_params(**params) -> dict:
    return {"attributes": ATTRIBUTES, "num_neighbours": 4, "embedding_dim": 8, **params}


def make_generator(store, side, **params) -> GraphMetaEmbedding:
    return build_model("gme", store.schema, generator_params(**params), side=side)


def item_phases(view, shot: int, items: int | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
    """The items of ``view`` and, per phase p, their rows ``p * shot`` to ``(p + 1) * shot - 1``
    in time order, item after item (the first ``items`` items only, when given)."""
    ids = view.column("item_id").astype(np.int64)
    unique = np.unique(ids)[:items]
    rows = [np.flatnonzero(ids == item) for item in unique]
    return unique, [np.concatenate([r[p * shot : (p + 1) * shot] for r in rows]) for p in range(len(rows[0]) // shot)]


def pretrained_dnn(store, steps: int = 150):
    torch.manual_seed(0)
    model = build_model("dnn", store.schema, {"embedding_dim": 8, "hidden": [16], "dropout": 0.0})
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)  # the tiny table takes dense gradients
    train = store.split("train")
    for step in range(steps):
        batch = train.take(np.sort(np.random.default_rng(step).choice(len(train), 128, replace=False)))
        loss, _ = model.loss(model(batch), batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval().requires_grad_(False)  # frozen, as the protocol keeps it
    return model


# --- split and data ----------------------------------------------------------------------------


def test_rank_within_counts_rows_per_key_in_order():
    assert rank_within(np.array([5, 3, 5, 5, 3, 7])).tolist() == [0, 0, 1, 2, 1, 0]


def test_cold_start_split_old_train_new_warm_valid_rest_test():
    raw = tiny_raw()
    codes = assign_splits(raw.frame, raw.schema, cold_start_split())
    items = raw.frame["item_id"].to_numpy()
    assert (codes[items < 100] == 0).all()
    new = items >= 100
    for item in range(100, 100 + N_NEW):
        assert codes[items == item].tolist() == [1] * 30 + [2] * (NEW_ROWS - 30)  # first 30 in time: warm-up
    assert new.sum() == (codes > 0).sum()


def test_cold_start_split_rejects_rare_items_and_unordered_time():
    raw = tiny_raw()
    rare = raw.frame.filter(~((pl.col("item_id") == 100) & (pl.int_range(pl.len()).over("item_id") >= 30)))
    with pytest.raises(ValueError, match=r"item_id 100 .* has 30 rows, fewer than new_min_count=40"):
        assign_splits(rare, raw.schema, cold_start_split())
    shuffled = raw.frame.with_columns(pl.col("timestamp").reverse())
    with pytest.raises(ValueError, match="time order"):
        assign_splits(shuffled, raw.schema, cold_start_split())


def test_new_items_get_ids_of_their_own_and_phases_follow_time(store):
    from recforge.protocols.cold_start import phase_rows

    new_items, rows = phase_rows(store.split("valid"), "item_id", SHOT, 3)
    old_items, _ = phase_rows(store.split("train"), "item_id", SHOT, 4)
    assert len(new_items) == N_NEW and len(old_items) == N_OLD and (new_items > 1).all()
    assert not np.intersect1d(new_items, old_items).size
    view = store.split("valid")
    raw_rows = view.row[rows]  # [3, n, SHOT]: raw rows (= time) increase from phase a to c
    assert (np.diff(raw_rows.transpose(1, 0, 2).reshape(N_NEW, -1), axis=1) > 0).all()
    assert (view.column("item_id")[rows] == new_items[None, :, None]).all()


# --- graph and generators ---------------------------------------------------------------------------


def test_top_neighbours_hand_computed():
    # items 0..5; old items 2, 3, 4; one categorical field and one list field
    categorical = torch.tensor([[0], [0], [5], [5], [6], [5]])
    lists = [torch.tensor([[0, 0], [0, 0], [7, 8], [7, 9], [8, 9], [8, 9]])]
    is_old = torch.tensor([False, False, True, True, True, False])
    popularity = torch.tensor([0, 0, 10, 30, 20, 0], dtype=torch.float64)
    nb = top_neighbours(categorical, lists, is_old, popularity, num_neighbours=3)
    # item 5 (year 5, {8, 9}): 2 shares 5, 8 -> 2; 3 shares 5, 9 -> 2; 4 shares 8, 9 -> 2: ties by popularity 3, 4, 2
    assert nb[5].tolist() == [3, 4, 2]
    # item 2: 3 shares 5, 7 -> 2; 4 shares 8 -> 1; never itself
    assert nb[2].tolist() == [3, 4, 0]
    assert nb[0].tolist() == [0, 0, 0]  # nothing shared: all padding


def test_attention_gives_padding_zero_weight_and_ignores_its_values():
    torch.manual_seed(0)
    attention = NeighbourAttention(6, 5)
    x = torch.randn(4, 5, 6)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 1, 0]], dtype=torch.bool)
    out, alpha = attention(x, mask)
    assert out.shape == (4, 5) and alpha.shape == (4, 5)
    assert (alpha[~mask] == 0).all()
    torch.testing.assert_close(alpha.sum(1), torch.ones(4))
    x_changed = x.clone()
    x_changed[~mask] = 100 * torch.randn(int((~mask).sum()), 6)
    out_changed, alpha_changed = attention(x_changed, mask)
    assert torch.equal(out, out_changed) and torch.equal(alpha, alpha_changed)
    # row 0 equals the attention over its three real slots only
    out_real, _ = attention(x[:1, :3], mask[:1, :3])
    torch.testing.assert_close(out[:1], out_real)
    # a lone item attends to itself: ELU(W x_0)
    torch.testing.assert_close(out[1], torch.nn.functional.elu(attention.project(x[1, 0])))


def test_side_data_holds_each_items_attributes_and_old_neighbours(store, side):
    assert set(side) == {"categorical", "is_old", "neighbours", "lists.genres"}
    schema, vocab = store.schema, store.schema.vocab_size("item_id")
    assert side["categorical"].shape == (vocab, 1) and side["lists.genres"].shape == (vocab, 3)
    assert side["neighbours"].shape == (vocab, 4)
    old = np.unique(store.split("train").column("item_id"))
    assert torch.equal(side["is_old"].nonzero().squeeze(1), torch.from_numpy(old.astype(np.int64)))
    nb = side["neighbours"]
    assert side["is_old"][nb[nb > 0]].all()  # neighbours are old items
    for split in ("train", "valid"):  # every item's attributes are those of its rows
        batch = store.split(split).take(np.arange(len(store.split(split))))
        items = batch.categorical[:, schema.categorical_index("item_id")]
        assert torch.equal(side["categorical"][items, 0], batch.categorical[:, schema.categorical_index("year")])
        assert torch.equal(side["lists.genres"][items], batch.sequences["genres"])


def test_generator_needs_its_side_data_and_a_table_of_its_width(store, side):
    with pytest.raises(ValueError, match="needs side data computed from a store"):
        build_model("gme", store.schema, generator_params())
    with pytest.raises(ValueError, match=r"side data lacks \['lists.genres'\]"):
        make_generator(store, {k: v for k, v in side.items() if k != "lists.genres"})
    model = pretrained_dnn(store, steps=1)
    with pytest.raises(ValueError, match="a generator of width 4 for a table of width 8"):
        make_generator(store, side, embedding_dim=4).generate(torch.tensor([2, 3]), model.embedding)


@pytest.mark.parametrize("variant", ["meta_emb", "gme_p", "gme_g", "gme_a"])
def test_generator_rebuilt_from_its_side_data_and_weights(store, side, variant, tmp_path):
    model = pretrained_dnn(store, steps=1)
    torch.manual_seed(1)
    generator = make_generator(store, side, variant=variant)
    save_file(generator.state_dict(), tmp_path / "model.safetensors")
    save_file(generator.side, tmp_path / "side.safetensors")
    torch.manual_seed(2)
    rebuilt = make_generator(store, load_file(tmp_path / "side.safetensors"), variant=variant)
    rebuilt.load_state_dict(load_file(tmp_path / "model.safetensors"))
    items = torch.arange(2, store.schema.vocab_size("item_id"))
    assert torch.equal(rebuilt.generate(items, model.embedding), generator.generate(items, model.embedding))


@pytest.mark.parametrize("variant", ["meta_emb", "gme_p", "gme_g", "gme_a"])
def test_generator_shapes_range_and_padding(store, side, variant):
    model = pretrained_dnn(store, steps=1)
    torch.manual_seed(1)
    generator = make_generator(store, {k: v.clone() for k, v in side.items()}, variant=variant, gamma=0.5)
    items = torch.from_numpy(item_phases(store.split("valid"), SHOT)[0])
    r0 = generator.generate(items, model.embedding)
    assert r0.shape == (N_NEW, 8) and torch.isfinite(r0).all()
    if variant in ("meta_emb", "gme_a"):
        assert r0.abs().max() <= 0.5  # gamma tanh(.)
    generator.graph.neighbours[items, -2:] = 0  # the last two neighbours become padding
    before = generator(items, model.embedding)
    if variant != "meta_emb":
        assert not torch.equal(before, r0)  # real neighbours do count
    table, offset = model.embedding.table.weight, model.embedding.vocab_offset
    with torch.no_grad():  # what a padding slot would read: the pad rows of the item and year vocabularies
        table[offset["item_id"]] += 10.0
        table[offset["year"]] -= 10.0
    torch.testing.assert_close(generator(items, model.embedding), before, rtol=0, atol=0)


def test_feature_embedding_replacement_swaps_one_field_and_passes_gradients(store):
    model = pretrained_dnn(store, steps=1)
    batch = store.split("train").take(np.arange(5))
    vectors = torch.randn(5, 8, requires_grad=True)
    plain = model.embedding.fields(batch)
    with model.embedding.replaced("item_id", vectors):
        swapped = model.embedding.fields(batch)
        model(batch)["click"].sum().backward()
    column = store.schema.categorical_index("item_id")
    assert torch.equal(swapped[:, column], vectors)
    others = [c for c in range(plain.shape[1]) if c != column]
    assert torch.equal(swapped[:, others], plain[:, others])
    assert vectors.grad is not None and vectors.grad.abs().sum() > 0
    assert torch.equal(model.embedding.fields(batch), plain)  # restored after the block


# --- meta-learning and warm-up --------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["meta_emb", "gme_a"])
def test_meta_steps_decrease_cold_and_warm_loss(store, side, variant):
    model = pretrained_dnn(store)
    view = store.split("train")
    _, rows = item_phases(view, SHOT, items=4)
    batch_a, batch_b = view.take(rows[0]), view.take(rows[1])
    torch.manual_seed(0)
    generator = make_generator(store, side, variant=variant, inner_lr=0.1)
    optimizer = torch.optim.Adam(generator.parameters(), lr=5e-3)
    backbone = {name: value.clone() for name, value in model.state_dict().items()}
    _, first = meta_loss(generator, model, batch_a, batch_b)
    for _ in range(20):
        loss, parts = meta_loss(generator, model, batch_a, batch_b)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    _, last = meta_loss(generator, model, batch_a, batch_b)
    assert set(last) == {"cold", "warm"} and not any(part.requires_grad for part in last.values())
    assert last["cold"] < first["cold"] - 1e-3 and last["warm"] < first["warm"] - 1e-3, (first, last)
    assert all(torch.equal(backbone[k], v) for k, v in model.state_dict().items())  # the backbone stays frozen


def test_inner_step_per_item_and_per_row(store, side):
    """The warm loss uses r_0 minus eta times the cold-loss gradient: per item (of the mean loss
    of its rows) by default; per row (of the batch-mean loss, rows aligned) as the official code."""
    model = pretrained_dnn(store, steps=30)
    view = store.split("train")
    _, rows = item_phases(view, SHOT, items=2)
    a, b = view.take(rows[0]), view.take(rows[1])
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    torch.manual_seed(0)
    per_item = make_generator(store, side, variant="meta_emb", inner_lr=3.0)
    per_row = make_generator(store, side, variant="meta_emb", inner_lr=3.0, inner_grad="per_row")
    per_row.load_state_dict(per_item.state_dict())
    items = a.categorical[:, store.schema.categorical_index("item_id")]
    unique, index = torch.unique(items, return_inverse=True)
    r0 = per_item(unique, model.embedding).detach().requires_grad_()  # [2, k]
    with model.embedding.replaced("item_id", r0[index]):
        losses = bce(model(a)["click"], a.labels["click"], reduction="none")
    item_mean = torch.zeros(len(unique)).index_add(0, index, losses) / torch.bincount(index)
    (grad,) = torch.autograd.grad(item_mean.sum(), r0)
    with torch.no_grad(), model.embedding.replaced("item_id", (r0 - 3.0 * grad)[index]):
        warm_item = float(bce(model(b)["click"], b.labels["click"]))
    rows_a = r0.detach()[index].requires_grad_()  # [2 SHOT, k]
    with model.embedding.replaced("item_id", rows_a):
        cold = bce(model(a)["click"], a.labels["click"])
    (grad_rows,) = torch.autograd.grad(cold, rows_a)
    with torch.no_grad(), model.embedding.replaced("item_id", rows_a - 3.0 * grad_rows):
        warm_row = float(bce(model(b)["click"], b.labels["click"]))
    item_parts = {k: float(v) for k, v in meta_loss(per_item, model, a, b)[1].items()}
    row_parts = {k: float(v) for k, v in meta_loss(per_row, model, a, b)[1].items()}
    assert item_parts["cold"] == pytest.approx(float(cold.detach()), rel=1e-6) == row_parts["cold"]
    assert item_parts["warm"] == pytest.approx(warm_item, rel=1e-6)
    assert row_parts["warm"] == pytest.approx(warm_row, rel=1e-6)
    assert abs(warm_item - warm_row) > 1e-6


def test_write_generated_fills_only_the_items_rows(store, side):
    model = pretrained_dnn(store, steps=1)
    new_items, _ = item_phases(store.split("valid"), SHOT)
    generator = make_generator(store, side)
    before = model.embedding.table.weight.detach().clone()
    write_generated(model, generator, new_items)
    rows = torch.from_numpy(new_items) + model.embedding.vocab_offset["item_id"]
    after = model.embedding.table.weight
    torch.testing.assert_close(after[rows], generator.generate(torch.from_numpy(new_items), model.embedding))
    other = torch.ones(len(before), dtype=torch.bool)
    other[rows] = False
    assert torch.equal(after[other], before[other])


def test_warm_up_changes_only_the_new_items_rows(store, side):
    from recforge.protocols.cold_start import phase_rows, warm_up

    model = pretrained_dnn(store)
    new_items, rows = phase_rows(store.split("valid"), "item_id", SHOT, 3)
    torch.manual_seed(0)
    generator = make_generator(store, side, variant="gme_a")
    write_generated(model, generator, new_items)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    warm_up(model, "item_id", new_items, store.split("valid"), rows[0].reshape(-1), lr=1e-2, batch_size=16, seed=0)
    after = model.state_dict()
    for name in before:
        if name != "embedding.table.weight":
            assert torch.equal(before[name], after[name]), name
    new_rows = torch.from_numpy(new_items) + model.embedding.vocab_offset["item_id"]
    other = torch.ones(len(before["embedding.table.weight"]), dtype=torch.bool)
    other[new_rows] = False
    assert torch.equal(before["embedding.table.weight"][other], after["embedding.table.weight"][other])
    changed = (before["embedding.table.weight"][new_rows] != after["embedding.table.weight"][new_rows]).any(1)
    assert changed.all()


def test_warm_up_lowers_the_new_items_loss(store):
    from recforge.protocols.cold_start import phase_rows, warm_up

    model = pretrained_dnn(store)
    new_items, rows = phase_rows(store.split("valid"), "item_id", SHOT, 3)
    view = store.split("valid")
    batch = view.take(np.sort(rows.reshape(-1)))

    def loss() -> float:
        with torch.no_grad():
            return float(model.loss(model(batch), batch)[0])

    start = loss()
    for phase in range(3):
        warm_up(model, "item_id", new_items, view, rows[phase].reshape(-1), lr=5e-2, batch_size=16, seed=phase)
    assert loss() < start - 0.01


# --- the command ---------------------------------------------------------------------------------






def test_extras_parsing_drops_roles_and_na(tmp_path):
    from recforge.data.sources.movielens_coldstart import _extras

    line = "{id}::T::1995::G::x::Comedy::{director}::W::{actors}::plot::url"
    text = "\r\n".join(
        [
            line.format(id=1, director="Ann Lee (co-director), Bo Wu", actors="A, B, C, D"),
            line.format(id=2, director="N/A", actors="N/A"),
        ]
    )
    (tmp_path / "x.dat").write_text(text)
    table = _extras(tmp_path / "x.dat", ["director", "actors"], 3).sort("item_id")
    assert table["director"].to_list() == [["Ann Lee", "Bo Wu"], []]
    assert table["actors"].to_list() == [["A", "B", "C"], []]
    (tmp_path / "y.dat").write_text(text + "\r\n" + line.format(id=1, director="Z", actors="Y"))
    with pytest.raises(ValueError, match="y.dat, line 3: MovieID 1 appears twice"):
        _extras(tmp_path / "y.dat", ["director"], 3)


# --- real data ------------------------------------------------------------------------------


def test_movielens_cold_start_protocol_data(real_data, tmp_path):
    from recforge.data.sources import load_source
    from recforge.protocols.cold_start import phase_rows

    root = real_data("movielens-1m")
    extras = real_data("movielens-1m-melu-extrainfos")
    raw = load_source("movielens-1m-coldstart", root=root, extras_root=extras, extras=["director", "actors"])
    counts = raw.frame.group_by("item_id").len()
    assert counts["len"].min() >= 80
    split = SplitConfig(kind="cold_start", fit_on=("train", "valid"))
    store = prepare(raw, tmp_path / "store", split)
    old_items, _ = phase_rows(store.split("train"), "item_id", 20, 4)
    new_items, _ = phase_rows(store.split("valid"), "item_id", 20, 3)
    assert len(old_items) == int((counts["len"] >= 300).sum()) and len(new_items) == int((counts["len"] < 300).sum())
    assert len(store.split("valid")) == 60 * len(new_items)
    config = make_config("gme", {"attributes": ["year", "title_words", "genres", "director", "actors"], "num_neighbours": 10})
    graph = GraphMetaEmbedding.side_data(store, config)
    is_old = graph["is_old"]
    assert is_old[torch.from_numpy(old_items)].all() and not is_old[torch.from_numpy(new_items)].any()
    nb = graph["neighbours"][torch.from_numpy(new_items)]  # [n_new, 10]
    assert is_old[nb[nb > 0]].all() and (nb > 0).float().mean() > 0.99
    # "Toy Story 2" (ML id 3114) is a new item; "Toy Story" (id 1) an old one sharing title
    # words, genres and actors: it must be among its neighbours
    vocab = store.vocabulary("item_id")
    index = dict(zip(vocab["value"].to_list(), vocab["index"].to_list()))
    assert index["1"] in graph["neighbours"][index["3114"]].tolist()
