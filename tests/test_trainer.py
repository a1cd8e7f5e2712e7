"""The trainer on a small synthetic store: learning, early stopping, checkpoints, resume, DDP.

Run as a script under torchrun (``python -m torch.distributed.run --nproc_per_node 2
tests/test_trainer.py STORE OUT``), this file is also the program of the two-process test.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_model
from torch import nn

from recforge.data.prepare import prepare
from recforge.data.sources.synthetic import generate
from recforge.data.store import Store
from recforge.errors import ConfigError, RunError
from recforge.models import Model, build_model
from recforge.models.features import FeatureEmbedding
from recforge.train import trainer as trainer_module
from recforge.train.checkpoint import MODEL_FILE, OPTIMIZER_FILE, STATE_FILE, find_checkpoint, save_checkpoint
from recforge.train.optim import Optimizers, RowWiseAdagrad, split_parameters
from recforge.evaluate.evaluators import seen_items
from recforge.train.trainer import Trainer, TrainConfig, seed_everything

STEPS_PER_EPOCH = 38  # 4800 train rows / 128


def small_model(store: Store) -> Model:
    seed_everything(0)
    return build_model("deepfm", store.schema, {"hidden": [32], "embedding_dim": 8, "dropout": 0.1})


def small_config(**overrides) -> TrainConfig:
    settings = {
        "epochs": 3,
        "batch_size": 128,
        "checkpoint_every_steps": 7,
        "log_every": 5,
        "patience": None,
        "monitor": "valid_click_auc",
        "quiet": True,
    }
    return TrainConfig(**(settings | overrides))


def read_log(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    raw = generate(n_rows=6000, n_users=300, n_items=200, n_fields=3, n_numeric=2, history_len=5, seed=0)
    return prepare(raw, tmp_path_factory.mktemp("data") / "store")


@pytest.fixture(scope="module")
def unbroken(store, tmp_path_factory) -> tuple[Path, dict, dict[str, torch.Tensor]]:
    out = tmp_path_factory.mktemp("unbroken")
    trainer = Trainer(small_model(store), store, small_config(), out)
    results = trainer.fit()
    return out, results, {k: v.clone() for k, v in trainer.model.state_dict().items()}


def test_loss_decreases_and_model_learns(store, unbroken):
    out, results, _ = unbroken
    losses = [r["loss"] for r in read_log(out) if r["event"] == "train"]
    assert losses[-1] < 0.9 * losses[0]
    assert results["valid_click_auc"] > 0.6
    assert {"valid_click_logloss", "valid_click_gauc", "test_click_auc"} <= set(results)
    assert results["steps"] == 3 * STEPS_PER_EPOCH


def test_checkpoints_are_safetensors_and_json(unbroken):
    out, _, _ = unbroken
    assert sorted(p.name for p in (out / "last").iterdir()) == sorted([MODEL_FILE, OPTIMIZER_FILE, STATE_FILE])
    assert sorted(p.name for p in (out / "best").iterdir()) == sorted([MODEL_FILE, STATE_FILE])
    for name in (MODEL_FILE, OPTIMIZER_FILE):
        with safe_open(out / "last" / name, framework="pt") as f:
            assert len(list(f.keys())) > 0
    state = json.loads((out / "last" / STATE_FILE).read_text())["state"]
    assert state["train"]["epoch"] == 3 and state["train"]["step_in_epoch"] == 0
    assert not any(p.name.endswith((".tmp", ".old")) for p in out.iterdir())


def test_interrupted_checkpoint_save_keeps_the_previous_one(tmp_path):
    model = nn.Linear(2, 1)
    save_checkpoint(tmp_path / "last", model, {"step": 1})
    save_checkpoint(tmp_path / "last", model, {"step": 2})
    os.replace(tmp_path / "last", tmp_path / "last.old")  # killed between the two renames
    assert find_checkpoint(tmp_path / "last") == tmp_path / "last.old"


class Killed(Exception):
    pass


def kill_after(model: Model, steps: int) -> Model:
    """Make the model's training forward raise once it has run ``steps`` times."""
    forward, calls = model.forward, [0]

    def dying_forward(batch):
        if model.training:
            if calls[0] == steps:
                raise Killed
            calls[0] += 1
        return forward(batch)

    model.forward = dying_forward
    return model


def test_resume_after_kill_matches_unbroken_run(store, unbroken, tmp_path):
    out_unbroken, results_unbroken, weights_unbroken = unbroken
    killed_at = STEPS_PER_EPOCH + 16  # mid epoch 2, five steps after the checkpoint of step 49
    with pytest.raises(Killed):
        Trainer(kill_after(small_model(store), killed_at), store, small_config(), tmp_path).fit()
    saved = json.loads((tmp_path / "last" / STATE_FILE).read_text())["state"]["train"]
    assert (saved["epoch"], saved["step_in_epoch"]) == (1, 11)

    trainer = Trainer(small_model(store), store, small_config(), tmp_path)
    results = trainer.fit(resume=True)

    assert results == results_unbroken
    weights = trainer.model.state_dict()
    assert all(torch.equal(weights[k], v) for k, v in weights_unbroken.items())
    for name in (MODEL_FILE, OPTIMIZER_FILE):
        a, b = load_file(tmp_path / "last" / name), load_file(out_unbroken / "last" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    evals = [[r for r in read_log(d) if r["event"] == "eval"] for d in (tmp_path, out_unbroken)]
    assert evals[0] == evals[1]


def test_resume_refuses_changed_settings(store, unbroken):
    out, _, _ = unbroken
    with pytest.raises(RunError, match=r"last: cannot resume: train.batch_size was 128, now 64$"):
        Trainer(small_model(store), store, small_config(batch_size=64), out).fit(resume=True)
    with pytest.raises(RunError, match=r"last: cannot resume: train.mode was 'max', now 'min'$"):
        Trainer(small_model(store), store, small_config(mode="min"), out).fit(resume=True)
    seed_everything(0)
    wider = build_model("deepfm", store.schema, {"hidden": [32], "embedding_dim": 16, "dropout": 0.1})
    with pytest.raises(RunError, match=r"last: cannot resume: model.params.embedding_dim was 8, now 16$"):
        Trainer(wider, store, small_config(), out).fit(resume=True)


def test_resume_without_a_checkpoint_is_refused(store, tmp_path):
    with pytest.raises(RunError, match="no checkpoint to resume from"):
        Trainer(small_model(store), store, small_config(), tmp_path).fit(resume=True)


def test_a_misspelled_monitor_fails_before_the_first_step(store, tmp_path):
    trainer = Trainer(kill_after(small_model(store), 0), store, small_config(monitor="valid_auc"), tmp_path)
    with pytest.raises(ConfigError, match=r"train.monitor: 'valid_auc' is not a validation metric; choose one of \["):
        trainer.fit()  # a training step would raise Killed
    assert list(tmp_path.iterdir()) == []


def test_early_stopping_restores_best_weights(store, tmp_path):
    config = small_config(epochs=8, patience=1, lr=0.03, sparse_lr=0.5, checkpoint_every_steps=0)
    trainer = Trainer(small_model(store), store, config, tmp_path)
    results = trainer.fit()

    evals = [r for r in read_log(tmp_path) if r["event"] == "eval"]
    aucs = [r["valid_click_auc"] for r in evals]
    best = max(range(len(aucs)), key=aucs.__getitem__)
    assert results["epochs"] < 8  # stopped early
    assert results["epochs"] == best + 2  # patience 1: one epoch without improvement
    assert results["best_epoch"] == best + 1
    assert results["valid_click_auc"] == aucs[best]
    best_weights = load_file(tmp_path / "best" / MODEL_FILE)
    last_weights = load_file(tmp_path / "last" / MODEL_FILE)
    model_weights = trainer.model.state_dict()
    assert all(torch.equal(model_weights[k], v) for k, v in best_weights.items())
    assert any(not torch.equal(model_weights[k], v) for k, v in last_weights.items())


@pytest.mark.parametrize(
    ("name", "params", "expected"),
    [
        ("esmm", {"hidden": [16]}, {"valid_click_auc", "valid_conversion_auc", "valid_ctcvr_auc", "valid_ctcvr_gauc"}),
        ("two_tower", {"hidden": [16], "out_dim": 8}, {"valid_recall@10", "valid_ndcg@50", "valid_mrr", "test_hr@20"}),
    ],
)
def test_evaluation_follows_the_model_task(store, tmp_path, name, params, expected):
    seed_everything(0)
    model = build_model(name, store.schema, params)
    results = Trainer(model, store, small_config(epochs=1, monitor=None), tmp_path).fit()
    assert expected <= set(results)
    assert all(0.0 <= results[k] <= 1.0 for k in expected)


def test_popular_reference_ranks_items_by_train_count(store, tmp_path):
    seed_everything(0)
    model = build_model("two_tower", store.schema, {"hidden": [16], "out_dim": 8})
    metrics = Trainer(model, store, small_config(epochs=1), tmp_path).evaluate("test")
    train, test = store.split("train"), store.split("test")
    counts = np.bincount(train.column("item_id"), minlength=store.schema.vocab_size("item_id"))
    hits = []  # naive reference: for each test row, the top 10 unseen items by count (ties: lower id)
    for user, target in zip(test.column("user_id"), test.column("item_id")):
        seen = set(train.column("item_id")[train.column("user_id") == user]) - {target}
        ranked = [i for i in np.lexsort((np.arange(len(counts)), -counts)) if i > 1 and i not in seen]
        hits.append(target in ranked[:10])
    assert metrics["test_popular_hr@10"] == pytest.approx(np.mean(hits), abs=1e-9)


def test_seen_items_lists_each_query_users_train_items():
    train_users = np.array([5, 2, 5, 3, 5])
    train_items = np.array([10, 11, 12, 13, 14])
    ptr, idx = seen_items(train_users, train_items, np.array([5, 4, 2, 5]))
    rows = [sorted(idx[ptr[i] : ptr[i + 1]].tolist()) for i in range(4)]
    assert rows == [[10, 12, 14], [], [11], [10, 12, 14]]


def test_sparse_optimizer_touches_only_used_rows():
    torch.manual_seed(0)
    table = nn.Embedding(1000, 4, sparse=True)
    head = nn.Linear(4, 1)
    model = nn.ModuleDict({"table": table, "head": head})
    dense, sparse = split_parameters(model, [table.weight])
    assert [id(p) for p in sparse] == [id(table.weight)] and len(dense) == 2
    optimizers = Optimizers(model, [table.weight], clip_norm=1.0)
    assert isinstance(optimizers.sparse, RowWiseAdagrad)

    before = table.weight.detach().clone()
    ids = torch.tensor([3, 7, 7, 512])
    optimizers.zero_grad()
    head(table(ids)).sum().backward()
    assert table.weight.grad.is_sparse
    optimizers.step()

    changed = (table.weight.detach() != before).any(1).nonzero().flatten().tolist()
    assert changed == [3, 7, 512]
    accumulator = optimizers.sparse.state[table.weight]["sum"]
    assert accumulator.nonzero().flatten().tolist() == [3, 7, 512]


def test_small_tables_take_dense_gradients_with_the_same_update(store):
    """A small FeatureEmbedding gets a dense gradient; the row-wise update equals the sparse one."""
    torch.manual_seed(0)
    small = FeatureEmbedding(store.schema, 4)
    assert not small.table.sparse
    initial = small.table.weight.detach().clone()
    large = copy.deepcopy(small)
    large.table.sparse = True  # what a table over DENSE_GRADIENT_MAX_ELEMENTS weights gets
    batches = list(store.split("train").batches(64, shuffle=True, seed=0))[:3]
    for module in (small, large):
        optimizers = Optimizers(module, [module.table.weight], sparse_lr=0.1)
        assert isinstance(optimizers.sparse, RowWiseAdagrad) and optimizers.dense is None
        for batch in batches:
            optimizers.zero_grad()
            module.fields(batch).square().sum().backward()
            assert module.table.weight.grad.is_sparse == module.table.sparse
            optimizers.step()
    torch.testing.assert_close(small.table.weight, large.table.weight, rtol=0, atol=1e-6)
    assert (small.table.weight != initial).any(1).sum() > 10


def test_two_processes_with_torchrun(store, tmp_path):
    env = os.environ | {"RECFORGE_QUIET": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__]
    command += [str(store.path), str(tmp_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    final = [r for r in read_log(tmp_path) if r["event"] == "final"]
    assert len(final) == 1 and 0.6 < final[0]["valid_click_auc"] <= 1.0, final
    ranks = [load_file(tmp_path / f"trained-rank{r}.safetensors") for r in (0, 1)]
    last = load_file(tmp_path / "last" / MODEL_FILE)
    for name, value in last.items():
        assert torch.equal(ranks[0][name], value) and torch.equal(ranks[1][name], value), name


def _distributed_run(store_path: str, out_dir: str) -> None:
    """One rank of the two-process test: train, saving this rank's weights as training ends."""
    store = Store.open(store_path)
    restore_best = trainer_module.load_weights

    def save_then_restore(directory, model):  # the weights each rank trained, before best/ replaces them
        save_model(model, str(Path(out_dir) / f"trained-rank{os.environ['RANK']}.safetensors"))
        restore_best(directory, model)

    trainer_module.load_weights = save_then_restore
    Trainer(small_model(store), store, small_config(epochs=3, lr=3e-3, checkpoint_every_steps=0), out_dir).fit()


if __name__ == "__main__":
    _distributed_run(*sys.argv[1:])
