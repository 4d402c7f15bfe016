"""Training a GRU layer with a sparse hidden-to-hidden matrix: the recurrence's forward, which saves its
gates, and its backward through time, in native code (``native/gru.cpp``, ``native/gru_backward.cpp``).

One layer and direction of a GRU computes, per step t (PyTorch's gate order r, z, n)::

    gh = W_hh h + b_hh;  r = sigmoid(gi_r + gh_r);  z = sigmoid(gi_z + gh_z);  n = tanh(gi_n + r gh_n)
    h' = (1 - z) n + z h

with ``gi`` the input projections (``x_t W_ih^T + b_ih``, one SpMM for all steps). Layouts, all with the
batch last, as the native recurrence keeps them (H hidden units, T steps, B sequences):

- ``gi`` (3H, T, B): ``gi[g * H + j, t, b]``, the forward's input (``SparseLinear.transposed_rows`` of the
  inputs' rows, row ``n = t * B + b``, viewed as (3H, T, B));
- ``out`` (T, H, B), ``last`` (B, H), ``h0`` (B, H);
- ``gates`` (T, 4H, B): per step the rows r, z, n and gh_n (W_hh h + b_hh's n rows, before the multiply
  by r), all the backward needs besides ``out`` and ``h0``; 0 past a sequence's end;
- the backward's ``dgi`` and ``dgh`` (3H, T, B), the gradients of gi and of gh (their r and z rows are
  equal), and ``dh0`` (B, H).

``lengths`` (B, int64, or None: all T) gives each sequence's valid steps, as a packed batch does (in
non-increasing order for the running prefix to shrink the work; any order is correct): steps past a
sequence's end leave its state alone and output 0, and the reverse direction starts at each sequence's own
last step. The backward passes a finished sequence's gradient through those steps unchanged.

The weights' gradients follow from ``dgi`` and ``dgh`` as a linear's do, with the rows ``n = t * B + b``
(``rows(g)``: the (T * B, 3H) view that hands them to the linear kernels, the ``dy`` of ``y = x W^T``):

- W_hh's values: the SDDMM of ``rows(dgh)`` against :func:`previous_states` (T * B, H), the state each
  step read, at W_hh's non-zeros (``linear_grad.values_grad``; W_hh has no column panels: to the kernel
  one panel of H, ``row_ptr.view(1, -1)``): :func:`hh_values_grad`; :func:`hh_dense_grad` the dense
  gradient (RigL's growth);
- b_hh: ``dgh.sum((1, 2))``; b_ih: ``dgi.sum((1, 2))``;
- W_ih and the layer's input: the linear backward of the input projection with ``dy = rows(dgi)``.

The sparse product of the backward, ``W_hh^T dgh`` at every step, runs over W_hh^T's own CSR
(:func:`transposed`: the structure once per topology, the values gathered from W_hh's at each step).

:func:`train_forward` and :func:`backward` call the kernels on float32 CPU tensors and compute the same
with torch otherwise (other dtypes or devices, no kernels). :func:`reference_recurrence` is the recurrence
as plain differentiable torch operations, a loop over steps, against which the kernels are tested (and the
dense path of a layer that has no kernels at all: autograd through it gives every gradient).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..native import native_for
from .linear_grad import dense_grad, values_grad
from .matrix import NO_BIAS, CompressedMatrix

NO_LENGTHS = torch.empty(0, dtype=torch.int64)  # what the kernels take for "every sequence runs T steps"
NO_GRAD = torch.empty(0, dtype=torch.float32)  # what the backward kernel takes for "no gradient here"


def transposed(matrix: CompressedMatrix) -> tuple[CompressedMatrix, Tensor]:
    """W_hh^T (H rows, 3H columns) in CSR, and ``perm`` (int64, nnz): its values are ``values[perm]``.

    ``matrix`` is W_hh (3H x H, no column panels). W^T's non-zeros are W's sorted by (column, row): one
    sort, no loop over them. The result's ``values`` are ``matrix.values[perm]``; after an optimiser step
    the backward gathers the current ones with the same ``perm``.
    """
    if matrix.panel is not None:
        raise ValueError("transposed takes a matrix without column panels (a GRU's W_hh)")
    rows, columns = matrix.rows, matrix.columns
    counts = matrix.row_ptr[1:] - matrix.row_ptr[:-1]
    row_of = torch.repeat_interleave(torch.arange(rows, dtype=torch.int64), counts)
    cols = matrix.cols.to(torch.int64)
    perm = torch.argsort(cols * rows + row_of)  # distinct keys: the order is unique
    t_row_ptr = torch.zeros(columns + 1, dtype=torch.int64)
    t_row_ptr[1:] = torch.cumsum(torch.bincount(cols, minlength=columns), 0)
    t_cols = row_of[perm].to(torch.int32)
    return CompressedMatrix(t_row_ptr, t_cols, matrix.values[perm], rows), perm


def _lengths(lengths: Tensor | None) -> Tensor:
    return NO_LENGTHS if lengths is None else lengths.to(device="cpu", dtype=torch.int64)


def train_forward(
    gi: Tensor,
    matrix: CompressedMatrix,
    values: Tensor,
    bias: Tensor | None,
    h0: Tensor,
    lengths: Tensor | None = None,
    reverse: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """The recurrence over every step, saving its gates: ``(out (T, H, B), last (B, H), gates (T, 4H, B))``.

    ``gi`` (3H, T, B); ``matrix`` W_hh's structure (its ``row_ptr`` and ``cols``), ``values`` its current
    values (nnz, in that order); ``bias`` b_hh (3H) or None; ``h0`` (B, H). ``out`` and ``last`` equal the
    inference recurrence's (``gru_recurrence``) bit for bit.
    """
    mod = native_for(gi, values, bias, h0)
    if mod is not None:
        b = NO_BIAS if bias is None else bias
        out, last, gates = mod.gru_recurrence_train(
            gi, matrix.row_ptr, matrix.cols, values, b, h0, _lengths(lengths), reverse
        )
        return out, last, gates
    w_hh = CompressedMatrix(matrix.row_ptr, matrix.cols, values, matrix.columns).to_dense()
    gates: list[Tensor] = []
    with torch.no_grad():
        out, last = _recurrence(gi, w_hh.to(gi), bias, h0, lengths, reverse, None, gates)
    return out, last, torch.stack(gates)


def backward(
    dout: Tensor | None,
    dlast: Tensor | None,
    gates: Tensor,
    out: Tensor,
    h0: Tensor,
    t_matrix: CompressedMatrix,
    values: Tensor,
    perm: Tensor,
    lengths: Tensor | None = None,
    reverse: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """The backward through time: ``(dgi (3H, T, B), dgh (3H, T, B), dh0 (B, H))``.

    ``dout`` (T, H, B) and ``dlast`` (B, H): the gradients of the outputs and final states (None: 0);
    ``gates``, ``out``: :func:`train_forward`'s; ``h0`` (B, H); ``t_matrix, perm``: :func:`transposed` of
    W_hh; ``values``: W_hh's current values (W_hh's order; gathered here into W_hh^T's); ``lengths`` and
    ``reverse`` as the forward had them.
    """
    t_values = values.index_select(0, perm)  # a plain gather: cheaper than advanced indexing
    mod = native_for(gates, out, h0, t_values, dout, dlast)
    if mod is not None:
        dgi, dgh, dh0 = mod.gru_recurrence_backward(
            NO_GRAD if dout is None else dout,
            NO_GRAD if dlast is None else dlast,
            gates,
            out,
            h0,
            t_matrix.row_ptr,
            t_matrix.cols,
            t_values,
            _lengths(lengths),
            reverse,
        )
        return dgi, dgh, dh0
    w_t = CompressedMatrix(t_matrix.row_ptr, t_matrix.cols, t_values, t_matrix.columns).to_dense().to(gates)
    return _backward(dout, dlast, gates, out, h0, w_t, lengths, reverse)


def rows(grad: Tensor) -> Tensor:
    """``dgi`` or ``dgh`` (3H, T, B) as rows (T * B, 3H), row ``t * B + b``: the ``dy`` of the linear
    kernels (a transposed view, not a copy)."""
    return grad.reshape(grad.shape[0], -1).t()


def _previous(out: Tensor, h0: Tensor, lengths: Tensor | None, reverse: bool) -> Tensor:
    """The state each step read, (T, H, B): the previous step's output, h0 at the direction's first step of
    each sequence (in reverse a ragged sequence's own last step)."""
    first = h0.t().unsqueeze(0)
    prev = torch.cat([out[1:], first]) if reverse else torch.cat([first, out[:-1]])
    if reverse and lengths is not None and lengths.numel() > 0:
        steps = out.shape[0]
        last = lengths.to(device=out.device, dtype=torch.int64).clamp(max=steps) - 1
        batch = torch.arange(out.shape[2], device=out.device)
        keep = last >= 0  # a sequence of no steps reads nothing
        prev = prev.clone()
        prev[last[keep], :, batch[keep]] = h0[keep]
    return prev


def previous_states(out: Tensor, h0: Tensor, lengths: Tensor | None = None, reverse: bool = False) -> Tensor:
    """The state each step read, as rows (T * B, H), row ``t * B + b`` (contiguous): the ``x`` of W_hh's
    values gradient, against ``rows(dgh)``. Past a sequence's end its row is never used (dgh is 0 there)."""
    prev = _previous(out, h0, lengths, reverse)
    return prev.transpose(1, 2).reshape(-1, prev.shape[1])


def hh_dense_grad(dgh: Tensor, prev: Tensor) -> Tensor:
    """The dense gradient of W_hh (3H, H): ``rows(dgh)^T @ prev`` (``prev``: :func:`previous_states`)."""
    return dense_grad(rows(dgh), prev)


def hh_values_grad(dgh: Tensor, prev: Tensor, matrix: CompressedMatrix) -> Tensor:
    """W_hh's values gradient (nnz, in ``matrix``'s order, W_hh's non-zeros alone): the linear's SDDMM
    of ``rows(dgh)`` against ``prev`` (:func:`previous_states`), W_hh being one panel of H columns."""
    return values_grad(rows(dgh), prev, matrix)


def reference_recurrence(
    gi: Tensor,
    w_hh: Tensor,
    b_hh: Tensor | None,
    h0: Tensor,
    lengths: Tensor | None = None,
    reverse: bool = False,
    gh_shift: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The recurrence in plain differentiable torch operations: ``(out (T, H, B), last (B, H))``.

    ``w_hh`` is the dense (masked) matrix (3H, H). ``gh_shift`` (3H, T, B), added to each step's gh, is 0 in
    value: its gradient is ``dgh`` (how the tests read the gradient of an intermediate).
    """
    return _recurrence(gi, w_hh, b_hh, h0, lengths, reverse, gh_shift, None)


def _recurrence(
    gi: Tensor,
    w_hh: Tensor,
    b_hh: Tensor | None,
    h0: Tensor,
    lengths: Tensor | None,
    reverse: bool,
    gh_shift: Tensor | None,
    gates: list[Tensor] | None,
) -> tuple[Tensor, Tensor]:
    """:func:`reference_recurrence`, also appending each step's (4H, B) gates to ``gates`` (in step order)."""
    hidden, steps = h0.shape[1], gi.shape[1]
    live = None if lengths is None or lengths.numel() == 0 else lengths.to(gi.device)
    h = h0.t()
    outs: list[Tensor | None] = [None] * steps
    saved: list[Tensor | None] = [None] * steps
    for s in range(steps):
        t = steps - 1 - s if reverse else s
        gh = w_hh @ h
        if b_hh is not None:
            gh = gh + b_hh.unsqueeze(1)
        if gh_shift is not None:
            gh = gh + gh_shift[:, t]
        g = gi[:, t]
        r = torch.sigmoid(g[:hidden] + gh[:hidden])
        z = torch.sigmoid(g[hidden : 2 * hidden] + gh[hidden : 2 * hidden])
        n = torch.tanh(g[2 * hidden :] + r * gh[2 * hidden :])
        new = (1 - z) * n + z * h
        step_gates = torch.cat([r, z, n, gh[2 * hidden :]]) if gates is not None else None
        if live is None:
            h, outs[t] = new, new
        else:
            on = (t < live).unsqueeze(0)
            h, outs[t] = torch.where(on, new, h), torch.where(on, new, torch.zeros_like(new))
            if step_gates is not None:
                step_gates = torch.where(on, step_gates, torch.zeros_like(step_gates))
        saved[t] = step_gates
    if gates is not None:
        gates.extend(saved)
    return torch.stack(outs), h.t()


def _backward(
    dout: Tensor | None,
    dlast: Tensor | None,
    gates: Tensor,
    out: Tensor,
    h0: Tensor,
    w_t: Tensor,
    lengths: Tensor | None,
    reverse: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """The backward kernel's computation in torch, step by step (``w_t``: W_hh^T dense, (H, 3H))."""
    steps, hidden, batch = gates.shape[0], gates.shape[1] // 4, gates.shape[2]
    live = None if lengths is None or lengths.numel() == 0 else lengths.to(gates.device)
    prev = _previous(out, h0, lengths, reverse)
    dh = gates.new_zeros(hidden, batch) if dlast is None else dlast.t().to(gates)
    dgi = gates.new_zeros(3 * hidden, steps, batch)
    dgh = gates.new_zeros(3 * hidden, steps, batch)
    for s in range(steps):
        t = s if reverse else steps - 1 - s
        r, z, n, ghn = gates[t].view(4, hidden, batch).unbind(0)
        d = dh if dout is None else dh + dout[t]
        a_n = d * (1 - z) * (1 - n * n)
        a_r = a_n * ghn * (r - r * r)
        a_z = d * (prev[t] - n) * (z - z * z)
        g_i = torch.cat([a_r, a_z, a_n])
        g_h = torch.cat([a_r, a_z, a_n * r])
        carry = d * z
        if live is not None:
            on = (t < live).unsqueeze(0)
            g_i, g_h = torch.where(on, g_i, 0.0), torch.where(on, g_h, 0.0)
            carry = torch.where(on, carry, dh)
        dgi[:, t], dgh[:, t] = g_i, g_h
        dh = carry + w_t @ g_h
    return dgi, dgh, dh.t().contiguous()
