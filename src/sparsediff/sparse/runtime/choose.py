"""Sparse or dense kernels for each compact layer in training: by a density rule, or measured.

A compact layer trains in one of two modes: ``"sparse"`` (the native kernels: forward, input gradient and
values gradient on the non-zeros) or ``"dense"`` (the values scattered into a dense weight for torch's
kernels, the gradient gathered back). Which is faster depends on the layer's shape, density and batch,
as for inference. The engine gives each layer a policy (``sparsify(..., kernels=...)``):

- ``"auto"`` (the default): the density rule. A layer goes sparse when its density is at most
  :data:`TRAIN_MAX_DENSITY` of its kind. Deterministic: the same model and settings always choose alike.
- ``"measure"``: at its first training call, the layer runs a forward and backward in each mode on its
  own input, alternately (:data:`MEASURE_ROUNDS`), and keeps the sparse mode only where it was faster
  by :data:`MEASURED_MARGIN`. The choice is recorded in the engine's state, so a resumed run computes
  with the same kernels (bit for bit); two fresh runs may choose differently where the two are close.
- ``"sparse"`` / ``"dense"``: every layer so.

Without native kernels (no compiler), or for inputs they do not take (CUDA, other dtypes), a layer is
dense whatever the policy.
"""

from __future__ import annotations

import statistics
import time
import warnings
from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from ..native import kernels
from ..spec import POLICIES

FIXED = POLICIES[2:]  # "sparse", "dense": every layer so
MODES = ("dense", "sparse")  # how a compact layer computes (its kernel_mode)

# The density rule's limit per layer kind: up to this density a compact layer's sparse forward + backward
# beat its dense mode (the values scattered for torch's kernels), measured on a 2-core AVX2 machine
# (2026-12-02, 2 threads, speed-ups at density 0.1 / 0.3 / 0.5): linears 192 -> 576 at 512 rows 3.3x /
# 2.3x / 1.7x, 384 -> 1536 at 2048 rows 2.8x / 2.0x / 1.3x; 3x3 convolutions of 64 channels on 8x8 images
# (batch 32) 2.1x / 1.0x / 0.7x, of 224 channels on 32x32 (batch 2) 2.8x / 1.2x / 0.8x; a GRU of 96 at
# batch 32 over 100 steps 3.4x / 3.0x / 2.7x (torch's dense GRU pays its per-step overhead).
TRAIN_MAX_DENSITY = {"linear": 0.5, "conv": 0.3, "gru": 0.5, "scattered": 0.0}

# With measured choice, sparse only where its time is below this fraction of the dense time.
MEASURED_MARGIN = 0.9
MEASURE_ROUNDS = (3, 15)  # at least / at most, alternating, stopping once MEASURE_SECONDS have passed
MEASURE_SECONDS = 0.02


_told_dense: set[str] = set()  # the reasons already warned of, once per process each


def _native_takes(x: torch.Tensor) -> bool:
    if kernels() is None:  # the build has already warned, once
        return False
    if x.dtype is torch.float32 and x.is_cpu:
        return True
    reason = f"{x.device.type} {str(x.dtype).removeprefix('torch.')}"
    if reason not in _told_dense:
        _told_dense.add(reason)
        warnings.warn(
            f"sparsediff: the native sparse kernels take float32 CPU tensors; compact layers on {reason} "
            "inputs compute in dense mode (correct, and holding only the non-zeros, but not faster)",
            stacklevel=3,
        )
    return False


def density(layer: nn.Module) -> float:
    weights = layer.compact_weights.values()
    nnz = sum(cw.values(layer).numel() for cw in weights)
    return nnz / max(1, sum(cw.numel for cw in weights))


def choose_mode(
    layer: nn.Module, x: Any, policy: str | None = None, probe: torch.Tensor | None = None
) -> str:
    """Set ``layer.kernel_mode`` for input ``x`` (the first call's, as the layer takes it: a tensor, a
    packed sequence) by ``policy`` (default: the layer's own ``policy`` attribute, else ``"auto"``); returns
    it. ``probe``: the tensor whose dtype and device say whether the kernels take the input (default
    ``x``). Records timings in ``layer.choice``."""
    policy = policy or getattr(layer, "policy", "auto")
    if layer.kind == "scattered" or not _native_takes(x if probe is None else probe):
        layer.kernel_mode = "dense"
    elif policy in FIXED:
        layer.kernel_mode = policy
    elif policy == "measure":
        dense_s, sparse_s = _measure(layer, x)
        layer.kernel_mode = "sparse" if sparse_s < MEASURED_MARGIN * dense_s else "dense"
        layer.choice = {"dense_ms": dense_s * 1e3, "sparse_ms": sparse_s * 1e3}
    else:
        layer.kernel_mode = "sparse" if density(layer) <= TRAIN_MAX_DENSITY.get(layer.kind, 0.0) else "dense"
    if layer.kernel_mode == "sparse":
        for cw in layer.compact_weights.values():
            cw.drop_flat(layer)
    return layer.kernel_mode


def _outputs(out: Any) -> list[torch.Tensor]:
    if torch.is_tensor(out):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _outputs(o)]
    data = getattr(out, "data", None)  # a PackedSequence
    return [data] if torch.is_tensor(data) else []


def trial(layer: nn.Module, x: Any, mode: str) -> float:
    """Seconds of one forward and backward of ``layer`` in ``mode`` on ``x`` (on copies of its
    parameters: nothing of the layer's training state is touched, no RigL capture happens)."""
    saved_mode, saved_capture = layer.kernel_mode, layer.capture
    saved = dict(layer._parameters)
    layer.kernel_mode, layer.capture = mode, None
    try:
        for n, p in saved.items():
            if p is not None:
                layer._parameters[n] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
        with torch.enable_grad():
            t0 = time.perf_counter()
            outs = _outputs(layer(x))
            loss = sum(o.float().sum() for o in outs if o.requires_grad)
            if torch.is_tensor(loss):
                loss.backward()
            return time.perf_counter() - t0
    finally:
        layer._parameters.update(saved)
        layer.kernel_mode, layer.capture = saved_mode, saved_capture


def _detached(x: Any) -> Any:
    """``x`` cut from the autograd graph it belongs to (a trial's backward must stop at the layer)."""
    # a copy that asks for its gradient when the real input does: the trial's backward then computes the
    # input gradient as the real backward will
    if torch.is_tensor(x):
        return x.detach().requires_grad_(x.requires_grad)
    if isinstance(x, PackedSequence):
        return x._replace(data=x.data.detach().requires_grad_(x.data.requires_grad))
    return x


def _measure(layer: nn.Module, x: Any) -> tuple[float, float]:
    x = _detached(x)
    for mode in MODES:  # warm-up: first-call allocations, derived structures
        trial(layer, x, mode)
    samples: dict[str, list[float]] = {mode: [] for mode in MODES}
    start = time.perf_counter()
    for rounds in range(1, MEASURE_ROUNDS[1] + 1):
        for mode in MODES:
            samples[mode].append(trial(layer, x, mode))
        if rounds >= MEASURE_ROUNDS[0] and time.perf_counter() - start >= MEASURE_SECONDS:
            break
    return statistics.median(samples["dense"]), statistics.median(samples["sparse"])
