"""The conversion policy: which layers of a model run on compressed weights.

Every kind of layer the runtime converts is one entry of :data:`KINDS` (a :class:`LayerKind`: which dense
layers it takes, the density up to which the default rule converts them, how to build the compressed
layer). :func:`to_sparse_inference` finds the candidates through that table, decides by density or by
measurement, and swaps them in; :func:`sparse_layers` recognises the compressed layers through it.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .conv import SparseConv, convertible
from .gru import SparseGRU
from .linear import SparseLinear


@dataclass(frozen=True)
class LayerKind:
    """One kind of layer that the runtime converts.

    Attributes:
        name: the kind's name, the key of :data:`MAX_DENSITY` and of ``to_sparse_inference``'s limits.
        max_density: the default rule's limit (no example inputs): a layer of this kind denser than this
            stays dense.
        accepts: whether a dense module is of this kind and the kernels compute it exactly.
        weights: the names of the module's parameters that sparsity applies to (their masks are named
            ``<layer name>.<parameter name>``).
        convert: the compressed layer of a dense module, given the active entries of its ``weights``.
        layer: the compressed layer's class.
    """

    name: str
    max_density: float
    accepts: Callable[[nn.Module], bool]
    weights: Callable[[nn.Module], list[str]]
    convert: Callable[[nn.Module, dict[str, torch.Tensor]], nn.Module]
    layer: type[nn.Module]


# kind name -> kind, in the order a module is tested against them (the first that accepts it converts it)
KINDS: dict[str, LayerKind] = {}

# The default rule's density limit per kind (``LayerKind.max_density``, filled in by :func:`register`).
MAX_DENSITY: dict[str, float] = {}


def register(kind: LayerKind) -> LayerKind:
    """Add ``kind`` to the table (replacing a kind of the same name): from now on the runtime converts it."""
    KINDS[kind.name] = kind
    MAX_DENSITY[kind.name] = kind.max_density
    return kind


def _is_plain_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


def _is_gru(module: nn.Module) -> bool:
    return type(module) is nn.GRU


def _weight(module: nn.Module) -> list[str]:
    return ["weight"]


def _gru_weights(module: nn.Module) -> list[str]:
    return [n for n, _ in module.named_parameters() if n.startswith("weight_")]


def _linear(module: nn.Module, active: dict[str, torch.Tensor]) -> SparseLinear:
    return SparseLinear(module.weight, module.bias, active["weight"])


def _conv(module: nn.Module, active: dict[str, torch.Tensor]) -> SparseConv:
    return SparseConv(module, active["weight"])


# The table. The default rule's limits: per layer kind, the density up to which the kernels win on the
# layers of sparsediff's denoisers, measured on a 2-core AVX2 machine (benchmarks/sparse_runtime.py).
# Linears of 128+ input features still run 1.3-1.8x faster at 0.4 (2 threads, 16-2048 rows); 3x3
# convolutions break even near 0.35-0.4 and lose at 0.5 (0.74-1.0x); GRUs of hidden size 96 win at 0.5
# but a hidden size of 512 at batch 1 breaks even near 0.2, so they keep the convolutions' 0.3.
for _kind in (  # LayerKind(name, max_density, accepts, weights, convert, layer)
    LayerKind("linear", 0.4, _is_plain_linear, _weight, _linear, SparseLinear),
    LayerKind("conv", 0.3, convertible, _weight, _conv, SparseConv),
    LayerKind("gru", 0.3, _is_gru, _gru_weights, SparseGRU, SparseGRU),
):
    register(_kind)

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
        limit = dict.fromkeys(KINDS, everywhere)
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


def _kind_of(module: nn.Module) -> LayerKind | None:
    return next((kind for kind in KINDS.values() if kind.accepts(module)), None)


def _candidates(
    model: nn.Module, masks: dict[str, torch.Tensor], limit: Mapping[str, float]
) -> dict[str, tuple]:
    """name -> (parent, attribute, dense layer, its sparse version, density) for every layer of a kind in
    :data:`KINDS` whose density is at most ``limit`` of its kind."""
    out = {}
    for name, module in list(model.named_modules()):
        for attr, child in list(module.named_children()):
            kind = _kind_of(child)
            if kind is None:
                continue
            full = f"{name}.{attr}" if name else attr
            active = {
                n: _active(child.get_parameter(n), masks.get(f"{full}.{n}")) for n in kind.weights(child)
            }
            density = _density(active)
            if density <= limit[kind.name]:
                out[full] = (module, attr, child, kind.convert(child, active), density)
    return out


def _density(active: dict[str, torch.Tensor]) -> float:
    """The fraction of active entries over all of a layer's sparse weights."""
    if len(active) == 1:  # one weight: its float32 mean, as the limits were set with
        return float(next(iter(active.values())).float().mean())
    return sum(int(a.sum()) for a in active.values()) / sum(a.numel() for a in active.values())


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
    layers = tuple(kind.layer for kind in KINDS.values())
    return [n for n, m in model.named_modules() if isinstance(m, layers)]


def _active(weight: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Where a weight is active: its mask (when given) and non-zero."""
    nonzero = weight.detach() != 0
    return nonzero if mask is None else nonzero & mask.to(nonzero.device).bool()
