"""Per-(user, domain) views of a multi-domain interaction store, for cross-domain models.

:class:`DomainInteractions` is built once from the train split of an encoded store (user, item
and domain columns) and holds, as flat numpy arrays:

- ``items`` grouped by segment ``user * D + domain`` with CSR pointers ``ptr`` (each user's
  distinct train items in each domain);
- ``item_domain``: the domain of every encoded item (-1 for padding, OOV and items without train
  rows), and ``domain_items`` (CSR over domains): the train items of each domain;
- ``item_count``: train interactions per item;
- optional side information: ``user_side`` [U, Fu] and ``item_side`` [I, Fi] integer codes with
  their cardinalities, and ``item_neighbours`` / ``item_weights`` [I, K] (an item-item graph).

Items must belong to one domain each (qualify the ids with their domain otherwise).
``to_tensors()`` gives the arrays as named tensors (a model's side data) and ``from_tensors``
rebuilds the index from them and the domain names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import sparse
from torch import Tensor

from recforge.data.store import SplitView, Store
from recforge.errors import DataError

SIDE_BUCKETS = 24  # log2 buckets of train counts used as derived side features
_ARRAYS = ("domain_of_code", "ptr", "items", "item_domain", "domain_ptr", "domain_items", "item_count", "user_side", "item_side")
_GRAPH = ("item_neighbours", "item_weights")


@dataclass
class DomainInteractions:
    num_users: int
    num_items: int
    domain_names: list[str]  # raw domain values, index = domain position 0..D-1
    domain_of_code: np.ndarray  # [domain vocab] int64: encoded domain -> 0..D-1, -1 for PAD / OOV
    ptr: np.ndarray  # [U * D + 1] int64
    items: np.ndarray  # [E] int64
    item_domain: np.ndarray  # [I] int64
    domain_ptr: np.ndarray  # [D + 1] int64
    domain_items: np.ndarray  # [I_train] int64
    item_count: np.ndarray  # [I] int64
    user_side: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.int64))  # [U, Fu]
    user_side_sizes: list[int] = field(default_factory=list)
    item_side: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.int64))  # [I, Fi]
    item_side_sizes: list[int] = field(default_factory=list)
    item_neighbours: np.ndarray | None = None  # [I, K] int64
    item_weights: np.ndarray | None = None  # [I, K] float32

    @property
    def num_domains(self) -> int:
        return len(self.domain_names)

    def to_tensors(self) -> dict[str, Tensor]:
        """Every array as a tensor of its name (int64; ``item_weights`` float32), the side
        cardinalities as int64 ``user_side_sizes`` / ``item_side_sizes``; the graph when built."""
        tensors = {name: torch.from_numpy(np.ascontiguousarray(getattr(self, name))) for name in _ARRAYS}
        tensors["user_side_sizes"] = torch.tensor(self.user_side_sizes, dtype=torch.int64)
        tensors["item_side_sizes"] = torch.tensor(self.item_side_sizes, dtype=torch.int64)
        if self.item_neighbours is not None:
            tensors |= {name: torch.from_numpy(np.ascontiguousarray(getattr(self, name))) for name in _GRAPH}
        return tensors

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], domain_names: list[str]) -> "DomainInteractions":
        """The index that :meth:`to_tensors` gave, with the names of its domains."""
        arrays = {name: tensors[name].cpu().numpy() for name in _ARRAYS}
        graph = {name: tensors[name].cpu().numpy() if name in tensors else None for name in _GRAPH}
        num_domains = len(arrays["domain_ptr"]) - 1
        if len(domain_names) != num_domains:
            raise DataError(f"{len(domain_names)} domain names for an index of {num_domains} domains")
        return cls(
            num_users=(len(arrays["ptr"]) - 1) // num_domains,
            num_items=len(arrays["item_domain"]),
            domain_names=list(domain_names),
            user_side_sizes=tensors["user_side_sizes"].tolist(),
            item_side_sizes=tensors["item_side_sizes"].tolist(),
            **arrays,
            **graph,
        )

    def counts(self) -> np.ndarray:
        """Train items per (user, domain) -> [U, D]."""
        return np.diff(self.ptr).reshape(self.num_users, self.num_domains)

    @classmethod
    def from_store(
        cls,
        store: Store,
        item: str = "item_id",
        user_columns: tuple[str, ...] = (),
        item_columns: tuple[str, ...] = (),
    ) -> "DomainInteractions":
        """The index of ``store``'s train split; ``user_columns`` / ``item_columns`` name
        categorical columns kept as side features (each user's / item's first train value)."""
        schema = store.schema
        if schema.user is None or schema.domain is None:
            raise DataError(f"{store.path}: cross-domain data needs the schema's user and domain columns")
        train = store.split("train")
        users = train.column(schema.user).astype(np.int64)
        items = train.column(item).astype(np.int64)
        domain_codes = train.column(schema.domain).astype(np.int64)
        num_users = schema.vocab_size(schema.feature(schema.user).vocab)
        num_items = schema.vocab_size(schema.feature(item).vocab)

        vocab = store.vocabulary(schema.feature(schema.domain).vocab).sort("index")
        domain_names = vocab["value"].to_list()
        domain_of_code = np.full(schema.vocab_size(schema.feature(schema.domain).vocab), -1, dtype=np.int64)
        domain_of_code[vocab["index"].to_numpy()] = np.arange(len(domain_names))
        domains = domain_of_code[domain_codes]
        num_domains = len(domain_names)

        item_domain = np.full(num_items, -1, dtype=np.int64)
        item_domain[items] = domains
        mixed = np.flatnonzero(item_domain[items] != domains)
        if len(mixed):
            vocab_table = store.vocabulary(schema.feature(item).vocab)
            value = vocab_table.filter(vocab_table["index"] == int(items[mixed[0]]))["value"].to_list()
            raise DataError(f"{store.path}: item {value} occurs in several domains; qualify item ids with their domain")

        segment = users * num_domains + domains
        keys = np.unique(segment * num_items + items)  # distinct (segment, item), sorted
        seg_of_key, item_of_key = keys // num_items, keys % num_items
        ptr = np.zeros(num_users * num_domains + 1, dtype=np.int64)
        np.cumsum(np.bincount(seg_of_key, minlength=num_users * num_domains), out=ptr[1:])

        seen = np.flatnonzero(item_domain >= 0)
        order = seen[np.argsort(item_domain[seen], kind="stable")]
        domain_ptr = np.zeros(num_domains + 1, dtype=np.int64)
        np.cumsum(np.bincount(item_domain[seen], minlength=num_domains), out=domain_ptr[1:])

        index = cls(
            num_users=num_users,
            num_items=num_items,
            domain_names=domain_names,
            domain_of_code=domain_of_code,
            ptr=ptr,
            items=item_of_key,
            item_domain=item_domain,
            domain_ptr=domain_ptr,
            domain_items=order,
            item_count=np.bincount(items, minlength=num_items),
        )
        index._side_features(train, users, items, user_columns, item_columns)
        return index

    def _side_features(
        self, train: SplitView, users: np.ndarray, items: np.ndarray, user_columns: tuple[str, ...], item_columns: tuple[str, ...]
    ) -> None:
        """Named columns (first train value per user / item) and derived log2 count buckets:
        the user's train items in each domain, the item's train popularity."""
        schema = train.schema
        user_parts = [np.minimum(np.log2(1 + self.counts()).astype(np.int64), SIDE_BUCKETS - 1)]  # [U, D]
        user_sizes = [SIDE_BUCKETS] * self.num_domains
        item_parts = [np.minimum(np.log2(1 + self.item_count).astype(np.int64), SIDE_BUCKETS - 1)[:, None]]  # [I, 1]
        item_sizes = [SIDE_BUCKETS]
        for columns, owner, size, parts, sizes in (
            (user_columns, users, self.num_users, user_parts, user_sizes),
            (item_columns, items, self.num_items, item_parts, item_sizes),
        ):
            for name in columns:
                values = train.column(name).astype(np.int64)
                first = np.zeros(size, dtype=np.int64)  # PAD for ids without train rows
                owners, at = np.unique(owner, return_index=True)
                first[owners] = values[at]
                parts.append(first[:, None])
                sizes.append(schema.vocab_size(schema.feature(name).vocab))
        self.user_side, self.user_side_sizes = np.concatenate(user_parts, 1), user_sizes
        self.item_side, self.item_side_sizes = np.concatenate(item_parts, 1), item_sizes

    def build_item_graph(self, hop_top_k: int = 10, top_k: int = 20, hops: int = 2) -> None:
        """Item-item co-occurrence graph and its multi-hop propagation matrix.

        ``C = X^T X`` (X: user x item train interactions of every domain, diagonal removed),
        ``A = D^-1/2 C D^-1/2``, cut to its ``hop_top_k`` largest entries per row; the
        propagation ``M = mean_{k=0..hops} A^k`` is cut to ``top_k`` entries per row (the item
        itself always kept) and stored as ``item_neighbours`` / ``item_weights`` [I, top_k].
        """
        user_of = np.repeat(np.arange(self.num_users * self.num_domains) // self.num_domains, np.diff(self.ptr))
        x = sparse.csr_matrix(
            (np.ones(len(self.items), dtype=np.float32), (user_of, self.items)), shape=(self.num_users, self.num_items)
        )
        co = (x.T @ x).tocsr()
        co.setdiag(0)
        co.eliminate_zeros()
        degree = np.asarray(co.sum(1)).ravel()
        inv_sqrt = np.where(degree > 0, 1.0 / np.sqrt(np.maximum(degree, 1e-12)), 0.0).astype(np.float32)
        adjacency = _top_k_rows(sparse.diags(inv_sqrt) @ co @ sparse.diags(inv_sqrt), hop_top_k)
        power = sparse.identity(self.num_items, dtype=np.float32, format="csr")
        total = power.copy()
        for _ in range(hops):
            power = (power @ adjacency).tocsr()
            total = total + power
        total = (total / (hops + 1)).tocsr()
        neighbours, weights = _dense_top_k(total, top_k)
        self.item_neighbours, self.item_weights = neighbours, weights


def _top_k_rows(matrix: sparse.spmatrix, k: int) -> sparse.csr_matrix:
    """The ``k`` largest entries of every row of a sparse matrix."""
    coo = matrix.tocoo()
    order = np.lexsort((-coo.data, coo.row))
    rows, cols, vals = coo.row[order], coo.col[order], coo.data[order]
    starts = np.searchsorted(rows, rows, side="left")
    keep = (np.arange(len(rows)) - starts) < k
    return sparse.csr_matrix((vals[keep], (rows[keep], cols[keep])), shape=matrix.shape)


def _dense_top_k(matrix: sparse.csr_matrix, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the ``k`` largest entries as [n, k] columns and values (row itself first, 0-padded)."""
    n = matrix.shape[0]
    coo = matrix.tocoo()
    is_self = coo.row == coo.col
    # the diagonal first, then by decreasing value
    order = np.lexsort((-coo.data, ~is_self, coo.row))
    rows, cols, vals = coo.row[order], coo.col[order], coo.data[order]
    starts = np.searchsorted(rows, rows, side="left")
    slot = np.arange(len(rows)) - starts
    keep = slot < k
    neighbours = np.zeros((n, k), dtype=np.int64)
    weights = np.zeros((n, k), dtype=np.float32)
    neighbours[rows[keep], slot[keep]] = cols[keep]
    weights[rows[keep], slot[keep]] = vals[keep]
    return neighbours, weights
