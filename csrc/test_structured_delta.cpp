// ctest program: the C++ forward (through the dispatcher, as Python calls it) against a dense
// y = x (W + s·kron(B·C·A, K)[:out, :in])ᵀ + b, over odd shapes, kernel sizes, ranks and dtypes.
#include <torch/torch.h>

#include <cstdio>

namespace {

bool check(int64_t n, int64_t in, int64_t out, int64_t d, int64_t r, bool with_core, torch::Dtype dtype) {
  const int64_t n_in = (in + d - 1) / d, n_out = (out + d - 1) / d;
  auto opts = torch::TensorOptions().dtype(torch::kFloat64);
  auto x = torch::randn({n, in}, opts), w = torch::randn({out, in}, opts) / std::sqrt(double(in));
  auto b = torch::randn({out}, opts), A = torch::randn({r, n_in}, opts), B = torch::randn({n_out, r}, opts);
  auto C = torch::randn({r, r}, opts), K = torch::randn({d, d}, opts);
  const double s = 0.75;

  auto small = with_core ? B.mm(C).mm(A) : B.mm(A);
  auto delta = torch::kron(small, K).narrow(0, 0, out).narrow(1, 0, in);
  auto expected = torch::addmm(b, x, (w + s * delta).t());

  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("dcft_kernels::cpp_forward", "").typed<
      std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                                         const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                                         const c10::optional<at::Tensor>&, double, double, c10::SymInt)>();
  auto cast = [&](const at::Tensor& t) { return t.to(dtype); };
  c10::optional<at::Tensor> core = with_core ? c10::optional<at::Tensor>(cast(C)) : c10::nullopt;
  auto [y, T, keep] = op.call(cast(x), cast(w), cast(b), cast(A), cast(B), core, cast(K), s, 0.0, c10::SymInt(0));

  const double tol = dtype == torch::kFloat32 ? 1e-4 : 2e-2;
  const double err = (y.to(torch::kFloat64) - expected).abs().max().item<double>();
  const double scale = std::max(expected.abs().max().item<double>(), 1.0);
  const bool ok = err <= tol * scale && T.size(0) == n && T.size(1) == r * d;
  std::printf("%s n=%lld in=%lld out=%lld d=%lld r=%lld core=%d %s: max err %.3g\n", ok ? "ok  " : "FAIL",
              (long long)n, (long long)in, (long long)out, (long long)d, (long long)r, int(with_core),
              c10::toString(dtype), err);
  return ok;
}

}  // namespace

int main() {
  torch::manual_seed(0);
  bool ok = true;
  for (auto dtype : {torch::kFloat32, torch::kBFloat16})
    for (int64_t d : {1, 2, 3, 4, 8})
      for (int64_t r : {1, 2, 4}) ok &= check(37, 45, 29, d, r, r == 2, dtype);
  ok &= check(64, 1024, 1024, 8, 1, false, torch::kFloat32);
  std::printf("%s\n", ok ? "all passed" : "FAILED");
  return ok ? 0 : 1;
}
