"""Gradients of a sparse convolution (stride 1, zero padding, groups 1) at its kept taps only.

The kernel W (O, C, KH, KW) is held as compressed rows by output channel, as :class:`~.conv.SparseConv`
stores it: ``row_ptr`` (int64, O + 1), ``taps`` (int32 column codes ``c * KH * KW + ky * KW + kx``,
ascending within a row) and ``values`` (float32) in that order, the layer's *value order*. A Conv1d is the
same with KH = 1 (its inputs gain a height of 1). For y = conv2d(x, W, padding (ph, pw), dilation (dh, dw)):

- the input gradient, dX = conv_transpose(dy, W), is for stride 1 again a direct convolution, which the
  forward kernel ``sparse_conv2d`` computes: over dy, with the transposed and flipped kernel
  ``W'[c, o, KH - 1 - ky, KW - 1 - kx] = W[o, c, ky, kx]`` (compressed rows by input channel:
  :func:`transposed`, whose ``perm`` gives its values as ``values[perm]``) and dy padded by
  ``dh * (KH - 1) - ph`` rows and ``dw * (KW - 1) - pw`` columns. Its output is then exactly H x W. A
  padding past the kernel's reach (ph > dh * (KH - 1)) would make that negative: dy is then not padded
  and the result, larger than H x W by the excess on each side, is cropped;
- the values gradient is the correlation of dy with the padded input at each kept tap,
  ``dvalues[p] = sum over b, h, w of dy[b, o, h, w] * xpad[b, c, h + ky * dh, w + kx * dw]``: the native
  ``sparse_conv2d_values_grad`` (conv_backward.cpp), which reads the input at the forward's own offsets;
- the dense weight gradient (:func:`dense_grad`, for RigL's growth on update steps) is torch's.

float32 CPU tensors take the native kernels when they are built (``native_for``); anything else (other
dtypes, CUDA, an autograd graph to record, no kernels) the same computation in torch's dense ops.

The geometry of a convolution is any object with ``out_channels``, ``in_channels``, ``kh``, ``kw``,
``ph``, ``pw``, ``dh``, ``dw`` and ``dims`` (1 or 2) as :class:`ConvShape` lists them: the layers have these
attributes, and :meth:`ConvGeometry.of` reads them off an ``nn.Conv1d`` / ``nn.Conv2d``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..native import native_for
from .matrix import NO_BIAS, PARALLEL_GRAIN


class ConvShape(Protocol):
    """What the gradients need to know of a convolution (a Conv1d's: kh = 1, ph = 0, dh = 1)."""

    out_channels: int
    in_channels: int
    kh: int
    kw: int
    ph: int
    pw: int
    dh: int
    dw: int
    dims: int


@dataclass(frozen=True)
class ConvGeometry:
    """A :class:`ConvShape` of its own."""

    out_channels: int
    in_channels: int
    kh: int
    kw: int
    ph: int = 0
    pw: int = 0
    dh: int = 1
    dw: int = 1
    dims: int = 2

    @classmethod
    def of(cls, conv: nn.Conv1d | nn.Conv2d) -> ConvGeometry:
        """The geometry of a stride-1, groups-1 convolution; padding ``"valid"`` is 0, ``"same"`` half the
        kernel's reach on each side (a ValueError when the reach is odd: torch pads such a side more than
        the other, which the kernels do not)."""
        if any(s != 1 for s in conv.stride) or conv.groups != 1 or conv.padding_mode != "zeros":
            raise ValueError(f"stride 1, groups 1 and zero padding expected; got {conv}")
        shape = tuple(conv.weight.shape)
        dims = len(shape) - 2
        padding = _padding(conv.padding, shape[2:], tuple(conv.dilation))
        if dims == 1:
            return cls(shape[0], shape[1], 1, shape[2], 0, padding[0], 1, conv.dilation[0], 1)
        return cls(shape[0], shape[1], shape[2], shape[3], *padding, *conv.dilation, 2)


def _padding(padding: int | str | tuple[int, ...], kernel: tuple[int, ...], dilation: tuple[int, ...]):
    """Padding per spatial dimension, ``"same"`` and ``"valid"`` resolved (stride 1)."""
    if padding == "valid":
        return (0,) * len(kernel)
    if padding == "same":
        reach = [d * (k - 1) for k, d in zip(kernel, dilation)]
        if any(r % 2 for r in reach):
            raise ValueError(f"padding 'same' is asymmetric for kernel {kernel}, dilation {dilation}")
        return tuple(r // 2 for r in reach)
    if isinstance(padding, int):
        return (padding,) * len(kernel)
    return tuple(padding)


def tap_offsets(
    taps: torch.Tensor, channels: int, kh: int, kw: int, dh: int, dw: int, hp: int, wp: int
) -> torch.Tensor:
    """Where each tap code ``c * KH * KW + ky * KW + kx`` reads a zero-padded input of ``channels`` planes
    of ``hp`` x ``wp``: ``c * hp * wp + ky * dh * wp + kx * dw`` (int32, as the kernels take them)."""
    furthest = (channels - 1) * hp * wp + (kh - 1) * dh * wp + (kw - 1) * dw
    if furthest >= 2**31:  # from the sizes alone: no data-dependent branch for torch.compile
        raise ValueError(f"padded input of {channels} x {hp} x {wp} is too large for 32-bit offsets")
    t = taps.long()
    c, rest = t // (kh * kw), t % (kh * kw)
    return (c * (hp * wp) + (rest // kw) * (dh * wp) + (rest % kw) * dw).to(torch.int32)


def input_offsets(taps: torch.Tensor, shape: ConvShape, height: int, width: int) -> torch.Tensor:
    """The forward's offsets for an input of ``height`` x ``width`` (what ``SparseConv.offsets`` gives)."""
    hp, wp = height + 2 * shape.ph, width + 2 * shape.pw
    return tap_offsets(taps, shape.in_channels, shape.kh, shape.kw, shape.dh, shape.dw, hp, wp)


class TransposedKernel(NamedTuple):
    """The transposed, flipped kernel W' (C, O, KH, KW) the input gradient runs the forward kernel with.

    ``row_ptr`` (int64, C + 1): a row per input channel; ``taps`` (int32): codes ``o * KH * KW +
    (KH - 1 - ky) * KW + (KW - 1 - kx)``, ascending within a row; ``perm`` (int64): W' values are
    ``values[perm]``. dy is padded by ``ph`` rows and ``pw`` columns on each side, and the result cropped by
    ``crop_h`` rows and ``crop_w`` columns on each side (0 unless the layer pads past its kernel's reach).
    """

    row_ptr: torch.Tensor
    taps: torch.Tensor
    perm: torch.Tensor
    ph: int
    pw: int
    crop_h: int
    crop_w: int


def transposed(row_ptr: torch.Tensor, taps: torch.Tensor, shape: ConvShape) -> TransposedKernel:
    """W' of a kernel held as ``row_ptr`` / ``taps`` (rows by output channel), with its ``perm``: one
    stable sort of the non-zeros by (input channel, flipped code), no loop over them. Depends on the
    layout only (not on the values): build it once per topology."""
    o_count, c_count, area = shape.out_channels, shape.in_channels, shape.kh * shape.kw
    counts = (row_ptr[1:] - row_ptr[:-1]).long()
    rows = torch.repeat_interleave(torch.arange(o_count, dtype=torch.int64), counts)
    t = taps.long()
    c, rest = t // area, t % area
    ky, kx = rest // shape.kw, rest % shape.kw
    flipped = rows * area + (shape.kh - 1 - ky) * shape.kw + (shape.kw - 1 - kx)
    perm = torch.sort(c * (o_count * area) + flipped, stable=True).indices
    t_row_ptr = torch.zeros(c_count + 1, dtype=torch.int64)
    t_row_ptr[1:] = torch.cumsum(torch.bincount(c, minlength=c_count), 0)
    reach_h, reach_w = shape.dh * (shape.kh - 1), shape.dw * (shape.kw - 1)
    return TransposedKernel(
        t_row_ptr,
        flipped[perm].to(torch.int32),
        perm,
        max(0, reach_h - shape.ph),
        max(0, reach_w - shape.pw),
        max(0, shape.ph - reach_h),
        max(0, shape.pw - reach_w),
    )


def transposed_offsets(t: TransposedKernel, shape: ConvShape, ho: int, wo: int) -> torch.Tensor:
    """W''s offsets into dy (of ``ho`` x ``wo``) padded as the input gradient pads it (cache per size)."""
    hp, wp = ho + 2 * t.ph, wo + 2 * t.pw
    return tap_offsets(t.taps, shape.out_channels, shape.kh, shape.kw, shape.dh, shape.dw, hp, wp)


def _as_4d(t: torch.Tensor, shape: ConvShape) -> tuple[torch.Tensor, bool]:
    """``t`` as (B, channels, height, width), and whether it was unbatched."""
    t4 = t if shape.dims == 2 else t.unsqueeze(-2)
    if t4.dim() == 3:
        return t4.unsqueeze(0), True
    if t4.dim() != 4:
        raise ValueError(
            f"a {shape.dims}-d convolution's tensor has {shape.dims + 1} or {shape.dims + 2} dims"
        )
    return t4, False


def _as_given(t4: torch.Tensor, shape: ConvShape, unbatched: bool) -> torch.Tensor:
    t = t4.squeeze(0) if unbatched else t4
    return t if shape.dims == 2 else t.squeeze(-2)


def _dense_rows(
    row_ptr: torch.Tensor, taps: torch.Tensor, values: torch.Tensor, columns: int
) -> torch.Tensor:
    """The dense (rows, columns) matrix of compressed rows, on ``values``' device and in its dtype."""
    counts = (row_ptr[1:] - row_ptr[:-1]).long()
    rows = torch.repeat_interleave(torch.arange(counts.numel()), counts).to(values.device)
    dense = values.new_zeros(counts.numel(), columns)
    return dense.index_put((rows, taps.long().to(values.device)), values)


def input_grad(
    dy: torch.Tensor,
    values: torch.Tensor,
    t: TransposedKernel,
    shape: ConvShape,
    offsets: torch.Tensor | None = None,
    grain: int = PARALLEL_GRAIN,
) -> torch.Tensor:
    """dX for the output gradient ``dy`` (shaped as the layer's output: (B, O, Ho, Wo), (O, Ho, Wo), or a
    Conv1d's (B, O, Lo), (O, Lo)), of x's shape. ``values`` in the layer's value order; ``t`` from
    :func:`transposed`; ``offsets`` from :func:`transposed_offsets` for dy's size (computed if None)."""
    dy4, unbatched = _as_4d(dy, shape)
    if dy4.shape[1] != shape.out_channels:
        raise RuntimeError(f"input_grad: dy of {dy4.shape[1]} channels, expected {shape.out_channels}")
    ho, wo = dy4.shape[-2:]
    mod = native_for(dy4, values)
    if mod is not None:
        if offsets is None:
            offsets = transposed_offsets(t, shape, ho, wo)
        dx = mod.sparse_conv2d(
            dy4,
            t.row_ptr,
            t.taps,
            offsets,
            values.index_select(0, t.perm),
            NO_BIAS,
            shape.kh,
            shape.kw,
            t.ph,
            t.pw,
            shape.dh,
            shape.dw,
            grain,
        )
    else:
        area = shape.kh * shape.kw
        kernel = _dense_rows(t.row_ptr, t.taps, values[t.perm.to(values.device)], shape.out_channels * area)
        kernel = kernel.reshape(shape.in_channels, shape.out_channels, shape.kh, shape.kw)
        dx = F.conv2d(dy4, kernel.to(dy4.dtype), padding=(t.ph, t.pw), dilation=(shape.dh, shape.dw))
    if t.crop_h or t.crop_w:
        height, width = dx.shape[-2] - 2 * t.crop_h, dx.shape[-1] - 2 * t.crop_w
        dx = dx[..., t.crop_h : t.crop_h + height, t.crop_w : t.crop_w + width].contiguous()
    return _as_given(dx, shape, unbatched)


def values_grad(
    dy: torch.Tensor,
    x: torch.Tensor,
    row_ptr: torch.Tensor,
    taps: torch.Tensor,
    shape: ConvShape,
    offsets: torch.Tensor | None = None,
    grain: int = PARALLEL_GRAIN,
) -> torch.Tensor:
    """The gradient of the kept values, (nnz,) in the layer's value order, for the output gradient ``dy``
    and the layer's input ``x`` (both batched or both unbatched, any memory layout). ``offsets``: the
    forward's, for x's size (:func:`input_offsets`; computed if None)."""
    x4, unbatched = _as_4d(x, shape)
    dy4, dy_unbatched = _as_4d(dy, shape)
    if unbatched != dy_unbatched:
        raise ValueError("values_grad: dy and x must both be batched or both unbatched")
    if x4.shape[1] != shape.in_channels:  # the kernel would read past the input
        raise RuntimeError(f"values_grad: input of {x4.shape[1]} channels, expected {shape.in_channels}")
    mod = native_for(dy4, x4)
    if mod is not None:
        if offsets is None:
            offsets = input_offsets(taps, shape, x4.shape[-2], x4.shape[-1])
        return mod.sparse_conv2d_values_grad(
            dy4, x4, row_ptr, offsets, shape.kh, shape.kw, shape.ph, shape.pw, shape.dh, shape.dw, grain
        )
    weight_shape = (shape.out_channels, shape.in_channels, shape.kh, shape.kw)
    dense = dense_grad(dy4, x4, weight_shape, (shape.ph, shape.pw), (shape.dh, shape.dw))
    counts = (row_ptr[1:] - row_ptr[:-1]).long()
    rows = torch.repeat_interleave(torch.arange(counts.numel()), counts).to(dense.device)
    return dense.reshape(shape.out_channels, -1)[rows, taps.long().to(dense.device)]


def dense_grad(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight_shape: tuple[int, ...],
    padding: int | str | tuple[int, ...],
    dilation: int | tuple[int, ...],
) -> torch.Tensor:
    """The dense weight gradient, of ``weight_shape`` ((O, C, KH, KW), or a Conv1d's (O, C, K)), for
    ``dy`` and ``x`` batched or unbatched (torch's ``conv2d_weight`` / ``conv1d_weight``)."""
    spatial = len(weight_shape) - 2
    dilation = (dilation,) * spatial if isinstance(dilation, int) else tuple(dilation)
    padding = _padding(padding, tuple(weight_shape[2:]), dilation)
    if x.dim() == spatial + 1:  # unbatched
        x, dy = x.unsqueeze(0), dy.unsqueeze(0)
    if spatial == 1:
        return torch.nn.grad.conv1d_weight(x, weight_shape, dy, padding=padding, dilation=dilation)
    return torch.nn.grad.conv2d_weight(x, weight_shape, dy, padding=padding, dilation=dilation)
