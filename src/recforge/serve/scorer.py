"""Scoring an exported bundle: the ONNX graph through ONNX Runtime, or the torch model.

The graph's inputs are the :class:`~recforge.data.batch.Batch` tensors the models read, named as
:func:`input_names` lists them; its outputs are ``probability.<label>``, one per predicted label.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from recforge.bundle import load_bundle
from recforge.data.batch import Batch
from recforge.data.schema import Schema
from recforge.errors import ConfigError, RunError
from recforge.models import Model
from recforge.models.capabilities import Ranker, Retriever
from recforge.train.checkpoint import read_json

MANIFEST, ONNX_GRAPH = "manifest.json", "model.onnx"
OUTPUT_PREFIX = "probability."
BACKENDS = ("auto", "onnx", "torch")


def input_names(schema: Schema) -> list[str]:
    """The graph's inputs, in order: categorical, numeric, one per sequence and per embedding
    feature, and the domain when the schema has one."""
    return [
        "categorical",
        "numeric",
        *(f"sequences.{f.name}" for f in schema.sequences),
        *(f"embeddings.{f.name}" for f in schema.embeddings),
        *(["domain"] if schema.domain else []),
    ]


def batch_tensors(batch: Batch, schema: Schema) -> list[Tensor]:
    """The tensors of ``batch`` in the order of :func:`input_names`."""
    return [
        batch.categorical,
        batch.numeric,
        *(batch.sequences[f.name] for f in schema.sequences),
        *(batch.embeddings[f.name] for f in schema.embeddings),
        *([batch.domain] if schema.domain else []),
    ]


def batch_from_tensors(tensors: tuple[Tensor, ...], schema: Schema) -> Batch:
    """The inverse of :func:`batch_tensors`."""
    named = dict(zip(input_names(schema), tensors))
    return Batch(
        categorical=named["categorical"],
        numeric=named["numeric"],
        sequences={f.name: named[f"sequences.{f.name}"] for f in schema.sequences},
        embeddings={f.name: named[f"embeddings.{f.name}"] for f in schema.embeddings},
        domain=named.get("domain"),
    )


class Scorer(ABC):
    """Probabilities per label for a batch (``score``); a retriever's vectors on the torch backend."""

    backend: str

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name

    @abstractmethod
    def score(self, batch: Batch) -> dict[str, np.ndarray]:
        """``{label: probabilities [B] float32}``."""

    def user_vectors(self, batch: Batch) -> np.ndarray:
        """The retriever's user vector of every row -> [B, D] float32."""
        raise RunError(f"model {self.model_name!r} on the {self.backend} backend gives no user vectors; it needs a retriever served by torch")

    def item_vectors(self) -> np.ndarray:
        """The retriever's vector of every item id -> [I, D] float32."""
        raise RunError(f"model {self.model_name!r} on the {self.backend} backend gives no item vectors; it needs a retriever served by torch")


class TorchScorer(Scorer):
    """The model of the bundle, run under ``torch.inference_mode``."""

    backend = "torch"

    def __init__(self, model: Model) -> None:
        super().__init__(model.registry_name)
        self.model = model.eval()

    def score(self, batch: Batch) -> dict[str, np.ndarray]:
        if not isinstance(self.model, Ranker):
            raise RunError(f"model {self.model_name!r} ranks no rows (it is not a ranker)")
        with torch.inference_mode():
            return {label: p.float().numpy() for label, p in self.model.predict(self.model(batch)).items()}

    def user_vectors(self, batch: Batch) -> np.ndarray:
        if not isinstance(self.model, Retriever):
            return super().user_vectors(batch)
        with torch.inference_mode():
            return self.model.user_embedding(batch).float().numpy()

    def item_vectors(self) -> np.ndarray:
        if not isinstance(self.model, Retriever):
            return super().item_vectors()
        with torch.inference_mode():
            return self.model.item_embeddings().float().numpy()


class OnnxScorer(Scorer):
    """The ONNX graph of the bundle, run by ONNX Runtime on the CPU."""

    backend = "onnx"

    def __init__(self, graph: Path, model_name: str, schema: Schema) -> None:
        import onnxruntime

        super().__init__(model_name)
        self.schema = schema
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # as many as torch uses, not one spinning pool per core
        options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def score(self, batch: Batch) -> dict[str, np.ndarray]:
        given = dict(zip(input_names(self.schema), batch_tensors(batch, self.schema)))
        results = self.session.run(self.outputs, {name: given[name].numpy() for name in self.inputs})
        return {name.removeprefix(OUTPUT_PREFIX): p.astype(np.float32, copy=False) for name, p in zip(self.outputs, results)}


def load_scorer(bundle: Path, backend: str = "auto") -> Scorer:
    """The scorer of the exported ``bundle``: ``auto`` runs the ONNX graph when the manifest says it
    was exported (and checked against torch), else the torch model; ``onnx`` or ``torch`` insists."""
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    onnx = read_json(bundle / MANIFEST)["onnx"] if (bundle / MANIFEST).is_file() else {"exported": False, "reason": f"no {MANIFEST}"}
    available = onnx["exported"] and (bundle / ONNX_GRAPH).is_file()
    if backend == "onnx" and not available:
        raise RunError(f"{bundle}: holds no ONNX graph ({onnx['reason'] or f'no {ONNX_GRAPH}'}); use the torch backend")
    if backend == "torch" or not available:
        return TorchScorer(load_bundle(bundle))
    spec = read_json(bundle / "model.json")
    return OnnxScorer(bundle / ONNX_GRAPH, spec["name"], Schema.load(bundle / "schema.json"))
