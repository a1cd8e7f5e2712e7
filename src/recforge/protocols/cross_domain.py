"""``cross_domain``: per-domain sampled ranking, dual-target and cold-start users.

Works on any interaction table with user, item and domain columns, encoded into a store with the
``cross_domain`` split (per-(user, domain) leave-one-out, optional cold-start users). Evaluation
follows the UniCDR code (:class:`~recforge.evaluate.evaluators.SampledRanking`): every valid / test
row is ranked against ``eval_negatives`` items of its domain the user has not interacted with,
fixed by ``eval_seed`` for every model and training seed; rows whose user has no train item in
the row's domain are cold-start rows, reported apart. The most-popular ranking under the same
candidates is recorded with the group ``scorer: popular``.

A ``single_domain`` variant trains one copy of its model per domain on that domain's rows only,
its histories cut to that domain (:class:`SingleDomain`), each early-stopped on its own domain's
validation NDCG@10; ``domain_params`` overrides the model's params per domain.

Records: ``hr@10`` and ``ndcg@10`` of the valid and test splits with groups ``domain``, ``users``
(warm / cold) and ``scorer`` (model / popular), the rows per group, and ``epochs``.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from torch import Tensor

from recforge.bundle import save_bundle
from recforge.data.batch import Batch
from recforge.data.cross_domain import DomainInteractions
from recforge.errors import ConfigError
from recforge.evaluate.evaluators import SAMPLED_SHOWN, SampledRanking
from recforge.experiment import prepare_store
from recforge.models import Model, build_model
from recforge.models.capabilities import Retriever
from recforge.protocols import Cell, Params, Protocol, record, register_protocol
from recforge.train.trainer import TrainConfig, Trainer, seed_everything


class CrossDomainParams(Params):
    item: str = "item_id"
    eval_negatives: int = 999
    eval_seed: int = 0
    valid_rows: int | None = 2000  # validation rows per (domain, warm / cold) group used for early stopping


class CrossDomainVariant(Params):
    single_domain: bool = False  # one model per domain, trained on that domain only
    domain_params: dict[str, dict[str, Any]] = Field(default_factory=dict)  # single-domain: per-domain params


def take_rows(batch: Batch, keep: Tensor) -> Batch:
    """The rows of ``batch`` where ``keep`` is True."""

    def pick(value: Any) -> Any:
        if isinstance(value, Tensor):
            return value[keep]
        if isinstance(value, dict):
            return {k: v[keep] for k, v in value.items()}
        return value

    return Batch(**{f.name: pick(getattr(batch, f.name)) for f in dataclasses.fields(batch)})


class SingleDomain(Model, Retriever):
    """A retriever trained on one domain's rows, its histories cut to that domain."""

    def __init__(self, inner: Model, data: DomainInteractions, domain: int) -> None:
        if not isinstance(inner, Retriever):
            raise ConfigError(f"single_domain: model {inner.registry_name!r} is not a retriever")
        super().__init__(inner.schema, inner.config)
        self.inner, self.domain = inner, domain
        self.item_feature = inner.item_feature
        self.domain_index = inner.schema.categorical_index(inner.schema.domain)
        self.register_buffer("domain_of_code", torch.from_numpy(data.domain_of_code), persistent=False)
        self.register_buffer("item_domain", torch.from_numpy(data.item_domain), persistent=False)

    def sparse_parameters(self) -> list:
        return self.inner.sparse_parameters()

    def _own(self, batch: Batch) -> Batch:
        sequences = {
            name: ids.masked_fill(self.item_domain[ids] != self.domain, 0) for name, ids in batch.sequences.items()
        }  # other domains' (and unseen) items are padding
        return dataclasses.replace(batch, sequences=sequences)

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        keep = self.domain_of_code[batch.categorical[:, self.domain_index]] == self.domain
        return {"rows": keep} | self.inner(self._own(take_rows(batch, keep)))

    def loss(self, outputs: dict[str, Tensor], batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        keep = outputs["rows"]
        if keep.sum() < 2:  # nothing of this domain (or a single row, no in-batch negative) in the batch
            return torch.zeros((), requires_grad=True), {}
        return self.inner.loss(outputs, take_rows(batch, keep))

    def user_embedding(self, batch: Batch) -> Tensor:
        return self.inner.user_embedding(self._own(batch))

    def item_embeddings(self) -> Tensor:
        return self.inner.item_embeddings()


def ranking_records(metrics: dict[str, float], domains: list[str]) -> list[dict[str, Any]]:
    """``{valid_sport_cold_ndcg@10: v, test_popular_phone_hr@10: w, ...}`` as grouped records."""
    out = []
    for split in ("valid", "test"):
        for name in domains:
            for users, suffix in (("warm", ""), ("cold", "_cold")):
                group = f"{name}{suffix}"
                if f"{split}_{group}_rows" in metrics:
                    out.append(record(split, "rows", metrics[f"{split}_{group}_rows"], domain=name, users=users))
                for scorer, prefix in (("model", ""), ("popular", "popular_")):
                    for metric in SAMPLED_SHOWN:
                        key = f"{split}_{prefix}{group}_{metric}"
                        if key in metrics:
                            out.append(record(split, metric, metrics[key], domain=name, users=users, scorer=scorer))
    return out


def drop_checkpoints(out: Path) -> None:
    """The bundle holds the trained model; the training checkpoints are not kept."""
    for name in ("last", "best"):
        shutil.rmtree(out / name, ignore_errors=True)


@register_protocol
class CrossDomain(Protocol):
    name = "cross_domain"
    Params = CrossDomainParams
    VariantParams = CrossDomainVariant

    def run(self, cell: Cell, out: Path) -> list[dict[str, Any]]:
        p: CrossDomainParams = self.params
        variant = CrossDomainVariant.model_validate(cell.extra)
        config = cell.config
        store = prepare_store(config.data, cell.store_root)
        data = DomainInteractions.from_store(store, p.item)
        evaluator = SampledRanking(data, p.item, p.eval_negatives, p.eval_seed, p.valid_rows)
        train = TrainConfig(**({"checkpoint_every_steps": 0, "quiet": True} | config.train))
        if not variant.single_domain:
            seed_everything(train.seed)
            model = build_model(config.model.name, store.schema, config.model.params, store=store)
            metrics = Trainer(model, store, train, out, evaluator).fit()
            save_bundle(model, store, out / "model")
            drop_checkpoints(out)
            return ranking_records(metrics, data.domain_names) + [record("fit", "epochs", metrics["epochs"])]
        unknown = sorted(set(variant.domain_params) - set(data.domain_names))
        if unknown:
            raise ConfigError(f"{cell.variant}: domain_params names unknown domains {unknown}; known: {data.domain_names}")
        records = []
        for d, name in enumerate(data.domain_names):
            seed_everything(train.seed)
            params = config.model.params | variant.domain_params.get(name, {})
            model = SingleDomain(build_model(config.model.name, store.schema, params, store=store), data, d)
            valid = evaluator.candidates_of(store.split("valid"))
            cold = "cold_" if train.monitor and "cold" in train.monitor and (valid.cold & (valid.domain == d)).any() else ""
            own = dataclasses.replace(train, monitor=f"valid_{name}_{cold}ndcg@10")  # this domain's rows
            metrics = Trainer(model, store, own, out / name, evaluator).fit()
            save_bundle(model.inner, store, out / name / "model")
            drop_checkpoints(out / name)
            records += ranking_records(metrics, [name]) + [record("fit", "epochs", metrics["epochs"], domain=name)]
        return records
