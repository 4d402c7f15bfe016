"""Compressed matrices: how the runtime stores a sparse weight, and the base of the layers that hold them.

One type, :class:`CompressedMatrix`, serves every layer: the weight of a linear (its columns cut into
panels), the kernel of a convolution (a row per output channel, a column per input channel and tap) and
both matrices of a GRU layer (its input projection, a linear, and its hidden-to-hidden matrix). A layer
keeps a matrix's three tensors as buffers of its own, under names of its choosing (:class:`Buffers`), so
its state dict is that of the layer as it always was; :class:`CompressedLayer` is the base of the layers,
with the one place where what they derive from their compressed weights is dropped when those change.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import nn

from ..native import kernels

NO_BIAS = torch.empty(0, dtype=torch.float32)  # what the kernels take for "no bias" (never written to)

# Multiply-adds below which a kernel call runs on one thread (starting threads costs more than it saves).
PARALLEL_GRAIN = 1 << 18


def to_csr(weight: torch.Tensor, base: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(row_ptr, cols, values)`` of the non-zeros of a 2-D ``weight``, row by row.

    ``row_ptr`` (int64, rows + 1) starts at ``base``, for matrices stored one after another.
    """
    active = weight != 0
    row_ptr = torch.full((weight.shape[0] + 1,), base, dtype=torch.int64)
    row_ptr[1:] += torch.cumsum(active.sum(1), 0)
    return row_ptr, active.nonzero()[:, 1].to(torch.int32), weight[active].contiguous()


def from_csr(row_ptr: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, columns: int) -> torch.Tensor:
    """The dense ``(rows, columns)`` matrix of :func:`to_csr`'s output (``row_ptr`` may start past 0)."""
    start, stop = int(row_ptr[0]), int(row_ptr[-1])
    dense = torch.zeros(row_ptr.numel() - 1, columns, dtype=values.dtype)
    rows = torch.repeat_interleave(torch.arange(row_ptr.numel() - 1), row_ptr[1:] - row_ptr[:-1])
    dense[rows, cols[start:stop].long()] = values[start:stop]
    return dense


def masked_weight(weight: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """A float32 CPU copy of ``weight``, zero where ``mask`` (if given) is False: what a layer compresses."""
    w = weight.detach().to(torch.float32, copy=True).cpu()
    return w if mask is None else w * mask.to(w.dtype).cpu()


def own_bias(bias: torch.Tensor | None) -> torch.Tensor | None:
    """A float32 CPU copy of ``bias`` (None stays None), for a layer's ``bias`` buffer."""
    return None if bias is None else bias.detach().to(torch.float32).cpu().clone()


class Buffers(NamedTuple):
    """The buffer names under which a module holds one compressed matrix (its state dict keys)."""

    row_ptr: str = "row_ptr"
    cols: str = "cols"
    values: str = "values"

    @classmethod
    def named(cls, prefix: str = "", suffix: str = "", cols: str = "cols") -> Buffers:
        """``{prefix}row_ptr{suffix}``, ``{prefix}{cols}{suffix}``, ``{prefix}values{suffix}``."""
        return cls(*(f"{prefix}{name}{suffix}" for name in ("row_ptr", cols, "values")))


class CompressedMatrix:
    """A sparse ``(rows, columns)`` matrix in compressed sparse rows (CSR), optionally cut into column panels.

    Only the non-zeros are kept: ``values`` (float32) and ``cols`` (int32, their columns), row by row.
    Without panels (``panel`` None) ``row_ptr`` (int64, rows + 1) says where each row starts. With panels of
    ``panel`` columns, ``row_ptr`` is ``(panels, rows + 1)``: the matrix is stored panel after panel, row by
    row within each, ``cols`` relative to their panel (the SpMM kernel's traversal order: a panel of its
    packed input stays in L1 while every row walks over it).
    """

    __slots__ = ("cols", "columns", "panel", "row_ptr", "values")

    def __init__(
        self,
        row_ptr: torch.Tensor,
        cols: torch.Tensor,
        values: torch.Tensor,
        columns: int,
        panel: int | None = None,
    ) -> None:
        self.row_ptr, self.cols, self.values = row_ptr, cols, values
        self.columns, self.panel = columns, panel

    @classmethod
    def from_dense(cls, weight: torch.Tensor, panel: int | None = None) -> CompressedMatrix:
        """The non-zeros of a 2-D float32 CPU ``weight`` (already masked: see :func:`masked_weight`)."""
        columns = weight.shape[1]
        if panel is None:
            return cls(*to_csr(weight), columns)
        parts, base = [], 0
        for p in range(max(1, -(-columns // panel))):  # panel by panel, row by row: the kernel's order
            parts.append(to_csr(weight[:, p * panel : (p + 1) * panel], base))
            base = int(parts[-1][0][-1])
        row_ptr = torch.stack([ptr for ptr, _, _ in parts])
        return cls(
            row_ptr, torch.cat([c for _, c, _ in parts]), torch.cat([v for _, _, v in parts]), columns, panel
        )

    @classmethod
    def held_by(
        cls, module: nn.Module, names: Buffers, columns: int, panel: int | None = None
    ) -> CompressedMatrix:
        """The matrix ``module`` holds under ``names`` (its current buffers: a loaded state dict's)."""
        buf = module._buffers
        return cls(buf[names.row_ptr], buf[names.cols], buf[names.values], columns, panel)

    def hold(self, module: nn.Module, names: Buffers) -> None:
        """Register this matrix's tensors as buffers of ``module`` under ``names``."""
        module.register_buffer(names.row_ptr, self.row_ptr)
        module.register_buffer(names.cols, self.cols)
        module.register_buffer(names.values, self.values)

    @property
    def rows(self) -> int:
        return self.row_ptr.shape[-1] - 1

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    @property
    def density(self) -> float:
        return self.nnz / max(1, self.rows * self.columns)

    def to_dense(self) -> torch.Tensor:
        """The dense ``(rows, columns)`` float matrix."""
        if self.panel is None:
            return from_csr(self.row_ptr, self.cols, self.values, self.columns)
        w = torch.zeros(self.rows, self.columns, dtype=self.values.dtype)
        for p, ptr in enumerate(self.row_ptr):
            part = w[:, p * self.panel : (p + 1) * self.panel]
            part.copy_(from_csr(ptr, self.cols, self.values, part.shape[1]))
        return w


class CompressedLayer(nn.Module):
    """A layer that computes on compressed weights and can rebuild its dense (masked) form on demand.

    What a layer derives from its compressed weights (its dense form for the fallback path, a convolution's
    offsets) is cached, and dropped in one place, :meth:`forget`, whenever they are replaced (a state dict
    is loaded).
    """

    def __init__(self) -> None:
        super().__init__()
        self._dense: Any = None
        kernels()  # built or loaded now, not on the first forward (where torch.compile could not trace it)

    def rebuild_dense(self) -> Any:
        """The dense form the fallback path computes with (a weight tensor, or a dense module)."""
        raise NotImplementedError

    def dense(self) -> Any:
        """:meth:`rebuild_dense`, rebuilt on first use and cached."""
        if self._dense is None:
            self._dense = self.rebuild_dense()
        return self._dense

    def forget(self) -> None:
        """Drop what was derived from the compressed weights (they were replaced: a state dict was loaded)."""
        self._dense = None

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self.forget()


class MatrixLayer(CompressedLayer):
    """A layer whose weight is one compressed matrix: a linear (a row per output feature, the input
    features in column panels) or a convolution (a row per output channel, a column per input channel and
    kernel tap). Subclasses call :meth:`compress` and read their buffers under :attr:`names`."""

    names = Buffers()

    def compress(self, weight: torch.Tensor, panel: int | None = None) -> None:
        """Hold ``weight`` (float32 CPU, masked), of the layer's own shape, as a compressed matrix whose
        rows are its first dimension."""
        self.weight_shape = tuple(weight.shape)
        flat = weight.reshape(weight.shape[0], math.prod(weight.shape[1:]))
        self.columns, self.panel = flat.shape[1], panel
        CompressedMatrix.from_dense(flat, panel).hold(self, self.names)

    def matrix(self) -> CompressedMatrix:
        return CompressedMatrix.held_by(self, self.names, self.columns, self.panel)

    @property
    def nnz(self) -> int:
        return self.matrix().nnz

    @property
    def density(self) -> float:
        return self.matrix().density

    def rebuild_dense(self) -> torch.Tensor:
        return self.matrix().to_dense().reshape(self.weight_shape)

    def dense_weight(self) -> torch.Tensor:
        """The dense (masked) weight in the original layer's shape, rebuilt on first use and cached (the
        fallback path uses it)."""
        return self.dense()

    @property
    def weight(self) -> torch.Tensor:
        """The dense (masked) weight, for code that reads a layer's ``weight`` (its dtype, device or
        values). The native forward pass does not use it."""
        return self.dense_weight()
