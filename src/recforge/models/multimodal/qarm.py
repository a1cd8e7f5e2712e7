"""QARM: Quantitative Alignment Multi-Modal Recommendation at Kuaishou.
Xinchen Luo, Jiangxia Cao, Tianyu Sun, Jinkai Yu, Rui Huang, Wei Yuan, Hezheng Lin, Yichen Zheng,
Shiyao Wang, Qigen Hu, Changqing Qiu, Jiaqi Zhang, Xu Zhang, Zhiheng Yan, Jingming Zhang, Simin
Zhang, Mingxing Wen, Zhaojie Liu, Kun Gai, Guorui Zhou (Kuaishou). CIKM 2025, arXiv:2411.11739.
No official code.

Three stages; the first two run once in :meth:`QARM.side_data` on the train split only, the
third is the ranker that trains.

1. **Item alignment.** Multi-modal item vectors ``m_i`` are aligned to behaviour by a
   contrastive loss between the two items of behaviour pairs [paper]: User2Item pairs
   ``(trigger B, target A)``, ``B`` the item most similar to the clicked ``A`` among the user's
   latest 50 earlier positives, and Item2Item pairs from Swing [secondary].
2. **Quantitative codes**, frozen once computed [paper]: the VQ code of an item is its top-25
   nearest items of a reference pool (ids ``1..N``) [secondary]; the RQ code is residual k-means,
   ``c_l = argmin_k ||r_{l-1} - C_l[k]||``, ``r_l = r_{l-1} - C_l[c_l]``, ``r_0 = m_i`` [secondary].
3. **Codes as trainable ID features** of the ranker, trained by the ranking loss while the
   encoder and codebooks stay fixed [paper].

Chosen here [reconstructed] (the spec's public-data version):

- the encoder is a frozen sentence vector (``content_feature``, e.g. all-MiniLM-L6-v2, 384-d)
  plus a trainable head ``MLP 384 -> 256 -> 128`` (ReLU), ``m_i = normalize(head(x_i))``;
  ``L_align = -1/(2B) sum_i [log softmax_j(cos(m_trig_i, m_tgt_j)/tau)_i + log softmax_j(cos(m_tgt_i,
  m_trig_j)/tau)_i]`` (in-batch InfoNCE, symmetrised, ``tau = 0.07``), Adam lr 1e-3, batch 1024,
  5 epochs, seeded; the optional generative term ``align_reconstruction * ||W m_i - x_i||^2``
  (a linear decoder kept only for training) guards against forgetting; 0 by default;
- User2Item similarity: item vectors of a rank-32 truncated SVD of the train user x positive
  matrix (a baseline MF); Swing (``alpha = 1``) on the train positives, top 10 per item, both
  in :mod:`recforge.data.pairs`;
- the VQ pool: the 1,024 items with most train positives; cosine similarity; RQ: 3 levels of 64
  codewords fitted on the train items' aligned vectors (k-means++ then Lloyd, 25 iterations);
- codes are stored 1-based (0 = none: padding, OOV, an item without content); an item of the
  vocabulary takes its code from the frozen table, an OOV target (a new item) from its own
  content vector by the frozen head and the nearest centroid / pool items, with no re-fitting;
- the item representation ``e_i = E_id[i] + sum_l E_l[c_l] + sum_{l >= 2} E_pre,l[p_l(c_1..c_l)]
  + mean_25 E_vq[v_j]`` for the target and every history item (``item_id_embedding: false``
  drops ``E_id``); the length-1 prefix is ``c_1``, already embedded by ``E_1``, so prefix tables
  start at length 2. ``p_l`` (:func:`prefix_ids`) is the exact mixed-radix number of the prefix
  when the level's prefixes fit ``prefix_buckets`` (2^16), else a multiplicative hash of it;
- cross features: for ``l = 1..match_levels`` (2: ``c_1`` and ``(c_1, c_2)``) the number of
  history items sharing the target's length-``l`` prefix, bucketed by bit length (0, 1, 2-3,
  4-7, ...) and embedded (:func:`match_counts`, :func:`count_buckets`);
- the ranker is DIN (:class:`~recforge.models.ranking.din.DIN`: target attention over the
  code-enriched history, the other fields, the cross features) with embedding 64 and MLP
  ``256 -> 128 -> 1``; one BCE per task;
- the study rows are switches of this one class: ``content: none`` is DIN on IDs,
  ``content: vector`` adds ``W x_i`` (the frozen vector, projected) to every item's embedding
  (``aligned`` picks the raw or the aligned vector), ``content: codes`` is QARM (``aligned:
  false``: codes of the raw vector), ``codes: vq | rq | both``.

Side data (:meth:`QARM.side_data`), rows indexed by the target's vocabulary (V items):
``align.<name>`` (the frozen head's weights, when aligned), ``item_content`` [V, d_m] (content
``vector``), ``rq_codes`` [V, Lq] and ``rq_centroids`` [Lq, K, d_m], ``vq_codes`` [V, 25] and
``vq_pool`` [N, d_m] (content ``codes``), and ``report.<name>`` scalars: the alignment loss
before and after training, the pair counts, and per level the codebook use and collision rate,
which :meth:`QARM.side_report` gives as named floats (a run writes them beside its metrics as ``side_<name>``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recforge.data.batch import Batch
from recforge.data.pairs import item_factors, swing, top_neighbours, trigger_pairs
from recforge.data.schema import Kind, Schema
from recforge.errors import ModelConfigError
from recforge.models.base import register
from recforge.models.features import DENSE_GRADIENT_MAX_ELEMENTS
from recforge.models.ranking.din import DIN, DINConfig
from recforge.nn.mlp import MLP
from recforge.nn.quantization import ResidualQuantizer, codebook_usage, collision_rate, nearest_codes

if TYPE_CHECKING:
    from recforge.data.store import Store

_HASH_PRIME = (1 << 31) - 1  # prefixes that do not fit their table: ((p mod P) * A mod P) mod buckets
_HASH_MULTIPLIER = 48271


@dataclass
class QARMConfig(DINConfig):
    embedding_dim: int = 64  # d
    hidden: list[int] = field(default_factory=lambda: [256, 128])
    content: Literal["none", "vector", "codes"] = "codes"
    content_feature: str = "item_text"  # an embedding feature keyed by target
    aligned: bool = True  # False: the raw content vector (unaligned encoder)
    codes: Literal["vq", "rq", "both"] = "both"
    item_id_embedding: bool = True  # False: items are their content only (cold-item study)
    # stage 1: item alignment
    align_hidden: list[int] = field(default_factory=lambda: [256])
    align_dim: int = 128  # d_m of the aligned vector
    align_pairs: Literal["both", "u2i", "i2i"] = "both"
    align_temperature: float = 0.07  # tau
    align_epochs: int = 5
    align_batch_size: int = 1024
    align_lr: float = 1e-3
    align_reconstruction: float = 0.0  # weight of the optional generative term
    u2i_window: int = 50  # latest positives searched for the trigger
    u2i_rank: int = 32  # rank of the MF whose item vectors pick the trigger
    swing_top_k: int = 10
    swing_alpha: float = 1.0
    seed: int = 0
    # stage 2: quantitative codes
    rq_levels: int = 3  # Lq
    rq_size: int = 64  # codewords per level
    kmeans_iterations: int = 25
    vq_pool: int = 1024  # N
    vq_top_k: int = 25
    # stage 3: the ranker's code features
    prefix_buckets: int = 1 << 16
    match_levels: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("align_dim", "align_epochs", "align_batch_size", "u2i_window", "u2i_rank", "swing_top_k",
                     "rq_levels", "rq_size", "kmeans_iterations", "vq_pool", "vq_top_k", "prefix_buckets"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ModelConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("align_temperature", "align_lr"):
            if getattr(self, name) <= 0:
                raise ModelConfigError(f"{name}: must be > 0, got {getattr(self, name)}")
        if self.align_reconstruction < 0:
            raise ModelConfigError(f"align_reconstruction: must be >= 0, got {self.align_reconstruction}")
        if self.swing_alpha < 0:
            raise ModelConfigError(f"swing_alpha: must be >= 0, got {self.swing_alpha}")
        if self.vq_top_k > self.vq_pool:
            raise ModelConfigError(f"vq_top_k: must be <= vq_pool ({self.vq_pool}), got {self.vq_top_k}")
        if not 0 <= self.match_levels <= self.rq_levels:
            raise ModelConfigError(f"match_levels: must be in [0, rq_levels={self.rq_levels}], got {self.match_levels}")
        if (self.rq_size + 1) ** self.rq_levels >= 1 << 62:
            raise ModelConfigError(
                f"rq_levels: (rq_size + 1) ** rq_levels must stay below 2^62, got {self.rq_size} and {self.rq_levels}"
            )

    @property
    def uses_rq(self) -> bool:
        return self.content == "codes" and self.codes in ("rq", "both")

    @property
    def uses_vq(self) -> bool:
        return self.content == "codes" and self.codes in ("vq", "both")


def check_schema(schema: Schema, config: QARMConfig) -> None:
    """The content feature is an embedding keyed by the target; the data has a user column."""
    if config.content == "none":
        return
    names = [f.name for f in schema.features]
    f = schema.feature(config.content_feature) if config.content_feature in names else None
    if f is None or f.kind is not Kind.EMBEDDING or f.key != config.target:
        embeddings = [e.name for e in schema.embeddings]
        raise ModelConfigError(
            f"model.params.content_feature: qarm needs {config.content_feature!r} an embedding feature keyed by "
            f"{config.target!r}; the schema's embeddings are {embeddings}"
        )
    if schema.user is None:
        raise ModelConfigError("model.params.content: qarm aligns on User2Item pairs and needs data with a user column")


# --- stage 1: item alignment ----------------------------------------------------------------


def info_nce(a: Tensor, b: Tensor, temperature: float) -> Tensor:
    """Symmetric in-batch InfoNCE of unit vectors ``a``, ``b`` [B, d]: row i's positive is row i."""
    logits = a @ b.T / temperature  # cos(a_i, b_j) / tau: [B, B]
    target = torch.arange(len(a), device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def alignment_head(in_dim: int, config: QARMConfig) -> MLP:
    """The trainable head over the frozen content vector: ``[in_dim] -> [align_dim]``."""
    return MLP(in_dim, config.align_hidden, activation="relu", out_dim=config.align_dim)


def behaviour_pairs(
    users: np.ndarray, items: np.ndarray, time: np.ndarray, num_items: int, config: QARMConfig
) -> dict[str, Tensor]:
    """The alignment pairs ``{"u2i": [P, 2], "i2i": [P', 2]}`` (trigger, target) of the positives
    ``(users, items)`` at ``time``: User2Item triggers by MF similarity, Swing top-k neighbours."""
    pairs = {}
    if config.align_pairs in ("both", "u2i"):
        factors = item_factors(users, items, num_items, config.u2i_rank)  # [V, r]
        trigger, target = trigger_pairs(users, items, time, factors, config.u2i_window)
        pairs["u2i"] = torch.from_numpy(np.stack([trigger, target], 1))
    if config.align_pairs in ("both", "i2i"):
        similarity = swing(users, items, num_items, alpha=config.swing_alpha)
        rows, cols, _ = top_neighbours(similarity, config.swing_top_k)
        pairs["i2i"] = torch.from_numpy(np.stack([rows, cols], 1))
    return {name: p[p[:, 0] != p[:, 1]] for name, p in pairs.items()}


def align(vectors: Tensor, pairs: Tensor, config: QARMConfig) -> tuple[MLP, Tensor]:
    """Train the alignment head on ``pairs`` [P, 2] of rows of ``vectors`` [V, d_in] by
    ``L_align`` (+ the optional reconstruction term), seeded by ``config.seed``.

    Returns the head (frozen, eval mode) and ``L_align`` over all pairs before and after training ``[2]``.
    """
    generator = torch.Generator().manual_seed(config.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        head = alignment_head(vectors.shape[1], config)
        decoder = nn.Linear(config.align_dim, vectors.shape[1]) if config.align_reconstruction > 0 else None
    parameters = list(head.parameters()) + (list(decoder.parameters()) if decoder is not None else [])
    optimizer = torch.optim.Adam(parameters, lr=config.align_lr)
    x = vectors.float()

    def batches(order: Tensor) -> list[Tensor]:
        return list(pairs[order].split(config.align_batch_size))

    def pair_loss(batch: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        h_trigger, h_target = head(x[batch[:, 0]]), head(x[batch[:, 1]])  # [b, d_m]
        m_trigger, m_target = F.normalize(h_trigger, dim=1), F.normalize(h_target, dim=1)
        return info_nce(m_trigger, m_target, config.align_temperature), m_trigger, m_target

    def evaluate() -> Tensor:
        with torch.no_grad():
            parts = batches(torch.arange(len(pairs)))
            return sum(pair_loss(b)[0] * len(b) for b in parts) / len(pairs)

    before = evaluate()
    for _ in range(config.align_epochs):
        for batch in batches(torch.randperm(len(pairs), generator=generator)):
            loss, m_trigger, m_target = pair_loss(batch)
            if decoder is not None:  # optional generative term: reconstruct the frozen vectors
                rebuilt = decoder(torch.cat([m_trigger, m_target]))
                loss = loss + config.align_reconstruction * F.mse_loss(rebuilt, x[batch.T.flatten()])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return head.requires_grad_(False).eval(), torch.stack([before, evaluate()])


# --- stage 2 and 3: codes and the features made of them -----------------------------------------


def prefix_ids(codes: Tensor, size: int, buckets: int) -> Tensor:
    """Ids of the code prefixes ``(c_1..c_l)``, ``l = 2..L``: ``[..., L] -> [..., L - 1]``.

    Codes are 1-based (0 = none), so the prefix of length ``l`` is the exact mixed-radix number
    ``p_l = sum_{m <= l} c_m (size + 1)^(l - m)``; a level whose prefixes can exceed the table
    (``(size + 1)^l > buckets``) takes ``((p_l mod P) * 48271 mod P) mod buckets``, ``P = 2^31 - 1``.
    """
    radix = size + 1
    value = codes[..., 0]
    ids = []
    for level in range(1, codes.shape[-1]):  # over the levels, not rows
        value = value * radix + codes[..., level]
        if radix ** (level + 1) > buckets:
            ids.append((value % _HASH_PRIME) * _HASH_MULTIPLIER % _HASH_PRIME % buckets)
        else:
            ids.append(value)
    return torch.stack(ids, -1) if ids else codes[..., :0]


def match_counts(history: Tensor, target: Tensor, levels: int) -> Tensor:
    """How many history items share the target's code prefix of length ``l = 1..levels``:
    ``history`` [B, L, Lq], ``target`` [B, Lq] (1-based codes, 0 = none) -> [B, levels]."""
    equal = (history == target.unsqueeze(1)) & (target.unsqueeze(1) != 0)  # [B, L, Lq]
    prefix = equal.long().cumprod(-1)[..., :levels]  # 1 where the first l codes all match: [B, L, levels]
    return prefix.sum(1)


def count_buckets(counts: Tensor, max_count: int) -> Tensor:
    """Bucket of each count by its bit length: 0 -> 0, 1 -> 1, 2-3 -> 2, 4-7 -> 3, ...
    (``max_count.bit_length() + 1`` buckets)."""
    thresholds = 2 ** torch.arange(max_count.bit_length(), device=counts.device)  # 1, 2, 4, ...
    return (counts.unsqueeze(-1) >= thresholds).sum(-1)


def code_report(side: dict[str, Tensor]) -> dict[str, float]:
    """The ``report.<name>`` scalars of side data as ``{name: value}``."""
    return {key.removeprefix("report."): float(value) for key, value in side.items() if key.startswith("report.")}


def frozen(module: nn.Module) -> nn.Module:
    """``module`` with its parameters and buffers turned into non-persistent buffers: fixed, never
    trained, and kept in the side data rather than the weights."""
    for sub in module.modules():
        tensors = list(sub.named_parameters(recurse=False)) + list(sub.named_buffers(recurse=False))
        for name, value in tensors:
            delattr(sub, name)
            sub.register_buffer(name, value.detach(), persistent=False)
    return module


def _table(rows: int, dim: int) -> nn.Embedding:
    table = nn.Embedding(rows, dim, sparse=rows * dim > DENSE_GRADIENT_MAX_ELEMENTS)
    nn.init.normal_(table.weight, std=1e-2)
    return table


@register("qarm")
class QARM(DIN):
    config_class = QARMConfig
    paper = (
        "Luo et al., QARM: Quantitative Alignment Multi-Modal Recommendation at Kuaishou, CIKM 2025, "
        "arXiv:2411.11739"
    )
    results_page = "docs/results/qarm.md"

    @classmethod
    def side_data(cls, store: "Store", config: QARMConfig) -> dict[str, Tensor]:
        """Alignment and quantization on the train split (see the module docstring)."""
        schema = store.schema
        if config.content == "none":
            return {}
        check_schema(schema, config)
        vectors = torch.from_numpy(store.vectors_by_vocab(config.content_feature))  # x: [V, d_in]
        has_content = vectors.abs().sum(1) > 0  # [V]
        train = store.split("train")
        label = config.label or schema.labels[0]
        items = train.column(config.target).astype(np.int64)  # [N]
        positive = train.column(label) == 1
        side: dict[str, Tensor] = {}
        if config.aligned:
            _, end = train.windows[schema.feature(config.history).view]  # row's place in the user's timeline
            users = train.column(schema.user).astype(np.int64)[positive]
            pairs = behaviour_pairs(users, items[positive], np.asarray(end)[positive], len(vectors), config)
            pairs = {name: p[has_content[p].all(1)] for name, p in pairs.items()}  # both items have content
            joined = torch.cat(list(pairs.values()))
            if len(joined) == 0:
                raise ModelConfigError(
                    "model.params.aligned: the train split gives no behaviour pairs of items with content to align on"
                )
            head, history = align(vectors, joined, config)
            with torch.no_grad():
                embedded = F.normalize(head(vectors), dim=1) * has_content.unsqueeze(1)  # m_i: [V, d_m]
            side |= {f"align.{name}": value.clone() for name, value in head.state_dict().items()}
            side |= {f"report.pairs_{name}": torch.tensor(float(len(p))) for name, p in pairs.items()}
            side |= {"report.align_loss_before": history[0], "report.align_loss_after": history[-1]}
        else:
            embedded = F.normalize(vectors, dim=1)  # zero rows stay zero
        if config.content == "vector":
            return side | {"item_content": embedded}
        seen = torch.zeros(len(vectors), dtype=torch.bool)
        seen[torch.from_numpy(items)] = True
        fit = (seen & has_content).nonzero().squeeze(1)  # train items with content
        side["report.items_coded"] = torch.tensor(float(has_content[2:].sum()))
        if config.uses_rq:
            if len(fit) < config.rq_size:
                raise ModelConfigError(
                    f"model.params.rq_size: {config.rq_size} codewords per level need at least {config.rq_size} "
                    f"train items with content; the store has {len(fit)}"
                )
            quantizer = ResidualQuantizer(config.rq_levels, config.rq_size, embedded.shape[1])
            quantizer.fit(embedded[fit], config.kmeans_iterations, config.seed)
            codes = (quantizer.encode(embedded) + 1) * has_content.unsqueeze(1)  # 1-based, 0 = none: [V, Lq]
            side["rq_codes"] = codes
            side["rq_centroids"] = torch.stack([level.centroids for level in quantizer.levels])  # [Lq, K, d_m]
            coded = codes[has_content] - 1
            for level, use in enumerate(codebook_usage(coded, config.rq_size).tolist(), 1):
                side[f"report.rq_usage_l{level}"] = torch.tensor(use)
                side[f"report.rq_collision_l{level}"] = torch.tensor(collision_rate(coded[:, :level]))
        if config.uses_vq:
            popularity = torch.bincount(torch.from_numpy(items[positive]), minlength=len(vectors))[fit]
            if len(fit) < config.vq_pool:
                raise ModelConfigError(
                    f"model.params.vq_pool: a pool of {config.vq_pool} items needs as many train items with content; "
                    f"the store has {len(fit)}"
                )
            order = torch.sort(popularity, descending=True, stable=True).indices  # ties: by vocabulary index
            pool = embedded[fit[order[: config.vq_pool]]]  # [N, d_m]
            codes = (nearest_codes(embedded, pool, config.vq_top_k) + 1) * has_content.unsqueeze(1)  # [V, 25]
            side["vq_codes"], side["vq_pool"] = codes, pool
            coded = codes[has_content] - 1
            side["report.vq_usage"] = torch.tensor(float(torch.unique(coded).numel()) / config.vq_pool)
            side["report.vq_collision"] = torch.tensor(collision_rate(coded.sort(1).values))
        return side

    def __init__(self, schema: Schema, config: QARMConfig, side: dict[str, Tensor] | None = None) -> None:
        super().__init__(schema, config, side)
        check_schema(schema, config)
        side, d = self.side, config.embedding_dim
        needed = {"vector": ["item_content"], "codes": []}.get(config.content, [])
        needed += ["rq_codes", "rq_centroids"] if config.uses_rq else []
        needed += ["vq_codes", "vq_pool"] if config.uses_vq else []
        missing = [key for key in needed if key not in side]
        if config.content != "none" and config.aligned and not any(key.startswith("align.") for key in side):
            missing.append("align.*")
        if missing:
            raise ValueError(f"qarm: side data lacks {missing} (QARM.side_data(store, config) gives them)")
        self.head: MLP | None = None
        if config.content != "none" and config.aligned:  # the frozen aligned encoder, for new items
            in_dim = schema.feature(config.content_feature).dim
            self.head = alignment_head(in_dim, config)
            self.head.load_state_dict({k.removeprefix("align."): v for k, v in side.items() if k.startswith("align.")})
            frozen(self.head)
        self.code_tables: list[nn.Embedding | nn.EmbeddingBag] = []
        extra = 0
        if config.content == "vector":
            self.register_buffer("item_content", side["item_content"], persistent=False)
            self.project = nn.Linear(side["item_content"].shape[1], d)  # W: [d_m] -> [d]
        if config.uses_rq:
            levels, size = config.rq_levels, config.rq_size
            self.register_buffer("rq_codes", side["rq_codes"], persistent=False)
            self.quantizer = ResidualQuantizer(levels, size, side["rq_centroids"].shape[2])
            for level, codebook in enumerate(self.quantizer.levels):
                codebook.centroids.copy_(side["rq_centroids"][level])
            frozen(self.quantizer)
            self.register_buffer("level_offsets", torch.arange(levels) * (size + 1), persistent=False)
            self.register_buffer("prefix_offsets", torch.arange(levels - 1) * config.prefix_buckets, persistent=False)
            self.level_table = _table(levels * (size + 1), d)  # E_l
            self.prefix_table = _table((levels - 1) * config.prefix_buckets, d)  # E_pre,l, l >= 2
            self.code_tables += [self.level_table, self.prefix_table]
            if config.match_levels:
                self.max_count = schema.feature(config.history).max_len
                self.match_table = _table(config.match_levels * (self.max_count.bit_length() + 1), d)
                self.code_tables.append(self.match_table)
                extra = config.match_levels * d
        if config.uses_vq:
            self.register_buffer("vq_codes", side["vq_codes"], persistent=False)
            self.register_buffer("vq_pool", side["vq_pool"], persistent=False)
            pool = len(side["vq_pool"]) + 1
            sparse = pool * d > DENSE_GRADIENT_MAX_ELEMENTS
            self.vq_table = nn.EmbeddingBag(pool, d, mode="mean", padding_idx=0, sparse=sparse)  # E_vq, 0 = none
            nn.init.normal_(self.vq_table.weight[1:], std=1e-2)
            self.code_tables.append(self.vq_table)
        if extra:  # the cross features widen the MLP's input
            width = self.mlp.layers[0].in_features + extra
            self.mlp = MLP(width, config.hidden, config.dropout, config.activation, out_dim=1)

    def sparse_parameters(self) -> list[nn.Parameter]:
        """The feature tables and every code table (dense-gradient ones too): the row-wise optimiser's."""
        found = super().sparse_parameters()
        return found + [t.weight for t in self.code_tables if not t.sparse]

    def side_report(self) -> dict[str, float]:
        """Alignment loss, pair counts, codebook use and collision rate per level, as named floats."""
        return code_report(self.side)

    def encode(self, x: Tensor) -> Tensor:
        """The content vector ``m`` of raw content vectors ``x`` [B, d_in] -> [B, d_m] (aligned or not)."""
        h = self.head(x) if self.head is not None else x
        return F.normalize(h, dim=-1)

    def target_codes(self, ids: Tensor, x: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """RQ [B, Lq] and VQ [B, K] codes of the target: the frozen table's for vocabulary items,
        the nearest centroids / pool items of its own vector for an OOV (new) item."""
        new = (ids == 1).unsqueeze(1)  # [B, 1]
        has = x.abs().sum(1, keepdim=True) > 0  # [B, 1]
        m = self.encode(x)  # [B, d_m]
        rq = vq = None
        if self.config.uses_rq:
            fresh = (self.quantizer.encode(m) + 1) * has  # c_l = argmin_k ||r_{l-1} - C_l[k]||: [B, Lq]
            rq = torch.where(new, fresh, self.rq_codes[ids])
        if self.config.uses_vq:
            fresh = (nearest_codes(m, self.vq_pool, self.config.vq_top_k) + 1) * has  # top-K pool items: [B, K]
            vq = torch.where(new, fresh, self.vq_codes[ids])
        return rq, vq

    def code_vectors(self, rq: Tensor | None, vq: Tensor | None) -> Tensor:
        """``sum_l E_l[c_l] + sum_{l >= 2} E_pre,l[p_l] + mean_K E_vq[v_j]``: codes [..., Lq], [..., K] -> [..., d]."""
        parts = []
        if rq is not None:
            coded = (rq[..., :1] != 0).to(self.level_table.weight.dtype)  # [..., 1]: 0 for items without codes
            levels = self.level_table(rq + self.level_offsets).sum(-2)  # [..., d]
            prefixes = prefix_ids(rq, self.config.rq_size, self.config.prefix_buckets)  # [..., Lq - 1]
            parts.append((levels + self.prefix_table(prefixes + self.prefix_offsets).sum(-2)) * coded)
        if vq is not None:
            lead = vq.shape[:-1]
            parts.append(self.vq_table(vq.reshape(-1, vq.shape[-1])).reshape(*lead, -1))  # padding excluded: [..., d]
        return sum(parts)

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        cfg = self.config
        fields = self.embedding.fields(batch)  # [B, F, D]
        ids = batch.sequences[cfg.history]  # [B, L]
        mask = ids != 0  # [B, L]
        target_ids = batch.categorical[:, self.target_index]  # [B]
        target = fields[:, self.target_index]  # E_id[A]: [B, D]
        history = self.embedding.sequence(batch, cfg.history)  # E_id[e_j]: [B, L, D]
        if not cfg.item_id_embedding:
            target, history = torch.zeros_like(target), torch.zeros_like(history)
        cross = []
        if cfg.content == "vector":
            target = target + self.project(self.encode(batch.embeddings[cfg.content_feature]))  # + W m_A
            history = history + self.project(self.item_content[ids]) * mask.unsqueeze(-1)  # + W m_j
        elif cfg.content == "codes":
            rq, vq = self.target_codes(target_ids, batch.embeddings[cfg.content_feature])  # [B, Lq], [B, K]
            hist_rq = self.rq_codes[ids] if rq is not None else None  # [B, L, Lq]
            hist_vq = self.vq_codes[ids] if vq is not None else None  # [B, L, K]
            target = target + self.code_vectors(rq, vq)  # e_A: [B, D]
            history = history + self.code_vectors(hist_rq, hist_vq)  # e_j: [B, L, D]
            if rq is not None and cfg.match_levels:
                buckets = count_buckets(match_counts(hist_rq, rq, cfg.match_levels), self.max_count)  # [B, m]
                rows = buckets + torch.arange(cfg.match_levels, device=buckets.device) * (self.max_count.bit_length() + 1)
                cross.append(self.match_table(rows).flatten(1))  # [B, m D]
        t = self.target_index
        fields = torch.cat([fields[:, :t], target.unsqueeze(1), fields[:, t + 1 :]], 1)  # [B, F, D]
        interest = self.attention(history, target, mask)  # v_U(A) = sum_j a(e_j, e_A) e_j: [B, D]
        lists = self.embedding.pooled_sequences(batch)[:, self.other_sequences]  # [B, S - 1, D]
        x = torch.cat([fields.flatten(1), lists.flatten(1), interest, *cross, batch.numeric], 1)  # [B, in_dim]
        return {self.predicted_label: self.mlp(x).squeeze(-1)}  # [B]
