"""EM3: the FQ-Former, LoRA adapters, the CIC loss and the CTR model on tiny data."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn

from recforge.bundle import load_bundle, save_bundle
from recforge.data.batch import Batch
from recforge.data.prepare import prepare
from recforge.data.schema import Feature, Kind, Schema
from recforge.data.sources import RawDataset, history_feature
from recforge.data.splits import SplitConfig
from recforge.errors import ModelConfigError
from recforge.models import build_model
from recforge.models.base import make_config
from recforge.models.multimodal.em3 import EM3, content_id_contrastive
from recforge.nn.fqformer import FQFormer
from recforge.nn.lora import LoRA, LoRALinear

pytestmark = pytest.mark.usefixtures("single_thread")

N_ITEMS, N_SEEN, N_USERS, N_CATEGORIES, N_GENRES = 60, 40, 20, 4, 5  # ids 2 .. N + 1; items >= N_SEEN + 2 never train
T, HIST, GENRES = 8, 6, 3
V = N_ITEMS + 2
SMALL = {"embedding_dim": 8, "fq_dim": 16, "num_queries": 2, "fq_layers": 1, "fq_heads": 2, "text_tokens": T,
         "lora_rank": 4, "hidden": [32], "attention_hidden": [16], "cic_negatives": 4}  # fmt: skip


# --- FQ-Former ------------------------------------------------------------------------------


def test_fqformer_ignores_padded_tokens_and_survives_an_item_without_tokens():
    torch.manual_seed(0)
    fq = FQFormer(16, num_queries=3, num_layers=2, num_heads=4).eval()
    tokens = torch.randn(4, 5, 16)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    out = fq(tokens, mask)
    assert out.shape == (4, 3, 16) and torch.isfinite(out).all()
    changed = tokens.clone()
    changed[~mask] = 1e3 * torch.randn(int((~mask).sum()), 16)
    assert torch.equal(fq(changed, mask), out)  # padded values change nothing
    changed = tokens.clone()
    changed[1, 0] += 1.0
    assert not torch.allclose(fq(changed, mask)[1], out[1]) and torch.equal(fq(changed, mask)[0], out[0])
    assert torch.allclose(out[3], fq(tokens[3:, :0], mask[3:, :0])[0], atol=1e-6)  # no tokens = queries alone


def reference_fqformer(fq: FQFormer, tokens: torch.Tensor) -> torch.Tensor:
    """The formula, one item and one head at a time: Z = [queries ; tokens],
    Z <- LN(Z + O concat_h softmax(Q_h K_h^T / sqrt(d_h)) V_h), the query rows of the last layer."""
    z = torch.cat([fq.queries[0], tokens])  # [Q + T, D]
    for layer in fq.layers:
        q, k, v = layer.query(z), layer.key(z), layer.value(z)
        width = z.shape[1] // layer.num_heads
        heads = [
            torch.softmax(q[:, h * width : (h + 1) * width] @ k[:, h * width : (h + 1) * width].T / math.sqrt(width), -1)
            @ v[:, h * width : (h + 1) * width]
            for h in range(layer.num_heads)
        ]
        z = F.layer_norm(z + layer.output(torch.cat(heads, 1)), (z.shape[1],), layer.norm.weight, layer.norm.bias, 1e-5)
    return z[: fq.num_queries]


def test_fqformer_equals_its_formula_over_each_items_real_tokens():
    torch.manual_seed(0)
    fq = FQFormer(12, num_queries=2, num_layers=3, num_heads=3).eval()
    tokens, mask = torch.randn(4, 6, 12), torch.rand(4, 6) > 0.4
    out = fq(tokens, mask)
    for b in range(4):
        assert torch.allclose(out[b], reference_fqformer(fq, tokens[b][mask[b]]), atol=1e-5)


def test_fqformer_is_joint_self_attention_without_a_feed_forward_layer():
    fq = FQFormer(8, num_queries=2, num_layers=2, num_heads=2)
    names = {n.split(".", 2)[-1] for n, _ in fq.named_parameters() if n.startswith("layers.")}
    assert names == {f"{p}.{w}" for p in ("query", "key", "value", "output", "norm") for w in ("weight", "bias")}
    assert fq.attention_projections == [f"layers.{i}.{p}" for i in (0, 1) for p in ("query", "key", "value", "output")]
    with pytest.raises(ValueError, match="^FQFormer: num_heads=3 must divide dim=8$"):
        FQFormer(8, num_heads=3)


# --- LoRA -----------------------------------------------------------------------------------


def test_lora_linear_starts_at_the_base_and_a_step_trains_only_the_adapter():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    lora = LoRALinear(base, rank=2)
    assert set(dict(lora.named_parameters())) == {"lora_a", "lora_b"}  # the base is referenced, not owned
    assert torch.count_nonzero(lora.lora_a) == lora.lora_a.numel() and torch.count_nonzero(lora.lora_b) == 0
    x = torch.randn(10, 6)
    before = lora(x).detach()
    assert torch.equal(before, base(x).detach())
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    a0 = lora.lora_a.detach().clone()
    optimiser = torch.optim.SGD([*base.parameters(), *lora.parameters()], lr=0.1)
    for _ in range(2):
        optimiser.zero_grad()
        lora(x).pow(2).sum().backward()
        optimiser.step()
    assert all(p.grad is None for p in base.parameters())
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in frozen.items())
    assert torch.count_nonzero(lora.lora_b) > 0 and not torch.equal(lora.lora_a, a0)  # A learns once B is non-zero
    assert not torch.allclose(lora(x), before)
    with pytest.raises(ValueError, match="^LoRA rank must be >= 1, got 0$"):
        LoRALinear(base, rank=0)


def test_lora_on_the_fqformer_shares_its_weights_and_trains_only_the_deltas():
    torch.manual_seed(0)
    fq = FQFormer(8, num_queries=2, num_layers=2, num_heads=2)
    lora = LoRA(fq, fq.attention_projections, rank=2)
    assert len(lora.state_dict()) == 2 * 8  # A and B of Q/K/V/O in 2 layers, no copy of the host
    tokens, mask = torch.randn(3, 4, 8), torch.rand(3, 4) > 0.3
    host_before = fq(tokens, mask).detach()
    assert torch.allclose(lora(tokens, mask), host_before)  # B = 0: the same function at the start
    optimiser = torch.optim.Adam([*fq.parameters(), *lora.parameters()], lr=0.05)
    for _ in range(3):
        optimiser.zero_grad()
        lora(tokens, mask).pow(2).sum().backward()
        assert all(p.grad is None for p in fq.parameters())
        optimiser.step()
    assert torch.equal(fq(tokens, mask), host_before)  # the host is untouched by the adapted path
    assert not torch.allclose(lora(tokens, mask), host_before)
    adapted = lora(tokens, mask).detach()
    with torch.no_grad():
        fq.layers[0].value.weight.add_(1.0)  # a change of the shared weights reaches the adapted path
    assert not torch.allclose(lora(tokens, mask), adapted)
    with pytest.raises(ValueError, match=r"^LoRA targets must name nn.Linear layers of the host; \['layers.0.norm'\] do not$"):
        LoRA(fq, ["layers.0.norm"])


# --- CIC ------------------------------------------------------------------------------------


def test_cic_matches_a_hand_computation_on_three_items():
    content = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    identity = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, -1.0]])
    tau = 0.1
    unit = lambda v: [x / math.hypot(*v) for x in v]  # noqa: E731
    c, i = [unit(v) for v in content.tolist()], [unit(v) for v in identity.tolist()]
    dot = lambda a, b: a[0] * b[0] + a[1] * b[1]  # noqa: E731

    def infonce(anchor, others, k):
        scores = [dot(anchor[k], o) / tau for o in others]
        return -scores[k] + math.log(sum(math.exp(s) for s in scores))

    expected = 0.5 * (sum(infonce(c, i, k) for k in range(3)) / 3 + sum(infonce(i, c, k) for k in range(3)) / 3)
    assert content_id_contrastive(content, identity, tau).item() == pytest.approx(expected, rel=1e-5)
    # with sampled negatives on two items every draw is the other item: K copies of it
    two = content_id_contrastive(content[:2], identity[:2], tau, num_negatives=3).item()

    def pair(a, b, k):  # the positive and 3 copies of the other item
        return -dot(a[k], b[k]) / tau + math.log(math.exp(dot(a[k], b[k]) / tau) + 3 * math.exp(dot(a[k], b[1 - k]) / tau))

    assert two == pytest.approx(0.5 * ((pair(c, i, 0) + pair(c, i, 1)) / 2 + (pair(i, c, 0) + pair(i, c, 1)) / 2), rel=1e-5)
    assert content_id_contrastive(content[:1], identity[:1], tau).item() == 0.0


# --- the model on hand-made side data -------------------------------------------------------


@pytest.fixture(scope="module")
def schema() -> Schema:
    schema = Schema(
        features=[
            Feature(name="user_id", kind=Kind.CATEGORICAL),
            Feature(name="item_id", kind=Kind.CATEGORICAL),
            Feature(name="category", kind=Kind.CATEGORICAL),
            Feature(name="price", kind=Kind.NUMERIC),
            Feature(name="genres", kind=Kind.SEQUENCE, vocab="genre", max_len=GENRES),
            Feature(name="hist_item_id", kind=Kind.SEQUENCE, timeline="item_id", max_len=HIST),
            Feature(name="item_text", kind=Kind.EMBEDDING, key="item_id", dim=384, text=["title"]),
            Feature(name="poster", kind=Kind.EMBEDDING, key="item_id", dim=12),
        ],
        labels=["click"],
        user="user_id",
        time="ts",
    )
    schema.vocab_sizes = {"user_id": N_USERS + 2, "item_id": V, "category": N_CATEGORIES + 2, "genre": N_GENRES + 2}
    return schema


FLAG = torch.randint(0, 2, (V,), generator=torch.Generator().manual_seed(7))  # the content the rule reads


@pytest.fixture(scope="module")
def side() -> dict[str, torch.Tensor]:
    """Token states whose second token carries the item's flag (+s or -s); pad and OOV items have no tokens."""
    g = torch.Generator().manual_seed(0)
    signal = torch.randn(384, generator=g)
    states = 0.5 * torch.randn(V, T, 384, generator=g)
    states[:, 1] += torch.where(FLAG[:, None] == 1, signal, -signal)
    mask = torch.arange(T)[None, :] < torch.randint(2, T + 1, (V, 1), generator=g)
    mask[:2] = False
    return {
        "text_states": (states * mask[..., None]).half(),
        "text_mask": mask,
        "vectors.poster": torch.randn(V, 12, generator=g) * (torch.arange(V) >= 2)[:, None],
        "attributes.category": torch.randint(2, N_CATEGORIES + 2, (V,), generator=g),
        "attributes.genres": torch.randint(0, N_GENRES + 2, (V, GENRES), generator=g),
    }


def planted(n: int, seed: int, seen: bool) -> Batch:
    """Click iff the target's flag equals the flag of the user's history (all one flag); targets
    are the first N_SEEN items (``seen``) or the rest, whose IDs never train (histories hold seen items only)."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = (2, N_SEEN + 2) if seen else (N_SEEN + 2, V)
    item = torch.randint(lo, hi, (n,), generator=g)
    group = torch.randint(0, 2, (n,), generator=g)
    pool = [torch.nonzero(FLAG[2 : N_SEEN + 2] == k).squeeze(1) + 2 for k in (0, 1)]
    hist = torch.stack([p[torch.randint(0, len(p), (n, HIST), generator=g)] for p in pool])[group, torch.arange(n)]
    hist = hist * (torch.arange(HIST)[None, :] >= torch.randint(0, HIST, (n, 1), generator=g))  # 1 .. HIST items
    click = torch.bernoulli(torch.sigmoid(4.0 * torch.where(FLAG[item] == group, 1.0, -1.0)), generator=g)
    return Batch(
        categorical=torch.stack([torch.randint(2, N_USERS + 2, (n,), generator=g), item, 2 + item % N_CATEGORIES], 1),
        numeric=torch.randn(n, 1, generator=g),
        sequences={"genres": torch.randint(0, N_GENRES + 2, (n, GENRES), generator=g), "hist_item_id": hist},
        labels={"click": click},
    )


def rows(data: Batch, idx: torch.Tensor) -> Batch:
    return Batch(
        categorical=data.categorical[idx], numeric=data.numeric[idx],
        sequences={k: v[idx] for k, v in data.sequences.items()}, labels={k: v[idx] for k, v in data.labels.items()},
    )  # fmt: skip


def fit(model: nn.Module, data: Batch, steps: int, batch_size: int = 128) -> None:
    torch.manual_seed(0)
    sparse = [m.weight for m in model.modules() if isinstance(m, nn.Embedding) and m.sparse]
    dense = [p for p in model.parameters() if all(p is not s for s in sparse)]
    optimisers = [torch.optim.Adam(dense, lr=1e-2)] + ([torch.optim.SparseAdam(sparse, lr=1e-2)] if sparse else [])
    g = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(steps):
        batch = rows(data, torch.randint(0, len(data), (batch_size,), generator=g))
        loss, _ = model.loss(model(batch), batch)
        for opt in optimisers:
            opt.zero_grad()
        loss.backward()
        for opt in optimisers:
            opt.step()
    model.eval()


def test_em3_learns_a_content_rule_on_items_it_never_trained_on(schema, side):
    train, test = planted(3000, seed=1, seen=True), planted(1500, seed=2, seen=False)
    results = {}
    for name, params in [("em3", SMALL), ("din", {"embedding_dim": 8, "hidden": [32], "attention_hidden": [16]})]:
        torch.manual_seed(0)
        model = build_model(name, schema, params, side=side if name == "em3" else None)
        fit(model, train, steps=150)
        with torch.inference_mode():
            p = torch.sigmoid(model(test)["click"])
        results[name] = (roc_auc_score(test.labels["click"], p), F.binary_cross_entropy(p, test.labels["click"]).item())
    rate = test.labels["click"].mean()
    constant = F.binary_cross_entropy(rate.expand(len(test)), test.labels["click"]).item()
    (auc, logloss), (din_auc, _) = results["em3"], results["din"]
    assert auc > 0.85 and logloss < 0.8 * constant, results
    assert din_auc < 0.65, results  # IDs alone cannot score unseen items


@pytest.mark.parametrize(
    "params",
    [{}, {"lora": False}, {"lora": False, "fusion": "mean"}, {"cic_weight": 0.0}, {"cic_negatives": None},
     {"vectors": ["poster"], "attributes": ["category", "genres"]}, {"text": None, "attributes": ["genres"]}],
)  # fmt: skip
def test_every_ablation_switch_builds_and_trains_a_step(schema, side, params):
    torch.manual_seed(0)
    model = build_model("em3", schema, {**SMALL, **params}, side=side)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = planted(64, seed=3, seen=True)
    loss, parts = model.loss(model(batch), batch)
    assert set(parts) == ({"click"} if params.get("cic_weight") == 0.0 else {"click", "cic"})
    assert all(v.dim() == 0 and torch.isfinite(v) and not v.requires_grad for v in parts.values())
    loss.backward()
    assert all(p.grad is not None for p in model.parameters()), [n for n, p in model.named_parameters() if p.grad is None]
    torch.optim.Adam(model.parameters(), lr=1e-2).step()
    assert [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert (model.sequence_content is not None) == model.config.lora


def test_lora_path_trains_only_adapters_from_the_sequence(schema, side):
    torch.manual_seed(0)
    model = build_model("em3", schema, SMALL, side=side)
    batch = planted(32, seed=4, seen=True)
    out = model(batch)
    e_sequence = model.sequence_content(torch.arange(2, 10))
    grads = torch.autograd.grad(e_sequence.sum(), [p for p in model.parameters()], allow_unused=True)
    trained = {n for (n, _), g in zip(model.named_parameters(), grads) if g is not None}
    assert trained and all(n.startswith("sequence_content.adapters.") for n in trained)
    assert torch.allclose(e_sequence, model.content(torch.arange(2, 10)))  # B = 0 at the start
    assert out["click"].shape == (32,)


def test_rebuilt_from_its_config_side_data_and_weights(schema, side):
    torch.manual_seed(0)
    model = build_model("em3", schema, SMALL, side=side)
    fit(model, planted(512, seed=5, seen=True), steps=3)
    rebuilt = build_model("em3", schema, SMALL, side={k: v.clone() for k, v in model.side.items()})
    rebuilt.load_state_dict(model.state_dict())
    rebuilt.eval()
    batch = planted(64, seed=6, seen=False)
    with torch.inference_mode():
        assert torch.equal(rebuilt(batch)["click"], model(batch)["click"])



@pytest.mark.parametrize("params", [{}, {"lora": False}])
def test_inference_reads_per_item_tables_built_once_per_set_of_weights(schema, side, params):
    torch.manual_seed(0)
    model = build_model("em3", schema, {**SMALL, **params}, side=side)
    data = planted(512, seed=7, seen=True)
    fit(model, data, steps=3)
    batch = rows(data, torch.arange(64))

    def uncached() -> torch.Tensor:  # eval mode with gradients: e_c computed per batch, no tables
        with torch.enable_grad():
            return model(batch)["click"].detach()

    with torch.inference_mode():
        cached = model(batch)["click"]
    tables = model.content_tables()
    assert tables[0].shape == (V, SMALL.get("fq_dim", 64)) and torch.allclose(tables[0][2:10], model.content(torch.arange(2, 10)))
    with torch.inference_mode():
        assert model(batch)["click"] is not None and model.content_tables() is tables  # built once
    assert torch.allclose(cached, uncached(), atol=1e-5)
    fit(model, data, steps=3)  # new weights: the tables are rebuilt
    with torch.inference_mode():
        assert torch.allclose(model(batch)["click"], uncached(), atol=1e-5)
    other = build_model("em3", schema, {**SMALL, **params}, side=side).eval()
    with torch.inference_mode():
        other(batch)
    other.load_state_dict(model.state_dict())  # weights loaded in eval mode drop the old tables
    with torch.inference_mode():
        assert torch.allclose(other(batch)["click"], model(batch)["click"], atol=1e-6)

@pytest.mark.parametrize(
    ("params", "error"),
    [
        ({"fusion": "mean"}, r"^model.params.lora: LoRA adapts the FQ-Former's projections; fusion 'mean' has none \(set lora: false\)$"),
        ({"fq_heads": 5}, "^model.params.fq_heads: must divide fq_dim=64, got 5$"),
        ({"text_tokens": 1}, r"^model.params.text_tokens: must be in \[2, 256\], got 1$"),
        ({"text": None}, r"^model.params.text: an item needs at least one modality token \(text, vectors or attributes\)$"),
        ({"cic_temperature": 0}, "^model.params.cic_temperature: must be > 0, got 0"),
        ({"fusion": "attention"}, r"^model.params.fusion: Input should be 'fqformer' or 'mean' \(got 'attention'\)$"),
    ],
)
def test_config_mistakes_name_the_key(params, error):
    with pytest.raises(ModelConfigError, match=error):
        make_config("em3", params)


def test_schema_and_side_mistakes_are_named(schema, side):
    with pytest.raises(ModelConfigError, match="^model.params.text: em3 needs 'poster' an embedding made from text keyed by 'item_id'$"):
        build_model("em3", schema, {**SMALL, "text": "poster"}, side=side)
    with pytest.raises(ModelConfigError, match="^model.params.attributes: em3 reads categorical or list item fields, not 'price'$"):
        build_model("em3", schema, {**SMALL, "attributes": ["price"]}, side=side)
    with pytest.raises(ValueError, match=r"^em3: side data lacks \['vectors.poster'\] \(EM3.side_data\(store, config\) gives them\)$"):
        build_model("em3", schema, {**SMALL, "vectors": ["poster"]}, side={k: side[k] for k in ("text_states", "text_mask")})
    with pytest.raises(ValueError, match=r"^em3: side text_states are \[V, 8, 384\], expected \[V, 16, 384\]"):
        build_model("em3", schema, {**SMALL, "text_tokens": 16}, side=side)
    with pytest.raises(ModelConfigError, match="needs side data computed from a store"):
        build_model("em3", schema, SMALL)


# --- through prepare, with the real frozen encoder -------------------------------------------


def test_side_data_from_a_prepared_store_and_the_bundle(tmp_path):
    rng = np.random.default_rng(0)
    colour = ["red", "blue"]
    flags = rng.integers(0, 2, 12)
    data = [(u, i, f"a {colour[flags[i]]} film, number {i}" if i else "", int(flags[i]), t)
            for u in range(12) for t, i in enumerate(rng.integers(0, 12, 6).tolist())]  # fmt: skip
    frame = pl.DataFrame(data, schema=["user_id", "item_id", "title", "click", "t"], orient="row")
    frame = frame.with_columns(pl.col("click").cast(pl.Int8), genre=pl.col("item_id") % 3)
    schema = Schema(
        features=[
            Feature(name="user_id", kind=Kind.CATEGORICAL),
            Feature(name="item_id", kind=Kind.CATEGORICAL),
            Feature(name="genre", kind=Kind.CATEGORICAL),
            history_feature(4),
            Feature(name="item_text", kind=Kind.EMBEDDING, key="item_id", dim=384, text=["title"], text_from="fit_rows"),
        ],
        labels=["click"],
        user="user_id",
        time="t",
    )
    store = prepare(RawDataset(frame, schema, "tiny"), tmp_path / "store", SplitConfig())
    params = {**SMALL, "text_tokens": 10, "attributes": ["genre"]}
    side = EM3.side_data(store, make_config("em3", params))
    size = store.schema.vocab_size("item_id")
    assert side["text_states"].shape == (size, 10, 384) and side["text_states"].dtype == torch.float16
    texts = store.texts_by_vocab("item_text")
    has_text = torch.tensor([bool(t) for t in texts])
    assert torch.equal(side["text_mask"].any(1), has_text) and not has_text[:2].any()
    assert torch.equal(side["text_mask"].sum(1) > 2, has_text)  # [CLS] words [SEP]
    genre = store.split("train").take(np.arange(len(store.split("train"))))
    items, genres = genre.categorical[:, 1], genre.categorical[:, 2]
    assert torch.equal(side["attributes.genre"][items], genres)
    model = build_model("em3", store.schema, params, store=store)
    fit(model, store.split("train").take(np.arange(len(store.split("train")))), steps=2, batch_size=16)
    save_bundle(model, store, tmp_path / "bundle")
    rebuilt = load_bundle(tmp_path / "bundle")
    batch = store.split("test").take(np.arange(len(store.split("test"))))
    with torch.inference_mode():
        assert torch.equal(rebuilt(batch)["click"], model(batch)["click"])
