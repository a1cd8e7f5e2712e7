"""Vector quantization: k-means codebooks, residual (RQ), product (PQ) and nearest-neighbour (VQ) codes.

Every quantizer maps vectors to integer codes and back: ``encode(x [N, D]) -> codes``,
``decode(codes) -> [N, D]``, and ``forward(x) -> (quantized, codes, losses)`` where ``quantized``
passes gradients straight through to ``x`` (``x + (q - x).detach()``) and ``losses`` holds the
commitment term ``||x - sg(q)||^2``. Codebooks are fitted by k-means (Lloyd's algorithm, k-means++
seeding) and then frozen (buffers, not parameters): QARM's RQ-KMeans and SEMINAR's PQ both fit
codebooks offline and keep them fixed while the model trains on the codes.

- :class:`KMeansCodebook`: one codebook, ``[N, D] -> [N]``.
- :class:`ResidualQuantizer`: ``L`` codebooks, each fitted on the residuals the previous levels
  leave, ``[N, D] -> [N, L]``; the decoded vector is the sum of the chosen centroids.
- :class:`ProductQuantizer`: ``M`` codebooks over ``M`` disjoint slices of the dimensions,
  ``[N, D] -> [N, M]``; the decoded vector is the concatenation of the chosen centroids.
- :func:`nearest_codes`: QARM's VQ codes, the ``k`` items of a pool nearest to each vector,
  ``[N, D], [P, D] -> [N, k]``.

k-means runs in torch (chunked distances, no Python loop over points) so that ``nn`` imports no
vector-search library.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_CHUNK = 1 << 16  # rows whose distances to every centroid are computed at once


def nearest(x: Tensor, centroids: Tensor) -> Tensor:
    """Index of the nearest centroid (squared L2) of every row: ``[N, D], [K, D] -> [N]``."""
    squared = centroids.pow(2).sum(1)  # [K]
    parts = [(squared - 2 * chunk @ centroids.T).argmin(1) for chunk in x.split(_CHUNK)]  # ||x||^2 is the same for all k
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)


def kmeans(x: Tensor, k: int, iterations: int = 25, seed: int = 0) -> Tensor:
    """``k`` centroids of the rows of ``x`` ``[N, D] -> [k, D]``: k-means++ seeding, then Lloyd steps.

    A cluster left empty takes the point farthest from its centroid, so every centroid is used
    when ``N >= k``.
    """
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= the number of points; got k={k}, {n} points")
    x = x.detach().float()
    generator = torch.Generator().manual_seed(seed)
    centroids = x[torch.randint(n, (1,), generator=generator)]  # [1, D]
    closest = (x - centroids).pow(2).sum(1)  # [N] squared distance to the nearest seed so far
    for _ in range(1, k):  # k-means++: the next seed drawn with probability ~ squared distance
        weights = closest if closest.sum() > 0 else torch.ones_like(closest)
        chosen = x[torch.multinomial(weights, 1, generator=generator)]  # [1, D]
        centroids = torch.cat([centroids, chosen])
        closest = torch.minimum(closest, (x - chosen).pow(2).sum(1))
    for _ in range(iterations):
        assignment = nearest(x, centroids)  # [N]
        sums = torch.zeros_like(centroids).index_add_(0, assignment, x)  # [k, D]
        counts = torch.bincount(assignment, minlength=k)  # [k]
        updated = sums / counts.clamp(min=1).unsqueeze(1).to(x.dtype)
        empty = counts == 0
        if empty.any():  # re-seed empty clusters with the points worst served by their centroid
            error = (x - centroids[assignment]).pow(2).sum(1)  # [N]
            updated[empty] = x[error.topk(int(empty.sum())).indices]
        if torch.equal(updated, centroids):
            break
        centroids = updated
    return centroids


class KMeansCodebook(nn.Module):
    """A frozen codebook of ``size`` centroids of width ``dim``: ``[N, D] -> [N]`` and back."""

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("centroids", torch.zeros(size, dim))  # [K, D]

    @property
    def size(self) -> int:
        return self.centroids.shape[0]

    def fit(self, x: Tensor, iterations: int = 25, seed: int = 0) -> "KMeansCodebook":
        self.centroids.copy_(kmeans(x, self.size, iterations, seed))
        return self

    def encode(self, x: Tensor) -> Tensor:
        return nearest(x, self.centroids)  # [N]

    def decode(self, codes: Tensor) -> Tensor:
        return self.centroids[codes]  # [N, D]


class _Quantizer(nn.Module, ABC):
    @abstractmethod
    def encode(self, x: Tensor) -> Tensor: ...

    @abstractmethod
    def decode(self, codes: Tensor) -> Tensor: ...

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """``(quantized [N, D] with straight-through gradients, codes, {"commitment": ||x - sg(q)||^2})``."""
        codes = self.encode(x.detach())
        quantized = self.decode(codes)
        losses = {"commitment": F.mse_loss(x, quantized.detach())}
        return x + (quantized - x).detach(), codes, losses


class ResidualQuantizer(_Quantizer):
    """RQ-KMeans: ``levels`` codebooks of ``size`` centroids, level ``l`` fitted on what levels
    ``< l`` leave. ``[N, D] -> [N, levels]``; decoding sums one centroid per level."""

    def __init__(self, levels: int, size: int, dim: int) -> None:
        super().__init__()
        self.levels = nn.ModuleList(KMeansCodebook(size, dim) for _ in range(levels))

    def fit(self, x: Tensor, iterations: int = 25, seed: int = 0) -> "ResidualQuantizer":
        residual = x.detach().float()
        for level, codebook in enumerate(self.levels):
            codebook.fit(residual, iterations, seed + level)
            residual = residual - codebook.decode(codebook.encode(residual))
        return self

    def encode(self, x: Tensor) -> Tensor:
        residual, codes = x, []
        for codebook in self.levels:
            level_codes = codebook.encode(residual)  # [N]
            residual = residual - codebook.decode(level_codes)
            codes.append(level_codes)
        return torch.stack(codes, 1)  # [N, L]

    def decode(self, codes: Tensor) -> Tensor:
        return sum(codebook.decode(codes[:, level]) for level, codebook in enumerate(self.levels))  # [N, D]


class ProductQuantizer(_Quantizer):
    """PQ: the ``dim`` dimensions cut into ``groups`` equal slices, each with its own codebook of
    ``size`` centroids. ``[N, D] -> [N, groups]``; decoding concatenates one centroid per slice."""

    def __init__(self, groups: int, size: int, dim: int) -> None:
        super().__init__()
        if dim % groups:
            raise ValueError(f"product quantization cuts dim={dim} into groups={groups} equal slices; {groups} must divide {dim}")
        self.slices = nn.ModuleList(KMeansCodebook(size, dim // groups) for _ in range(groups))

    def _parts(self, x: Tensor) -> tuple[Tensor, ...]:
        return x.chunk(len(self.slices), dim=1)  # groups x [N, D / groups]

    def fit(self, x: Tensor, iterations: int = 25, seed: int = 0) -> "ProductQuantizer":
        for group, (codebook, part) in enumerate(zip(self.slices, self._parts(x.detach().float()))):
            codebook.fit(part, iterations, seed + group)
        return self

    def encode(self, x: Tensor) -> Tensor:
        return torch.stack([codebook.encode(part) for codebook, part in zip(self.slices, self._parts(x))], 1)  # [N, M]

    def decode(self, codes: Tensor) -> Tensor:
        return torch.cat([codebook.decode(codes[:, group]) for group, codebook in enumerate(self.slices)], 1)  # [N, D]


def nearest_codes(x: Tensor, pool: Tensor, k: int) -> Tensor:
    """QARM's VQ codes: the rows of ``pool`` with the ``k`` largest inner products with each row of
    ``x``, best first. ``[N, D], [P, D] -> [N, k]``."""
    if not 1 <= k <= pool.shape[0]:
        raise ValueError(f"nearest_codes needs 1 <= k <= the pool size; got k={k}, a pool of {pool.shape[0]}")
    parts = [(chunk @ pool.T).topk(k, dim=1).indices for chunk in x.split(_CHUNK)]
    return torch.cat(parts) if parts else torch.empty(0, k, dtype=torch.long)


def codebook_usage(codes: Tensor, size: int) -> Tensor:
    """Share of each codebook's ``size`` entries that some item uses, per level: ``[N, L] -> [L]``."""
    return torch.stack([torch.bincount(codes[:, level], minlength=size).gt(0).float().mean() for level in range(codes.shape[1])])


def collision_rate(codes: Tensor) -> float:
    """Share of items whose full code ``[L]`` another item also has: ``[N, L] -> float``."""
    _, inverse, counts = torch.unique(codes, dim=0, return_inverse=True, return_counts=True)
    return float((counts[inverse] > 1).float().mean()) if len(codes) else 0.0
