"""The linear backward on compressed weights (runtime/linear_grad.py, native/spmm_backward.cpp) against torch
autograd of the masked dense layer: the input gradient, the values' gradient in the layer's value order, the
transposed structure, threads and determinism, and the dense fallback."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from sparsediff.sparse.native import OPERATORS
from sparsediff.sparse.runtime import kernels, linear_grad
from sparsediff.sparse.runtime.linear import panel_width
from sparsediff.sparse.runtime.linear_grad import (
    coordinates,
    dense_grad,
    input_grad,
    transposed,
    values_grad,
)
from sparsediff.sparse.runtime.matrix import CompressedMatrix


@pytest.fixture(scope="module")
def built():
    mod = kernels()
    if mod is None:
        pytest.fail("the native kernels did not build on this machine (g++ and ninja are installed by make)")
    return mod


def _weight(m: int, k: int, density: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, k, generator=g) * (torch.rand(m, k, generator=g) < density)
    if m > 2:
        w[1] = 0  # an empty row
    return w


def _layer_matrix(w: torch.Tensor) -> CompressedMatrix:
    return CompressedMatrix.from_dense(w, max(1, panel_width(w.shape[1])))  # SparseLinear's layout


def _layer_order(grad: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``grad`` at the non-zeros of ``w``, panel by panel, row by row (the layer's value order)."""
    panel = max(1, panel_width(w.shape[1]))
    starts = range(0, max(1, w.shape[1]), panel)
    return torch.cat([grad[:, s : s + panel][w[:, s : s + panel] != 0] for s in starts])


def _reference(w: torch.Tensor, x: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dX, dW) of the masked dense layer F.linear(x, W * mask, b) by torch autograd, for the output grad."""
    weight = w.clone().requires_grad_(True)
    inputs = x.detach().clone().requires_grad_(True)
    mask = (w != 0).to(w.dtype)
    bias = torch.zeros(w.shape[0], dtype=w.dtype)
    F.linear(inputs, weight * mask, bias).backward(dy)
    return inputs.grad, weight.grad


def _close(got: torch.Tensor, want: torch.Tensor, length: int) -> None:
    """float32 sums of ``length`` products of unit-scale numbers: the tolerance grows with sqrt(length)."""
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * max(1.0, math.sqrt(length)))


def _check(w: torch.Tensor, x: torch.Tensor, dy: torch.Tensor, grain: int = 1 << 18) -> None:
    matrix = _layer_matrix(w)
    want_dx, want_dw = _reference(w, x, dy)
    t_matrix, perm = transposed(matrix)
    _close(input_grad(dy, t_matrix, matrix.values, perm, grain), want_dx, w.shape[0])
    rows = x.numel() // max(1, x.shape[-1])
    _close(values_grad(dy, x, matrix, grain), _layer_order(want_dw, w), rows)


@given(
    m=st.integers(1, 160),
    k=st.integers(1, 300),
    n=st.integers(1, 140),
    density=st.sampled_from([0.0, 0.04, 0.15, 0.5, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_gradients_match_masked_dense_autograd(built, m, k, n, density, seed):
    w = _weight(m, k, density, seed)
    g = torch.Generator().manual_seed(seed + 1)
    _check(w, torch.randn(n, k, generator=g), torch.randn(n, m, generator=g))


@pytest.mark.parametrize(
    ("m", "k", "n", "density"),
    [
        (7, 300, 1, 0.3),  # batch 1, three panels (K > 256)
        (130, 257, 65, 0.1),  # three panels, one full block of 64 rows and one row more
        (33, 129, 3, 1.0),  # dense, a one-column second panel
        (1, 1, 1, 1.0),
        (45, 200, 130, 0.0),  # no non-zeros at all
        (200, 17, 71, 0.2),  # W^T over several panels of its own (M > 128)
    ],
)
def test_gradients_at_edge_shapes(built, m, k, n, density):
    w = _weight(m, k, density, m + k + n)
    g = torch.Generator().manual_seed(n)
    _check(w, torch.randn(n, k, generator=g), torch.randn(n, m, generator=g), grain=0)


@given(
    m=st.integers(0, 300),
    k=st.integers(0, 300),
    density=st.sampled_from([0.0, 0.1, 0.6, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_transposed_structure_round_trips(m, k, density, seed):
    w = _weight(m, k, density, seed)
    matrix = _layer_matrix(w)
    t_matrix, perm = transposed(matrix)
    assert perm.dtype == torch.int64 and perm.numel() == matrix.nnz
    assert torch.equal(t_matrix.to_dense(), w.t())
    assert torch.equal(t_matrix.values, matrix.values[perm])
    # exactly the layout of a linear with M input features holding W^T
    want = CompressedMatrix.from_dense(w.t().contiguous(), max(1, panel_width(m)))
    assert t_matrix.panel == want.panel and t_matrix.columns == m and t_matrix.rows == k
    assert torch.equal(t_matrix.row_ptr, want.row_ptr)
    assert torch.equal(t_matrix.cols, want.cols) and t_matrix.cols.dtype == torch.int32
    rows, columns = coordinates(matrix)
    assert torch.equal(w[rows, columns], matrix.values)
    assert torch.equal(_layer_order(w, w), matrix.values)


def test_values_are_gathered_at_each_call(built):
    # the transposed structure is built once per topology; new values of W reach dX without rebuilding it
    w = _weight(40, 150, 0.2, 0)
    matrix = _layer_matrix(w)
    t_matrix, perm = transposed(matrix)
    new_values = torch.randn(matrix.nnz)
    new_w = CompressedMatrix(matrix.row_ptr, matrix.cols, new_values, matrix.columns, matrix.panel).to_dense()
    dy = torch.randn(9, 40)
    _close(input_grad(dy, t_matrix, new_values, perm), dy @ new_w, 40)


def test_leading_dims_and_non_contiguous_inputs(built):
    m, k = 70, 140
    w = _weight(m, k, 0.2, 3)
    matrix = _layer_matrix(w)
    t_matrix, perm = transposed(matrix)
    x = torch.randn(3, k, 5).transpose(1, 2)  # (3, 5, K), not contiguous
    dy = torch.randn(5, 3, m).transpose(0, 1)  # (3, 5, M), not contiguous
    assert not x.is_contiguous() and not dy.is_contiguous()
    want_dx, want_dw = _reference(w, x, dy)
    dx = input_grad(dy, t_matrix, matrix.values, perm)
    assert dx.shape == (3, 5, k)
    _close(dx, want_dx, m)
    _close(values_grad(dy, x, matrix), _layer_order(want_dw, w), 15)
    _close(
        values_grad(dy[:, ::2], x[:, ::2], matrix),
        _layer_order(dy[:, ::2].reshape(-1, m).t() @ x[:, ::2].reshape(-1, k), w),
        9,
    )
    torch.testing.assert_close(dense_grad(dy, x), dy.reshape(15, m).t() @ x.reshape(15, k))
    assert dense_grad(dy, x).shape == (m, k)


@pytest.mark.parametrize(("n", "m", "k"), [(300, 96, 260), (40, 130, 129), (1, 64, 64), (129, 10, 500)])
def test_threads_agree_and_each_is_deterministic(built, n, m, k):
    # grain 0: every call takes the threaded path when there are threads (several groups of row blocks for
    # N = 300 and 129, the non-zeros cut into ranges for the single-block N = 40 and N = 1)
    w = _weight(m, k, 0.3, n)
    matrix = _layer_matrix(w)
    t_matrix, perm = transposed(matrix)
    x, dy = torch.randn(n, k), torch.randn(n, m)
    before = torch.get_num_threads()
    results = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            runs = [
                (values_grad(dy, x, matrix, grain=0), input_grad(dy, t_matrix, matrix.values, perm, grain=0))
                for _ in range(2)
            ]
            assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])  # bit for bit
            results[threads] = runs[0]
    finally:
        torch.set_num_threads(before)
    _close(results[2][0], results[1][0], n)
    _close(results[2][1], results[1][1], m)
    want_dx, want_dw = _reference(w, x, dy)
    _close(results[2][0], _layer_order(want_dw, w), n)
    _close(results[2][1], want_dx, m)


def test_dense_fallback_without_kernels(monkeypatch):
    m, k, n = 50, 170, 6
    w = _weight(m, k, 0.3, 9)
    matrix = _layer_matrix(w)
    t_matrix, perm = transposed(matrix)
    x, dy = torch.randn(2, n, k), torch.randn(2, n, m)
    want_dx, want_dw = _reference(w, x, dy)
    monkeypatch.setattr(linear_grad, "native_for", lambda *tensors: None)  # as when no kernels are built
    _close(input_grad(dy, t_matrix, matrix.values, perm), want_dx, m)
    _close(values_grad(dy, x, matrix), _layer_order(want_dw, w), 2 * n)


def test_other_dtypes_take_the_dense_path():
    w = _weight(20, 140, 0.3, 4).double()
    matrix = CompressedMatrix.from_dense(w, panel_width(140))
    t_matrix, perm = transposed(matrix)
    x, dy = torch.randn(5, 140, dtype=torch.float64), torch.randn(5, 20, dtype=torch.float64)
    want_dx, want_dw = _reference(w, x, dy)
    dx, dv = input_grad(dy, t_matrix, matrix.values, perm), values_grad(dy, x, matrix)
    assert dx.dtype == dv.dtype == torch.float64
    torch.testing.assert_close(dx, want_dx)
    torch.testing.assert_close(dv, _layer_order(want_dw, w))


def test_matrix_without_panels(built):
    w = _weight(30, 40, 0.3, 5)
    matrix = CompressedMatrix.from_dense(w)  # plain CSR: one panel of every column
    x, dy = torch.randn(11, 40), torch.randn(11, 30)
    _, want_dw = _reference(w, x, dy)
    _close(values_grad(dy, x, matrix), want_dw[w != 0], 11)
    t_matrix, perm = transposed(matrix)
    assert torch.equal(t_matrix.to_dense(), w.t())


def test_kernel_checks_its_inputs(built):
    matrix = _layer_matrix(_weight(8, 20, 0.5, 1))
    x = torch.randn(4, 20)
    with pytest.raises(RuntimeError, match="columns"):
        built.sddmm_linear(torch.randn(4, 9), x, matrix.row_ptr, matrix.cols, matrix.panel, 0)
    with pytest.raises(RuntimeError, match="panels"):
        built.sddmm_linear(
            torch.randn(4, 8), torch.randn(4, 300), matrix.row_ptr, matrix.cols, matrix.panel, 0
        )
    with pytest.raises(RuntimeError, match="span"):
        built.sddmm_linear(torch.randn(4, 8), x, matrix.row_ptr, matrix.cols[:-1], matrix.panel, 0)


@pytest.mark.skipif(not OPERATORS, reason="torch operators need torch >= 2.4")
def test_operator_matches_the_module(built):
    matrix = _layer_matrix(_weight(24, 150, 0.3, 2))
    x, dy = torch.randn(7, 150), torch.randn(7, 24)
    args = (dy, x, matrix.row_ptr, matrix.cols, matrix.panel, 0)
    assert torch.equal(torch.ops.sparsediff.sddmm_linear(*args), built.sddmm_linear(*args))
