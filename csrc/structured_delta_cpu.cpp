// CPU implementation of the structured-delta op (the math: docs/design.md):
//
//   y = x Wᵀ + b + s · drop(x) ΔWᵀ,   ΔW = (B · C · A) ⊗ K  cropped to out × in,
//
// without building ΔW. The base GEMMs go through ATen (MKL / oneDNN); the adapter is one
// parallel pass over tokens: shrink T = A·X, mix U = C·T·Kᵀ, expand y += s·B·U. Backward runs
// the same pass with the roles swapped and keeps the factor gradients as per-slice partial
// sums, reduced once at the end. Accumulation is fp32 (fp64 for fp64 inputs). LoRA-shaped calls
// (d = 1, fp32, an AVX2 CPU) run the rank-r products in low_rank_cpu.cpp's kernels instead, over
// blocks of tokens; fp64, and CPUs without AVX2, in ATen GEMMs.
//
// The trick that makes every inner loop a plain, vectorisable multiply-add over contiguous
// memory: each small factor is "expanded" once per call to one value per feature,
// e.g. Aexp[r][k] = A[r][k / d], and the period-d index k % d is handled by accumulating into
// (or reading from) a lane buffer whose length W is a multiple of d.
#include "structured_delta.h"
#include "low_rank_cpu.h"

#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include <mutex>
#include <set>
#include <thread>
#include <type_traits>
#include <vector>

namespace dcft_kernels {
namespace {

constexpr int kPhiloxLanes = 16;  // Philox counters per call: 64 consecutive elements, one uint64 of keep-bits

// The dropout stream (philox.h, dropout.py, tl.rand4x): element e is kept when the uniform of word e % 4
// of Philox-4x32-10 at counter e / 4 is >= p. Masks are made 64 elements at a time as keep-bits, bit i
// for element 4·counter + i, so applying one is a bit test and the mask of a row fits in a few words.
inline float uniform_of_word(uint32_t word) {
  int32_t v = static_cast<int32_t>(word);
  v = v < 0 ? ~v : v;
  return static_cast<float>(v) * 4.6566127342e-10f;
}

uint64_t philox_keep_bits_scalar(int64_t seed, int64_t counter, float threshold) {
  uint64_t bits = 0;
  for (int i = 0; i < kPhiloxLanes; ++i) {
    const uint64_t o = static_cast<uint64_t>(counter + i);
    uint32_t c0 = static_cast<uint32_t>(o), c1 = static_cast<uint32_t>(o >> 32), c2 = 0, c3 = 0;
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32);
    for (int round = 0; round < 10; ++round) {
      const uint64_t a = static_cast<uint64_t>(0xCD9E8D57u) * c2;
      const uint64_t b = static_cast<uint64_t>(0xD2511F53u) * c0;
      const uint32_t n0 = static_cast<uint32_t>(a >> 32) ^ c1 ^ k0;
      const uint32_t n2 = static_cast<uint32_t>(b >> 32) ^ c3 ^ k1;
      c1 = static_cast<uint32_t>(a);
      c3 = static_cast<uint32_t>(b);
      c0 = n0;
      c2 = n2;
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    const uint32_t words[4] = {c0, c1, c2, c3};
    for (int w = 0; w < 4; ++w)
      bits |= static_cast<uint64_t>(uniform_of_word(words[w]) >= threshold) << (4 * i + w);
  }
  return bits;
}

#if defined(__x86_64__)
// The same with AVX2, 8 counters per vector: compilers do not vectorise the 32×32→64-bit products
// of the scalar loop (they emit one imul each), so the high halves are built from _mm256_mul_epu32
// on the even and odd lanes; the low halves are one _mm256_mullo_epi32.
__attribute__((target("avx2"))) inline void mul_hi_lo(__m256i a, __m256i m, __m256i* hi, __m256i* lo) {
  const __m256i even = _mm256_mul_epu32(a, m);                          // lanes 0, 2, 4, 6 as 64-bit
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);     // lanes 1, 3, 5, 7
  *hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  *lo = _mm256_mullo_epi32(a, m);
}

// Bit i of b moved to bit 4·i: word w of counter i is element 4·i + w.
struct Spread4 {
  uint32_t table[256];
  constexpr Spread4() : table() {
    for (uint32_t b = 0; b < 256; ++b)
      for (int i = 0; i < 8; ++i) table[b] |= ((b >> i) & 1u) << (4 * i);
  }
};
constexpr Spread4 kSpread4;

// The keep-bits of the window at `counter`. Both groups of 8 counters go through the rounds together:
// two independent dependency chains keep the multipliers busy.
__attribute__((target("avx2"))) uint64_t philox_keep_bits_avx2(int64_t seed, int64_t counter, float threshold) {
  constexpr int kGroups = kPhiloxLanes / 8;
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m256i m2 = _mm256_set1_epi32(static_cast<int>(0xCD9E8D57u));
  const __m256i step = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  __m256i c[kGroups][4];
  for (int g = 0; g < kGroups; ++g) {
    const uint64_t first = static_cast<uint64_t>(counter + 8 * g);
    c[g][0] = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(first))), step);
    c[g][1] = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(first >> 32)));
    c[g][2] = c[g][3] = _mm256_setzero_si256();
  }
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32);
  for (int round = 0; round < 10; ++round) {
    const __m256i key0 = _mm256_set1_epi32(static_cast<int>(k0)), key1 = _mm256_set1_epi32(static_cast<int>(k1));
    for (int g = 0; g < kGroups; ++g) {
      __m256i hi_a, lo_a, hi_b, lo_b;
      mul_hi_lo(c[g][2], m2, &hi_a, &lo_a);
      mul_hi_lo(c[g][0], m0, &hi_b, &lo_b);
      c[g][0] = _mm256_xor_si256(_mm256_xor_si256(hi_a, c[g][1]), key0);
      c[g][2] = _mm256_xor_si256(_mm256_xor_si256(hi_b, c[g][3]), key1);
      c[g][1] = lo_a;
      c[g][3] = lo_b;
    }
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  const __m256 t = _mm256_set1_ps(threshold);
  const __m256 scale = _mm256_set1_ps(4.6566127342e-10f);
  uint64_t bits = 0;
  for (int g = 0; g < kGroups; ++g) {  // group g: elements 32g .. 32g + 31
    uint32_t group = 0;
    for (int w = 0; w < 4; ++w) {
      const __m256i folded = _mm256_xor_si256(c[g][w], _mm256_srai_epi32(c[g][w], 31));  // v < 0 ? ~v : v
      const __m256 u = _mm256_mul_ps(_mm256_cvtepi32_ps(folded), scale);
      group |= kSpread4.table[_mm256_movemask_ps(_mm256_cmp_ps(u, t, _CMP_GE_OQ))] << w;
    }
    bits |= static_cast<uint64_t>(group) << (32 * g);
  }
  return bits;
}

// values[k] *= keep-bit k ? keep : 0, 8 at a time (a product, not a select: NaN stays NaN, as in torch).
__attribute__((target("avx2"))) void scale_kept_avx2(const uint64_t* bits, int64_t count, float keep, float* values) {
  const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256 keep_v = _mm256_set1_ps(keep);
  int64_t e = 0;
  for (; e + 8 <= count; e += 8) {
    const int byte = static_cast<int>((bits[e >> 6] >> (e & 63)) & 0xFF);
    const __m256i set = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(byte), lane_bit), lane_bit);
    const __m256 factor = _mm256_and_ps(keep_v, _mm256_castsi256_ps(set));
    _mm256_storeu_ps(values + e, _mm256_mul_ps(_mm256_loadu_ps(values + e), factor));
  }
  for (; e < count; ++e) values[e] *= (bits[e >> 6] >> (e & 63)) & 1 ? keep : 0.0f;
}
#endif

// out[i] = the keep-bits of the window at counter + 16·i, i < n.
inline void philox_keep_windows(int64_t seed, int64_t counter, float threshold, int64_t n, uint64_t* out) {
  int64_t i = 0;
#if defined(__x86_64__)
  if (avx2_enabled()) {
    // The vector code adds to the low counter word alone: windows whose low word would wrap (past
    // 2^34 elements) take the scalar code.
    for (; i < n; ++i) {
      const uint64_t first = static_cast<uint64_t>(counter + kPhiloxLanes * i);
      if ((first & 0xFFFFFFFFu) > 0xFFFFFFFFu - kPhiloxLanes) break;
      out[i] = philox_keep_bits_avx2(seed, static_cast<int64_t>(first), threshold);
    }
  }
#endif
  for (; i < n; ++i) out[i] = philox_keep_bits_scalar(seed, counter + kPhiloxLanes * i, threshold);
}

template <typename acc_t>
void scale_kept(const uint64_t* bits, int64_t count, acc_t keep, acc_t* values) {
#if defined(__x86_64__)
  if constexpr (std::is_same_v<acc_t, float>) {
    if (avx2_enabled()) return scale_kept_avx2(bits, count, keep, values);
  }
#endif
  for (int64_t e = 0; e < count; ++e) values[e] *= (bits[e >> 6] >> (e & 63)) & 1 ? keep : acc_t(0);
}

inline int64_t keep_words(int64_t count) { return (count + 63) / 64; }

struct Dropout {
  double p = 0.0;
  int64_t seed = 0;
  bool on() const { return p > 0.0; }
  template <typename acc_t>
  acc_t keep_scale() const { return static_cast<acc_t>(1.0 / (1.0 - p)); }

  // The keep-bits of elements offset .. offset + count - 1 of the flattened input: bit e % 64 of
  // out[e / 64] for element offset + e. Element offset is bit offset % 4 of the 64-element window
  // at counter offset / 4, so each word joins two windows when offset is not a multiple of 4 (then
  // the window at a block's end is drawn again for the next block: 1 in 32).
  void keep_bits(int64_t offset, int64_t count, uint64_t* out) const {
    const float threshold = static_cast<float>(p);
    const int shift = static_cast<int>(offset & 3);
    const int64_t counter = offset >> 2, words = keep_words(count);
    const int64_t windows = (shift + count + 63) / 64;  // the windows holding the elements
    constexpr int64_t kBlock = 32;                       // words per block of windows drawn at once
    uint64_t window[kBlock + 1];
    for (int64_t j0 = 0; j0 < words; j0 += kBlock) {
      const int64_t n = std::min(kBlock, words - j0), n_windows = std::min(n + (shift ? 1 : 0), windows - j0);
      philox_keep_windows(seed, counter + kPhiloxLanes * j0, threshold, n_windows, window);
      for (int64_t j = 0; j < n; ++j) {
        uint64_t word = window[j] >> shift;
        if (shift && j + 1 < n_windows) word |= window[j + 1] << (64 - shift);
        out[j0 + j] = word;
      }
    }
  }

  // values[k] *= the scaled keep-mask of element offset + k, k < count.
  template <typename acc_t>
  void apply(int64_t offset, int64_t count, acc_t* values) const {
    constexpr int64_t kChunk = 64 * 32;  // elements per stack buffer of bits
    uint64_t bits[kChunk / 64];
    for (int64_t k = 0; k < count; k += kChunk) {
      const int64_t n = std::min(kChunk, count - k);
      keep_bits(offset + k, n, bits);
      scale_kept(bits, n, keep_scale<acc_t>(), values + k);
    }
  }
};

// ---- per-token primitives -------------------------------------------------------------------
//
// The per-token loops are compiled twice: portable, and for AVX2 + FMA (8-wide fused multiply-adds,
// about twice the portable build's SSE2 throughput), picked per call by avx2_enabled(). Each parallel
// body is a lambda forced inline, with everything it calls, into both run_tokens_* functions, so
// that the target attribute of run_tokens_avx2 reaches all of its loops.
#if defined(__GNUC__)
#define DCFT_INLINE inline __attribute__((always_inline))
#define DCFT_INLINE_LAMBDA __attribute__((always_inline))
#else
#define DCFT_INLINE inline
#define DCFT_INLINE_LAMBDA
#endif

template <typename Body>
void run_tokens_portable(int64_t slice, int64_t begin, int64_t end, const Body& body) { body(slice, begin, end); }

#if defined(__x86_64__)
template <typename Body>
__attribute__((target("avx2,fma"))) void run_tokens_avx2(int64_t slice, int64_t begin, int64_t end,
                                                         const Body& body) {
  body(slice, begin, end);
}
#endif

// How many slices parallel_slices cuts `units` of work into: four per thread, so that a thread the OS
// preempts (a shared machine) holds the others up by a quarter of its share at most; but where each
// slice keeps partial sums of partial_bytes, no more than fit in 4 MB (and at least one per thread).
inline int64_t slice_count(int64_t units, int64_t partial_bytes = 0) {
  const int64_t threads = at::get_num_threads();
  const int64_t by_memory = partial_bytes > 0 ? std::max(threads, (int64_t(4) << 20) / partial_bytes) : 4 * threads;
  return std::max<int64_t>(1, std::min({units, 4 * threads, by_memory}));
}

// Runs body(slice, begin, end) for the `slices` contiguous ranges of [0, count) on up to
// at::get_num_threads() threads, each taking the next range when done with its last, rather than a
// share fixed up front (at::parallel_for's split, where everyone waits for a preempted thread's
// share). Which thread runs a slice varies; the slices do not, so partial sums kept per slice
// (never per thread) add up to the same bits on every call.
template <typename Body>
void parallel_slices(int64_t count, int64_t slices, const Body& body) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(slices, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    for (int64_t s; (s = next.fetch_add(1, std::memory_order_relaxed)) < slices;)
      body(s, count * s / slices, count * (s + 1) / slices);
  });
}

// The slices of tokens [0, N) for tasks of at least `grain` tokens each.
inline int64_t token_slices(int64_t N, int64_t grain, int64_t partial_bytes = 0) {
  return slice_count((N + grain - 1) / grain, partial_bytes);
}

// parallel_slices over tokens, each slice run by the build of body this CPU runs fastest.
template <typename Body>
void parallel_tokens(int64_t N, int64_t slices, const Body& body) {
  parallel_slices(N, slices, [&](int64_t slice, int64_t begin, int64_t end) {
#if defined(__x86_64__)
    if (avx2_enabled()) return run_tokens_avx2(slice, begin, end, body);
#endif
    run_tokens_portable(slice, begin, end, body);
  });
}

// Lane-buffer width: a multiple of d, at least 32, so the inner loops vectorise. For the
// kernel sizes that divide 32 it is the compile-time 32 (kW), which lets the compiler keep the
// lanes in vector registers; other d use the runtime width (kW = 0).
inline int64_t lane_width(int64_t d) { return d * ((32 + d - 1) / d); }

// The inner loops below run over chunks of W contiguous features, written out (no lambdas) so
// that the restrict-qualified pointers keep the compiler free of alias checks.

// out[r][j] = Σ_{k ≡ j (mod d)} S[r][k] · v[k]        S: R × F (expanded), v: F, out: R × d
template <int64_t kW, typename acc_t>
DCFT_INLINE void shrink_row(const acc_t* __restrict__ v, int64_t F, const acc_t* __restrict__ S, int64_t R, int64_t d,
                acc_t* __restrict__ out, acc_t* __restrict__ lanes) {
  const int64_t W = kW ? kW : lane_width(d);
  for (int64_t r = 0; r < R; ++r) {
    const acc_t* __restrict__ s = S + r * F;
    std::fill(lanes, lanes + W, acc_t(0));
    int64_t k0 = 0;
    for (; k0 + W <= F; k0 += W)
      for (int64_t w = 0; w < (kW ? kW : W); ++w) lanes[w] += s[k0 + w] * v[k0 + w];
    for (int64_t w = 0; k0 + w < F; ++w) lanes[w] += s[k0 + w] * v[k0 + w];
    // Fold the lanes to d values: halve while the width stays a multiple of d (vector adds),
    // then sum the remaining period-d groups in registers.
    int64_t width = W;
    while (width % 2 == 0 && (width / 2) % d == 0) {
      const int64_t half = width / 2;
      for (int64_t w = 0; w < half; ++w) lanes[w] += lanes[w + half];
      width = half;
    }
    for (int64_t j = 0; j < d; ++j) {
      acc_t sum = 0;
      for (int64_t w0 = 0; w0 < width; w0 += d) sum += lanes[w0 + j];
      out[r * d + j] = sum;
    }
  }
}

// acc[k] += Σ_r S[r][k] · u[r][k % d]                   S: R × F (expanded), u: R × d, acc: F
template <int64_t kW, typename acc_t>
DCFT_INLINE void expand_row(acc_t* __restrict__ acc, int64_t F, const acc_t* __restrict__ S, int64_t R, int64_t d,
                const acc_t* __restrict__ u, acc_t* __restrict__ lanes) {
  const int64_t W = kW ? kW : lane_width(d);
  for (int64_t r = 0; r < R; ++r) {
    const acc_t* __restrict__ s = S + r * F;
    for (int64_t w0 = 0; w0 < W; w0 += d)
      for (int64_t j = 0; j < d; ++j) lanes[w0 + j] = u[r * d + j];
    int64_t k0 = 0;
    for (; k0 + W <= F; k0 += W)
      for (int64_t w = 0; w < (kW ? kW : W); ++w) acc[k0 + w] += s[k0 + w] * lanes[w];
    for (int64_t w = 0; k0 + w < F; ++w) acc[k0 + w] += s[k0 + w] * lanes[w];
  }
}

// G[r][k] += v[k] · u[r][k % d]  — the per-token outer product behind dA and dB.
template <int64_t kW, typename acc_t>
DCFT_INLINE void outer_row(acc_t* __restrict__ G, int64_t F, const acc_t* __restrict__ v, int64_t R, int64_t d,
               const acc_t* __restrict__ u, acc_t* __restrict__ lanes) {
  const int64_t W = kW ? kW : lane_width(d);
  for (int64_t r = 0; r < R; ++r) {
    acc_t* __restrict__ g = G + r * F;
    for (int64_t w0 = 0; w0 < W; w0 += d)
      for (int64_t j = 0; j < d; ++j) lanes[w0 + j] = u[r * d + j];
    int64_t k0 = 0;
    for (; k0 + W <= F; k0 += W)
      for (int64_t w = 0; w < (kW ? kW : W); ++w) g[k0 + w] += v[k0 + w] * lanes[w];
    for (int64_t w = 0; k0 + w < F; ++w) g[k0 + w] += v[k0 + w] * lanes[w];
  }
}

// A (blocks, R) factor expanded to one value per feature: Mexp[r][k] = M[k / d][r], R × F.
// Written out, not as ATen ops: per call, these small-factor steps cost more than the pass at a few tokens.
template <typename acc_t>
at::Tensor expand_factor(const at::Tensor& M_in, int64_t d, int64_t F) {
  const auto M = M_in.to(c10::CppTypeToScalarType<acc_t>::value);  // any strides
  const int64_t R = M.size(1), s0 = M.stride(0), s1 = M.stride(1);
  auto out = at::empty({R, F}, M.options());
  const acc_t* m = M.template data_ptr<acc_t>();
  acc_t* o = out.template data_ptr<acc_t>();
  for (int64_t r = 0; r < R; ++r)
    for (int64_t k = 0; k < F; ++k) o[r * F + k] = m[(k / d) * s0 + r * s1];
  return out;
}

// A small matrix in the accumulation type, row-major, as a vector; the n × n identity when absent.
template <typename acc_t>
std::vector<acc_t> small_matrix(const c10::optional<at::Tensor>& m, int64_t n) {
  std::vector<acc_t> out(n * n, acc_t(0));
  if (!m.has_value()) {
    for (int64_t i = 0; i < n; ++i) out[i * n + i] = 1;
    return out;
  }
  const auto t = m->to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  std::copy(t.template data_ptr<acc_t>(), t.template data_ptr<acc_t>() + n * n, out.begin());
  return out;
}

// Runs body with the lane width as a compile-time constant: 32 where d divides it, else 0 (runtime).
template <typename Body>
void with_lane_width(int64_t d, Body&& body) {
  if (32 % d == 0)
    body(std::integral_constant<int64_t, 32>{});
  else
    body(std::integral_constant<int64_t, 0>{});
}

// The small factors in the accumulation type, with the per-token mixes.
template <typename acc_t>
struct Factors {
  int64_t R, d;
  at::Tensor Aexp, Bexp;  // R × in, R × out: Aexp[r][k] = A[r][k / d], Bexp[r][m] = B[m / d][r]
  std::vector<acc_t> C, K;  // R × R, d × d, row-major (identity when absent)

  Factors(const at::Tensor& A, const at::Tensor& B, const c10::optional<at::Tensor>& core,
          const c10::optional<at::Tensor>& kernel, int64_t in, int64_t out)
      : R(A.size(0)), d(kernel.has_value() ? kernel->size(0) : 1),
        Aexp(expand_factor<acc_t>(A.t(), d, in)), Bexp(expand_factor<acc_t>(B, d, out)),
        C(small_matrix<acc_t>(core, R)), K(small_matrix<acc_t>(kernel, d)) {}

  // U = C · T · Kᵀ (r × d) for one token.
  DCFT_INLINE void mix(const acc_t* T, acc_t* U, acc_t* tmp) const {
    const acc_t* c = C.data();
    const acc_t* k = K.data();
    for (int64_t s = 0; s < R; ++s)  // tmp = T · Kᵀ
      for (int64_t e = 0; e < d; ++e) {
        acc_t sum = 0;
        for (int64_t j = 0; j < d; ++j) sum += T[s * d + j] * k[e * d + j];
        tmp[s * d + e] = sum;
      }
    for (int64_t r = 0; r < R; ++r)  // U = C · tmp
      for (int64_t e = 0; e < d; ++e) {
        acc_t sum = 0;
        for (int64_t s = 0; s < R; ++s) sum += c[r * R + s] * tmp[s * d + e];
        U[r * d + e] = sum;
      }
  }

  // dT = Cᵀ · dU · K (r × d) for one token.
  DCFT_INLINE void mix_transposed(const acc_t* dU, acc_t* dT, acc_t* tmp) const {
    const acc_t* c = C.data();
    const acc_t* k = K.data();
    for (int64_t r = 0; r < R; ++r)  // tmp = dU · K
      for (int64_t j = 0; j < d; ++j) {
        acc_t sum = 0;
        for (int64_t e = 0; e < d; ++e) sum += dU[r * d + e] * k[e * d + j];
        tmp[r * d + j] = sum;
      }
    for (int64_t s = 0; s < R; ++s)  // dT = Cᵀ · tmp
      for (int64_t j = 0; j < d; ++j) {
        acc_t sum = 0;
        for (int64_t r = 0; r < R; ++r) sum += c[r * R + s] * tmp[r * d + j];
        dT[s * d + j] = sum;
      }
  }
};

// Row n of a contiguous (N, F) tensor as acc_t: the row itself when no conversion or dropout is
// needed, else converted (and dropped out) into `buffer`.
template <typename scalar_t, typename acc_t>
DCFT_INLINE const acc_t* load_row(const scalar_t* base, int64_t n, int64_t F, const Dropout& drop, acc_t* buffer) {
  const scalar_t* row = base + n * F;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (!drop.on()) return row;
  }
  for (int64_t k = 0; k < F; ++k) buffer[k] = static_cast<acc_t>(row[k]);
  if (drop.on()) drop.apply(n * F, F, buffer);
  return buffer;
}

// The same with the row's keep-bits already at hand (nullptr: no dropout).
template <typename scalar_t, typename acc_t>
DCFT_INLINE const acc_t* load_kept_row(const scalar_t* base, int64_t n, int64_t F, const uint64_t* bits,
                                       acc_t keep_scale, acc_t* buffer) {
  const scalar_t* row = base + n * F;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (bits == nullptr) return row;
  }
  for (int64_t k = 0; k < F; ++k) buffer[k] = static_cast<acc_t>(row[k]);
  if (bits != nullptr) scale_kept(bits, F, keep_scale, buffer);
  return buffer;
}

// Tokens per chunk handed to a thread: enough that each has ~64K multiply-adds, so small calls stay
// on one thread instead of paying for waking the others.
inline int64_t token_grain(int64_t R, int64_t in, int64_t out) {
  return std::max<int64_t>(16, (int64_t(1) << 16) / std::max<int64_t>(1, R * (in + out)));
}

// Writes y[n] = bias + s · B·U for every token (and T); the caller then adds x Wᵀ with one
// in-place GEMM (beta = 1), so y is read and written once by the GEMM and once here.
template <int64_t kW, typename scalar_t>
void adapter_forward(const at::Tensor& x, at::Tensor& y, const c10::optional<at::Tensor>& bias, const at::Tensor& T,
                     const Factors<at::opmath_type<scalar_t>>& f, double scaling, const Dropout& drop,
                     const at::Tensor& keep) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = x.size(0), in = x.size(1), out = y.size(1), R = f.R, d = f.d, RD = R * d;
  const scalar_t* xp = x.data_ptr<scalar_t>();
  scalar_t* yp = y.data_ptr<scalar_t>();
  const at::Tensor bias_acc = bias.has_value() ? bias->to(c10::CppTypeToScalarType<acc_t>::value).contiguous()
                                               : at::zeros({out}, x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  const acc_t* bp = bias_acc.data_ptr<acc_t>();
  acc_t* t_all = T.data_ptr<acc_t>();
  const acc_t* Aexp = f.Aexp.template data_ptr<acc_t>();
  const acc_t* Bexp = f.Bexp.template data_ptr<acc_t>();
  const int64_t words = keep_words(in);
  uint64_t* keep_all = drop.on() ? reinterpret_cast<uint64_t*>(keep.data_ptr<int64_t>()) : nullptr;
  const acc_t keep_scale = drop.keep_scale<acc_t>();
  parallel_tokens(N, token_slices(N, token_grain(R, in, out)), [&](int64_t, int64_t begin, int64_t end)
                                                                    DCFT_INLINE_LAMBDA {
    constexpr bool kRoundOnce = !std::is_same_v<scalar_t, acc_t>;  // 16-bit rows summed in fp32
    std::vector<acc_t> xbuf(in), delta(kRoundOnce ? out : 0), u(RD), tmp(RD), lanes(lane_width(d));
    for (int64_t n = begin; n < end; ++n) {
      acc_t* t = t_all + n * RD;
      uint64_t* bits = drop.on() ? keep_all + n * words : nullptr;
      if (bits != nullptr) drop.keep_bits(n * in, in, bits);  // saved: backward need not draw them again
      shrink_row<kW>(load_kept_row(xp, n, in, bits, keep_scale, xbuf.data()), in, Aexp, R, d, t, lanes.data());
      f.mix(t, u.data(), tmp.data());
      for (auto& v : u) v *= static_cast<acc_t>(scaling);
      scalar_t* __restrict__ row = yp + n * out;
      // In y's own row when it is in the accumulation type, else in fp32 and rounded once.
      acc_t* acc_row = kRoundOnce ? delta.data() : reinterpret_cast<acc_t*>(row);
      std::copy(bp, bp + out, acc_row);
      expand_row<kW>(acc_row, out, Bexp, R, d, u.data(), lanes.data());
      if constexpr (kRoundOnce)
        for (int64_t m = 0; m < out; ++m) row[m] = static_cast<scalar_t>(delta[m]);
    }
  });
}

template <typename acc_t>
struct Partials {  // one slice of tokens' share of the factor gradients
  std::vector<acc_t> dAexp, dBexp, dC, dK;
  Partials(int64_t a_size, int64_t b_size, int64_t c_size, int64_t k_size)
      : dAexp(a_size, 0), dBexp(b_size, 0), dC(c_size, 0), dK(k_size, 0) {}
};

template <int64_t kW, typename scalar_t>
void adapter_backward(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& T, at::Tensor* dx,
                      const Factors<at::opmath_type<scalar_t>>& f, double scaling, const Dropout& drop,
                      const at::Tensor& keep,
                      bool need_a, bool need_b, bool need_c, bool need_k,
                      std::vector<Partials<at::opmath_type<scalar_t>>>& partials) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = x.size(0), in = x.size(1), out = grad_y.size(1), R = f.R, d = f.d, RD = R * d;
  const scalar_t* gp = grad_y.data_ptr<scalar_t>();
  const scalar_t* xp = x.data_ptr<scalar_t>();
  scalar_t* dxp = dx != nullptr ? dx->data_ptr<scalar_t>() : nullptr;
  const acc_t* t_all = T.data_ptr<acc_t>();
  const acc_t* Aexp = f.Aexp.template data_ptr<acc_t>();
  const acc_t* Bexp = f.Bexp.template data_ptr<acc_t>();
  const acc_t* c = f.C.data();
  const acc_t* k = f.K.data();
  const int64_t words = keep_words(in);
  const uint64_t* keep_all = drop.on() ? reinterpret_cast<const uint64_t*>(keep.data_ptr<int64_t>()) : nullptr;
  const acc_t keep_scale = drop.keep_scale<acc_t>();
  parallel_tokens(N, static_cast<int64_t>(partials.size()), [&](int64_t slice, int64_t begin, int64_t end)
                                                                DCFT_INLINE_LAMBDA {
    auto& part = partials[slice];
    constexpr bool kRoundOnce = !std::is_same_v<scalar_t, acc_t>;
    std::vector<acc_t> gbuf(out), xbuf(in), dxrow(kRoundOnce ? in : 0), du(RD), dt(RD), u(RD), tmp(RD);
    std::vector<acc_t> lanes(lane_width(d));
    for (int64_t n = begin; n < end; ++n) {
      const acc_t* t = t_all + n * RD;
      const acc_t* g = load_kept_row(gp, n, out, nullptr, keep_scale, gbuf.data());  // dy: no dropout
      shrink_row<kW>(g, out, Bexp, R, d, du.data(), lanes.data());  // dU = s · Bᵀ · G
      for (auto& v : du) v *= static_cast<acc_t>(scaling);
      if (need_b) {  // dB += s · G · Uᵀ
        f.mix(t, u.data(), tmp.data());
        for (auto& v : u) v *= static_cast<acc_t>(scaling);
        outer_row<kW>(part.dBexp.data(), out, g, R, d, u.data(), lanes.data());
      }
      if (need_c)  // dC += (dU · K) · Tᵀ
        for (int64_t r = 0; r < R; ++r)
          for (int64_t j = 0; j < d; ++j) {
            acc_t duk = 0;
            for (int64_t e = 0; e < d; ++e) duk += du[r * d + e] * k[e * d + j];
            for (int64_t s = 0; s < R; ++s) part.dC[r * R + s] += duk * t[s * d + j];
          }
      if (need_k)  // dK += dUᵀ · (C · T)
        for (int64_t r = 0; r < R; ++r)
          for (int64_t j = 0; j < d; ++j) {
            acc_t ct = 0;
            for (int64_t s = 0; s < R; ++s) ct += c[r * R + s] * t[s * d + j];
            for (int64_t e = 0; e < d; ++e) part.dK[e * d + j] += du[r * d + e] * ct;
          }
      if (dx != nullptr || need_a) {
        f.mix_transposed(du.data(), dt.data(), tmp.data());  // dT = Cᵀ · dU · K
        const uint64_t* bits = drop.on() ? keep_all + n * words : nullptr;  // the forward's keep-bits
        if (need_a) {  // dA += dT · drop(X)ᵀ
          outer_row<kW>(part.dAexp.data(), in, load_kept_row(xp, n, in, bits, keep_scale, xbuf.data()), R, d,
                        dt.data(), lanes.data());
        }
        if (dx != nullptr) {  // dx = drop'(Aᵀ · dT); the caller adds dy·W with one in-place GEMM
          scalar_t* __restrict__ row = dxp + n * in;
          acc_t* acc_row = kRoundOnce ? dxrow.data() : reinterpret_cast<acc_t*>(row);
          std::fill(acc_row, acc_row + in, acc_t(0));
          expand_row<kW>(acc_row, in, Aexp, R, d, dt.data(), lanes.data());
          if (bits != nullptr) scale_kept(bits, in, keep_scale, acc_row);
          if constexpr (kRoundOnce)
            for (int64_t i = 0; i < in; ++i) row[i] = static_cast<scalar_t>(dxrow[i]);
        }
      }
    }
  });
}

void check_common(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& A, const at::Tensor& B) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && A.dim() == 2 && B.dim() == 2, "dcft_kernels: expected 2-D x, weight, A, B");
  TORCH_CHECK(x.device().is_cpu(), "dcft_kernels cpp_forward/cpp_backward: CPU tensors expected");
}

// Fold an expanded R × F gradient back to the factor's shape: out[r][k / d] += G[r][k], (R, blocks) — A's
// layout — or with transposed, (blocks, R) — B's.
template <typename acc_t>
at::Tensor fold_expanded(const acc_t* G, int64_t R, int64_t F, int64_t d, int64_t blocks, bool transposed,
                         const at::TensorOptions& options) {
  const std::vector<int64_t> shape = transposed ? std::vector<int64_t>{blocks, R} : std::vector<int64_t>{R, blocks};
  auto out = at::zeros(shape, options.dtype(c10::CppTypeToScalarType<acc_t>::value));
  acc_t* o = out.template data_ptr<acc_t>();
  for (int64_t r = 0; r < R; ++r)
    for (int64_t k = 0; k < F; ++k) o[transposed ? (k / d) * R + r : r * blocks + k / d] += G[r * F + k];
  return out;
}

// A small (rows, r) matrix with the same values, laid out column-major (a transposed view of a copy).
at::Tensor column_major(const at::Tensor& m) { return m.t().contiguous().t(); }

// d = 1 (LoRA, DeLoRA, the LoKr order's view) without dropout: shrink and expand are plain rank-r
// GEMMs, which MKL / oneDNN run faster than any per-token loop (above all on the LoKr view's many
// short rows). Same results, same saved T.
// fp32/fp64 only: a 16-bit GEMM would round x·Aᵀ (or x·Wᵀ) before the delta is added, overflowing
// where the true y does not; the per-token path accumulates in fp32 and rounds once.
bool plain_gemm(int64_t d, double p, at::ScalarType dtype) {
  return d == 1 && p == 0.0 && (dtype == at::kFloat || dtype == at::kDouble);
}

// The fused op also takes the rank GEMMs with dropout: they run on drop(x), written once per pass
// from the keep-bits (a pass over x is cheaper than a per-token loop at rank 8).
bool use_rank_gemms(const c10::optional<at::Tensor>& kernel, at::ScalarType dtype) {
  return !kernel.has_value() && plain_gemm(1, 0.0, dtype);
}

// Rows first .. first + count - 1 of src (an (N, F) matrix) with their keep-bits applied, written from
// dst on (dst may be row `first` of src itself: then in place). With draw, the bits are drawn into
// keep_all first; else keep_all holds them.
template <typename scalar_t>
void keep_rows(const scalar_t* src, int64_t first, int64_t count, int64_t F, uint64_t* keep_all, const Dropout& drop,
               bool draw, scalar_t* dst) {
  const int64_t words = keep_words(F);
  for (int64_t i = 0; i < count; ++i) {
    const int64_t n = first + i;
    uint64_t* bits = keep_all + n * words;
    if (draw) drop.keep_bits(n * F, F, bits);
    if (dst != src + first * F) std::copy(src + n * F, src + (n + 1) * F, dst + i * F);
    scale_kept(bits, F, drop.keep_scale<scalar_t>(), dst + i * F);
  }
}

// dst = src with the keep-bits of its rows applied (dst may be src). With draw, the bits are drawn
// into keep first; else keep holds them. fp32/fp64 (the rank-GEMM path's types).
void apply_keep_bits(const at::Tensor& src, at::Tensor& dst, const at::Tensor& keep, const Dropout& drop, bool draw) {
  const int64_t N = src.size(0), F = src.size(1);
  uint64_t* keep_all = reinterpret_cast<uint64_t*>(keep.data_ptr<int64_t>());
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "apply_keep_bits", [&] {
    const scalar_t* sp = src.data_ptr<scalar_t>();
    scalar_t* dp = dst.data_ptr<scalar_t>();
    at::parallel_for(0, N, std::max<int64_t>(1, (int64_t(1) << 14) / F), [&](int64_t begin, int64_t end) {
      keep_rows(sp, begin, end - begin, F, keep_all, drop, draw, dp + begin * F);
    });
  });
}

// ---- the rank-r pass (d = 1, fp32, AVX2): low_rank_cpu.h's kernels over blocks of tokens ---------
//
// One parallel pass over blocks of tokens replaces the rank GEMMs: each block's rows of x (and dy) are
// read into cache once and every rank-r product of the block runs on them there. Same results and
// saved T as the GEMM path, which serves fp64, and CPUs without AVX2.

bool use_rank_pass(const c10::optional<at::Tensor>& kernel, at::ScalarType dtype) {
  return !kernel.has_value() && dtype == at::kFloat && avx2_enabled();
}

// Tokens per block: a block of x and one of dy (or y) together ~128 KB (2^15 floats), in a core's L2.
inline int64_t rank_block(int64_t in, int64_t out) {
  return std::clamp<int64_t>((int64_t(1) << 15) / std::max<int64_t>(1, in + out), 4, 1024) / 4 * 4;
}

// The small factors in fp32, laid out for the kernels: A (r × in) and Bᵀ (r × out) row-major.
struct RankFactors {
  int64_t R;
  at::Tensor A, Bt, C;  // C: r × r, undefined when absent
  RankFactors(const at::Tensor& A_in, const at::Tensor& B_in, const c10::optional<at::Tensor>& core)
      : R(A_in.size(0)), A(A_in.to(at::kFloat).contiguous()), Bt(B_in.t().to(at::kFloat).contiguous()) {
    if (core.has_value()) C = core->to(at::kFloat).contiguous();
  }
  // out[n] = s · C · T[n] (or s · T[n]) for n < count; with transpose, s · Cᵀ · T[n].
  void mix(const float* T, int64_t count, float s, bool transpose, float* out) const {
    const float* c = C.defined() ? C.data_ptr<float>() : nullptr;
    for (int64_t n = 0; n < count; ++n)
      for (int64_t i = 0; i < R; ++i) {
        float sum = 0;
        if (c == nullptr)
          sum = T[n * R + i];
        else
          for (int64_t j = 0; j < R; ++j) sum += (transpose ? c[j * R + i] : c[i * R + j]) * T[n * R + j];
        out[n * R + i] = s * sum;
      }
  }
};

// y = b + s · C·(drop(x) Aᵀ) Bᵀ and T = drop(x) Aᵀ, block by block (the caller adds x Wᵀ).
void rank_forward(const at::Tensor& x, at::Tensor& y, const c10::optional<at::Tensor>& bias, const at::Tensor& T,
                  const RankFactors& f, double scaling, const Dropout& drop, const at::Tensor& keep) {
  const int64_t N = x.size(0), in = x.size(1), out = y.size(1), R = f.R, block = rank_block(in, out);
  const float* xp = x.data_ptr<float>();
  const at::Tensor b = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  uint64_t* keep_all = drop.on() ? reinterpret_cast<uint64_t*>(keep.data_ptr<int64_t>()) : nullptr;
  const int64_t blocks = (N + block - 1) / block;
  parallel_slices(blocks, slice_count(blocks), [&](int64_t, int64_t first, int64_t last) {
    std::vector<float> xbuf(drop.on() ? block * in : 0), u(block * R);
    for (int64_t blk = first; blk < last; ++blk) {
      const int64_t n0 = blk * block, count = std::min(block, N - n0);
      const float* xs = xp + n0 * in;
      if (drop.on()) {
        keep_rows(xp, n0, count, in, keep_all, drop, /*draw=*/true, xbuf.data());
        xs = xbuf.data();
      }
      float* t = T.data_ptr<float>() + n0 * R;
      low_rank::shrink(xs, in, count, in, f.A.data_ptr<float>(), R, t);
      f.mix(t, count, static_cast<float>(scaling), /*transpose=*/false, u.data());
      low_rank::expand(u.data(), count, R, f.Bt.data_ptr<float>(), out, bp, y.data_ptr<float>() + n0 * out, out);
    }
  });
}

// The factor gradients and dx's delta drop'(dT·A), block by block (the caller adds dy·W to dx).
// Returns [dA, dB, dC] (empty where not asked for).
std::vector<at::Tensor> rank_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& T, at::Tensor* dx,
                                      const RankFactors& f, double scaling, const Dropout& drop,
                                      const at::Tensor& keep, bool need_a, bool need_b, bool need_c) {
  const int64_t N = x.size(0), in = x.size(1), out = dy.size(1), R = f.R, block = rank_block(in, out);
  const float* xp = x.data_ptr<float>();
  const float* gp = dy.data_ptr<float>();
  const float s = static_cast<float>(scaling);
  uint64_t* keep_all = drop.on() ? reinterpret_cast<uint64_t*>(keep.data_ptr<int64_t>()) : nullptr;
  const int64_t blocks = (N + block - 1) / block;
  const int64_t slices = slice_count(blocks, R * ((need_a ? in : 0) + (need_b ? out : 0)) * int64_t(sizeof(float)));
  // One slice's share of dA (r × in), dBᵀ (r × out) and dC (r × r), summed once at the end.
  auto dA_parts = at::zeros({slices, R, need_a ? in : 0}, x.options());
  auto dBt_parts = at::zeros({slices, R, need_b ? out : 0}, x.options());
  auto dC_parts = at::zeros({slices, R, need_c ? R : 0}, x.options());
  parallel_slices(blocks, slices, [&](int64_t slice, int64_t first, int64_t last) {
    std::vector<float> xbuf(drop.on() && need_a ? block * in : 0), du(block * R), dt(block * R), u(block * R);
    for (int64_t blk = first; blk < last; ++blk) {
      const int64_t n0 = blk * block, count = std::min(block, N - n0);
      const float* g = gp + n0 * out;
      const float* t = T.data_ptr<float>() + n0 * R;
      low_rank::shrink(g, out, count, out, f.Bt.data_ptr<float>(), R, du.data());  // dU = s · dy B
      for (int64_t i = 0; i < count * R; ++i) du[i] *= s;
      f.mix(du.data(), count, 1.0f, /*transpose=*/true, dt.data());                 // dT = Cᵀ dU
      if (dx != nullptr) {
        float* dxp = dx->data_ptr<float>();
        low_rank::expand(dt.data(), count, R, f.A.data_ptr<float>(), in, nullptr, dxp + n0 * in, in);
        if (drop.on()) keep_rows(dxp, n0, count, in, keep_all, drop, /*draw=*/false, dxp + n0 * in);
      }
      if (need_a) {  // dA += dTᵀ drop(x)
        const float* xs = xp + n0 * in;
        if (drop.on()) {
          keep_rows(xp, n0, count, in, keep_all, drop, /*draw=*/false, xbuf.data());
          xs = xbuf.data();
        }
        low_rank::accumulate_outer(dt.data(), count, R, xs, in, in, dA_parts.data_ptr<float>() + slice * R * in);
      }
      if (need_b) {  // dBᵀ += (s · C T)ᵀ dy
        f.mix(t, count, s, /*transpose=*/false, u.data());
        low_rank::accumulate_outer(u.data(), count, R, g, out, out, dBt_parts.data_ptr<float>() + slice * R * out);
      }
      if (need_c) {  // dC += dUᵀ T
        float* dc = dC_parts.data_ptr<float>() + slice * R * R;
        for (int64_t n = 0; n < count; ++n)
          for (int64_t i = 0; i < R; ++i)
            for (int64_t j = 0; j < R; ++j) dc[i * R + j] += du[n * R + i] * t[n * R + j];
      }
    }
  });
  return {dA_parts.sum(0), dBt_parts.sum(0).t(), dC_parts.sum(0)};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> structured_delta_forward_cpu(
    const at::Tensor& x_in, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, const at::Tensor& A,
    const at::Tensor& B, const c10::optional<at::Tensor>& core, const c10::optional<at::Tensor>& kernel,
    double scaling, double p, c10::SymInt seed_sym) {
  const int64_t seed = seed_sym.expect_int();  // concrete by the time a kernel runs
  check_common(x_in, weight, A, B);
  const auto x = x_in.contiguous();
  const auto acc = at::toOpMathType(x.scalar_type());
  // The dropout keep-bits, one bit per element of x (1/32 of x in fp32): drawing them costs more than
  // the rest of the adapter, so backward reads them instead of drawing them again.
  auto keep = at::empty({p > 0.0 ? x.size(0) : 0, keep_words(x.size(1))}, x.options().dtype(at::kLong));
  if (use_rank_pass(kernel, x.scalar_type())) {
    auto y = at::empty({x.size(0), weight.size(0)}, x.options());
    auto T = at::empty({x.size(0), A.size(0)}, x.options());
    rank_forward(x, y, bias, T, RankFactors(A, B, core), scaling, Dropout{p, seed}, keep);
    y.addmm_(x, weight.t());
    return {y, T, keep};
  }
  if (use_rank_gemms(kernel, x.scalar_type())) {
    at::Tensor x_drop = x;
    if (p > 0.0) {
      x_drop = at::empty_like(x);
      apply_keep_bits(x, x_drop, keep, Dropout{p, seed}, /*draw=*/true);
    }
    auto T = at::mm(x_drop, A.t()).to(acc);  // (N, r)
    auto U = (core.has_value() ? at::mm(T, core->to(acc).t()) : T).to(x.scalar_type());
    // y = b + s·U·Bᵀ first, where nn.Linear would broadcast b, then x Wᵀ added in place: y is
    // written once and read once by the big GEMM, as in nn.Linear.
    auto y = bias.has_value() ? at::addmm(*bias, U, B.t(), 1.0, scaling) : at::mm(U, B.t() * scaling);
    y.addmm_(x, weight.t());
    return {y, T, keep};
  }
  auto y = at::empty({x.size(0), weight.size(0)}, x.options());
  const int64_t d = kernel.has_value() ? kernel->size(0) : 1;
  auto T = at::empty({x.size(0), A.size(0) * d}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "structured_delta_forward_cpu", [&] {
    Factors<at::opmath_type<scalar_t>> f(A, B, core, kernel, x.size(1), weight.size(0));
    with_lane_width(d, [&](auto lanes) {
      adapter_forward<decltype(lanes)::value, scalar_t>(x, y, bias, T, f, scaling, Dropout{p, seed}, keep);
    });
  });
  y.addmm_(x, weight.t());  // y += x Wᵀ through ATen's GEMM (MKL / oneDNN)
  return {y, T, keep};
}

std::vector<at::Tensor> structured_delta_backward_cpu(
    const at::Tensor& grad_y_in, const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& A,
    const at::Tensor& B, const c10::optional<at::Tensor>& core, const c10::optional<at::Tensor>& kernel,
    const at::Tensor& T, const at::Tensor& keep, double scaling, double p, bool need_x, bool need_a, bool need_b,
    bool need_c, bool need_k) {
  check_common(x_in, weight, A, B);
  const auto x = x_in.contiguous();
  const auto grad_y = grad_y_in.contiguous();
  const int64_t R = A.size(0), d = kernel.has_value() ? kernel->size(0) : 1;
  const int64_t in = x.size(1), out = grad_y.size(1);
  need_c = need_c && core.has_value();
  need_k = need_k && kernel.has_value();
  auto empty = [&] { return at::empty({0}, x.options()); };
  TORCH_CHECK(p == 0.0 || (keep.dim() == 2 && keep.size(0) == x.size(0) && keep.size(1) == keep_words(in)),
              "dcft_kernels cpp_backward: keep must be the keep-bits cpp_forward returned");
  if (use_rank_pass(kernel, x.scalar_type())) {
    at::Tensor dx = need_x ? at::empty_like(x) : empty();
    auto grads = rank_backward(grad_y, x, T, need_x ? &dx : nullptr, RankFactors(A, B, core), scaling,
                               Dropout{p, 0}, keep, need_a, need_b, need_c);
    if (need_x) dx.addmm_(grad_y, weight);
    return {dx, need_a ? grads[0].to(A.scalar_type()) : empty(),
            need_b ? grads[1].contiguous().to(B.scalar_type()) : empty(),
            need_c ? grads[2].to(core->scalar_type()) : empty(), empty()};
  }
  if (use_rank_gemms(kernel, x.scalar_type())) {
    const auto dtype = x.scalar_type();
    const Dropout drop{p, 0};  // the keep-bits are read, not drawn
    // Skinny GEMMs are fast in one operand layout only (measured, MKL on 2 cores, 2048 × 1024, r = 8):
    // dy · B reads B best column-major (0.9 vs 1.6 ms), and dB as (Uᵀ · dy)ᵀ takes 1 ms where
    // dyᵀ · U takes 8.5.
    auto dU = at::mm(grad_y, column_major(B)).to(T.scalar_type()).mul_(scaling);  // (N, r)
    auto dT = core.has_value() ? at::mm(dU, core->to(T.scalar_type())) : dU;
    auto U = core.has_value() ? at::mm(T, core->to(T.scalar_type()).t()) : T;
    at::Tensor dx = empty();
    if (need_x) {  // dx = drop'(dT·A) + dy·W: the delta first, so that dx is written once, as y is
      dx = at::mm(dT.to(dtype), A);
      if (drop.on()) apply_keep_bits(dx, dx, keep, drop, /*draw=*/false);
      dx.addmm_(grad_y, weight);
    }
    // In the input dtype (GEMMs accumulate in fp32), so x and dy are never copied (but for dropout).
    at::Tensor x_drop = x;
    if (need_a && drop.on()) {
      x_drop = at::empty_like(x);
      apply_keep_bits(x, x_drop, keep, drop, /*draw=*/false);
    }
    at::Tensor dA = need_a ? at::mm(dT.t().to(dtype), x_drop).to(A.scalar_type()) : empty();
    at::Tensor dB = need_b ? at::mm(U.to(dtype).t(), grad_y).mul_(scaling).t().contiguous().to(B.scalar_type()) : empty();
    at::Tensor dC = need_c ? at::mm(dU.t(), T).to(core->scalar_type()) : empty();
    return {dx, dA, dB, dC, empty()};
  }
  at::Tensor dx = need_x ? at::empty_like(x) : empty();
  at::Tensor dA = empty(), dB = empty(), dC = empty(), dK = empty();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "structured_delta_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    Factors<acc_t> f(A, B, core, kernel, in, out);
    std::vector<Partials<acc_t>> partials;
    const int64_t partial_bytes = R * ((need_a ? in : 0) + (need_b ? out : 0)) * int64_t(sizeof(acc_t));
    const int64_t slices = token_slices(x.size(0), token_grain(R, in, out), partial_bytes);
    for (int64_t i = 0; i < slices; ++i)
      partials.emplace_back(need_a ? R * in : 0, need_b ? R * out : 0, need_c ? R * R : 0, need_k ? d * d : 0);
    with_lane_width(d, [&](auto lanes) {
      adapter_backward<decltype(lanes)::value, scalar_t>(grad_y, x, T, need_x ? &dx : nullptr, f, scaling,
                                                         Dropout{p, 0}, keep, need_a, need_b, need_c, need_k,
                                                         partials);
    });
    // Reduce the per-slice partial sums once, then fold the expanded rows back to factor shape.
    auto sum_parts = [&](auto member, int64_t rows, int64_t cols) {
      auto total = at::zeros({rows, cols}, x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
      acc_t* dst = total.data_ptr<acc_t>();
      for (auto& part : partials) {
        const auto& src = part.*member;
        for (int64_t i = 0; i < rows * cols; ++i) dst[i] += src[i];
      }
      return total;
    };
    auto fold = [&](const at::Tensor& G, int64_t blocks, bool transposed) {
      return fold_expanded(G.data_ptr<acc_t>(), R, G.size(1), d, blocks, transposed, x.options());
    };
    if (need_a) dA = fold(sum_parts(&Partials<acc_t>::dAexp, R, in), A.size(1), false).to(A.scalar_type());
    if (need_b) dB = fold(sum_parts(&Partials<acc_t>::dBexp, R, out), B.size(0), true).to(B.scalar_type());
    if (need_c) dC = sum_parts(&Partials<acc_t>::dC, R, R).to(core->scalar_type());
    if (need_k) dK = sum_parts(&Partials<acc_t>::dK, d, d).to(kernel->scalar_type());
  });
  if (need_x) dx.addmm_(grad_y, weight);  // dx += dy·W through ATen's GEMM
  return {dx, dA, dB, dC, dK};
}

// ---- the plan's primitives (dcft_kernels/plan.py), for the cases the fused pass does not cover --------
//
// The DCFT layout with any d: feature i·d + j is block i, position j. M is (blocks, R), expanded once
// per call to one value per feature (Mexp[r][k] = M[k / d][r]), so the per-token loops above apply.

namespace {

at::Tensor shrink_cpu(const at::Tensor& v_in, const at::Tensor& M, int64_t d, double scale, double p,
                      c10::SymInt seed_sym) {
  const auto v = v_in.contiguous();
  const int64_t N = v.size(0), F = v.size(1), R = M.size(1);
  TORCH_CHECK(M.size(0) * d >= F, "dcft_kernels cpp_shrink: M has too few blocks for the features");
  if (plain_gemm(d, p, v.scalar_type())) return at::mm(v, column_major(M)).mul_(scale).view({N, R, 1});
  const Dropout drop{p, seed_sym.expect_int()};
  auto T = at::empty({N, R, d}, v.options().dtype(at::toOpMathType(v.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "cpp_shrink", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto Mexp = expand_factor<acc_t>(M, d, F);
    const acc_t* mp = Mexp.data_ptr<acc_t>();
    const scalar_t* vp = v.data_ptr<scalar_t>();
    acc_t* tp = T.data_ptr<acc_t>();
    with_lane_width(d, [&](auto lanes_w) {
      parallel_tokens(N, token_slices(N, token_grain(R, F, 0)), [&](int64_t, int64_t begin, int64_t end)
                                                                     DCFT_INLINE_LAMBDA {
        std::vector<acc_t> buf(F), lanes(lane_width(d));
        for (int64_t n = begin; n < end; ++n) {
          acc_t* t = tp + n * R * d;
          shrink_row<decltype(lanes_w)::value>(load_row(vp, n, F, drop, buf.data()), F, mp, R, d, t, lanes.data());
          for (int64_t c = 0; c < R * d; ++c) t[c] *= static_cast<acc_t>(scale);
        }
      });
    });
  });
  return T;
}

void expand_cpu_(at::Tensor& out, const at::Tensor& U_in, const at::Tensor& M, double scale, double p,
                 c10::SymInt seed_sym) {
  TORCH_CHECK(out.is_contiguous(), "dcft_kernels cpp_expand_: out must be contiguous");
  const auto U = U_in.contiguous();
  const int64_t N = out.size(0), F = out.size(1), R = U.size(1), d = U.size(2);
  TORCH_CHECK(U.size(0) == N && M.size(1) == R && M.size(0) * d >= F, "dcft_kernels cpp_expand_: shapes disagree");
  TORCH_CHECK(U.scalar_type() == at::toOpMathType(out.scalar_type()), "dcft_kernels cpp_expand_: U must be in the accumulation dtype");
  if (plain_gemm(d, p, out.scalar_type())) {
    out.addmm_(U.view({N, R}), M.narrow(0, 0, F).t(), 1.0, scale);
    return;
  }
  const Dropout drop{p, seed_sym.expect_int()};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "cpp_expand_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto Mexp = expand_factor<acc_t>(M, d, F);
    const acc_t* mp = Mexp.data_ptr<acc_t>();
    const acc_t* up = U.data_ptr<acc_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    with_lane_width(d, [&](auto lanes_w) {
      parallel_tokens(N, token_slices(N, token_grain(R, 0, F)), [&](int64_t, int64_t begin, int64_t end)
                                                                     DCFT_INLINE_LAMBDA {
        std::vector<acc_t> delta(F), u(R * d), lanes(lane_width(d));
        for (int64_t n = begin; n < end; ++n) {
          for (int64_t c = 0; c < R * d; ++c) u[c] = up[n * R * d + c] * static_cast<acc_t>(scale);
          std::fill(delta.begin(), delta.end(), acc_t(0));
          expand_row<decltype(lanes_w)::value>(delta.data(), F, mp, R, d, u.data(), lanes.data());
          if (drop.on()) drop.apply(n * F, F, delta.data());
          scalar_t* __restrict__ row = op + n * F;
          for (int64_t k = 0; k < F; ++k) row[k] = static_cast<scalar_t>(static_cast<acc_t>(row[k]) + delta[k]);
        }
      });
    });
  });
}

at::Tensor reduce_cpu(const at::Tensor& v_in, const at::Tensor& U_in, int64_t blocks, double p, c10::SymInt seed_sym) {
  const auto v = v_in.contiguous();
  const auto U = U_in.contiguous();
  const int64_t N = v.size(0), F = v.size(1), R = U.size(1), d = U.size(2);
  TORCH_CHECK(U.size(0) == N && blocks * d >= F, "dcft_kernels cpp_reduce: shapes disagree");
  TORCH_CHECK(U.scalar_type() == at::toOpMathType(v.scalar_type()), "dcft_kernels cpp_reduce: U must be in the accumulation dtype");
  if (plain_gemm(d, p, v.scalar_type()) && blocks == F) return at::mm(U.view({N, R}).t(), v).t().contiguous();
  const Dropout drop{p, seed_sym.expect_int()};
  at::Tensor total;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "cpp_reduce", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* vp = v.data_ptr<scalar_t>();
    const acc_t* up = U.data_ptr<acc_t>();
    // One slice's share of Σ_n U[n][r][k % d] · drop(v)[n][k] per feature, summed once at the end.
    const int64_t slices = token_slices(N, token_grain(R, F, 0), R * F * int64_t(sizeof(acc_t)));
    std::vector<std::vector<acc_t>> partials(slices, std::vector<acc_t>(R * F, acc_t(0)));
    with_lane_width(d, [&](auto lanes_w) {
      parallel_tokens(N, slices, [&](int64_t slice, int64_t begin, int64_t end) DCFT_INLINE_LAMBDA {
        auto& part = partials[slice];
        std::vector<acc_t> buf(F), lanes(lane_width(d));
        for (int64_t n = begin; n < end; ++n)
          outer_row<decltype(lanes_w)::value>(part.data(), F, load_row(vp, n, F, drop, buf.data()), R, d,
                                              up + n * R * d, lanes.data());
      });
    });
    auto G = at::zeros({R, F}, U.options());
    acc_t* gp = G.data_ptr<acc_t>();
    for (const auto& part : partials)
      for (int64_t i = 0; i < R * F; ++i) gp[i] += part[i];
    total = fold_expanded(gp, R, F, d, blocks, /*transposed=*/true, U.options());
  });
  return total;
}

}  // namespace

int64_t cpu_threads_used(int64_t n) {
  std::mutex mutex;
  std::set<std::thread::id> ids;
  at::parallel_for(0, n, 1, [&](int64_t, int64_t) {
    std::lock_guard<std::mutex> lock(mutex);
    ids.insert(std::this_thread::get_id());
  });
  return static_cast<int64_t>(ids.size());
}

TORCH_LIBRARY_IMPL(dcft_kernels, CPU, m) {
  m.impl("cpp_shrink", &shrink_cpu);
  m.impl("cpp_expand_", &expand_cpu_);
  m.impl("cpp_reduce", &reduce_cpu);
  m.impl("cpp_forward", &structured_delta_forward_cpu);
  m.impl("cpp_backward", &structured_delta_backward_cpu);
}

}  // namespace dcft_kernels
