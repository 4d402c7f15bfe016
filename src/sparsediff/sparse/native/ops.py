"""The native kernels as operators: each kernel declared once, here.

A declaration is a function named after its kernel (the C++ function that ``bindings.cpp`` binds under
that name). Its annotated signature is the operator's schema, and its body computes the output's shapes
only: the "fake" implementation that the compiler traces with. From it come

- the eager call: the layers call the kernel module's function of that name directly (:func:`native_for`
  hands them the module), since the operator dispatcher would cost more than a small layer's whole product
  (a 128 x 128 linear at batch 1 takes about 4.5 us a call through the module);
- the operator ``torch.ops.sparsediff.<name>`` for ``torch.compile``, made by ``torch.library.custom_op``:
  it calls the kernel, and its fake is the declaration's body. While the compiler traces, ``native_for``
  hands the layers ``torch.ops.sparsediff`` instead of the module, so a sparse model compiles into whole
  graphs (no graph break at every sparse layer, which made a compiled sparse model slower than the compiled
  dense one) and the compiler can fuse the norms and activations between the layers. The operators need
  torch >= 2.4 (``custom_op``); with an older torch the declarations stay plain shape functions and a
  compiled model breaks its graph at each sparse layer (still correct);
- autograd, later: a kernel's backward formula is registered under its declaration, with the operator's
  ``register_autograd(backward, setup_context=...)``, calling the backward kernel that sits next to the
  forward one in this folder (see the end of this module).

This module has no ``from __future__ import annotations``: ``custom_op`` reads the annotations.
"""

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .build import OPERATORS, kernels

DECLARED: dict[str, Callable[..., Any]] = {}  # kernel name -> its declaration (the shape function)


def _bound(name: str) -> Callable[..., Any]:
    mod = kernels()
    if mod is None:
        raise RuntimeError("sparsediff's native kernels are unavailable")
    return getattr(mod, name)


def operator(shapes: Callable[..., Any]) -> Any:
    """Declare the kernel named ``shapes.__name__``: its signature is the operator's schema, ``shapes``
    its fake. Returns the operator (a ``torch.library.CustomOpDef``), or ``shapes`` without operators."""
    name = shapes.__name__
    DECLARED[name] = shapes
    if not OPERATORS:
        return shapes

    def call(*args):
        out = _bound(name)(*args)
        return tuple(out) if isinstance(out, list) else out  # a C++ std::vector comes back as a list

    functools.update_wrapper(call, shapes)  # the declaration's signature and annotations give the schema
    op = torch.library.custom_op(f"sparsediff::{name}", call, mutates_args=())
    op.register_fake(shapes)
    return op


@operator
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
    """``x @ W^T + bias``, shape (rows, out), or its transpose (out, rows) when ``transposed`` (spmm.cpp)."""
    rows, out = x.shape[0], row_ptr.shape[1] - 1
    return x.new_empty((out, rows) if transposed else (rows, out))


@operator
def sddmm_linear(dy: Tensor, x: Tensor, row_ptr: Tensor, cols: Tensor, panel: int, grain: int) -> Tensor:
    """``(dy^T x)`` at a sparse linear's non-zeros, its values' gradient: shape (nnz,) (spmm_backward.cpp)."""
    return dy.new_empty((cols.shape[0],))


@operator
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
    """The direct sparse convolution of ``x`` (B, C, H, W), stride 1 (conv.cpp)."""
    height = x.shape[2] + 2 * ph - dh * (kh - 1)
    width = x.shape[3] + 2 * pw - dw * (kw - 1)
    return x.new_empty((x.shape[0], row_ptr.shape[0] - 1, height, width))


@operator
def sparse_conv2d_values_grad(
    dy: Tensor,
    x: Tensor,
    row_ptr: Tensor,
    offsets: Tensor,
    kh: int,
    kw: int,
    ph: int,
    pw: int,
    dh: int,
    dw: int,
    grain: int,
) -> Tensor:
    """The gradient of the direct sparse convolution's kept taps, one per offset (conv_backward.cpp)."""
    return x.new_empty((offsets.shape[0],))


@operator
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
    """Every step of a GRU layer: outputs (T, H, B) and final states (B, H) (gru.cpp)."""
    steps, batch, hidden = gi.shape[1], gi.shape[2], h0.shape[1]
    return gi.new_empty((steps, hidden, batch)), h0.new_empty((batch, hidden))


@operator
def gru_recurrence_train(
    gi: Tensor,
    row_ptr: Tensor,
    cols: Tensor,
    values: Tensor,
    bias: Tensor,
    h0: Tensor,
    lengths: Tensor,
    reverse: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """The GRU steps for training: outputs (T, H, B), final states (B, H) and gates (T, 4H, B) (gru.cpp)."""
    steps, batch, hidden = gi.shape[1], gi.shape[2], h0.shape[1]
    return (
        gi.new_empty((steps, hidden, batch)),
        h0.new_empty((batch, hidden)),
        gi.new_empty((steps, 4 * hidden, batch)),
    )


@operator
def gru_recurrence_backward(
    dout: Tensor,
    dlast: Tensor,
    gates: Tensor,
    out: Tensor,
    h0: Tensor,
    t_row_ptr: Tensor,
    t_cols: Tensor,
    t_values: Tensor,
    lengths: Tensor,
    reverse: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """The GRU's backward through time: dgi, dgh (3H, T, B) and dh0 (B, H) (gru_backward.cpp)."""
    steps, hidden, batch = gates.shape[0], gates.shape[1] // 4, gates.shape[2]
    return (
        gates.new_empty((3 * hidden, steps, batch)),
        gates.new_empty((3 * hidden, steps, batch)),
        h0.new_empty((batch, hidden)),
    )


# Backward formulas go here, one under each forward declaration's name, once training kernels exist:
#     spmm_linear.register_autograd(_spmm_linear_backward, setup_context=_spmm_linear_save)
# with the backward itself calling its own declared operator (e.g. ``spmm_linear_backward``).
