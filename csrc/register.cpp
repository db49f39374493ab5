// Operator schemas: torch.ops.dcft_kernels.cpp_* (visible to torch.compile).
// The dropout seed is a SymInt: under torch.compile it is drawn afresh on every call of the graph.
#include "structured_delta.h"

TORCH_LIBRARY(dcft_kernels, m) {
  m.def(
      "cpp_forward(Tensor x, Tensor weight, Tensor? bias, Tensor A, Tensor B, Tensor? core, Tensor? kernel, "
      "float scaling, float p, SymInt seed) -> (Tensor, Tensor, Tensor)");
  m.def(
      "cpp_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor A, Tensor B, Tensor? core, Tensor? kernel, "
      "Tensor T, Tensor keep, float scaling, float p, bool need_x, bool need_a, bool need_b, bool need_c, "
      "bool need_k) -> Tensor[]");
  // The primitives of dcft_kernels/plan.py (DCFT layout, any d), for the cases cpp_forward does not fuse.
  m.def("cpp_shrink(Tensor v, Tensor M, int d, float scale, float p, SymInt seed) -> Tensor");
  m.def("cpp_expand_(Tensor(a!) out, Tensor U, Tensor M, float scale, float p, SymInt seed) -> ()");
  m.def("cpp_reduce(Tensor v, Tensor U, int blocks, float p, SymInt seed) -> Tensor");
  // How many threads the extension's at::parallel_for(0, n) runs on: a check of the build (see setup.py).
  m.def("cpp_threads_used(int n) -> int", &dcft_kernels::cpu_threads_used);
}
