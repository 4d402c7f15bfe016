// SpMM for sparse linears (CPU): the forward product of SparseLinear.
//
// spmm_linear: y = x @ W^T + b for a sparse W (M x K), x dense (N x K), y (N x M).
//
// Layout of W: cut into column panels of `panel` input features (all of K when K is small); within a
// panel, row by row (CSR): row_ptr[p, m] .. row_ptr[p, m + 1] index `cols` (relative to the panel) and
// `values`.
//
// Per work item (a block of W input rows -- W from 8 to 112, chosen by tile_width for N and capped so
// that a panel of the packed block fits L1 -- and a range
// of output rows):
//   - the block of x is packed transposed into a thread-local buffer: xp[k][c] = x[W b + c, k]
//     (zero-padded past N). Rows of x have a power-of-two stride in typical models; reading them in place
//     would thrash the cache, the packed block is contiguous.
//   - for each panel, for each output row: the output tile of one row x W columns lives in W / 8 AVX
//     registers; each non-zero costs one broadcast and W / 8 fused multiply-adds. Narrow tiles (W < 40)
//     take two or four rows side by side, so that enough independent sums hide the FMA latency. A panel of the packed
//     block (panel x 4 W bytes) stays in L1 while all rows walk over it; partial sums of the earlier
//     panels wait in a small accumulator buffer.
//   - the accumulators are written to y transposed back to (N x M), bias added.
// Work items are split over torch's intra-op threads (OpenMP); a call with little work runs on one
// thread, since starting threads would cost more than it saves. With few blocks (small batches) the
// rows are split as well, so both threads have work. CPUs without AVX2/FMA take a portable scalar path.
//
// Its backward sits next to it: the input gradient is this kernel over W^T (a transposed copy of the index
// structure), the values gradient at the non-zeros is spmm_backward.cpp's SDDMM, on the same tiles.

#include "kernels.h"
#include "tiles.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace {

// y[c][r0 + r] = acc[r][c] + bias[r0 + r] for r < nr, c < nc (acc has rows of W floats, y rows of m)
template <int W>
void unpack_tile(const float* acc, int64_t nr, int64_t nc, const float* bias, float* y, int64_t m) {
  alignas(32) float t[64];
  int64_t r = 0;
  for (; r + 8 <= nr; r += 8) {
    int64_t c = 0;
    for (; c + 8 <= nc; c += 8) {
      transpose8(acc + r * W + c, W, t, 8);
      for (int j = 0; j < 8; ++j) {
        float* dst = y + (c + j) * m + r;
        for (int i = 0; i < 8; ++i) dst[i] = t[j * 8 + i] + (bias ? bias[r + i] : 0.0f);
      }
    }
    for (; c < nc; ++c)
      for (int i = 0; i < 8; ++i) y[c * m + r + i] = acc[(r + i) * W + c] + (bias ? bias[r + i] : 0.0f);
  }
  for (; r < nr; ++r)
    for (int64_t c = 0; c < nc; ++c) y[c * m + r] = acc[r * W + c] + (bias ? bias[r] : 0.0f);
}

// yt[r0 + r][c] = acc[r][c] + bias[r0 + r] for r < nr, c < nc (the transposed output, rows of n floats)
template <int W>
void store_tile(const float* acc, int64_t nr, int64_t nc, const float* bias, float* yt, int64_t n) {
  for (int64_t r = 0; r < nr; ++r) {
    const float b = bias ? bias[r] : 0.0f;
    for (int64_t c = 0; c < nc; ++c) yt[r * n + c] = acc[r * W + c] + b;
  }
}

template <int W>
void spmm_impl(const float* xd, int64_t n, int64_t k, const int64_t* rp, int64_t panels, int64_t panel, int64_t m,
               const int32_t* col, const float* val, int64_t nnz, const float* bd, float* yd, bool transposed,
               int64_t grain) {
  const int64_t nblocks = (n + W - 1) / W;
  const bool parallel = (nnz + m) * W * nblocks >= grain && at::get_num_threads() > 1;
  const int64_t threads = parallel ? at::get_num_threads() : 1;
  // few blocks: split the rows too, so every thread has work
  const int64_t splits = std::min<int64_t>(m, std::max<int64_t>(1, (threads + nblocks - 1) / nblocks));
  const int64_t rows_per = (m + splits - 1) / splits;
  auto body = [&](int64_t i0, int64_t i1) {
    std::vector<float> packed(static_cast<size_t>(std::max<int64_t>(k, 1) * W));
    std::vector<float> acc(static_cast<size_t>(rows_per * W), 0.0f);
    int64_t packed_block = -1;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / splits, r0 = (i % splits) * rows_per, r1 = std::min(m, r0 + rows_per);
      if (r0 >= r1) continue;
      if (b != packed_block) {
        pack_block<W>(xd, n, k, b, packed.data());
        packed_block = b;
      }
      if (panels == 0) std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t p = 0; p < panels; ++p) {
        const float* xb = packed.data() + p * panel * W;
        const int64_t* r = rp + p * (m + 1);
        tile_rows<W, W>(col, val, r + r0, r + r0 + 1, 1, r1 - r0, xb, acc.data(), W, p > 0);
      }
      const int64_t cols = std::min<int64_t>(W, n - b * W);
      if (transposed)
        store_tile<W>(acc.data(), r1 - r0, cols, bd ? bd + r0 : nullptr, yd + r0 * n + b * W, n);
      else
        unpack_tile<W>(acc.data(), r1 - r0, cols, bd ? bd + r0 : nullptr, yd + b * W * m + r0, m);
    }
  };
  if (parallel) {
    at::parallel_for(0, nblocks * splits, 1, body);
  } else {
    body(0, nblocks * splits);
  }
}

}  // namespace

// x: (N, K) float32; row_ptr: (P, M + 1) int64 (P panels of `panel` input features); cols: (nnz) int32,
// relative to their panel; values: (nnz) float32; bias: (M) float32 or empty; grain: multiply-adds below
// which one thread runs. Returns y (N, M), or its transpose (M, N) when `transposed` (the kernel's own
// order: no transposition at all).
torch::Tensor spmm_linear(torch::Tensor x, torch::Tensor row_ptr, torch::Tensor cols, torch::Tensor values,
                          torch::Tensor bias, int64_t panel, int64_t grain, bool transposed) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "spmm_linear: x must be a 2-D float32 tensor");
  TORCH_CHECK(row_ptr.dim() == 2 && row_ptr.scalar_type() == torch::kInt64 && cols.scalar_type() == torch::kInt32 &&
                  values.scalar_type() == torch::kFloat32,
              "spmm_linear: row_ptr (P, M + 1) int64, cols int32 and values float32 expected");
  x = x.contiguous();
  row_ptr = row_ptr.contiguous();
  const int64_t n = x.size(0), k = x.size(1), panels = row_ptr.size(0), m = row_ptr.size(1) - 1;
  TORCH_CHECK((panel > 0 && panels == (k + panel - 1) / panel) || (k == 0 && panels <= 1),
              "spmm_linear: ", panels, " panels of ", panel, " do not cover ", k, " input features");
  auto y = transposed ? torch::empty({m, n}, x.options()) : torch::empty({n, m}, x.options());
  if (n == 0 || m == 0) return y;
  const bool has_bias = bias.numel() > 0;
  TORCH_CHECK(!has_bias || bias.numel() == m, "spmm_linear: bias has ", bias.numel(), " entries, expected ", m);
  if (has_bias) bias = bias.contiguous();
  const float* bd = has_bias ? bias.data_ptr<float>() : nullptr;
#define SPARSEDIFF_SPMM(WIDTH)                                                                                \
  spmm_impl<WIDTH>(x.data_ptr<float>(), n, k, row_ptr.data_ptr<int64_t>(), panels, panel, m, cols.data_ptr<int32_t>(), \
                   values.data_ptr<float>(), values.numel(), bd, y.data_ptr<float>(), transposed, grain)
  SPARSEDIFF_DISPATCH_WIDTH(tile_width(n, linear_width_cap(std::min(panel, k))), SPARSEDIFF_SPMM);
#undef SPARSEDIFF_SPMM
  return y;
}
