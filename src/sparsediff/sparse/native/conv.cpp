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
//
// Its backward: the input gradient is this kernel run over the output gradient with the transposed, flipped
// kernel (sparse/runtime/conv_grad.py); the gradient of the kept taps is conv_backward.cpp's.

#include "kernels.h"
#include "tiles.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

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
  auto pad = [&](int64_t i0, int64_t i1) { pad_planes(xd, h, w, ph, pw, wp, plane, xp, i0, i1); };
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
