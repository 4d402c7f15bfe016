// The backward of the direct sparse convolution (conv.cpp): the gradient of the kept kernel taps.
//
// For y = conv2d(x, W) (stride 1, zero padding, groups 1) with W stored by output channel (CSR, tap code
// c * KH * KW + ky * KW + kx), the gradient of non-zero p (row o, tap c, ky, kx) is the correlation
//     dvalues[p] = sum over b, h < Ho, w < Wo of dy[b, o, h, w] * xpad[b, c, h + ky * dh, w + kx * dw].
// Laid out as the forward computes (the input zero-padded into planes of Hp x Wp, the output on the padded
// grid: position q = h * Wp + w), it is one dot product over contiguous floats per image:
//     dot(dygrid[b, o, q], xpad[b] + offsets[p] + q) over the positions q,
// where dygrid holds dy at q = h * Wp + w for w < Wo and zeros in the (Wp - Wo) extra columns of each row
// (so the extra positions, which read the next row's or plane's floats, add nothing), and offsets[p] =
// c * Hp * Wp + ky * dh * Wp + kx * dw is the forward's own array. The positions are rounded up to a
// multiple of 8 with zeros, so that every dot product runs over whole vectors.
//
// The positions of an image are cut into chunks and the input channels into panels, so that what a chunk
// reads of one panel (channels x (chunk + halo) floats) stays in L1 while every row takes its non-zeros of
// that panel (a row's non-zeros must be sorted by channel, as the forward needs them too). A row's
// non-zeros go in groups of up to 8 whose dot products share each load of dy, in 8-lane sums reduced once
// per group, panel and chunk, added to dvalues[p] in the order of the (image, chunk) slabs. Threads split the rows (by their count of non-zeros) when
// there are enough of them: no reduction, and the same result for any number of threads. With few rows
// they split the slabs instead, each thread summing into its own partial gradient, the partials added
// in thread order at the end (deterministic for a given thread count).
//
// The input gradient needs no kernel of its own: for stride 1 it is the forward convolution of dy with
// the transposed and flipped kernel (built in Python: sparse/runtime/conv_grad.py).

#include "kernels.h"
#include "tiles.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace {

// out[j] += dot(dy[0 .. n), xb + off[j] [0 .. n)) for the G non-zeros j < G; n is a multiple of 8. With
// fewer than 8 non-zeros, U sums per non-zero keep eight FMA chains in flight.
template <int G>
inline void tap_dots(const float* dy, const float* xb, const int32_t* off, int64_t n, float* out) {
#if SPARSEDIFF_AVX2
  constexpr int U = 8 / G;
  __m256 a[G][U];
  const float* xs[G];
#pragma GCC unroll 8
  for (int j = 0; j < G; ++j) {
    xs[j] = xb + off[j];
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u) a[j][u] = _mm256_setzero_ps();
  }
  int64_t q = 0;
  for (; q + 8 * U <= n; q += 8 * U) {
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u) {
      const __m256 d = _mm256_loadu_ps(dy + q + 8 * u);
#pragma GCC unroll 8
      for (int j = 0; j < G; ++j) a[j][u] = _mm256_fmadd_ps(d, _mm256_loadu_ps(xs[j] + q + 8 * u), a[j][u]);
    }
  }
  for (; q < n; q += 8) {
    const __m256 d = _mm256_loadu_ps(dy + q);
#pragma GCC unroll 8
    for (int j = 0; j < G; ++j) a[j][0] = _mm256_fmadd_ps(d, _mm256_loadu_ps(xs[j] + q), a[j][0]);
  }
  __m256 s[8];
#pragma GCC unroll 8
  for (int j = 0; j < 8; ++j) {
    s[j] = _mm256_setzero_ps();
    if (j < G) {
#pragma GCC unroll 8
      for (int u = 0; u < U; ++u) s[j] = _mm256_add_ps(s[j], a[j][u]);
    }
  }
  // eight horizontal sums at once: lane j of the result is the sum of s[j]'s eight lanes
  const __m256 h01 = _mm256_hadd_ps(s[0], s[1]), h23 = _mm256_hadd_ps(s[2], s[3]),
               h45 = _mm256_hadd_ps(s[4], s[5]), h67 = _mm256_hadd_ps(s[6], s[7]);
  const __m256 lo = _mm256_hadd_ps(h01, h23), hi = _mm256_hadd_ps(h45, h67);
  const __m256 sums = _mm256_add_ps(_mm256_permute2f128_ps(lo, hi, 0x20), _mm256_permute2f128_ps(lo, hi, 0x31));
  alignas(32) float t[8];
  _mm256_store_ps(t, sums);
#pragma GCC unroll 8
  for (int j = 0; j < G; ++j) out[j] += t[j];
#else
  for (int j = 0; j < G; ++j) {
    float lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // eight partial sums, as the vector path has
    const float* xs = xb + off[j];
    for (int64_t q = 0; q < n; q += 8)
      for (int l = 0; l < 8; ++l) lanes[l] += dy[q + l] * xs[q + l];
    float total = 0.0f;
    for (int l = 0; l < 8; ++l) total += lanes[l];
    out[j] += total;
  }
#endif
}

// out[p] += the dot products of the non-zeros begin .. end of one row over n positions: groups of 8,
// then of 4, 2 and 1.
inline void row_dots(const float* dy, const float* xb, const int32_t* off, int64_t begin, int64_t end, int64_t n,
                     float* out) {
  int64_t p = begin;
  for (; p + 8 <= end; p += 8) tap_dots<8>(dy, xb, off + p, n, out + p);
  if (p + 4 <= end) tap_dots<4>(dy, xb, off + p, n, out + p), p += 4;
  if (p + 2 <= end) tap_dots<2>(dy, xb, off + p, n, out + p), p += 2;
  if (p < end) tap_dots<1>(dy, xb, off + p, n, out + p);
}

}  // namespace

// dvalues[p] for every non-zero of the kernel (the layer's value order), given dy (B, O, Ho, Wo) and
// x (B, C, H, W); offsets as for sparse_conv2d (c * Hp * Wp + ky * dh * Wp + kx * dw, for x's size).
torch::Tensor sparse_conv2d_values_grad(torch::Tensor dy, torch::Tensor x, torch::Tensor row_ptr,
                                        torch::Tensor offsets, int64_t kh, int64_t kw, int64_t ph, int64_t pw,
                                        int64_t dh, int64_t dw, int64_t grain) {
  TORCH_CHECK(x.dim() == 4 && dy.dim() == 4 && x.scalar_type() == torch::kFloat32 &&
                  dy.scalar_type() == torch::kFloat32,
              "sparse_conv2d_values_grad: dy (B, O, Ho, Wo) and x (B, C, H, W) float32 expected");
  TORCH_CHECK(row_ptr.scalar_type() == torch::kInt64 && offsets.scalar_type() == torch::kInt32,
              "sparse_conv2d_values_grad: row_ptr int64 and offsets int32 expected");
  const int64_t nb = x.size(0), c_in = x.size(1), h = x.size(2), w = x.size(3), c_out = row_ptr.numel() - 1;
  const int64_t hp = h + 2 * ph, wp = w + 2 * pw;
  const int64_t ho = hp - dh * (kh - 1), wo = wp - dw * (kw - 1);
  TORCH_CHECK(ho > 0 && wo > 0, "sparse_conv2d_values_grad: the kernel is larger than the padded input");
  TORCH_CHECK(dy.size(0) == nb && dy.size(1) == c_out && dy.size(2) == ho && dy.size(3) == wo,
              "sparse_conv2d_values_grad: dy has shape ", dy.sizes(), ", expected (", nb, ", ", c_out, ", ", ho,
              ", ", wo, ")");
  const int64_t nnz = offsets.numel();
  auto grad = torch::zeros({nnz}, x.options());
  if (nb == 0 || nnz == 0) return grad;
  TORCH_CHECK(row_ptr.numel() > 0 && row_ptr[-1].item<int64_t>() == nnz,
              "sparse_conv2d_values_grad: row_ptr does not end at the number of offsets");
  x = x.contiguous();
  dy = dy.contiguous();
  offsets = offsets.contiguous();
  row_ptr = row_ptr.contiguous();
  const int64_t plane = hp * wp, image = c_in * plane;
  const int64_t positions = (ho * wp + 7) / 8 * 8;  // per image, on the padded grid
  const int64_t halo = (kh - 1) * dh * wp + (kw - 1) * dw;
  const bool parallel = nnz * positions * nb >= grain && at::get_num_threads() > 1;
  // slack: the last image's dot products read up to (kw - 1) * dw + 7 floats past its last plane
  const int64_t slack = 16 + wp;
  auto xbuf = torch::empty({nb * image + slack}, x.options());
  auto dybuf = torch::empty({nb * c_out * positions}, x.options());
  float* xp = xbuf.data_ptr<float>();
  float* dyg = dybuf.data_ptr<float>();
  std::memset(xp + nb * image, 0, sizeof(float) * slack);
  const float* xd = x.data_ptr<float>();
  const float* dyd = dy.data_ptr<float>();
  const int64_t x_planes = nb * c_in;
  auto pad = [&](int64_t i0, int64_t i1) {  // i < x_planes: a plane of x; past that, a plane of dy
    const int64_t split = std::min(std::max(i0, x_planes), i1);
    pad_planes(xd, h, w, ph, pw, wp, plane, xp, i0, split);
    pad_planes(dyd, ho, wo, 0, 0, wp, positions, dyg, split - x_planes, i1 - x_planes);
  };
  if (parallel) {
    at::parallel_for(0, x_planes + nb * c_out, 16, pad);
  } else {
    pad(0, x_planes + nb * c_out);
  }

  // Chunks of positions and panels of channels: the input a chunk reads from one panel (cp channels x
  // (chunk + halo) floats) stays in L1 while every row takes its non-zeros of that panel. A row's non-zeros
  // are sorted by channel (offset / plane), so each panel's share of a row is a contiguous range (seg).
  // Chunks of at least 256 positions (and twice the halo) keep the horizontal sums (one per group of
  // non-zeros, panel and chunk) a small part of the work.
  constexpr int64_t l1_floats = 6144;  // 24 KiB of input; the rest of L1 holds dy and the sums
  const int64_t longest = std::max<int64_t>(256, (2 * halo + 7) / 8 * 8);
  const int64_t chunks = (positions + longest - 1) / longest;
  const int64_t chunk = (positions / 8 + chunks - 1) / chunks * 8;  // (nearly) equal, whole vectors
  const int64_t slabs = nb * chunks;  // slab s: image s / chunks, chunk s % chunks
  const int64_t widest = std::max<int64_t>(1, l1_floats / (chunk + halo));
  const int64_t panels = (c_in + widest - 1) / widest;
  const int64_t cp = (c_in + panels - 1) / panels;

  const int64_t* rp = row_ptr.data_ptr<int64_t>();
  const int32_t* off = offsets.data_ptr<int32_t>();
  std::vector<int64_t> seg(static_cast<size_t>(c_out * (panels + 1)));
  for (int64_t o = 0; o < c_out; ++o) {
    int64_t p = rp[o];
    for (int64_t k = 0; k < panels; ++k) {
      seg[o * (panels + 1) + k] = p;
      while (p < rp[o + 1] && off[p] < (k + 1) * cp * plane) ++p;
    }
    seg[o * (panels + 1) + panels] = rp[o + 1];
  }
  // rows o0 .. o1 over slabs s0 .. s1, summed into out (indexed by non-zero)
  auto work = [&](int64_t o0, int64_t o1, int64_t s0, int64_t s1, float* out) {
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t b = s / chunks, first = (s % chunks) * chunk, n = std::min(chunk, positions - first);
      const float* xb = xp + b * image + first;
      const float* dys = dyg + b * c_out * positions + first;
      for (int64_t k = 0; k < panels; ++k)
        for (int64_t o = o0; o < o1; ++o) {
          const int64_t* so = seg.data() + o * (panels + 1) + k;
          row_dots(dys + o * positions, xb, off, so[0], so[1], n, out);
        }
    }
  };
  float* gd = grad.data_ptr<float>();
  const int64_t threads = parallel ? at::get_num_threads() : 1;
  if (threads == 1) {
    work(0, c_out, 0, slabs, gd);
  } else if (c_out >= 4 * threads || slabs < 2) {
    // rows split so that each part has about the same number of non-zeros
    std::vector<int64_t> bounds(static_cast<size_t>(threads + 1), c_out);
    bounds[0] = 0;
    for (int64_t t = 1; t < threads; ++t)
      bounds[t] = std::lower_bound(rp, rp + c_out, nnz * t / threads) - rp;
    at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) work(bounds[t], bounds[t + 1], 0, slabs, gd);
    });
  } else {
    const int64_t parts = std::min(threads, slabs), per = (slabs + parts - 1) / parts;
    std::vector<float> partial(static_cast<size_t>(parts * nnz), 0.0f);
    at::parallel_for(0, parts, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t)
        work(0, c_out, t * per, std::min(slabs, (t + 1) * per), partial.data() + t * nnz);
    });
    for (int64_t t = 0; t < parts; ++t)  // in part order: the same sums for the same thread count
      for (int64_t p = 0; p < nnz; ++p) gd[p] += partial[t * nnz + p];
  }
  return grad;
}
