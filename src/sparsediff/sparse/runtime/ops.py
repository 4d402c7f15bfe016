"""The native kernels as torch operators (``torch.ops.sparsediff.*``), for ``torch.compile``.

In eager mode the sparse layers call the kernel module directly: the operator dispatcher would cost more
than a small layer's whole product. While ``torch.compile`` traces a model, :func:`native.native_for`
hands the layers these operators instead, so a sparse model compiles into whole graphs (no graph break at
every sparse layer, which made a compiled sparse model slower than the compiled dense one) and the
compiler can fuse the norms and activations between the layers. Each operator has a fake implementation
(output shapes only) for the compiler's tracing. The operators need torch >= 2.4 (``torch.library.
custom_op``); with an older torch a compiled model breaks its graph at each sparse layer (still correct).

This module has no ``from __future__ import annotations``: ``custom_op`` reads the annotations.
"""

import torch
from torch import Tensor

from .native import OPERATORS, kernels


def _kernels():
    mod = kernels()
    if mod is None:
        raise RuntimeError("sparsediff's native kernels are unavailable")
    return mod


if OPERATORS:

    @torch.library.custom_op("sparsediff::spmm_linear", mutates_args=())
    def spmm_linear(
        x: Tensor,
        row_ptr: Tensor,
        cols: Tensor,
        values: Tensor,
        bias: Tensor,
        panel: int,
        grain: int,
        transposed: bool,
    ) -> Tensor:
        return _kernels().spmm_linear(x, row_ptr, cols, values, bias, panel, grain, transposed)

    @spmm_linear.register_fake
    def _spmm_linear_shape(x, row_ptr, cols, values, bias, panel, grain, transposed):
        rows, out = x.shape[0], row_ptr.shape[1] - 1
        return x.new_empty((out, rows) if transposed else (rows, out))

    @torch.library.custom_op("sparsediff::sparse_conv2d", mutates_args=())
    def sparse_conv2d(
        x: Tensor,
        row_ptr: Tensor,
        taps: Tensor,
        offsets: Tensor,
        values: Tensor,
        bias: Tensor,
        kh: int,
        kw: int,
        ph: int,
        pw: int,
        dh: int,
        dw: int,
        grain: int,
    ) -> Tensor:
        return _kernels().sparse_conv2d(
            x, row_ptr, taps, offsets, values, bias, kh, kw, ph, pw, dh, dw, grain
        )

    @sparse_conv2d.register_fake
    def _sparse_conv2d_shape(x, row_ptr, taps, offsets, values, bias, kh, kw, ph, pw, dh, dw, grain):
        height = x.shape[2] + 2 * ph - dh * (kh - 1)
        width = x.shape[3] + 2 * pw - dw * (kw - 1)
        return x.new_empty((x.shape[0], row_ptr.shape[0] - 1, height, width))

    @torch.library.custom_op("sparsediff::gru_recurrence", mutates_args=())
    def gru_recurrence(
        gi: Tensor,
        row_ptr: Tensor,
        cols: Tensor,
        values: Tensor,
        bias: Tensor,
        h0: Tensor,
        lengths: Tensor,
        reverse: bool,
    ) -> tuple[Tensor, Tensor]:
        out, last = _kernels().gru_recurrence(gi, row_ptr, cols, values, bias, h0, lengths, reverse)
        return out, last

    @gru_recurrence.register_fake
    def _gru_recurrence_shape(gi, row_ptr, cols, values, bias, h0, lengths, reverse):
        steps, batch, hidden = gi.shape[1], gi.shape[2], h0.shape[1]
        return gi.new_empty((steps, hidden, batch)), h0.new_empty((batch, hidden))
