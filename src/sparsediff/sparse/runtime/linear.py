"""Sparse linear layers for inference: compressed weights through the native SpMM kernel."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..native import native_for
from .matrix import NO_BIAS, PARALLEL_GRAIN, MatrixLayer, masked_weight, own_bias


def panel_width(in_features: int) -> int:
    """Input features per column panel: all of them for small layers, else 128. The kernel sizes its
    tiles so that one panel of the packed input (128 x 64 floats, 32 KiB) stays in the L1 cache while
    every row of the panel walks over it; partial sums carry from panel to panel."""
    return min(in_features, 128)


class SparseLinear(MatrixLayer):
    """``nn.Linear`` with a sparse weight stored row by row (CSR): the same output, fewer multiply-adds.

    Only the active weights are kept: ``values``, ``cols`` (relative to their column panel)
    and ``row_ptr`` (one row of pointers per panel of ``panel`` input features). Inputs
    of any leading shape are flattened to rows; float32 CPU inputs go through the native kernel, anything
    else (other dtypes, CUDA, autograd, no kernels) through ``F.linear`` on the rebuilt dense weight.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, mask: torch.Tensor | None = None):
        super().__init__()
        w = masked_weight(weight, mask)
        self.out_features, self.in_features = w.shape
        self.compress(w, panel=max(1, panel_width(self.in_features)))
        self.register_buffer("bias", own_bias(bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mod = native_for(x)
        if mod is None:
            w = self.dense_weight().to(x.device, x.dtype)
            b = None if self.bias is None else self.bias.to(x.device, x.dtype)
            return F.linear(x, w, b)
        if x.dim() == 2:
            return self._native(mod, x, transposed=False)
        y = self._native(mod, x.reshape(-1, x.shape[-1]), transposed=False)
        return y.reshape(*x.shape[:-1], self.out_features)

    def transposed_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """``(rows @ W^T + b)^T``, shape ``(out_features, len(rows))``, for float32 CPU ``rows`` with the
        native kernels built: the kernel's own output order, so no transposition is paid."""
        mod = native_for(rows)
        if mod is None:
            raise RuntimeError("transposed_rows needs the native kernels and float32 CPU inputs")
        return self._native(mod, rows, transposed=True)

    def _native(self, mod, rows: torch.Tensor, transposed: bool) -> torch.Tensor:
        if rows.shape[1] != self.in_features:  # the kernel would read past the input
            raise RuntimeError(
                f"{type(self).__name__}: input of {rows.shape[1]} features, expected {self.in_features}"
            )
        # The buffers straight from their dict: nn.Module's attribute lookup costs about 0.5 us per buffer,
        # as much as the whole kernel call on a small layer.
        buf = self._buffers
        bias = buf["bias"]
        return mod.spmm_linear(
            rows,
            buf["row_ptr"],
            buf["cols"],
            buf["values"],
            NO_BIAS if bias is None else bias,
            self.panel,
            PARALLEL_GRAIN,
            transposed,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, density={self.density:.3f}"
        )
