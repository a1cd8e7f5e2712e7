"""Search units over long histories: every layer against a naive computation on tiny data."""

from __future__ import annotations

import math

import pytest
import torch

from recforge.nn import longseq
from recforge.nn.longseq import (
    MultiHeadSearch,
    MultiModalProductQuantizedKeys,
    ProductQuantizedKeys,
    SimHash,
    adc_scores,
    exact_dot,
    fast_scan_scores,
    gather_events,
    pack_codes,
    quantize_table,
    rerank,
    shortlist,
    target_scores,
    top_k,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def ragged_mask(b: int, length: int, seed: int = 0) -> torch.Tensor:
    """Right-aligned histories of random lengths: one empty row, one full, others in between."""
    lengths = torch.randint(0, length + 1, (b,), generator=generator(seed))
    lengths[0], lengths[1] = 0, length
    return torch.arange(length).flip(0).unsqueeze(0) < lengths.unsqueeze(1)


def brute_force_top(scores: torch.Tensor, mask: torch.Tensor, k: int) -> list[list[int]]:
    """Per row: the positions of the k best real scores, ascending (ties to the earlier position)."""
    rows = []
    for row, real in zip(scores.tolist(), mask.tolist()):
        ranked = sorted((i for i in range(len(row)) if real[i]), key=lambda i: (-row[i], i))
        rows.append(sorted(ranked[:k]))
    return rows


def as_lists(indices: torch.Tensor, valid: torch.Tensor) -> list[list[int]]:
    return [[i for i, ok in zip(row, oks) if ok] for row, oks in zip(indices.tolist(), valid.tolist())]


def check_layout(indices: torch.Tensor, valid: torch.Tensor) -> None:
    """History order, then empties (index 0, invalid)."""
    for row, oks in zip(indices.tolist(), valid.tolist()):
        count = sum(oks)
        assert oks == [True] * count + [False] * (len(oks) - count)
        assert row[:count] == sorted(row[:count]) and all(i == 0 for i in row[count:])


# --- exact GSU -------------------------------------------------------------------------------


def test_top_k_equals_brute_force_sort_and_never_picks_pads():
    scores, mask = torch.randn(6, 40, generator=generator()), ragged_mask(6, 40)
    indices, valid = top_k(scores, mask, 8)
    assert indices.shape == valid.shape == (6, 8)
    assert as_lists(indices, valid) == brute_force_top(scores, mask, 8)
    check_layout(indices, valid)
    short, ok = top_k(scores[:, :5], mask[:, :5], 8)  # K > L: padded with empties
    assert short.shape == (6, 8) and as_lists(short, ok) == brute_force_top(scores[:, :5], mask[:, :5], 8)


def test_target_scores_are_dot_products_with_pads_at_minus_infinity():
    target, keys, mask = torch.randn(3, 8), torch.randn(3, 10, 8), ragged_mask(3, 10)
    scores = target_scores(target, keys, mask)
    torch.testing.assert_close(scores[mask], torch.einsum("bd,bld->bl", target, keys)[mask])
    assert torch.isneginf(scores[~mask]).all()


def test_gather_events_takes_rows_of_any_trailing_shape():
    values, indices = torch.randn(3, 9, 2, 5), torch.randint(9, (3, 4, 6))
    out = gather_events(values, indices)
    assert out.shape == (3, 4, 6, 2, 5)
    for b in range(3):
        torch.testing.assert_close(out[b], values[b][indices[b]])
    assert gather_events(values[..., 0, 0], indices).shape == (3, 4, 6)


def test_multi_head_scores_equal_a_naive_per_head_loop():
    torch.manual_seed(0)
    search = MultiHeadSearch(8, heads=3, top_k=4, head_dim=5)
    target, history, mask = torch.randn(4, 8), torch.randn(4, 12, 8), ragged_mask(4, 12)
    scores = search.scores(target, history, mask)
    assert scores.shape == (4, 3, 12)
    wq, wk = search.query.weight.view(3, 5, 8), search.key.weight.view(3, 5, 8)
    for h in range(3):
        naive = torch.einsum("be,ble->bl", target @ wq[h].T, history @ wk[h].T)
        torch.testing.assert_close(scores[:, h][mask], naive[mask])
    assert torch.isneginf(scores.transpose(1, 2)[~mask]).all()
    indices, valid = search.select(target, history, mask)
    for h in range(3):
        assert as_lists(indices[:, h], valid[:, h]) == brute_force_top(scores[:, h], mask, 4)


def naive_esu(search: MultiHeadSearch, target: torch.Tensor, events: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Loops over rows and heads; ``events`` [B, H, K, D], ``valid`` [B, H, K]."""
    h, d = search.heads, search.head_dim
    wq, wk, wv = (layer.weight.view(h, d, -1) for layer in (search.query, search.key, search.value))
    out = []
    for b in range(target.shape[0]):
        heads = []
        for head in range(h):
            q = wq[head] @ target[b]
            picked = events[b, head][valid[b, head]]  # [k', D]
            if len(picked) == 0:
                heads.append(torch.zeros(d))
                continue
            a = torch.softmax((picked @ wk[head].T) @ q / math.sqrt(d), 0)
            heads.append(a @ (picked @ wv[head].T))
        out.append(search.output(torch.cat(heads)))
    return torch.stack(out)


def test_esu_equals_a_naive_softmax_over_the_valid_events():
    torch.manual_seed(0)
    search = MultiHeadSearch(6, heads=2, top_k=5)  # d_h = D
    target, events = torch.randn(3, 6), torch.randn(3, 2, 5, 6)
    valid = torch.rand(3, 2, 5, generator=generator()) > 0.3
    valid[0] = False  # a row without events
    out = search.attend(target, events, valid)
    torch.testing.assert_close(out, naive_esu(search, target, events, valid))
    torch.testing.assert_close(out[0], torch.zeros(6))
    shared = search.attend(target, events[:, 0], valid[:, 0])  # [B, K, D] for every head
    torch.testing.assert_close(shared, naive_esu(search, target, events[:, :1].expand(-1, 2, -1, -1), valid[:, :1].expand(-1, 2, -1)))


def test_multi_head_search_attends_over_its_selection_and_trains_every_projection():
    torch.manual_seed(0)
    search = MultiHeadSearch(8, heads=2, top_k=3)
    target, history, mask = torch.randn(4, 8), torch.randn(4, 10, 8), ragged_mask(4, 10)
    out = search(target, history, mask)
    indices, valid = search.select(target, history, mask)
    torch.testing.assert_close(out, search.attend(target, gather_events(history, indices), valid))
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in search.parameters())


# --- SimHash -------------------------------------------------------------------------------------


def test_simhash_signatures_and_hamming_distances_equal_a_naive_bit_count():
    hasher = SimHash(12, bits=128, seed=3)
    query, history, mask = torch.randn(3, 12), torch.randn(3, 20, 12), ragged_mask(3, 20)
    q, h = hasher.signatures(query), hasher.signatures(history)
    assert q.shape == (3, 2) and h.shape == (3, 20, 2) and q.dtype == torch.int64

    def bits(x: torch.Tensor) -> list[int]:  # the naive signature: one 0/1 per hyperplane
        return [int(v > 0) for v in (x @ hasher.planes).tolist()]

    def unpack(words: torch.Tensor) -> list[int]:
        return [(w >> k) & 1 for w in words.tolist() for k in range(64)]

    assert unpack(q[1]) == bits(query[1]) and unpack(h[2, 7]) == bits(history[2, 7])
    distances = hasher.distances(q, h)
    naive = [[sum(bin((a ^ b) & (2**64 - 1)).count("1") for a, b in zip(q[i].tolist(), h[i, l].tolist())) for l in range(20)] for i in range(3)]
    assert distances.tolist() == naive
    indices, valid = hasher.select(q, h, mask, 5)
    for row in range(3):
        chosen = sorted(naive[row][i] for i in as_lists(indices, valid)[row])
        real = sorted(naive[row][i] for i in range(20) if mask[row, i])
        assert chosen == real[:5]  # the 5 smallest distances among the real events
    check_layout(indices, valid)


def test_popcount_counts_the_bits_of_negative_words():
    words = torch.tensor([0, -1, -(2**63), 0x0123456789ABCDEF, -12345])
    assert longseq.popcount(words).tolist() == [bin(w & (2**64 - 1)).count("1") for w in words.tolist()]


# --- product quantisation ------------------------------------------------------------------------


def clustered(n: int, dim: int, clusters: int = 12, seed: int = 0) -> torch.Tensor:
    g = generator(seed)
    centres = 3 * torch.randn(clusters, dim, generator=g)
    return centres[torch.randint(clusters, (n,), generator=g)] + 0.3 * torch.randn(n, dim, generator=g)


@pytest.fixture(scope="module")
def keys() -> ProductQuantizedKeys:
    return ProductQuantizedKeys(16, subspaces=8, codewords=16).fit(clustered(600, 16), iterations=10)


def test_pq_encode_decode_round_trip(keys):
    items = clustered(50, 16, seed=1)
    codes = keys.encode(items)
    assert codes.shape == (50, 8) and codes.dtype == torch.uint8
    decoded = keys.decode(codes)
    books = keys.codebooks  # [S, C, 2]
    expected = torch.cat([books[s][codes[:, s].long()] for s in range(8)], 1)
    torch.testing.assert_close(decoded, expected)
    assert torch.equal(keys.encode(decoded), codes)  # a decoded vector is its own code's
    assert keys.encode(items.view(5, 10, 16)).shape == (5, 10, 8)


def test_adc_scores_equal_dot_products_with_the_decoded_vectors(keys):
    query, history = torch.randn(4, 16), clustered(4 * 30, 16, seed=2).view(4, 30, 16)
    codes = keys.encode(history)
    scores = adc_scores(keys.lookup_table(query), codes)
    torch.testing.assert_close(scores, torch.einsum("bd,bld->bl", query, keys.decode(codes)), rtol=1e-5, atol=1e-5)


def test_multimodal_adc_equals_the_weighted_sum_of_modality_cross_terms():
    m, dim = 3, 8
    vectors = torch.stack([clustered(400, dim, seed=s) for s in range(m)], 1)  # [N, M, D]
    keys = MultiModalProductQuantizedKeys(m, dim, subspaces=4, codewords=8).fit(vectors, iterations=8)
    query_codes = keys.encode(torch.stack([clustered(5, dim, seed=10 + s) for s in range(m)], 1))  # [B, M, S]
    codes = keys.encode(torch.stack([clustered(5 * 7, dim, seed=20 + s) for s in range(m)], 1).view(5, 7, m, dim))
    q, k = keys.decode(query_codes), keys.decode(codes)  # [B, M, D], [B, L, M, D]
    for weights in (torch.tensor([0.2, 0.3, 0.5]), torch.rand(5, m, generator=generator())):
        w = weights.expand(5, m)
        naive = sum(w[:, i, None] * w[:, j, None] * torch.einsum("bd,bld->bl", q[:, i], k[:, :, j]) for i in range(m) for j in range(m))
        lut = keys.lookup_table(query_codes, weights)
        assert lut.shape == (5, m * 4, 8)
        torch.testing.assert_close(adc_scores(lut, codes.flatten(2)), naive, rtol=1e-5, atol=1e-5)
        expected = adc_scores(quantize_table(lut).float(), codes.flatten(2)).int()  # the 4-bit scan of the same slots
        assert torch.equal(fast_scan_scores(lut, pack_codes(codes.flatten(2))), expected)


def test_kmeans_codebooks_reconstruct_clustered_data_better_than_random_ones():
    items = clustered(2000, 16, seed=4)
    fitted = ProductQuantizedKeys(16, subspaces=4, codewords=16).fit(items, iterations=15)
    random = ProductQuantizedKeys(16, subspaces=4, codewords=16)
    for book in random.quantizer.slices:
        book.centroids.copy_(3 * torch.randn(book.centroids.shape, generator=generator(5)))
    error = {name: float((q.decode(q.encode(items)) - items).pow(2).mean()) for name, q in (("fitted", fitted), ("random", random))}
    assert error["fitted"] < 0.5 * error["random"]


def test_pack_codes_puts_two_codes_in_a_byte_and_pads_to_whole_chunks():
    codes = torch.randint(16, (4, 3, 20), generator=generator(), dtype=torch.uint8)
    packed = pack_codes(codes)
    assert packed.shape == (4, 3, 16) and packed.dtype == torch.uint8  # 20 sub-spaces -> 32 slots -> 16 bytes
    assert torch.equal(packed[..., :10] & 15, codes[..., 0::2]) and torch.equal(packed[..., :10] >> 4, codes[..., 1::2])
    assert (packed[..., 10:] == 0).all()
    with pytest.raises(ValueError, match="4-bit"):
        pack_codes(torch.tensor([[16]]))


def test_quantized_table_keeps_scores_within_its_rounding_bound(keys):
    query, codes = torch.randn(3, 16), keys.encode(clustered(3 * 40, 16, seed=6).view(3, 40, 16))
    lut = keys.lookup_table(query)
    table = quantize_table(lut)
    scale = 255 / (lut - lut.amin(-1, keepdim=True)).amax(dim=(1, 2), keepdim=True)  # [B, 1, 1]
    exact = (adc_scores(lut, codes) - lut.amin(-1).sum(-1, keepdim=True)) * scale[:, 0]  # in table steps
    assert ((adc_scores(table.float(), codes) - exact).abs() <= 8 * 0.5 + 1e-3).all()  # S / 2 steps
    assert torch.equal(fast_scan_scores(lut, pack_codes(codes)), adc_scores(table.float(), codes).int())


def shortlist_case(b: int, length: int, subspaces: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = generator(seed)
    lut = torch.randn(b, subspaces, 16, generator=g)
    codes = torch.randint(16, (b, length, subspaces), generator=g, dtype=torch.uint8)
    return lut, codes, ragged_mask(b, length, seed)


def test_shortlist_is_the_top_n_of_the_quantized_scores():
    lut, codes, mask = shortlist_case(5, 37, 12, seed=0)
    integer = adc_scores(quantize_table(lut).float(), codes)  # exact small integers: ties are common
    for n in (6, 50):
        indices, valid = longseq._shortlist_torch(longseq._scan_table(lut, 8), pack_codes(codes), mask, n)
        assert as_lists(indices, valid) == brute_force_top(integer, mask, n)
        check_layout(indices, valid)
    with pytest.raises(ValueError, match="at most 16 codewords"):
        shortlist(torch.randn(2, 4, 32), torch.zeros(2, 3, 8, dtype=torch.uint8), None, 2)


def test_exact_dot_is_a_dot_product():
    query, vectors = torch.randn(3, 20), torch.randn(3, 7, 20)  # 20: a partial lane group
    torch.testing.assert_close(exact_dot(query, vectors), torch.einsum("bd,bnd->bn", query, vectors))


def test_rerank_returns_the_exact_top_k_of_the_short_list():
    g = generator(1)
    query, vectors = torch.randn(4, 24, generator=g), torch.randn(4, 30, 24, generator=g)
    candidates = torch.stack([torch.randperm(30, generator=g)[:12].sort().values for _ in range(4)])
    valid = torch.rand(4, 12, generator=g) > 0.2
    valid[0, 3:] = False  # fewer valid candidates than k
    indices, ok = longseq._rerank_torch(query, vectors, candidates, valid, 5)
    exact = torch.einsum("bd,bnd->bn", query.double(), gather_events(vectors, candidates).double())
    expected = []
    for b in range(4):
        best = sorted((j for j in range(12) if valid[b, j]), key=lambda j: -exact[b, j].item())[:5]
        expected.append(sorted(candidates[b, j].item() for j in best))
    assert as_lists(indices, ok) == expected
    check_layout(indices, ok)


# --- the compiled kernel -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kernel():
    compiled = longseq._kernel()
    if compiled is None:
        pytest.skip("the PQ scan kernel could not be built here")
    return compiled


@pytest.mark.parametrize("subspaces, length, dim", [(16, 203, 64), (32, 64, 20), (48, 45, 48), (64, 19, 16), (80, 33, 80)])
def test_compiled_paths_equal_the_torch_paths(kernel, subspaces, length, dim):
    lut, codes, mask = shortlist_case(6, length, subspaces, seed=subspaces)
    packed = pack_codes(codes)
    table = longseq._scan_table(lut, packed.shape[-1])
    g = generator(2)
    query, vectors = torch.randn(6, dim, generator=g), torch.randn(6, length, dim, generator=g)
    vectors[:, :4] = vectors[:, 4:8]  # equal scores: ties go to the earlier candidate
    reference = longseq._fast_scan_torch(table, packed)
    for simd in (True, False):
        assert torch.equal(longseq._fast_scan_compiled(kernel, lut, packed, simd), reference)
        for n in (1, 9, length + 3):
            for m in (mask, None):
                expected = longseq._shortlist_torch(table, packed, m, n)
                got = longseq._shortlist_compiled(kernel, lut, packed, m, n, simd)
                assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
            candidates, valid = expected
            for k in (1, 4, n + 2):
                expected_top = longseq._rerank_torch(query, vectors, candidates, valid, k)
                got_top = longseq._rerank_compiled(kernel, query, vectors, candidates, valid, k, simd)
                assert torch.equal(got_top[0], expected_top[0]) and torch.equal(got_top[1], expected_top[1])


def test_compiled_table_rounds_halves_to_even_like_torch(kernel):
    # integer tables spanning 510: scale 0.5, so odd entries land on exact halves; 8 codewords
    lut = torch.randint(0, 511, (4, 6, 8), generator=generator(7)).float()
    lut[:, 0, 0], lut[:, 0, 1] = 0.0, 510.0
    codes = torch.randint(8, (4, 30, 6), generator=generator(8), dtype=torch.uint8)
    packed = pack_codes(codes)
    reference = longseq._fast_scan_torch(longseq._scan_table(lut, packed.shape[-1]), packed)
    assert torch.equal(reference, adc_scores(quantize_table(lut).float(), codes).int())
    for simd in (True, False):
        assert torch.equal(longseq._fast_scan_compiled(kernel, lut, packed, simd), reference)


def test_compiled_paths_split_rows_over_threads(kernel):
    lut, codes, mask = shortlist_case(9, 300, 32, seed=3)
    packed, threads = pack_codes(codes), torch.get_num_threads()
    query, vectors = torch.randn(9, 32, generator=generator()), torch.randn(9, 300, 32, generator=generator(1))

    def search() -> tuple[torch.Tensor, torch.Tensor]:
        return rerank(query, vectors, *shortlist(lut, packed, mask, 20), 5)

    one = search()
    torch.set_num_threads(3)
    try:
        assert all(torch.equal(a, b) for a, b in zip(search(), one))
    finally:
        torch.set_num_threads(threads)


def test_kernel_builds_into_the_cache_and_falls_back_with_a_warning(monkeypatch, tmp_path):
    lut, codes, mask = shortlist_case(3, 50, 16, seed=4)
    packed = pack_codes(codes)
    expected = longseq._shortlist_torch(longseq._scan_table(lut, 8), packed, mask, 7)
    monkeypatch.setenv("RECFORGE_CACHE", str(tmp_path))
    longseq._kernel.cache_clear()
    try:
        if longseq._kernel() is not None:  # a fresh build, loaded from the cache folder
            assert len(list((tmp_path / "kernels").glob("pq_kernel-*.so"))) == 1
        monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
        longseq._kernel.cache_clear()
        with pytest.warns(RuntimeWarning, match="pure-torch path"):
            got = shortlist(lut, packed, mask, 7)
        assert all(torch.equal(a, b) for a, b in zip(got, expected))
    finally:
        longseq._kernel.cache_clear()
