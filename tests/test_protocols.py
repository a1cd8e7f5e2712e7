"""Each study protocol run through the engine on tiny data, as a user's spec would run it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml

from recforge.config import ConfigError
from recforge.data.schema import Feature, Kind, Schema
from recforge.study import run_study

pytestmark = pytest.mark.usefixtures("single_thread")
TRAIN = {"epochs": 1, "batch_size": 128, "lr": 0.01, "num_threads": 1, "quiet": True, "checkpoint_every_steps": 0}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RECFORGE_QUIET", "1")
    return tmp_path


def write_table(folder: Path, frame: pl.DataFrame, schema: Schema) -> dict:
    """A user's own table and schema on disk: the ``file`` source's data section."""
    frame.write_parquet(folder / "data.parquet")
    schema.save(folder / "schema.json")
    return {"source": "file", "options": {"path": str(folder / "data.parquet"), "schema": str(folder / "schema.json")}}


def study(folder: Path, **spec) -> list[dict]:
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "pages": ["page.md"], "records": "records.json", **spec}, sort_keys=False))
    run_study(path, folder / "runs", folder / "stores", log=lambda _: None)
    return json.loads((folder / "records.json").read_text())["runs"]


def values(run: dict, split: str, metric: str, **group: str) -> list[float]:
    return [r["value"] for r in run["records"] if r["split"] == split and r["metric"] == metric and group.items() <= r["group"].items()]


# --- entire_space_cvr ---------------------------------------------------------------------------
def test_entire_space_cvr_scores_pcvr_over_every_exposure(workdir):
    data = {"source": "synthetic", "options": {"n_rows": 6000, "n_users": 200, "n_items": 80, "history_len": 0, "selection_bias": 1.0}}
    found = study(
        workdir, protocol="entire_space_cvr", seeds=[0], seed_keys=["train.seed"],
        defaults={"data": data, "train": {**TRAIN, "monitor": "valid_conversion_auc"}},
        variants=[{"label": "ESMM", "model": {"name": "esmm", "params": {"hidden": [16]}}}],
        tables=[{"title": "t", "metrics": ["es_cvr_auc"]}],
    )  # fmt: skip
    (run,) = found
    for metric in ("es_cvr_auc", "es_cvr_auc_unclicked", "es_cvr_bayes_auc", "unclicked_calibration", "conversion_auc", "ctcvr_auc"):
        assert len(values(run, "test", metric)) == 1, metric
    assert 0.5 < values(run, "test", "es_cvr_bayes_auc")[0] <= 1.0
    assert values(run, "fit", "epochs") == [1.0]
    assert "| ESMM | 1 |" in (workdir / "page.md").read_text()


def test_entire_space_cvr_needs_a_funnel_model(workdir):
    data = {"source": "synthetic", "options": {"n_rows": 3000, "n_users": 100, "n_items": 50, "history_len": 0, "selection_bias": 1.0}}
    with pytest.raises(ValueError, match="model 'lr' predicts no click -> conversion funnel"):
        study(workdir, protocol="entire_space_cvr", defaults={"data": data, "train": {**TRAIN, "monitor": "valid_click_auc"}},
              variants=[{"label": "LR", "model": {"name": "lr"}}])  # fmt: skip


# --- cold_start ---------------------------------------------------------------------------------
def cold_start_table(folder: Path) -> dict:
    """Old items 0..11 (90 rows each) and new items 100..105 (50 rows each); the click rate follows
    the item's genre and year, so its attributes carry what its ID embedding should learn."""
    rng = np.random.default_rng(0)
    items = np.r_[np.repeat(np.arange(12), 90), np.repeat(100 + np.arange(6), 50)]
    rng.shuffle(items)
    key = np.where(items >= 100, items - 100 + 12, items)
    genre, year = key % 4, key % 3
    logit = np.array([-1.5, -0.5, 0.5, 1.5])[genre] + np.array([-0.5, 0.0, 0.5])[year]
    frame = pl.DataFrame({
        "user_id": rng.integers(0, 30, len(items)), "item_id": items, "year": [str(1990 + y) for y in year],
        "genres": [[f"g{a}", f"g{(a + 1) % 4}"] for a in genre], "timestamp": np.arange(len(items)),
        "click": (rng.random(len(items)) < 1 / (1 + np.exp(-logit))).astype(np.int8),
    })  # fmt: skip
    features = [Feature(name="user_id", kind=Kind.CATEGORICAL), Feature(name="item_id", kind=Kind.CATEGORICAL),
                Feature(name="year", kind=Kind.CATEGORICAL), Feature(name="genres", kind=Kind.SEQUENCE, max_len=3)]  # fmt: skip
    data = write_table(folder, frame, Schema(features=features, labels=["click"], user="user_id", time="timestamp"))
    data["split"] = {"kind": "cold_start", "fit_on": ["train", "valid"], "old_min_count": 80, "new_min_count": 40, "warm_rows": 30}
    return data


COLD_PARAMS = {"attributes": ["year", "genres"], "methods": ["random", "gme_a"], "shot": 10, "meta_items": 2, "meta_lr": 0.01,
               "warm_lr": 0.05, "warm_batch_size": 32}  # fmt: skip


def test_cold_start_runs_every_method_and_phase(workdir):
    found = study(
        workdir, protocol="cold_start", params=COLD_PARAMS, seeds=[0],
        defaults={"data": cold_start_table(workdir), "train": {**TRAIN, "epochs": 2}},
        variants=[{"label": "dnn", "model": {"name": "dnn", "params": {"embedding_dim": 8, "hidden": [16]}}}],
        tables=[{"title": "t", "rows": "method", "across": "phase", "where": {"phase": ["cold", "warm-a", "warm-b", "warm-c"]},
                 "metrics": ["auc"]}],
    )  # fmt: skip
    (run,) = found
    for method in ("random", "gme_a"):
        aucs = [values(run, "test", "auc", method=method, phase=p)[0] for p in ("cold", "warm-a", "warm-b", "warm-c")]
        assert all(0.0 <= a <= 1.0 for a in aucs)
        assert aucs[-1] > aucs[0], (method, aucs)  # the warm-ups train the new items' rows
    assert values(run, "meta", "loss_cold", method="gme_a") and not values(run, "meta", "loss_cold", method="random")
    assert values(run, "valid", "click_auc", method="pretrain")
    page = (workdir / "page.md").read_text()
    assert "| method | seeds | cold auc | warm-a auc | warm-b auc | warm-c auc |" in page and "| gme_a | 1 |" in page


def test_cold_start_refuses_a_split_without_new_item_ids(workdir):
    data = cold_start_table(workdir)
    data["split"]["fit_on"] = ["train"]
    with pytest.raises(ValueError, match="data.split needs kind cold_start and fit_on \\[train, valid\\]"):
        study(workdir, protocol="cold_start", params=COLD_PARAMS, defaults={"data": data, "train": TRAIN},
              variants=[{"label": "dnn", "model": {"name": "dnn"}}])  # fmt: skip
    with pytest.raises(ConfigError, match="params: methods.0: Input should be 'random', 'meta_emb'"):
        study(workdir, protocol="cold_start", params={**COLD_PARAMS, "methods": ["gme_x"]}, defaults={"data": data, "train": TRAIN},
              variants=[{"label": "dnn", "model": {"name": "dnn"}}])  # fmt: skip


# --- cross_domain -------------------------------------------------------------------------------
def cross_domain_table(folder: Path) -> dict:
    """Two domains; a user's group (4 groups) decides which items it picks in both."""
    rng = np.random.default_rng(0)
    rows = []
    for domain in ("a", "b"):
        for user in range(80):
            liked = np.arange((user % 4) * 6, (user % 4 + 1) * 6)
            rows += [(user, f"{domain}:{item}", domain, t) for t, item in enumerate(rng.choice(liked, 8))]
    frame = pl.DataFrame(rows, schema=["user_id", "item_id", "domain", "t"], orient="row").with_columns(pl.lit(1, dtype=pl.Int8).alias("click"))
    features = [Feature(name=c, kind=Kind.CATEGORICAL) for c in ("user_id", "item_id", "domain")]
    features.append(Feature(name="hist_item_id", kind=Kind.SEQUENCE, timeline="item_id", max_len=5))
    data = write_table(folder, frame, Schema(features=features, labels=["click"], user="user_id", time="t", domain="domain"))
    data["split"] = {"kind": "cross_domain"}
    return data


def test_cross_domain_ranks_each_domain_with_a_popularity_reference(workdir):
    found = study(
        workdir, protocol="cross_domain", params={"eval_negatives": 10}, seeds=[0],
        defaults={"data": cross_domain_table(workdir), "train": {**TRAIN, "epochs": 3, "batch_size": 64, "lr": 0.003, "monitor": "valid_ndcg@10"}},
        variants=[
            {"label": "UniCDR", "model": {"name": "unicdr", "params": {"embedding_dim": 16, "num_negatives": 4, "dropout": 0.0}}},
            {"label": "two-tower", "model": {"name": "two_tower", "params": {"embedding_dim": 8, "hidden": [16], "out_dim": 8}},
             "params": {"single_domain": True}},
        ],
        tables=[{"title": "t", "across": "domain", "where": {"scorer": "model"}, "metrics": ["ndcg@10"],
                 "extra_rows": [{"title": "popular", "where": {"scorer": "popular"}}]}],
    )  # fmt: skip
    unicdr, two_tower = found
    for run in found:
        for domain in ("a", "b"):
            for scorer in ("model", "popular"):
                (ndcg,) = values(run, "test", "ndcg@10", domain=domain, users="warm", scorer=scorer)
                assert 0.0 <= ndcg <= 1.0
    # the planted groups are learnable: UniCDR ranks far above the shared popularity order
    for domain in ("a", "b"):
        assert values(unicdr, "test", "ndcg@10", domain=domain, scorer="model")[0] > values(unicdr, "test", "ndcg@10", domain=domain, scorer="popular")[0] + 0.1
    runs = workdir / "runs" / "cross_domain"
    assert len(list(runs.glob("*/model/model.json"))) == 1 and len(list(runs.glob("*/[ab]/model/model.json"))) == 2
    assert values(two_tower, "fit", "epochs", domain="a") and values(two_tower, "fit", "epochs", domain="b")
    assert "| popular |" in (workdir / "page.md").read_text()


def test_single_domain_variant_takes_per_domain_params_and_checks_domains(workdir):
    data = cross_domain_table(workdir)
    variant = {"label": "two-tower", "model": {"name": "two_tower", "params": {"embedding_dim": 8, "hidden": [16], "out_dim": 8}},
               "params": {"single_domain": True, "domain_params": {"b": {"out_dim": 4}}}}  # fmt: skip
    study(workdir, protocol="cross_domain", params={"eval_negatives": 10},
          defaults={"data": data, "train": {**TRAIN, "monitor": "valid_ndcg@10"}}, variants=[variant])  # fmt: skip
    (folder,) = (workdir / "runs" / "cross_domain").iterdir()
    out_dims = {d: json.loads((folder / d / "model" / "model.json").read_text())["params"]["out_dim"] for d in ("a", "b")}
    assert out_dims == {"a": 8, "b": 4}
    variant["params"]["domain_params"] = {"c": {"out_dim": 4}}
    with pytest.raises(ValueError, match=r"two-tower: domain_params names unknown domains \['c'\]; known: \['a', 'b'\]"):
        study(workdir / "runs", protocol="cross_domain", params={"eval_negatives": 10},
              defaults={"data": data, "train": {**TRAIN, "monitor": "valid_ndcg@10"}}, variants=[variant])  # fmt: skip


def test_unicdr_by_plain_train_names_its_protocol(workdir):
    from recforge.config import ExperimentConfig
    from recforge.experiment import run

    config = ExperimentConfig.model_validate({"name": "x", "data": cross_domain_table(workdir), "model": {"name": "unicdr"}})
    with pytest.raises(ValueError, match="model 'unicdr' trains under the 'cross_domain' protocol: run it with `recforge study"):
        run(config, workdir / "run")
