// GRU recurrence with a sparse hidden-to-hidden matrix, all time steps in one native call.
//
// gi: (3H, T, B) input projections of every step, transposed (x_t W_ih^T + b_ih, computed before by one
// SpMM, which writes this order directly); W_hh (3H x H) in CSR (row_ptr, cols, values), b_hh (3H) or
// empty; h0: (B, H). Gates in PyTorch's order (r, z, n): r = sigmoid(gi_r + gh_r), z = sigmoid(gi_z + gh_z),
// n = tanh(gi_n + r * gh_n), h' = (1 - z) * n + z * h, with gh = W_hh h + b_hh. `reverse` walks the steps
// backwards (the second direction of a bidirectional GRU). `lengths` (B, int64, or empty: all T) gives each
// sequence's valid steps, as a packed sequence does: steps past a sequence's length leave its state alone
// and output 0, so the reverse direction starts at each sequence's own last step. Returns the outputs
// (T, H, B), transposed, and the final states (B, H).
// Everything is laid out with the batch last, so each non-zero of W_hh updates B contiguous sums and the
// gates run eight sequences per AVX instruction (a vectorised exp). Threads split the batch, never the
// steps: starting threads at every step would cost more than the step.
//
// Training (gru_recurrence_train) runs the same code with one addition, the gates saved for the backward
// through time (gru_backward.cpp): gates (T, 4H, B), rows r, z, n and gh_n = (W_hh h + b_hh)_n of each step
// (0 past a sequence's end). Its outputs equal gru_recurrence's bit for bit; the inference instantiation
// saves nothing and is the code it always was.

#include "gru.h"
#include "kernels.h"
#include "tiles.h"

#include <algorithm>
#include <cmath>
#include <vector>

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
// at out[j * out_step]; with SAVE, the gates r, z, n and gh_n at saved[(k * hidden + j) * saved_step].
template <bool SAVE>
void gates_over_units(const float* gi, int64_t gi_step, int64_t gi_gate, const float* gh, float* h, int64_t w,
                      int64_t hidden, float* out, int64_t out_step, float* saved, int64_t saved_step) {
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
      if constexpr (SAVE) {
        alignas(32) float gv[3][8];
        _mm256_store_ps(gv[0], r);
        _mm256_store_ps(gv[1], z);
        _mm256_store_ps(gv[2], n);
        for (int i = 0; i < 8; ++i) {
          float* s = saved + (j + i) * saved_step;
          s[0] = gv[0][i], s[hidden * saved_step] = gv[1][i], s[2 * hidden * saved_step] = gv[2][i];
          s[3 * hidden * saved_step] = gh[(2 * hidden + j + i) * w];
        }
      }
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
    if constexpr (SAVE) {
      float* s = saved + j * saved_step;
      s[0] = r, s[hidden * saved_step] = z, s[2 * hidden * saved_step] = n;
      s[3 * hidden * saved_step] = gh[(2 * hidden + j) * w];
    }
  }
}

// The recurrence; with SAVE also the gates of every step ({out, last, gates}), else {out, last}.
template <bool SAVE>
std::vector<torch::Tensor> recurrence(torch::Tensor gi, torch::Tensor row_ptr, torch::Tensor cols,
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
  torch::Tensor gates;
  if (SAVE)
    gates = ragged ? torch::zeros({steps, 4 * hidden, nb}, gi.options())
                   : torch::empty({steps, 4 * hidden, nb}, gi.options());
  float* sv = SAVE ? gates.data_ptr<float>() : nullptr;
  TORCH_CHECK(!ragged || (lengths.numel() == nb && lengths.scalar_type() == torch::kInt64),
              "gru_recurrence: lengths must hold one int64 per sequence");
  if (ragged) lengths = lengths.contiguous();
  const int64_t* len = ragged ? lengths.data_ptr<int64_t>() : nullptr;
  const std::vector<int64_t> active = running_prefix(len, nb, steps);
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
      const int64_t e = slice_end(active[t], b0, w);
      if (e <= 0) continue;
      if (ragged)
        for (int64_t b = 0; b < e; ++b) live[b] = t < len[b0 + b] ? 1.0f : 0.0f;
      // gh = W_hh h + b_hh: each row starts at its bias
      for (int64_t r = 0; r < 3 * hidden; ++r) std::fill(gh.data() + r * w, gh.data() + r * w + e, bh ? bh[r] : 0.0f);
      slice_product(hoff.data(), val, rp, 3 * hidden, ht.data(), gh.data(), w, e);
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
          if constexpr (SAVE) {  // rows r, z, n, gh_n of unit j, H rows apart; 0 when finished
            float* sj = sv + (t * 4 * hidden + j) * nb + b0 + b;
            const __m256 zero = _mm256_setzero_ps();
            _mm256_storeu_ps(sj, _mm256_blendv_ps(zero, r, on));
            _mm256_storeu_ps(sj + hidden * nb, _mm256_blendv_ps(zero, z, on));
            _mm256_storeu_ps(sj + 2 * hidden * nb, _mm256_blendv_ps(zero, n, on));
            _mm256_storeu_ps(sj + 3 * hidden * nb, _mm256_blendv_ps(zero, _mm256_loadu_ps(ghn + b), on));
          }
        }
#endif
      }
      // The sequences past the last whole eight (all of them for a batch of 1): their gates go eight
      // hidden units at a time, gathering the strided inputs (one by one without AVX2).
      for (int64_t b = full; b < e; ++b) {
        if (live[b] == 0.0f) continue;  // past this sequence's end: state unchanged, output 0
        float* saved = SAVE ? sv + t * 4 * hidden * nb + b0 + b : nullptr;
        gates_over_units<SAVE>(g + t * nb + b0 + b, steps * nb, hidden * steps * nb, gh.data() + b, ht.data() + b, w,
                               hidden, o + t * hidden * nb + b0 + b, nb, saved, nb);
      }
    }
    for (int64_t b = 0; b < w; ++b)
      for (int64_t j = 0; j < hidden; ++j) ld[(b0 + b) * hidden + j] = ht[j * w + b];
  };
  over_batch_slices(nb, run);
  if constexpr (SAVE) return {out, last, gates};
  return {out, last};
}

}  // namespace

std::vector<torch::Tensor> gru_recurrence(torch::Tensor gi, torch::Tensor row_ptr, torch::Tensor cols,
                                          torch::Tensor values, torch::Tensor b_hh, torch::Tensor h0,
                                          torch::Tensor lengths, bool reverse) {
  return recurrence<false>(gi, row_ptr, cols, values, b_hh, h0, lengths, reverse);
}

// The same recurrence for training: {outputs (T, H, B), final states (B, H), gates (T, 4H, B)}, the gates
// being what gru_recurrence_backward reads.
std::vector<torch::Tensor> gru_recurrence_train(torch::Tensor gi, torch::Tensor row_ptr, torch::Tensor cols,
                                                torch::Tensor values, torch::Tensor b_hh, torch::Tensor h0,
                                                torch::Tensor lengths, bool reverse) {
  return recurrence<true>(gi, row_ptr, cols, values, b_hh, h0, lengths, reverse);
}
