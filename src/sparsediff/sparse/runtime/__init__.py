"""Inference on compressed sparse weights: the layers of a trained sparse model run through native kernels.

``to_sparse_inference(model, masks)`` returns a copy of ``model`` with the same forward semantics in which
every sparsified layer sparse enough to gain runs on compressed weights through the native kernels of
``sparse/native/``: ``nn.Linear`` -> :class:`SparseLinear` (SpMM), ``nn.Conv1d``/``nn.Conv2d`` with stride
1 and groups 1 -> :class:`SparseConv` (direct sparse convolution), ``nn.GRU`` -> :class:`SparseGRU` (one
SpMM for the input projections, the recurrence in native code). Other layers, and layers too dense to
gain, stay as they are. Works on any module built from these layers (diffusers models included).
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..native import kernels
from .conv import SparseConv, convertible
from .gru import SparseGRU
from .linear import SparseLinear

# The default rule (no example inputs): per layer kind, the density up to which the kernels win on the
# layers of sparsediff's denoisers, measured on a 2-core AVX2 machine (benchmarks/sparse_runtime.py).
# Linears of 128+ input features still run 1.3-1.8x faster at 0.4 (2 threads, 16-2048 rows); 3x3
# convolutions break even near 0.35-0.4 and lose at 0.5 (0.74-1.0x); GRUs of hidden size 96 win at 0.5
# but a hidden size of 512 at batch 1 breaks even near 0.2, so they keep the convolutions' 0.3.
MAX_DENSITY = {"linear": 0.4, "conv": 0.3, "gru": 0.3}

# With measured choice, a layer goes sparse only when its sparse time is below this fraction of its dense
# time: a margin for timing noise, so that a layer whose gain is within the noise (and may be a loss when
# it matters) stays dense.
MEASURED_MARGIN = 0.9

# The measured choice alternates dense and sparse calls of a layer at least MEASURE_ROUNDS[0] and at most
# MEASURE_ROUNDS[1] times, stopping once MEASURE_SECONDS have passed: a layer of a millisecond or more
# takes three rounds, a layer of microseconds enough rounds for its median to settle. Eight conversions
# of ldm-fmnist at 90 %: with three rounds always, 16 layers at batch 1 came out sparse in some and dense
# in others; with these settings none did (at batch 64, 22 -> 13), for 0.07 s more setup at batch 64.
MEASURE_ROUNDS = (3, 25)
MEASURE_SECONDS = 0.003

# How a model can run: "dense" (masked dense weights, torch's kernels) or "sparse" (this runtime).
BACKENDS = ("dense", "sparse")

__all__ = [
    "BACKENDS",
    "MAX_DENSITY",
    "MEASURED_MARGIN",
    "MEASURE_ROUNDS",
    "MEASURE_SECONDS",
    "SparseConv",
    "SparseGRU",
    "SparseLinear",
    "kernels",
    "sparse_layers",
    "to_sparse_inference",
]


def _is_plain_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


@torch.no_grad()
def to_sparse_inference(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor] | None = None,
    *,
    example_inputs: tuple | None = None,
    max_density: float | None = None,
    inplace: bool = False,
    report: dict[str, dict[str, Any]] | None = None,
) -> nn.Module:
    """A copy of ``model`` whose sparse layers compute on compressed weights through native kernels.

    Each layer chooses sparse or dense by what is faster for its shape and density. With
    ``example_inputs`` (the inputs of one forward pass, at the batch size that will be used) the choice is
    measured: one forward pass runs, and at each candidate layer its input is fed to the dense and the
    sparse layer alternately (median of 3-25 calls each, more for fast layers); the sparse one is kept
    only where it was faster by a margin for timing noise (``MEASURED_MARGIN``: below 0.9 of the dense
    time).
    Without them, a layer is converted when its density is at most ``max_density`` (by default
    ``MAX_DENSITY`` of its kind, measured on this project's denoisers: see ``benchmarks/sparse_runtime.py``).

    Args:
        model: any module; it is not changed unless ``inplace``.
        masks: parameter name -> bool mask (an engine's ``masks``); without it a weight's zeros define it.
        example_inputs: positional inputs of ``model`` for the measured choice.
        max_density: layers denser than this stay dense, whatever their kind (with ``example_inputs``:
            candidates up to this density are measured; 0.8 by default).
        inplace: convert ``model`` itself instead of a copy.
        report: if given, filled with layer name -> ``{"density", "sparse", "dense_ms", "sparse_ms"}``.
    """
    out = model if inplace else copy.deepcopy(model)
    if max_density is not None or example_inputs is not None:
        everywhere = max_density if max_density is not None else 0.8
        limit = dict.fromkeys(MAX_DENSITY, everywhere)
    else:
        limit = MAX_DENSITY
    candidates = _candidates(out, dict(masks or {}), limit)
    timings = _measure(out, candidates, example_inputs) if example_inputs is not None else {}
    for name, (parent, attr, _, sparse, density) in candidates.items():
        t = timings.get(name)
        use = t is None or t[1] < MEASURED_MARGIN * t[0]  # measured: only where clearly faster
        if example_inputs is not None and t is None:
            use = False  # not reached by the example forward pass: nothing says it would gain
        if use:
            setattr(parent, attr, sparse)
        if report is not None:
            report[name] = {"density": density, "sparse": use}
            if t is not None:
                report[name].update(dense_ms=t[0] * 1e3, sparse_ms=t[1] * 1e3)
    return out


def _candidates(
    model: nn.Module, masks: dict[str, torch.Tensor], limit: Mapping[str, float]
) -> dict[str, tuple]:
    """name -> (parent, attribute, dense layer, its sparse version, density) for every convertible layer
    whose density is at most ``limit`` of its kind ("linear", "conv" or "gru")."""
    out = {}
    for name, module in list(model.named_modules()):
        for attr, child in list(module.named_children()):
            full = f"{name}.{attr}" if name else attr
            if type(child) is nn.GRU:
                weights = {n: p for n, p in child.named_parameters() if n.startswith("weight_")}
                layer_masks = {n: _active(p, masks.get(f"{full}.{n}")) for n, p in weights.items()}
                density = sum(int(m.sum()) for m in layer_masks.values()) / sum(
                    p.numel() for p in weights.values()
                )
                if density <= limit["gru"]:
                    out[full] = (module, attr, child, SparseGRU(child, layer_masks), density)
            elif _is_plain_linear(child) or convertible(child):
                active = _active(child.weight, masks.get(f"{full}.weight"))
                density = float(active.float().mean())
                linear = isinstance(child, nn.Linear)
                if density <= limit["linear" if linear else "conv"]:
                    sparse = (
                        SparseLinear(child.weight, child.bias, active)
                        if linear
                        else SparseConv(child, active)
                    )
                    out[full] = (module, attr, child, sparse, density)
    return out


def _measure(model: nn.Module, candidates: dict[str, tuple], inputs: tuple) -> dict[str, tuple[float, float]]:
    """Run ``model(*inputs)`` once; at each candidate layer time the dense and the sparse version on the
    input it receives (alternately, after a warm-up; the median of ``MEASURE_ROUNDS`` calls each). Returns
    name -> (dense seconds, sparse seconds)."""
    timings: dict[str, tuple[float, float]] = {}

    def hook(name: str, dense: nn.Module, sparse: nn.Module):
        def measure(module, args, kwargs, output):
            if name in timings:  # a layer called several times in one pass: its first call decides
                return
            calls = [lambda: dense.forward(*args, **kwargs), lambda: sparse.forward(*args, **kwargs)]
            for call in calls:  # warm-up: first-call allocations, the kernel build
                call()
            samples: list[list[float]] = [[], []]
            start = time.perf_counter()
            for rounds in range(1, MEASURE_ROUNDS[1] + 1):
                for i, call in enumerate(calls):
                    t0 = time.perf_counter()
                    call()
                    samples[i].append(time.perf_counter() - t0)
                if rounds >= MEASURE_ROUNDS[0] and time.perf_counter() - start >= MEASURE_SECONDS:
                    break
            timings[name] = (statistics.median(samples[0]), statistics.median(samples[1]))

        return measure

    handles = [
        dense.register_forward_hook(hook(name, dense, sparse), with_kwargs=True)
        for name, (_, _, dense, sparse, _) in candidates.items()
    ]
    try:
        model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return timings


def sparse_layers(model: nn.Module) -> list[str]:
    """Names of the modules of ``model`` that compute on compressed weights."""
    return [n for n, m in model.named_modules() if isinstance(m, (SparseLinear, SparseConv, SparseGRU))]


def _active(weight: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Where a weight is active: its mask (when given) and non-zero."""
    nonzero = weight.detach() != 0
    return nonzero if mask is None else nonzero & mask.to(nonzero.device).bool()
