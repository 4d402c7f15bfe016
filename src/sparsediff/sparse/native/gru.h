// What the GRU recurrence (gru.cpp) and its backward through time (gru_backward.cpp) share: the batch
// slices the threads take, the running prefix of a ragged batch, and the sparse product of one step over
// a slice (the forward's W_hh h, the backward's W_hh^T dgh: the same register tiles, B lanes wide).
//
// Both kernels lay everything out with the batch last: a slice of w sequences keeps its rows (a hidden
// unit or a gate row each) w floats apart, so each non-zero of the matrix updates w contiguous sums.

#pragma once

#include "tiles.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

namespace {

// With lengths in non-increasing order (a packed batch's order) the sequences still running at step t
// are a prefix of the batch, active[t] long: the work of a step shrinks with it, as for a packed GRU.
// Otherwise (no lengths, or unsorted ones) every step covers the whole batch.
inline std::vector<int64_t> running_prefix(const int64_t* len, int64_t nb, int64_t steps) {
  std::vector<int64_t> active(static_cast<size_t>(steps), nb);
  bool sorted = len != nullptr;
  for (int64_t b = 1; len && b < nb; ++b) sorted = sorted && len[b - 1] >= len[b];
  if (sorted)
    for (int64_t t = 0; t < steps; ++t) {
      int64_t count = 0;
      while (count < nb && len[count] > t) ++count;
      active[t] = count;
    }
  return active;
}

// acc[r * w + b] += sum over p in [rp[r], rp[r + 1]) of val[p] * x[off[p] + b], for rows r < rows and
// lanes b < e (off[p]: where the row of x the non-zero p reads starts, its column times w). One register
// tile of up to 64 lanes per row (independent sums, so the FMAs do not wait on each other); the last few
// lanes (fewer than eight) take four partial sums per row.
inline void slice_product(const int32_t* off, const float* val, const int64_t* rp, int64_t rows,
                          const float* x, float* acc, int64_t w, int64_t e) {
  int64_t bv = 0;
  auto tiles = [&](auto width) {
    constexpr int W = decltype(width)::value;
    for (; bv + W <= e; bv += W) tile_rows<W, 1>(off, val, rp, rp + 1, 1, rows, x + bv, acc + bv, w, true);
  };
  tiles(std::integral_constant<int, 64>{});
  tiles(std::integral_constant<int, 32>{});
  tiles(std::integral_constant<int, 16>{});
  tiles(std::integral_constant<int, 8>{});
  for (int64_t b = bv; b < e; ++b)
    for (int64_t r = 0; r < rows; ++r) {
      const float* xb = x + b;
      float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
      int64_t p = rp[r];
      for (; p + 4 <= rp[r + 1]; p += 4) {
        s0 += val[p] * xb[off[p]];
        s1 += val[p + 1] * xb[off[p + 1]];
        s2 += val[p + 2] * xb[off[p + 2]];
        s3 += val[p + 3] * xb[off[p + 3]];
      }
      for (; p < rp[r + 1]; ++p) s0 += val[p] * xb[off[p]];
      acc[r * w + b] += (s0 + s1) + (s2 + s3);
    }
}

// run(b0, b1) over slices of the batch [0, nb). Sequences are independent: with several threads each
// takes a slice (a multiple of eight) for the whole recurrence, so threads start once per call, not once
// per step, and each slice keeps its own state and sums: no cache line is written by two threads at every
// step. The slices depend on the thread count only, so a result does too.
template <class Run>
void over_batch_slices(int64_t nb, const Run& run) {
  const int64_t threads = at::get_num_threads();
  if (threads > 1 && nb >= 16) {
    const int64_t chunk = ((nb + threads - 1) / threads + 7) / 8 * 8;
    at::parallel_for(0, (nb + chunk - 1) / chunk, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) run(c * chunk, std::min(nb, (c + 1) * chunk));
    });
  } else {
    run(0, nb);
  }
}

// The end of slice [b0, b0 + w)'s work at a step whose running prefix is `active` long: past it (rounded
// up to whole vectors of eight) nothing changes.
inline int64_t slice_end(int64_t active, int64_t b0, int64_t w) {
  return std::min(w, (std::max<int64_t>(active - b0, 0) + 7) / 8 * 8);
}

}  // namespace
