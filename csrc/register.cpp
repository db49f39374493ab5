// Operator schemas: torch.ops.dcft_kernels.cpp_forward / cpp_backward (visible to torch.compile).
// The dropout seed is a SymInt: under torch.compile it is drawn afresh on every call of the graph.
#include "structured_delta.h"

TORCH_LIBRARY(dcft_kernels, m) {
  m.def(
      "cpp_forward(Tensor x, Tensor weight, Tensor? bias, Tensor A, Tensor B, Tensor? core, Tensor? kernel, "
      "float scaling, float p, SymInt seed) -> (Tensor, Tensor)");
  m.def(
      "cpp_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor A, Tensor B, Tensor? core, Tensor? kernel, "
      "Tensor T, float scaling, float p, SymInt seed, bool need_x, bool need_a, bool need_b, bool need_c, "
      "bool need_k) -> Tensor[]");
}
