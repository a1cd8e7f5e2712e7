"""The model contract over the whole registry: every registered model, trained a few steps on tiny
data, is saved as a bundle and rebuilt from the bundle alone in a fresh process with identical outputs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from safetensors.torch import load_file

from recforge.bundle import load_bundle, save_bundle
from recforge.data.prepare import prepare
from recforge.data.schema import Feature, Kind, Schema
from recforge.data.sources import RawDataset, load_source
from recforge.data.splits import SplitConfig
from recforge.data.store import Store
from recforge.models import Model, build_model, registered
from recforge.models.capabilities import EmbeddingGenerator, Ranker, Retriever
from recforge.train.optim import Optimizers
from tests.test_qarm import TINY as QARM_TINY
from tests.test_qarm import content_frame, content_schema

pytestmark = pytest.mark.usefixtures("single_thread")

# every registered model with the tiny data set it trains on and its params there
CASES: dict[str, tuple[str, dict]] = {
    "minet": ("synthetic", {"embedding_dim": 4, "user_fields": ["user_id", "f0"], "item_fields": ["item_id"],
                            "target_history": ["hist_item_id"], "source_history": ["hist_item_id"],
                            "target_domain": "0", "source_domain": "1", "tower_hidden": [16]}),
    "shared_bottom": ("synthetic", {"domains": ["0", "1"], "bottom_hidden": [16], "tower_hidden": [8]}),
    "unicdr": ("cross_domain", {"embedding_dim": 8, "num_negatives": 3, "side_features": True, "item_graph": True,
                                "multi_behaviour": True, "aggregator": "self_attention"}),
    "gme": ("synthetic", {"embedding_dim": 16, "attributes": ["f1", "f2"], "variant": "gme_a"}),
    "qarm": ("content", QARM_TINY),
    "em3": ("synthetic", {"text": None, "attributes": ["f1", "f2"]}),
    "freedom": ("content", {"embedding_dim": 8}),
    "em3_freedom": ("content", {"embedding_dim": 8, "text": None, "vectors": ["item_text"], "fq_heads": 2}),
    "seminar": ("synthetic", {"embedding_dim": 8, "heads": 2, "top_k": 3, "hidden": [8], "query_history": None, "text": None, "attributes": ["f1"]}),
    "qin": ("synthetic", {"top_k": 3}),
    "sim_hard": ("synthetic", {"attribute": "f1", "top_k": 3}),
}  # fmt: skip


def case(name: str) -> tuple[str, dict]:
    return CASES.get(name, ("synthetic", {}))


def tiny_cross_domain() -> RawDataset:
    rng = np.random.default_rng(0)
    rows = [(u, f"{d}:{int(rng.integers(0, 12))}", d, t) for d in ("a", "b") for u in range(40) for t in range(6)]
    frame = pl.DataFrame(rows, schema=["user_id", "item_id", "domain", "t"], orient="row")
    frame = frame.with_columns(pl.lit(1, dtype=pl.Int8).alias("click"))
    features = [Feature(name=c, kind=Kind.CATEGORICAL) for c in ("user_id", "item_id", "domain")]
    return RawDataset(frame, Schema(features=features, labels=["click"], user="user_id", time="t", domain="domain"), "tiny")


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, Store]:
    root = tmp_path_factory.mktemp("stores")
    synthetic = load_source("synthetic", n_rows=3000, n_users=60, n_items=40, history_len=5)
    return {
        "synthetic": prepare(synthetic, root / "synthetic", SplitConfig()),
        "cross_domain": prepare(tiny_cross_domain(), root / "cross_domain", SplitConfig(kind="cross_domain")),
        "content": prepare(RawDataset(content_frame(), content_schema(), "tiny"), root / "content", SplitConfig()),
    }


def outputs(model: Model, store: Store, backbone: Model | None) -> dict[str, torch.Tensor]:
    """What the model computes, by capability, on the first test rows."""
    batch = store.split("test").take(np.arange(32))
    found: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        if isinstance(model, Ranker):
            found |= {f"p_{k}": v for k, v in model.predict(model(batch)).items()}
        if isinstance(model, Retriever):
            found["users"] = model.user_embedding(batch)
            found["items"] = model.item_embeddings()
        if isinstance(model, EmbeddingGenerator):
            found["generated"] = model.generate(torch.arange(2, 12), backbone.embedding)
    assert found, f"{type(model).__name__} declares no capability to compare"
    return found


def train_steps(model: Model, store: Store, steps: int = 3) -> None:
    optimizers = Optimizers(model, model.sparse_parameters(), lr=0.01, sparse_lr=0.1)
    model.train()
    for step, batch in enumerate(store.split("train").batches(128, shuffle=True, seed=0)):
        if step == steps:
            break
        loss, _ = model.loss(model(batch), batch)
        optimizers.zero_grad()
        loss.backward()
        optimizers.step()
    model.eval()


RELOAD = """
import sys
from pathlib import Path
import torch
from safetensors.torch import save_file
from recforge.bundle import load_bundle
from recforge.data.store import Store

sys.path.insert(0, "tests")
from test_contract import outputs

torch.set_num_threads(1)  # as the parent: bit-equality holds for one thread count

root = Path(sys.argv[1])
for folder in sorted(p for p in root.iterdir() if (p / "model" / "model.json").exists()):
    backbone = load_bundle(folder / "backbone") if (folder / "backbone").exists() else None
    model = load_bundle(folder / "model")
    store = Store.open(Path((folder / "store.txt").read_text()))
    save_file({k: v.clone() for k, v in outputs(model, store, backbone).items()}, folder / "reloaded.safetensors")
"""


def test_every_registered_model_is_rebuilt_from_its_bundle_alone(stores, tmp_path):
    assert set(CASES) <= set(registered())
    expected = {}
    for name in registered():
        data, params = case(name)
        store = stores[data]
        torch.manual_seed(0)
        folder = tmp_path / name
        backbone = None
        if issubclass(registered()[name], EmbeddingGenerator):  # a generator fills a trained ranker's table
            backbone = build_model("dnn", store.schema, {"embedding_dim": params["embedding_dim"]})
            train_steps(backbone, store)
            save_bundle(backbone, store, folder / "backbone")
            model = build_model(name, store.schema, params, store=store)
        else:
            model = build_model(name, store.schema, params, store=store)
            train_steps(model, store)
        save_bundle(model, store, folder / "model")
        (folder / "store.txt").write_text(str(store.path))
        expected[name] = outputs(model, store, backbone)
        # the bundle's weights are the trained ones, not a fresh initialisation
        assert any(not torch.equal(v, build_model(name, store.schema, params, store=store).state_dict()[k])
                   for k, v in model.state_dict().items() if v.is_floating_point()), name  # fmt: skip
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", RELOAD, str(tmp_path)], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    for name, found in expected.items():
        reloaded = load_file(tmp_path / name / "reloaded.safetensors")
        assert set(reloaded) == set(found), name
        for key, value in found.items():
            assert torch.equal(reloaded[key], value), f"{name}: {key} differs after reloading the bundle"


def test_a_bundle_needs_no_store(stores, tmp_path):
    store = stores["cross_domain"]
    model = build_model("unicdr", store.schema, {"embedding_dim": 8}, store=store)
    save_bundle(model, store, tmp_path / "model")
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == [
        "model.json", "model.safetensors", "normalisers.json", "schema.json", "side.safetensors", "vocab"]  # fmt: skip
    rebuilt = load_bundle(tmp_path / "model")
    assert set(rebuilt.side) == set(model.side) and all(torch.equal(rebuilt.side[k], model.side[k]) for k in model.side)
