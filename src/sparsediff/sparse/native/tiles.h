// Shared pieces of sparsediff's native kernels: what the SpMM (spmm.cpp), the direct convolution
// (conv.cpp) and the GRU recurrence (gru.cpp) all build on, and what their backward kernels will use.
//
//   - AVX2/FMA detection (SPARSEDIFF_AVX2): x86-64 CPUs with both get the vectorised paths, others a
//     portable scalar one; every kernel file is compiled with the same flags.
//   - transpose8 and pack_block: an input block packed transposed, so that the columns a register tile
//     reads are contiguous.
//   - the register tiles: row_tile (one row of non-zeros into W / 8 AVX registers), rows_tile (two or four
//     narrow rows side by side), tile_rows (a range of rows, joint_rows at a time).
//   - tile_width and linear_width_cap: how wide a tile is for a count of columns and an L1 budget, and
//     SPARSEDIFF_DISPATCH_WIDTH, which turns that width into the template instantiation.
//   - pad_planes: planes copied into zero-padded ones (a convolution's input, its output gradient on the
//     padded grid).
//
// Everything here sits in an anonymous namespace: each kernel file gets its own copy with internal
// linkage, as when all the kernels shared one file, so the compiler may specialise and inline freely.

#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

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

// Planes i0 .. i1 - 1 of x (each h x w floats, one after another) copied into planes of `stride` floats
// at dst, as rows of wp floats (wp >= left + w) starting at row `top`, column `left`, with zeros everywhere
// else in the plane: the zero-padded input of the direct convolution (conv.cpp) and the output gradient
// laid out on the padded grid (conv_backward.cpp).
inline void pad_planes(const float* x, int64_t h, int64_t w, int64_t top, int64_t left, int64_t wp, int64_t stride,
                       float* dst, int64_t i0, int64_t i1) {
  for (int64_t i = i0; i < i1; ++i) {
    float* plane = dst + i * stride;
    int64_t done = 0;  // the plane's floats written so far
    for (int64_t r = 0; r < h; ++r) {
      const int64_t start = (r + top) * wp + left;
      std::memset(plane + done, 0, sizeof(float) * (start - done));
      std::memcpy(plane + start, x + (i * h + r) * w, sizeof(float) * w);
      done = start + w;
    }
    std::memset(plane + done, 0, sizeof(float) * (stride - done));
  }
}

// The tile width for `count` columns (batch rows of a linear, output positions of a convolution). Per
// non-zero a tile of width w costs w / 8 FMAs plus about two instructions of its own (the broadcast, the
// index): the width minimising tiles x (w / 8 + 2) balances padding waste against that overhead.
inline int tile_width(int64_t count, int64_t max_width = 112) {
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
inline int64_t linear_width_cap(int64_t rows) {
  constexpr int64_t l1_floats = 8192;
  return std::max<int64_t>(8, l1_floats / std::max<int64_t>(rows, 1) / 8 * 8);
}

}  // namespace

// CALL(W) with the tile width `width` (one of tile_width's) as the compile-time W, 64 for any other.
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
