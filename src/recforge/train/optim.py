"""Optimisers: AdamW for dense parameters, row-wise Adagrad for embedding tables.

The embedding tables are the parameters a model declares in ``sparse_parameters()`` (its feature
tables and every ``nn.Embedding(sparse=True)`` / ``nn.EmbeddingBag(sparse=True)``). A sparse gradient names
only the rows the batch looked up: :class:`RowWiseAdagrad` coalesces it and updates just those
rows with ``index_add_`` / ``index_select``, so a step costs time in proportion to the rows a
batch touches, not to the size of the table. (Small tables get dense gradients, whose rows are
zero where untouched, so that the update is the same.) Like production
embedding trainers it keeps one accumulator per row (the running sum of the row's mean squared
gradient): one float per row, where Adam would keep two per coordinate.

Gradient clipping (``clip_norm``) applies to the dense parameters only. Sparse rows are not
clipped: each row's step is its gradient divided by the root of that row's accumulated mean
squared gradient, which already includes this step's, so the root-mean-square of a row's step
never exceeds ``lr`` however large the gradient.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


def split_parameters(model: nn.Module, sparse: list[nn.Parameter]) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Trainable parameters of ``model`` as ``(dense, sparse)``; ``sparse`` names the embedding tables."""
    sparse_ids = {id(param) for param in sparse}
    dense_params: list[nn.Parameter] = []
    sparse_params: list[nn.Parameter] = []
    for param in model.parameters():  # shared parameters are listed once
        if param.requires_grad:
            (sparse_params if id(param) in sparse_ids else dense_params).append(param)
    return dense_params, sparse_params


class RowWiseAdagrad(torch.optim.Optimizer):
    """Adagrad with one accumulator per row, updating only the rows a sparse gradient names.

    For every touched row ``i`` with gradient ``g_i`` (a ``[D]`` vector)::

        acc_i += mean(g_i ** 2)
        w_i   -= lr * g_i / (sqrt(acc_i) + eps)

    A dense gradient (a table also used densely, e.g. tied to an output layer) updates every row.
    """

    def __init__(self, params, lr: float = 0.05, eps: float = 1e-8) -> None:
        if lr <= 0:
            raise ValueError(f"RowWiseAdagrad: lr must be > 0, got {lr}")
        super().__init__(params, {"lr": lr, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state["sum"] = torch.zeros(param.shape[0], dtype=param.dtype, device=param.device)
                rows, grads = _rows_and_values(param.grad)  # [R], [R, D...]
                accumulator: Tensor = state["sum"]
                accumulator.index_add_(0, rows, grads.square().flatten(1).mean(1))
                scale = accumulator.index_select(0, rows).sqrt_().add_(group["eps"])  # [R]
                step = grads / scale.view(-1, *([1] * (grads.dim() - 1)))
                param.index_add_(0, rows, step, alpha=-group["lr"])


def _rows_and_values(grad: Tensor) -> tuple[Tensor, Tensor]:
    """Distinct row indices and their summed gradient rows."""
    if grad.is_sparse:
        grad = grad.coalesce()
        return grad.indices()[0], grad.values()
    return torch.arange(grad.shape[0], device=grad.device), grad


class Optimizers:
    """AdamW over the dense parameters and :class:`RowWiseAdagrad` over ``sparse`` (the model's
    declared embedding tables), as one.

    ``step()`` clips the dense gradients to ``clip_norm`` (when set) and steps both optimisers.
    """

    def __init__(
        self,
        model: nn.Module,
        sparse: list[nn.Parameter],
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        sparse_lr: float = 0.05,
        clip_norm: float | None = None,
    ) -> None:
        self.dense_params, sparse_params = split_parameters(model, sparse)
        self.clip_norm = clip_norm
        self.dense = (
            torch.optim.AdamW(self.dense_params, lr=lr, weight_decay=weight_decay) if self.dense_params else None
        )
        self.sparse = RowWiseAdagrad(sparse_params, lr=sparse_lr) if sparse_params else None

    @property
    def _parts(self) -> dict[str, torch.optim.Optimizer]:
        return {name: opt for name, opt in (("dense", self.dense), ("sparse", self.sparse)) if opt is not None}

    def zero_grad(self) -> None:
        for opt in self._parts.values():
            opt.zero_grad(set_to_none=True)  # sparse gradients must not accumulate across steps

    def step(self) -> None:
        if self.clip_norm is not None and self.dense_params:
            nn.utils.clip_grad_norm_(self.dense_params, self.clip_norm)
        for opt in self._parts.values():
            opt.step()

    def state_dict(self) -> dict[str, Any]:
        return {name: opt.state_dict() for name, opt in self._parts.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != set(self._parts):
            raise ValueError(f"optimiser state holds {sorted(state)}, this model needs {sorted(self._parts)}")
        for name, opt in self._parts.items():
            opt.load_state_dict(state[name])
