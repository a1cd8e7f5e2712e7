"""Search-based interest over lifelong histories: a general search unit (GSU) picks K of the L
events of each history for a target, an exact search unit (ESU) attends over those K.

Shapes: B targets, L history events, D width, H heads, K picked events; ``mask`` [B, L] is True
for real events. Every selection returns ``(indices, valid)``: positions into the history in
history order, then the empties of a row with fewer real events than asked (index 0, valid False);
pads are never picked.

- Exact GSU: :func:`target_scores`, :func:`top_k`, :func:`gather_events`; :class:`MultiHeadSearch`
  is the GSU and ESU of TWIN (Chang et al., arXiv:2302.02352) and SEMINAR §3.4 (Shen et al.,
  arXiv:2407.10714), also the soft search of SIM (Pi et al., arXiv:2006.05639) with one head.
- :class:`SimHash`: ETA's hashed GSU (Chen et al., arXiv:2108.04468), Hamming distances of
  signatures stored per item.
- Product-quantised GSU (SEMINAR §3.5): :class:`ProductQuantizedKeys` and
  :class:`MultiModalProductQuantizedKeys` give codes and asymmetric-distance (ADC) look-up tables;
  :func:`adc_scores` scores codes with a table; :func:`shortlist` takes the top N by a quantised
  table (:func:`quantize_table`, :func:`fast_scan_scores`) over 4-bit codes packed by
  :func:`pack_codes`; :func:`rerank` keeps the exact top K of the short list by :func:`exact_dot`
  with the true vectors.

:func:`fast_scan_scores`, :func:`shortlist` and :func:`rerank` run a compiled kernel
(``_pq_kernel.cpp``, AVX-512 where the CPU has it, built once with g++ into
``$RECFORGE_CACHE/kernels``, default ``~/.cache/recforge/kernels``) on CPU tensors and fall back to
torch, with a warning, when it cannot be built; both give the same results bit for bit. The
kernel splits the rows over ``torch.get_num_threads()`` threads.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import shutil
import subprocess
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recforge.nn.quantization import ProductQuantizer

# --- exact GSU -------------------------------------------------------------------------------


def target_scores(target: Tensor, keys: Tensor, mask: Tensor) -> Tensor:
    """``s_l = <e_t, k_l>``, pads ``-inf``: ``[B, D], [B, L, D], [B, L] -> [B, L]``."""
    scores = torch.bmm(target.unsqueeze(1), keys.transpose(1, 2)).squeeze(1)
    return scores.masked_fill(~mask, -math.inf)


def top_k(scores: Tensor, mask: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` best real positions of each row: ``[..., L]`` scores, a mask broadcastable to
    them -> ``(indices, valid)`` ``[..., k]`` in history order (ties in any order)."""
    mask = mask.expand_as(scores)
    length = scores.shape[-1]
    picked = scores.masked_fill(~mask, -math.inf).topk(min(k, length), dim=-1).indices
    valid = mask.gather(-1, picked)
    return _in_history_order(picked, valid, length, k)


def _in_history_order(picked: Tensor, valid: Tensor, length: int, k: int) -> tuple[Tensor, Tensor]:
    """Sort picked positions ascending, empties last (index 0); pad to ``k`` columns."""
    order = picked.masked_fill(~valid, length).sort(dim=-1).values
    order = F.pad(order, (0, k - order.shape[-1]), value=length)
    valid = order < length
    return order.masked_fill(~valid, 0), valid


def gather_events(values: Tensor, indices: Tensor) -> Tensor:
    """The rows of each history at ``indices``: ``[B, L, *E], [B, *I] -> [B, *I, *E]``."""
    b, length = values.shape[:2]
    offsets = torch.arange(b, device=indices.device).view(b, *[1] * (indices.dim() - 1)) * length
    rows = values.flatten(0, 1).index_select(0, (indices + offsets).flatten())
    return rows.view(*indices.shape, *values.shape[2:])


class MultiHeadSearch(nn.Module):
    """TWIN / SEMINAR §3.4 search over a long history, the GSU and ESU sharing ``W_Q``, ``W_K``.

    GSU, per head h: ``s_{h,l} = (W_Q^h e_t) · (W_K^h e_l)``, ``[B, D], [B, L, D] -> [B, H, L]``,
    top-``K`` -> ``[B, H, K]``; computed as ``((W_K^h)^T W_Q^h e_t) · e_l`` so the history is never
    projected. ESU, per head over its events: ``a = softmax_k((W_Q^h e_t) · (W_K^h e_k) / sqrt(d_h))``,
    ``head_h = Σ_k a_k W_V^h e_k``; ``u = W_O [head_1 ‖ … ‖ head_H]`` -> ``[B, D]``. ``d_h`` defaults
    to ``D`` (§3.4: ``W_O: H·D -> D``).
    """

    def __init__(self, dim: int, heads: int = 4, top_k: int = 50, head_dim: int | None = None) -> None:
        super().__init__()
        self.heads, self.top_k, self.head_dim = heads, top_k, head_dim or dim
        inner = heads * self.head_dim
        self.query = nn.Linear(dim, inner, bias=False)
        self.key = nn.Linear(dim, inner, bias=False)
        self.value = nn.Linear(dim, inner, bias=False)
        self.output = nn.Linear(inner, dim, bias=False)

    def _per_head(self, layer: nn.Linear) -> Tensor:
        return layer.weight.view(self.heads, self.head_dim, -1)  # [H, d_h, D]

    def probe(self, target: Tensor) -> Tensor:
        """``(W_K^h)^T W_Q^h e_t``, the vector each head scores history items by: ``[B, D] -> [B, H, D]``."""
        q = self.query(target).view(-1, self.heads, self.head_dim)  # [B, H, d_h]
        return torch.einsum("bhe,hed->bhd", q, self._per_head(self.key))

    def scores(self, target: Tensor, history: Tensor, mask: Tensor) -> Tensor:
        """GSU scores ``[B, D], [B, L, D], [B, L] -> [B, H, L]``, pads ``-inf``."""
        return torch.bmm(self.probe(target), history.transpose(1, 2)).masked_fill(~mask.unsqueeze(1), -math.inf)

    def select(self, target: Tensor, history: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """GSU top-K per head: ``(indices, valid)`` ``[B, H, K]``."""
        with torch.no_grad():
            return top_k(self.scores(target, history, mask), mask.unsqueeze(1), self.top_k)

    def attend(self, target: Tensor, events: Tensor, valid: Tensor) -> Tensor:
        """ESU: ``[B, D]``, events ``[B, H, K, D]`` (per head) or ``[B, K, D]`` (shared), valid
        ``[B, H, K]`` or ``[B, K]`` -> ``[B, D]``; a row without valid events gives ``W_O 0``."""
        if events.dim() == 3:
            events, valid = events.unsqueeze(1), valid.unsqueeze(1)
        b, k = events.shape[0], events.shape[2]
        events = events.expand(b, self.heads, k, events.shape[-1])
        q = self.query(target).view(b, self.heads, self.head_dim)  # [B, H, d_h]
        keys = torch.einsum("bhkd,hed->bhke", events, self._per_head(self.key))  # [B, H, K, d_h]
        values = torch.einsum("bhkd,hed->bhke", events, self._per_head(self.value))
        logits = torch.einsum("bhe,bhke->bhk", q, keys) / math.sqrt(self.head_dim)
        weights = logits.masked_fill(~valid, torch.finfo(logits.dtype).min).softmax(-1) * valid
        heads = torch.einsum("bhk,bhke->bhe", weights, values)  # [B, H, d_h]
        return self.output(heads.flatten(1))

    def forward(self, target: Tensor, history: Tensor, mask: Tensor) -> Tensor:
        """GSU top-K per head, then the ESU over them: ``[B, D], [B, L, D], [B, L] -> [B, D]``."""
        indices, valid = self.select(target, history, mask)
        return self.attend(target, gather_events(history, indices), valid)


# --- SimHash (ETA) -----------------------------------------------------------------------------

_M1, _M2, _M4 = 0x5555555555555555, 0x3333333333333333, 0x0F0F0F0F0F0F0F0F
_M8, _M16, _M32 = 0x00FF00FF00FF00FF, 0x0000FFFF0000FFFF, 0x00000000FFFFFFFF


def popcount(words: Tensor) -> Tensor:
    """Set bits of each int64 word, without overflow: ``[...] -> [...]`` int64."""
    x = words
    for shift, m in ((1, _M1), (2, _M2), (4, _M4), (8, _M8), (16, _M16), (32, _M32)):
        x = (x & m) + ((x >> shift) & m)  # every field stays non-negative: no carry, no overflow
    return x


class SimHash(nn.Module):
    """ETA's locality-sensitive hash: ``bits`` fixed random hyperplanes ``R`` [D, bits];
    ``sig(x) = [x R > 0]`` packed 64 bits to an int64 word, ``[..., D] -> [..., bits / 64]``.

    The history is ranked by ``Hamming(sig(e_t), sig(e_l))``, smallest first. Signatures of the
    items are computed once (``signatures(item_table)``, again whenever the table changes) and
    stored, so scoring a history reads only its ``[B, L, W]`` words.
    """

    def __init__(self, dim: int, bits: int = 64, seed: int = 0) -> None:
        super().__init__()
        if bits < 64 or bits % 64:
            raise ValueError(f"SimHash packs 64 bits per word; bits must be a positive multiple of 64, got {bits}")
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("planes", torch.randn(dim, bits, generator=generator))
        self.register_buffer("bit_values", torch.tensor([1 << k for k in range(8)], dtype=torch.uint8), persistent=False)

    def signatures(self, x: Tensor) -> Tensor:
        """``[..., D] -> [..., W]`` int64, bit ``64 w + k`` of word ``w`` = hyperplane ``64 w + k``."""
        bits = (x.to(self.planes.dtype) @ self.planes > 0).to(torch.uint8)  # [..., bits]
        grouped = bits.unflatten(-1, (-1, 8)) * self.bit_values  # [..., bits / 8, 8]
        return grouped.sum(-1, dtype=torch.uint8).view(torch.int64)  # little-endian bytes -> words

    @staticmethod
    def distances(query: Tensor, history: Tensor) -> Tensor:
        """Hamming distances ``[B, W], [B, L, W] -> [B, L]`` int64."""
        return popcount(query.unsqueeze(1) ^ history).sum(-1)

    def select(self, query: Tensor, history: Tensor, mask: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """The ``k`` nearest events by Hamming distance: signatures ``[B, W], [B, L, W]``,
        ``[B, L]`` -> ``(indices, valid)`` ``[B, k]``."""
        return top_k(-self.distances(query, history).float(), mask, k)


# --- product-quantised GSU (SEMINAR §3.5) ----------------------------------------------------


class ProductQuantizedKeys(nn.Module):
    """Per-sub-space k-means codebooks ``C_s`` [C, D / S] (:class:`ProductQuantizer`, nearest
    codeword by L2) and uint8 codes per item ``[V, D] -> [V, S]``. The defaults, 32 sub-spaces of
    4-bit codes, spend SEMINAR's 16 bytes per item (16 x 8 bits) in the layout :func:`shortlist` scans.

    ADC: ``LUT[b, s, c] = <q_{b,s}, C_s[c]>`` (:meth:`lookup_table`, ``[B, D] -> [B, S, C]``) and
    ``score(q, k) = Σ_s LUT[s, code_s(k)] = <q, decode(code(k))>`` (:func:`adc_scores`).
    """

    def __init__(self, dim: int, subspaces: int = 32, codewords: int = 16) -> None:
        super().__init__()
        if not 1 <= codewords <= 256:
            raise ValueError(f"uint8 codes hold 1..256 codewords per sub-space, got {codewords}")
        self.quantizer = ProductQuantizer(subspaces, codewords, dim)

    @property
    def codebooks(self) -> Tensor:
        """``[S, C, D / S]``."""
        return torch.stack([book.centroids for book in self.quantizer.slices])

    def fit(self, vectors: Tensor, iterations: int = 25, seed: int = 0) -> "ProductQuantizedKeys":
        """k-means per sub-space on ``vectors`` [N, D]."""
        self.quantizer.fit(vectors, iterations, seed)
        return self

    def encode(self, vectors: Tensor) -> Tensor:
        """``[..., D] -> [..., S]`` uint8."""
        codes = self.quantizer.encode(vectors.reshape(-1, vectors.shape[-1]))
        return codes.to(torch.uint8).view(*vectors.shape[:-1], -1)

    def decode(self, codes: Tensor) -> Tensor:
        """``[..., S] -> [..., D]``: the codewords at the codes."""
        flat = self.quantizer.decode(codes.reshape(-1, codes.shape[-1]).long())
        return flat.view(*codes.shape[:-1], -1)

    def lookup_table(self, query: Tensor) -> Tensor:
        """``[B, D] -> [B, S, C]``."""
        books = self.codebooks
        return torch.einsum("bsd,scd->bsc", query.reshape(query.shape[0], books.shape[0], -1), books)


class MultiModalProductQuantizedKeys(nn.Module):
    """SEMINAR §3.5 over M modalities: ``s(q, k) = Σ_{i,j} w_i w_j <q_i, k_j>`` with each modality
    quantised by its own codebooks, codes ``[..., M, D] -> [..., M, S]``.

    With both sides quantised, ``<q_i, k_j> ≈ Σ_s T[i, s, c_{i,s}(q), j, c_{j,s}(k)]`` from the
    codeword x codeword tables ``T[i, s, a, j, b] = <C_{i,s}[a], C_{j,s}[b]>`` [M, S, C, M, C],
    precomputed by :meth:`fit`. :meth:`lookup_table` folds the query's codes and the weights into
    one ADC table over the M·S (modality, sub-space) slots of the keys' codes ``[B, L, M·S]``, for
    :func:`adc_scores`, or, with at most 16 codewords, :func:`shortlist` over ``pack_codes``.
    Defaults: §3.5's S = 16 sub-spaces, with 4-bit codes for the scan (its code uses 256 or 512).
    """

    def __init__(self, modalities: int, dim: int, subspaces: int = 16, codewords: int = 16) -> None:
        super().__init__()
        self.modalities = nn.ModuleList(ProductQuantizedKeys(dim, subspaces, codewords) for _ in range(modalities))
        shape = (modalities, subspaces, codewords, modalities, codewords)
        self.register_buffer("pair_tables", torch.zeros(shape))

    def fit(self, vectors: Tensor, iterations: int = 25, seed: int = 0) -> "MultiModalProductQuantizedKeys":
        """Codebooks per modality on ``vectors`` [N, M, D], then the pair tables."""
        for i, keys in enumerate(self.modalities):
            keys.fit(vectors[:, i], iterations, seed + 1000 * i)
        books = torch.stack([keys.codebooks for keys in self.modalities])  # [M, S, C, d]
        self.pair_tables.copy_(torch.einsum("isad,jsbd->isajb", books, books))
        return self

    def encode(self, vectors: Tensor) -> Tensor:
        """``[..., M, D] -> [..., M, S]`` uint8."""
        return torch.stack([keys.encode(vectors[..., i, :]) for i, keys in enumerate(self.modalities)], -2)

    def decode(self, codes: Tensor) -> Tensor:
        """``[..., M, S] -> [..., M, D]``."""
        return torch.stack([keys.decode(codes[..., i, :]) for i, keys in enumerate(self.modalities)], -2)

    def lookup_table(self, query_codes: Tensor, weights: Tensor) -> Tensor:
        """``LUT[b, (j, s), c] = w_j Σ_i w_i T[i, s, c_{i,s}(q_b), j, c]``: query codes ``[B, M, S]``,
        weights ``[M]`` or ``[B, M]`` -> ``[B, M·S, C]``."""
        b, m, s = query_codes.shape
        w = weights.expand(b, m).to(self.pair_tables.dtype)
        modality = torch.arange(m, device=query_codes.device).view(1, m, 1)
        subspace = torch.arange(s, device=query_codes.device).view(1, 1, s)
        rows = self.pair_tables[modality, subspace, query_codes.long()]  # [B, M_i, S, M_j, C]
        lut = torch.einsum("bi,bisjc->bjsc", w, rows) * w.view(b, m, 1, 1)
        return lut.flatten(1, 2)


def adc_scores(lut: Tensor, codes: Tensor) -> Tensor:
    """``Σ_s LUT[b, ..., s, codes[b, l, s]]``: ``[B, *H, S, C], [B, L, S] -> [B, *H, L]``, the codes
    of a row shared by its tables ``*H`` (heads)."""
    out = (*lut.shape[:-2], codes.shape[1])
    per_row = (codes.shape[0], *[1] * (lut.dim() - 3), codes.shape[1])
    scores = lut.new_zeros(out)
    for s in range(codes.shape[-1]):  # one gather per sub-space
        scores += lut[..., s, :].gather(-1, codes[..., s].long().view(per_row).expand(out))
    return scores


def pack_codes(codes: Tensor) -> Tensor:
    """4-bit codes two per byte, sub-space ``2p`` in the low nibble of byte ``p``, zero-padded to
    ``P = 8 ceil(S / 16)`` bytes: ``[..., S]`` (values < 16) -> ``[..., P]`` uint8."""
    if codes.numel() and int(codes.max()) >= 16:
        raise ValueError("pack_codes packs 4-bit codes (codewords <= 16)")
    width = 8 * math.ceil(codes.shape[-1] / 16)
    padded = F.pad(codes.to(torch.uint8), (0, 2 * width - codes.shape[-1])).unflatten(-1, (width, 2))
    return padded[..., 0] | (padded[..., 1] << 4)


def quantize_table(lut: Tensor) -> Tensor:
    """The table in uint8 steps shared by all sub-spaces: ``(LUT - min_c LUT[s]) · 255 / span``,
    rounded, ``span`` the widest sub-space range of the row: ``[B, S, C] -> [B, S, C]`` uint8.
    Rank-preserving up to ``S / 2`` steps of ``span / 255`` per score."""
    shifted = lut - lut.amin(-1, keepdim=True)
    span = shifted.amax(dim=(-2, -1), keepdim=True)
    return (shifted * (255 / span.clamp_min(torch.finfo(lut.dtype).tiny))).round().clamp(0, 255).to(torch.uint8)


def fast_scan_scores(lut: Tensor, packed: Tensor) -> Tensor:
    """The scores :func:`shortlist` ranks by, ``Σ_s quantize_table(LUT)[b, s, code_s]``: table
    ``[B, S, C <= 16]``, packed codes ``[B, L, P]`` -> ``[B, L]`` int32."""
    _check_scan(lut, packed.shape[-1], packed.dtype)
    kernel = _kernel() if packed.device.type == "cpu" else None
    if kernel is None:
        return _fast_scan_torch(_scan_table(lut, packed.shape[-1]), packed)
    return _fast_scan_compiled(kernel, lut, packed, simd=True)


def shortlist(lut: Tensor, packed: Tensor, mask: Tensor | None, n: int) -> tuple[Tensor, Tensor]:
    """The ``n`` best real events by the quantised ADC score over 4-bit codes (ties to the earlier
    event): table ``[B, S, C <= 16]``, packed codes ``[B, L, P]``, ``[B, L]`` -> ``(indices, valid)``
    ``[B, n]``."""
    _check_scan(lut, packed.shape[-1], packed.dtype)
    if n < 1:
        raise ValueError(f"a short list holds n >= 1 events, got {n}")
    kernel = _kernel() if packed.device.type == "cpu" else None
    if kernel is None:
        return _shortlist_torch(_scan_table(lut, packed.shape[-1]), packed, mask, n)
    return _shortlist_compiled(kernel, lut, packed, mask, n, simd=True)


def exact_dot(query: Tensor, vectors: Tensor) -> Tensor:
    """``<q_b, v_{b,n}>`` in one fixed order: 16 lanes, lane i summing ``q[16c + i] v[16c + i]``
    over c (zeros past D), then halves added pairwise 16 -> 8 -> 4 -> 2 -> 1.
    ``[B, D], [B, N, D] -> [B, N]``."""
    products = vectors * query.unsqueeze(1)
    products = F.pad(products, (0, -products.shape[-1] % 16))
    lanes = products[..., :16]
    for c in range(16, products.shape[-1], 16):
        lanes = lanes + products[..., c : c + 16]
    for width in (8, 4, 2, 1):
        lanes = lanes[..., :width] + lanes[..., width : 2 * width]
    return lanes[..., 0]


def rerank(query: Tensor, vectors: Tensor, candidates: Tensor, valid: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Exact top-``k`` of a short list by :func:`exact_dot` (ties to the earlier candidate):
    ``[B, D]``, true vectors ``[B, L, D]``, candidates ``[B, N]`` with ``valid`` -> ``(indices,
    valid)`` ``[B, k]`` in candidate order."""
    if k < 1:
        raise ValueError(f"rerank keeps k >= 1 events, got {k}")
    kernel = _kernel() if vectors.device.type == "cpu" and vectors.dtype == torch.float32 else None
    if kernel is None:
        return _rerank_torch(query, vectors, candidates, valid, k)
    return _rerank_compiled(kernel, query, vectors, candidates, valid, k, simd=True)


# --- the torch paths ----------------------------------------------------------------------------


def _check_scan(lut: Tensor, width: int, packed_dtype: torch.dtype = torch.uint8) -> None:
    if packed_dtype != torch.uint8:
        raise ValueError(f"packed codes are uint8 (pack_codes), got {packed_dtype}")
    if lut.shape[-1] > 16:
        raise ValueError(f"the short list scans 4-bit codes: at most 16 codewords, got {lut.shape[-1]}")
    if 2 * width < lut.shape[1]:
        raise ValueError(f"packed codes of {width} bytes hold {2 * width} sub-spaces; the table has {lut.shape[1]}")


def _scan_table(lut: Tensor, width: int) -> Tensor:
    """The quantised table padded to the packed layout: ``[B, S, C] -> [B, 2P, 16]`` uint8."""
    _check_scan(lut, width)
    table = quantize_table(lut.float())
    return F.pad(table, (0, 16 - table.shape[-1], 0, 2 * width - table.shape[1])).contiguous()


def _fast_scan_torch(table: Tensor, packed: Tensor) -> Tensor:
    """Integer ADC scores ``[B, 2P, 16] uint8, [B, L, P] -> [B, L]`` int32."""
    scores = torch.zeros(packed.shape[:2], dtype=torch.int32, device=packed.device)
    table = table.int()
    for p in range(packed.shape[-1]):
        byte = packed[..., p].long()
        scores += table[:, 2 * p].gather(1, byte & 15) + table[:, 2 * p + 1].gather(1, byte >> 4)
    return scores


def _best_first(scores: Tensor, taken: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """The ``n`` best of each row (stable: ties to the earlier column) where ``taken``, in column
    order, then empties."""
    length = scores.shape[1]
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :n]
    return _in_history_order(order, taken.gather(1, order), length, n)


def _shortlist_torch(table: Tensor, packed: Tensor, mask: Tensor | None, n: int) -> tuple[Tensor, Tensor]:
    scores = _fast_scan_torch(table, packed)
    real = torch.ones_like(scores, dtype=torch.bool) if mask is None else mask
    return _best_first(scores.masked_fill(~real, -1), real, n)  # pads below every real score (>= 0)


def _rerank_torch(query: Tensor, vectors: Tensor, candidates: Tensor, valid: Tensor, k: int) -> tuple[Tensor, Tensor]:
    scores = exact_dot(query, gather_events(vectors, candidates)).masked_fill(~valid, -math.inf)
    picked, ok = _best_first(scores, valid, k)
    return candidates.gather(1, picked).masked_fill(~ok, 0), ok


# --- the compiled kernel --------------------------------------------------------------------------

_SOURCE = Path(__file__).with_name("_pq_kernel.cpp")
_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-ffp-contract=off")


def _cache_dir() -> Path:
    base = os.environ.get("RECFORGE_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "recforge") / "kernels"


@functools.cache
def _kernel() -> ctypes.CDLL | None:
    """The scan kernel, compiled on first use (keyed by the source, compiler and flags), or None
    with a warning when it cannot be built or loaded."""
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    try:
        if compiler is None:
            raise RuntimeError("no C++ compiler found (set CXX or install g++)")
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
        digest = hashlib.sha256(_SOURCE.read_bytes() + " ".join((compiler, version, *_FLAGS)).encode()).hexdigest()[:16]
        library = _cache_dir() / f"pq_kernel-{digest}.so"
        if not library.exists():
            library.parent.mkdir(parents=True, exist_ok=True)
            handle, partial = tempfile.mkstemp(suffix=".so", dir=library.parent)
            os.close(handle)
            done = subprocess.run([compiler, *_FLAGS, str(_SOURCE), "-o", partial], capture_output=True, text=True)
            if done.returncode:
                os.unlink(partial)
                raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-400:]}")
            os.replace(partial, library)  # atomic: concurrent builders leave one complete file
        kernel = ctypes.CDLL(str(library))
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        warnings.warn(
            f"recforge.nn.longseq: the PQ scan kernel is not available ({error}); using the pure-torch path "
            "(same results, slower)",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    kernel.recforge_adc_shortlist.argtypes = [ptr, i64, i64, ptr, ptr, i64, i64, i64, i64, i64, ctypes.c_int, ptr, ptr]
    kernel.recforge_adc_scores.argtypes = [ptr, i64, i64, ptr, i64, i64, i64, i64, ctypes.c_int, ptr]
    kernel.recforge_rerank.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, i64, ctypes.c_int, ptr, ptr]
    return kernel


@functools.cache
def _pool(process: int, threads: int) -> ThreadPoolExecutor:
    """Worker threads of one process (a forked child gets its own)."""
    return ThreadPoolExecutor(threads, thread_name_prefix="recforge-pq")


def _over_rows(run, rows: int) -> None:
    """``run(first, last)`` over ``torch.get_num_threads()`` slices of the rows (the kernel drops the GIL)."""
    threads = max(1, min(torch.get_num_threads(), rows))
    if threads == 1:
        run(0, rows)
        return
    bounds = [rows * t // threads for t in range(threads + 1)]
    list(_pool(os.getpid(), threads).map(run, bounds[:-1], bounds[1:]))


def _shortlist_compiled(
    kernel: ctypes.CDLL, lut: Tensor, packed: Tensor, mask: Tensor | None, n: int, simd: bool
) -> tuple[Tensor, Tensor]:
    b, length, width = packed.shape
    lut, packed = lut.float().contiguous(), packed.contiguous()
    subspaces, codewords = lut.shape[1:]
    real = None if mask is None else mask.bool().contiguous().view(torch.uint8)
    indices = torch.empty(b, n, dtype=torch.int64)
    valid = torch.empty(b, n, dtype=torch.bool)
    _over_rows(
        lambda first, last: kernel.recforge_adc_shortlist(
            lut.data_ptr(), subspaces, codewords, packed.data_ptr(), None if real is None else real.data_ptr(),
            first, last, length, width, n, int(simd), indices.data_ptr(), valid.data_ptr(),
        ),
        b,
    )  # fmt: skip
    return indices, valid


def _fast_scan_compiled(kernel: ctypes.CDLL, lut: Tensor, packed: Tensor, simd: bool) -> Tensor:
    b, length, width = packed.shape
    lut, packed = lut.float().contiguous(), packed.contiguous()
    subspaces, codewords = lut.shape[1:]
    scores = torch.empty(b, length, dtype=torch.int32)
    _over_rows(
        lambda first, last: kernel.recforge_adc_scores(
            lut.data_ptr(), subspaces, codewords, packed.data_ptr(), first, last, length, width, int(simd),
            scores.data_ptr(),
        ),
        b,
    )  # fmt: skip
    return scores


def _rerank_compiled(
    kernel: ctypes.CDLL, query: Tensor, vectors: Tensor, candidates: Tensor, valid: Tensor, k: int, simd: bool
) -> tuple[Tensor, Tensor]:
    b, length, dim = vectors.shape
    n = candidates.shape[1]
    query, vectors = query.float().contiguous(), vectors.contiguous()
    candidates, ok = candidates.long().contiguous(), valid.bool().contiguous().view(torch.uint8)
    indices = torch.empty(b, k, dtype=torch.int64)
    picked = torch.empty(b, k, dtype=torch.bool)
    _over_rows(
        lambda first, last: kernel.recforge_rerank(
            query.data_ptr(), vectors.data_ptr(), candidates.data_ptr(), ok.data_ptr(),
            first, last, length, dim, n, k, int(simd), indices.data_ptr(), picked.data_ptr(),
        ),
        b,
    )  # fmt: skip
    return indices, picked
