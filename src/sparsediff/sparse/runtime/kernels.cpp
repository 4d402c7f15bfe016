// sparsediff native sparse kernels (CPU).
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

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define SPARSEDIFF_AVX2 1
#else
#define SPARSEDIFF_AVX2 0
#endif

namespace {

// Transpose an 8 x 8 block: dst[j * ld_dst + i] = src[i * ld_src + j] for i, j < 8.
inline void transpose8(const float* src, int64_t ld_src, float* dst, int64_t ld_dst) {
#if SPARSEDIFF_AVX2
  __m256 r0 = _mm256_loadu_ps(src + 0 * ld_src), r1 = _mm256_loadu_ps(src + 1 * ld_src),
         r2 = _mm256_loadu_ps(src + 2 * ld_src), r3 = _mm256_loadu_ps(src + 3 * ld_src),
         r4 = _mm256_loadu_ps(src + 4 * ld_src), r5 = _mm256_loadu_ps(src + 5 * ld_src),
         r6 = _mm256_loadu_ps(src + 6 * ld_src), r7 = _mm256_loadu_ps(src + 7 * ld_src);
  const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1), t2 = _mm256_unpacklo_ps(r2, r3),
               t3 = _mm256_unpackhi_ps(r2, r3), t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5),
               t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE),
               u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE),
               u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE),
               u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  _mm256_storeu_ps(dst + 0 * ld_dst, _mm256_permute2f128_ps(u0, u4, 0x20));
  _mm256_storeu_ps(dst + 1 * ld_dst, _mm256_permute2f128_ps(u1, u5, 0x20));
  _mm256_storeu_ps(dst + 2 * ld_dst, _mm256_permute2f128_ps(u2, u6, 0x20));
  _mm256_storeu_ps(dst + 3 * ld_dst, _mm256_permute2f128_ps(u3, u7, 0x20));
  _mm256_storeu_ps(dst + 4 * ld_dst, _mm256_permute2f128_ps(u0, u4, 0x31));
  _mm256_storeu_ps(dst + 5 * ld_dst, _mm256_permute2f128_ps(u1, u5, 0x31));
  _mm256_storeu_ps(dst + 6 * ld_dst, _mm256_permute2f128_ps(u2, u6, 0x31));
  _mm256_storeu_ps(dst + 7 * ld_dst, _mm256_permute2f128_ps(u3, u7, 0x31));
#else
  for (int i = 0; i < 8; ++i)
    for (int j = 0; j < 8; ++j) dst[j * ld_dst + i] = src[i * ld_src + j];
#endif
}

// dst[k][c] = x[b * W + c][k] for c < rows, 0 for c >= rows
template <int W>
void pack_block(const float* x, int64_t n, int64_t k, int64_t b, float* dst) {
  const int64_t rows = std::min<int64_t>(W, n - b * W);
  if (rows < W) std::memset(dst, 0, sizeof(float) * k * W);
  const float* base = x + b * W * k;
  int64_t c = 0;
  for (; c + 8 <= rows; c += 8) {
    int64_t kk = 0;
    for (; kk + 8 <= k; kk += 8) transpose8(base + c * k + kk, k, dst + kk * W + c, W);
    for (; kk < k; ++kk)
      for (int j = 0; j < 8; ++j) dst[kk * W + c + j] = base[(c + j) * k + kk];
  }
  for (; c < rows; ++c)
    for (int64_t kk = 0; kk < k; ++kk) dst[kk * W + c] = base[c * k + kk];
}

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

// acc[0..W) (+)= sum over p in [begin, end) of val[p] * xb[idx[p] * S .. idx[p] * S + W)
// (S = W for a packed block, whose row k starts at k * W; S = 1 when idx holds element offsets)
template <int W, int S>
inline void row_tile(const int32_t* idx, const float* val, int64_t begin, int64_t end, const float* xb,
                     float* acc, bool add) {
#if SPARSEDIFF_AVX2
  constexpr int R = W / 8;
  __m256 a[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) a[r] = add ? _mm256_loadu_ps(acc + 8 * r) : _mm256_setzero_ps();
  for (int64_t p = begin; p < end; ++p) {
    const __m256 v = _mm256_broadcast_ss(val + p);
    const float* xk = xb + static_cast<int64_t>(idx[p]) * S;
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) a[r] = _mm256_fmadd_ps(v, _mm256_loadu_ps(xk + 8 * r), a[r]);
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) _mm256_storeu_ps(acc + 8 * r, a[r]);
#else
  if (!add) std::memset(acc, 0, sizeof(float) * W);
  for (int64_t p = begin; p < end; ++p) {
    const float v = val[p];
    const float* xk = xb + static_cast<int64_t>(idx[p]) * S;
    for (int c = 0; c < W; ++c) acc[c] += v * xk[c];
  }
#endif
}

// yt[r0 + r][c] = acc[r][c] + bias[r0 + r] for r < nr, c < nc (the transposed output, rows of n floats)
template <int W>
void store_tile(const float* acc, int64_t nr, int64_t nc, const float* bias, float* yt, int64_t n) {
  for (int64_t r = 0; r < nr; ++r) {
    const float b = bias ? bias[r] : 0.0f;
    for (int64_t c = 0; c < nc; ++c) yt[r * n + c] = acc[r * W + c] + b;
  }
}

// Rows of a tile computed together: a narrow tile (W / 8 registers) has too few independent sums to hide
// the FMA latency (4 cycles, 2 per cycle), so up to eight registers' worth of rows go side by side.
template <int W>
constexpr int joint_rows() {
  return W >= 40 ? 1 : (W >= 24 ? 2 : 4);
}

// row_tile for ROWS rows: row i sums its non-zeros lo[i * step] .. hi[i * step] into acc + i * acc_step
// (added to when `add`). The rows advance together for as many non-zeros as the shortest has; each then
// finishes alone.
template <int W, int S, int ROWS>
inline void rows_tile(const int32_t* idx, const float* val, const int64_t* lo, const int64_t* hi, int64_t step,
                      const float* xb, float* acc, int64_t acc_step, bool add) {
#if SPARSEDIFF_AVX2
  if (ROWS > 1) {
    constexpr int R = W / 8;
    __m256 a[ROWS][R];
    int64_t begin[ROWS], common = hi[0] - lo[0];
#pragma GCC unroll 4
    for (int i = 0; i < ROWS; ++i) {
      begin[i] = lo[i * step];
      common = std::min<int64_t>(common, hi[i * step] - begin[i]);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) a[i][r] = add ? _mm256_loadu_ps(acc + i * acc_step + 8 * r) : _mm256_setzero_ps();
    }
    for (int64_t q = 0; q < common; ++q) {
#pragma GCC unroll 4
      for (int i = 0; i < ROWS; ++i) {
        const __m256 v = _mm256_broadcast_ss(val + begin[i] + q);
        const float* xk = xb + static_cast<int64_t>(idx[begin[i] + q]) * S;
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) a[i][r] = _mm256_fmadd_ps(v, _mm256_loadu_ps(xk + 8 * r), a[i][r]);
      }
    }
#pragma GCC unroll 4
    for (int i = 0; i < ROWS; ++i) {
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) _mm256_storeu_ps(acc + i * acc_step + 8 * r, a[i][r]);
      row_tile<W, S>(idx, val, begin[i] + common, hi[i * step], xb, acc + i * acc_step, true);
    }
    return;
  }
#endif
  for (int i = 0; i < ROWS; ++i) row_tile<W, S>(idx, val, lo[i * step], hi[i * step], xb, acc + i * acc_step, add);
}

// Rows 0 .. rows - 1 of a tile (row i: non-zeros lo[i * step] .. hi[i * step], sums at acc + i * acc_step),
// joint_rows<W>() at a time, the rest one by one.
template <int W, int S>
inline void tile_rows(const int32_t* idx, const float* val, const int64_t* lo, const int64_t* hi, int64_t step,
                      int64_t rows, const float* xb, float* acc, int64_t acc_step, bool add) {
  constexpr int J = joint_rows<W>();
  int64_t i = 0;
  for (; i + J <= rows; i += J)
    rows_tile<W, S, J>(idx, val, lo + i * step, hi + i * step, step, xb, acc + i * acc_step, acc_step, add);
  for (; i < rows; ++i) row_tile<W, S>(idx, val, lo[i * step], hi[i * step], xb, acc + i * acc_step, add);
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

// The tile width for `count` columns (batch rows of a linear, output positions of a convolution). Per
// non-zero a tile of width w costs w / 8 FMAs plus about two instructions of its own (the broadcast, the
// index): the width minimising tiles x (w / 8 + 2) balances padding waste against that overhead.
int tile_width(int64_t count, int64_t max_width = 112) {
  static const int widths[] = {8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112};
  int best = 8;
  int64_t best_cost = (count + 7) / 8 * (8 / 8 + 2);
  for (int w : widths) {
    if (w > max_width) break;
    const int64_t cost = (count + w - 1) / w * (w / 8 + 2);
    if (cost < best_cost) best = w, best_cost = cost;
  }
  return best;
}

// The widest tile whose packed panel (rows x width floats) fits a 32 KiB L1 cache. Every non-zero reads
// a row of the panel at a random place, which costs more from L2 than from L1 (measured: a 1536 x 384
// layer at density 0.1, 2 threads, went from 3.4x to 4.3x over dense once its tiles were capped).
int64_t linear_width_cap(int64_t rows) {
  constexpr int64_t l1_floats = 8192;
  return std::max<int64_t>(8, l1_floats / std::max<int64_t>(rows, 1) / 8 * 8);
}

}  // namespace

#define SPARSEDIFF_DISPATCH_WIDTH(width, CALL) \
  switch (width) {                             \
    case 8: CALL(8); break;                    \
    case 16: CALL(16); break;                  \
    case 24: CALL(24); break;                  \
    case 32: CALL(32); break;                  \
    case 40: CALL(40); break;                  \
    case 48: CALL(48); break;                  \
    case 56: CALL(56); break;                  \
    case 80: CALL(80); break;                  \
    case 96: CALL(96); break;                  \
    case 112: CALL(112); break;                \
    default: CALL(64); break;                  \
  }

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

// Direct sparse convolution (stride 1, zero padding, any kernel size and dilation, groups 1).
//
// The input is zero-padded once into a contiguous buffer: image b, channel c at
// xp + (b * C + c) * Hp * Wp. An output pixel (h, w) of image b is computed at position q = h * Wp + w of
// the padded grid; a tap (c, ky, kx) of the kernel then reads xp at q + c * Hp * Wp + ky * dh * Wp +
// kx * dw, so W consecutive positions read W consecutive floats. Each non-zero weight is one broadcast
// and W / 8 FMAs over W output positions, with no im2col; the (Wp - Wo) positions at the end of each
// padded row are computed and dropped. W (8 to 112) is chosen by tile_width for the positions of an image.
// Weights are stored by output channel (CSR) with the tap code c * KH * KW + ky * KW + kx; the caller
// turns codes into offsets once per input size.
namespace {

template <int W>
void conv_impl(const float* xp, int64_t nb, int64_t c_in, int64_t c_out, int64_t image, int64_t positions,
               int64_t wp, int64_t ho, int64_t wo, int64_t halo, int64_t taps_per_channel, const int64_t* rp,
               const int32_t* code, const int32_t* off, const float* val, const float* bd, float* yd, bool parallel) {
  const int64_t tiles = (positions + W - 1) / W;
  // Channel panels: the input a tile reads from one panel (cp channels x (W + halo) floats) fits L1. A
  // row's non-zeros are sorted by channel, so each panel's share of a row is a contiguous range, found
  // once per call (seg) for this input size.
  constexpr int64_t l1_floats = 6144;  // 24 KiB of input; the rest of a 32 KiB L1 holds sums and weights
  const int64_t widest = std::max<int64_t>(1, l1_floats / (W + halo));
  const int64_t panels = (c_in + widest - 1) / widest;
  const int64_t cp = (c_in + panels - 1) / panels;  // panels of (nearly) equal width
  std::vector<int64_t> seg(static_cast<size_t>(c_out * (panels + 1)));
  auto segments = [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o) {
      int64_t p = rp[o];
      for (int64_t q = 0; q < panels; ++q) {
        seg[o * (panels + 1) + q] = p;
        while (p < rp[o + 1] && code[p] < (q + 1) * cp * taps_per_channel) ++p;
      }
      seg[o * (panels + 1) + panels] = rp[o + 1];
    }
  };
  if (parallel) {
    at::parallel_for(0, c_out, 16, segments);
  } else {
    segments(0, c_out);
  }
  // Work item: (image, tile, range of output channels); the ranges split only when there are too few
  // tiles to keep every thread busy. Within an item, output channels go in chunks whose sums (chunk x W
  // floats) stay in L1 next to the panel they read.
  constexpr int64_t chunk = 16;
  const int64_t threads = parallel ? at::get_num_threads() : 1;
  const int64_t splits = std::min<int64_t>(c_out, std::max<int64_t>(1, (2 * threads + nb * tiles - 1) / (nb * tiles)));
  const int64_t per_split = (c_out + splits - 1) / splits;
  auto body = [&](int64_t i0, int64_t i1) {
    std::vector<float> acc(static_cast<size_t>(chunk * W));
    for (int64_t i = i0; i < i1; ++i) {  // i = (b * tiles + t) * splits + s
      const int64_t s = i % splits, t = (i / splits) % tiles, b = i / (splits * tiles);
      const int64_t first = t * W, count = std::min<int64_t>(W, positions - first);
      const float* xt = xp + b * image + first;
      for (int64_t o0 = s * per_split, o_end = std::min(c_out, o0 + per_split); o0 < o_end; o0 += chunk) {
        const int64_t o1 = std::min(o_end, o0 + chunk);
        for (int64_t q = 0; q < panels; ++q) {
          const int64_t* sq = seg.data() + o0 * (panels + 1) + q;  // channel o0 + i, panel q: sq[i * (panels + 1)]
          tile_rows<W, 1>(off, val, sq, sq + 1, panels + 1, o1 - o0, xt, acc.data(), W, q > 0);
        }
        for (int64_t o = o0; o < o1; ++o) {  // write back, dropping the padded grid's extra columns
          const float* a = acc.data() + (o - o0) * W;
          float* dst = yd + (b * c_out + o) * ho * wo;
          const float bias_o = bd ? bd[o] : 0.0f;
          // the tile's positions, padded row by padded row: the first wo of each row are outputs
          for (int64_t e = 0; e < count;) {
            const int64_t r = (first + e) / wp, col = (first + e) % wp, run = std::min(count - e, wp - col);
            const float* src = a + e;
            float* out = dst + r * wo + col;
            for (int64_t c = 0, valid = std::max<int64_t>(0, std::min(run, wo - col)); c < valid; ++c)
              out[c] = src[c] + bias_o;
            e += run;
          }
        }
      }
    }
  };
  if (parallel) {
    at::parallel_for(0, nb * tiles * splits, 1, body);
  } else {
    body(0, nb * tiles * splits);
  }
}

}  // namespace

// offsets: each non-zero's place in the padded input for this input size, c * Hp * Wp + ky * dh * Wp + kx * dw
// (the caller computes them once per size: see SparseConv).
torch::Tensor sparse_conv2d(torch::Tensor x, torch::Tensor row_ptr, torch::Tensor taps, torch::Tensor offsets,
                            torch::Tensor values, torch::Tensor bias, int64_t kh, int64_t kw, int64_t ph, int64_t pw,
                            int64_t dh, int64_t dw, int64_t grain) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == torch::kFloat32, "sparse_conv2d: x must be (B, C, H, W) float32");
  TORCH_CHECK(row_ptr.scalar_type() == torch::kInt64 && taps.scalar_type() == torch::kInt32 &&
                  offsets.scalar_type() == torch::kInt32 && values.scalar_type() == torch::kFloat32 &&
                  offsets.numel() == values.numel() && taps.numel() == values.numel(),
              "sparse_conv2d: row_ptr int64, taps and offsets int32 (one per value) and values float32 expected");
  offsets = offsets.contiguous();
  x = x.contiguous();
  const int64_t nb = x.size(0), c_in = x.size(1), h = x.size(2), w = x.size(3), c_out = row_ptr.numel() - 1;
  const int64_t hp = h + 2 * ph, wp = w + 2 * pw;
  const int64_t ho = hp - dh * (kh - 1), wo = wp - dw * (kw - 1);
  TORCH_CHECK(ho > 0 && wo > 0, "sparse_conv2d: the kernel is larger than the padded input");
  auto y = torch::empty({nb, c_out, ho, wo}, x.options());
  if (nb == 0 || c_out == 0) return y;
  const bool has_bias = bias.numel() > 0;
  TORCH_CHECK(!has_bias || bias.numel() == c_out, "sparse_conv2d: bias has ", bias.numel(), " entries, expected ",
              c_out);
  if (has_bias) bias = bias.contiguous();
  const int64_t plane = hp * wp, image = c_in * plane;
  const int64_t positions = ho * wp;  // output positions computed per image (on the padded grid)
  // slack: the last tile of the last image reads up to one (widest) tile past its end. The buffer is not
  // cleared as a whole (a serial pass over all of it); each plane writes its own zero border below.
  const int64_t slack = 2 * 128 + wp;
  auto buffer = torch::empty({nb * image + slack}, x.options());
  float* xp = buffer.data_ptr<float>();
  std::memset(xp + nb * image, 0, sizeof(float) * slack);
  const float* xd = x.data_ptr<float>();
  const int64_t nnz = values.numel();
  const bool parallel = nnz * positions * nb >= grain && at::get_num_threads() > 1;
  auto pad = [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {  // i = b * C + c
      float* dst = xp + i * plane;
      std::memset(dst, 0, sizeof(float) * ph * wp);  // top rows
      for (int64_t r = 0; r < h; ++r) {
        float* row = dst + (r + ph) * wp;
        std::memset(row, 0, sizeof(float) * pw);
        std::memcpy(row + pw, xd + (i * h + r) * w, sizeof(float) * w);
        std::memset(row + pw + w, 0, sizeof(float) * (wp - pw - w));
      }
      std::memset(dst + (h + ph) * wp, 0, sizeof(float) * (hp - h - ph) * wp);  // bottom rows
    }
  };
  if (parallel) {
    at::parallel_for(0, nb * c_in, 16, pad);
  } else {
    pad(0, nb * c_in);
  }
  const int32_t* code = taps.data_ptr<int32_t>();
  const int32_t* off = offsets.data_ptr<int32_t>();
  const int64_t* rp = row_ptr.data_ptr<int64_t>();
  const float* bd = has_bias ? bias.data_ptr<float>() : nullptr;
  const int64_t halo = (kh - 1) * dh * wp + (kw - 1) * dw;  // the kernel's reach past a position, in a plane
#define SPARSEDIFF_CONV(WIDTH)                                                                              \
  conv_impl<WIDTH>(xp, nb, c_in, c_out, image, positions, wp, ho, wo, halo, kh * kw, rp, code, off,        \
                   values.data_ptr<float>(), bd, y.data_ptr<float>(), parallel)
  SPARSEDIFF_DISPATCH_WIDTH(tile_width(positions), SPARSEDIFF_CONV);
#undef SPARSEDIFF_CONV
  return y;
}

// GRU recurrence with a sparse hidden-to-hidden matrix, all time steps in one native call.
//
// gi: (3H, T, B) input projections of every step, transposed (x_t W_ih^T + b_ih, computed before by one
// SpMM, which writes this order directly); W_hh (3H x H) in CSR (row_ptr, cols, values), b_hh (3H) or empty; h0: (B, H). Gates in PyTorch's
// order (r, z, n): r = sigmoid(gi_r + gh_r), z = sigmoid(gi_z + gh_z), n = tanh(gi_n + r * gh_n),
// h' = (1 - z) * n + z * h, with gh = W_hh h + b_hh. `reverse` walks the steps backwards (the second
// direction of a bidirectional GRU). `lengths` (B, int64, or empty: all T) gives each sequence's valid
// steps, as a packed sequence does: steps past a sequence's length leave its state alone and output 0, so
// the reverse direction starts at each sequence's own last step. Returns the outputs (T, H, B), transposed,
// and the final states (B, H).
// Everything is laid out with the batch last, so each non-zero of W_hh updates B contiguous sums and the
// gates run eight sequences per AVX instruction (a vectorised exp). Threads split the batch, never the
// steps: starting threads at every step would cost more than the step.
namespace {

#if SPARSEDIFF_AVX2
// exp(x) for eight floats: range reduction to 2^n * e^r, |r| <= ln2 / 2, and a degree-6 polynomial
// (relative error about 2e-7); inputs are clamped to the finite range of float.
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// 1 / d by the approximate reciprocal and one Newton step (about 23 bits; a division costs several times
// as much)
inline __m256 reciprocal8(__m256 d) {
  const __m256 r = _mm256_rcp_ps(d);
  return _mm256_mul_ps(r, _mm256_fnmadd_ps(d, r, _mm256_set1_ps(2.0f)));
}

inline __m256 sigmoid8(__m256 x) {
  return reciprocal8(_mm256_add_ps(_mm256_set1_ps(1.0f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), x))));
}

inline __m256 tanh8(__m256 x) {  // 2 sigmoid(2x) - 1
  const __m256 two = _mm256_set1_ps(2.0f);
  return _mm256_fmsub_ps(two, sigmoid8(_mm256_mul_ps(two, x)), _mm256_set1_ps(1.0f));
}
#endif

inline float sigmoid1(float x) { return 1.0f / (1.0f + std::exp(-x)); }

// One sequence's gates for every hidden unit j. Its values sit at strides: gi (r, z, n) at
// gi[j * gi_step + gate * gi_gate], gh at gh[(gate * hidden + j) * w], the state at h[j * w], the output
// at out[j * out_step].
void gates_over_units(const float* gi, int64_t gi_step, int64_t gi_gate, const float* gh, float* h, int64_t w,
                      int64_t hidden, float* out, int64_t out_step) {
  int64_t j = 0;
#if SPARSEDIFF_AVX2
  if (gi_step * 8 < (int64_t{1} << 31) && w * 8 < (int64_t{1} << 31)) {  // gather offsets are int32
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i gi_at = _mm256_mullo_epi32(lane, _mm256_set1_epi32(static_cast<int32_t>(gi_step)));
    const __m256i w_at = _mm256_mullo_epi32(lane, _mm256_set1_epi32(static_cast<int32_t>(w)));
    alignas(32) float hv[8];
    for (; j + 8 <= hidden; j += 8) {
      const float* gij = gi + j * gi_step;
      const float* ghj = gh + j * w;
      const __m256 r = sigmoid8(_mm256_add_ps(_mm256_i32gather_ps(gij, gi_at, 4), _mm256_i32gather_ps(ghj, w_at, 4)));
      const __m256 z = sigmoid8(_mm256_add_ps(_mm256_i32gather_ps(gij + gi_gate, gi_at, 4),
                                              _mm256_i32gather_ps(ghj + hidden * w, w_at, 4)));
      const __m256 n = tanh8(_mm256_fmadd_ps(r, _mm256_i32gather_ps(ghj + 2 * hidden * w, w_at, 4),
                                             _mm256_i32gather_ps(gij + 2 * gi_gate, gi_at, 4)));
      const __m256 h_old = _mm256_i32gather_ps(h + j * w, w_at, 4);
      _mm256_store_ps(hv, _mm256_fmadd_ps(z, h_old, _mm256_fnmadd_ps(z, n, n)));  // (1 - z) n + z h
      for (int i = 0; i < 8; ++i) h[(j + i) * w] = hv[i], out[(j + i) * out_step] = hv[i];
    }
  }
#endif
  for (; j < hidden; ++j) {
    const float r = sigmoid1(gi[j * gi_step] + gh[j * w]);
    const float z = sigmoid1(gi[j * gi_step + gi_gate] + gh[(hidden + j) * w]);
    const float n = std::tanh(gi[j * gi_step + 2 * gi_gate] + r * gh[(2 * hidden + j) * w]);
    const float hn = (1.0f - z) * n + z * h[j * w];
    h[j * w] = hn;
    out[j * out_step] = hn;
  }
}

}  // namespace

std::vector<torch::Tensor> gru_recurrence(torch::Tensor gi, torch::Tensor row_ptr, torch::Tensor cols,
                                          torch::Tensor values, torch::Tensor b_hh, torch::Tensor h0,
                                          torch::Tensor lengths, bool reverse) {
  TORCH_CHECK(gi.dim() == 3 && gi.scalar_type() == torch::kFloat32, "gru_recurrence: gi must be (3H, T, B) float32");
  gi = gi.contiguous();
  h0 = h0.contiguous();
  const int64_t steps = gi.size(1), nb = gi.size(2), hidden = h0.size(1);
  TORCH_CHECK(gi.size(0) == 3 * hidden && h0.size(0) == nb && row_ptr.numel() == 3 * hidden + 1,
              "gru_recurrence: shapes of gi, W_hh and h0 disagree");
  const bool ragged = lengths.numel() > 0;
  // every step of every sequence is written unless some end early: only then must the rest read 0
  auto out = ragged ? torch::zeros({steps, hidden, nb}, gi.options()) : torch::empty({steps, hidden, nb}, gi.options());
  TORCH_CHECK(!ragged || (lengths.numel() == nb && lengths.scalar_type() == torch::kInt64),
              "gru_recurrence: lengths must hold one int64 per sequence");
  if (ragged) lengths = lengths.contiguous();
  const int64_t* len = ragged ? lengths.data_ptr<int64_t>() : nullptr;
  // With lengths in non-increasing order (a packed batch's order) the sequences still running at step t
  // are a prefix of the batch, active[t] long: the work of a step shrinks with it, as for a packed GRU.
  std::vector<int64_t> active(static_cast<size_t>(steps), nb);
  bool sorted = ragged;
  for (int64_t b = 1; ragged && b < nb; ++b) sorted = sorted && len[b - 1] >= len[b];
  if (sorted)
    for (int64_t t = 0; t < steps; ++t) {
      int64_t count = 0;
      while (count < nb && len[count] > t) ++count;
      active[t] = count;
    }
  const float* g = gi.data_ptr<float>();
  const int64_t* rp = row_ptr.data_ptr<int64_t>();
  const int32_t* col = cols.data_ptr<int32_t>();
  const float* val = values.data_ptr<float>();
  const bool has_bias = b_hh.numel() > 0;
  if (has_bias) b_hh = b_hh.contiguous();
  const float* bh = has_bias ? b_hh.data_ptr<float>() : nullptr;
  float* o = out.data_ptr<float>();
  const float* h0d = h0.data_ptr<float>();
  auto last = torch::empty({nb, hidden}, gi.options());
  float* ld = last.data_ptr<float>();
  // Sequences are independent: with several threads each takes a slice of the batch (a multiple of eight)
  // for the whole recurrence, so threads start once per call, not once per step. Each slice keeps its own
  // state and sums (w sequences wide): no cache line is written by two threads at every step.
  auto run = [&](int64_t b0, int64_t b1) {
    const int64_t w = b1 - b0;
    std::vector<float> ht(static_cast<size_t>(hidden * w)), gh(static_cast<size_t>(3 * hidden * w));
    std::vector<float> live(static_cast<size_t>(w), 1.0f);  // 1 while a sequence has steps left
    std::vector<int32_t> hoff(static_cast<size_t>(values.numel()));  // where each non-zero's h row starts
    for (int64_t p = 0; p < values.numel(); ++p) hoff[p] = static_cast<int32_t>(col[p] * w);
    for (int64_t b = 0; b < w; ++b)
      for (int64_t j = 0; j < hidden; ++j) ht[j * w + b] = h0d[(b0 + b) * hidden + j];
    for (int64_t s = 0; s < steps; ++s) {
      const int64_t t = reverse ? steps - 1 - s : s;
      // this step's end of the slice: past the running prefix (rounded up to whole vectors) nothing changes
      const int64_t e = std::min(w, (std::max<int64_t>(active[t] - b0, 0) + 7) / 8 * 8);
      if (e <= 0) continue;
      if (ragged)
        for (int64_t b = 0; b < e; ++b) live[b] = t < len[b0 + b] ? 1.0f : 0.0f;
      // gh = W_hh h + b_hh: each row starts at its bias, then one register tile of up to 64 sequences
      // per row (independent sums, so the FMAs do not wait on each other)
      for (int64_t r = 0; r < 3 * hidden; ++r) std::fill(gh.data() + r * w, gh.data() + r * w + e, bh ? bh[r] : 0.0f);
      int64_t bv = 0;
      auto tiles = [&](auto width) {
        constexpr int W = decltype(width)::value;
        for (; bv + W <= e; bv += W)
          tile_rows<W, 1>(hoff.data(), val, rp, rp + 1, 1, 3 * hidden, ht.data() + bv, gh.data() + bv, w, true);
      };
      tiles(std::integral_constant<int, 64>{});
      tiles(std::integral_constant<int, 32>{});
      tiles(std::integral_constant<int, 16>{});
      tiles(std::integral_constant<int, 8>{});
      for (int64_t b = bv; b < e; ++b)  // the last few (fewer than eight): four partial sums per row
        for (int64_t r = 0; r < 3 * hidden; ++r) {
          const float* hb = ht.data() + b;
          float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
          int64_t p = rp[r];
          for (; p + 4 <= rp[r + 1]; p += 4) {
            s0 += val[p] * hb[hoff[p]];
            s1 += val[p + 1] * hb[hoff[p + 1]];
            s2 += val[p + 2] * hb[hoff[p + 2]];
            s3 += val[p + 3] * hb[hoff[p + 3]];
          }
          for (; p < rp[r + 1]; ++p) s0 += val[p] * hb[hoff[p]];
          gh[r * w + b] += (s0 + s1) + (s2 + s3);
        }
      const int64_t full = SPARSEDIFF_AVX2 ? e / 8 * 8 : 0;  // sequences the gates take eight at a time
      for (int64_t j = 0; j < hidden; ++j) {
        float* hj = ht.data() + j * w;
        const float *gir = g + (j * steps + t) * nb + b0, *giz = g + ((hidden + j) * steps + t) * nb + b0,
                    *gin = g + ((2 * hidden + j) * steps + t) * nb + b0;
        const float *ghr = gh.data() + j * w, *ghz = gh.data() + (hidden + j) * w, *ghn = gh.data() + (2 * hidden + j) * w;
        float* oj = o + (t * hidden + j) * nb + b0;
        int64_t b = 0;
#if SPARSEDIFF_AVX2
        for (; b < full; b += 8) {
          const __m256 r = sigmoid8(_mm256_add_ps(_mm256_loadu_ps(gir + b), _mm256_loadu_ps(ghr + b)));
          const __m256 z = sigmoid8(_mm256_add_ps(_mm256_loadu_ps(giz + b), _mm256_loadu_ps(ghz + b)));
          const __m256 n = tanh8(_mm256_fmadd_ps(r, _mm256_loadu_ps(ghn + b), _mm256_loadu_ps(gin + b)));
          const __m256 h_old = _mm256_loadu_ps(hj + b);
          // (1 - z) n + z h
          const __m256 h = _mm256_fmadd_ps(z, h_old, _mm256_fnmadd_ps(z, n, n));
          const __m256 on = _mm256_cmp_ps(_mm256_loadu_ps(live.data() + b), _mm256_setzero_ps(), _CMP_NEQ_OQ);
          _mm256_storeu_ps(hj + b, _mm256_blendv_ps(h_old, h, on));
          _mm256_storeu_ps(oj + b, _mm256_blendv_ps(_mm256_setzero_ps(), h, on));  // 0 when finished
        }
#endif
      }
      // The sequences past the last whole eight (all of them for a batch of 1): their gates go eight
      // hidden units at a time, gathering the strided inputs (one by one without AVX2).
      for (int64_t b = full; b < e; ++b) {
        if (live[b] == 0.0f) continue;  // past this sequence's end: state unchanged, output 0
        gates_over_units(g + t * nb + b0 + b, steps * nb, hidden * steps * nb, gh.data() + b, ht.data() + b, w,
                         hidden, o + t * hidden * nb + b0 + b, nb);
      }
    }
    for (int64_t b = 0; b < w; ++b)
      for (int64_t j = 0; j < hidden; ++j) ld[(b0 + b) * hidden + j] = ht[j * w + b];
  };
  const int64_t threads = at::get_num_threads();
  if (threads > 1 && nb >= 16) {
    const int64_t chunk = ((nb + threads - 1) / threads + 7) / 8 * 8;
    at::parallel_for(0, (nb + chunk - 1) / chunk, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) run(c * chunk, std::min(nb, (c + 1) * chunk));
    });
  } else {
    run(0, nb);
  }
  return {out, last};
}

bool has_avx2() { return SPARSEDIFF_AVX2; }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("spmm_linear", &spmm_linear, "y = x @ W^T + b with W sparse (CSR per column panel)");
  mod.def("sparse_conv2d", &sparse_conv2d, "direct sparse convolution, stride 1, zero padding, groups 1");
  mod.def("gru_recurrence", &gru_recurrence, "GRU steps with a sparse hidden-to-hidden matrix");
  mod.def("has_avx2", &has_avx2, "whether the kernels were compiled with AVX2/FMA");
}
