"""The convolution backward on compressed kernels (runtime/conv_grad.py, native/conv_backward.cpp) against
torch autograd of the masked dense convolution: the input gradient (the forward kernel over dy with the
transposed, flipped kernel), the values' gradient in the layer's value order, Conv1d, unbatched,
channels-last and non-contiguous inputs, padding past the kernel's reach, threads and determinism, and the
dense fallback."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sparsediff.sparse.native import OPERATORS
from sparsediff.sparse.runtime import kernels
from sparsediff.sparse.runtime.conv import SparseConv
from sparsediff.sparse.runtime.conv_grad import (
    ConvGeometry,
    dense_grad,
    input_grad,
    input_offsets,
    transposed,
    transposed_offsets,
    values_grad,
)


@pytest.fixture(scope="module")
def built():
    mod = kernels()
    if mod is None:
        pytest.fail("the native kernels did not build on this machine (g++ and ninja are installed by make)")
    return mod


@contextlib.contextmanager
def _threads(count: int):
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _layout(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(row_ptr, taps)`` of a kernel's kept positions, rows by output channel, taps ascending."""
    flat = mask.reshape(mask.shape[0], -1)
    row_ptr = torch.zeros(flat.shape[0] + 1, dtype=torch.int64)
    row_ptr[1:] = torch.cumsum(flat.sum(1), 0)
    return row_ptr, flat.nonzero()[:, 1].to(torch.int32)


def _conv(conv: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    fn = F.conv2d if isinstance(conv, nn.Conv2d) else F.conv1d
    return fn(x, weight, None, padding=conv.padding, dilation=conv.dilation)


def _reference(conv, mask, x, dy):
    """(dX, dvalues in the layer's value order) of the masked dense convolution by torch autograd."""
    weight = conv.weight.detach().clone().requires_grad_(True)
    inputs = x.detach().clone().requires_grad_(True)
    _conv(conv, inputs, weight * mask).backward(dy)
    return inputs.grad, weight.grad.reshape(mask.shape[0], -1)[mask.reshape(mask.shape[0], -1)]


def _close(got: torch.Tensor, want: torch.Tensor, length: int) -> None:
    """float32 sums of ``length`` products of unit-scale numbers: the tolerance grows with sqrt(length)."""
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5 * max(1.0, math.sqrt(length)))


def _grads(conv, mask, x, dy, grain=1 << 18):
    shape = ConvGeometry.of(conv)
    row_ptr, taps = _layout(mask)
    values = conv.weight.detach()[mask].contiguous()
    t = transposed(row_ptr, taps, shape)
    return input_grad(dy, values, t, shape, grain=grain), values_grad(
        dy, x, row_ptr, taps, shape, grain=grain
    )


def _check(conv, mask, x, dy, grain=1 << 18):
    want_dx, want_dv = _reference(conv, mask, x, dy)
    dx, dv = _grads(conv, mask, x, dy, grain)
    assert dx.shape == x.shape and dv.shape == (int(mask.sum()),)
    _close(dx, want_dx, mask.shape[0] * mask[0, 0].numel())  # sums over output channels and taps
    _close(dv, want_dv, dy.numel() // max(1, mask.shape[0]))


def _valid(size, kernel, padding, dilation) -> bool:
    return all(s + 2 * p >= d * (k - 1) + 1 for s, k, p, d in zip(size, kernel, padding, dilation))


@settings(max_examples=40, deadline=None)
@given(
    c_in=st.integers(1, 20),
    c_out=st.integers(1, 20),
    size=st.tuples(st.integers(1, 13), st.integers(1, 13)),
    kernel=st.sampled_from([1, 3, (1, 3), (3, 1)]),
    padding=st.sampled_from([0, 1, 2, "same"]),
    dilation=st.sampled_from([1, 2]),
    batch=st.integers(0, 3),  # 0: unbatched
    density=st.sampled_from([0.0, 0.1, 0.5, 1.0]),
    channels_last=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_conv2d_grads_match_masked_dense(
    built, c_in, c_out, size, kernel, padding, dilation, batch, density, channels_last, seed
):
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(c_in, c_out, kernel, padding=padding, dilation=dilation, bias=False)
    pad = ConvGeometry.of(conv)
    if not _valid(size, conv.kernel_size, (pad.ph, pad.pw), conv.dilation):
        return  # kernel larger than the padded input: not a valid convolution
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
    mask = torch.rand(conv.weight.shape, generator=g) < density
    x = torch.randn(max(batch, 1), c_in, *size, generator=g)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    if batch == 0:
        x = x[0]
    with torch.no_grad():
        y = _conv(conv, x, conv.weight * mask)
    dy = torch.randn(y.shape, generator=g)
    _check(conv, mask, x, dy)


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize(
    "kernel,padding,dilation", [(3, 1, 1), (3, 2, 2), (1, 0, 1), (5, "same", 1), (3, 4, 1)]
)
def test_conv1d_grads_match_masked_dense(built, batched, kernel, padding, dilation):
    torch.manual_seed(kernel + dilation)
    conv = nn.Conv1d(7, 11, kernel, padding=padding, dilation=dilation, bias=False)
    mask = torch.rand(conv.weight.shape) < 0.3
    x = torch.randn(3, 7, 29) if batched else torch.randn(7, 29)
    with torch.no_grad():
        y = _conv(conv, x, conv.weight * mask)
    _check(conv, mask, x, torch.randn(y.shape))


def test_padding_past_the_kernels_reach_is_cropped(built):
    # padding 3 with a 3x3 kernel: dy would need a negative padding; the input gradient crops instead
    torch.manual_seed(1)
    conv = nn.Conv2d(5, 6, 3, padding=(3, 1), bias=False)
    mask = torch.rand(conv.weight.shape) < 0.4
    t = transposed(*_layout(mask), ConvGeometry.of(conv))
    assert (t.ph, t.pw, t.crop_h, t.crop_w) == (0, 1, 1, 0)
    x = torch.randn(2, 5, 7, 8)
    _check(conv, mask, x, torch.randn(2, 6, 11, 8))


def test_noncontiguous_inputs(built):
    torch.manual_seed(2)
    conv = nn.Conv2d(9, 10, 3, padding=1, bias=False)
    mask = torch.rand(conv.weight.shape) < 0.25
    x = torch.randn(3, 9, 14, 12).transpose(2, 3)  # (3, 9, 12, 14), strided
    dy = torch.randn(3, 12, 14, 20)[..., ::2].permute(0, 3, 1, 2)  # (3, 10, 12, 14), strided
    assert not x.is_contiguous() and not dy.is_contiguous()
    _check(conv, mask, x, dy)


@pytest.mark.parametrize("c_out", [3, 17])  # few rows: the images are split between threads; else the rows
@pytest.mark.parametrize("threads", [1, 2])
def test_many_channels_large_images_threads_and_determinism(built, c_out, threads):
    # 150 input channels of 33 x 37: several chunks of positions and panels of channels per image
    torch.manual_seed(3)
    conv = nn.Conv2d(150, c_out, 3, padding=2, dilation=2, bias=False)
    mask = torch.rand(conv.weight.shape) < 0.1
    x = torch.randn(2, 150, 33, 37)
    dy = torch.randn(2, c_out, 33, 37)
    with _threads(threads):
        _check(conv, mask, x, dy, grain=1)
        first = _grads(conv, mask, x, dy, grain=1)
        again = _grads(conv, mask, x, dy, grain=1)
    assert all(torch.equal(a, b) for a, b in zip(first, again))  # bitwise, for a fixed thread count


def test_rows_split_gives_the_same_bits_for_any_thread_count(built):
    # with enough output channels the threads split the rows: no reduction, one summation order
    torch.manual_seed(4)
    conv = nn.Conv2d(12, 16, 3, padding=1, bias=False)
    mask = torch.rand(conv.weight.shape) < 0.3
    x, dy = torch.randn(2, 12, 20, 20), torch.randn(2, 16, 20, 20)
    results = []
    for threads in (1, 2):
        with _threads(threads):
            results.append(_grads(conv, mask, x, dy, grain=1)[1])
    assert torch.equal(results[0], results[1])


def test_the_layers_buffers_and_offsets_serve(built):
    # SparseConv's own row_ptr / taps / offsets are what values_grad takes
    torch.manual_seed(5)
    conv = nn.Conv2d(6, 8, 3, padding=1, bias=False)
    mask = torch.rand(conv.weight.shape) < 0.3
    layer = SparseConv(conv, mask)
    shape = ConvGeometry.of(conv)
    x, dy = torch.randn(2, 6, 9, 10), torch.randn(2, 8, 9, 10)
    torch.testing.assert_close(input_offsets(layer.taps, shape, 9, 10), layer.offsets(9, 10), rtol=0, atol=0)
    got = values_grad(dy, x, layer.row_ptr, layer.taps, shape, layer.offsets(9, 10))
    _close(got, _reference(conv, mask & (conv.weight != 0), x, dy)[1], dy.numel() // 8)


def test_transposed_kernel_is_the_flipped_transpose():
    torch.manual_seed(6)
    conv = nn.Conv2d(5, 7, (3, 2), padding=1, dilation=(2, 1), bias=False)
    mask = torch.rand(conv.weight.shape) < 0.4
    mask[2] = False  # an empty row: an output channel with no taps
    weight = conv.weight.detach() * mask
    row_ptr, taps = _layout(mask)
    shape = ConvGeometry.of(conv)
    t = transposed(row_ptr, taps, shape)
    values = weight[mask]
    assert torch.equal(torch.sort(t.perm).values, torch.arange(values.numel()))
    dense = torch.zeros(5, 7 * 6)
    rows = torch.repeat_interleave(torch.arange(5), t.row_ptr.diff())
    dense[rows, t.taps.long()] = values[t.perm]
    torch.testing.assert_close(dense.reshape(5, 7, 3, 2), weight.transpose(0, 1).flip(2, 3), rtol=0, atol=0)
    for c in range(5):  # taps ascending within each row of W' (the forward kernel's panels need it)
        row = t.taps[t.row_ptr[c] : t.row_ptr[c + 1]]
        assert torch.all(row[1:] > row[:-1])
    off = transposed_offsets(t, shape, 6, 4)  # dy padded by (2 * 2 - 1, 1 - 1)
    hp, wp = 6 + 2 * 3, 4
    code = t.taps.long()
    assert torch.equal(off.long(), code // 6 * hp * wp + code % 6 // 2 * 2 * wp + code % 2)


def test_dense_fallback_matches_autograd():
    # float64 (and CUDA, or no kernels) takes torch's dense ops: the same gradients
    torch.manual_seed(7)
    conv = nn.Conv2d(4, 6, 3, padding=(1, 3), bias=False).double()
    mask = torch.rand(conv.weight.shape) < 0.5
    x = torch.randn(2, 4, 8, 5, dtype=torch.float64)
    dy = torch.randn(2, 6, 8, 9, dtype=torch.float64)
    want_dx, want_dv = _reference(conv, mask, x, dy)
    dx, dv = _grads(conv, mask, x, dy)
    torch.testing.assert_close(dx, want_dx)
    torch.testing.assert_close(dv, want_dv)


def test_fallback_without_kernels(monkeypatch):
    from sparsediff.sparse.runtime import conv_grad

    monkeypatch.setattr(conv_grad, "native_for", lambda *tensors: None)
    torch.manual_seed(8)
    conv = nn.Conv1d(5, 4, 3, padding=1, bias=False)
    mask = torch.rand(conv.weight.shape) < 0.5
    x, dy = torch.randn(2, 5, 10), torch.randn(2, 4, 10)
    _check(conv, mask, x, dy)


@pytest.mark.parametrize("batched", [True, False])
def test_dense_grad_is_the_dense_weight_gradient(batched):
    torch.manual_seed(9)
    for conv, size in [
        (nn.Conv2d(3, 5, 3, padding="same", dilation=2), (9, 7)),
        (nn.Conv1d(3, 5, 3, padding=1), (11,)),
    ]:
        x = torch.randn(2, 3, *size)
        y = conv(x)
        dy = torch.randn(y.shape)
        y.backward(dy)
        if not batched:
            x, dy = x[0], dy[0]
            conv.weight.grad = None
            conv(x).backward(dy)
        got = dense_grad(dy, x, tuple(conv.weight.shape), conv.padding, conv.dilation)
        torch.testing.assert_close(got, conv.weight.grad, rtol=1e-5, atol=1e-4)


def test_geometry_of_convolutions():
    assert ConvGeometry.of(nn.Conv2d(2, 3, 3, padding="same", dilation=2)) == ConvGeometry(
        3, 2, 3, 3, 2, 2, 2, 2
    )
    assert ConvGeometry.of(nn.Conv1d(2, 3, 5, padding=1, dilation=3)) == ConvGeometry(
        3, 2, 1, 5, 0, 1, 1, 3, 1
    )
    assert ConvGeometry.of(nn.Conv2d(2, 3, (1, 3), padding="valid")).ph == 0
    with pytest.raises(ValueError, match="asymmetric"):
        ConvGeometry.of(nn.Conv2d(2, 3, 2, padding="same"))
    with pytest.raises(ValueError, match="stride"):
        ConvGeometry.of(nn.Conv2d(2, 3, 3, stride=2))


def test_values_grad_checks_its_inputs(built):
    conv = nn.Conv2d(4, 3, 3, padding=1, bias=False)
    mask = torch.ones(conv.weight.shape, dtype=torch.bool)
    row_ptr, taps = _layout(mask)
    shape = ConvGeometry.of(conv)
    with pytest.raises(RuntimeError, match="channels"):
        values_grad(torch.randn(1, 3, 5, 5), torch.randn(1, 5, 5, 5), row_ptr, taps, shape)
    with pytest.raises(RuntimeError, match="dy has shape"):
        values_grad(torch.randn(1, 3, 4, 5), torch.randn(1, 4, 5, 5), row_ptr, taps, shape)


@pytest.mark.skipif(not OPERATORS, reason="operators need torch >= 2.4")
def test_operator_matches_the_module(built):
    torch.manual_seed(10)
    conv = nn.Conv2d(4, 5, 3, padding=1, bias=False)
    mask = torch.rand(conv.weight.shape) < 0.5
    row_ptr, taps = _layout(mask)
    shape = ConvGeometry.of(conv)
    x, dy = torch.randn(2, 4, 6, 7), torch.randn(2, 5, 6, 7)
    off = input_offsets(taps, shape, 6, 7)
    args = (dy, x, row_ptr, off, 3, 3, 1, 1, 1, 1, 1 << 18)
    assert torch.equal(
        torch.ops.sparsediff.sparse_conv2d_values_grad(*args), built.sparse_conv2d_values_grad(*args)
    )
