// sparsediff native sparse kernels (CPU).
//
// spmm_linear: y = x @ W^T + b for a sparse W (M x K), x dense (N x K), y (N x M).
//
// Layout of W: cut into column panels of `panel` input features (all of K when K is small); within a
// panel, row by row (CSR): row_ptr[p, m] .. row_ptr[p, m + 1] index `cols` (relative to the panel) and
// `values`.
//
// Per work item (a block of W input rows, W = 64, or 16 for small batches, a range of output rows):
//   - the block of x is packed transposed into a thread-local buffer: xp[k][c] = x[W b + c, k]
//     (zero-padded past N). Rows of x have a power-of-two stride in typical models; reading them in place
//     would thrash the cache, the packed block is contiguous.
//   - for each panel, for each output row: the output tile of one row x W columns lives in W / 8 AVX
//     registers; each non-zero costs one broadcast and W / 8 fused multiply-adds. A panel of the packed
//     block (panel x 4 W bytes) stays in L1/L2 while all rows walk over it; partial sums of the earlier
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
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define SPARSEDIFF_AVX2 1
#else
#define SPARSEDIFF_AVX2 0
#endif

namespace {

// dst[k][c] = x[b * W + c][k] for c < rows, 0 for c >= rows
template <int W>
void pack_block(const float* x, int64_t n, int64_t k, int64_t b, float* dst) {
  const int64_t rows = std::min<int64_t>(W, n - b * W);
  if (rows < W) std::memset(dst, 0, sizeof(float) * k * W);
  int64_t c = 0;
  for (; c + 8 <= rows; c += 8) {  // eight rows at a time: eight streams read, one contiguous write
    const float* s = x + (b * W + c) * k;
    for (int64_t kk = 0; kk < k; ++kk) {
      float* d = dst + kk * W + c;
      for (int j = 0; j < 8; ++j) d[j] = s[j * k + kk];
    }
  }
  for (; c < rows; ++c) {
    const float* s = x + (b * W + c) * k;
    for (int64_t kk = 0; kk < k; ++kk) dst[kk * W + c] = s[kk];
  }
}

// acc[0..W) (+)= sum over p in [begin, end) of val[p] * xb[idx[p] * S .. idx[p] * S + W)
// (S = W for a packed block, whose row k starts at k * W; S = 1 when idx holds element offsets)
template <int W, int S>
inline void row_tile(const int32_t* idx, const float* val, int64_t begin, int64_t end, const float* xb,
                     float* acc, bool add) {
#if SPARSEDIFF_AVX2
  constexpr int R = W / 8;
  __m256 a[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) a[r] = add ? _mm256_loadu_ps(acc + 8 * r) : _mm256_setzero_ps();
  for (int64_t p = begin; p < end; ++p) {
    const __m256 v = _mm256_broadcast_ss(val + p);
    const float* xk = xb + static_cast<int64_t>(idx[p]) * S;
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) a[r] = _mm256_fmadd_ps(v, _mm256_loadu_ps(xk + 8 * r), a[r]);
  }
#pragma GCC unroll 8
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

template <int W>
void spmm_impl(const float* xd, int64_t n, int64_t k, const int64_t* rp, int64_t panels, int64_t panel, int64_t m,
               const int32_t* col, const float* val, int64_t nnz, const float* bd, float* yd, int64_t grain) {
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
        for (int64_t row = r0; row < r1; ++row)
          row_tile<W, W>(col, val, r[row], r[row + 1], xb, acc.data() + (row - r0) * W, p > 0);
      }
      const int64_t cols = std::min<int64_t>(W, n - b * W);
      for (int64_t c = 0; c < cols; ++c) {
        float* dst = yd + (b * W + c) * m;
        for (int64_t row = r0; row < r1; ++row) dst[row] = acc[(row - r0) * W + c] + (bd ? bd[row] : 0.0f);
      }
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
// which one thread runs.
torch::Tensor spmm_linear(torch::Tensor x, torch::Tensor row_ptr, torch::Tensor cols, torch::Tensor values,
                          torch::Tensor bias, int64_t panel, int64_t grain) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "spmm_linear: x must be a 2-D float32 tensor");
  TORCH_CHECK(row_ptr.dim() == 2 && row_ptr.scalar_type() == torch::kInt64 && cols.scalar_type() == torch::kInt32 &&
                  values.scalar_type() == torch::kFloat32,
              "spmm_linear: row_ptr (P, M + 1) int64, cols int32 and values float32 expected");
  x = x.contiguous();
  row_ptr = row_ptr.contiguous();
  const int64_t n = x.size(0), k = x.size(1), panels = row_ptr.size(0), m = row_ptr.size(1) - 1;
  TORCH_CHECK((panel > 0 && panels == (k + panel - 1) / panel) || (k == 0 && panels <= 1),
              "spmm_linear: ", panels, " panels of ", panel, " do not cover ", k, " input features");
  auto y = torch::empty({n, m}, x.options());
  if (n == 0 || m == 0) return y;
  const bool has_bias = bias.numel() > 0;
  TORCH_CHECK(!has_bias || bias.numel() == m, "spmm_linear: bias has ", bias.numel(), " entries, expected ", m);
  if (has_bias) bias = bias.contiguous();
  const float* bd = has_bias ? bias.data_ptr<float>() : nullptr;
  if (n >= 64) {
    spmm_impl<64>(x.data_ptr<float>(), n, k, row_ptr.data_ptr<int64_t>(), panels, panel, m, cols.data_ptr<int32_t>(),
                  values.data_ptr<float>(), values.numel(), bd, y.data_ptr<float>(), grain);
  } else {  // small batches: narrower blocks waste less on padding
    spmm_impl<16>(x.data_ptr<float>(), n, k, row_ptr.data_ptr<int64_t>(), panels, panel, m, cols.data_ptr<int32_t>(),
                  values.data_ptr<float>(), values.numel(), bd, y.data_ptr<float>(), grain);
  }
  return y;
}

// Direct sparse convolution (stride 1, zero padding, any kernel size and dilation, groups 1).
//
// The input is zero-padded once into a contiguous buffer: image b, channel c at
// xp + (b * C + c) * Hp * Wp. An output pixel (h, w) of image b is computed at position q = h * Wp + w of
// the padded grid; a tap (c, ky, kx) of the kernel then reads xp at q + c * Hp * Wp + ky * dh * Wp +
// kx * dw, so W consecutive positions read W consecutive floats. Each non-zero weight is one broadcast
// and W / 8 FMAs over W output positions, with no im2col; the (Wp - Wo) positions at the end of each
// padded row are computed and dropped. W is 64, or 16 for small images (less waste in the last tile).
// Weights are stored by output channel (CSR) with the tap code c * KH * KW + ky * KW + kx; codes become
// offsets once per call, for this input size.
namespace {

template <int W>
void conv_impl(const float* xp, int64_t nb, int64_t c_out, int64_t image, int64_t positions, int64_t wp,
               int64_t ho, int64_t wo, const int64_t* rp, const int32_t* off, const float* val, const float* bd,
               float* yd, bool parallel) {
  const int64_t tiles = (positions + W - 1) / W;
  auto body = [&](int64_t i0, int64_t i1) {
    alignas(32) float acc[W];
    for (int64_t i = i0; i < i1; ++i) {  // i = b * c_out + o
      const int64_t b = i / c_out, o = i % c_out;
      const float* xb = xp + b * image;
      float* dst = yd + i * ho * wo;
      const float bias_o = bd ? bd[o] : 0.0f;
      for (int64_t t = 0; t < tiles; ++t) {
        row_tile<W, 1>(off, val, rp[o], rp[o + 1], xb + t * W, acc, false);
        const int64_t q1 = std::min(positions, (t + 1) * W);
        for (int64_t q = t * W; q < q1; ++q) {
          const int64_t r = q / wp, col = q % wp;
          if (col < wo) dst[r * wo + col] = acc[q - t * W] + bias_o;
        }
      }
    }
  };
  if (parallel) {
    at::parallel_for(0, nb * c_out, 1, body);
  } else {
    body(0, nb * c_out);
  }
}

}  // namespace

torch::Tensor sparse_conv2d(torch::Tensor x, torch::Tensor row_ptr, torch::Tensor taps, torch::Tensor values,
                            torch::Tensor bias, int64_t kh, int64_t kw, int64_t ph, int64_t pw, int64_t dh,
                            int64_t dw, int64_t grain) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == torch::kFloat32, "sparse_conv2d: x must be (B, C, H, W) float32");
  TORCH_CHECK(row_ptr.scalar_type() == torch::kInt64 && taps.scalar_type() == torch::kInt32 &&
                  values.scalar_type() == torch::kFloat32,
              "sparse_conv2d: row_ptr int64, taps int32 and values float32 expected");
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
  // slack: the last tile of the last image reads up to one (64-wide) tile past its end
  std::vector<float> xp(static_cast<size_t>(nb * image + 2 * 64 + wp), 0.0f);
  const float* xd = x.data_ptr<float>();
  const int64_t nnz = values.numel();
  const bool parallel = nnz * positions * nb >= grain && at::get_num_threads() > 1;
  auto pad = [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {  // i = b * C + c
      for (int64_t r = 0; r < h; ++r)
        std::memcpy(xp.data() + i * plane + (r + ph) * wp + pw, xd + (i * h + r) * w, sizeof(float) * w);
    }
  };
  if (parallel) {
    at::parallel_for(0, nb * c_in, 16, pad);
  } else {
    pad(0, nb * c_in);
  }
  // tap codes -> offsets for this input size
  const int32_t* code = taps.data_ptr<int32_t>();
  std::vector<int32_t> off(static_cast<size_t>(nnz));
  for (int64_t p = 0; p < nnz; ++p) {
    const int64_t c = code[p] / (kh * kw), rest = code[p] % (kh * kw);
    off[p] = static_cast<int32_t>(c * plane + (rest / kw) * dh * wp + (rest % kw) * dw);
  }
  const int64_t* rp = row_ptr.data_ptr<int64_t>();
  const float* bd = has_bias ? bias.data_ptr<float>() : nullptr;
  if (positions >= 256) {
    conv_impl<64>(xp.data(), nb, c_out, image, positions, wp, ho, wo, rp, off.data(), values.data_ptr<float>(), bd,
                  y.data_ptr<float>(), parallel);
  } else {
    conv_impl<16>(xp.data(), nb, c_out, image, positions, wp, ho, wo, rp, off.data(), values.data_ptr<float>(), bd,
                  y.data_ptr<float>(), parallel);
  }
  return y;
}

// GRU recurrence with a sparse hidden-to-hidden matrix, all time steps in one native call.
//
// gi: (T, 3H, B) input projections of every step, transposed (x_t W_ih^T + b_ih, computed before by one
// SpMM); W_hh (3H x H) in CSR (row_ptr, cols, values), b_hh (3H) or empty; h0: (B, H). Gates in PyTorch's
// order (r, z, n): r = sigmoid(gi_r + gh_r), z = sigmoid(gi_z + gh_z), n = tanh(gi_n + r * gh_n),
// h' = (1 - z) * n + z * h, with gh = W_hh h + b_hh. `reverse` walks the steps backwards (the second
// direction of a bidirectional GRU). `lengths` (B, int64, or empty: all T) gives each sequence's valid
// steps, as a packed sequence does: steps past a sequence's length leave its state alone and output 0, so
// the reverse direction starts at each sequence's own last step. Returns the outputs (T, H, B), transposed,
// and the final states (B, H).
// Everything is laid out with the batch last, so each non-zero of W_hh updates B contiguous sums and the
// gates run eight sequences per AVX instruction (a vectorised exp). Runs on one thread: the matrices are
// small, and starting threads at every step would cost more than the step.
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

inline __m256 sigmoid8(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.0f);
  return _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), x))));
}

inline __m256 tanh8(__m256 x) {  // 2 sigmoid(2x) - 1
  const __m256 two = _mm256_set1_ps(2.0f);
  return _mm256_fmsub_ps(two, sigmoid8(_mm256_mul_ps(two, x)), _mm256_set1_ps(1.0f));
}
#endif

inline float sigmoid1(float x) { return 1.0f / (1.0f + std::exp(-x)); }

}  // namespace

std::vector<torch::Tensor> gru_recurrence(torch::Tensor gi, torch::Tensor row_ptr, torch::Tensor cols,
                                          torch::Tensor values, torch::Tensor b_hh, torch::Tensor h0,
                                          torch::Tensor lengths, bool reverse) {
  TORCH_CHECK(gi.dim() == 3 && gi.scalar_type() == torch::kFloat32, "gru_recurrence: gi must be (T, 3H, B) float32");
  gi = gi.contiguous();
  h0 = h0.contiguous();
  const int64_t steps = gi.size(0), nb = gi.size(2), hidden = h0.size(1);
  TORCH_CHECK(gi.size(1) == 3 * hidden && h0.size(0) == nb && row_ptr.numel() == 3 * hidden + 1,
              "gru_recurrence: shapes of gi, W_hh and h0 disagree");
  auto out = torch::empty({steps, hidden, nb}, gi.options());
  const bool ragged = lengths.numel() > 0;
  TORCH_CHECK(!ragged || (lengths.numel() == nb && lengths.scalar_type() == torch::kInt64),
              "gru_recurrence: lengths must hold one int64 per sequence");
  if (ragged) lengths = lengths.contiguous();
  const int64_t* len = ragged ? lengths.data_ptr<int64_t>() : nullptr;
  const float* g = gi.data_ptr<float>();
  const int64_t* rp = row_ptr.data_ptr<int64_t>();
  const int32_t* col = cols.data_ptr<int32_t>();
  const float* val = values.data_ptr<float>();
  const bool has_bias = b_hh.numel() > 0;
  if (has_bias) b_hh = b_hh.contiguous();
  const float* bh = has_bias ? b_hh.data_ptr<float>() : nullptr;
  float* o = out.data_ptr<float>();
  std::vector<float> ht(static_cast<size_t>(hidden * nb)), gh(static_cast<size_t>(3 * hidden * nb));
  std::vector<float> live(static_cast<size_t>(nb), 1.0f);  // 1 while a sequence has steps left
  const float* h0d = h0.data_ptr<float>();
  for (int64_t b = 0; b < nb; ++b)
    for (int64_t j = 0; j < hidden; ++j) ht[j * nb + b] = h0d[b * hidden + j];
  for (int64_t s = 0; s < steps; ++s) {
    const int64_t t = reverse ? steps - 1 - s : s;
    if (ragged)
      for (int64_t b = 0; b < nb; ++b) live[b] = t < len[b] ? 1.0f : 0.0f;
    for (int64_t r = 0; r < 3 * hidden; ++r) {  // gh = W_hh h + b_hh
      float* acc = gh.data() + r * nb;
      const float init = bh ? bh[r] : 0.0f;
      for (int64_t b = 0; b < nb; ++b) acc[b] = init;
      for (int64_t p = rp[r]; p < rp[r + 1]; ++p) {
        const float v = val[p];
        const float* hk = ht.data() + static_cast<int64_t>(col[p]) * nb;
        for (int64_t b = 0; b < nb; ++b) acc[b] += v * hk[b];
      }
    }
    const float* gt = g + t * 3 * hidden * nb;
    float* ot = o + t * hidden * nb;
    for (int64_t j = 0; j < hidden; ++j) {
      float* hj = ht.data() + j * nb;
      const float *gir = gt + j * nb, *giz = gt + (hidden + j) * nb, *gin = gt + (2 * hidden + j) * nb;
      const float *ghr = gh.data() + j * nb, *ghz = gh.data() + (hidden + j) * nb,
                  *ghn = gh.data() + (2 * hidden + j) * nb;
      float* oj = ot + j * nb;
      int64_t b = 0;
#if SPARSEDIFF_AVX2
      for (; b + 8 <= nb; b += 8) {
        const __m256 r = sigmoid8(_mm256_add_ps(_mm256_loadu_ps(gir + b), _mm256_loadu_ps(ghr + b)));
        const __m256 z = sigmoid8(_mm256_add_ps(_mm256_loadu_ps(giz + b), _mm256_loadu_ps(ghz + b)));
        const __m256 n = tanh8(_mm256_fmadd_ps(r, _mm256_loadu_ps(ghn + b), _mm256_loadu_ps(gin + b)));
        const __m256 h_old = _mm256_loadu_ps(hj + b);
        // (1 - z) n + z h
        const __m256 h = _mm256_fmadd_ps(z, h_old, _mm256_fnmadd_ps(z, n, n));
        const __m256 on = _mm256_cmp_ps(_mm256_loadu_ps(live.data() + b), _mm256_setzero_ps(), _CMP_NEQ_OQ);
        _mm256_storeu_ps(hj + b, _mm256_blendv_ps(h_old, h, on));
        _mm256_storeu_ps(oj + b, _mm256_blendv_ps(_mm256_setzero_ps(), h, on));
      }
#endif
      for (; b < nb; ++b) {
        if (live[b] == 0.0f) {  // past this sequence's end: state unchanged, output 0
          oj[b] = 0.0f;
          continue;
        }
        const float r = sigmoid1(gir[b] + ghr[b]);
        const float z = sigmoid1(giz[b] + ghz[b]);
        const float n = std::tanh(gin[b] + r * ghn[b]);
        const float h = (1.0f - z) * n + z * hj[b];
        hj[b] = h;
        oj[b] = h;
      }
    }
  }
  auto last = torch::empty({nb, hidden}, gi.options());
  float* ld = last.data_ptr<float>();
  for (int64_t b = 0; b < nb; ++b)
    for (int64_t j = 0; j < hidden; ++j) ld[b * hidden + j] = ht[j * nb + b];
  return {out, last};
}

bool has_avx2() { return SPARSEDIFF_AVX2; }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("spmm_linear", &spmm_linear, "y = x @ W^T + b with W sparse (CSR per column panel)");
  mod.def("sparse_conv2d", &sparse_conv2d, "direct sparse convolution, stride 1, zero padding, groups 1");
  mod.def("gru_recurrence", &gru_recurrence, "GRU steps with a sparse hidden-to-hidden matrix");
  mod.def("has_avx2", &has_avx2, "whether the kernels were compiled with AVX2/FMA");
}
