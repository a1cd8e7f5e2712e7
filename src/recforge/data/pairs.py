"""Item pairs mined from behaviour: Swing item-to-item similarity and user-to-item trigger pairs.

- :func:`swing`: Swing similarity (Yang et al., Large Scale Product Graph Construction for
  Recommendation in E-commerce, arXiv:2010.05525) of every pair of items from a user-item
  interaction list, as a sparse matrix; :func:`top_neighbours` keeps each item's best ``k``.
- :func:`item_factors`: item vectors of a rank-``r`` matrix factorisation (truncated SVD) of the
  user-item matrix.
- :func:`trigger_pairs`: for each positive of a user, the earlier positive most similar to it
  under given item vectors (a ``(trigger, target)`` pair).

Everything works on integer arrays (ids of one vocabulary, 0 and 1 = pad and OOV ignored by the
callers); nothing loops over users or rows in Python: the work is sparse products, sorts and
gathers, in blocks where memory asks for it.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import svds

_PAIRS_PER_BLOCK = 1 << 22  # user pairs (u, v) of one block of Swing
_TRIPLES_PER_BLOCK = 1 << 24  # (u, v, item) triples of one block of Swing
_ROWS_PER_BLOCK = 1 << 14  # positives whose candidate triggers are scored at once


def interaction_matrix(users: np.ndarray, items: np.ndarray, num_items: int) -> sp.csr_matrix:
    """The binary user x item matrix ``[U, num_items]`` (users renumbered densely, duplicates once)."""
    _, user_rows = np.unique(users, return_inverse=True)
    matrix = sp.csr_matrix(
        (np.ones(len(items), dtype=np.float64), (user_rows, items)), shape=(int(user_rows.max(initial=-1)) + 1, num_items)
    )
    matrix.sum_duplicates()
    matrix.data[:] = 1.0
    return matrix


def swing(users: np.ndarray, items: np.ndarray, num_items: int, alpha: float = 1.0, user_power: float = 0.0) -> sp.csr_matrix:
    """Swing similarity ``[num_items, num_items]`` of the interactions ``(users[k], items[k])``.

    ``s(i, j) = sum_{u < v; u, v in U_i & U_j} w_u w_v / (alpha + |I_u & I_v|)``, with ``U_i`` the
    users of item ``i``, ``I_u`` the items of user ``u`` and ``w_u = |I_u| ^ -user_power`` (0: the
    plain Swing score). The diagonal is zero.

    Sparse formulation: a user pair ``(u, v)`` adds its weight to every item pair of
    ``S_uv = I_u & I_v``, so ``s = Q^T diag(weight) Q`` where row ``(u, v)`` of ``Q`` is the
    indicator of ``S_uv``. ``Q``'s entries, the triples ``(u, v, i)`` with ``u < v`` both in
    ``U_i``, are enumerated from the item side (each entry ``(u, i)`` of the user x item matrix
    expands to the users after ``u`` in column ``i``), and ``|S_uv|`` is the number of triples of
    the pair. Pairs sharing one item add only to the diagonal and are skipped. Users are taken in
    blocks so that a block's triples stay few.
    """
    a = interaction_matrix(users, items, num_items)
    n_users = a.shape[0]
    by_item = a.tocsc()
    by_item.sort_indices()
    entry_user = np.repeat(np.arange(n_users), np.diff(a.indptr))  # u of each entry (u, i): [E]
    entry_item = a.indices.astype(np.int64)  # i: [E]
    column_keys = np.repeat(np.arange(num_items, dtype=np.int64), np.diff(by_item.indptr)) * n_users + by_item.indices
    after = np.searchsorted(column_keys, entry_item * n_users + entry_user) + 1  # first user > u in column i
    length = by_item.indptr[entry_item + 1] - after  # users v > u of item i: [E]
    weight_of = np.asarray(a.sum(1)).ravel() ** -user_power  # w_u: [U]
    # blocks of users: few enough triples, and a pair index (u - first) * U + v that fits
    cost = np.cumsum(np.bincount(entry_user, weights=length, minlength=n_users))
    max_users = max(1, _PAIRS_PER_BLOCK // max(n_users, 1))
    total = sp.csr_matrix((num_items, num_items))
    first = 0
    while first < n_users:
        spent = cost[first - 1] if first else 0.0
        affordable = int(np.searchsorted(cost, spent + _TRIPLES_PER_BLOCK, side="right"))
        last = min(max(first + 1, affordable), first + max_users, n_users)
        entries = np.arange(a.indptr[first], a.indptr[last])
        count = length[entries]
        source = np.repeat(entries, count)  # the entry (u, i) of each triple: [T]
        step = np.arange(len(source)) - np.repeat(np.cumsum(count) - count, count)
        v = by_item.indices[after[source] + step]
        pair = (entry_user[source] - first) * n_users + v  # [T]
        shared = np.bincount(pair, minlength=(last - first) * n_users)  # |S_uv| of every pair of the block
        keep = shared[pair] >= 2
        q = sp.csr_matrix(
            (np.ones(int(keep.sum())), (pair[keep], entry_item[source[keep]])), shape=(len(shared), num_items)
        )  # [P, I]
        pair_u = np.arange(len(shared)) // n_users + first
        pair_v = np.arange(len(shared)) % n_users
        weight = weight_of[pair_u] * weight_of[pair_v] / (alpha + shared)  # [P]
        total = total + (q.T @ sp.diags(weight) @ q).tocsr()
        first = last
    total.setdiag(0.0)
    total.eliminate_zeros()
    return total


def top_neighbours(similarity: sp.csr_matrix, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each row's ``k`` largest positive entries as ``(row, column, value)`` arrays, best first
    within a row (ties by column)."""
    s = similarity.tocoo()
    positive = s.data > 0
    rows, cols, vals = s.row[positive], s.col[positive], s.data[positive]
    order = np.lexsort((cols, -vals, rows))
    rows, cols, vals = rows[order], cols[order], vals[order]
    starts = np.searchsorted(rows, rows, side="left")  # first entry of each entry's row
    keep = np.arange(len(rows)) - starts < k
    return rows[keep].astype(np.int64), cols[keep].astype(np.int64), vals[keep]


def item_factors(users: np.ndarray, items: np.ndarray, num_items: int, rank: int) -> np.ndarray:
    """Item vectors ``V S^(1/2)`` ``[num_items, r]`` of the rank-``r`` truncated SVD ``U S V^T`` of the
    binary user x item matrix (``r = min(rank, min(shape) - 1)``; deterministic start vector)."""
    a = interaction_matrix(users, items, num_items)
    r = min(rank, min(a.shape) - 1)
    if r < 1:
        return np.zeros((num_items, 1), dtype=np.float32)
    start = np.full(min(a.shape), 1.0 / np.sqrt(min(a.shape)))
    _, s, vt = svds(a, k=r, v0=start)
    return (vt.T * np.sqrt(s)).astype(np.float32)


def trigger_pairs(
    users: np.ndarray, items: np.ndarray, time: np.ndarray, vectors: np.ndarray, window: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(trigger, target)`` pairs: for each positive ``(users[k], items[k])`` at ``time[k]``, the
    one among the user's latest ``window`` positives strictly before it whose vector has the
    largest cosine with the target's (``vectors`` ``[num_items, r]``); positives without an earlier
    one give no pair."""
    order = np.lexsort((time, users))
    users, items, time = users[order], items[order], time[order]
    n = len(items)
    user_start = np.searchsorted(users, users, side="left")  # first positive of the user
    key = np.stack([users, time], 1)
    same_time = np.r_[False, (key[1:] == key[:-1]).all(1)]  # positive tied in time with the previous one
    earlier_end = np.maximum.accumulate(np.where(same_time, 0, np.arange(n)))  # first positive of its time
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    triggers = np.zeros(n, dtype=np.int64)
    for first in range(0, n, _ROWS_PER_BLOCK):
        rows = np.arange(first, min(first + _ROWS_PER_BLOCK, n))
        positions = earlier_end[rows, None] - window + np.arange(window)  # [b, W] candidate positions
        valid = positions >= user_start[rows, None]
        candidates = items[np.where(valid, positions, 0)]  # [b, W]
        score = np.einsum("bwr,br->bw", unit[candidates], unit[items[rows]])  # cosine: [b, W]
        best = np.where(valid, score, -np.inf).argmax(1)  # [b]
        triggers[rows] = np.where(valid.any(1), candidates[np.arange(len(rows)), best], -1)
    found = triggers >= 0
    return triggers[found], items[found].astype(np.int64)
