// Scan kernels of recforge.nn.longseq: a plain C ABI loaded with ctypes, built with g++ -O3
// -ffp-contract=off and no torch headers. AVX-512 paths are chosen at run time; the scalar paths
// give the same results, and both match the torch path of longseq.py bit for bit: ADC scores are
// sums of uint8 table entries (exact integers), the re-rank dot product follows one fixed order
// (exact_dot), and every selection is the unique top n under "larger key first, ties to the
// earlier position".

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <cmath>
#include <functional>
#include <limits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#define RECFORGE_X86 1
#define RECFORGE_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vbmi,popcnt")))
#endif

namespace {

constexpr int kCodewords = 16;  // 4-bit codes
constexpr int64_t kPrefetch = 8;  // re-rank: rows fetched this many candidates ahead

int64_t padded16(int64_t n) { return (n + 15) / 16 * 16; }

// ---- ADC over 4-bit codes, two per byte (low nibble: sub-space 2p, high nibble: 2p + 1) ------
// lut: [2P, 16] uint8 of one query; codes: [L, P]; scores: [L]

void adc_scalar(const uint8_t* lut, const uint8_t* codes, int64_t length, int64_t width, int32_t* scores) {
  for (int64_t l = 0; l < length; ++l) {
    const uint8_t* code = codes + l * width;
    int32_t sum = 0;
    for (int64_t p = 0; p < width; ++p) {
      sum += lut[(2 * p) * kCodewords + (code[p] & 15)] + lut[(2 * p + 1) * kCodewords + (code[p] >> 4)];
    }
    scores[l] = sum;
  }
}

// ---- the quantised table (longseq.quantize_table, padded to [2P, 16]) ------------------------
// q = clamp(round((lut - min_c lut[s]) * (255 / max(span, FLT_MIN))), 0, 255), span the widest
// sub-space range; the same IEEE float operations as the torch path, rounding half to even.

void quantize_table(const float* lut, int64_t subspaces, int64_t codewords, int64_t width, uint8_t* table) {
  std::vector<float> shifted(subspaces * codewords);
  float span = 0.0f;
  for (int64_t s = 0; s < subspaces; ++s) {
    float low = lut[s * codewords];
    for (int64_t c = 1; c < codewords; ++c) low = std::min(low, lut[s * codewords + c]);
    for (int64_t c = 0; c < codewords; ++c) {
      shifted[s * codewords + c] = lut[s * codewords + c] - low;
      span = std::max(span, shifted[s * codewords + c]);
    }
  }
  const float scale = 255.0f / std::max(span, std::numeric_limits<float>::min());
  std::fill(table, table + 2 * width * kCodewords, 0);
  for (int64_t s = 0; s < subspaces; ++s)
    for (int64_t c = 0; c < codewords; ++c) {
      const float step = std::nearbyint(shifted[s * codewords + c] * scale);
      table[s * kCodewords + c] = static_cast<uint8_t>(std::min(255.0f, std::max(0.0f, step)));
    }
}

// ---- selection: positions of the n largest uint32 keys, key 0 = excluded ---------------------
// Writes the chosen positions ascending to out and returns how many (min(n, #keys > 0)).

uint64_t unique_key(uint32_t key, int64_t position) {  // ties go to the earlier position
  return (static_cast<uint64_t>(key) << 32) | (0xFFFFFFFFu - static_cast<uint32_t>(position));
}

int64_t select_scalar(const uint32_t* keys, int64_t length, int64_t n, int64_t* out, std::vector<uint64_t>& scratch) {
  scratch.clear();
  for (int64_t l = 0; l < length; ++l)
    if (keys[l]) scratch.push_back(unique_key(keys[l], l));
  int64_t taken = 0;
  if (static_cast<int64_t>(scratch.size()) <= n) {
    for (int64_t l = 0; l < length; ++l)
      if (keys[l]) out[taken++] = l;
    return taken;
  }
  std::nth_element(scratch.begin(), scratch.begin() + (n - 1), scratch.end(), std::greater<uint64_t>());
  const uint64_t threshold = scratch[n - 1];
  for (int64_t l = 0; l < length; ++l)
    if (keys[l] && unique_key(keys[l], l) >= threshold) out[taken++] = l;
  return taken;
}

#ifdef RECFORGE_X86
// keys are padded with zeros to whole vectors of 16.

RECFORGE_AVX512 int64_t count_at_least(const uint32_t* keys, int64_t vectors, uint32_t t) {
  const __m512i threshold = _mm512_set1_epi32(static_cast<int>(t)), one = _mm512_set1_epi32(1);
  __m512i counts = _mm512_setzero_si512();
  for (int64_t v = 0; v < vectors; ++v) {
    const __mmask16 m = _mm512_cmpge_epu32_mask(_mm512_loadu_si512(keys + 16 * v), threshold);
    counts = _mm512_mask_add_epi32(counts, m, counts, one);
  }
  return _mm512_reduce_add_epi32(counts);
}

// The largest t with at least k keys >= t (0 when fewer than k keys are >= 1), by bisection on bits.
RECFORGE_AVX512 uint32_t kth_key(const uint32_t* keys, int64_t vectors, int64_t k, uint32_t max_key) {
  uint32_t t = 0;
  for (int bit = 31 - __builtin_clz(max_key | 1); bit >= 0; --bit) {
    const uint32_t candidate = t | (1u << bit);
    if (count_at_least(keys, vectors, candidate) >= k) t = candidate;
  }
  return t;
}

// Keys >= t and their positions, in order, into out_keys / out_positions (room for 16 more).
RECFORGE_AVX512 int64_t keep_at_least(const uint32_t* keys, int64_t vectors, uint32_t t, uint32_t* out_keys,
                                      uint32_t* out_positions) {
  const __m512i threshold = _mm512_set1_epi32(static_cast<int>(t)), step = _mm512_set1_epi32(16);
  __m512i position = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int64_t count = 0;
  for (int64_t v = 0; v < vectors; ++v, position = _mm512_add_epi32(position, step)) {
    const __m512i key = _mm512_loadu_si512(keys + 16 * v);
    const __mmask16 m = _mm512_cmpge_epu32_mask(key, threshold);
    _mm512_storeu_si512(out_keys + count, _mm512_maskz_compress_epi32(m, key));
    _mm512_storeu_si512(out_positions + count, _mm512_maskz_compress_epi32(m, position));
    count += _mm_popcnt_u32(m);
  }
  return count;
}

// select_scalar's result. Groups of span consecutive vectors give, per lane, a group maximum; the
// n-th largest group maximum bounds the n-th largest key from below (n groups each hold a key at
// least that large), so only the keys above it are ranked exactly.
RECFORGE_AVX512 int64_t select_avx512(const uint32_t* keys, int64_t length, int64_t n, int64_t* out,
                                      std::vector<uint32_t>& buffer) {
  const int64_t vectors = padded16(length) / 16;
  buffer.resize(3 * padded16(length) + 32);
  uint32_t* group_max = buffer.data();
  uint32_t* kept_keys = group_max + padded16(length);
  uint32_t* kept_positions = kept_keys + padded16(length) + 16;
  const int64_t span = std::max<int64_t>(1, vectors * 16 / (4 * n));  // about 4n groups
  __m512i largest = _mm512_setzero_si512();
  int64_t groups = 0;
  for (int64_t v = 0; v < vectors; v += span, ++groups) {
    __m512i m = _mm512_setzero_si512();
    for (int64_t w = v; w < std::min(v + span, vectors); ++w) m = _mm512_max_epu32(m, _mm512_loadu_si512(keys + 16 * w));
    _mm512_storeu_si512(group_max + 16 * groups, m);
    largest = _mm512_max_epu32(largest, m);
  }
  const uint32_t max_key = static_cast<uint32_t>(_mm512_reduce_max_epu32(largest));
  const uint32_t floor = span >= 2 ? std::max(1u, kth_key(group_max, groups, n, max_key)) : 1u;
  const int64_t kept = keep_at_least(keys, vectors, floor, kept_keys, kept_positions);
  int64_t taken = 0;
  if (kept <= n) {
    for (int64_t i = 0; i < kept; ++i) out[taken++] = kept_positions[i];
    return taken;
  }
  std::fill(kept_keys + kept, kept_keys + padded16(kept), 0u);
  const int64_t kept_vectors = padded16(kept) / 16;
  const uint32_t nth = kth_key(kept_keys, kept_vectors, n, max_key);
  int64_t ties = n - (nth == 0xFFFFFFFFu ? 0 : count_at_least(kept_keys, kept_vectors, nth + 1));
  for (int64_t i = 0; i < kept; ++i) {
    const uint32_t key = kept_keys[i];
    if (key > nth || (key == nth && ties-- > 0)) out[taken++] = kept_positions[i];
  }
  return taken;
}

// 8 items per step. Each 8-byte chunk of a code (16 sub-spaces) is looked up with two 128-entry
// byte permutes (index = position in the chunk << 4 | nibble) and summed by SAD into 64-bit lanes.
// Chunks is m = P / 8 when fixed at compile time (1, 2, 3, 4, 8), else 0 (any m <= 8). A block of 8
// codes is loaded as m vectors and cut into chunks (chunk c, lane k = qword m k + c) by permutes.
template <int Chunks>
RECFORGE_AVX512 void adc_avx512(const uint8_t* lut, const uint8_t* codes, int64_t length, int64_t width,
                                int32_t* scores) {
  const int64_t chunks = Chunks ? Chunks : width / 8;
  alignas(64) uint8_t tables[8 * 256];  // per chunk: 128 bytes for low nibbles, 128 for high
  for (int64_t c = 0; c < chunks; ++c) {
    for (int j = 0; j < 8; ++j) {
      std::memcpy(tables + c * 256 + j * 16, lut + (2 * (8 * c + j)) * kCodewords, 16);
      std::memcpy(tables + c * 256 + 128 + j * 16, lut + (2 * (8 * c + j) + 1) * kCodewords, 16);
    }
  }
  alignas(64) uint8_t position_bytes[64];
  for (int j = 0; j < 64; ++j) position_bytes[j] = static_cast<uint8_t>((j & 7) << 4);
  alignas(64) int64_t lanes[8][8];
  __mmask8 from[8][8] = {};  // from[c][r]: the lanes of chunk c held by loaded vector r
  for (int64_t c = 0; c < chunks; ++c) {
    for (int64_t k = 0; k < 8; ++k) {
      lanes[c][k] = (chunks * k + c) % 8;
      from[c][(chunks * k + c) / 8] |= static_cast<__mmask8>(1u << k);
    }
  }
  const __m512i position = _mm512_load_si512(position_bytes);
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  const __m512i zero = _mm512_setzero_si512();
  const __m512i even = _mm512_set_epi64(14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i odd = _mm512_set_epi64(15, 13, 11, 9, 7, 5, 3, 1);
  int64_t l = 0;
  for (; l + 8 <= length; l += 8) {
    const uint8_t* block = codes + l * width;
    __m512i loaded[8], x[8];
    if (Chunks == 1) x[0] = _mm512_loadu_si512(block);
    if (Chunks == 2) {
      const __m512i a = _mm512_loadu_si512(block), b = _mm512_loadu_si512(block + 64);
      x[0] = _mm512_permutex2var_epi64(a, even, b);
      x[1] = _mm512_permutex2var_epi64(a, odd, b);
    }
    if (Chunks == 0 || Chunks > 2) {
      for (int64_t r = 0; r < chunks; ++r) loaded[r] = _mm512_loadu_si512(block + 64 * r);
      for (int64_t c = 0; c < chunks; ++c) {
        const __m512i index = _mm512_load_si512(lanes[c]);
        x[c] = zero;
        for (int64_t r = 0; r < chunks; ++r)
          if (from[c][r]) x[c] = _mm512_mask_permutexvar_epi64(x[c], from[c][r], index, loaded[r]);
      }
    }
    __m512i acc = zero;
    for (int64_t c = 0; c < chunks; ++c) {
      const __m512i low = _mm512_or_si512(_mm512_and_si512(x[c], nibble), position);
      const __m512i high = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(x[c], 4), nibble), position);
      const uint8_t* t = tables + c * 256;
      const __m512i vlow = _mm512_permutex2var_epi8(_mm512_load_si512(t), low, _mm512_load_si512(t + 64));
      const __m512i vhigh = _mm512_permutex2var_epi8(_mm512_load_si512(t + 128), high, _mm512_load_si512(t + 192));
      acc = _mm512_add_epi64(acc, _mm512_add_epi64(_mm512_sad_epu8(vlow, zero), _mm512_sad_epu8(vhigh, zero)));
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(scores + l), _mm512_cvtepi64_epi32(acc));
  }
  adc_scalar(lut, codes + l * width, length - l, width, scores + l);
}

bool has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vbmi") &&
         __builtin_cpu_supports("popcnt");
}
#else
bool has_avx512() { return false; }
#endif

void adc(const uint8_t* lut, const uint8_t* codes, int64_t length, int64_t width, int32_t* scores, bool simd) {
#ifdef RECFORGE_X86
  if (simd && width % 8 == 0 && width <= 64) {
    if (width == 8) return adc_avx512<1>(lut, codes, length, width, scores);
    if (width == 16) return adc_avx512<2>(lut, codes, length, width, scores);
    if (width == 24) return adc_avx512<3>(lut, codes, length, width, scores);
    if (width == 32) return adc_avx512<4>(lut, codes, length, width, scores);
    if (width == 64) return adc_avx512<8>(lut, codes, length, width, scores);
    return adc_avx512<0>(lut, codes, length, width, scores);
  }
#endif
  adc_scalar(lut, codes, length, width, scores);
}

// keys[l] = scores[l] + 1 for real events, 0 for pads.
void make_keys_scalar(const int32_t* scores, const uint8_t* mask, int64_t length, uint32_t* keys) {
  for (int64_t l = 0; l < length; ++l) keys[l] = static_cast<uint32_t>(scores[l]) + 1;
  if (mask)
    for (int64_t l = 0; l < length; ++l) keys[l] &= -static_cast<uint32_t>(mask[l] != 0);
}

#ifdef RECFORGE_X86
RECFORGE_AVX512 void make_keys_avx512(const int32_t* scores, const uint8_t* mask, int64_t length, uint32_t* keys) {
  const __m512i one = _mm512_set1_epi32(1);
  int64_t l = 0;
  for (; l + 16 <= length; l += 16) {
    const __m512i flags = mask ? _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mask + l))) : one;
    const __mmask16 real = _mm512_test_epi32_mask(flags, flags);
    _mm512_storeu_si512(keys + l, _mm512_maskz_add_epi32(real, _mm512_loadu_si512(scores + l), one));
  }
  make_keys_scalar(scores + l, mask ? mask + l : nullptr, length - l, keys + l);
}
#endif

void make_keys(const int32_t* scores, const uint8_t* mask, int64_t length, uint32_t* keys, bool simd) {
#ifdef RECFORGE_X86
  if (simd) return make_keys_avx512(scores, mask, length, keys);
#endif
  make_keys_scalar(scores, mask, length, keys);
}

int64_t select(const uint32_t* keys, int64_t length, int64_t n, int64_t* out, bool simd,
               std::vector<uint64_t>& scratch, std::vector<uint32_t>& buffer) {
#ifdef RECFORGE_X86
  if (simd) return select_avx512(keys, length, n, out, buffer);
#endif
  (void)buffer;
  return select_scalar(keys, length, n, out, scratch);
}

// ---- exact dot product in one fixed order ----------------------------------------------------
// 16 lanes, lane i summing x[16c + i] * y[16c + i] over c in order (zeros past dim), then the
// halves added pairwise: 16 -> 8 -> 4 -> 2 -> 1. Every product and sum is rounded on its own.

float exact_dot_scalar(const float* x, const float* y, int64_t dim) {
  float lanes[16];
  for (int i = 0; i < 16; ++i) lanes[i] = i < dim ? x[i] * y[i] : 0.0f;
  for (int64_t c = 16; c < dim; c += 16)
    for (int i = 0; i < 16; ++i) lanes[i] = lanes[i] + (c + i < dim ? x[c + i] * y[c + i] : 0.0f);
  for (int width = 8; width >= 1; width /= 2)
    for (int i = 0; i < width; ++i) lanes[i] = lanes[i] + lanes[i + width];
  return lanes[0];
}

#ifdef RECFORGE_X86
RECFORGE_AVX512 inline float exact_dot_avx512(const float* x, const float* y, int64_t dim) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t c = 0; c < dim; c += 16) {
    const __mmask16 m = dim - c >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (dim - c)) - 1);
    const __m512 p = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + c), _mm512_maskz_loadu_ps(m, y + c));
    acc = c == 0 ? p : _mm512_add_ps(acc, p);
  }
  const __m256 eight = _mm256_add_ps(_mm512_castps512_ps256(acc), _mm512_extractf32x8_ps(acc, 1));
  const __m128 four = _mm_add_ps(_mm256_castps256_ps128(eight), _mm256_extractf128_ps(eight, 1));
  const __m128 two = _mm_add_ps(four, _mm_movehl_ps(four, four));
  return _mm_cvtss_f32(_mm_add_ss(two, _mm_shuffle_ps(two, two, 1)));
}
#endif

// Order-preserving bits of a score (larger = better), -0 as +0.
uint32_t score_key(float score) {
  if (score == 0.0f) score = 0.0f;
  uint32_t bits;
  std::memcpy(&bits, &score, 4);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

void prefetch_row(const float* row, int64_t dim) {
  const char* bytes = reinterpret_cast<const char*>(row);
  for (int64_t byte = 0; byte < dim * 4; byte += 64) __builtin_prefetch(bytes + byte);
}

// keys[j]: score_key of candidate j's exact dot product, 0 where it is not valid.
void score_candidates_scalar(const float* q, const float* rows, const int64_t* candidates, const uint8_t* valid,
                             int64_t n, int64_t dim, uint32_t* keys) {
  for (int64_t j = 0; j < n; ++j) {
    if (j + kPrefetch < n) prefetch_row(rows + candidates[j + kPrefetch] * dim, dim);
    keys[j] = valid[j] ? score_key(exact_dot_scalar(q, rows + candidates[j] * dim, dim)) : 0u;
  }
}

#ifdef RECFORGE_X86
RECFORGE_AVX512 void score_candidates_avx512(const float* q, const float* rows, const int64_t* candidates,
                                             const uint8_t* valid, int64_t n, int64_t dim, uint32_t* keys) {
  for (int64_t j = 0; j < n; ++j) {
    if (j + kPrefetch < n) prefetch_row(rows + candidates[j + kPrefetch] * dim, dim);
    keys[j] = valid[j] ? score_key(exact_dot_avx512(q, rows + candidates[j] * dim, dim)) : 0u;
  }
}
#endif

}  // namespace

extern "C" {

int recforge_simd() { return has_avx512() ? 1 : 0; }

// Short list of users [first, last): the n best positions by the ADC score of the quantised table
// (pads excluded, ties to the earlier position), ascending, then empties (position 0, invalid).
// lut [B, S, C] float (C <= 16, S <= 2P), codes [B, L, P] uint8, mask [B, L] uint8 or null,
// out [B, n], valid [B, n].
void recforge_adc_shortlist(const float* lut, int64_t subspaces, int64_t codewords, const uint8_t* codes,
                            const uint8_t* mask, int64_t first, int64_t last, int64_t length, int64_t width, int64_t n,
                            int simd, int64_t* out, uint8_t* valid) {
  const bool fast = simd && has_avx512();
  std::vector<uint8_t> table(2 * width * kCodewords);
  std::vector<int32_t> scores(padded16(length));
  std::vector<uint32_t> keys(padded16(length), 0u), buffer;
  std::vector<uint64_t> scratch;
  for (int64_t b = first; b < last; ++b) {
    quantize_table(lut + b * subspaces * codewords, subspaces, codewords, width, table.data());
    adc(table.data(), codes + b * length * width, length, width, scores.data(), fast);
    make_keys(scores.data(), mask ? mask + b * length : nullptr, length, keys.data(), fast);
    const int64_t taken = select(keys.data(), length, n, out + b * n, fast, scratch, buffer);
    for (int64_t i = 0; i < n; ++i) valid[b * n + i] = i < taken;
    std::fill(out + b * n + taken, out + (b + 1) * n, 0);
  }
}

// The integer ADC scores themselves, users [first, last): scores [B, L] int32.
void recforge_adc_scores(const float* lut, int64_t subspaces, int64_t codewords, const uint8_t* codes, int64_t first,
                         int64_t last, int64_t length, int64_t width, int simd, int32_t* scores) {
  const bool fast = simd && has_avx512();
  std::vector<uint8_t> table(2 * width * kCodewords);
  for (int64_t b = first; b < last; ++b) {
    quantize_table(lut + b * subspaces * codewords, subspaces, codewords, width, table.data());
    adc(table.data(), codes + b * length * width, length, width, scores + b * length, fast);
  }
}

// Exact re-rank, users [first, last): of the candidates [B, N] (positions into vectors [B, L, D],
// valid [B, N]) the k with the largest exact_dot(query, vector), ties to the earlier candidate,
// in candidate order, then empties (position 0, invalid). out [B, k], out_valid [B, k].
void recforge_rerank(const float* query, const float* vectors, const int64_t* candidates, const uint8_t* valid,
                     int64_t first, int64_t last, int64_t length, int64_t dim, int64_t n, int64_t k, int simd,
                     int64_t* out, uint8_t* out_valid) {
  const bool fast = simd && has_avx512();
  std::vector<uint32_t> keys(padded16(n), 0u), buffer;
  std::vector<uint64_t> scratch;
  std::vector<int64_t> chosen(k);
  for (int64_t b = first; b < last; ++b) {
    const float* q = query + b * dim;
    const float* rows = vectors + b * length * dim;
    const int64_t* cand = candidates + b * n;
#ifdef RECFORGE_X86
    if (fast) score_candidates_avx512(q, rows, cand, valid + b * n, n, dim, keys.data());
    else score_candidates_scalar(q, rows, cand, valid + b * n, n, dim, keys.data());
#else
    score_candidates_scalar(q, rows, cand, valid + b * n, n, dim, keys.data());
#endif
    const int64_t taken = select(keys.data(), n, k, chosen.data(), fast, scratch, buffer);
    for (int64_t i = 0; i < k; ++i) {
      out[b * k + i] = i < taken ? cand[chosen[i]] : 0;
      out_valid[b * k + i] = i < taken;
    }
  }
}

}  // extern "C"
