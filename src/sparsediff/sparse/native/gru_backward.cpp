// Backward through time of the GRU recurrence (gru.cpp), with the sparse hidden-to-hidden matrix.
//
// The forward for training (gru_recurrence_train) saved, per step, the gates r, z, n and gh_n (the n rows
// of gh = W_hh h + b_hh, before the multiply by r): gates (T, 4H, B). From them, the outputs out (T, H, B)
// and h0 (B, H), this kernel walks the steps in the opposite order of the forward with dh, the gradient
// of the state (dlast to begin with, plus dout[t] at each step):
//   dn = dh (1 - z); dz = dh (h_prev - n); carry = dh z
//   da_n = dn (1 - n^2); dgi_n = da_n; dgh_n = da_n r; dr = da_n gh_n
//   da_r = dr r (1 - r); da_z = dz z (1 - z); dgi_r = dgh_r = da_r; dgi_z = dgh_z = da_z
//   dh_prev = carry + W_hh^T dgh
// where h_prev is h0 at the direction's first step of a sequence, else the previous step's output
// (out[t - 1], or out[t + 1] in reverse). W_hh^T comes as its own CSR (H rows x 3H columns: the
// transposed structure, its values gathered from W_hh's), so dh_prev is the forward's product over the
// same register tiles (gru.h: slice_product), the batch in the lanes. Steps past a sequence's end (lengths)
// pass its dh through unchanged and contribute nothing (their dgi, dgh are 0; dout there is ignored: the
// output was a constant 0). Threads split the batch as the forward does, never the steps; the result
// depends on the thread count only.
//
// Returns dgi (3H, T, B), the gradient of gi (the input projections, the forward's input), dgh (3H, T, B),
// the gradient of gh (its r and z rows equal dgi's), and dh0 (B, H). The weight gradients are not here:
// W_ih's and W_hh's values are an SDDMM each (dgi against the inputs, dgh against the previous states),
// the biases' a sum of dgi and dgh over steps and batch.

#include "gru.h"
#include "kernels.h"
#include "tiles.h"

#include <algorithm>
#include <vector>

namespace {

// The gate gradients of one unit and sequence (the scalar form of the vector loop below). Returns the
// state gradient carried past the gates (dh z); writes the three rows of dgi and dgh.
inline float unit_backward(float dh, float r, float z, float n, float ghn, float hp, float* dar, float* daz,
                           float* dan, float* dghn) {
  const float dn = dh * (1.0f - z), dz = dh * (hp - n);
  const float a_n = dn * (1.0f - n * n);
  *dan = a_n;
  *dghn = a_n * r;
  *dar = a_n * ghn * (r - r * r);
  *daz = dz * (z - z * z);
  return dh * z;
}

}  // namespace

// dout (T, H, B) or empty (no gradient: 0), dlast (B, H) or empty, gates (T, 4H, B) and out (T, H, B) from
// gru_recurrence_train, h0 (B, H); t_row_ptr (H + 1) int64, t_cols (int32, columns in [0, 3H)) and t_values:
// W_hh^T in CSR; lengths (B) int64 or empty; reverse: the direction the forward ran.
std::vector<torch::Tensor> gru_recurrence_backward(torch::Tensor dout, torch::Tensor dlast, torch::Tensor gates,
                                                   torch::Tensor out, torch::Tensor h0, torch::Tensor t_row_ptr,
                                                   torch::Tensor t_cols, torch::Tensor t_values,
                                                   torch::Tensor lengths, bool reverse) {
  TORCH_CHECK(gates.dim() == 3 && gates.size(1) % 4 == 0 && gates.scalar_type() == torch::kFloat32,
              "gru_recurrence_backward: gates must be (T, 4H, B) float32");
  TORCH_CHECK(out.scalar_type() == torch::kFloat32 && h0.scalar_type() == torch::kFloat32 &&
                  (dout.numel() == 0 || dout.scalar_type() == torch::kFloat32) &&
                  (dlast.numel() == 0 || dlast.scalar_type() == torch::kFloat32),
              "gru_recurrence_backward: float32 tensors expected");
  const int64_t steps = gates.size(0), hidden = gates.size(1) / 4, nb = gates.size(2);
  const bool has_dout = dout.numel() > 0, has_dlast = dlast.numel() > 0, ragged = lengths.numel() > 0;
  TORCH_CHECK(out.dim() == 3 && out.size(0) == steps && out.size(1) == hidden && out.size(2) == nb &&
                  h0.dim() == 2 && h0.size(0) == nb && h0.size(1) == hidden &&
                  (!has_dout || dout.sizes() == out.sizes()) &&
                  (!has_dlast || (dlast.dim() == 2 && dlast.size(0) == nb && dlast.size(1) == hidden)),
              "gru_recurrence_backward: shapes of dout, dlast, gates, out and h0 disagree");
  TORCH_CHECK(t_row_ptr.numel() == hidden + 1 && t_row_ptr.scalar_type() == torch::kInt64 &&
                  t_cols.scalar_type() == torch::kInt32 && t_values.scalar_type() == torch::kFloat32 &&
                  t_cols.numel() == t_values.numel(),
              "gru_recurrence_backward: W_hh^T must be a CSR of H rows (int64 row_ptr, int32 cols, float32)");
  TORCH_CHECK(!ragged || (lengths.numel() == nb && lengths.scalar_type() == torch::kInt64),
              "gru_recurrence_backward: lengths must hold one int64 per sequence");
  gates = gates.contiguous();
  out = out.contiguous();
  h0 = h0.contiguous();
  if (has_dout) dout = dout.contiguous();
  if (has_dlast) dlast = dlast.contiguous();
  if (ragged) lengths = lengths.contiguous();
  t_row_ptr = t_row_ptr.contiguous();
  t_cols = t_cols.contiguous();
  t_values = t_values.contiguous();
  // steps past a sequence's end are not written: only then must the gradients start at 0
  auto make = [&] {
    return ragged ? torch::zeros({3 * hidden, steps, nb}, gates.options())
                  : torch::empty({3 * hidden, steps, nb}, gates.options());
  };
  auto dgi = make(), dgh = make();
  auto dh0 = torch::empty({nb, hidden}, gates.options());
  const int64_t* len = ragged ? lengths.data_ptr<int64_t>() : nullptr;
  const std::vector<int64_t> active = running_prefix(len, nb, steps);
  const float *sv = gates.data_ptr<float>(), *od = out.data_ptr<float>(), *h0d = h0.data_ptr<float>();
  const float* dod = has_dout ? dout.data_ptr<float>() : nullptr;
  const float* dld = has_dlast ? dlast.data_ptr<float>() : nullptr;
  const int64_t* rp = t_row_ptr.data_ptr<int64_t>();
  const int32_t* col = t_cols.data_ptr<int32_t>();
  const float* val = t_values.data_ptr<float>();
  const int64_t nnz = t_values.numel();
  float *dgid = dgi.data_ptr<float>(), *dghd = dgh.data_ptr<float>(), *dh0d = dh0.data_ptr<float>();
  auto run = [&](int64_t b0, int64_t b1) {
    const int64_t w = b1 - b0;
    // per slice, batch last: dh (H, w), h0 (H, w), this step's dgh (3H, w)
    std::vector<float> dh(static_cast<size_t>(hidden * w), 0.0f), h0t(static_cast<size_t>(hidden * w));
    std::vector<float> dg(static_cast<size_t>(3 * hidden * w));
    std::vector<float> live(static_cast<size_t>(w), 1.0f);   // 1 at a step within the sequence
    std::vector<float> first(static_cast<size_t>(w), 0.0f);  // 1 at its first step in reverse (h_prev = h0)
    std::vector<int32_t> off(static_cast<size_t>(nnz));      // where each non-zero's dgh row starts
    for (int64_t p = 0; p < nnz; ++p) off[p] = static_cast<int32_t>(col[p] * w);
    for (int64_t b = 0; b < w; ++b)
      for (int64_t j = 0; j < hidden; ++j) {
        h0t[j * w + b] = h0d[(b0 + b) * hidden + j];
        if (dld) dh[j * w + b] = dld[(b0 + b) * hidden + j];
      }
    for (int64_t s = 0; s < steps; ++s) {
      const int64_t t = reverse ? s : steps - 1 - s;  // the forward's steps, last first
      const int64_t e = slice_end(active[t], b0, w);
      if (e <= 0) continue;
      if (ragged)
        for (int64_t b = 0; b < e; ++b) {
          const int64_t l = std::min(len[b0 + b], steps);
          live[b] = t < l ? 1.0f : 0.0f;
          first[b] = reverse && t == l - 1 ? 1.0f : 0.0f;
        }
      // h_prev: h0 for every running sequence at the direction's first step; in reverse, a ragged
      // sequence also starts at its own last step (first[b]), elsewhere it is the previous output
      const bool from_h0 = reverse ? t == steps - 1 : t == 0;
      const float* prev = from_h0 ? nullptr : od + (reverse ? t + 1 : t - 1) * hidden * nb + b0;
      const bool blend_first = ragged && reverse && prev;
      const int64_t full = SPARSEDIFF_AVX2 ? e / 8 * 8 : 0;  // sequences taken eight at a time
      for (int64_t j = 0; j < hidden; ++j) {
        float* dhj = dh.data() + j * w;
        const float* hpo = prev ? prev + j * nb : nullptr;
        const float* hp0 = h0t.data() + j * w;
        const float* gr = sv + (t * 4 * hidden + j) * nb + b0;  // r, z, n, gh_n: H rows apart
        const float *gz = gr + hidden * nb, *gn = gr + 2 * hidden * nb, *gg = gr + 3 * hidden * nb;
        const float* doj = dod ? dod + (t * hidden + j) * nb + b0 : nullptr;
        float *dgr = dg.data() + j * w, *dgz = dgr + hidden * w, *dgn = dgr + 2 * hidden * w;
        // this step's rows of the outputs: dgi[g * H + j, t], dgh[g * H + j, t] for the gates g = r, z, n
        const int64_t gate_rows = hidden * steps * nb;  // from one gate's rows to the next
        float *ir = dgid + (j * steps + t) * nb + b0, *iz = ir + gate_rows, *in = ir + 2 * gate_rows;
        float *hr = dghd + (j * steps + t) * nb + b0, *hz = hr + gate_rows, *hn = hr + 2 * gate_rows;
        int64_t b = 0;
#if SPARSEDIFF_AVX2
        const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
        for (; b < full; b += 8) {
          const __m256 on = _mm256_cmp_ps(_mm256_loadu_ps(live.data() + b), zero, _CMP_NEQ_OQ);
          const __m256 dh_old = _mm256_loadu_ps(dhj + b);
          const __m256 d = doj ? _mm256_add_ps(dh_old, _mm256_loadu_ps(doj + b)) : dh_old;
          const __m256 r = _mm256_loadu_ps(gr + b), z = _mm256_loadu_ps(gz + b), n = _mm256_loadu_ps(gn + b);
          __m256 hp = hpo ? _mm256_loadu_ps(hpo + b) : _mm256_loadu_ps(hp0 + b);
          if (blend_first)
            hp = _mm256_blendv_ps(hp, _mm256_loadu_ps(hp0 + b),
                                  _mm256_cmp_ps(_mm256_loadu_ps(first.data() + b), zero, _CMP_NEQ_OQ));
          const __m256 dn = _mm256_mul_ps(d, _mm256_sub_ps(one, z));
          const __m256 dz = _mm256_mul_ps(d, _mm256_sub_ps(hp, n));
          const __m256 a_n = _mm256_blendv_ps(zero, _mm256_mul_ps(dn, _mm256_fnmadd_ps(n, n, one)), on);
          const __m256 dr = _mm256_mul_ps(a_n, _mm256_loadu_ps(gg + b));
          const __m256 a_r = _mm256_blendv_ps(zero, _mm256_mul_ps(dr, _mm256_fnmadd_ps(r, r, r)), on);
          const __m256 a_z = _mm256_blendv_ps(zero, _mm256_mul_ps(dz, _mm256_fnmadd_ps(z, z, z)), on);
          const __m256 g_n = _mm256_mul_ps(a_n, r);
          _mm256_storeu_ps(dgr + b, a_r);
          _mm256_storeu_ps(dgz + b, a_z);
          _mm256_storeu_ps(dgn + b, g_n);
          _mm256_storeu_ps(ir + b, a_r);
          _mm256_storeu_ps(iz + b, a_z);
          _mm256_storeu_ps(in + b, a_n);
          _mm256_storeu_ps(hr + b, a_r);
          _mm256_storeu_ps(hz + b, a_z);
          _mm256_storeu_ps(hn + b, g_n);
          // the carry (W^T dgh is added below); a finished sequence's dh stays
          _mm256_storeu_ps(dhj + b, _mm256_blendv_ps(dh_old, _mm256_mul_ps(d, z), on));
        }
#endif
        for (; b < e; ++b) {
          float a_r = 0.0f, a_z = 0.0f, a_n = 0.0f, g_n = 0.0f;
          if (live[b] != 0.0f) {
            const float hp = hpo && first[b] == 0.0f ? hpo[b] : hp0[b];
            const float d = dhj[b] + (doj ? doj[b] : 0.0f);
            dhj[b] = unit_backward(d, gr[b], gz[b], gn[b], gg[b], hp, &a_r, &a_z, &a_n, &g_n);
          }
          dgr[b] = a_r, dgz[b] = a_z, dgn[b] = g_n;
          ir[b] = a_r, iz[b] = a_z, in[b] = a_n;
          hr[b] = a_r, hz[b] = a_z, hn[b] = g_n;
        }
      }
      // dh_prev = carry + W_hh^T dgh (the rows of sequences past their end are 0: their dh stays)
      slice_product(off.data(), val, rp, hidden, dg.data(), dh.data(), w, e);
    }
    for (int64_t b = 0; b < w; ++b)
      for (int64_t j = 0; j < hidden; ++j) dh0d[(b0 + b) * hidden + j] = dh[j * w + b];
  };
  over_batch_slices(nb, run);
  return {dgi, dgh, dh0};
}
