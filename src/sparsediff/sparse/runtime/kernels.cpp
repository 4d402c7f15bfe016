// sparsediff native sparse kernels (CPU).
//
// spmm_linear: y = x @ W^T + b for a sparse W (M x K), x dense (N x K), y (N x M).
//
// Layout of W: cut into column panels of `panel` input features (all of K when K is small); within a
// panel, row by row (CSR): row_ptr[p, m] .. row_ptr[p, m + 1] index `offsets` and `values`, and an offset
// is (k - p * panel) * 64, precomputed so the inner loop does no index arithmetic.
//
// Per work item (a block of 64 input rows, a range of output rows):
//   - the block of x is packed transposed into a thread-local buffer: xp[k][c] = x[64 b + c, k]
//     (zero-padded past N). Rows of x have a power-of-two stride in typical models; reading them in place
//     would thrash the cache, the packed block is contiguous.
//   - for each panel, for each output row: the output tile of one row x 64 columns lives in eight AVX
//     registers; each non-zero costs one broadcast and eight fused multiply-adds. A panel of the packed
//     block (panel x 256 bytes) stays in L1/L2 while all rows walk over it; partial sums of the earlier
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

constexpr int64_t BLOCK = 64;  // input rows per packed block (= output columns per register tile)

// dst[k][c] = x[b * BLOCK + c][k] for c < rows, 0 for c >= rows
void pack_block(const float* x, int64_t n, int64_t k, int64_t b, float* dst) {
  const int64_t rows = std::min(BLOCK, n - b * BLOCK);
  if (rows < BLOCK) std::memset(dst, 0, sizeof(float) * k * BLOCK);
  int64_t c = 0;
  for (; c + 8 <= rows; c += 8) {  // eight rows at a time: eight streams read, one contiguous write
    const float* s = x + (b * BLOCK + c) * k;
    for (int64_t kk = 0; kk < k; ++kk) {
      float* d = dst + kk * BLOCK + c;
      for (int j = 0; j < 8; ++j) d[j] = s[j * k + kk];
    }
  }
  for (; c < rows; ++c) {
    const float* s = x + (b * BLOCK + c) * k;
    for (int64_t kk = 0; kk < k; ++kk) dst[kk * BLOCK + c] = s[kk];
  }
}

// acc[0..64) (+)= sum over p in [begin, end) of val[p] * xb[off[p] .. off[p] + 64)
inline void row_tile(const int32_t* off, const float* val, int64_t begin, int64_t end, const float* xb,
                     float* acc, bool add) {
#if SPARSEDIFF_AVX2
  __m256 a0, a1, a2, a3, a4, a5, a6, a7;
  if (add) {
    a0 = _mm256_loadu_ps(acc + 0), a1 = _mm256_loadu_ps(acc + 8), a2 = _mm256_loadu_ps(acc + 16),
    a3 = _mm256_loadu_ps(acc + 24), a4 = _mm256_loadu_ps(acc + 32), a5 = _mm256_loadu_ps(acc + 40),
    a6 = _mm256_loadu_ps(acc + 48), a7 = _mm256_loadu_ps(acc + 56);
  } else {
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = _mm256_setzero_ps();
  }
  for (int64_t p = begin; p < end; ++p) {
    const __m256 v = _mm256_broadcast_ss(val + p);
    const float* xk = xb + off[p];
    a0 = _mm256_fmadd_ps(v, _mm256_loadu_ps(xk + 0), a0);
    a1 = _mm256_fmadd_ps(v, _mm256_loadu_ps(xk + 8), a1);
    a2 = _mm256_fmadd_ps(v, _mm256_loadu_ps(xk + 16), a2);
    a3 = _mm256_fmadd_ps(v, _mm256_loadu_ps(xk + 24), a3);
    a4 = _mm256_fmadd_ps(v, _mm256_loadu_ps(xk + 32), a4);
    a5 = _mm256_fmadd_ps(v, _mm256_loadu_ps(xk + 40), a5);
    a6 = _mm256_fmadd_ps(v, _mm256_loadu_ps(xk + 48), a6);
    a7 = _mm256_fmadd_ps(v, _mm256_loadu_ps(xk + 56), a7);
  }
  _mm256_storeu_ps(acc + 0, a0);
  _mm256_storeu_ps(acc + 8, a1);
  _mm256_storeu_ps(acc + 16, a2);
  _mm256_storeu_ps(acc + 24, a3);
  _mm256_storeu_ps(acc + 32, a4);
  _mm256_storeu_ps(acc + 40, a5);
  _mm256_storeu_ps(acc + 48, a6);
  _mm256_storeu_ps(acc + 56, a7);
#else
  if (!add) std::memset(acc, 0, sizeof(float) * BLOCK);
  for (int64_t p = begin; p < end; ++p) {
    const float v = val[p];
    const float* xk = xb + off[p];
    for (int64_t c = 0; c < BLOCK; ++c) acc[c] += v * xk[c];
  }
#endif
}

}  // namespace

// x: (N, K) float32; row_ptr: (P, M + 1) int64 (P panels of `panel` input features); offsets: (nnz) int32;
// values: (nnz) float32; bias: (M) float32 or empty; grain: multiply-adds below which one thread runs.
torch::Tensor spmm_linear(torch::Tensor x, torch::Tensor row_ptr, torch::Tensor offsets, torch::Tensor values,
                          torch::Tensor bias, int64_t panel, int64_t grain) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "spmm_linear: x must be a 2-D float32 tensor");
  TORCH_CHECK(row_ptr.dim() == 2 && row_ptr.scalar_type() == torch::kInt64 &&
                  offsets.scalar_type() == torch::kInt32 && values.scalar_type() == torch::kFloat32,
              "spmm_linear: row_ptr (P, M + 1) int64, offsets int32 and values float32 expected");
  x = x.contiguous();
  row_ptr = row_ptr.contiguous();
  const int64_t n = x.size(0), k = x.size(1), panels = row_ptr.size(0), m = row_ptr.size(1) - 1;
  TORCH_CHECK(panel > 0 && panels == (k + panel - 1) / panel || (k == 0 && panels <= 1),
              "spmm_linear: ", panels, " panels of ", panel, " do not cover ", k, " input features");
  auto y = torch::empty({n, m}, x.options());
  if (n == 0 || m == 0) return y;
  const bool has_bias = bias.numel() > 0;
  TORCH_CHECK(!has_bias || bias.numel() == m, "spmm_linear: bias has ", bias.numel(), " entries, expected ", m);
  if (has_bias) bias = bias.contiguous();
  const float* xd = x.data_ptr<float>();
  const int64_t* rp = row_ptr.data_ptr<int64_t>();
  const int32_t* off = offsets.data_ptr<int32_t>();
  const float* val = values.data_ptr<float>();
  const float* bd = has_bias ? bias.data_ptr<float>() : nullptr;
  float* yd = y.data_ptr<float>();

  const int64_t nblocks = (n + BLOCK - 1) / BLOCK;
  const int64_t nnz = values.numel();
  const bool parallel = (nnz + m) * BLOCK * nblocks >= grain && at::get_num_threads() > 1;
  const int64_t threads = parallel ? at::get_num_threads() : 1;
  // few blocks: split the rows too, so every thread has work
  const int64_t splits = std::min<int64_t>(m, std::max<int64_t>(1, (threads + nblocks - 1) / nblocks));
  const int64_t rows_per = (m + splits - 1) / splits;

  auto body = [&](int64_t i0, int64_t i1) {
    std::vector<float> packed(static_cast<size_t>(k * BLOCK));
    std::vector<float> acc(static_cast<size_t>(rows_per * BLOCK));
    int64_t packed_block = -1;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / splits, r0 = (i % splits) * rows_per, r1 = std::min(m, r0 + rows_per);
      if (r0 >= r1) continue;
      if (b != packed_block) {
        pack_block(xd, n, k, b, packed.data());
        packed_block = b;
      }
      for (int64_t p = 0; p < panels; ++p) {
        const float* xb = packed.data() + p * panel * BLOCK;
        const int64_t* r = rp + p * (m + 1);
        for (int64_t row = r0; row < r1; ++row)
          row_tile(off, val, r[row], r[row + 1], xb, acc.data() + (row - r0) * BLOCK, p > 0);
      }
      if (panels == 0) std::fill(acc.begin(), acc.end(), 0.0f);
      const int64_t cols = std::min(BLOCK, n - b * BLOCK);
      for (int64_t c = 0; c < cols; ++c) {
        float* dst = yd + (b * BLOCK + c) * m;
        for (int64_t row = r0; row < r1; ++row)
          dst[row] = acc[(row - r0) * BLOCK + c] + (bd ? bd[row] : 0.0f);
      }
    }
  };
  if (parallel) {
    at::parallel_for(0, nblocks * splits, 1, body);
  } else {
    body(0, nblocks * splits);
  }
  return y;
}

// Direct sparse convolution (stride 1, zero padding, any kernel size and dilation, groups 1).
//
// The input is zero-padded once into a contiguous buffer: image b, channel c at
// xp + (b * C + c) * Hp * Wp. An output pixel (h, w) of image b is computed at position q = h * Wp + w of
// the padded grid; a tap (c, ky, kx) of the kernel then reads xp at q + c * Hp * Wp + ky * dh * Wp +
// kx * dw, so 64 consecutive positions read 64 consecutive floats. Each non-zero weight is one broadcast
// and eight FMAs over 64 output positions, with no im2col; the (Wp - Wo) positions at the end of each
// padded row are computed and dropped. Weights are stored by output channel (CSR) with the tap code
// c * KH * KW + ky * KW + kx; codes become offsets once per call, for this input size.
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
  const int64_t tiles = (positions + BLOCK - 1) / BLOCK;
  // slack: the last tile of the last image reads up to one tile past its end
  std::vector<float> xp(static_cast<size_t>(nb * image + tiles * BLOCK - positions + BLOCK + wp), 0.0f);
  const float* xd = x.data_ptr<float>();
  const int64_t nnz = values.numel();
  const bool parallel = nnz * BLOCK * tiles * nb >= grain && at::get_num_threads() > 1;
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
  const float* val = values.data_ptr<float>();
  const float* bd = has_bias ? bias.data_ptr<float>() : nullptr;
  float* yd = y.data_ptr<float>();
  auto body = [&](int64_t i0, int64_t i1) {
    alignas(32) float acc[BLOCK];
    for (int64_t i = i0; i < i1; ++i) {  // i = b * c_out + o
      const int64_t b = i / c_out, o = i % c_out;
      const float* xb = xp.data() + b * image;
      float* dst = yd + i * ho * wo;
      const float bias_o = bd ? bd[o] : 0.0f;
      for (int64_t t = 0; t < tiles; ++t) {
        row_tile(off.data(), val, rp[o], rp[o + 1], xb + t * BLOCK, acc, false);
        const int64_t q1 = std::min(positions, (t + 1) * BLOCK);
        for (int64_t q = t * BLOCK; q < q1; ++q) {
          const int64_t r = q / wp, col = q % wp;
          if (col < wo) dst[r * wo + col] = acc[q - t * BLOCK] + bias_o;
        }
      }
    }
  };
  if (parallel) {
    at::parallel_for(0, nb * c_out, 1, body);
  } else {
    body(0, nb * c_out);
  }
  return y;
}

// GRU recurrence with a sparse hidden-to-hidden matrix, all time steps in one native call.
//
// gi: (T, B, 3H) input projections of every step (x_t W_ih^T + b_ih, computed before by one SpMM);
// W_hh (3H x H) in CSR (row_ptr, cols, values), b_hh (3H) or empty; h0: (B, H). Gates in PyTorch's order
// (r, z, n): r = sigmoid(gi_r + gh_r), z = sigmoid(gi_z + gh_z), n = tanh(gi_n + r * gh_n),
// h' = (1 - z) * n + z * h, with gh = W_hh h + b_hh. `reverse` walks the steps backwards (the second
// direction of a bidirectional GRU). `lengths` (B, int64, or empty: all T) gives each sequence's valid
// steps, as a packed sequence does: steps past a sequence's length leave its state alone and output 0, so
// the reverse direction starts at each sequence's own last step. Returns (T, B, H) outputs and the final
// states (B, H).
// The state is kept transposed, (H, B), so each non-zero of W_hh updates B contiguous sums. Runs on one
// thread: the matrices are small, and starting threads at every step would cost more than the step.
std::vector<torch::Tensor> gru_recurrence(torch::Tensor gi, torch::Tensor row_ptr, torch::Tensor cols,
                                          torch::Tensor values, torch::Tensor b_hh, torch::Tensor h0,
                                          torch::Tensor lengths, bool reverse) {
  TORCH_CHECK(gi.dim() == 3 && gi.scalar_type() == torch::kFloat32, "gru_recurrence: gi must be (T, B, 3H) float32");
  gi = gi.contiguous();
  h0 = h0.contiguous();
  const int64_t steps = gi.size(0), nb = gi.size(1), hidden = h0.size(1);
  TORCH_CHECK(gi.size(2) == 3 * hidden && row_ptr.numel() == 3 * hidden + 1,
              "gru_recurrence: shapes of gi, W_hh and h0 disagree");
  auto out = torch::empty({steps, nb, hidden}, gi.options());
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
  const float* h0d = h0.data_ptr<float>();
  for (int64_t b = 0; b < nb; ++b)
    for (int64_t j = 0; j < hidden; ++j) ht[j * nb + b] = h0d[b * hidden + j];
  for (int64_t s = 0; s < steps; ++s) {
    const int64_t t = reverse ? steps - 1 - s : s;
    for (int64_t r = 0; r < 3 * hidden; ++r) {
      float* acc = gh.data() + r * nb;
      const float init = bh ? bh[r] : 0.0f;
      for (int64_t b = 0; b < nb; ++b) acc[b] = init;
      for (int64_t p = rp[r]; p < rp[r + 1]; ++p) {
        const float v = val[p];
        const float* hk = ht.data() + static_cast<int64_t>(col[p]) * nb;
        for (int64_t b = 0; b < nb; ++b) acc[b] += v * hk[b];
      }
    }
    const float* gt = g + t * nb * 3 * hidden;
    float* ot = o + t * nb * hidden;
    for (int64_t j = 0; j < hidden; ++j) {
      float* hj = ht.data() + j * nb;
      const float* ghr = gh.data() + j * nb;
      const float* ghz = gh.data() + (hidden + j) * nb;
      const float* ghn = gh.data() + (2 * hidden + j) * nb;
      for (int64_t b = 0; b < nb; ++b) {
        if (ragged && t >= len[b]) {  // past this sequence's end: state unchanged, output 0
          ot[b * hidden + j] = 0.0f;
          continue;
        }
        const float* gb = gt + b * 3 * hidden;
        const float r = 1.0f / (1.0f + std::exp(-(gb[j] + ghr[b])));
        const float z = 1.0f / (1.0f + std::exp(-(gb[hidden + j] + ghz[b])));
        const float n = std::tanh(gb[2 * hidden + j] + r * ghn[b]);
        const float h = (1.0f - z) * n + z * hj[b];
        hj[b] = h;
        ot[b * hidden + j] = h;
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
  mod.def("spmm_linear", &spmm_linear, "y = x @ W^T + b with W sparse (CSR per column panel, offsets = column * 64)");
  mod.def("sparse_conv2d", &sparse_conv2d, "direct sparse convolution, stride 1, zero padding, groups 1");
  mod.def("gru_recurrence", &gru_recurrence, "GRU steps with a sparse hidden-to-hidden matrix");
  mod.def("has_avx2", &has_avx2, "whether the kernels were compiled with AVX2/FMA");
}
