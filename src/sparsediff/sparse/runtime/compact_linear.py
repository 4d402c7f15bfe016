"""The trainable compact linear: ``nn.Linear`` with its weight held as its non-zeros (see compact.py).

Forward, input gradient and values gradient run on the native kernels in ``"sparse"`` mode: the SpMM
``x W^T`` over the layer's compressed rows, the same SpMM over ``W^T`` (a transposed copy of the index
structure whose values are gathered from the kept values at each backward) for ``dX = dY W``, and the
sampled product ``dW = dY^T X`` at the kept positions only (SDDMM). In ``"dense"`` mode the values are
scattered into a dense weight for torch's kernels (recomputed in the backward rather than kept, so no
dense weight outlives a call) and the dense gradient is gathered back at the kept positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..native import native_for
from . import linear_grad  # the backward kernels' Python side
from .compact import CompactLayer, CompactWeight, dense_weight, panel_width
from .matrix import NO_BIAS, PARALLEL_GRAIN, CompressedMatrix


class _LinearFn(torch.autograd.Function):
    """``y = x W^T + b`` on the sparse kernels, for 2-D float32 CPU ``x``, W the layer's compact weight
    ``name`` (its ``values`` are an input); with ``transposed``, ``y^T`` (out, rows) in the kernel's own
    order (a GRU's input projections)."""

    @staticmethod
    def forward(ctx, x, values, bias, layer, name="weight", transposed=False):
        m = layer.compact_weights[name].matrix(layer, values)
        b = NO_BIAS if bias is None else bias
        y = native_for(x, values).spmm_linear(
            x, m.row_ptr, m.cols, values, b, m.panel, PARALLEL_GRAIN, transposed
        )
        ctx.layer, ctx.name, ctx.transposed, ctx.has_bias = layer, name, transposed, bias is not None
        ctx.save_for_backward(x, values)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, values = ctx.saved_tensors
        layer, name = ctx.layer, ctx.name
        cw = layer.compact_weights[name]
        dy = (dy.t() if ctx.transposed else dy).contiguous()
        need_x, need_v, need_b = ctx.needs_input_grad[:3]
        dx = dv = db = None
        if need_x:
            t_matrix, perm = _transposed(layer, cw)
            dx = linear_grad.input_grad(dy, t_matrix, values, perm)
        if need_v:
            dv = linear_grad.values_grad(dy, x, cw.matrix(layer, values))
        layer.captures(name, lambda: linear_grad.dense_grad(dy, x))
        if need_b and ctx.has_bias:
            db = dy.sum(0)
        return dx, dv, db, None, None, None


def linear_rows(
    x: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor | None,
    layer: nn.Module,
    name: str,
    transposed: bool,
) -> torch.Tensor:
    """The differentiable product of 2-D ``x`` with ``layer``'s compact weight ``name`` (see _LinearFn)."""
    return _LinearFn.apply(x, values, bias, layer, name, transposed)


def _transposed(layer: nn.Module, cw: CompactWeight):
    def build():
        # kept for the layout's lifetime: the structure of W^T and an int32 perm (its values are gathered
        # afresh at every backward, so the copy transposed() made is dropped)
        t, perm = linear_grad.transposed(cw.matrix(layer))
        return CompressedMatrix(t.row_ptr, t.cols, NO_BIAS, t.columns, t.panel), perm.to(torch.int32)

    return cw.derived(layer, "transposed", build)


class CompactLinear(CompactLayer):
    """``nn.Linear`` whose weight is a :class:`CompactWeight` named ``weight`` (parameter ``values``,
    buffers ``row_ptr`` / ``cols``, the inference layout of ``SparseLinear``); ``bias`` is the original
    layer's own Parameter (the optimiser keeps training it).

    ``weight`` reads as the dense weight, differentiable in ``values`` (for code that reads a linear's
    weight itself, as ``nn.MultiheadAttention`` reads ``out_proj.weight``).
    """

    kind = "linear"

    def __init__(self, linear: nn.Linear, mask: torch.Tensor):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # values first, then bias: the parameters keep the dense layer's order (weight, bias)
        cw = CompactWeight.create(
            self, "weight", linear.weight, mask, self.out_features, panel_width(self.in_features)
        )
        self.compact_weights["weight"] = cw
        self.bias = linear.bias

    @property
    def weight(self) -> torch.Tensor:
        return self.compact_weights["weight"].scatter(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise RuntimeError(f"CompactLinear: input of {x.shape[-1]} features, expected {self.in_features}")
        if self.kernel_mode is None:
            from .choose import choose_mode

            choose_mode(self, x)
        if self.kernel_mode != "sparse" or not (x.dtype is torch.float32 and x.is_cpu):
            return F.linear(x, dense_weight(self, "weight"), self.bias)  # torch's kernels and autograd
        rows = x.reshape(-1, self.in_features)
        y = _LinearFn.apply(rows.contiguous(), self.values, self.bias, self)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        cw = self.compact_weights["weight"]
        nnz = cw.values(self).numel()
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"density={nnz / max(cw.numel, 1):.3f}, mode={self.kernel_mode}"
        )
