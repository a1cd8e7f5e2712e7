"""Sequence layers: segment sampling against its guarantees, the SASRec block's masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recforge.nn.sequence import SelfAttentionPool, segment_sample

pytestmark = pytest.mark.usefixtures("single_thread")


def random_segments(seed: int, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """CSR segments of lengths 0 .. 6 * width (so some exceed 4 * width) over distinct non-zero values."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 6 * width + 1, 12)
    lengths[:2] = [0, 4 * width + 1]
    ptr = torch.from_numpy(np.r_[0, np.cumsum(lengths)])
    values = torch.randperm(int(ptr[-1]), generator=torch.Generator().manual_seed(seed)) + 1
    segment = torch.from_numpy(np.r_[0, 1, rng.integers(0, len(lengths), 38)])
    take = torch.from_numpy(rng.integers(0, 2 * width, 40))
    return ptr, values, segment, take


@pytest.mark.parametrize("width", [1, 3, 5])
@pytest.mark.parametrize("seed", [0, 1])
def test_segment_sample_guarantees_row_by_row(width, seed):
    ptr, values, segment, take = random_segments(seed, width)
    torch.manual_seed(seed)
    first = segment_sample(ptr, values, segment, take, width, shuffle=False)
    drawn = segment_sample(ptr, values, segment, take, width, shuffle=True)
    assert first.shape == drawn.shape == (len(segment), width)
    for b, s in enumerate(segment.tolist()):
        own = values[ptr[s] : ptr[s + 1]].tolist()
        count = min(int(take[b]), len(own), width)
        assert first[b].tolist() == own[:count] + [0] * (width - count)  # the first entries, in order
        picked = drawn[b, :count].tolist()
        assert set(picked) <= set(own) and len(set(picked)) == count  # distinct entries of the segment
        assert drawn[b, count:].eq(0).all()


def test_segment_sample_draws_uniformly():
    ptr = torch.tensor([0, 3, 3, 7])
    values = torch.tensor([5, 6, 7, 10, 11, 12, 13])
    torch.manual_seed(0)
    draws = segment_sample(ptr, values, torch.tensor([2] * 200), torch.tensor([2] * 200), 3, shuffle=True)
    assert (draws[:, 2] == 0).all() and (draws[:, 0] != draws[:, 1]).all()
    assert set(draws[:, :2].flatten().tolist()) == {10, 11, 12, 13}
    # a segment longer than 4 x width: distinct entries, uniform over all of it
    ptr, values = torch.tensor([0, 100]), torch.arange(1, 101)
    draws = segment_sample(ptr, values, torch.zeros(3000, dtype=torch.long), torch.full((3000,), 5), 5, shuffle=True)
    assert all(len(set(row)) == 5 for row in draws.tolist())
    counts = torch.bincount(draws.flatten(), minlength=101)[1:].float()
    assert counts.min() > 0.6 * counts.mean() and counts.max() < 1.4 * counts.mean()


def test_segment_sample_of_no_values_is_padding():
    out = segment_sample(torch.zeros(3, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.tensor([0, 1]), torch.tensor([3, 3]), 4, True)
    assert out.tolist() == [[0] * 4] * 2


def block(dim: int = 8, max_len: int = 6) -> SelfAttentionPool:
    torch.manual_seed(0)
    return SelfAttentionPool(dim, max_len, dropout=0.0).eval()


def test_self_attention_is_causal():
    pool = block()
    items = torch.randn(3, 6, 8)
    mask = torch.ones(3, 6, dtype=torch.bool)
    out = pool.encode(items, mask)
    for t in range(6):
        later = items.clone()
        later[:, t + 1 :] = 10 * torch.randn(3, 5 - t, 8)
        changed = pool.encode(later, mask)
        torch.testing.assert_close(changed[:, : t + 1], out[:, : t + 1])  # position t sees items 1..t only
        if t < 5:
            assert not torch.allclose(changed[:, t + 1 :], out[:, t + 1 :])


def test_self_attention_pool_ignores_padding():
    pool = block()
    items = torch.randn(3, 6, 8)
    mask = torch.tensor([[1, 1, 0, 1, 0, 0], [0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    noisy = torch.where(mask.unsqueeze(-1), items, 100 * torch.randn(3, 6, 8))
    pooled = pool(items, mask)
    torch.testing.assert_close(pool(noisy, mask), pooled)
    encoded = pool.encode(items, mask)
    torch.testing.assert_close(pooled[0], encoded[0, [0, 1, 3]].mean(0))  # the mean over the real positions
    assert torch.isfinite(encoded).all() and (pooled[2] == 0).all()  # no item: zero, no NaN
