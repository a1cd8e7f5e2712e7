"""Semi-synthetic click -> conversion funnel on MovieLens 1M, with the truth of every exposure.

No public log tells whether an unclicked exposure would have converted, so entire-space CVR
models cannot be scored over the exposure space on real data. Following the semi-synthetic
protocol of the doubly robust joint-learning literature (Wang et al., ICML 2019; Guo et al.,
SIGIR 2021), the real ratings define a complete ground truth:

1. **Completion.** A low-rank model ``s_ui = mu + b_u + b_i + (rank-k residual)`` is fitted to the
   1,000,209 real ratings (regularised biases, then ``mf_steps`` soft-impute SVD steps of rank
   ``rank``; :func:`fit_matrix_factorisation`), which gives a completed rating for every
   (user, rated movie) pair.
2. **Exposures.** Each user is shown ``exposures_per_user`` distinct movies drawn uniformly from
   the rated movies (so most exposures were never rated: their truth comes from the completion).
3. **True conversion.** ``p_cvr = sigmoid(cvr_slope * (clip(s, 1, 5) - cvr_midpoint))``: an
   exposure converts when the user would like the movie; ``would_convert ~ Bernoulli(p_cvr)``.
4. **Clicks (missing not at random).** ``logit p_click = b + selection_bias * z(s) +
   popularity_bias * (z(log n_user) + z(log n_item)) / sqrt(2)``, ``z`` a standardisation over
   the exposures, ``n_user`` / ``n_item`` the real rating counts, ``b`` fitted to ``click_rate``.
   Clicks rise with the completed rating, as ratings do in MNAR rating data, so the clicked
   exposures are a biased sample of the space a CVR model is served on.
5. **Observed labels.** ``click ~ Bernoulli(p_click)``; ``conversion = click * would_convert``.

Features: user_id, item_id, gender, age, occupation, zip, year, genres (as the MovieLens
source). Evaluation-only columns, never features: ``p_click``, ``p_cvr``, ``p_conversion``
(= p_click * p_cvr), ``would_convert``, ``completed_rating``.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import polars as pl
import torch

from recforge.data.schema import Feature, Kind, Schema
from recforge.data.sources import RawDataset
from recforge.data.sources._download import dataset_dir
from recforge.data.sources.movielens import GENRES_MAX_LEN, ML_1M, SIDE, _read_1m
from recforge.data.sources.synthetic import intercept_for_rate, sigmoid
from recforge.errors import DataError



def load(
    exposures_per_user: int = 40,
    click_rate: float = 0.15,
    selection_bias: float = 1.0,
    popularity_bias: float = 0.5,
    cvr_midpoint: float = 4.0,
    cvr_slope: float = 2.0,
    rank: int = 16,
    mf_steps: int = 10,
    seed: int = 0,
    root: str | Path | None = None,
) -> RawDataset:
    """The semi-synthetic funnel (see the module docstring); ``seed`` draws exposures and labels."""
    if exposures_per_user < 1:
        raise DataError(f"exposures_per_user must be >= 1, got {exposures_per_user}")
    if not 0 < click_rate < 1:
        raise DataError(f"click_rate must lie in (0, 1), got {click_rate}")
    base = dataset_dir("movielens-1m", [ML_1M], root=root)
    path = base / ML_1M.name
    ratings, users, movies, origin = _read_1m(path)
    user_ids = np.sort(ratings["user_id"].unique().to_numpy())
    item_ids = np.sort(ratings["item_id"].unique().to_numpy())
    if exposures_per_user > len(item_ids):
        raise DataError(f"exposures_per_user={exposures_per_user} exceeds the {len(item_ids)} rated movies")
    u = np.searchsorted(user_ids, ratings["user_id"].to_numpy())  # [R] dense user index
    i = np.searchsorted(item_ids, ratings["item_id"].to_numpy())  # [R] dense item index
    completed = _completion(str(path), rank, mf_steps)  # [U, I] completed ratings

    rng = np.random.default_rng([seed, 17])
    n_users, n_items = len(user_ids), len(item_ids)
    exposed = np.argpartition(rng.random((n_users, n_items), dtype=np.float32), exposures_per_user - 1, axis=1)
    exposed = exposed[:, :exposures_per_user]  # [U, E] distinct items per user
    eu = np.repeat(np.arange(n_users), exposures_per_user)  # [N]
    ei = exposed.reshape(-1)  # [N]
    s = np.clip(completed[eu, ei], 1.0, 5.0).astype(np.float64)  # completed ratings of the exposures

    p_cvr = sigmoid(cvr_slope * (s - cvr_midpoint))
    n_user = np.bincount(u, minlength=n_users)[eu]
    n_item = np.bincount(i, minlength=n_items)[ei]
    popularity = (_z(np.log(n_user)) + _z(np.log(n_item))) / np.sqrt(2.0)
    logit_click = selection_bias * _z(s) + popularity_bias * popularity
    p_click = sigmoid(logit_click + intercept_for_rate(logit_click, click_rate))
    click = rng.random(len(s)) < p_click
    would_convert = rng.random(len(s)) < p_cvr

    frame = (
        pl.DataFrame({"user_id": user_ids[eu], "item_id": item_ids[ei]})
        .join(users, on="user_id", how="left", validate="m:1", maintain_order="left")
        .join(movies, on="item_id", how="left", validate="m:1", maintain_order="left")
        .with_columns(
            click=pl.Series(click.astype(np.int8)),
            conversion=pl.Series((click & would_convert).astype(np.int8)),
            p_click=pl.Series(p_click),
            p_cvr=pl.Series(p_cvr),
            p_conversion=pl.Series(p_click * p_cvr),
            would_convert=pl.Series(would_convert.astype(np.int8)),
            completed_rating=pl.Series(s),
        )
    )
    for column, key, where in (("gender", "user_id", "users"), ("genres", "item_id", "movies")):
        if frame[column].null_count():
            missing = frame.filter(pl.col(column).is_null())[key][0]
            raise DataError(f"{origin[where]}: no entry for {key} {missing}")
    frame = frame.select(
        "user_id", "item_id", *SIDE, "genres", "click", "conversion",
        "p_click", "p_cvr", "p_conversion", "would_convert", "completed_rating",
    )  # fmt: skip
    return RawDataset(frame=frame, schema=schema(), origin=f"movielens-1m-funnel({origin['ratings']}, seed={seed})")


def schema() -> Schema:
    """Schema of :func:`load`'s frame (the truth columns are not features)."""
    features = [Feature(name=c, kind=Kind.CATEGORICAL) for c in ["user_id", "item_id", *SIDE]]
    features.append(Feature(name="genres", kind=Kind.SEQUENCE, max_len=GENRES_MAX_LEN, vocab="genre"))
    return Schema(features=features, labels=["click", "conversion"], user="user_id")


def fit_matrix_factorisation(
    users: np.ndarray, items: np.ndarray, ratings: np.ndarray, rank: int, steps: int, shrink: float = 5.0,
) -> np.ndarray:
    """A rank-``rank`` completion of the (user, item, rating) triples -> dense ``[U, I]`` scores.

    Biases first: ``mu + b_u + b_i`` by alternating regularised means (``shrink`` pseudo-counts).
    Then the residuals are completed by soft-impute (Mazumder et al., JMLR 2010): ``steps``
    times, the missing cells are filled with the current low-rank estimate and the estimate is
    replaced by the rank-``rank`` (randomised) SVD of the filled matrix with its singular values
    shrunk.
    Dense and vectorised: one SVD of a ``[U, I]`` matrix per step.
    """
    n_users, n_items = int(users.max()) + 1, int(items.max()) + 1
    r = ratings.astype(np.float64)
    mu = float(r.mean())
    bu, bi = np.zeros(n_users), np.zeros(n_items)
    for _ in range(3):  # alternating regularised means of the residuals
        bi = np.bincount(items, r - mu - bu[users], n_items) / (np.bincount(items, minlength=n_items) + shrink)
        bu = np.bincount(users, r - mu - bi[items], n_users) / (np.bincount(users, minlength=n_users) + shrink)
    observed = np.zeros((n_users, n_items), dtype=bool)
    observed[users, items] = True
    residual = np.zeros((n_users, n_items), dtype=np.float32)
    residual[users, items] = r - mu - bu[users] - bi[items]
    low_rank = np.zeros_like(residual)
    lam = None
    torch.manual_seed(0)  # the randomised SVD's draws
    for _ in range(steps):
        filled = torch.from_numpy(np.where(observed, residual, low_rank))
        u, sv, v = torch.svd_lowrank(filled, q=rank + 1, niter=2)  # randomised: [U, k+1], [k+1], [I, k+1]
        if lam is None:  # shrink by the first singular value beyond the rank
            lam = float(sv[rank])
        sv = (sv[:rank] - lam).clamp(min=0)
        low_rank = ((u[:, :rank] * sv) @ v[:, :rank].T).numpy()
    return (mu + bu[:, None] + bi[None, :] + low_rank).astype(np.float32)


@functools.lru_cache(maxsize=2)
def _completion(path: str, rank: int, steps: int) -> np.ndarray:
    """The completed ``[users, rated movies]`` rating matrix of the real ratings at ``path``."""
    ratings, _, _, _ = _read_1m(Path(path))
    user_ids = np.sort(ratings["user_id"].unique().to_numpy())
    item_ids = np.sort(ratings["item_id"].unique().to_numpy())
    u = np.searchsorted(user_ids, ratings["user_id"].to_numpy())
    i = np.searchsorted(item_ids, ratings["item_id"].to_numpy())
    return fit_matrix_factorisation(u, i, ratings["rating"].to_numpy(), rank, steps)


def _z(x: np.ndarray) -> np.ndarray:
    sd = float(x.std())
    return (x - x.mean()) / sd if sd > 0 else np.zeros_like(x)
