// Register-blocked AVX2 + FMA kernels for the rank-r products of LoRA-style adapters (d = 1, fp32)
// over a block of tokens. MKL runs these skinny GEMMs (one dimension is the rank) far below its speed
// on square ones: x·Aᵀ at 2048 × 1024, r = 8, one thread, ran at 14 GFLOP/s, where the layer's own
// 2048 × 1024 × 1024 GEMM runs at ~77 (this project's EPYC). These read each row once, straight from
// the caller's block while it is in cache, and run at 25-55.
//
// All matrices are fp32 and row-major; ld* is a row stride in elements. Sums run in a different order
// than a GEMM library's, so results agree to rounding, not bit for bit.
#pragma once

#include <cstdint>

namespace dcft_kernels {

// Whether the CPU code may use AVX2 + FMA: an x86-64 CPU that has both, and DCFT_KERNELS_NO_AVX2
// unset (it forces the portable code; tests compare the two). Every AVX2 path asks this.
bool avx2_enabled();

namespace low_rank {

// The functions below need avx2_enabled(); callers take another path where it is false.

// out[n][r] = Σ_k X[n][k] · M[r][k]            X: N × F (row stride ldx), M: R × F, out: N × R
void shrink(const float* X, int64_t ldx, int64_t N, int64_t F, const float* M, int64_t R, float* out);

// Y[n][k] = bias[k] + Σ_r U[n][r] · M[r][k]     U: N × R, M: R × F, Y: N × F (row stride ldy);
// bias may be null (zero).
void expand(const float* U, int64_t N, int64_t R, const float* M, int64_t F, const float* bias, float* Y,
            int64_t ldy);

// G[r][k] += Σ_n U[n][r] · X[n][k]              U: N × R, X: N × F (row stride ldx), G: R × F
void accumulate_outer(const float* U, int64_t N, int64_t R, const float* X, int64_t ldx, int64_t F, float* G);

}  // namespace low_rank
}  // namespace dcft_kernels
