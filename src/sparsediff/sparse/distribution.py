"""Layer-wise densities (uniform, ER, ERK) and whole-number per-layer budgets.

The global sparsity ``S`` is a fraction of all *sparsifiable* weights. A distribution turns it into a
density per layer such that the total number of non-zeros is ``(1 - S) * total``:

- ``uniform``: every layer at density ``1 - S``.
- ``er`` (Erdos-Renyi): density proportional to ``(n_out + n_in) / (n_out * n_in)``; kernel dims ignored.
- ``erk`` (Erdos-Renyi-Kernel): density proportional to ``sum(shape) / prod(shape)``.

For ER and ERK a small layer can come out with density > 1; it is made dense, removed, and the scale
solved again over the remaining layers (largest raw density first), until no layer exceeds 1.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from ..errors import ConfigError

DISTRIBUTIONS = ("uniform", "er", "erk")


def _raw_probability(shape: Sequence[int], distribution: str, power: float) -> float:
    if distribution == "erk":
        p = sum(shape) / math.prod(shape)
    else:  # er: fan-out and fan-in only, whatever the kernel
        n_out, n_in = shape[0], shape[1]
        p = (n_out + n_in) / (n_out * n_in)
    return p**power


def layer_densities(
    shapes: Mapping[str, Sequence[int]],
    sparsity: float,
    distribution: str = "erk",
    erk_power: float = 1.0,
) -> dict[str, float]:
    """Density (fraction of non-zeros) of every layer for a global ``sparsity``.

    Args:
        shapes: layer name -> weight shape, for the sparsifiable weights only.
        sparsity: global target sparsity in [0, 1).
        distribution: ``"uniform"``, ``"er"`` or ``"erk"``.
        erk_power: exponent on the ER/ERK raw densities (1.0 is the published rule; 0 gives uniform).
    """
    check_sparsity(sparsity)
    if distribution not in DISTRIBUTIONS:
        raise ConfigError(f"unknown distribution {distribution!r}; choose one of {', '.join(DISTRIBUTIONS)}")
    if not shapes:
        raise ConfigError("no layers to distribute the sparsity over")
    density = 1.0 - sparsity
    if distribution == "uniform" or sparsity == 0.0:
        return {n: density for n in shapes}

    numel = {n: math.prod(s) for n, s in shapes.items()}
    raw = {n: _raw_probability(s, distribution, erk_power) for n, s in shapes.items()}
    target = density * sum(numel.values())
    dense: set[str] = set()
    while True:
        free = [n for n in shapes if n not in dense]
        budget = target - sum(numel[n] for n in dense)
        divisor = sum(raw[n] * numel[n] for n in free)
        eps = budget / divisor
        worst = max(free, key=lambda n: raw[n])
        if eps * raw[worst] <= 1.0 or len(free) == 1:
            break
        # The largest raw densities go dense first; equal ones together.
        dense.update(n for n in free if raw[n] == raw[worst])
        if len(dense) == len(shapes):
            break
    return {n: (1.0 if n in dense else min(1.0, eps * raw[n])) for n in shapes}


def layer_budgets(
    shapes: Mapping[str, Sequence[int]],
    densities: Mapping[str, float],
    sparsity: float,
) -> dict[str, int]:
    """Whole-number count of non-zeros per layer.

    The counts sum exactly to ``round((1 - sparsity) * total)`` (largest-remainder rounding), every count
    is within one of ``density * numel``, and every layer keeps at least one weight (the only case where
    the sum can exceed the target, by at most one per layer).
    """
    numel = {n: math.prod(s) for n, s in shapes.items()}
    total_target = round((1.0 - sparsity) * sum(numel.values()))
    exact = {n: min(float(numel[n]), densities[n] * numel[n]) for n in shapes}
    budgets = {n: math.floor(v) for n, v in exact.items()}
    missing = total_target - sum(budgets.values())
    if missing > 0:
        order = sorted(
            (n for n in shapes if budgets[n] < numel[n]),
            key=lambda n: (-(exact[n] - budgets[n]), n),
        )
        for n in order[:missing]:
            budgets[n] += 1
    return {n: max(1, b) for n, b in budgets.items()}


def check_sparsity(sparsity: float) -> None:
    if not isinstance(sparsity, (int, float)) or isinstance(sparsity, bool) or not (0.0 <= sparsity < 1.0):
        raise ConfigError(f"sparsity must be in [0, 1), got {sparsity!r}")


def plan_sparsity(
    model,
    sparsity: float,
    distribution: str = "erk",
    include=None,
    exclude=None,
    erk_power: float = 1.0,
) -> dict[str, tuple[tuple[int, ...], int]]:
    """Layer name -> (shape, budget) for ``model`` without building masks (used for inspection)."""
    from .targets import select_targets

    shapes = {n: tuple(p.shape) for n, p in select_targets(model, include, exclude)}
    densities = layer_densities(shapes, sparsity, distribution, erk_power)
    budgets = layer_budgets(shapes, densities, sparsity)
    return {n: (shapes[n], budgets[n]) for n in shapes}
