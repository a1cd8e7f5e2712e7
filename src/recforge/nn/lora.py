"""Low-rank adaptation (LoRA; Hu et al., LoRA: Low-Rank Adaptation of Large Language Models,
ICLR 2022, arXiv:2106.09685) of linear layers that are frozen or shared with another path.

- :class:`LoRALinear` adapts one ``nn.Linear`` (weight W [out, in], bias b):
  ``y = x (W + s B A)^T + b`` with ``A`` [r, in], ``B`` [out, r], ``s = alpha / r`` (eq. 3).
  ``B`` starts at zero, so the adapted layer starts equal to the base, and ``A`` random
  (Kaiming-uniform, as the reference ``loralib`` code; the paper says Gaussian): with both at
  zero no gradient would ever reach either. W and b enter detached: the adapter trains A and B
  only, whether the base is frozen or trained by the module that owns it. The adapter does not
  own the base (its state dict is A and B): the owner keeps, moves and saves it.
- :class:`LoRA` adapts named ``nn.Linear`` layers of a host module and, when called, runs the
  host's own forward with every host parameter detached and each target's weight replaced by
  ``W + s B A``. EM3 (arXiv:2404.06078, sec. 3.4) runs its user content-interest sequence this way:
  the same FQ-Former weights as the target item, plus the sequence's own rank-8 deltas on the
  Q/K/V/O projections (:attr:`recforge.nn.fqformer.FQFormer.attention_projections`).

The delta is merged into the weight (one ``[out, r] x [r, in]`` product per call) rather than
applied as ``B (A x)`` per row: cheaper whenever a call sees more rows than ``in * out / (in + out)``,
which holds for the many tokens of a sequence of items.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call


class LoRALinear(nn.Module):
    """``x [..., in] -> [..., out]``: ``base`` plus a trainable rank-``rank`` delta (see the module docstring)."""

    def __init__(self, base: nn.Linear, rank: int = 8, alpha: float | None = None) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        object.__setattr__(self, "base", base)  # referenced, not registered: its owner saves and moves it
        self.scale = (alpha if alpha is not None else rank) / rank  # s = alpha / r
        self.lora_a = nn.Parameter(base.weight.new_empty(rank, base.in_features))  # A [r, in]
        self.lora_b = nn.Parameter(base.weight.new_zeros(base.out_features, rank))  # B [out, r] = 0
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    @property
    def weight(self) -> Tensor:
        """``sg(W) + s B A`` [out, in]."""
        return self.base.weight.detach() + self.scale * (self.lora_b @ self.lora_a)

    @property
    def bias(self) -> Tensor | None:
        return None if self.base.bias is None else self.base.bias.detach()

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)  # x (W + s B A)^T + b


class LoRA(nn.Module):
    """Rank-``rank`` deltas on the ``targets`` (names of ``nn.Linear`` submodules) of ``host``;
    ``lora(*args, **kwargs)`` is ``host(*args, **kwargs)`` computed with the adapted weights and
    every other host parameter detached, so that only the deltas learn from this path."""

    def __init__(self, host: nn.Module, targets: Sequence[str], rank: int = 8, alpha: float | None = None) -> None:
        super().__init__()
        modules = dict(host.named_modules())
        wrong = [t for t in targets if not isinstance(modules.get(t), nn.Linear)]
        if wrong or not targets:
            raise ValueError(f"LoRA targets must name nn.Linear layers of the host; {wrong or 'none given'} do not")
        object.__setattr__(self, "host", host)  # referenced, not registered: its owner saves and moves it
        self.targets = list(targets)
        self.adapters = nn.ModuleDict({t.replace(".", "_"): LoRALinear(modules[t], rank, alpha) for t in self.targets})

    def forward(self, *args, **kwargs):
        params = {name: p.detach() for name, p in self.host.named_parameters()}
        for target, adapter in zip(self.targets, self.adapters.values()):
            params[f"{target}.weight"] = adapter.weight  # sg(W) + s B A
        return functional_call(self.host, params, args, kwargs)
