"""An industrial-style impression log with a planted, known click and conversion signal.

Users, items and the values of ``n_fields`` context fields are drawn from Zipf laws over finite
vocabularies (inverse-CDF sampling), so a few ids are very frequent and most are rare, as in
production logs; rare ids get smaller parameters (see ``_shrink``). Each row's click
probability is a logistic function of what a model can see::

    logit_click = b + bias_user + bias_item + s_domain * <u_user, v_item>
                  + sum_f w_f[value_f] + <beta_domain, numeric> + c_domain

and the conversion probability given a click uses a partly different signal: the same item
biases; item vectors, field weights and user biases correlated with the click ones at
``_SHARED``; its own numeric weights and domain biases. Labels are Bernoulli draws, so the
only noise is the labels' own: ``p_click`` and ``p_conversion`` (= p_click * P(conversion |
click)) are the true probabilities, and their AUC is the Bayes-optimal AUC a model can
approach. They are not features.

Every exposure also carries the truth of the conversion funnel, for evaluation only (never
features): ``p_cvr``, its true post-click conversion probability, and ``would_convert``, the
conversion it would have had if clicked (``conversion = click * would_convert``).

Selection bias. With ``selection_bias`` set (a number >= 0), the conversion signal gets its own
user and item vectors, biases and field weights (no shared parts), and the click logit gains
``selection_bias * z(logit_cvr)``, ``z`` the conversion logit standardised over the rows. At 0
the click logit has no conversion term: the two share only the frequency scale of the ids and
the domain's interaction scale, which leaves a weak dependence (correlation of p_click and p_cvr
about 0.1; clicked rows have a 10-15% higher mean p_cvr). The larger the knob, the more clicks
concentrate on exposures that would convert, and the more the clicked rows are a biased sample
of the space a CVR model is served on. ``None`` keeps the default log described above.

The per-id parameters (vectors, biases, field weights) are hashes of ``seed`` and the id, and
the other parameters depend on ``seed`` only. Each part of a logit is rescaled to a fixed
standard deviation over the rows and the intercepts ``b`` are fitted so that the mean rates
match: this keeps the Bayes AUC in a narrow band across seeds and sizes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl

from recforge.data.schema import Feature, Kind, Schema
from recforge.data.sources import RawDataset, history_feature
from recforge.errors import DataError

# Standard deviations (over the rows) of the logit's parts, chosen so that the Bayes AUC of
# click is 0.77-0.79 with the default arguments (see the tests).
_BIAS_USER = 0.4
_BIAS_ITEM = 0.4
_INTERACTION = 0.6  # <u, v>, before the domain's scale (0.5-1.5)
_FIELD = 0.35  # the strongest field's weights; the others step down to a fifth of it
_NUMERIC = 0.4  # <beta_domain, numeric>
_DOMAIN = 0.25  # of the domain biases, drawn once
_SHARED = 0.6  # correlation of the conversion signal's parts with the click ones
_HEAD = 20.0  # per-id parameters shrink beyond this frequency rank
_T0 = 1_700_000_000  # first timestamp (unix seconds)
_SPAN = 30 * 86_400  # the log covers 30 days

_MASK = (1 << 64) - 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def generate(
    n_rows: int = 200_000,
    n_users: int = 10_000,
    n_items: int = 5_000,
    n_fields: int = 8,
    field_vocab_sizes: Sequence[int] | None = None,
    n_numeric: int = 4,
    n_domains: int = 3,
    history_len: int = 20,
    latent_dim: int = 8,
    zipf_exponent: float = 1.1,
    activity_exponent: float = 0.7,
    click_rate: float = 0.1,
    conversion_rate: float = 0.1,
    selection_bias: float | None = None,
    seed: int = 0,
) -> RawDataset:
    """Generate ``n_rows`` impressions, ordered by time.

    - ``field_vocab_sizes``: one vocabulary size per context field (default 10, 100, 1k, 10k,
      cycling); any size up to 10M works, ids are ranks (0 = most frequent).
    - ``click_rate``: mean P(click); ``conversion_rate``: mean P(conversion | click).
    - ``history_len`` > 0 declares ``hist_item_id``, the user's earlier items.
    - ``selection_bias``: how strongly clicks select exposures that would convert (see the
      module docstring); None keeps the default log.

    Columns: user_id, item_id, domain, f0..f{n_fields-1} (int64); n0..n{n_numeric-1} (float32);
    timestamp (int64 seconds, strictly increasing within a user); click, conversion (int8,
    conversion = 0 wherever click = 0); p_click, p_conversion (float64, true probabilities);
    p_cvr (float64, true P(conversion | click)) and would_convert (int8), evaluation only.
    """
    sizes = list(field_vocab_sizes) if field_vocab_sizes is not None else [
        10 ** (1 + i % 4) for i in range(n_fields)
    ]
    if len(sizes) != n_fields:
        raise DataError(f"field_vocab_sizes has {len(sizes)} sizes for n_fields={n_fields}")
    counts = {"n_rows": n_rows, "n_users": n_users, "n_items": n_items, "n_domains": n_domains,
              "latent_dim": latent_dim, "field_vocab_sizes": min(sizes, default=1)}
    for what, value in counts.items():
        if value < 1:
            raise DataError(f"{what} must be >= 1, got {value}")
    if n_numeric < 0 or history_len < 0:
        raise DataError("n_numeric and history_len must be >= 0")
    if not (0 < click_rate < 1 and 0 < conversion_rate < 1):
        raise DataError("click_rate and conversion_rate must lie in (0, 1)")
    if selection_bias is not None and not selection_bias >= 0:
        raise DataError(f"selection_bias must be >= 0 (or None), got {selection_bias}")

    world = np.random.default_rng([seed, 0])  # per-domain and per-field parameters
    draw = np.random.default_rng([seed, 1])  # the rows
    key_rng = np.random.default_rng([seed, 2])  # hash keys of the per-id parameters
    keys = iter(key_rng.integers(0, 2**63, size=6 + 2 * n_fields).tolist())

    # --- rows --------------------------------------------------------------------------------
    domain_p = 1.0 / np.arange(1, n_domains + 1)
    domain = draw.choice(n_domains, size=n_rows, p=domain_p / domain_p.sum())  # [N]
    user = zipf(draw, n_users, activity_exponent, n_rows)  # [N]
    item = zipf(draw, n_items, zipf_exponent, n_rows)  # [N]
    fields = [zipf(draw, v, zipf_exponent, n_rows) for v in sizes]  # n_fields x [N]
    numeric = draw.standard_normal((n_rows, n_numeric), dtype=np.float32)  # [N, P]
    time = draw.integers(_T0, _T0 + _SPAN, size=n_rows)  # [N]

    # --- click signal: each part rescaled to its std over the rows --------------------------
    scale_d = world.uniform(0.5, 1.5, size=n_domains)  # [D] strength of <u, v> per domain
    bias_d = world.normal(0, _DOMAIN, size=n_domains)  # [D]
    beta = world.normal(size=(n_domains, n_numeric))  # [D, P]
    beta = 0.5 * beta + 0.5 * beta.mean(axis=0)  # shared trend plus a per-domain part
    field_std = world.permutation(np.linspace(1.0, 0.2, n_fields)) * _FIELD  # [F]

    def per_id(ids: np.ndarray, vocab: int, std: float) -> np.ndarray:  # [N]
        return _scaled(_normal(ids, vocab, next(keys), 1)[:, 0] * _shrink(ids), std)

    bias_user = per_id(user, n_users, _BIAS_USER)  # [N]
    bias_item = per_id(item, n_items, _BIAS_ITEM)  # [N]
    u = _normal(user, n_users, next(keys), latent_dim) * _shrink(user)[:, None]  # [N, K]
    v = _normal(item, n_items, next(keys), latent_dim) * _shrink(item)[:, None]  # [N, K]
    dot = _scaled((u * v).sum(axis=1), _INTERACTION)  # [N]
    w = [per_id(x, n, std) for x, n, std in zip(fields, sizes, field_std)]  # F x [N]
    lin = _scaled(np.einsum("np,np->n", numeric, beta[domain]), _NUMERIC)  # [N]
    logit_click = (
        bias_user + bias_item + scale_d[domain] * dot + np.sum(w, axis=0) + lin + bias_d[domain]
    )

    # --- conversion signal: its parts correlate with the click ones at _SHARED --------------
    # (not at all under an explicit selection bias, so that only the bias links the two)
    shared = _SHARED if selection_bias is None else 0.0
    mix = np.sqrt(1 - shared**2)
    v_own = _normal(item, n_items, next(keys), latent_dim) * _shrink(item)[:, None]
    v2 = shared * v + mix * v_own  # [N, K]
    own_keys = np.random.default_rng([seed, 3]).integers(0, 2**63, size=2).tolist()
    u2 = u if selection_bias is None else _normal(user, n_users, own_keys[0], latent_dim) * _shrink(user)[:, None]
    dot2 = _scaled((u2 * v2).sum(axis=1), _INTERACTION)
    bias_user2 = shared * bias_user + mix * per_id(user, n_users, _BIAS_USER)
    w2 = [
        shared * wf + mix * per_id(x, n, std)
        for wf, x, n, std in zip(w, fields, sizes, field_std)
    ]
    beta2 = world.normal(size=(n_domains, n_numeric))
    lin2 = _scaled(np.einsum("np,np->n", numeric, beta2[domain]), _NUMERIC)
    bias_d2 = world.normal(0, _DOMAIN, size=n_domains)
    if selection_bias is None:
        bias_item2 = bias_item
    else:
        bias_item2 = _scaled(_normal(item, n_items, own_keys[1], 1)[:, 0] * _shrink(item), _BIAS_ITEM)
    logit_cvr = (
        bias_user2 + bias_item2 + scale_d[domain] * dot2 + np.sum(w2, axis=0) + lin2
        + bias_d2[domain]
    )  # fmt: skip
    if selection_bias is not None:  # clicks lean towards exposures that would convert
        logit_click = logit_click + selection_bias * _scaled(logit_cvr, 1.0)
    p_click = sigmoid(logit_click + intercept_for_rate(logit_click, click_rate))  # [N]
    p_cvr = sigmoid(logit_cvr + intercept_for_rate(logit_cvr, conversion_rate, weights=p_click))

    click = draw.random(n_rows) < p_click
    would_convert = draw.random(n_rows) < p_cvr
    conversion = click & would_convert

    frame = pl.DataFrame(
        {
            "user_id": user, "item_id": item, "domain": domain,
            **{f"f{i}": x for i, x in enumerate(fields)},
            **{f"n{j}": numeric[:, j] for j in range(n_numeric)},
            "timestamp": time,
            "click": click.astype(np.int8), "conversion": conversion.astype(np.int8),
            "p_click": p_click, "p_conversion": p_click * p_cvr,
            "p_cvr": p_cvr, "would_convert": would_convert.astype(np.int8),
        }
    )  # fmt: skip
    frame = frame.with_columns(pl.col("user_id", "item_id", "domain", "timestamp").cast(pl.Int64))
    # strictly increasing times within a user: t'_k = max(t_k, t'_{k-1} + 1)
    #   <=> t'_k = k + cummax_{j<=k}(t_j - j), k the rank within the user
    rank = pl.int_range(pl.len()).over("user_id")
    frame = (
        frame.sort("user_id", "timestamp")
        .with_columns(timestamp=(pl.col("timestamp") - rank).cum_max().over("user_id") + rank)
        .sort("timestamp", "user_id")
    )
    return RawDataset(
        frame=frame,
        schema=schema(n_fields, n_numeric, history_len),
        origin=f"synthetic(seed={seed}, n_rows={n_rows})",
    )


load = generate


def schema(n_fields: int = 8, n_numeric: int = 4, history_len: int = 20) -> Schema:
    """Schema of :func:`generate`'s frame (the probabilities are not features)."""
    cat = ["user_id", "item_id", "domain", *(f"f{i}" for i in range(n_fields))]
    features = [Feature(name=c, kind=Kind.CATEGORICAL) for c in cat]
    features += [Feature(name=f"n{j}", kind=Kind.NUMERIC) for j in range(n_numeric)]
    if history_len:
        features.append(history_feature(history_len))
    return Schema(
        features=features,
        labels=["click", "conversion"],
        user="user_id",
        time="timestamp",
        domain="domain",
    )


def zipf(rng: np.random.Generator, vocab: int, exponent: float, size: int) -> np.ndarray:
    """``size`` ids in [0, vocab) with P(id = k) proportional to (k + 1) ** -exponent."""
    cdf = np.cumsum(np.arange(1, vocab + 1, dtype=np.float64) ** -exponent)
    return np.searchsorted(cdf, rng.random(size) * cdf[-1], side="right").clip(max=vocab - 1)


# --- helpers ----------------------------------------------------------------------------------
def _normal(ids: np.ndarray, vocab: int, key: int, width: int) -> np.ndarray:
    """A fixed N(0, 1) vector per (id, key), ``[len(ids), width]``, for any vocabulary size.

    Values come from hashing the id, so no random table of the vocabulary is stored: they are
    computed for the whole vocabulary when it is smaller than ``ids``, else per distinct id.
    """
    if vocab <= len(ids):
        uniq, inverse = np.arange(vocab, dtype=np.uint64), ids
    else:
        uniq, inverse = np.unique(ids, return_inverse=True)
    x = uniq.astype(np.uint64)[:, None] * np.uint64(width) + np.arange(width, dtype=np.uint64)
    u1 = _uniform(x, key)
    u2 = _uniform(x, (key * 0x632BE59BD9B4E019 + 1) & _MASK)
    z = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)  # Box-Muller, [U, width]
    return z[inverse]


def _uniform(x: np.ndarray, key: int) -> np.ndarray:
    """splitmix64 of ``x`` and ``key`` mapped to (0, 1)."""
    with np.errstate(over="ignore"):
        h = x * _GOLDEN + np.uint64(key)
        h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        h = h ^ (h >> np.uint64(31))
    return ((h >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53


def _scaled(x: np.ndarray, std: float) -> np.ndarray:
    """``x`` rescaled to standard deviation ``std`` (zeros if ``x`` is constant)."""
    sd = float(x.std())
    return x * (std / sd) if sd > 0 else np.zeros_like(x)


def _shrink(ids: np.ndarray) -> np.ndarray:
    """Scale of a per-id parameter by frequency rank: 1 at the head, (rank / _HEAD) ** -0.5 in
    the tail, so that most of the signal sits on ids seen often enough to be learnt."""
    return (1.0 + ids / _HEAD) ** -0.5


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def intercept_for_rate(logit: np.ndarray, rate: float, weights: np.ndarray | None = None) -> float:
    """The shift b with (weighted) mean sigmoid(logit + b) = rate, by Newton's method."""
    b = float(np.log(rate / (1 - rate)) - np.average(logit, weights=weights))
    for _ in range(50):
        p = sigmoid(logit + b)
        gap = np.average(p, weights=weights) - rate
        if abs(gap) < 1e-6 * rate:
            break
        b -= gap / max(float(np.average(p * (1 - p), weights=weights)), 1e-12)
    return b
