"""Lifelong (query, item) sequences with planted interests and, for each event, the known set of
earlier events its click depends on.

World. ``n_items`` items fall into ``n_clusters`` clusters of equal size (a seeded shuffle); the
clusters are paired at random, each one's partner being its *related* cluster. Within a cluster,
item ``rank = floor(size * u**2)`` (u uniform), so a few items are popular.

Users. A user has ``n`` events, ``n`` log-uniform in [``min_events``, ``max_events``], and
``interests_per_user`` = k interest clusters (drawn with replacement: a repeat adds to one
interest) with Dirichlet(1) weights w. An event is, with probability ``pi = relevant_fraction *
(k + 1) / 2``, an interest event: an interest drawn by weight, in its cluster or, with probability
``_RELATED_SHARE``, in the related cluster; otherwise a background event in a uniformly random
cluster. Its item is drawn from that cluster; its time is after the user's previous event.
A fraction ``search_fraction`` of the events are searches: their ``query`` holds 1 to
:data:`QUERY_LEN` tokens of the item's cluster (each cluster owns ``_TOKENS_PER_CLUSTER`` tokens),
the other events an empty query.

Truth. The events *relevant* to an event are the user's earlier events among the last
``history_len`` (the window a history of that length shows) whose item lies in the event's cluster
or in its related cluster. The click depends on those and on the item only::

    logit = b + 1.0 * log1p(n_same) + 0.5 * log1p(n_related) + bias_item,   bias_item ~ N(0, 0.5²)

``b`` fitted so that the mean click probability is ``click_rate``; ``click`` is a Bernoulli draw
of ``p_click``. An interest event's relevant events are, in expectation over the interests,
``pi * E[sum w²] = pi * 2 / (k + 1)`` = ``relevant_fraction`` of its window (plus the background's
share of its two clusters, 2 / n_clusters): a sparse subset, which a search stage over a long
history has to find, while a short recent window holds few of them.

Bayes-optimal AUC (the AUC of ``p_click``) with the defaults (about 2.6M
events): 0.902, 0.902 and 0.903 for seeds 0, 1, 2. For comparison, on seed 0: the same rule
counting only the last 50 events gives 0.82 (the last 200: 0.88), so the far history carries
signal; each item's click rate, fitted on half of the users, gives 0.53-0.55 on the others.

Columns: user_id, item_id (int64); query (list[int64], empty for an event without a query);
timestamp (int64 seconds, strictly increasing within a user); click (int8). For evaluation only,
never features: cluster and related_cluster (int64, of the row's item), n_same and n_related
(int64, its relevant events in and beside its cluster), p_click (float64).

Rows are ordered by user, then time, which is the order of the store's timeline: the history
slot ``j`` of row ``r`` (right-aligned, ``L`` slots) holds row ``r - L + j``, or padding before the
user's first event. :func:`relevance_mask`
reads the truth in that layout, so an evaluator measures a search stage's recall of the relevant
events from the batch rows alone (``store.split(name).row[batch.row]`` are the raw rows; the
frame is the same for the same options, so an evaluator regenerates it beside a store).
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa

from recforge.data.schema import Feature, Kind, Schema
from recforge.data.sources import RawDataset, history_feature
from recforge.data.sources.synthetic import intercept_for_rate, sigmoid
from recforge.errors import DataError

QUERY_LEN = 5  # most tokens in a query (SEMINAR's queries hold up to 5 keywords)
EVALUATION_COLUMNS = ("cluster", "related_cluster", "n_same", "n_related", "p_click")
_TOKENS_PER_CLUSTER = 8
_RELATED_SHARE = 0.3  # of an interest's events, in the related cluster
_SAME_WEIGHT = 1.0  # of log1p(n_same) in the click logit
_RELATED_WEIGHT = 0.5  # of log1p(n_related)
_ITEM_BIAS = 0.5  # standard deviation of the item biases
_T0 = 1_700_000_000  # earliest first event (unix seconds)
_START_SPAN = 365 * 86_400  # users start within a year
_MEAN_GAP = 600  # seconds between a user's events, on average


def generate(
    n_users: int = 1000,
    min_events: int = 32,
    max_events: int = 16384,
    n_items: int = 50_000,
    n_clusters: int = 500,
    interests_per_user: int = 8,
    relevant_fraction: float = 0.05,
    search_fraction: float = 0.3,
    history_len: int = 1000,
    click_rate: float = 0.1,
    seed: int = 0,
) -> RawDataset:
    """Generate the users' events (see the module), deterministic for a ``seed``.

    ``n_clusters`` must be even (clusters come in related pairs) and at most ``n_items``;
    ``relevant_fraction`` at most ``2 / (interests_per_user + 1)`` (then every event is an
    interest event). ``history_len`` is both the window the clicks depend on and the length of
    ``hist_item_id`` and ``hist_query``.
    """
    for what, value in (("n_users", n_users), ("min_events", min_events), ("n_items", n_items),
                        ("interests_per_user", interests_per_user), ("history_len", history_len)):  # fmt: skip
        if value < 1:
            raise DataError(f"{what} must be >= 1, got {value}")
    if max_events < min_events:
        raise DataError(f"max_events ({max_events}) must be >= min_events ({min_events})")
    if n_clusters < 2 or n_clusters % 2 or n_clusters > n_items:
        raise DataError(f"n_clusters must be even, >= 2 and <= n_items ({n_items}), got {n_clusters}")
    interest_share = relevant_fraction * (interests_per_user + 1) / 2
    if not 0 < interest_share <= 1:
        raise DataError(
            f"relevant_fraction must lie in (0, {2 / (interests_per_user + 1):.4g}] for {interests_per_user} interests, got {relevant_fraction}"
        )
    if not (0 <= search_fraction <= 1 and 0 < click_rate < 1):
        raise DataError("search_fraction must lie in [0, 1] and click_rate in (0, 1)")

    world = np.random.default_rng([seed, 0])  # items, clusters
    people = np.random.default_rng([seed, 1])  # users
    draw = np.random.default_rng([seed, 2])  # events

    # --- world -----------------------------------------------------------------------------
    cluster_of = world.permutation(np.arange(n_items) % n_clusters)  # [V]
    members = np.argsort(cluster_of, kind="stable")  # items grouped by cluster: [V]
    size = np.bincount(cluster_of, minlength=n_clusters)  # [C]
    first_member = np.concatenate([[0], np.cumsum(size)[:-1]])  # [C]
    pairs = world.permutation(n_clusters)
    related = np.empty(n_clusters, dtype=np.int64)
    related[pairs[0::2]], related[pairs[1::2]] = pairs[1::2], pairs[0::2]
    item_bias = world.normal(0.0, _ITEM_BIAS, size=n_items)  # [V]

    # --- users -----------------------------------------------------------------------------
    lengths = np.exp(people.uniform(np.log(min_events), np.log(max_events + 1), size=n_users)).astype(np.int64)
    lengths = lengths.clip(min_events, max_events)  # [U]
    interests = people.integers(0, n_clusters, size=(n_users, interests_per_user))  # [U, k]
    weights = people.dirichlet(np.ones(interests_per_user), size=n_users)  # [U, k]
    start_time = _T0 + people.integers(0, _START_SPAN, size=n_users)  # [U]

    # --- events ----------------------------------------------------------------------------
    n = int(lengths.sum())
    user = np.repeat(np.arange(n_users), lengths)  # [N]
    first_event = np.concatenate([[0], np.cumsum(lengths)[:-1]])  # [U]
    position = np.arange(n) - first_event[user]  # rank within the user: [N]
    # an interest by weight: the users' cumulative weights laid end to end, user u's in (u, u + 1]
    cumulative = (np.cumsum(weights, axis=1) + np.arange(n_users)[:, None]).ravel()  # [U * k]
    chosen = np.searchsorted(cumulative, user + draw.random(n), side="right") - user * interests_per_user
    interest_cluster = interests[user, chosen.clip(0, interests_per_user - 1)]  # [N]
    interest_cluster = np.where(draw.random(n) < _RELATED_SHARE, related[interest_cluster], interest_cluster)
    cluster = np.where(draw.random(n) < interest_share, interest_cluster, draw.integers(0, n_clusters, size=n))  # [N]
    rank = (size[cluster] * draw.random(n) ** 2).astype(np.int64)
    item = members[first_member[cluster] + rank]  # [N]
    gaps = 1 + draw.geometric(1.0 / _MEAN_GAP, size=n)
    elapsed = np.cumsum(gaps)
    timestamp = start_time[user] + elapsed - elapsed[first_event][user]  # [N]

    # --- truth: relevant events among the last history_len, then the click ------------------
    n_same = _earlier_in_cluster(user, cluster, position, cluster, n_clusters, history_len)
    n_related = _earlier_in_cluster(user, cluster, position, related[cluster], n_clusters, history_len)
    logit = _SAME_WEIGHT * np.log1p(n_same) + _RELATED_WEIGHT * np.log1p(n_related) + item_bias[item]
    p_click = sigmoid(logit + intercept_for_rate(logit, click_rate))
    click = (draw.random(n) < p_click).astype(np.int8)

    # --- queries: 1..QUERY_LEN tokens of the cluster on search events -----------------------
    query_len = np.where(draw.random(n) < search_fraction, draw.integers(1, QUERY_LEN + 1, size=n), 0)
    offsets = np.concatenate([[0], np.cumsum(query_len)])
    owner = np.repeat(np.arange(n), query_len)
    tokens = cluster[owner] * _TOKENS_PER_CLUSTER + draw.integers(0, _TOKENS_PER_CLUSTER, size=len(owner))
    query = pl.from_arrow(pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(tokens, type=pa.int64())))

    frame = pl.DataFrame(
        {
            "user_id": user, "item_id": item, "query": query, "timestamp": timestamp, "click": click,
            "cluster": cluster, "related_cluster": related[cluster], "n_same": n_same, "n_related": n_related,
            "p_click": p_click,
        }
    ).with_columns(pl.col("user_id", "item_id", "timestamp", "cluster", "n_same", "n_related").cast(pl.Int64))  # fmt: skip
    return RawDataset(
        frame=frame, schema=schema(history_len), origin=f"lifelong-simulator(seed={seed}, n_users={n_users})"
    )


load = generate


def schema(history_len: int = 1000) -> Schema:
    """Schema of :func:`generate`'s frame (the :data:`EVALUATION_COLUMNS` are not features)."""
    return Schema(
        features=[
            Feature(name="user_id", kind=Kind.CATEGORICAL),
            Feature(name="item_id", kind=Kind.CATEGORICAL),
            Feature(name="query", kind=Kind.SEQUENCE, max_len=QUERY_LEN),
            history_feature(history_len),
            Feature(name="hist_query", kind=Kind.SEQUENCE, timeline="query", max_len=history_len),
        ],
        labels=["click"],
        user="user_id",
        time="timestamp",
    )


def relevance_mask(frame: pl.DataFrame, rows: np.ndarray, length: int) -> np.ndarray:
    """Which history slots of the target ``rows`` (raw row indices of :func:`generate`'s frame)
    hold an event relevant to the target -> [B, length] bool, laid out as a batch's history of
    ``length`` slots (right-aligned: slot ``length - 1`` is the latest earlier event); slots before
    the user's first event are False. With ``length`` = ``history_len`` a row has
    ``n_same + n_related`` True slots."""
    rows = np.asarray(rows, dtype=np.int64)
    user = frame["user_id"].to_numpy()
    cluster = frame["cluster"].to_numpy()
    related = frame["related_cluster"].to_numpy()
    first = np.searchsorted(user, user[rows])  # the user's first row: [B]
    events = rows[:, None] - length + np.arange(length)  # [B, L]
    real = events >= first[:, None]
    shown = cluster[np.where(real, events, 0)]  # [B, L]
    return real & ((shown == cluster[rows, None]) | (shown == related[rows, None]))


def _earlier_in_cluster(
    user: np.ndarray, cluster: np.ndarray, position: np.ndarray, wanted: np.ndarray, n_clusters: int, window: int
) -> np.ndarray:
    """Per event, how many of its user's previous ``window`` events lie in cluster ``wanted`` -> [N].

    Events are keyed by (user, cluster, position), sorted; the count is the number of keys of
    (user, wanted) with a position in [position - window, position)."""
    span = int(position.max()) + 1
    keys = np.sort((user * n_clusters + cluster) * span + position)
    base = (user * n_clusters + wanted) * span
    return np.searchsorted(keys, base + position) - np.searchsorted(keys, base + np.maximum(position - window, 0))
