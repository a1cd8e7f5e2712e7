"""``cold_start``: the item cold-start protocol of GME (Ouyang et al., SIGIR 2021) and MetaEmb
(Pan et al., SIGIR 2019).

Data: a ``cold_start`` split (see :class:`~recforge.data.splits.SplitConfig`): old items' rows
are train, new items' first ``3 x shot`` rows are valid (warm-up batches a, b, c of ``shot`` rows
per item, in time order), their later rows test. A cell is one backbone (the cell's model) and
one seed:

1. pre-train the backbone on the old items with the library's trainer (the paper: 1 epoch);
2. freeze it; for every method, meta-train the registered generator ``gme`` of that variant on
   the old items' first ``4 x shot`` rows (batches a-d of each old item): ``meta_items`` items
   per step, the loss of :func:`~recforge.models.coldstart.gme.meta_loss` on their (a, b) rows,
   then on (b, c);
3. cold: write the generated embeddings of the new items into the backbone's item rows
   ("random" keeps their random initial rows) and evaluate on the test rows;
4. warm-up a, b, c: train only the new items' item-ID rows on that batch (Adam, one epoch),
   evaluate after each.

Records: ``auc``, ``logloss``, ``gauc`` of the test split per ``method`` and ``phase`` (groups),
and the pre-training metrics (group ``method: pretrain``).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import nn

from recforge.data.schema import OOV
from recforge.data.splits import rank_within
from recforge.data.store import SplitView
from recforge.errors import ConfigError, DataError
from recforge.experiment import prepare_store
from recforge.models import Model, build_model
from recforge.models.base import make_config, model_class
from recforge.models.coldstart.gme import GraphMetaEmbedding, meta_loss, row_losses, write_generated
from recforge.protocols import Cell, Params, Protocol, record, register_protocol
from recforge.protocols.standard import metric_records
from recforge.train.trainer import TrainConfig, Trainer, seed_everything

METHODS = ("random", "meta_emb", "gme_p", "gme_g", "gme_a")
PHASES = ("cold", "warm-a", "warm-b", "warm-c")


class ColdStartParams(Params):
    item: str = "item_id"
    attributes: list[str]  # the item's attribute fields: u and the graph
    methods: list[Literal["random", "meta_emb", "gme_p", "gme_g", "gme_a"]] = Field(default_factory=lambda: list(METHODS))
    generator: dict[str, Any] = Field(default_factory=dict)  # the gme model's params, shared by the variants
    num_neighbours: int = 10
    shot: int = Field(20, ge=1)  # rows per item in each of batches a, b, c (d)
    meta_items: int = Field(3, ge=1)  # old items per meta step (3 x 20 = 60 rows, as the official code)
    meta_lr: float = 5e-3
    meta_epochs: int = 1
    warm_lr: float = 1e-3
    warm_batch_size: int = 128

    @model_validator(mode="after")
    def _generator_keys(self) -> "ColdStartParams":
        reserved = sorted({"variant", "item_feature", "attributes", "num_neighbours", "embedding_dim"} & set(self.generator))
        if reserved:
            raise ValueError(f"generator: {reserved} are set by the protocol")
        return self


# --- data -----------------------------------------------------------------------------------
def phase_rows(view: SplitView, item: str, shot: int, phases: int) -> tuple[np.ndarray, np.ndarray]:
    """Items of ``view`` and their rows per phase: ``(items [n], rows [phases, n, shot])``.

    Phase ``p`` of an item is its rows ``p * shot`` to ``(p + 1) * shot - 1`` in time order. Every
    item must have ``phases * shot`` rows.
    """
    items = view.column(item).astype(np.int64)
    rank = rank_within(items)
    keep = np.flatnonzero(rank < phases * shot)
    unique, counts = np.unique(items[keep], return_counts=True)
    if (counts < phases * shot).any():
        short = unique[counts < phases * shot][0]
        raise DataError(f"{view.store.path} split {view.name}: item {short} has fewer than {phases * shot} rows")
    order = keep[np.lexsort((rank[keep], items[keep]))]  # by item, then rank
    rows = order.reshape(len(unique), phases, shot).transpose(1, 0, 2)  # [phases, n, shot]
    return unique, np.ascontiguousarray(rows)


# --- stages ---------------------------------------------------------------------------------
def freeze(model: nn.Module) -> None:
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)


def meta_train(
    generator: GraphMetaEmbedding, model: Model, view: SplitView, rows: np.ndarray, meta_lr: float, meta_items: int,
    meta_epochs: int, seed: int,
) -> list[dict[str, float]]:
    """Meta-train ``generator`` on the old items' batches ``rows`` [4, n, shot]; returns the mean losses per pass."""
    optimizer = torch.optim.Adam(generator.parameters(), lr=meta_lr)
    generator.train()
    log = []
    n = rows.shape[1]
    for epoch in range(meta_epochs):
        order = np.random.default_rng([seed, epoch]).permutation(n)
        for first, second in ((0, 1), (1, 2)):
            totals = {"cold": 0.0, "warm": 0.0}
            steps = 0
            for start in range(0, n, meta_items):
                chosen = order[start : start + meta_items]
                batch_a = view.take(rows[first, chosen].reshape(-1))
                batch_b = view.take(rows[second, chosen].reshape(-1))
                loss, parts = meta_loss(generator, model, batch_a, batch_b)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                totals = {k: totals[k] + float(parts[k]) for k in totals}
                steps += 1
            log.append({"epoch": epoch, "pair": f"{'abcd'[first]}{'abcd'[second]}", **{k: v / steps for k, v in totals.items()}})
    generator.eval()
    return log


def warm_up(model: Model, item: str, items: np.ndarray, view: SplitView, rows: np.ndarray, lr: float, batch_size: int, seed: int) -> float:
    """One epoch of Adam on ``rows`` of ``view`` that updates only the item-ID rows of ``items``.

    The rows are copied out as the only trainable tensor, fed to the frozen model through
    ``FeatureEmbedding.replaced`` and written back: nothing else of the model can change.
    Returns the mean training loss.
    """
    embedding = model.embedding
    schema = model.schema
    offset = embedding.vocab_offset[schema.feature(item).vocab]
    ids = torch.from_numpy(items)
    slot = torch.full((schema.vocab_size(schema.feature(item).vocab),), -1, dtype=torch.long)
    slot[ids] = torch.arange(len(ids))
    trained = nn.Parameter(embedding.table.weight[ids + offset].detach().clone())  # [n, k]
    optimizer = torch.optim.Adam([trained], lr=lr)
    column = schema.categorical_index(item)
    order = np.random.default_rng(seed).permutation(rows)
    total = 0.0
    for start in range(0, len(order), batch_size):
        batch = view.take(np.sort(order[start : start + batch_size]))
        positions = slot[batch.categorical[:, column]]
        if (positions < 0).any():
            raise ValueError(f"warm-up rows hold item {int(batch.categorical[positions.argmin(), column])} outside the trained items")
        with embedding.replaced(item, trained[positions]):
            loss = row_losses(model, batch).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total += float(loss.detach()) * len(batch)
    with torch.no_grad():
        embedding.table.weight[ids + offset] = trained.detach()
    return total / len(rows)


# --- the protocol ---------------------------------------------------------------------------
@register_protocol
class ColdStart(Protocol):
    name = "cold_start"
    Params = ColdStartParams

    def run(self, cell: Cell, out: Path) -> list[dict[str, Any]]:
        p: ColdStartParams = self.params
        config = cell.config
        split = config.data.split
        if split.kind != "cold_start" or "valid" not in split.fit_on:
            raise ConfigError(f"{cell.variant}: data.split needs kind cold_start and fit_on [train, valid] (new items need their own ids)")
        if 3 * p.shot != split.warm_rows:
            raise ConfigError(f"{cell.variant}: data.split.warm_rows must be 3 x shot = {3 * p.shot}")
        train_config = TrainConfig(**{**config.train, "quiet": True})
        if train_config.num_threads:
            torch.set_num_threads(train_config.num_threads)
        store = prepare_store(config.data, cell.store_root)
        schema = store.schema
        old_view, new_view = store.split("train"), store.split("valid")
        old_items, old_rows = phase_rows(old_view, p.item, p.shot, 4)
        new_items, new_rows = phase_rows(new_view, p.item, p.shot, 3)
        if (new_items == OOV).any() or np.intersect1d(old_items, new_items).size:
            raise ConfigError(f"{store.path}: new items must have ids of their own (fit the vocabularies on train and valid)")

        seed_everything(train_config.seed)
        model = build_model(config.model.name, schema, config.model.params, store=store)
        trainer = Trainer(model, store, train_config, out / "pretrain")
        pretrain = trainer.fit()
        records = [{**r, "group": {"method": "pretrain"}} for r in metric_records(pretrain)]
        freeze(model)
        pretrained = copy.deepcopy(model.state_dict())
        generator_params = {**p.generator, "item_feature": p.item, "attributes": p.attributes,
                            "num_neighbours": p.num_neighbours, "embedding_dim": model.embedding.dim}  # fmt: skip
        side = model_class("gme").side_data(store, make_config("gme", generator_params))
        for method in p.methods:
            model.load_state_dict(pretrained)
            if method != "random":
                seed_everything(train_config.seed)
                generator = build_model("gme", schema, {**generator_params, "variant": method}, side=side)
                log = meta_train(generator, model, old_view, old_rows, p.meta_lr, p.meta_items, p.meta_epochs, train_config.seed)
                records += [record("meta", f"loss_{part}", entry[part], method=method, meta_pass=f"{entry['epoch']}-{entry['pair']}")
                            for entry in log for part in ("cold", "warm")]  # fmt: skip
                write_generated(model, generator, new_items)
            phases = {"cold": trainer.evaluate("test")}
            for k, phase in enumerate(PHASES[1:]):
                warm_up(model, p.item, new_items, new_view, new_rows[k].reshape(-1), p.warm_lr, p.warm_batch_size, train_config.seed)
                phases[phase] = trainer.evaluate("test")
            for phase, metrics in phases.items():
                for name, value in metrics.items():
                    metric = name.removeprefix("test_").rsplit("_", 1)[-1]  # test_click_auc -> auc
                    records.append(record("test", metric, value, method=method, phase=phase))
        return records
