"""Baseline models and their layers on a tiny hand-made schema and random batches."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn

from recforge.data.batch import Batch
from recforge.data.schema import Feature, Kind, Schema
from recforge.models import Model, build_model, registered
from recforge.models.base import ModelConfigError, make_config, protocol_of
from recforge.models.capabilities import Funnel, Ranker, Retriever
from recforge.nn.attention import TargetAttention
from recforge.nn.experts import MixtureOfExperts
from recforge.nn.interaction import CrossNetV2, FMInteraction
from recforge.nn.mlp import MLP

N_USERS, N_ITEMS, N_CATEGORIES, N_GENRES = 50, 100, 8, 10  # ids 2 .. N + 1; 0 = pad, 1 = OOV
HIST_LEN, GENRES_LEN = 8, 4
# cross-domain models need a domain column and per-domain histories: tested in test_minet.py and test_unicdr.py;
# the cold-start generator in test_gme.py
SINGLE_DOMAIN = sorted(
    name for name, cls in registered().items()
    if ".crossdomain." not in cls.__module__ and protocol_of(cls) is None and not cls.needs_side_data()
)  # models with side data need a store: their own test files and the contract test build them from one
RANKERS = [name for name in SINGLE_DOMAIN if issubclass(registered()[name], Ranker)]
REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def schema() -> Schema:
    schema = Schema(
        features=[
            Feature(name="user_id", kind=Kind.CATEGORICAL),
            Feature(name="item_id", kind=Kind.CATEGORICAL),
            Feature(name="category", kind=Kind.CATEGORICAL),
            Feature(name="age", kind=Kind.NUMERIC),
            Feature(name="price", kind=Kind.NUMERIC),
            Feature(name="genres", kind=Kind.SEQUENCE, vocab="genre", max_len=GENRES_LEN),
            Feature(name="hist_item_id", kind=Kind.SEQUENCE, timeline="item_id", max_len=HIST_LEN),
        ],
        labels=["click", "conversion"],
        user="user_id",
        time="ts",
    )
    schema.vocab_sizes = {
        "user_id": N_USERS + 2,
        "item_id": N_ITEMS + 2,
        "category": N_CATEGORIES + 2,
        "genre": N_GENRES + 2,
    }
    return schema


def right_aligned(ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Keep the last ``lengths[b]`` ids of each row, zero (pad) the rest."""
    positions = torch.arange(ids.shape[1])
    return ids * (positions >= ids.shape[1] - lengths[:, None])


def in_group(item: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Move each item id to a nearby id with ``id % 4 == group``, staying in 2 .. N_ITEMS + 1."""
    return 2 + ((item - 2) // 4) * 4 + (group - 2) % 4


def make_batch(n: int, seed: int, rule: str = "additive") -> Batch:
    """Random rows with labels from a planted rule.

    - ``additive``: click depends on item parity and ``age``; conversion (only after a click) on ``price``.
    - ``history``: the history's items all come from one of 4 groups; click iff the target's group matches.
    - ``retrieval``: the user's group (user % 4) picks the item and the history (every row a positive).
    """
    g = torch.Generator().manual_seed(seed)
    user = torch.randint(2, N_USERS + 2, (n,), generator=g)
    item = torch.randint(2, N_ITEMS + 2, (n,), generator=g)
    hist_group = torch.randint(0, 4, (n,), generator=g)
    if rule == "retrieval":
        hist_group = user % 4
        item = in_group(item, hist_group)
    hist = in_group(torch.randint(2, N_ITEMS + 2, (n, HIST_LEN), generator=g), hist_group[:, None])
    hist = right_aligned(hist, torch.randint(1, HIST_LEN + 1, (n,), generator=g))
    genres = torch.randint(2, N_GENRES + 2, (n, GENRES_LEN), generator=g)
    genres = right_aligned(genres, torch.randint(1, GENRES_LEN + 1, (n,), generator=g))
    numeric = torch.randn(n, 2, generator=g)
    category = 2 + item % N_CATEGORIES
    if rule == "history":
        click_logit = 3.0 * torch.where(item % 4 == hist[:, -1] % 4, 1.0, -1.0)
    else:
        click_logit = 3.0 * torch.where(item % 2 == 0, 1.0, -1.0) + 1.5 * numeric[:, 0]
    click = torch.bernoulli(torch.sigmoid(click_logit), generator=g)
    conversion = click * torch.bernoulli(torch.sigmoid(3.0 * numeric[:, 1]), generator=g)
    return Batch(
        categorical=torch.stack([user, item, category], 1),
        numeric=numeric,
        sequences={"genres": genres, "hist_item_id": hist},
        labels={"click": click, "conversion": conversion},
        group=user,
    )


def split_optimisers(model: nn.Module, lr: float = 1e-2) -> list[torch.optim.Optimizer]:
    """SparseAdam for the sparse-gradient tables, Adam for the rest."""
    sparse = [m.weight for m in model.modules() if isinstance(m, nn.Embedding) and m.sparse]
    sparse_ids = {id(p) for p in sparse}
    dense = [p for p in model.parameters() if id(p) not in sparse_ids]
    return ([torch.optim.SparseAdam(sparse, lr=lr)] if sparse else []) + [torch.optim.Adam(dense, lr=lr)]


def train(model: Model, data: Batch, steps: int, batch_size: int = 256, seed: int = 0) -> list[float]:
    torch.manual_seed(seed)
    optimisers = split_optimisers(model)
    g = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(data), (batch_size,), generator=g)
        batch = Batch(
            categorical=data.categorical[idx],
            numeric=data.numeric[idx],
            sequences={k: v[idx] for k, v in data.sequences.items()},
            labels={k: v[idx] for k, v in data.labels.items()},
        )
        loss, _ = model.loss(model(batch), batch)
        for opt in optimisers:
            opt.zero_grad()
        loss.backward()
        for opt in optimisers:
            opt.step()
        losses.append(loss.item())
    return losses


# --- every registered model --------------------------------------------------------------


def test_registry_has_the_baselines():
    assert {"lr", "fm", "deepfm", "dnn", "dcnv2", "din", "esmm", "mmoe", "two_tower"} <= set(registered())


@pytest.mark.parametrize("name", SINGLE_DOMAIN)
def test_forward_loss_backward(schema, name):
    torch.manual_seed(0)
    model = build_model(name, schema)
    batch = make_batch(32, seed=1)
    outputs = model(batch)
    if isinstance(model, Retriever):
        assert outputs["user"].shape == outputs["item"].shape == (32, model.config.out_dim)
    else:
        assert set(outputs) & set(schema.labels)
        for label in schema.labels:
            if label in outputs:
                assert outputs[label].shape == (32,)
        probs = model.predict(outputs)
        assert all(((p >= 0) & (p <= 1)).all() for p in probs.values())
    loss, parts = model.loss(outputs, batch)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert parts and all(v.dim() == 0 and not v.requires_grad and torch.isfinite(v) for v in parts.values())
    loss.backward()
    tables = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    assert tables and all(t.weight.grad is not None and t.weight.grad.is_sparse == t.sparse for t in tables)
    dense = [p for n, p in model.named_parameters() if "table" not in n]
    assert all(p.grad is not None for p in dense), [n for n, p in model.named_parameters() if p.grad is None]


def test_build_model_rejects_unknown_config_keys(schema):
    with pytest.raises(ModelConfigError, match=r"^model.params.hiden: not a parameter of deepfm \(did you mean 'hidden'\?\)$"):
        build_model("deepfm", schema, {"hiden": [64]})
    with pytest.raises(ModelConfigError, match="^model.params.zzz: not a parameter of deepfm; `recforge models` lists them$"):
        make_config("deepfm", {"zzz": 1})
    model = build_model("dcnv2", schema, {"structure": "parallel", "cross_rank": 4, "hidden": [32]})
    assert model(make_batch(8, seed=0))["click"].shape == (8,)


def test_unknown_model_name_suggests_the_closest(schema):
    with pytest.raises(ModelConfigError, match=r"^model.name: unknown model 'deepfn' \(did you mean 'deepfm'\?\); `recforge models` lists them$"):
        make_config("deepfn")
    with pytest.raises(ModelConfigError, match="^model.name: unknown model 'xyzzy'; `recforge models` lists them$"):
        build_model("xyzzy", schema)


def test_every_config_resolves_from_plain_values():
    for name in registered():
        params = {"attributes": ["year"]} if name == "gme" else {}
        config = make_config(name, params)
        assert make_config(name, dataclasses.asdict(config)) == config  # what a bundle saves rebuilds it


@pytest.mark.parametrize(
    ("name", "params", "error"),
    [
        ("dcnv2", {"structure": "diagonal"}, r"^model.params.structure: Input should be 'stacked' or 'parallel' \(got 'diagonal'\)$"),
        ("dnn", {"activation": "swish"}, r"^model.params.activation: Input should be 'relu', 'gelu'"),
        ("deepfm", {"hidden": "abc"}, r"^model.params.hidden: Input should be a valid list \(got 'abc'\)$"),
        ("deepfm", {"hidden": [64, "x"]}, r"^model.params.hidden.1: Input should be a valid integer"),
        ("din", {"attention_activation": "swish"}, "attention_activation"),
        ("escm2", {"counterfactual": "ipw"}, "counterfactual"),
        ("chorus_cvr", {"sam_weight": "none"}, "sam_weight"),
        ("unicdr", {"aggregator": "max"}, "aggregator"),
        ("unicdr", {"user_parts": "all"}, "user_parts"),
        ("unicdr", {"eval_shared_domains": "some"}, "eval_shared_domains"),
        ("gme", {"attributes": ["year"], "variant": "gme_x"}, "variant"),
        ("fm", {"embedding_dim": 0}, "^model.params.embedding_dim: must be >= 1, got 0$"),
        ("esmm", {"conversion_label": "click"}, "^model.params.conversion_label: must differ from click_label, both are 'click'$"),
        ("mmoe", {"click_label": "conversion"}, "^model.params.conversion_label: must differ from click_label"),
        ("shared_bottom", {"domain_weights": [1.0]}, "^model.params.domain_weights: 1 weights for 2 domains$"),
        ("minet", {"long_term": False, "short_term_source": False, "short_term_target": False}, "^model.params.long_term: at least one interest"),
        ("gme", {}, "^model.params.attributes: must name at least one"),
        ("gme", {"attributes": ["year"], "cold_loss_weight": 1.5}, r"^model.params.cold_loss_weight: must be in \[0, 1\], got 1.5$"),
    ],
)
def test_config_choices_and_cross_field_rules_are_checked(name, params, error):
    with pytest.raises(ModelConfigError, match=error):
        make_config(name, params)


def test_a_config_built_in_code_names_the_key():
    with pytest.raises(ModelConfigError, match="^embedding_dim: must be >= 1, got 0$"):
        registered()["fm"].config_class(embedding_dim=0)


def test_every_model_names_its_paper_and_results_page():
    for name, cls in registered().items():
        assert cls.paper or name == "lr", name
        assert cls.results_page and (REPO / cls.results_page).is_file(), name


def test_single_task_models_predict_their_label(schema):
    for name in RANKERS:
        if not issubclass(registered()[name], Funnel):
            assert build_model(name, schema).predicted_label == "click"
            model = build_model(name, schema, {"label": "conversion"})
            assert model.predicted_label == "conversion" and set(model(make_batch(4, seed=0))) == {"conversion"}
    with pytest.raises(ModelConfigError, match=r"^model.params.label: dnn predicts 'like', not one of the data's labels \["):
        build_model("dnn", schema, {"label": "like"})


@pytest.mark.parametrize("name", RANKERS)
def test_learns_planted_rule(schema, name):
    model = build_model(name, schema)
    losses = train(model, make_batch(4000, seed=2), steps=150)
    assert sum(losses[-20:]) < 0.75 * sum(losses[:20]), (losses[:3], losses[-3:])
    test = make_batch(2000, seed=3)
    model.eval()
    with torch.inference_mode():
        probs = model.predict(model(test))
    assert roc_auc_score(test.labels["click"], probs["click"]) > 0.7
    if "ctcvr" in probs:
        ctcvr = test.labels["click"] * test.labels["conversion"]
        assert roc_auc_score(ctcvr, probs["ctcvr"]) > 0.7


# --- layers --------------------------------------------------------------------------------


def test_fm_interaction_is_the_sum_of_pairwise_products():
    x = torch.randn(3, 5, 4)
    brute = sum((x[:, i] * x[:, j]).sum(-1) for i in range(5) for j in range(i + 1, 5))
    torch.testing.assert_close(FMInteraction()(x), brute)


def test_cross_net_v2_layer_formula():
    net = CrossNetV2(6, num_layers=1)
    x0 = torch.randn(4, 6)
    torch.testing.assert_close(net(x0), x0 * net.layers[0](x0) + x0)
    assert CrossNetV2(6, num_layers=2, rank=2)(x0).shape == (4, 6)


def test_mlp_handles_leading_dims_with_batch_norm_and_dice():
    mlp = MLP(8, [16, 4], dropout=0.1, activation="dice", batch_norm=True, out_dim=1)
    assert mlp(torch.randn(5, 7, 8)).shape == (5, 7, 1)
    assert MLP(8, [4], activation="dice")(torch.randn(1, 8)).shape == (1, 4)  # one-row training batch
    with pytest.raises(ValueError, match="unknown activation"):
        MLP(8, [4], activation="nope")


def test_mixture_of_experts_one_output_per_task():
    moe = MixtureOfExperts(10, num_experts=3, num_tasks=2, hidden=[8])
    outs = moe(torch.randn(4, 10))
    assert len(outs) == 2 and all(o.shape == (4, 8) for o in outs)


@pytest.mark.parametrize("softmax", [False, True])
def test_target_attention_masks_padding(softmax):
    torch.manual_seed(0)
    att = TargetAttention(4, hidden=[8], softmax=softmax)
    history, target = torch.randn(3, 5, 4), torch.randn(3, 4)
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 0, 0, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    w = att.weights(history, target, mask)
    assert (w[~mask] == 0).all()
    if softmax:
        torch.testing.assert_close(w[:2].sum(1), torch.ones(2))
    noisy = torch.where(mask.unsqueeze(-1), history, torch.randn(3, 5, 4) * 10)
    torch.testing.assert_close(att(noisy, target, mask), att(history, target, mask))
    assert (att(history, target, mask)[2] == 0).all()  # no history -> zero interest, no NaN


# --- DIN -----------------------------------------------------------------------------------


def test_din_ignores_history_padding(schema):
    torch.manual_seed(0)
    model = build_model("din", schema)
    batch = make_batch(16, seed=4)
    longer = Batch(
        categorical=batch.categorical,
        numeric=batch.numeric,
        sequences={**batch.sequences, "hist_item_id": F.pad(batch.sequences["hist_item_id"], (6, 0))},
    )
    for mode in (True, False):
        model.train(mode)
        with torch.no_grad():
            before = model(batch)["click"]
            torch.testing.assert_close(model(longer)["click"], before)  # more left padding
            pad_row = model.embedding.vocab_offset["item_id"]
            model.embedding.table.weight[pad_row] = torch.randn(model.config.embedding_dim)  # the padding id's row
            torch.testing.assert_close(model(batch)["click"], before)


def test_din_learns_from_history(schema):
    model = build_model("din", schema)
    train(model, make_batch(4000, seed=5, rule="history"), steps=200)
    test = make_batch(2000, seed=6, rule="history")
    model.eval()
    with torch.inference_mode():
        p = model.predict(model(test))["click"]
    assert roc_auc_score(test.labels["click"], p) > 0.7


# --- multi-task ----------------------------------------------------------------------------


def test_esmm_ctcvr_is_the_product_and_loss_is_entire_space(schema):
    torch.manual_seed(0)
    model = build_model("esmm", schema)
    batch = make_batch(64, seed=7)
    outputs = model(batch)
    probs = model.predict(outputs)
    torch.testing.assert_close(probs["ctcvr"], probs["click"] * probs["conversion"])
    loss, parts = model.loss(outputs, batch)
    assert set(parts) == {"click", "ctcvr"}  # no direct CVR term
    click, conversion = batch.labels["click"], batch.labels["conversion"]
    expected = F.binary_cross_entropy(probs["click"], click)
    expected = expected + F.binary_cross_entropy(probs["ctcvr"], click * conversion)
    torch.testing.assert_close(loss, expected)
    # a conversion logged on an unclicked exposure is not a positive of any loss term
    relabelled = Batch(
        batch.categorical,
        batch.numeric,
        batch.sequences,
        labels={"click": click, "conversion": torch.where(click == 0, 1.0, conversion)},
    )
    torch.testing.assert_close(model.loss(outputs, relabelled)[0], loss)


def test_mmoe_ctcvr_is_the_conversion_tower(schema):
    model = build_model("mmoe", schema)
    probs = model.predict(model(make_batch(16, seed=8)))
    assert set(probs) == {"click", "conversion", "ctcvr"} and model.funnel_labels() == ("click", "conversion")
    torch.testing.assert_close(probs["ctcvr"], probs["conversion"])
    only_click = build_model("mmoe", schema, {"labels": ["click"]})
    assert set(only_click.predict(only_click(make_batch(16, seed=8)))) == {"click"} and only_click.funnel_labels() is None


# --- two-tower -----------------------------------------------------------------------------


def test_frequency_estimator_tracks_intervals(schema):
    model = build_model("two_tower", schema, {"frequency_alpha": 0.1})
    freq = model.frequency
    for step in range(400):
        freq.update(torch.tensor([5, 5, 7] if step % 4 == 0 else [5]))
    lp = freq.log_prob(torch.tensor([5, 7, 9]))
    torch.testing.assert_close(lp[:2], torch.tensor([0.0, -math.log(4)]), atol=0.05, rtol=0)
    assert lp[2] == 0  # never seen: B = 0, clamped to 1


def test_two_tower_logq_correction_and_duplicate_mask(schema):
    torch.manual_seed(0)
    model = build_model("two_tower", schema, {"frequency_alpha": 0.5})
    model.train()
    for seed in range(20):  # items first seen at different steps get different estimates
        model(make_batch(8, seed=seed))
    batch = make_batch(6, seed=9)
    batch.categorical[:, 1] = torch.tensor([5, 5, 7, 8, 9, 5])
    outputs = model(batch)
    logits = model.logits(outputs, batch)
    raw = outputs["user"] @ outputs["item"].T / model.config.temperature
    items = batch.categorical[:, 1]
    duplicate = (items[:, None] == items[None, :]) & ~torch.eye(6, dtype=torch.bool)
    assert torch.isneginf(logits[duplicate]).all() and duplicate.sum() == 6
    log_q = model.frequency.log_prob(items)
    assert log_q.std() > 0
    torch.testing.assert_close((logits - raw)[~duplicate], (-log_q).expand(6, 6)[~duplicate])
    loss, _ = model.loss(outputs, batch)
    assert torch.isfinite(loss)


def test_two_tower_eval_does_not_update_frequencies_and_embeds_all_items(schema):
    model = build_model("two_tower", schema).eval()
    before = {k: v.clone() for k, v in model.frequency.state_dict().items()}
    model(make_batch(8, seed=0))
    assert all(torch.equal(before[k], v) for k, v in model.frequency.state_dict().items())
    items = model.item_embeddings()
    assert items.shape == (schema.vocab_size("item_id"), model.config.out_dim)
    torch.testing.assert_close(items.norm(dim=-1), torch.ones(len(items)))
    batch = make_batch(4, seed=0)
    torch.testing.assert_close(items[batch.categorical[:, 1]], model(batch)["item"])  # row i = id i
    assert model.user_embedding(batch).shape == (4, model.config.out_dim)


def test_two_tower_learns_user_groups(schema):
    model = build_model("two_tower", schema)
    losses = train(model, make_batch(4000, seed=10, rule="retrieval"), steps=150, batch_size=128)
    assert sum(losses[-20:]) < 0.9 * sum(losses[:20])
    test = make_batch(500, seed=11, rule="retrieval")
    model.eval()
    with torch.inference_mode():
        scores = model.user_embedding(test) @ model.item_embeddings()[2:].T  # [N, items]
    relevant = (torch.arange(2, N_ITEMS + 2)[None, :] % 4) == (test.categorical[:, :1] % 4)
    assert roc_auc_score(relevant.flatten(), scores.flatten()) > 0.7


def test_a_model_declaring_a_capability_it_does_not_implement_cannot_be_built():
    class HalfRetriever(Model, Retriever):  # declares retrieval, implements only the user side
        def user_embedding(self, batch: Batch) -> torch.Tensor:
            return torch.zeros(len(batch), 4)

    with pytest.raises(TypeError, match="abstract class HalfRetriever with abstract method item_embeddings"):
        HalfRetriever(Schema(features=[Feature(name="item_id", kind=Kind.CATEGORICAL)], labels=["click"]), None)
