// The backward of the sparse linear (spmm.cpp), y = x @ W^T + b with W sparse (M x K), x (N x K):
//
//   - the input gradient dX = dy @ W is the forward kernel itself, spmm_linear run over W^T (a K x M
//     matrix in the same panel layout, whose index structure the caller builds once per topology and
//     whose values it gathers from W's each step: sparse/runtime/linear_grad.py). No kernel of its own:
//     scattering over W's rows instead costs a load, an FMA and a store per vector, and lost clearly.
//   - the gradient of W's kept values, a sampled dense-dense product (SDDMM), is sddmm_linear here:
//     dvalues[p] = sum_n dy[n, m(p)] * x[n, k(p)] for each non-zero p (row m(p), column k(p)), in W's own
//     value order (panel by panel, row by row).
//
// sddmm_linear, per block of W batch rows (W from 8 to 64, chosen by tile_width for N):
//   - the block of dy and the block of x are each packed transposed once (pack_block): dyp[m][c] =
//     dy[W b + c, m], xp[k][c] = x[W b + c, k], zero past N, so the batch is the SIMD axis and a row's
//     (or a column's) W lanes are contiguous.
//   - for each panel, for each row m, the row's non-zeros in groups of 8: each group is 8 dot products
//     of dyp[m] with the xp rows of its 8 columns, sharing every load of dyp[m]; the 8 sums are reduced
//     horizontally together, once per group (a horizontal sum costs several instructions: never one per
//     vector). A row's last 1 to 7 non-zeros go by 4, 2 and 1. A panel of xp (panel x W floats, at most
//     32 KiB) stays in L1 while every row of the panel walks over it.
//   - the block's dot products are stored (first block) or added to the gradient in non-zero order.
// Threads: the blocks are cut into as many contiguous groups as there are threads, each group summing
// into its own partial gradient (the first group straight into the output), so the threads share nothing
// until the end; the partials are then added to the output in group order. With fewer blocks than threads
// (small batches) the non-zeros are cut into ranges as well, each (group, range) item its own thread. The
// partition depends on the thread count only, never on timing, and no float is summed atomically: a
// given thread count gives the same bits every run. Cutting the rows between threads for every batch
// size (no partials) was measured slower. A call with little work runs on one thread.

#include "kernels.h"
#include "tiles.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <memory>
#include <vector>

namespace {

#if SPARSEDIFF_AVX2
// The lane sums of a[0..8): element j of the result is the sum of the 8 lanes of a[j].
inline __m256 lane_sums8(const __m256* a) {
  const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]), t2 = _mm256_hadd_ps(a[4], a[5]),
               t3 = _mm256_hadd_ps(a[6], a[7]);
  // u0 = [a0 a1 a2 a3 (low halves) | a0 a1 a2 a3 (high halves)], u1 the same for a4 .. a7
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// The lane sums of a[0..4).
inline __m128 lane_sums4(const __m256* a) {
  const __m256 u = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  return _mm_add_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps(u, 1));
}

// The sum of the lanes of a.
inline float lane_sum(__m256 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(s);
}
#endif

// out[j] (+)= sum over c < W of d[c] * xb[idx[j] * W + c], for j < G: G dot products sharing the loads of d.
template <int W, int G>
inline void group_dots(const float* d, const float* xb, const int32_t* idx, float* out, bool add) {
  const float* xs[G];
#pragma GCC unroll 8
  for (int j = 0; j < G; ++j) xs[j] = xb + static_cast<int64_t>(idx[j]) * W;
#if SPARSEDIFF_AVX2
  constexpr int R = W / 8;
  __m256 a[G];
#pragma GCC unroll 8
  for (int j = 0; j < G; ++j) a[j] = _mm256_setzero_ps();
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const __m256 dv = _mm256_loadu_ps(d + 8 * r);
#pragma GCC unroll 8
    for (int j = 0; j < G; ++j) a[j] = _mm256_fmadd_ps(dv, _mm256_loadu_ps(xs[j] + 8 * r), a[j]);
  }
  if constexpr (G == 8) {
    const __m256 s = lane_sums8(a);
    _mm256_storeu_ps(out, add ? _mm256_add_ps(_mm256_loadu_ps(out), s) : s);
  } else if constexpr (G == 4) {
    const __m128 s = lane_sums4(a);
    _mm_storeu_ps(out, add ? _mm_add_ps(_mm_loadu_ps(out), s) : s);
  } else {
#pragma GCC unroll 2
    for (int j = 0; j < G; ++j) out[j] = add ? out[j] + lane_sum(a[j]) : lane_sum(a[j]);
  }
#else
  for (int j = 0; j < G; ++j) {
    float s = 0.0f;
    for (int c = 0; c < W; ++c) s += d[c] * xs[j][c];
    out[j] = add ? out[j] + s : s;
  }
#endif
}

// out[z] (+)= the dot product of d with column col[z] of the packed block, for z in [z0, z1).
template <int W>
inline void row_dots(const float* d, const float* xb, const int32_t* col, int64_t z0, int64_t z1, float* out,
                     bool add) {
  int64_t z = z0;
  for (; z + 8 <= z1; z += 8) group_dots<W, 8>(d, xb, col + z, out + z, add);
  if (z + 4 <= z1) group_dots<W, 4>(d, xb, col + z, out + z, add), z += 4;
  if (z + 2 <= z1) group_dots<W, 2>(d, xb, col + z, out + z, add), z += 2;
  if (z < z1) group_dots<W, 1>(d, xb, col + z, out + z, add);
}

// A buffer of `count` floats, left uninitialised (pack_block writes all of it).
inline std::unique_ptr<float[]> scratch(int64_t count) {
  return std::unique_ptr<float[]>(new float[static_cast<size_t>(std::max<int64_t>(count, 1))]);
}

template <int W>
void sddmm_impl(const float* dyd, const float* xd, int64_t n, int64_t m, int64_t k, const int64_t* rp,
                int64_t panels, int64_t panel, const int32_t* col, int64_t nnz, float* out, int64_t grain) {
  const int64_t nblocks = (n + W - 1) / W;
  const bool parallel = nnz * W * nblocks >= grain && at::get_num_threads() > 1;
  const int64_t threads = parallel ? at::get_num_threads() : 1;
  const int64_t groups = std::min(nblocks, threads);
  const int64_t ranges = std::min<int64_t>(std::max<int64_t>(nnz, 1), (threads + groups - 1) / groups);
  std::vector<float> partials(static_cast<size_t>((groups - 1) * nnz));  // group g > 0 sums at (g - 1) * nnz
  auto items = [&](int64_t i0, int64_t i1) {
    auto dyp = scratch(m * W), xp = scratch(k * W);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t g = i / ranges, s = i % ranges;
      const int64_t b0 = g * nblocks / groups, b1 = (g + 1) * nblocks / groups;
      const int64_t lo = s * nnz / ranges, hi = (s + 1) * nnz / ranges;  // this item's non-zeros
      float* dst = g == 0 ? out : partials.data() + (g - 1) * nnz;
      for (int64_t b = b0; b < b1; ++b) {
        pack_block<W>(dyd, n, m, b, dyp.get());
        pack_block<W>(xd, n, k, b, xp.get());
        for (int64_t p = 0; p < panels; ++p) {
          const int64_t* r = rp + p * (m + 1);
          if (r[m] <= lo || r[0] >= hi) continue;
          const float* xb = xp.get() + p * panel * W;
          for (int64_t row = 0; row < m; ++row) {
            const int64_t z0 = std::max(r[row], lo), z1 = std::min(r[row + 1], hi);
            if (z0 < z1) row_dots<W>(dyp.get() + row * W, xb, col, z0, z1, dst, b > b0);
          }
        }
      }
    }
  };
  if (parallel) {
    at::parallel_for(0, groups * ranges, 1, items);
  } else {
    items(0, groups * ranges);
  }
  if (groups > 1) {  // the partials into the output, group after group: a fixed order for every value
    auto reduce = [&](int64_t z0, int64_t z1) {
      for (int64_t g = 1; g < groups; ++g) {
        const float* part = partials.data() + (g - 1) * nnz;
        for (int64_t z = z0; z < z1; ++z) out[z] += part[z];
      }
    };
    at::parallel_for(0, nnz, 1 << 14, reduce);
  }
}

}  // namespace

// dy: (N, M) float32; x: (N, K) float32; row_ptr: (P, M + 1) int64 (P panels of `panel` input features,
// offsets continuing from panel to panel); cols: (nnz) int32, relative to their panel; grain: multiply-adds
// below which one thread runs. Returns dvalues (nnz) float32, in the order of cols.
torch::Tensor sddmm_linear(torch::Tensor dy, torch::Tensor x, torch::Tensor row_ptr, torch::Tensor cols, int64_t panel,
                           int64_t grain) {
  TORCH_CHECK(dy.dim() == 2 && x.dim() == 2 && dy.scalar_type() == torch::kFloat32 &&
                  x.scalar_type() == torch::kFloat32 && dy.size(0) == x.size(0),
              "sddmm_linear: dy (N, M) and x (N, K) float32 expected");
  TORCH_CHECK(row_ptr.dim() == 2 && row_ptr.scalar_type() == torch::kInt64 && cols.scalar_type() == torch::kInt32,
              "sddmm_linear: row_ptr (P, M + 1) int64 and cols int32 expected");
  dy = dy.contiguous();
  x = x.contiguous();
  row_ptr = row_ptr.contiguous();
  cols = cols.contiguous();
  const int64_t n = x.size(0), k = x.size(1), panels = row_ptr.size(0), m = row_ptr.size(1) - 1, nnz = cols.numel();
  TORCH_CHECK(dy.size(1) == m, "sddmm_linear: dy has ", dy.size(1), " columns, the matrix ", m, " rows");
  TORCH_CHECK((panel > 0 && panels == (k + panel - 1) / panel) || (k == 0 && panels <= 1),
              "sddmm_linear: ", panels, " panels of ", panel, " do not cover ", k, " input features");
  const int64_t* rp = row_ptr.data_ptr<int64_t>();
  TORCH_CHECK(panels == 0 ? nnz == 0 : rp[0] == 0 && rp[panels * (m + 1) - 1] == nnz,
              "sddmm_linear: row_ptr does not span the ", nnz, " non-zeros");
  if (n == 0 || nnz == 0) return torch::zeros({nnz}, x.options());
  auto out = torch::empty({nnz}, x.options());
#define SPARSEDIFF_SDDMM(WIDTH)                                                                            \
  sddmm_impl<WIDTH>(dy.data_ptr<float>(), x.data_ptr<float>(), n, m, k, rp, panels, panel, cols.data_ptr<int32_t>(), \
                    nnz, out.data_ptr<float>(), grain)
  SPARSEDIFF_DISPATCH_WIDTH(tile_width(n, std::min<int64_t>(64, linear_width_cap(std::min(panel, k)))),
                            SPARSEDIFF_SDDMM);
#undef SPARSEDIFF_SDDMM
  return out;
}
