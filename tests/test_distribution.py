"""Layer-wise densities and budgets, checked against an independent computation."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sparsediff.config import load_config
from sparsediff.errors import ConfigError
from sparsediff.models import build_model
from sparsediff.sparse import layer_budgets, layer_densities, select_targets


def _reference_erk(shapes: dict, sparsity: float, kernel: bool = True) -> dict:
    """Solve sum_i min(1, eps * p_i) * n_i = (1 - S) * total for eps by bisection."""
    numel = {n: math.prod(s) for n, s in shapes.items()}
    if kernel:
        raw = {n: sum(s) / math.prod(s) for n, s in shapes.items()}
    else:
        raw = {n: (s[0] + s[1]) / (s[0] * s[1]) for n, s in shapes.items()}
    target = (1 - sparsity) * sum(numel.values())
    lo, hi = 0.0, 1.0 / min(raw.values())
    for _ in range(200):
        mid = (lo + hi) / 2
        if sum(min(1.0, mid * raw[n]) * numel[n] for n in shapes) < target:
            lo = mid
        else:
            hi = mid
    return {n: min(1.0, hi * raw[n]) for n in shapes}


def _unet_shapes(preset: str) -> dict:
    cfg = load_config(preset)
    with torch.device("meta"):
        model = build_model(cfg.model)
    return {n: tuple(p.shape) for n, p in select_targets(model)}


@pytest.mark.parametrize("preset", ["ldm-celebahq", "unet-tiny"])
@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.75, 0.9, 0.99])
def test_erk_matches_independent_solution_on_unet_shapes(preset, sparsity):
    shapes = _unet_shapes(preset)
    ours = layer_densities(shapes, sparsity, "erk")
    ref = _reference_erk(shapes, sparsity)
    for n in shapes:
        assert abs(ours[n] - ref[n]) < 1e-9, n
    total = sum(math.prod(s) for s in shapes.values())
    nnz = sum(ours[n] * math.prod(s) for n, s in shapes.items())
    assert abs(nnz - (1 - sparsity) * total) < 1e-6 * total


def test_er_ignores_kernel_dims_and_small_layers_go_dense():
    shapes = {"conv": (64, 32, 3, 3), "fc": (10, 4096), "tiny": (4, 3, 1, 1)}
    er = layer_densities(shapes, 0.8, "er")
    ref = _reference_erk(shapes, 0.8, kernel=False)
    assert all(abs(er[n] - ref[n]) < 1e-9 for n in shapes)
    erk = layer_densities(shapes, 0.8, "erk")
    assert erk["tiny"] == 1.0  # 12 weights, raw density far above the others


@given(
    shapes=st.lists(
        st.tuples(st.integers(1, 64), st.integers(1, 64), st.sampled_from([1, 3])), min_size=1, max_size=8
    ),
    sparsity=st.floats(0.0, 0.99),
    distribution=st.sampled_from(["uniform", "er", "erk"]),
)
def test_budgets_are_whole_and_sum_to_target(shapes, sparsity, distribution):
    named = {f"l{i}": (o, i_, k, k) for i, (o, i_, k) in enumerate(shapes)}
    dens = layer_densities(named, sparsity, distribution)
    budgets = layer_budgets(named, dens, sparsity)
    total = sum(math.prod(s) for s in named.values())
    target = round((1 - sparsity) * total)
    for n, s in named.items():
        assert isinstance(budgets[n], int)
        assert 1 <= budgets[n] <= math.prod(s)
        assert abs(budgets[n] - dens[n] * math.prod(s)) <= 1.0 + 1e-9
    # exact, except where the one-weight minimum lifts a layer (at most one per layer)
    assert target <= sum(budgets.values()) <= target + len(named)
    if all(dens[n] * math.prod(s) >= 1 for n, s in named.items()):
        assert sum(budgets.values()) == target


def test_uniform_and_zero_sparsity():
    shapes = {"a": (10, 10), "b": (5, 7, 3, 3)}
    assert layer_densities(shapes, 0.3, "uniform") == {"a": 0.7, "b": 0.7}
    assert layer_densities(shapes, 0.0, "erk") == {"a": 1.0, "b": 1.0}
    with pytest.raises(ConfigError, match="sparsity must be in"):
        layer_densities(shapes, 1.0, "erk")
