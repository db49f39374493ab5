// The rank-r products of low_rank_cpu.h. Each is a loop over small tiles whose partial sums stay in
// vector registers (8 fp32 lanes each): per step, a few loads feed twice as many FMAs, where a
// per-row loop would load and store its accumulator for every multiply-add.
#include "low_rank_cpu.h"

#include <cstdlib>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace dcft_kernels {

bool avx2_enabled() {
#if defined(__x86_64__)
  static const bool enabled = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                              std::getenv("DCFT_KERNELS_NO_AVX2") == nullptr;
  return enabled;
#else
  return false;
#endif
}

namespace low_rank {

#if defined(__x86_64__)
#define DCFT_AVX2 __attribute__((target("avx2,fma")))

namespace {

DCFT_AVX2 inline float horizontal_sum(__m256 v) {
  const __m128 quad = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
  return _mm_cvtss_f32(_mm_add_ss(pair, _mm_movehdup_ps(pair)));
}

// kT tokens × kR ranks of shrink: kT·kR dot products over F, 8 lanes at a time, the tail in scalars.
template <int kT, int kR>
DCFT_AVX2 void shrink_tile(const float* X, int64_t ldx, int64_t F, const float* M, int64_t R, float* out) {
  __m256 acc[kT][kR];
  for (int t = 0; t < kT; ++t)
    for (int r = 0; r < kR; ++r) acc[t][r] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= F; k += 8) {
    __m256 x[kT];
    for (int t = 0; t < kT; ++t) x[t] = _mm256_loadu_ps(X + t * ldx + k);
    for (int r = 0; r < kR; ++r) {
      const __m256 m = _mm256_loadu_ps(M + r * F + k);
      for (int t = 0; t < kT; ++t) acc[t][r] = _mm256_fmadd_ps(x[t], m, acc[t][r]);
    }
  }
  for (int t = 0; t < kT; ++t)
    for (int r = 0; r < kR; ++r) {
      float sum = horizontal_sum(acc[t][r]);
      for (int64_t j = k; j < F; ++j) sum += X[t * ldx + j] * M[r * F + j];
      out[t * R + r] = sum;
    }
}

// All ranks of kT tokens, 4 at a time (3 tokens × 4 ranks: 12 accumulators fed by 7 loads per step).
template <int kT>
DCFT_AVX2 void shrink_tokens(const float* X, int64_t ldx, int64_t F, const float* M, int64_t R, float* out) {
  int64_t r = 0;
  for (; r + 4 <= R; r += 4) shrink_tile<kT, 4>(X, ldx, F, M + r * F, R, out + r);
  switch (R - r) {
    case 3: shrink_tile<kT, 3>(X, ldx, F, M + r * F, R, out + r); break;
    case 2: shrink_tile<kT, 2>(X, ldx, F, M + r * F, R, out + r); break;
    case 1: shrink_tile<kT, 1>(X, ldx, F, M + r * F, R, out + r); break;
    default: break;
  }
}

// kT tokens × 8 features of expand, all ranks summed in registers (8 tokens: per rank 1 load of M and
// 8 broadcasts of U feed 8 FMAs; measured twice as fast as 4 tokens × 16 features, which reads M half
// as often but writes Y in shorter runs).
template <int kT>
DCFT_AVX2 void expand_tile(const float* U, int64_t R, const float* M, int64_t F, int64_t k, const float* bias,
                           float* Y, int64_t ldy) {
  __m256 acc[kT];
  const __m256 init = bias != nullptr ? _mm256_loadu_ps(bias + k) : _mm256_setzero_ps();
  for (int t = 0; t < kT; ++t) acc[t] = init;
  for (int64_t r = 0; r < R; ++r) {
    const __m256 m = _mm256_loadu_ps(M + r * F + k);
    for (int t = 0; t < kT; ++t) acc[t] = _mm256_fmadd_ps(_mm256_broadcast_ss(U + t * R + r), m, acc[t]);
  }
  for (int t = 0; t < kT; ++t) _mm256_storeu_ps(Y + t * ldy + k, acc[t]);
}

template <int kT>
DCFT_AVX2 void expand_tokens(const float* U, int64_t R, const float* M, int64_t F, const float* bias, float* Y,
                             int64_t ldy) {
  int64_t k = 0;
  for (; k + 8 <= F; k += 8) expand_tile<kT>(U, R, M, F, k, bias, Y, ldy);
  for (; k < F; ++k)  // the last F % 8 features
    for (int t = 0; t < kT; ++t) {
      float sum = bias != nullptr ? bias[k] : 0.0f;
      for (int64_t r = 0; r < R; ++r) sum += U[t * R + r] * M[r * F + k];
      Y[t * ldy + k] = sum;
    }
}

// kR ranks × 8 features of G, summed over all N tokens in registers before one add to G (8 ranks: per
// token 1 load of X and 8 broadcasts of U feed 8 FMAs, and X is read once for all ranks: measured
// twice as fast as 4 ranks × 16 features, which reads X once per 4 ranks).
template <int kR>
DCFT_AVX2 void outer_tile(const float* U, int64_t N, int64_t R, const float* X, int64_t ldx, int64_t k, float* G,
                          int64_t F) {
  __m256 acc[kR];
  for (int r = 0; r < kR; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t n = 0; n < N; ++n) {
    const __m256 x = _mm256_loadu_ps(X + n * ldx + k);
    for (int r = 0; r < kR; ++r) acc[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(U + n * R + r), x, acc[r]);
  }
  for (int r = 0; r < kR; ++r) _mm256_storeu_ps(G + r * F + k, _mm256_add_ps(_mm256_loadu_ps(G + r * F + k), acc[r]));
}

template <int kR>
DCFT_AVX2 void outer_ranks(const float* U, int64_t N, int64_t R, const float* X, int64_t ldx, int64_t F, float* G) {
  int64_t k = 0;
  for (; k + 8 <= F; k += 8) outer_tile<kR>(U, N, R, X, ldx, k, G, F);
  for (; k < F; ++k)  // the last F % 8 features
    for (int r = 0; r < kR; ++r) {
      float sum = 0.0f;
      for (int64_t n = 0; n < N; ++n) sum += U[n * R + r] * X[n * ldx + k];
      G[r * F + k] += sum;
    }
}

}  // namespace

DCFT_AVX2 void shrink(const float* X, int64_t ldx, int64_t N, int64_t F, const float* M, int64_t R, float* out) {
  int64_t n = 0;
  for (; n + 3 <= N; n += 3) shrink_tokens<3>(X + n * ldx, ldx, F, M, R, out + n * R);
  for (; n < N; ++n) shrink_tokens<1>(X + n * ldx, ldx, F, M, R, out + n * R);
}

DCFT_AVX2 void expand(const float* U, int64_t N, int64_t R, const float* M, int64_t F, const float* bias, float* Y,
                      int64_t ldy) {
  int64_t n = 0;
  for (; n + 8 <= N; n += 8) expand_tokens<8>(U + n * R, R, M, F, bias, Y + n * ldy, ldy);
  for (; n + 4 <= N; n += 4) expand_tokens<4>(U + n * R, R, M, F, bias, Y + n * ldy, ldy);
  for (; n < N; ++n) expand_tokens<1>(U + n * R, R, M, F, bias, Y + n * ldy, ldy);
}

DCFT_AVX2 void accumulate_outer(const float* U, int64_t N, int64_t R, const float* X, int64_t ldx, int64_t F,
                                float* G) {
  int64_t r = 0;
  for (; r + 8 <= R; r += 8) outer_ranks<8>(U + r, N, R, X, ldx, F, G + r * F);
  if (r + 4 <= R) outer_ranks<4>(U + r, N, R, X, ldx, F, G + r * F), r += 4;
  if (r + 2 <= R) outer_ranks<2>(U + r, N, R, X, ldx, F, G + r * F), r += 2;
  if (r < R) outer_ranks<1>(U + r, N, R, X, ldx, F, G + r * F);
}

#else  // not x86-64: avx2_enabled() is false and nothing calls these

void shrink(const float*, int64_t, int64_t, int64_t, const float*, int64_t, float*) { std::abort(); }
void expand(const float*, int64_t, int64_t, const float*, int64_t, const float*, float*, int64_t) { std::abort(); }
void accumulate_outer(const float*, int64_t, int64_t, const float*, int64_t, int64_t, float*) { std::abort(); }

#endif

}  // namespace low_rank
}  // namespace dcft_kernels
