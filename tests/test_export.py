"""`recforge export`: serving bundles whose ONNX graph equals the torch model, and `--check`."""

from __future__ import annotations

import json
import tempfile
from dataclasses import fields
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
import torch.nn.functional as F
import yaml
from typer.testing import CliRunner

from recforge.bundle import load_bundle
from recforge.cli import app
from recforge.data.batch import Batch
from recforge.config import ExperimentConfig, load_config
from recforge.data.prepare import Fitted, prepare
from recforge.data.sources import load_source
from recforge.errors import ConfigError, RunError
from recforge.experiment import run
from recforge.models.ranking.deepfm import DeepFM
from recforge.serve.export import TOLERANCE, check_bundle, export_graph, export_run
from recforge.serve.scorer import batch_tensors, input_names, load_scorer
from tests.test_cli import TINY
from tests.test_minet import MINET_FIELDS, two_domain_frame, two_domain_schema

runner = CliRunner()


def first_rows(batch: Batch, size: int) -> Batch:
    """The first ``size`` rows of ``batch``."""

    def cut(value):
        if isinstance(value, dict):
            return {k: v[:size] for k, v in value.items()}
        return value[:size] if isinstance(value, torch.Tensor) else value

    return Batch(**{f.name: cut(getattr(batch, f.name)) for f in fields(batch)})


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Finished runs of tiny synthetic data (and of a two-domain table for minet), trained on first use."""
    root = tmp_path_factory.mktemp("export")
    two_domain_frame().write_parquet(root / "two_domain.parquet")
    two_domain_schema().save(root / "two_domain.json")
    configs = {model: yaml.safe_load(TINY.format(model=model)) | {"train": {"epochs": 1, "batch_size": 256, "seed": 1, "quiet": True}}
               for model in ("deepfm", "din", "two_tower")}  # fmt: skip
    configs["deepfm_without_history"] = configs["deepfm"] | {"name": "tiny_deepfm_without_history"}
    configs["deepfm_without_history"]["data"] = configs["deepfm"]["data"] | {"options": configs["deepfm"]["data"]["options"] | {"history_len": 0}}
    configs["minet"] = {
        "name": "two_domain_minet",
        "data": {"source": "file", "options": {"path": str(root / "two_domain.parquet"), "schema": str(root / "two_domain.json")},
                 "split": {"kind": "column"}},
        "model": {"name": "minet", "params": MINET_FIELDS},
        "train": {"epochs": 1, "batch_size": 256, "quiet": True},
    }  # fmt: skip
    found: dict[str, Path] = {}

    def trained(model: str) -> Path:
        if model not in found:
            run(ExperimentConfig.model_validate(configs[model]), root / model, store_root=root / "stores")
            found[model] = root / model
        return found[model]

    return trained


def encoded_test_rows(run_dir: Path) -> Batch:
    """The run's test rows, encoded with its bundle's vocabularies."""
    config = load_config(run_dir / "config.yaml")
    with tempfile.TemporaryDirectory() as scratch:
        raw = load_source(config.data.source, **config.data.options)
        view = prepare(raw, Path(scratch) / "store", config.data.split, fitted=Fitted.load(run_dir / "model")).split("test")
        return view.take(np.arange(len(view)))


WITH_HISTORY = ["categorical", "numeric", "sequences.hist_item_id", "domain"]


@pytest.mark.parametrize(("run_name", "inputs"), [
    ("deepfm", WITH_HISTORY), ("din", WITH_HISTORY),
    ("deepfm_without_history", ["categorical", "numeric", "domain"]),  # a domain input the model never reads keeps a dynamic batch axis
])  # fmt: skip
def test_exported_graph_gives_the_torch_probabilities_on_the_test_rows(runs, tmp_path, run_name, inputs):
    run_dir, bundle = runs(run_name), tmp_path / "bundle"
    model = run_name.removesuffix("_without_history")
    result = runner.invoke(app, ["export", str(run_dir), "--out", str(bundle)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["model"] == model and manifest["format_version"] == 1
    assert manifest["onnx"]["exported"] and manifest["onnx"]["reason"] is None and manifest["onnx"]["max_abs_diff"] <= TOLERANCE
    rows = encoded_test_rows(run_dir)
    assert manifest["onnx"]["rows_checked"] == len(rows) == 600
    session = onnxruntime.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    schema = load_bundle(bundle).schema
    assert [i.name for i in session.get_inputs()] == input_names(schema)
    assert input_names(schema) == inputs
    torch_model = load_bundle(run_dir / "model")
    for size in (len(rows), 7):  # the batch axis is dynamic
        feeds = {name: t[:size].numpy() for name, t in zip(input_names(schema), batch_tensors(rows, schema))}
        (onnx_click,) = session.run(["probability.click"], feeds)
        with torch.inference_mode():
            torch_click = torch_model.predict(torch_model(first_rows(rows, size)))["click"].numpy()
        assert onnx_click.shape == (size,)
        assert float(np.abs(onnx_click - torch_click).max()) <= 1e-5
    scorer = load_scorer(bundle)
    assert (scorer.backend, scorer.model_name) == ("onnx", model)
    scored, by_torch = scorer.score(rows), load_scorer(bundle, backend="torch").score(rows)
    assert scored["click"].dtype == np.float32 and scored["click"].shape == (len(rows),)
    assert float(np.abs(scored["click"] - by_torch["click"]).max()) <= 1e-5


class SampledDeepFM(DeepFM):
    """DeepFM with Monte-Carlo dropout on its logit at inference: every evaluation draws a new mask."""

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        return {label: F.dropout(logit, 0.5, training=True) for label, logit in super().forward(batch).items()}


def test_a_graph_whose_probabilities_differ_from_torch_is_not_kept(runs, tmp_path):
    trained = load_bundle(runs("deepfm") / "model")
    model = SampledDeepFM(trained.schema, trained.config)
    model.load_state_dict(trained.state_dict())
    rows = encoded_test_rows(runs("deepfm"))
    onnx = export_graph(model, first_rows(rows, 4), rows, tmp_path / "model.onnx")
    assert not onnx["exported"] and onnx["max_abs_diff"] > TOLERANCE and onnx["rows_checked"] == len(rows)
    assert onnx["reason"] == f"its probabilities differ from torch's by {onnx['max_abs_diff']:.3g} (more than 1e-05) on 600 test rows"
    assert not (tmp_path / "model.onnx").exists()
    assert export_graph(trained, first_rows(rows, 4), rows, tmp_path / "model.onnx")["exported"]  # the same model, sampling nothing


def test_a_model_the_exporter_cannot_trace_is_served_by_torch_with_the_reason(runs, tmp_path):
    bundle = tmp_path / "bundle"
    result = runner.invoke(app, ["export", str(runs("minet")), "--out", str(bundle)])
    assert result.exit_code == 0, result.output
    onnx = json.loads((bundle / "manifest.json").read_text())["onnx"]
    assert onnx["exported"] is False and onnx["max_abs_diff"] is None and onnx["rows_checked"] == 0
    # minet routes each row to its domain's tower by a data-dependent index (nonzero)
    assert onnx["reason"].startswith("the export failed: GuardOnDataDependentSymNode: ") and "minet.py" in onnx["reason"]
    assert result.stderr.splitlines() == [f"note: no model.onnx: {onnx['reason']}; the bundle is served by torch"]
    assert not (bundle / "model.onnx").exists()
    scorer = load_scorer(bundle)
    assert scorer.backend == "torch" and scorer.score(encoded_test_rows(runs("minet")))["like"].shape == (160,)
    with pytest.raises(RunError, match="holds no ONNX graph"):
        load_scorer(bundle, backend="onnx")


def test_a_retriever_is_exported_for_torch_and_gives_its_vectors(runs, tmp_path):
    manifest = export_run(runs("two_tower"), tmp_path / "bundle")
    assert manifest["onnx"]["reason"] == "two_tower is not a ranker; only a ranker's probabilities are exported"
    scorer = load_scorer(tmp_path / "bundle")
    rows = encoded_test_rows(runs("two_tower"))
    items = scorer.item_vectors()
    assert scorer.backend == "torch" and scorer.user_vectors(rows).shape == (len(rows), items.shape[1])
    assert items.shape[0] == load_bundle(tmp_path / "bundle").schema.vocab_size("item_id") and items.dtype == np.float32
    with pytest.raises(RunError, match="ranks no rows"):
        scorer.score(rows)
    with pytest.raises(ConfigError, match="backend must be one of auto, onnx, torch"):
        load_scorer(tmp_path / "bundle", backend="tensorrt")


def test_check_verifies_every_file_and_names_the_one_damaged(runs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert runner.invoke(app, ["export", str(runs("deepfm")), "--out", "bundle"]).exit_code == 0
    manifest = check_bundle(Path("bundle"))
    assert {"model.safetensors", "model.json", "schema.json", "normalisers.json", "model.onnx", "vocab/item_id.parquet"} <= set(manifest["files"])
    result = runner.invoke(app, ["export", "--check", "bundle"])
    assert result.exit_code == 0 and result.stdout == f"bundle: {len(manifest['files'])} files verified\n"

    def refused() -> str:
        result = runner.invoke(app, ["export", "--check", "bundle"])
        assert result.exit_code == 2, result.output
        return result.stderr.strip()

    weights = Path("bundle/model.safetensors")
    original = weights.read_bytes()
    weights.write_bytes(original[:100] + bytes([original[100] ^ 1]) + original[101:])
    assert refused() == "error: bundle/model.safetensors: sha256 differs from the manifest (the file is corrupted or was changed)"
    weights.write_bytes(original)
    graph = Path("bundle/model.onnx")
    size = graph.stat().st_size
    graph.write_bytes(graph.read_bytes()[: size // 2])
    assert refused() == f"error: bundle/model.onnx: {size // 2} bytes, the manifest says {size} (the file is truncated or was changed)"
    graph.unlink()
    assert refused() == "error: bundle/model.onnx: missing (the manifest lists it)"


def test_export_replaces_an_earlier_export_and_refuses_any_other_folder(runs, tmp_path):
    out = tmp_path / "bundle"
    first = export_run(runs("din"), out)
    second = export_run(runs("din"), out)
    assert second["files"] == first["files"] and check_bundle(out) == second
    assert not list(tmp_path.glob("bundle.*"))  # no staging or previous version left beside it
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(RunError, match="mine: exists and holds no exported bundle"):
        export_run(runs("din"), tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
