// The kernel module: every native kernel bound in one place, under the name its declaration in ops.py
// carries (ops.py turns each into a torch operator for torch.compile).

#include <torch/extension.h>

#include "kernels.h"
#include "tiles.h"

namespace {

bool has_avx2() { return SPARSEDIFF_AVX2; }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("spmm_linear", &spmm_linear, "y = x @ W^T + b with W sparse (CSR per column panel)");
  mod.def("sddmm_linear", &sddmm_linear, "the values' gradient of a sparse linear, (dy^T x) at W's non-zeros");
  mod.def("sparse_conv2d", &sparse_conv2d, "direct sparse convolution, stride 1, zero padding, groups 1");
  mod.def("sparse_conv2d_values_grad", &sparse_conv2d_values_grad, "the kept taps' gradient of a sparse convolution");
  mod.def("gru_recurrence", &gru_recurrence, "GRU steps with a sparse hidden-to-hidden matrix");
  mod.def("gru_recurrence_train", &gru_recurrence_train, "the GRU steps, saving the gates for the backward");
  mod.def("gru_recurrence_backward", &gru_recurrence_backward, "the GRU's backward through time");
  mod.def("has_avx2", &has_avx2, "whether the kernels were compiled with AVX2/FMA");
}
