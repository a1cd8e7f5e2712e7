"""The ``pretrain_finetune`` protocol: pretraining, restoring its tables, fine-tuning; stages kept
across a resumed study; the ablation without pretraining."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from recforge.bundle import load_bundle
from recforge.config import ConfigError
from recforge.study import run_study, runs
from recforge.train import trainer as trainer_module

DATA = {"source": "synthetic", "options": {"n_rows": 2000, "n_users": 80, "n_items": 50, "history_len": 12}}
TRAIN = {"epochs": 1, "batch_size": 256, "lr": 0.01, "monitor": "valid_click_auc", "num_threads": 1, "quiet": True,
         "checkpoint_every_steps": 0}  # fmt: skip
SEMINAR = {"name": "seminar", "params": {"embedding_dim": 8, "heads": 2, "top_k": 4, "hidden": [16], "query_history": None, "text": None}}


def spec(**changes) -> dict:
    out = {
        "name": "pf", "protocol": "pretrain_finetune", "params": {"pretrain": ["model.params.pretrain=true", "train.lr=0.02"]},
        "seeds": [0], "defaults": {"data": DATA, "train": TRAIN},
        "variants": [{"label": "with PSU", "model": SEMINAR}, {"label": "without PSU", "model": SEMINAR, "params": {"pretrained": False}}],
        "tables": [{"title": "t", "metrics": ["click_auc"]}], "pages": ["page.md"], "records": "records.json",
    }  # fmt: skip
    out.update(changes)
    return out


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RECFORGE_QUIET", "1")
    return tmp_path


def _runs(found: dict) -> dict[str, dict]:
    return {run["variant"]: run for run in found["runs"]}


def test_fine_tuning_starts_from_the_pretrained_tables(workdir):
    (workdir / "spec.yaml").write_text(yaml.safe_dump(spec()))
    found = run_study(workdir / "spec.yaml", workdir / "runs", workdir / "stores", log=lambda _: None)
    runs = _runs(found)
    stages = {r["group"].get("stage") for r in runs["with PSU"]["records"]}
    assert stages == {"pretrain", None} and {r["group"].get("stage") for r in runs["without PSU"]["records"]} == {None}
    assert any(r["split"] == "test" and r["metric"] == "click_auc" and not r["group"] for r in runs["with PSU"]["records"])
    folders = {p.parent.parent.name: p.parent.parent for p in (workdir / "runs").rglob("finetune/metrics.json")}
    assert len(folders) == 2
    with_psu = next(f for f in folders.values() if (f / "pretrain").exists())
    psu, tuned = load_bundle(with_psu / "pretrain" / "model"), load_bundle(with_psu / "finetune" / "model")
    assert psu.config.pretrain and not tuned.config.pretrain
    without = next(f for f in folders.values() if not (f / "pretrain").exists())
    # with one fine-tuning epoch the tuned table is still nearer the pretrained one than a fresh start is
    table = lambda m: m.state_dict()["embedding.table.weight"]  # noqa: E731
    plain = load_bundle(without / "finetune" / "model")
    assert (table(tuned) - table(psu)).norm() < (table(plain) - table(psu)).norm()


def test_a_resumed_study_trains_only_the_missing_stage(workdir, monkeypatch):
    (workdir / "spec.yaml").write_text(yaml.safe_dump(spec(variants=spec()["variants"][:1])))
    run_study(workdir / "spec.yaml", workdir / "runs", workdir / "stores", log=lambda _: None)
    folder = next((workdir / "runs").rglob("finetune/metrics.json")).parent.parent
    pretrained = json.loads((folder / "pretrain" / "metrics.json").read_text())
    weights = load_bundle(folder / "pretrain" / "model").state_dict()["embedding.table.weight"].clone()
    (folder / "finetune" / "metrics.json").unlink()  # as if killed during fine-tuning
    (folder / runs.RECORD_FILE).unlink()
    (workdir / "records.json").unlink()
    trained = []
    fit = trainer_module.Trainer.fit
    monkeypatch.setattr(trainer_module.Trainer, "fit", lambda self, resume=False: trained.append(self.out_dir.name) or fit(self, resume))
    found = run_study(workdir / "spec.yaml", workdir / "runs", workdir / "stores", log=lambda _: None)
    assert trained == ["finetune"]
    assert json.loads((folder / "pretrain" / "metrics.json").read_text()) == pretrained
    assert torch.equal(load_bundle(folder / "pretrain" / "model").state_dict()["embedding.table.weight"], weights)
    assert len(found["runs"]) == 1


def test_bad_pretrain_overrides_name_the_key(workdir):
    bad = spec(params={"pretrain": ["model.params.heads=0"]}, variants=spec()["variants"][:1])
    (workdir / "spec.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match=r"^with PSU: params.pretrain: model.params.heads: must be >= 1, got 0$"):
        run_study(workdir / "spec.yaml", workdir / "runs", workdir / "stores", log=lambda _: None)


def test_candidate_evaluation_ranks_each_held_out_item_against_sampled_ones(workdir):
    params = {"pretrain": ["model.params.pretrain=true"], "evaluation": "candidates", "negatives": 20, "valid_rows": 50}
    train = {**TRAIN, "monitor": "valid_ndcg@10"}
    changed = spec(params=params, variants=spec()["variants"][:1], defaults={"data": DATA, "train": train})
    (workdir / "spec.yaml").write_text(yaml.safe_dump(changed))
    found = run_study(workdir / "spec.yaml", workdir / "runs", workdir / "stores", log=lambda _: None)
    test = {r["metric"]: r["value"] for r in found["runs"][0]["records"] if r["split"] == "test" and not r["group"]}
    assert {"hr@1", "hr@10", "ndcg@10", "mrr", "popular_ndcg@10"} <= set(test)
    assert 0 <= test["hr@1"] <= test["hr@10"] <= test["hr@50"] == 1.0  # 21 candidates: all within the top 50
    valid = {r["metric"]: r["value"] for r in found["runs"][0]["records"] if r["split"] == "valid" and not r["group"]}
    assert valid["ranked_rows"] == 50


SIMULATED = {"source": "lifelong-simulator", "options": {"n_users": 40, "min_events": 60, "max_events": 300, "n_items": 800,
             "n_clusters": 20, "interests_per_user": 2, "history_len": 40, "seed": 1}}  # fmt: skip


def test_lifelong_recall_measures_the_searched_share_of_the_planted_events(workdir):
    twin = {"name": "twin", "params": {"embedding_dim": 8, "heads": 2, "hidden": [8]}}
    variants = [{"label": "keeps all", "model": {**twin, "params": {**twin["params"], "top_k": 40}}, "params": {"pretrained": False}},
                {"label": "keeps 4", "model": {**twin, "params": {**twin["params"], "top_k": 4}}, "params": {"pretrained": False}}]  # fmt: skip
    changed = spec(protocol="lifelong_recall", variants=variants, defaults={"data": SIMULATED, "train": TRAIN})
    (workdir / "spec.yaml").write_text(yaml.safe_dump(changed))
    found = run_study(workdir / "spec.yaml", workdir / "runs", workdir / "stores", log=lambda _: None)
    test = {run["variant"]: {r["metric"]: r["value"] for r in run["records"] if r["split"] == "test"} for run in found["runs"]}
    assert test["keeps all"]["gsu_recall"] == pytest.approx(1.0) and test["keeps all"]["random_recall"] == pytest.approx(1.0)
    few = test["keeps 4"]
    assert few["relevant_rows"] > 0 and 0 < few["gsu_recall"] < 1 and 0 < few["random_recall"] < 0.5 and 0 <= few["recent_recall"] < 1
    assert 0.5 < few["bayes_auc"] == test["keeps all"]["bayes_auc"] < 1  # the same test rows' truth


def test_lifelong_recall_needs_the_simulator(workdir):
    changed = spec(protocol="lifelong_recall", variants=spec()["variants"][1:])
    (workdir / "spec.yaml").write_text(yaml.safe_dump(changed))
    with pytest.raises(ConfigError, match="the lifelong_recall protocol reads the truth of data.source lifelong-simulator, not 'synthetic'"):
        run_study(workdir / "spec.yaml", workdir / "runs", workdir / "stores", log=lambda _: None)
