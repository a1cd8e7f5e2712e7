"""A store follows its inputs; `evaluate` encodes with the bundle's vocabularies, never refitted ones."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recforge.config import DataConfig
from recforge.data.prepare import Fitted, prepare
from recforge.data.sources import load_file
from recforge.experiment import evaluate_run, prepare_store
from tests.bad_input.files import SCHEMA, log_rows, recforge, write_csv


def _user_files(folder: Path, rows: list[dict]) -> DataConfig:
    write_csv(folder / "log.csv", rows)
    (folder / "schema.json").write_text(json.dumps(SCHEMA))
    return DataConfig.model_validate(
        {"source": "file", "options": {"path": str(folder / "log.csv"), "schema": str(folder / "schema.json")}}
    )


def test_a_changed_input_re_prepares_the_store_and_says_why(tmp_path):
    data = _user_files(tmp_path, log_rows(300))
    said: list[str] = []
    first = prepare_store(data, tmp_path / "stores", notice=said.append)
    assert said == [] and len(first.split("train")) + len(first.split("valid")) + len(first.split("test")) == 300

    os.utime(tmp_path / "log.csv", ns=(1, 1))  # touched, content the same: the store stays
    again = prepare_store(data, tmp_path / "stores", notice=said.append)
    assert said == [] and again.fingerprint == first.fingerprint

    write_csv(tmp_path / "log.csv", log_rows(200, seed=1))  # edited: prepared again, with one line
    edited = prepare_store(data, tmp_path / "stores", notice=said.append)
    assert said == [f"store {first.path}: its input {(tmp_path / 'log.csv').resolve()} changed; preparing it again"]
    assert edited.fingerprint != first.fingerprint
    assert sum(len(edited.split(s)) for s in ("train", "valid", "test")) == 200

    schema = dict(SCHEMA, features=SCHEMA["features"][:3])  # the schema file is an input too
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    said.clear()
    dropped = prepare_store(data, tmp_path / "stores", notice=said.append)
    assert said and "schema.json changed" in said[0]
    assert [f.name for f in dropped.schema.features] == ["user_id", "item_id", "zip"]


def test_an_edited_public_data_file_is_noticed(tmp_path, monkeypatch):
    folder = tmp_path / "data" / "movielens-100k" / "ml-100k"
    folder.mkdir(parents=True)
    source = Path(os.environ.get("RECFORGE_DATA", "/nonexistent")) / "movielens-100k" / "ml-100k"
    if not source.is_dir():
        pytest.skip("RECFORGE_DATA/movielens-100k is missing")
    for name in ("u.data", "u.item", "u.user"):
        (folder / name).write_bytes((source / name).read_bytes())
    monkeypatch.setenv("RECFORGE_DATA", str(tmp_path / "data"))
    data = DataConfig.model_validate({"source": "movielens-100k", "options": {"history_len": 0}})
    said: list[str] = []
    prepare_store(data, tmp_path / "stores", notice=said.append)
    (folder / "u.user").write_text((folder / "u.user").read_text().replace("|M|", "|F|", 1))
    prepare_store(data, tmp_path / "stores", notice=said.append)
    assert len(said) == 1 and said[0].endswith(f"its input {(folder / 'u.user').resolve()} changed; preparing it again")


def test_saved_vocabularies_encode_new_rows_as_at_training(tmp_path):
    rows = log_rows(400)
    data = _user_files(tmp_path, rows)
    store = prepare(load_file(tmp_path / "log.csv", tmp_path / "schema.json"), tmp_path / "store", data.split)
    # new rows: a new item, and known items whose frequencies differ from the training rows
    fresh = [dict(r, item_id=r["item_id"] if i % 3 else 999) for i, r in enumerate(log_rows(120, seed=7))]
    write_csv(tmp_path / "new.csv", fresh)
    again = prepare(load_file(tmp_path / "new.csv", tmp_path / "schema.json"), tmp_path / "again", data.split,
                    fitted=Fitted.load(store.path))  # fmt: skip
    vocab = dict(zip(*store.vocabulary("item_id").select("value", "index").to_dict(as_series=False).values()))
    column = again.schema.categorical_index("item_id")
    for split in ("train", "valid", "test"):
        view = again.split(split)
        raw = np.asarray([str(fresh[r]["item_id"]) for r in view.row])
        expected = np.asarray([vocab.get(v, 1) for v in raw])
        assert (view.categorical[:, column] == expected).all()
    oov = json.loads((again.path / "oov.json").read_text())
    assert sum(oov[s]["item_id"] for s in oov) == sum(r["item_id"] == 999 for r in fresh) > 0
    assert again.schema.vocab_sizes == store.schema.vocab_sizes
    assert json.loads((again.path / "normalisers.json").read_text()) == json.loads((store.path / "normalisers.json").read_text())


def test_evaluate_scores_the_same_test_rows_alike_after_the_training_rows_changed(tmp_path):
    rows = [dict(r, split="test" if i % 5 == 0 else "valid" if i % 5 == 1 else "train") for i, r in enumerate(log_rows(1500))]
    write_csv(tmp_path / "log.csv", rows)
    (tmp_path / "schema.json").write_text(json.dumps(SCHEMA))
    (tmp_path / "mine.yaml").write_text(
        "name: mine\ndata: {source: file, options: {path: log.csv, schema: schema.json}, split: {kind: column}}\n"
        "model: {name: lr}\ntrain: {epochs: 2, batch_size: 64, quiet: true}\n"
    )
    done = recforge(tmp_path, "train", "mine.yaml", "--out", "run")
    assert done.returncode == 0, done.stderr
    trained = json.loads((tmp_path / "run" / "metrics.json").read_text())

    # the training rows change (a refit would renumber every item); the test rows stay
    changed = [r if r["split"] == "test" else dict(r, item_id=(r["item_id"] * 7) % 40) for r in rows]
    write_csv(tmp_path / "log.csv", changed)
    cwd = Path.cwd()
    os.chdir(tmp_path)
    try:
        metrics = evaluate_run(Path("run"), "test")
    finally:
        os.chdir(cwd)
    assert metrics["test_click_auc"] == pytest.approx(trained["test_click_auc"], abs=1e-12)
    assert metrics["test_oov_values"] == 0


def test_evaluate_counts_values_the_vocabularies_do_not_hold(tmp_path):
    write_csv(tmp_path / "log.csv", log_rows(600))
    (tmp_path / "schema.json").write_text(json.dumps(SCHEMA))
    (tmp_path / "mine.yaml").write_text(
        "name: mine\ndata: {source: file, options: {path: log.csv, schema: schema.json}}\n"
        "model: {name: lr}\ntrain: {epochs: 1, batch_size: 64, quiet: true}\n"
    )
    assert recforge(tmp_path, "train", "mine.yaml", "--out", "run").returncode == 0
    frame = pl.read_csv(tmp_path / "log.csv", infer_schema=False)
    frame.with_columns(pl.col("item_id") + "x").write_csv(tmp_path / "log.csv")  # every item renamed
    done = recforge(tmp_path, "evaluate", "run")
    assert done.returncode == 0, done.stderr
    metrics = json.loads(done.stdout.strip().splitlines()[-1])
    assert metrics["test_oov_item_id"] == metrics["test_oov_values"] == 60  # one per test row (10% of 600)
    assert done.stderr == "note: 60 value(s) of the test split are not in the model's vocabularies and were encoded as OOV: {'item_id': 60}\n"


def test_score_writes_the_probabilities_of_every_row_in_file_order(tmp_path):
    rows = log_rows(800)
    write_csv(tmp_path / "log.csv", rows)
    (tmp_path / "schema.json").write_text(json.dumps(SCHEMA))
    (tmp_path / "mine.yaml").write_text(
        "name: mine\ndata: {source: file, options: {path: log.csv, schema: schema.json}}\n"
        "model: {name: fm}\ntrain: {epochs: 8, batch_size: 32, lr: 0.01, quiet: true}\n"
    )
    assert recforge(tmp_path, "train", "mine.yaml", "--out", "run").returncode == 0
    unlabelled = [{k: v for k, v in r.items() if k != "click"} for r in log_rows(300, seed=5)]
    unlabelled[0]["item_id"] = "new-item"
    write_csv(tmp_path / "rows.csv", unlabelled)
    done = recforge(tmp_path, "score", "run", "rows.csv", "--out", "scores.parquet")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary == {"rows": 300, "oov_values": 1, "oov_item_id": 1}
    scores = pl.read_parquet(tmp_path / "scores.parquet")
    assert scores["row"].to_list() == list(range(300))
    # the planted rule (even users click items below 20) is what the scores rank by
    truth = np.asarray([(r["user_id"] % 2 == 0) == (int(r["item_id"]) < 20) for r in unlabelled[1:]])
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(truth, scores["click"].to_numpy()[1:]) > 0.8

    assert recforge(tmp_path, "export", "run", "--out", "bundle").returncode == 0  # the exported bundle scores alike
    done = recforge(tmp_path, "score", "bundle", "rows.csv", "--out", "from_bundle.parquet")
    assert done.returncode == 0, done.stderr
    assert pl.read_parquet(tmp_path / "from_bundle.parquet").equals(scores)
