"""Quantizers: encode -> codes -> decode round trips, k-means against planted clusters and brute force."""

from __future__ import annotations

import pytest
import torch

from recforge.nn.quantization import (
    KMeansCodebook,
    ProductQuantizer,
    ResidualQuantizer,
    codebook_usage,
    collision_rate,
    kmeans,
    nearest,
    nearest_codes,
)


def clustered(n: int = 2000, k: int = 8, dim: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` points around ``k`` well-separated centres: (points, centres, the centre of each point)."""
    generator = torch.Generator().manual_seed(seed)
    centres = 10 * torch.randn(k, dim, generator=generator)
    labels = torch.randint(k, (n,), generator=generator)
    return centres[labels] + 0.1 * torch.randn(n, dim, generator=generator), centres, labels


def hierarchical(n: int = 3000, size: int = 4, dim: int = 16, seed: int = 0) -> torch.Tensor:
    """Sums of one vector per level from three planted codebooks of shrinking scale (10, 1, 0.1)."""
    generator = torch.Generator().manual_seed(seed)
    books = [scale * torch.randn(size, dim, generator=generator) for scale in (10.0, 1.0, 0.1)]
    return sum(book[torch.randint(size, (n,), generator=generator)] for book in books)


def test_product_codes_round_trip_encode_decode_encode():
    x = torch.randn(500, 16, generator=torch.Generator().manual_seed(1))
    quantizer = ProductQuantizer(4, 16, 16).fit(x)
    codes = quantizer.encode(x)
    assert codes.shape == (500, 4) and codes.dtype == torch.long
    assert torch.equal(quantizer.encode(quantizer.decode(codes)), codes)  # a decoded vector is its own code's


def test_residual_codes_round_trip_where_the_levels_are_separable():
    # greedy residual codes round-trip when each level's residuals are small against the level's
    # centroid spacing (on isotropic noise a decoded sum may re-encode differently at level 0)
    x = hierarchical()
    quantizer = ResidualQuantizer(3, 4, 16).fit(x)
    codes = quantizer.encode(x)
    assert codes.shape == (3000, 3)
    assert torch.equal(quantizer.encode(quantizer.decode(codes)), codes)
    assert collision_rate(codes) == 1.0 and len(torch.unique(codes, dim=0)) == 64  # 4 x 4 x 4 planted codes
    # what is left is the estimation error of the centroids, below the smallest level's own size (~0.4)
    assert float((x - quantizer.decode(codes)).norm(dim=1).max()) < 0.25


def test_kmeans_recovers_planted_clusters_and_assigns_like_brute_force():
    x, centres, labels = clustered()
    found = kmeans(x, 8, seed=3)
    matched = torch.cdist(centres, found).argmin(1)  # the found centroid nearest each planted centre
    assert sorted(matched.tolist()) == list(range(8))
    assert torch.cdist(centres, found).min(1).values.max() < 0.1
    new = torch.randn(300, 16, generator=torch.Generator().manual_seed(2)) * 10  # items the codebook never saw
    brute = torch.stack([((found - row) ** 2).sum(1).argmin() for row in new])
    assert torch.equal(nearest(new, found), brute)
    assert torch.equal(nearest(x, found), matched[labels])  # every point goes to its own cluster


def test_kmeans_uses_every_centroid_and_refuses_too_few_points():
    x = torch.cat([torch.zeros(95, 2), torch.ones(5, 2) * 50])  # two clumps, asked for 10 clusters
    codebook = KMeansCodebook(10, 2).fit(x)
    assert codebook_usage(codebook.encode(x)[:, None], 10).item() == pytest.approx(0.2)  # only 2 distinct points
    spread = torch.randn(200, 2, generator=torch.Generator().manual_seed(0))
    assert codebook_usage(KMeansCodebook(10, 2).fit(spread).encode(spread)[:, None], 10).item() == 1.0
    with pytest.raises(ValueError, match="k-means needs 1 <= k <= the number of points; got k=5, 3 points"):
        kmeans(torch.randn(3, 2), 5)


def test_each_residual_level_lowers_the_reconstruction_error():
    x = torch.randn(2000, 16, generator=torch.Generator().manual_seed(4))
    quantizer = ResidualQuantizer(4, 32, 16).fit(x)
    codes = quantizer.encode(x)
    errors = []
    for levels in range(1, 5):
        partial = sum(quantizer.levels[level].decode(codes[:, level]) for level in range(levels))
        errors.append(float((x - partial).pow(2).sum(1).mean()))
    assert all(later < earlier for earlier, later in zip(errors, errors[1:]))
    assert errors[-1] == pytest.approx(float((x - quantizer.decode(codes)).pow(2).sum(1).mean()))


def test_product_codes_are_the_nearest_centroid_of_each_slice():
    x = torch.randn(400, 12, generator=torch.Generator().manual_seed(5))
    quantizer = ProductQuantizer(3, 8, 12).fit(x)
    codes = quantizer.encode(x)
    for group, codebook in enumerate(quantizer.slices):
        part = x[:, 4 * group : 4 * (group + 1)]
        assert torch.equal(codes[:, group], torch.cdist(part, codebook.centroids).argmin(1))
    with pytest.raises(ValueError, match="groups=5 equal slices; 5 must divide 12"):
        ProductQuantizer(5, 8, 12)


def test_forward_passes_gradients_straight_through_and_reports_commitment():
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(6))
    quantizer = ResidualQuantizer(2, 8, 16).fit(x)
    leaf = x.clone().requires_grad_()
    quantized, codes, losses = quantizer(leaf)
    assert torch.allclose(quantized, quantizer.decode(codes), atol=1e-6)
    quantized.sum().backward()
    assert torch.equal(leaf.grad, torch.ones_like(x))  # straight-through: d quantized / d x = 1
    assert losses["commitment"].item() == pytest.approx(float((x - quantizer.decode(codes)).pow(2).mean()), rel=1e-6)


def test_codebooks_are_saved_with_the_state_dict():
    x = torch.randn(300, 8, generator=torch.Generator().manual_seed(7))
    fitted = ResidualQuantizer(2, 8, 8).fit(x)
    again = ResidualQuantizer(2, 8, 8)
    again.load_state_dict(fitted.state_dict())
    assert torch.equal(again.encode(x), fitted.encode(x))
    assert not list(fitted.parameters())  # frozen: buffers, not trainable parameters


def test_nearest_codes_are_the_top_inner_products_of_the_pool():
    generator = torch.Generator().manual_seed(8)
    x, pool = torch.randn(50, 8, generator=generator), torch.randn(200, 8, generator=generator)
    codes = nearest_codes(x, pool, 5)
    brute = torch.argsort(x @ pool.T, dim=1, descending=True)[:, :5]
    assert torch.equal(codes, brute)
    with pytest.raises(ValueError, match="got k=300, a pool of 200"):
        nearest_codes(x, pool, 300)


def test_collision_rate_counts_items_sharing_a_full_code():
    codes = torch.tensor([[0, 1], [0, 1], [0, 2], [3, 1], [3, 1], [3, 1]])
    assert collision_rate(codes) == pytest.approx(5 / 6)
    assert collision_rate(torch.tensor([[0, 1], [1, 0]])) == 0.0
    assert torch.allclose(codebook_usage(codes, 4), torch.tensor([0.5, 0.5]))
