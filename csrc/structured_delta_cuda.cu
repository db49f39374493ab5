// CUDA primitives of the structured-delta op's plan (dcft_kernels/plan.py; the math: docs/design.md).
//
// cuBLAS (through ATen, in the plan) does the base GEMMs; three small kernels do the adapter
// without ever building ΔW:
//   shrink_kernel         T[n][r][j] = scale · Σ_{k ≡ j (mod d)} S[r][k / d] · v[n][k]   (one block per token)
//   expand_kernel         out[n][m] += scale · mask · Σ_r P[m / d][r] · V[n][r][m % d]
//   column_reduce_kernel  G[r][k]  = Σ_n V[n][r][k % d] · mask · M[n][k]                (factor gradients)
// and the tiny per-token mixes (C·σ(T)·Kᵀ and its backward) are the plan's batched torch matmuls on
// (tokens, r, d) tensors. Dropout is Philox from the seed, the same stream as Triton's tl.rand.
#include "structured_delta.h"
#include "philox.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace dcft_kernels {
namespace {

// Ranks handled per pass over a token's features: the pass keeps RANK_CHUNK partial sums in
// registers, so x is read (and its dropout mask drawn) ⌈r / RANK_CHUNK⌉ times, once for r ≤ 16.
constexpr int kRankChunk = 16;
constexpr int kThreads = 256;
constexpr int kMaxThreads = 1024;

// 1 / (1 - p) for kept elements, 0 for dropped ones; `keep` is precomputed in float on the host.
template <typename acc_t>
__device__ __forceinline__ acc_t dropout_factor(float p, acc_t keep, int64_t seed, int64_t offset) {
  return philox_uniform(seed, offset) >= p ? keep : acc_t(0);
}

// grid (tokens, ⌈R / kRankChunk⌉). Thread t visits features k ≡ t (mod blockDim.x); blockDim.x is a
// multiple of d, so each thread's k % d is fixed and k / d advances by a constant: no division in
// the loop. Partial sums per (rank, thread) meet in shared memory, folded per residue j = k % d.
template <typename scalar_t, typename acc_t>
__global__ void shrink_kernel(const scalar_t* __restrict__ v, int64_t F, const scalar_t* __restrict__ S,
                              int64_t stride_sr, int64_t stride_sb, int R, int d, acc_t scale, float p,
                              acc_t keep, int64_t seed, acc_t* __restrict__ T) {
  extern __shared__ unsigned char smem[];
  acc_t* partial = reinterpret_cast<acc_t*>(smem);  // [kRankChunk][blockDim.x]
  const int64_t n = blockIdx.x;
  const int r0 = blockIdx.y * kRankChunk;
  const int ranks = min(kRankChunk, R - r0);
  const scalar_t* row = v + n * F;
  acc_t sum[kRankChunk];
#pragma unroll
  for (int i = 0; i < kRankChunk; ++i) sum[i] = acc_t(0);
  const int64_t block_step = blockDim.x / d;
  int64_t b = threadIdx.x / d;
  for (int64_t k = threadIdx.x; k < F; k += blockDim.x, b += block_step) {
    acc_t value = static_cast<acc_t>(row[k]);
    if (p > 0.f) value *= dropout_factor<acc_t>(p, keep, seed, n * F + k);
    const scalar_t* s = S + r0 * stride_sr + b * stride_sb;
#pragma unroll
    for (int i = 0; i < kRankChunk; ++i) {
      if (i < ranks) sum[i] += static_cast<acc_t>(s[i * stride_sr]) * value;
    }
  }
#pragma unroll
  for (int i = 0; i < kRankChunk; ++i) partial[i * blockDim.x + threadIdx.x] = sum[i];
  __syncthreads();
  // Thread (i, j) folds rank r0 + i at residue j: the threads t ≡ j (mod d).
  for (int out = threadIdx.x; out < ranks * d; out += blockDim.x) {
    const int i = out / d, j = out % d;
    acc_t total = 0;
    for (int t = j; t < static_cast<int>(blockDim.x); t += d) total += partial[i * blockDim.x + t];
    T[(n * R + r0 + i) * d + j] = total * scale;
  }
}

// grid (tokens, ⌈F / blockDim⌉): one thread per output element.
template <typename scalar_t, typename acc_t>
__global__ void expand_kernel(scalar_t* __restrict__ out, int64_t F, const acc_t* __restrict__ V,
                              const scalar_t* __restrict__ P, int64_t stride_pm, int64_t stride_pr, int R, int d,
                              acc_t scale, float p, acc_t keep, int64_t seed) {
  const int64_t n = blockIdx.x;
  const int64_t m = blockIdx.y * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (m >= F) return;
  const int64_t block = m / d;  // once per thread, outside the loop
  const acc_t* v = V + n * R * d + (m - block * d);
  const scalar_t* prow = P + block * stride_pm;
  acc_t sum = 0;
  for (int r = 0; r < R; ++r) sum += static_cast<acc_t>(prow[r * stride_pr]) * v[r * d];
  sum *= scale;
  if (p > 0.f) sum *= dropout_factor<acc_t>(p, keep, seed, n * F + m);
  out[n * F + m] = static_cast<scalar_t>(static_cast<acc_t>(out[n * F + m]) + sum);
}

// grid (⌈F / blockDim⌉, splits, ⌈R / kRankChunk⌉): G[split][r][k] = Σ_{n in split} V[n][r][k % d] · mask · M[n][k].
// Each thread keeps kRankChunk sums, so M is read (and its mask drawn) once per rank chunk.
template <typename scalar_t, typename acc_t>
__global__ void column_reduce_kernel(const acc_t* __restrict__ V, const scalar_t* __restrict__ M, int64_t N,
                                     int64_t F, int R, int d, float p, acc_t keep, int64_t seed,
                                     int64_t tokens_per_split, acc_t* __restrict__ G) {
  const int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (k >= F) return;
  const int r0 = blockIdx.z * kRankChunk;
  const int ranks = min(kRankChunk, R - r0);
  const int j = static_cast<int>(k % d);  // once per thread
  const int64_t begin = blockIdx.y * tokens_per_split;
  const int64_t end = min(begin + tokens_per_split, N);
  acc_t sum[kRankChunk];
#pragma unroll
  for (int i = 0; i < kRankChunk; ++i) sum[i] = acc_t(0);
  for (int64_t n = begin; n < end; ++n) {
    acc_t value = static_cast<acc_t>(M[n * F + k]);
    if (p > 0.f) value *= dropout_factor<acc_t>(p, keep, seed, n * F + k);
    const acc_t* v = V + (n * R + r0) * d + j;
#pragma unroll
    for (int i = 0; i < kRankChunk; ++i) {
      if (i < ranks) sum[i] += v[i * d] * value;
    }
  }
  acc_t* g = G + (blockIdx.y * R + r0) * F + k;
#pragma unroll
  for (int i = 0; i < kRankChunk; ++i) {
    if (i < ranks) g[i * F] = sum[i];
  }
}

// ---- launchers ---------------------------------------------------------------------------------

// Threads per shrink block: a multiple of d (each thread's residue k % d then stays fixed).
int shrink_threads(int64_t d) {
  TORCH_CHECK(d <= kMaxThreads, "the CUDA kernels support kernel sizes up to ", kMaxThreads, ", got ", d);
  return d >= kThreads ? static_cast<int>(d) : static_cast<int>((kThreads / d) * d);
}

template <typename acc_t>
acc_t keep_factor(double p) { return static_cast<acc_t>(p > 0.0 ? 1.0 / (1.0 - p) : 1.0); }

template <typename scalar_t>
at::Tensor shrink(const at::Tensor& v, const at::Tensor& S_rb, int64_t d, double scale, double p, int64_t seed) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = v.size(0), F = v.size(1), R = S_rb.size(0);
  auto T = at::empty({N, R, d}, v.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  if (N == 0) return T;
  const int threads = shrink_threads(d);
  const dim3 grid(static_cast<unsigned>(N), static_cast<unsigned>((R + kRankChunk - 1) / kRankChunk));
  const size_t smem = kRankChunk * threads * sizeof(acc_t);
  if (smem > 48 * 1024) {  // beyond the default dynamic shared memory: opt in (large d, fp64)
    C10_CUDA_CHECK(cudaFuncSetAttribute(shrink_kernel<scalar_t, acc_t>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
  }
  shrink_kernel<scalar_t, acc_t><<<grid, threads, smem, c10::cuda::getCurrentCUDAStream()>>>(
      v.template data_ptr<scalar_t>(), F, S_rb.template data_ptr<scalar_t>(), S_rb.stride(0), S_rb.stride(1),
      static_cast<int>(R), static_cast<int>(d), static_cast<acc_t>(scale), static_cast<float>(p),
      keep_factor<acc_t>(p), seed, T.template data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return T;
}

template <typename scalar_t>
void expand_(at::Tensor& out, const at::Tensor& V, const at::Tensor& P_mr, double scale, double p, int64_t seed) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = out.size(0), F = out.size(1), R = V.size(1), d = V.size(2);
  if (N == 0) return;
  const dim3 grid(static_cast<unsigned>(N), static_cast<unsigned>((F + kThreads - 1) / kThreads));
  expand_kernel<scalar_t, acc_t><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      out.template data_ptr<scalar_t>(), F, V.template data_ptr<acc_t>(), P_mr.template data_ptr<scalar_t>(),
      P_mr.stride(0), P_mr.stride(1), static_cast<int>(R), static_cast<int>(d), static_cast<acc_t>(scale),
      static_cast<float>(p), keep_factor<acc_t>(p), seed);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Σ over tokens, then folded to (R, ⌈F/d⌉): out[r][b] = Σ_j G[r][b·d + j].
template <typename scalar_t>
at::Tensor column_reduce(const at::Tensor& V, const at::Tensor& M, int64_t blocks, double p, int64_t seed) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = M.size(0), F = M.size(1), R = V.size(1), d = V.size(2);
  const int64_t splits = std::max<int64_t>(1, std::min<int64_t>(64, N / 256));
  const int64_t per_split = (N + splits - 1) / splits;
  auto G = at::empty({splits, R, F}, V.options());
  const dim3 grid(static_cast<unsigned>((F + kThreads - 1) / kThreads), static_cast<unsigned>(splits),
                  static_cast<unsigned>((R + kRankChunk - 1) / kRankChunk));
  if (N > 0) {
    column_reduce_kernel<scalar_t, acc_t><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        V.template data_ptr<acc_t>(), M.template data_ptr<scalar_t>(), N, F, static_cast<int>(R),
        static_cast<int>(d), static_cast<float>(p), keep_factor<acc_t>(p), seed, per_split,
        G.template data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    G.zero_();
  }
  auto padded = at::zeros({R, blocks * d}, V.options());
  padded.narrow(1, 0, F).copy_(G.sum(0));
  return padded.view({R, blocks, d}).sum(2);
}

}  // namespace

// The plan's primitives (dcft_kernels/plan.py) on the kernels above; the tiny per-token mix between
// them is torch's, in the plan.
at::Tensor shrink_cuda(const at::Tensor& v_in, const at::Tensor& M, int64_t d, double scale, double p,
                       c10::SymInt seed_sym) {
  const int64_t seed = seed_sym.expect_int();  // concrete by the time a kernel runs
  const c10::cuda::CUDAGuard guard(v_in.device());
  const auto v = v_in.contiguous();
  at::Tensor T;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "cpp_shrink_cuda", [&] {
    T = shrink<scalar_t>(v, M.t(), d, scale, p, seed);
  });
  return T;
}

void expand_cuda_(at::Tensor& out, const at::Tensor& U, const at::Tensor& M, double scale, double p,
                  c10::SymInt seed_sym) {
  const int64_t seed = seed_sym.expect_int();
  const c10::cuda::CUDAGuard guard(out.device());
  TORCH_CHECK(out.is_contiguous(), "dcft_kernels cpp_expand_: out must be contiguous");
  TORCH_CHECK(U.scalar_type() == at::toOpMathType(out.scalar_type()), "dcft_kernels cpp_expand_: U must be in the accumulation dtype");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "cpp_expand_cuda", [&] {
    expand_<scalar_t>(out, U.contiguous(), M, scale, p, seed);
  });
}

at::Tensor reduce_cuda(const at::Tensor& v_in, const at::Tensor& U, int64_t blocks, double p, c10::SymInt seed_sym) {
  const int64_t seed = seed_sym.expect_int();
  const c10::cuda::CUDAGuard guard(v_in.device());
  TORCH_CHECK(U.scalar_type() == at::toOpMathType(v_in.scalar_type()), "dcft_kernels cpp_reduce: U must be in the accumulation dtype");
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v_in.scalar_type(), "cpp_reduce_cuda", [&] {
    out = column_reduce<scalar_t>(U.contiguous(), v_in.contiguous(), blocks, p, seed).t().contiguous();
  });
  return out;
}

TORCH_LIBRARY_IMPL(dcft_kernels, CUDA, m) {
  m.impl("cpp_shrink", &shrink_cuda);
  m.impl("cpp_expand_", &expand_cuda_);
  m.impl("cpp_reduce", &reduce_cuda);
}

}  // namespace dcft_kernels
