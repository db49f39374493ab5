// The structured-delta op: y = x Wᵀ + b + s · drop(x) ((B·C·A) ⊗ K)ᵀ, never building ΔW.
// Schemas are defined once in register.cpp; CPU and CUDA files register implementations.
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>

#include <tuple>
#include <vector>

namespace dcft_kernels {

// Returns (y, T, keep): T = A·drop(X) per token, (tokens, r·d), in the accumulation dtype; keep the
// dropout keep-bits of x, (tokens, ceil(in / 64)) int64 (no rows without dropout).
std::tuple<at::Tensor, at::Tensor, at::Tensor> structured_delta_forward_cpu(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, const at::Tensor& A,
    const at::Tensor& B, const c10::optional<at::Tensor>& core, const c10::optional<at::Tensor>& kernel,
    double scaling, double p, c10::SymInt seed_sym);

// Returns [dx, dA, dB, dC, dK]; an entry not asked for is an empty tensor.
std::vector<at::Tensor> structured_delta_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& A,
    const at::Tensor& B, const c10::optional<at::Tensor>& core, const c10::optional<at::Tensor>& kernel,
    const at::Tensor& T, const at::Tensor& keep, double scaling, double p, bool need_x, bool need_a, bool need_b,
    bool need_c, bool need_k);

// The number of distinct threads at::parallel_for(0, n, 1, ...) runs on in this extension: min(n, torch's
// threads) when it is compiled with OpenMP, else 1 (at::parallel_for is a header template that runs a
// serial loop in a file compiled without it).
int64_t cpu_threads_used(int64_t n);

}  // namespace dcft_kernels
