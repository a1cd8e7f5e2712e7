"""Multi-process data-parallel training under ``torchrun``.

``torchrun --nproc_per_node N ...`` starts N processes with ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` set; :func:`setup` joins them into one process group (gloo) and
:func:`wrap` puts the model in ``DistributedDataParallel``. Each rank reads its own shard of the
batches (``rank`` / ``world_size`` of ``SplitView.batches``); rank 0 alone evaluates, logs and
writes checkpoints, and shares what the others need with :func:`broadcast_json`.

Sparse gradients: DDP all-reduces the gradient of an ``nn.Embedding(sparse=True)`` as a sparse
tensor (the indices and values of every rank are gathered, summed and divided by the world
size), so every rank's row-wise optimiser sees the same coalesced gradient and the ranks stay
identical. The gloo backend is used on every device because NCCL cannot all-reduce sparse
tensors.
"""

from __future__ import annotations

import atexit
import gc
import json
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from recforge.errors import ConfigError


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup() -> DistContext:
    """Join the process group that ``torchrun``'s environment describes (none when WORLD_SIZE <= 1)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext()
    if not dist.is_initialized():
        dist.init_process_group("gloo")
        atexit.register(_shutdown)
    return DistContext(
        rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", "0"))
    )


def _shutdown() -> None:
    if dist.is_initialized():
        # DDP reducers caught in reference cycles keep the gloo group alive; freed only at
        # interpreter finalisation, its worker threads abort the process ("terminate called
        # without an active exception"). Collect them while the interpreter is whole.
        gc.collect()
        dist.destroy_process_group()


def check_device(device: str) -> str:
    """``device`` when torch can train on it on this machine; otherwise a ConfigError saying what to use."""
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"{device!r} is not a torch device; use 'cpu', 'cuda' or 'cuda:N'") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{device!r} was asked for but torch sees no CUDA device here; use 'cpu'")
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise ConfigError(f"{device!r} was asked for but torch sees {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return device


def device_for(context: DistContext, device: str) -> torch.device:
    """``device`` itself, or this rank's own GPU when it names CUDA without an index."""
    resolved = torch.device(device)
    if resolved.type == "cuda" and resolved.index is None and context.enabled:
        return torch.device("cuda", context.local_rank)
    return resolved


def wrap(model: nn.Module, context: DistContext, device: torch.device) -> nn.Module:
    """The module to call for training: ``model`` itself, or its DDP wrapper with several ranks.

    DDP's rule applies: every parameter must receive a gradient at every step.
    """
    if not context.enabled:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def broadcast_json(value: Any, context: DistContext) -> Any:
    """Rank 0's ``value`` (JSON-serialisable) on every rank; sent as UTF-8 bytes, never pickled."""
    if not context.enabled:
        return value
    payload = json.dumps(value).encode() if context.is_main else b""
    size = torch.tensor([len(payload)], dtype=torch.long)
    dist.broadcast(size, src=0)
    buffer = torch.zeros(int(size), dtype=torch.uint8)
    if context.is_main:
        buffer.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
    dist.broadcast(buffer, src=0)
    return json.loads(buffer.numpy().tobytes().decode())


def barrier(context: DistContext) -> None:
    if context.enabled:
        dist.barrier()
