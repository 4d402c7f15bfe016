"""The GRU's training kernels (runtime/gru_grad.py, native/gru.cpp's training forward, native/gru_backward.cpp)
against torch autograd of the same recurrence and against nn.GRU itself: the gradients of the input
projections (dgi), of gh (dgh) and of h0, W_hh's values gradient from dgh, the training forward equal to the
inference one bit for bit, ragged batches in both directions, threads and determinism, the torch fallback."""

from __future__ import annotations

import contextlib
import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from sparsediff.sparse.native import OPERATORS, ops
from sparsediff.sparse.runtime import gru_grad, kernels
from sparsediff.sparse.runtime.gru_grad import (
    NO_LENGTHS,
    backward,
    hh_dense_grad,
    hh_values_grad,
    previous_states,
    reference_recurrence,
    rows,
    train_forward,
    transposed,
)
from sparsediff.sparse.runtime.matrix import NO_BIAS, CompressedMatrix


@pytest.fixture(scope="module")
def built():
    mod = kernels()
    if mod is None:
        pytest.fail("the native kernels did not build on this machine (g++ and ninja are installed by make)")
    return mod


@contextlib.contextmanager
def _threads(count: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _problem(
    hidden: int,
    batch: int,
    steps: int,
    density: float,
    seed: int,
    ragged: bool = False,
    bias: bool = True,
) -> SimpleNamespace:
    """A random layer and direction: W_hh masked to ``density`` (scaled as nn.GRU's initialisation, so the
    recurrence stays in the gates' working range), gi, h0, the output gradients and, if ``ragged``, lengths
    in non-increasing order (a packed batch's) with the longest of all ``steps``."""
    g = torch.Generator().manual_seed(seed)
    scale = 1.0 / math.sqrt(hidden * max(density, 0.05))
    w = (
        torch.randn(3 * hidden, hidden, generator=g)
        * scale
        * (torch.rand(3 * hidden, hidden, generator=g) < density)
    )
    lengths = None
    if ragged:
        lengths = torch.sort(torch.randint(1, steps + 1, (batch,), generator=g), descending=True).values
        lengths[0] = steps
    return SimpleNamespace(
        w=w,
        matrix=CompressedMatrix.from_dense(w),
        b=torch.randn(3 * hidden, generator=g) if bias else None,
        gi=2 * torch.randn(3 * hidden, steps, batch, generator=g),
        h0=torch.randn(batch, hidden, generator=g),
        dout=torch.randn(steps, hidden, batch, generator=g),
        dlast=torch.randn(batch, hidden, generator=g),
        lengths=lengths,
    )


def _reference(p: SimpleNamespace, reverse: bool) -> SimpleNamespace:
    """Outputs and gradients of the masked dense recurrence by autograd: dgi, dgh (through a zero shift of
    gh), dh0, and the dense W_hh's and b_hh's gradients."""
    gi = p.gi.clone().requires_grad_(True)
    h0 = p.h0.clone().requires_grad_(True)
    w = p.w.clone().requires_grad_(True)
    b = None if p.b is None else p.b.clone().requires_grad_(True)
    shift = torch.zeros_like(p.gi, requires_grad=True)
    out, last = reference_recurrence(gi, w, b, h0, p.lengths, reverse, shift)
    ((out * p.dout).sum() + (last * p.dlast).sum()).backward()
    return SimpleNamespace(
        out=out.detach(),
        last=last.detach(),
        dgi=gi.grad,
        dgh=shift.grad,
        dh0=h0.grad,
        dw=w.grad,
        db=None if b is None else b.grad,
    )


def _tolerance(steps: int, hidden: int) -> dict[str, float]:
    """float32 tolerances for a gradient summed over ``steps`` steps of ``hidden``-long products."""
    return {"rtol": 1e-4, "atol": 1e-5 * math.sqrt(steps * max(hidden, 1))}


def _run(p: SimpleNamespace, reverse: bool, dout: bool = True, dlast: bool = True):
    out, last, gates = train_forward(p.gi, p.matrix, p.matrix.values, p.b, p.h0, p.lengths, reverse)
    t_matrix, perm = transposed(p.matrix)
    grads = backward(
        p.dout if dout else None,
        p.dlast if dlast else None,
        gates,
        out,
        p.h0,
        t_matrix,
        p.matrix.values,
        perm,
        p.lengths,
        reverse,
    )
    return (out, last, gates), grads


@settings(max_examples=40)
@given(
    hidden=st.sampled_from([1, 7, 13, 96]),
    batch=st.sampled_from([1, 3, 9, 17]),
    steps=st.sampled_from([1, 2, 13]),
    density=st.sampled_from([0.0, 0.1, 0.4, 1.0]),
    reverse=st.booleans(),
    ragged=st.booleans(),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_backward_matches_autograd(built, hidden, batch, steps, density, reverse, ragged, bias, seed):
    p = _problem(hidden, batch, steps, density, seed, ragged, bias)
    (out, last, gates), (dgi, dgh, dh0) = _run(p, reverse)
    lengths = gru_grad._lengths(p.lengths)
    want_out, want_last = built.gru_recurrence(
        p.gi,
        p.matrix.row_ptr,
        p.matrix.cols,
        p.matrix.values,
        NO_BIAS if p.b is None else p.b,
        p.h0,
        lengths,
        reverse,
    )
    assert torch.equal(out, want_out) and torch.equal(last, want_last)  # the inference kernel's, bit for bit
    assert gates.shape == (steps, 4 * hidden, batch)
    ref = _reference(p, reverse)
    torch.testing.assert_close(out, ref.out, rtol=1e-5, atol=1e-5)
    tol = _tolerance(steps, hidden)
    torch.testing.assert_close(dgi, ref.dgi, **tol)
    torch.testing.assert_close(dgh, ref.dgh, **tol)
    torch.testing.assert_close(dh0, ref.dh0, **tol)
    assert torch.equal(dgi[: 2 * hidden], dgh[: 2 * hidden])  # r and z: the same gradient
    # W_hh's values gradient from dgh and the states each step read: the dense gradient at the kept positions
    prev = previous_states(out, p.h0, p.lengths, reverse)
    kept = p.w != 0
    torch.testing.assert_close(hh_values_grad(dgh, prev, p.matrix), ref.dw[kept], **tol)
    torch.testing.assert_close(hh_dense_grad(dgh, prev), ref.dw, **tol)
    if p.b is not None:
        torch.testing.assert_close(dgh.sum((1, 2)), ref.db, **tol)


@pytest.mark.parametrize("density", [0.2, 1.0])
def test_one_bidirectional_layer_matches_nn_gru(built, density):
    # The whole chain of a packed, bidirectional nn.GRU layer: the input projections by torch, the
    # recurrence and its backward by the kernels, every weight's and the input's gradient from dgi and dgh.
    torch.manual_seed(7)
    hidden, features, batch, steps = 12, 5, 11, 9
    gru = nn.GRU(features, hidden, batch_first=True, bidirectional=True)
    masks = {n: torch.rand(p.shape) < density for n, p in gru.named_parameters() if n.startswith("weight")}
    with torch.no_grad():
        for name, mask in masks.items():
            getattr(gru, name).mul_(mask)
    lengths = torch.sort(torch.randint(1, steps + 1, (batch,)), descending=True).values
    lengths[0] = steps
    x = torch.randn(batch, steps, features, requires_grad=True)
    h0 = torch.randn(2, batch, hidden, requires_grad=True)
    grad_out, grad_h = torch.randn(steps, batch, 2 * hidden), torch.randn(2, batch, hidden)
    want, want_h = gru(pack_padded_sequence(x, lengths, batch_first=True), h0)
    want, _ = pad_packed_sequence(want, total_length=steps)  # (T, B, 2H)
    ((want * grad_out).sum() + (want_h * grad_h).sum()).backward()
    xs = x.detach().transpose(0, 1).reshape(steps * batch, features)  # rows t * B + b
    dx = torch.zeros(steps * batch, features)
    for d, sfx in enumerate(("_l0", "_l0_reverse")):
        w_ih, b_ih = getattr(gru, "weight_ih" + sfx).detach(), getattr(gru, "bias_ih" + sfx).detach()
        w_hh, b_hh = getattr(gru, "weight_hh" + sfx).detach(), getattr(gru, "bias_hh" + sfx).detach()
        matrix = CompressedMatrix.from_dense(w_hh)
        gi = (xs @ w_ih.t() + b_ih).t().reshape(3 * hidden, steps, batch)
        out, last, gates = train_forward(gi, matrix, matrix.values, b_hh, h0[d].detach(), lengths, bool(d))
        torch.testing.assert_close(out.permute(0, 2, 1), want[..., d * hidden : (d + 1) * hidden].detach())
        torch.testing.assert_close(last, want_h[d].detach())
        t_matrix, perm = transposed(matrix)
        dout = grad_out[..., d * hidden : (d + 1) * hidden].permute(0, 2, 1)
        dgi, dgh, dh0 = backward(
            dout, grad_h[d], gates, out, h0[d].detach(), t_matrix, matrix.values, perm, lengths, bool(d)
        )
        tol = {"rtol": 1e-4, "atol": 1e-5}
        torch.testing.assert_close(dh0, h0.grad[d], **tol)
        prev = previous_states(out, h0[d].detach(), lengths, bool(d))
        torch.testing.assert_close(
            hh_values_grad(dgh, prev, matrix), getattr(gru, "weight_hh" + sfx).grad[w_hh != 0], **tol
        )
        torch.testing.assert_close(dgh.sum((1, 2)), getattr(gru, "bias_hh" + sfx).grad, **tol)
        torch.testing.assert_close(dgi.sum((1, 2)), getattr(gru, "bias_ih" + sfx).grad, **tol)
        torch.testing.assert_close(rows(dgi).t() @ xs, getattr(gru, "weight_ih" + sfx).grad, **tol)
        dx += rows(dgi) @ w_ih
    torch.testing.assert_close(
        dx.reshape(steps, batch, features).transpose(0, 1), x.grad, rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("reverse", [False, True])
def test_threads_are_deterministic(built, threads, reverse):
    # 40 sequences: with two threads, slices of 24 and 16; ragged, so the running prefix shrinks
    p = _problem(20, 40, 13, 0.15, 11, ragged=True)
    with _threads(threads):
        (out, last, gates), grads = _run(p, reverse)
        (out2, last2, gates2), grads2 = _run(p, reverse)
    for a, b in zip((out, last, gates, *grads), (out2, last2, gates2, *grads2)):
        assert torch.equal(a, b)
    ref = _reference(p, reverse)
    for got, want in zip(grads, (ref.dgi, ref.dgh, ref.dh0)):
        torch.testing.assert_close(got, want, **_tolerance(13, 20))


@pytest.mark.parametrize("reverse", [False, True])
def test_unsorted_lengths_and_empty_sequences(built, reverse):
    # any order is correct (only the work per step differs); a sequence of no steps passes dlast to dh0
    p = _problem(9, 12, 7, 0.3, 5)
    p.lengths = torch.tensor([3, 7, 0, 1, 7, 5, 2, 6, 4, 7, 1, 0])
    (out, last, _), (dgi, dgh, dh0) = _run(p, reverse)
    ref = _reference(p, reverse)
    torch.testing.assert_close(out, ref.out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last, ref.last, rtol=1e-5, atol=1e-5)
    for got, want in zip((dgi, dgh, dh0), (ref.dgi, ref.dgh, ref.dh0)):
        torch.testing.assert_close(got, want, **_tolerance(7, 9))
    assert torch.equal(dh0[2], p.dlast[2]) and not dgi[:, :, 2].any()


@pytest.mark.parametrize(("dout", "dlast"), [(False, True), (True, False), (False, False)])
def test_missing_output_gradients_are_zero(built, dout, dlast):
    p = _problem(10, 9, 5, 0.3, 2, ragged=True)
    _, got = _run(p, True, dout=dout, dlast=dlast)
    zeros = SimpleNamespace(**vars(p))
    zeros.dout = p.dout if dout else torch.zeros_like(p.dout)
    zeros.dlast = p.dlast if dlast else torch.zeros_like(p.dlast)
    _, want = _run(zeros, True)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_non_contiguous_inputs(built):
    p = _problem(11, 10, 6, 0.3, 3, ragged=True)
    (out, _, gates), want = _run(p, False)
    gi = p.gi.permute(1, 2, 0).contiguous().permute(2, 0, 1)  # (3H, T, B) over (T, B, 3H) storage
    h0 = p.h0.t().contiguous().t()
    dout = p.dout.transpose(1, 2).contiguous().transpose(1, 2)
    dlast = p.dlast.t().contiguous().t()
    assert not (gi.is_contiguous() or h0.is_contiguous() or dout.is_contiguous() or dlast.is_contiguous())
    out2, _, gates2 = train_forward(gi, p.matrix, p.matrix.values, p.b, h0, p.lengths)
    assert torch.equal(out2, out) and torch.equal(gates2, gates)
    t_matrix, perm = transposed(p.matrix)
    got = backward(dout, dlast, gates, out, h0, t_matrix, p.matrix.values, perm, p.lengths)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_transposed_structure(density):
    p = _problem(13, 1, 1, density, 8)
    p.w[4] = 0  # an empty row, an empty column of W^T
    p.w[:, 2] = 0
    matrix = CompressedMatrix.from_dense(p.w)
    t_matrix, perm = transposed(matrix)
    assert (t_matrix.rows, t_matrix.columns) == (13, 39)
    assert torch.equal(t_matrix.to_dense(), p.w.t())
    assert torch.equal(t_matrix.values, matrix.values[perm])
    assert t_matrix.cols.dtype == torch.int32 and t_matrix.row_ptr.dtype == torch.int64
    with pytest.raises(ValueError, match="panels"):
        transposed(CompressedMatrix.from_dense(p.w, panel=8))


@pytest.mark.parametrize("reverse", [False, True])
def test_torch_path_matches_the_kernels(built, monkeypatch, reverse):
    # without kernels (or for other dtypes) train_forward and backward compute the same in torch
    p = _problem(16, 9, 6, 0.3, 4, ragged=True)
    (out, last, gates), grads = _run(p, reverse)
    monkeypatch.setattr(gru_grad, "native_for", lambda *tensors: None)
    (out2, last2, gates2), grads2 = _run(p, reverse)
    torch.testing.assert_close(out2, out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last2, last, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gates2, gates, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads2, grads):
        torch.testing.assert_close(a, b, **_tolerance(6, 16))


def test_float64_takes_the_torch_path(built):
    p = _problem(8, 5, 4, 0.4, 6, ragged=True)
    for name in ("w", "gi", "h0", "dout", "dlast", "b"):
        setattr(p, name, getattr(p, name).double())
    p.matrix = CompressedMatrix.from_dense(p.w)
    _, (dgi, dgh, dh0) = _run(p, True)
    ref = _reference(p, True)
    for got, want in zip((dgi, dgh, dh0), (ref.dgi, ref.dgh, ref.dh0)):
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_kernel_refuses_mismatched_shapes(built):
    p = _problem(6, 4, 3, 0.5, 1)
    (out, _, gates), _ = _run(p, False)
    t_matrix, perm = transposed(p.matrix)
    args = [
        p.dout,
        p.dlast,
        gates,
        out,
        p.h0,
        t_matrix.row_ptr,
        t_matrix.cols,
        t_matrix.values,
        NO_LENGTHS,
        False,
    ]
    with pytest.raises(RuntimeError, match="disagree"):
        built.gru_recurrence_backward(*args[:4], torch.randn(5, 6), *args[5:])
    with pytest.raises(RuntimeError, match="CSR"):
        built.gru_recurrence_backward(*args[:5], t_matrix.row_ptr[:-1], *args[6:])
    with pytest.raises(RuntimeError, match="lengths"):
        built.gru_recurrence_backward(*args[:8], torch.ones(3, dtype=torch.int64), False)


@pytest.mark.skipif(not OPERATORS, reason="torch operators need torch >= 2.4")
def test_operators_match_the_module_and_their_shapes(built):
    p = _problem(7, 5, 4, 0.4, 9, ragged=True)
    fwd = (p.gi, p.matrix.row_ptr, p.matrix.cols, p.matrix.values, p.b, p.h0, p.lengths, True)
    got = torch.ops.sparsediff.gru_recurrence_train(*fwd)
    want = built.gru_recurrence_train(*fwd)
    fake = ops.DECLARED["gru_recurrence_train"](*fwd)
    for a, b, f in zip(got, want, fake):
        assert torch.equal(a, b) and f.shape == a.shape
    out, _, gates = want
    t_matrix, _ = transposed(p.matrix)
    bwd = (
        p.dout,
        p.dlast,
        gates,
        out,
        p.h0,
        t_matrix.row_ptr,
        t_matrix.cols,
        t_matrix.values,
        p.lengths,
        True,
    )
    got = torch.ops.sparsediff.gru_recurrence_backward(*bwd)
    want = built.gru_recurrence_backward(*bwd)
    fake = ops.DECLARED["gru_recurrence_backward"](*bwd)
    for a, b, f in zip(got, want, fake):
        assert torch.equal(a, b) and f.shape == a.shape
