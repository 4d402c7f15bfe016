"""The trainable compact convolution: ``nn.Conv1d`` / ``nn.Conv2d`` (stride 1, groups 1, zero padding) with
its kernel held as its non-zeros (see compact.py).

In ``"sparse"`` mode the forward is the direct sparse convolution of the inference layer, the input
gradient the same kernel run over the output gradient with the transposed, flipped kernel, and the values
gradient the correlation of the output gradient with the input at each kept tap only. In ``"dense"`` mode
the values are scattered into a dense kernel for torch's convolution and its gradients (the dense kernel
is rebuilt in the backward, not kept).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..native import native_for
from . import conv_grad
from .compact import CompactLayer, CompactWeight, dense_weight
from .conv import convertible
from .matrix import NO_BIAS, PARALLEL_GRAIN


class _ConvFn(torch.autograd.Function):
    """The 2-D convolution of a (B, C, H, W) float32 CPU input with the layer's compact kernel, on the
    sparse kernels."""

    @staticmethod
    def forward(ctx, x, values, bias, layer):
        cw = layer.compact_weights["weight"]
        b = NO_BIAS if bias is None else bias
        offsets = layer.offsets(x.shape[-2], x.shape[-1])
        y = native_for(x, values).sparse_conv2d(
            x, cw.row_ptr(layer), cw.cols(layer), offsets, values, b,
            layer.kh, layer.kw, layer.ph, layer.pw, layer.dh, layer.dw, PARALLEL_GRAIN,
        )  # fmt: skip
        ctx.layer, ctx.has_bias = layer, bias is not None
        ctx.save_for_backward(x, values)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, values = ctx.saved_tensors
        layer = ctx.layer
        cw = layer.compact_weights["weight"]
        dy = dy.contiguous()
        need_x, need_v, need_b = ctx.needs_input_grad[:3]
        dx = dv = db = None
        g = layer.geometry4()
        if need_x:
            t = cw.derived(layer, "transposed", lambda: _transposed(layer, cw, g))
            offsets = cw.derived(
                layer,
                ("t_offsets", *dy.shape[-2:]),
                lambda: conv_grad.transposed_offsets(t, g, *dy.shape[-2:]),
            )
            dx = conv_grad.input_grad(dy, values, t, g, offsets)
        if need_v:
            offsets = layer.offsets(x.shape[-2], x.shape[-1])
            dv = conv_grad.values_grad(dy, x, cw.row_ptr(layer), cw.cols(layer), g, offsets)
        shape4 = (layer.out_channels, layer.in_channels, layer.kh, layer.kw)
        geometry = {"padding": (layer.ph, layer.pw), "dilation": (layer.dh, layer.dw)}
        layer.captures("weight", lambda: torch.nn.grad.conv2d_weight(x, shape4, dy, **geometry))
        if need_b and ctx.has_bias:
            db = dy.sum((0, 2, 3))
        return dx, dv, db, None


def _transposed(layer: nn.Module, cw: CompactWeight, g) -> conv_grad.TransposedKernel:
    t = conv_grad.transposed(cw.row_ptr(layer).cpu(), cw.cols(layer).cpu(), g)
    return t._replace(perm=t.perm.to(torch.int32))  # kept for the layout's lifetime: 4 bytes per value


class CompactConv(CompactLayer):
    """A stride-1 ``Conv1d`` / ``Conv2d`` whose kernel is a :class:`CompactWeight` named ``weight``: a row
    per output channel, a column per input channel and tap (``c * kh * kw + ky * kw + kx``, as
    ``SparseConv`` stores it). ``bias`` is the original layer's own Parameter."""

    kind = "conv"

    def __init__(self, conv: nn.Conv1d | nn.Conv2d, mask: torch.Tensor):
        super().__init__()
        if not convertible(conv):
            raise ValueError(
                f"CompactConv takes stride-1, groups-1 convolutions with zero padding; got {conv}"
            )
        self.dims = conv.weight.dim() - 2
        shape = tuple(conv.weight.shape)
        self.out_channels, self.in_channels = shape[0], shape[1]
        self.kh, self.kw = (shape[2], shape[3]) if self.dims == 2 else (1, shape[2])
        pad, dil = tuple(conv.padding), tuple(conv.dilation)
        self.ph, self.pw = pad if self.dims == 2 else (0, pad[0])
        self.dh, self.dw = dil if self.dims == 2 else (1, dil[0])
        cw = CompactWeight.create(self, "weight", conv.weight, mask, self.out_channels, None)
        self.compact_weights["weight"] = cw
        self.bias = conv.bias

    @property
    def weight(self) -> torch.Tensor:
        return self.compact_weights["weight"].scatter(self)

    def offsets(self, height: int, width: int) -> torch.Tensor:
        """Where each non-zero reads the zero-padded input of this size (int32; cached per size until the
        layout changes): ``c * Hp * Wp + ky * dh * Wp + kx * dw``."""
        cw = self.compact_weights["weight"]

        def build():
            return conv_grad.input_offsets(cw.cols(self), self.geometry4(), height, width)

        return cw.derived(self, ("offsets", height, width), build)

    def geometry4(self) -> conv_grad.ConvGeometry:
        """The convolution as the 2-D one the kernels compute (a Conv1d's with a height of 1)."""
        return conv_grad.ConvGeometry(
            self.out_channels, self.in_channels, self.kh, self.kw, self.ph, self.pw, self.dh, self.dw, dims=2
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x4 = x if self.dims == 2 else x.unsqueeze(-2)
        unbatched = x4.dim() == 3
        if unbatched:
            x4 = x4.unsqueeze(0)
        if x4.shape[1] != self.in_channels:
            raise RuntimeError(f"CompactConv: input of {x4.shape[1]} channels, expected {self.in_channels}")
        if self.kernel_mode is None:
            from .choose import choose_mode

            choose_mode(self, x)
        if self.kernel_mode != "sparse" or not (x.dtype is torch.float32 and x.is_cpu):
            w = dense_weight(self, "weight")  # torch's convolution, its autograd in C++
            if self.dims == 2:
                return F.conv2d(x, w, self.bias, padding=(self.ph, self.pw), dilation=(self.dh, self.dw))
            return F.conv1d(x, w, self.bias, padding=self.pw, dilation=self.dw)
        y = _ConvFn.apply(x4.contiguous(), self.values, self.bias, self)
        if unbatched:
            y = y.squeeze(0)
        return y if self.dims == 2 else y.squeeze(-2)

    def extra_repr(self) -> str:
        cw = self.compact_weights["weight"]
        nnz = cw.values(self).numel()
        return (
            f"{self.in_channels}, {self.out_channels}, kernel=({self.kh}, {self.kw}), padding=({self.ph}, "
            f"{self.pw}), dilation=({self.dh}, {self.dw}), density={nnz / max(cw.numel, 1):.3f}, mode={self.kernel_mode}"
        )
