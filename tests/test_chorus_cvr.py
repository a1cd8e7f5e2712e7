"""ChorusCVR, ESCM2, DCMT: losses on hand-computed cases, funnel metrics, the known-truth
sources (simulator knob, semi-synthetic MovieLens), the Ali-CCP readers, learning on the
simulator and the study command."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from sklearn.metrics import log_loss, roc_auc_score

from recforge.data.batch import Batch
from recforge.data.prepare import prepare
from recforge.data.schema import Feature, Kind, Schema
from recforge.data.sources import ali_ccp, load_source, synthetic
from recforge.data.sources.movielens_funnel import fit_matrix_factorisation
from recforge.data.splits import SplitConfig
from recforge.evaluate.metrics import classification_report, ctcvr_auc, cvr_auc, entire_space_cvr_report
from recforge.models import build_model
from recforge.nn.funnel import funnel_labels, inverse_propensity
from recforge.train.trainer import TrainConfig, Trainer


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def schema() -> Schema:
    s = Schema(features=[Feature(name="item_id", kind=Kind.CATEGORICAL)], labels=["click", "conversion"])
    s.vocab_sizes = {"item_id": 10}
    return s


# four exposures: clicked+converted, clicked only, unclicked, unclicked with an impossible conversion
CLICK = torch.tensor([1.0, 1.0, 0.0, 0.0])
CONVERSION = torch.tensor([1.0, 0.0, 0.0, 1.0])
CTR_LOGIT = torch.tensor([0.0, 2.0, -1.0, -6.0])  # pCTR 0.5, 0.881, 0.269, 0.0025
CVR_LOGIT = torch.tensor([1.0, -1.0, 0.5, 0.0])
THIRD_LOGIT = torch.tensor([-0.5, 0.3, 1.5, -2.0])


def tiny_batch() -> Batch:
    return Batch(
        categorical=torch.tensor([[2], [3], [4], [5]]),
        numeric=torch.zeros(4, 0),
        labels={"click": CLICK.clone(), "conversion": CONVERSION.clone()},
    )


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def bce(y: float, p: float) -> float:
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


O = [1, 1, 0, 0]
R = [1, 0, 0, 0]  # the impossible conversion of row 4 is no conversion
P_CTR = [sig(x) for x in CTR_LOGIT.tolist()]
P_CVR = [sig(x) for x in CVR_LOGIT.tolist()]
P_3RD = [sig(x) for x in THIRD_LOGIT.tolist()]


def mean(xs) -> float:
    return sum(xs) / len(xs)


# --- building blocks ----------------------------------------------------------------------------
def test_funnel_labels_split_ambiguous_and_factual_negatives():
    labels = funnel_labels(CLICK, CONVERSION)
    assert labels["ctcvr"].tolist() == [1, 0, 0, 0]
    assert labels["factual_negative"].tolist() == [0, 1, 0, 0]  # clicked, not converted
    assert labels["ambiguous_negative"].tolist() == [0, 0, 1, 1]  # not clicked


def test_inverse_propensity_clips_and_stops_gradient():
    p = torch.tensor([0.5, 0.001, 1.0, 0.2], requires_grad=True)
    w = inverse_propensity(p, 0.01)
    torch.testing.assert_close(w, torch.tensor([2.0, 100.0, 1.0, 5.0]))
    assert not w.requires_grad


# --- ESCM2 ---------------------------------------------------------------------------------------
def test_escm2_ips_loss_by_hand(schema):
    model = build_model("escm2", schema, {"counterfactual": "ips", "propensity_clip": 0.3})
    outputs = {"click": CTR_LOGIT, "conversion": CVR_LOGIT}
    total, parts = model.loss(outputs, tiny_batch())
    w = [o / max(p, 0.3) for o, p in zip(O, P_CTR)]  # o / clip(pCTR, 0.3)
    ips = mean([wi * bce(r, p) for wi, r, p in zip(w, R, P_CVR)])
    ctr = mean([bce(o, p) for o, p in zip(O, P_CTR)])
    ctcvr = mean([bce(r, pc * pv) for r, pc, pv in zip(R, P_CTR, P_CVR)])
    assert parts["ips"] == pytest.approx(ips, rel=1e-5)
    assert parts["ctcvr"] == pytest.approx(ctcvr, rel=1e-5)
    assert float(total) == pytest.approx(ctr + 0.5 * ips + 0.5 * ctcvr, rel=1e-5)


def test_escm2_dr_error_imputation_by_hand(schema):
    model = build_model("escm2", schema, {"counterfactual": "dr", "propensity_clip": 0.3})
    outputs = {"click": CTR_LOGIT, "conversion": CVR_LOGIT, "imputation": THIRD_LOGIT}
    total, parts = model.loss(outputs, tiny_batch())
    w = [o / max(p, 0.3) for o, p in zip(O, P_CTR)]
    e = [bce(r, p) for r, p in zip(R, P_CVR)]  # errors against the (observed) labels
    e_hat = [bce(t, p) for t, p in zip(P_3RD, P_CVR)]  # errors against the imputed labels
    dr = mean([eh + wi * (ei - eh) for eh, wi, ei in zip(e_hat, w, e)])
    imputation = mean([wi * (ei - eh) ** 2 for wi, ei, eh in zip(w, e, e_hat)])
    assert parts["dr"] == pytest.approx(dr, rel=1e-5)
    assert parts["imputation"] == pytest.approx(imputation, rel=1e-5)
    ctr = mean([bce(o, p) for o, p in zip(O, P_CTR)])
    assert float(total) == pytest.approx(ctr + 0.5 * (dr + imputation) + 0.5 * float(parts["ctcvr"]), rel=1e-5)


def test_escm2_dr_reaches_unclicked_rows_and_ips_does_not(schema):
    grads = {}
    for mode in ("ips", "dr"):
        model = build_model("escm2", schema, {"counterfactual": mode, "global_weight": 0.0})
        cvr = CVR_LOGIT.clone().requires_grad_()
        outputs = {"click": CTR_LOGIT, "conversion": cvr, "imputation": THIRD_LOGIT}
        model.loss(outputs, tiny_batch())[0].backward()
        grads[mode] = cvr.grad
    assert grads["ips"][2:].abs().max() == 0  # IPS: only clicked rows supervise pCVR
    assert grads["dr"][2:].abs().min() > 0  # DR: imputed errors reach the unclicked rows
    assert grads["ips"][0] < 0 < grads["ips"][1]  # converted up, not converted down


# --- DCMT ----------------------------------------------------------------------------------------
def test_dcmt_loss_by_hand(schema):
    model = build_model("dcmt", schema, {"propensity_clip": 0.3, "counterfactual_weight": 0.1})
    outputs = {"click": CTR_LOGIT, "conversion": CVR_LOGIT, "counterfactual": THIRD_LOGIT}
    total, parts = model.loss(outputs, tiny_batch())
    w1 = [o / max(p, 0.3) for o, p in zip(O, P_CTR)]
    w0 = [(1 - o) / max(1 - p, 0.3) for o, p in zip(O, P_CTR)]
    factual = [w * bce(r, p) for w, r, p in zip(w1, R, P_CVR)]
    counterfactual = [w * bce(1 - r, p) for w, r, p in zip(w0, R, P_3RD)]  # label 1 - r
    prior = [abs(1 - a - b) for a, b in zip(P_CVR, P_3RD)]
    dcmt = mean([a + b for a, b in zip(factual, counterfactual)]) + 0.1 * mean(prior)
    assert parts["dcmt"] == pytest.approx(dcmt, rel=1e-5)
    ctr = mean([bce(o, p) for o, p in zip(O, P_CTR)])
    ctcvr = mean([bce(r, pc * pv) for r, pc, pv in zip(R, P_CTR, P_CVR)])
    assert float(total) == pytest.approx(ctr + dcmt + ctcvr, rel=1e-5)


# --- ChorusCVR -----------------------------------------------------------------------------------
@pytest.mark.parametrize("sam_weight", ["ipw", "propensity"])
def test_chorus_cvr_loss_by_hand(schema, sam_weight):
    model = build_model("chorus_cvr", schema, {"propensity_clip": 0.3, "sam_weight": sam_weight, "align_weight": 0.7})
    outputs = {"click": CTR_LOGIT, "conversion": CVR_LOGIT, "uncvr": THIRD_LOGIT}
    total, parts = model.loss(outputs, tiny_batch())
    wc = [o / max(p, 0.3) for o, p in zip(O, P_CTR)]
    expected = {
        "click": mean([bce(o, p) for o, p in zip(O, P_CTR)]),
        "ctcvr": mean([bce(r, pc * pv) for r, pc, pv in zip(R, P_CTR, P_CVR)]),
        "cvr": mean([w * bce(r, p) for w, r, p in zip(wc, R, P_CVR)]),
        # factual negatives (clicked, not converted) are the unCVR positives; unclicked are not
        "ctuncvr": mean([bce(o * (1 - r), pc * pu) for o, r, pc, pu in zip(O, R, P_CTR, P_3RD)]),
        "uncvr": mean([w * bce(1 - r, p) for w, r, p in zip(wc, R, P_3RD)]),
    }
    if sam_weight == "ipw":
        raw = [1 / max(p, 0.3) if o else 1 / max(1 - p, 0.3) for o, p in zip(O, P_CTR)]
        sam = [x / mean(raw) for x in raw]  # normalised to mean 1
    else:
        sam = [p if o else 1 - p for o, p in zip(O, P_CTR)]
    align = [bce(1 - pu, pv) + bce(1 - pv, pu) for pv, pu in zip(P_CVR, P_3RD)]
    expected["align"] = mean([s * a for s, a in zip(sam, align)])
    for name, value in expected.items():
        assert parts[name] == pytest.approx(value, rel=1e-5), name
    body = sum(v for k, v in expected.items() if k != "align")
    assert float(total) == pytest.approx(body + 0.7 * expected["align"], rel=1e-5)


def test_chorus_cvr_alignment_gradient_treats_the_other_head_as_a_fixed_soft_label(schema):
    grads = {}
    for weight in (0.0, 1.0):
        model = build_model("chorus_cvr", schema, {"align_weight": weight, "propensity_clip": 0.3})
        cvr, unc = CVR_LOGIT.clone().requires_grad_(), THIRD_LOGIT.clone().requires_grad_()
        outputs = {"click": CTR_LOGIT.clone().requires_grad_(), "conversion": cvr, "uncvr": unc}
        model.loss(outputs, tiny_batch())[0].backward()
        grads[weight] = (cvr.grad, unc.grad)
    raw = [1 / max(p, 0.3) if o else 1 / max(1 - p, 0.3) for o, p in zip(O, P_CTR)]
    sam = torch.tensor([x / mean(raw) for x in raw])
    p_cvr, p_unc = torch.tensor(P_CVR), torch.tensor(P_3RD)
    # d/dlogit BCE(target, sigmoid(logit)) = p - target, the target held fixed (stop-gradient)
    torch.testing.assert_close(grads[1.0][0] - grads[0.0][0], sam * (p_cvr - (1 - p_unc)) / 4)
    torch.testing.assert_close(grads[1.0][1] - grads[0.0][1], sam * (p_unc - (1 - p_cvr)) / 4)


def test_funnel_models_serve_cvr_and_the_ctcvr_product(schema):
    batch = tiny_batch()
    for name in ("chorus_cvr", "escm2", "dcmt"):
        model = build_model(name, schema).eval()
        probs = model.predict(model(batch))
        assert set(probs) == {"click", "conversion", "ctcvr"}  # the unCVR tower is training-only
        torch.testing.assert_close(probs["ctcvr"], probs["click"] * probs["conversion"])


# --- metrics -------------------------------------------------------------------------------------
def test_funnel_metrics_against_sklearn():
    rng = np.random.default_rng(0)
    n = 2000
    click = (rng.random(n) < 0.3).astype(float)
    would = (rng.random(n) < 0.4).astype(float)
    conversion = click * would
    p_cvr = np.clip(0.4 * would + 0.6 * rng.random(n), 1e-3, 1 - 1e-3)
    p_ctcvr = rng.random(n)
    true_cvr = np.clip(0.3 + 0.2 * would + 0.1 * rng.random(n), 0, 1)
    clicked = click == 1
    assert cvr_auc(click, conversion, p_cvr) == pytest.approx(roc_auc_score(conversion[clicked], p_cvr[clicked]))
    assert ctcvr_auc(click, conversion, p_ctcvr) == pytest.approx(roc_auc_score(conversion, p_ctcvr))
    report = entire_space_cvr_report(click, would, true_cvr, p_cvr)
    assert report["es_cvr_auc"] == pytest.approx(roc_auc_score(would, p_cvr))
    assert report["es_cvr_auc_unclicked"] == pytest.approx(roc_auc_score(would[~clicked], p_cvr[~clicked]))
    assert report["es_cvr_bayes_auc"] == pytest.approx(roc_auc_score(would, true_cvr))
    assert report["es_cvr_logloss"] == pytest.approx(log_loss(would, p_cvr), rel=1e-6)
    assert report["unclicked_pred_cvr"] == pytest.approx(p_cvr[~clicked].mean())
    assert report["unclicked_calibration"] == pytest.approx(p_cvr[~clicked].mean() / true_cvr[~clicked].mean())
    masked = classification_report({"conversion": conversion}, {"conversion": p_cvr}, rows={"conversion": clicked})
    assert masked["conversion_auc"] == pytest.approx(roc_auc_score(conversion[clicked], p_cvr[clicked]))
    assert masked["conversion_logloss"] == pytest.approx(log_loss(conversion[clicked], p_cvr[clicked]), rel=1e-6)


def test_trainer_scores_post_click_conversion_on_clicked_rows(tmp_path):
    store = prepare(synthetic.generate(n_rows=4000, n_users=200, n_items=100, history_len=0, seed=1), tmp_path / "s")
    model = build_model("esmm", store.schema, {"hidden": [8]}).eval()
    metrics = Trainer(model, store, TrainConfig(quiet=True), tmp_path / "run").evaluate("test")
    view = store.split("test")
    with torch.inference_mode():
        probs = model.predict(model(view.take(np.arange(len(view)))))
    click, conversion = view.column("click"), view.column("conversion")
    clicked = click == 1
    assert metrics["test_conversion_auc"] == pytest.approx(roc_auc_score(conversion[clicked], probs["conversion"][clicked]))
    assert metrics["test_ctcvr_auc"] == pytest.approx(roc_auc_score(click * conversion, probs["ctcvr"]))
    assert metrics["test_click_auc"] == pytest.approx(roc_auc_score(click, probs["click"]))


# --- sources -------------------------------------------------------------------------------------
def test_simulator_selection_bias_knob():
    frames = {b: synthetic.generate(n_rows=40_000, history_len=0, selection_bias=b, seed=2).frame for b in (0.0, 2.0)}
    for f in frames.values():
        assert (f["conversion"] == f["click"] * f["would_convert"]).all()
        np.testing.assert_allclose(f["p_conversion"], f["p_click"] * f["p_cvr"])
        assert not {"p_cvr", "would_convert"} & set(synthetic.schema(n_numeric=4, history_len=0).raw_columns())
    gap = {}
    for b, f in frames.items():
        clicked = f["click"].to_numpy() == 1
        gap[b] = f["p_cvr"].to_numpy()[clicked].mean() / f["p_cvr"].to_numpy()[~clicked].mean()
        assert abs(f["click"].mean() - 0.1) < 0.01
    assert abs(gap[0.0] - 1) < 0.2  # no selection term: clicked rows convert about like the rest
    assert gap[2.0] > 2.5  # strong bias: the clicked rows are the would-convert ones
    corr = {b: np.corrcoef(f["p_click"].to_numpy(), f["p_cvr"].to_numpy())[0, 1] for b, f in frames.items()}
    assert corr[0.0] < 0.2 and corr[2.0] > 0.6
    with pytest.raises(ValueError, match="selection_bias"):
        synthetic.generate(n_rows=10, selection_bias=-1.0)


def test_matrix_factorisation_completes_a_low_rank_matrix():
    rng = np.random.default_rng(0)
    truth = 3 + rng.normal(size=(60, 2)) @ rng.normal(size=(2, 40))  # rank 2 plus an offset
    users, items = np.divmod(np.arange(60 * 40), 40)
    seen = rng.random(len(users)) < 0.6
    held = ~seen

    def error(steps: int) -> float:
        completed = fit_matrix_factorisation(users[seen], items[seen], truth[users[seen], items[seen]], 2, steps)
        return float(np.sqrt(np.mean((completed[users[held], items[held]] - truth[users[held], items[held]]) ** 2)))

    mean_only = np.sqrt(np.mean((truth[users[held], items[held]] - truth[users[seen], items[seen]].mean()) ** 2))
    # the low-rank part recovers unseen cells far better than the biases alone or the mean
    assert error(20) < 0.6 * min(error(0), mean_only)


def test_movielens_funnel_truth_columns(real_data):
    root = real_data("movielens-1m")
    raw = load_source("movielens-1m-funnel", exposures_per_user=3, seed=5, root=root)
    f = raw.frame
    assert f.height == 6040 * 3
    assert f.group_by("user_id").agg(pl.col("item_id").n_unique())["item_id"].min() == 3  # distinct per user
    assert (f["conversion"] == f["click"] * f["would_convert"]).all()
    np.testing.assert_allclose(f["p_cvr"], 1 / (1 + np.exp(-2.0 * (f["completed_rating"].to_numpy() - 4.0))))
    np.testing.assert_allclose(f["p_conversion"], f["p_click"] * f["p_cvr"])
    assert f["completed_rating"].min() >= 1 and f["completed_rating"].max() <= 5
    assert abs(f["click"].mean() - 0.15) < 0.02
    clicked = f["click"].to_numpy() == 1
    assert f["p_cvr"].to_numpy()[clicked].mean() > 1.3 * f["p_cvr"].to_numpy()[~clicked].mean()  # MNAR clicks
    truth_columns = {"p_click", "p_cvr", "p_conversion", "would_convert", "completed_rating"}
    assert not truth_columns & set(raw.schema.raw_columns())  # never features
    assert raw.schema.labels == ["click", "conversion"]


def write_raw_ali_ccp(root: Path) -> None:
    def features(*items):
        return "\x01".join(f"{field}\x02{fid}\x03{value}" for field, fid, value in items)

    common = [
        f"cA,2,{features(('101', 'u1', '1.0'), ('121', 'g1', '1.0'))}",
        f"cB,3,{features(('101', 'u2', '1.0'), ('109_14', 'h1', '0.5'), ('109_14', 'h2', '0.7'))}",
    ]
    skeleton = [
        f"1,1,1,cA,2,{features(('205', 'i1', '1.0'), ('508', 'x1', '0.3'))}",
        f"2,0,0,cB,2,{features(('205', 'i2', '1.0'), ('999', 'ignored', '1.0'))}",
        f"3,0,1,cB,1,{features(('205', 'i3', '1.0'))}",  # impossible: conversion without click
        f"4,1,0,cA,1,{features(('205', 'i1', '1.0'))}",
    ]
    (root / "common_features_train.csv").write_text("\n".join(common) + "\n")
    (root / "sample_skeleton_train.csv").write_text("\n".join(skeleton) + "\n")


def test_ali_ccp_raw_format(tmp_path):
    write_raw_ali_ccp(tmp_path)
    raw = ali_ccp.load(root=tmp_path, parts=["train"])
    f = raw.frame
    assert "dropped 1 rows" in raw.origin
    assert f["click"].to_list() == [1, 0, 1] and f["conversion"].to_list() == [1, 0, 0]
    assert f["101"].to_list() == ["u1", "u2", "u1"]  # user side joined from common features
    assert f["205"].to_list() == ["i1", "i2", "i1"]
    assert f["121"].to_list() == ["g1", "0", "g1"]  # absent field -> "0"
    assert f["109_14"].to_list() == ["0", "h2", "0"]  # repeated field: the last one wins
    assert f["D109_14"].to_list() == pytest.approx([0.0, 0.7, 0.0])
    assert f["D508"].to_list() == pytest.approx([0.3, 0.0, 0.0])
    assert list(f.columns[:23]) == list(ali_ccp.SPARSE)
    store = prepare(raw, tmp_path / "store", SplitConfig(ratios=(1.0, 0.0, 0.0)))
    assert len(store.split("train")) == 3


def test_ali_ccp_raw_format_errors_name_file_and_line(tmp_path):
    write_raw_ali_ccp(tmp_path)
    path = tmp_path / "sample_skeleton_train.csv"
    path.write_text(path.read_text() + "5,1,0,cZ,0,205\x02i9\x031.0\n")
    with pytest.raises(ValueError, match=r"sample_skeleton_train.csv, line 5: common_feature_index 'cZ'"):
        ali_ccp.load(root=tmp_path, parts=["train"])
    path.write_text("1,1,1,cA\n")
    with pytest.raises(ValueError, match="line 1: expected 6"):
        ali_ccp.load(root=tmp_path, parts=["train"])


def test_ali_ccp_processed_sample(real_data, tmp_path):
    raw = load_source("ali-ccp", root=real_data("ali-ccp-sample"))
    f = raw.frame
    assert f.height == 200 and set(f["part"].unique()) == {"train", "val", "test"}
    assert f.filter(pl.col("click") == 0)["conversion"].sum() == 0
    assert (f["conversion"] == 1).sum() == 3 and (f["click"] == 1).sum() == 12
    store = prepare(raw, tmp_path / "store")
    model = build_model("chorus_cvr", store.schema)
    batch = store.split("train").take(np.arange(8))
    loss, parts = model.loss(model(batch), batch)
    assert torch.isfinite(loss) and set(parts) == {"click", "ctcvr", "cvr", "ctuncvr", "uncvr", "align"}


# --- learning ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def simulator_store(tmp_path_factory):
    raw = synthetic.generate(n_rows=60_000, n_users=500, n_items=300, n_fields=2, n_numeric=2,
                             history_len=0, conversion_rate=0.3, selection_bias=1.0, seed=4)  # fmt: skip
    store = prepare(raw, tmp_path_factory.mktemp("sim") / "store", SplitConfig(seed=4))
    return store, raw.frame


@pytest.mark.parametrize(
    "name, params",
    [("esmm", {"hidden": [32, 16]}), ("escm2", {"counterfactual": "ips"}), ("escm2", {"counterfactual": "dr"}),
     ("dcmt", {}), ("chorus_cvr", {})],  # fmt: skip
)
def test_model_learns_entire_space_cvr_on_the_simulator(simulator_store, tmp_path, name, params):
    store, frame = simulator_store
    small = {} if name == "esmm" else {"shared": [32], "tower": [16]}
    torch.manual_seed(0)
    model = build_model(name, store.schema, {**params, **small})
    config = TrainConfig(epochs=2, batch_size=512, lr=0.01, patience=None, quiet=True, checkpoint_every_steps=0)
    Trainer(model, store, config, tmp_path).fit()
    view = store.split("test")
    with torch.inference_mode():
        p_cvr = model.eval().predict(model(view.take(np.arange(len(view)))))["conversion"].numpy()
    truth = frame[np.asarray(view.row)]
    report = entire_space_cvr_report(truth["click"], truth["would_convert"], truth["p_cvr"], p_cvr)
    # Bayes ceiling 0.74 here; 12,000 test exposures put the AUC's standard error near 0.006
    assert report["es_cvr_auc"] > 0.58, report
    assert report["es_cvr_auc_unclicked"] > 0.57, report


# --- the study command ---------------------------------------------------------------------------
