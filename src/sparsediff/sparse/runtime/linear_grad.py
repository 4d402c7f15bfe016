"""The backward of a sparse linear on its compressed weight: the gradients a trainable layer needs.

For ``y = x W^T + b`` with ``W`` (M x K) held as a :class:`~.matrix.CompressedMatrix` in
:class:`~.linear.SparseLinear`'s layout (column panels of :func:`~.linear.panel_width` input features,
CSR by row within a panel, ``values`` panel after panel: "the layer's value order"):

- :func:`values_grad`: the gradient of the kept values, ``(dy^T x)`` at the non-zeros only, in the layer's
  value order (a sampled dense-dense product: the ``sddmm_linear`` kernel, ``native/spmm_backward.cpp``).
  It never forms the dense ``M x K`` gradient.
- :func:`input_grad`: ``dX = dy W``, the forward SpMM kernel run over ``W^T``. :func:`transposed` builds
  ``W^T``'s index structure (panels over M) and ``perm``, which says where each of its values sits in
  ``W``'s order; it changes only when the topology does, and each call gathers the current values as
  ``values[perm]`` (a gather of the non-zeros: cheap next to the product).
- :func:`dense_grad`: the dense weight gradient ``dy^T x`` (M x K), for the steps that need it whole
  (RigL's growth on an update step).
- the bias gradient is ``dy`` summed over its rows: no kernel.

Inputs of any leading shape are flattened to rows, as the forward does (``x (..., K) -> (N, K)``). float32
CPU inputs take the native kernels; other dtypes or devices, inputs that autograd records, or no kernels
at all (see :func:`~sparsediff.sparse.native.native_for`) take the same products in dense torch ops.
"""

from __future__ import annotations

import torch

from ..native import native_for
from .linear import panel_width
from .matrix import NO_BIAS, PARALLEL_GRAIN, CompressedMatrix


def _panelled(matrix: CompressedMatrix) -> tuple[torch.Tensor, int]:
    """``(row_ptr (P, rows + 1), panel)``: a matrix without panels is one panel of all its columns."""
    if matrix.panel is None:
        return matrix.row_ptr.reshape(1, -1), max(1, matrix.columns)
    return matrix.row_ptr, matrix.panel


def coordinates(matrix: CompressedMatrix) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, columns)``, int64, the position in the dense matrix of each non-zero, in value order."""
    row_ptr, panel = _panelled(matrix)
    counts = (row_ptr[:, 1:] - row_ptr[:, :-1]).reshape(-1)  # non-zeros of (panel, row), in storage order
    flat = torch.repeat_interleave(torch.arange(counts.numel()), counts)  # panel * rows + row, per value
    rows = flat % max(1, matrix.rows)
    return rows, matrix.cols.long() + (flat // max(1, matrix.rows)) * panel


def transposed(matrix: CompressedMatrix) -> tuple[CompressedMatrix, torch.Tensor]:
    """``(W^T, perm)``: ``W^T`` (K x M) in the layout of a linear with M input features (column panels of
    ``panel_width(M)``, CSR by row within a panel) and ``perm`` (int64, nnz): for each value of ``W^T`` in
    its own order, the index of that value in ``W``'s, so that ``W^T``'s values are ``values[perm]``.

    Built by one sort of the non-zeros (O(nnz log nnz)), for :func:`input_grad`. ``W^T`` holds the values
    ``W`` had when it was built; :func:`input_grad` gathers the current ones itself.
    """
    rows, columns = coordinates(matrix)
    out_rows, out_columns = matrix.columns, matrix.rows  # K rows (W's columns), M columns (W's rows)
    panel = max(1, panel_width(out_columns))
    panels = max(1, -(-out_columns // panel))
    part = rows // panel  # the panel of W^T each value falls in
    segment = part * out_rows + columns  # (panel, row) of W^T: the order of its storage
    key = segment * panel + (rows - part * panel)  # then by the column within the panel
    perm = torch.sort(key).indices  # the keys are distinct: any sort gives the same order
    counts = torch.bincount(segment, minlength=panels * out_rows)
    ptr = torch.zeros(panels * out_rows + 1, dtype=torch.int64)
    ptr[1:] = torch.cumsum(counts, 0)
    # panel q's pointers are ptr[q K .. q K + K]: its last is the next panel's first, as in from_dense
    row_ptr = ptr[(torch.arange(panels) * out_rows)[:, None] + torch.arange(out_rows + 1)[None, :]]
    cols = (rows - part * panel)[perm].to(torch.int32)
    return CompressedMatrix(row_ptr, cols, matrix.values[perm], out_columns, panel), perm


def input_grad(
    dy: torch.Tensor,
    t_matrix: CompressedMatrix,
    values: torch.Tensor,
    perm: torch.Tensor,
    grain: int = PARALLEL_GRAIN,
) -> torch.Tensor:
    """``dX = dy W``, shape ``(..., K)`` for ``dy (..., M)``: the SpMM kernel over ``W^T``.

    ``t_matrix`` and ``perm`` are :func:`transposed`'s for ``W``'s topology; ``values`` are ``W``'s current
    values in the layer's order (``t_matrix.values`` is not read). ``grain``: multiply-adds below which one
    thread runs.
    """
    k, m = t_matrix.rows, t_matrix.columns
    rows = dy.reshape(-1, m)
    t_values = values.index_select(0, perm)  # a plain gather: cheaper than advanced indexing
    mod = native_for(rows, t_values)
    if mod is None:
        w_t = CompressedMatrix(t_matrix.row_ptr, t_matrix.cols, t_values, m, t_matrix.panel).to_dense()
        out = rows @ w_t.to(rows.device, rows.dtype).t()
    else:
        row_ptr, panel = _panelled(t_matrix)
        out = mod.spmm_linear(rows, row_ptr, t_matrix.cols, t_values, NO_BIAS, panel, grain, False)
    return out.reshape(*dy.shape[:-1], k)


def values_grad(
    dy: torch.Tensor, x: torch.Tensor, matrix: CompressedMatrix, grain: int = PARALLEL_GRAIN
) -> torch.Tensor:
    """The gradient of ``matrix``'s values, shape ``(nnz,)`` in its value order: ``sum_n dy[n, m] x[n, k]``
    at each non-zero ``(m, k)``, for ``dy (..., M)`` and ``x (..., K)`` with the same leading shape.
    ``grain``: multiply-adds below which one thread runs."""
    dy_rows, x_rows = dy.reshape(-1, matrix.rows), x.reshape(-1, matrix.columns)
    mod = native_for(dy_rows, x_rows)
    if mod is None:
        rows, columns = coordinates(matrix)
        return dense_grad(dy_rows, x_rows)[rows.to(dy.device), columns.to(dy.device)]
    row_ptr, panel = _panelled(matrix)
    return mod.sddmm_linear(dy_rows, x_rows, row_ptr, matrix.cols, panel, grain)


def dense_grad(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The dense weight gradient ``dy^T x``, shape ``(M, K)`` for ``dy (..., M)`` and ``x (..., K)``."""
    return torch.mm(dy.reshape(-1, dy.shape[-1]).t(), x.reshape(-1, x.shape[-1]))
