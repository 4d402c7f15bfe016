"""Sparse convolutions for inference: direct sparse convolution through the native kernel (no im2col)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..native import native_for
from .conv_grad import tap_offsets
from .matrix import NO_BIAS, PARALLEL_GRAIN, Buffers, MatrixLayer, masked_weight, own_bias


def convertible(conv: nn.Module) -> bool:
    """Whether the kernel computes this convolution exactly: Conv1d/Conv2d, stride 1, groups 1, zero padding
    given as numbers (not ``"same"``/``"valid"`` strings)."""
    return (
        type(conv) in (nn.Conv1d, nn.Conv2d)
        and all(s == 1 for s in conv.stride)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
    )


class SparseConv(MatrixLayer):
    """A ``Conv1d``/``Conv2d`` (stride 1, groups 1) whose sparse kernel is stored by output channel (CSR).

    float32 CPU inputs go through the native direct sparse convolution; anything else (other dtypes, CUDA,
    autograd, no kernels) through ``F.conv1d``/``F.conv2d`` with the rebuilt dense weight.
    """

    names = Buffers(cols="taps")  # a non-zero's column is its tap code (as the state dict has it)

    def __init__(self, conv: nn.Conv1d | nn.Conv2d, mask: torch.Tensor | None = None):
        super().__init__()
        if not convertible(conv):
            raise ValueError(f"SparseConv supports stride 1, groups 1, zero padding; got {conv}")
        w = masked_weight(conv.weight, mask)
        self.dims = w.dim() - 2  # 1 or 2
        w2 = w if self.dims == 2 else w.unsqueeze(2)  # (O, C, KH, KW)
        self.out_channels, self.in_channels, self.kh, self.kw = w2.shape
        pad, dil = tuple(conv.padding), tuple(conv.dilation)
        self.ph, self.pw = pad if self.dims == 2 else (0, pad[0])
        self.dh, self.dw = dil if self.dims == 2 else (1, dil[0])
        self.compress(w)  # a row per output channel; column (its tap code) = c * KH * KW + ky * KW + kx
        self.register_buffer("bias", own_bias(conv.bias))
        self._offsets: dict[tuple[int, int], torch.Tensor] = {}

    def offsets(self, height: int, width: int) -> torch.Tensor:
        """Where each non-zero reads the zero-padded input of this size: ``c * Hp * Wp + ky * dh * Wp +
        kx * dw`` (int32, cached per input size)."""
        key = (height, width)
        if key not in self._offsets:
            hp, wp = height + 2 * self.ph, width + 2 * self.pw
            self._offsets[key] = tap_offsets(
                self.taps, self.in_channels, self.kh, self.kw, self.dh, self.dw, hp, wp
            )
        return self._offsets[key]

    def forget(self) -> None:
        super().forget()
        self._offsets.clear()

    def _dense_forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dense_weight().to(x.device, x.dtype)
        b = None if self.bias is None else self.bias.to(x.device, x.dtype)
        if self.dims == 2:
            return F.conv2d(x, w, b, padding=(self.ph, self.pw), dilation=(self.dh, self.dw))
        return F.conv1d(x, w, b, padding=self.pw, dilation=self.dw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mod = native_for(x)
        if mod is None:
            return self._dense_forward(x)
        x4 = x if self.dims == 2 else x.unsqueeze(-2)
        unbatched = x4.dim() == 3
        if unbatched:
            x4 = x4.unsqueeze(0)
        if x4.shape[1] != self.in_channels:  # the kernel would read past the input
            raise RuntimeError(f"SparseConv: input of {x4.shape[1]} channels, expected {self.in_channels}")
        buf = self._buffers  # not nn.Module's attribute lookup: about 0.5 us per buffer
        bias = buf["bias"]
        y = mod.sparse_conv2d(
            x4,
            buf["row_ptr"],
            buf["taps"],
            self.offsets(x4.shape[-2], x4.shape[-1]),
            buf["values"],
            NO_BIAS if bias is None else bias,
            self.kh,
            self.kw,
            self.ph,
            self.pw,
            self.dh,
            self.dw,
            PARALLEL_GRAIN,
        )
        if unbatched:
            y = y.squeeze(0)
        return y if self.dims == 2 else y.squeeze(-2)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel=({self.kh}, {self.kw}), "
            f"padding=({self.ph}, {self.pw}), dilation=({self.dh}, {self.dw}), density={self.density:.3f}"
        )
