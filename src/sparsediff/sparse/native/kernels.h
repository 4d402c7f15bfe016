// The entry points of sparsediff's native kernels, as bindings.cpp binds them (one file per concern
// defines them: spmm.cpp, conv.cpp, gru.cpp). Each is declared once more, in Python, in ops.py: its
// operator for torch.compile, its output shapes and, later, its backward.

#pragma once

#include <torch/types.h>

#include <cstdint>
#include <vector>

// y = x @ W^T + b for a sparse W in compressed rows per column panel (spmm.cpp).
torch::Tensor spmm_linear(torch::Tensor x, torch::Tensor row_ptr, torch::Tensor cols, torch::Tensor values,
                          torch::Tensor bias, int64_t panel, int64_t grain, bool transposed);

// The gradient of W's kept values for y = x @ W^T, (dy^T x) at W's non-zeros, in W's order (spmm_backward.cpp).
torch::Tensor sddmm_linear(torch::Tensor dy, torch::Tensor x, torch::Tensor row_ptr, torch::Tensor cols, int64_t panel,
                           int64_t grain);

// Direct sparse convolution, stride 1, zero padding, groups 1 (conv.cpp).
torch::Tensor sparse_conv2d(torch::Tensor x, torch::Tensor row_ptr, torch::Tensor taps, torch::Tensor offsets,
                            torch::Tensor values, torch::Tensor bias, int64_t kh, int64_t kw, int64_t ph, int64_t pw,
                            int64_t dh, int64_t dw, int64_t grain);

// The gradient of a direct sparse convolution's kept taps, dy correlated with x at each (conv_backward.cpp).
torch::Tensor sparse_conv2d_values_grad(torch::Tensor dy, torch::Tensor x, torch::Tensor row_ptr,
                                        torch::Tensor offsets, int64_t kh, int64_t kw, int64_t ph, int64_t pw,
                                        int64_t dh, int64_t dw, int64_t grain);

// Every step of a GRU with a sparse hidden-to-hidden matrix: {outputs, final states} (gru.cpp).
std::vector<torch::Tensor> gru_recurrence(torch::Tensor gi, torch::Tensor row_ptr, torch::Tensor cols,
                                          torch::Tensor values, torch::Tensor b_hh, torch::Tensor h0,
                                          torch::Tensor lengths, bool reverse);

// The same for training, also saving the gates: {outputs, final states, gates (T, 4H, B)} (gru.cpp).
std::vector<torch::Tensor> gru_recurrence_train(torch::Tensor gi, torch::Tensor row_ptr, torch::Tensor cols,
                                                torch::Tensor values, torch::Tensor b_hh, torch::Tensor h0,
                                                torch::Tensor lengths, bool reverse);

// The GRU's backward through time over W_hh^T in CSR: {dgi, dgh (3H, T, B), dh0 (B, H)} (gru_backward.cpp).
std::vector<torch::Tensor> gru_recurrence_backward(torch::Tensor dout, torch::Tensor dlast, torch::Tensor gates,
                                                   torch::Tensor out, torch::Tensor h0, torch::Tensor t_row_ptr,
                                                   torch::Tensor t_cols, torch::Tensor t_values,
                                                   torch::Tensor lengths, bool reverse);
