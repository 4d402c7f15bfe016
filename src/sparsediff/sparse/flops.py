"""Sparse-aware FLOP counting.

Shape-based counters ignore zeros, so a 90 %-sparse model "costs" as much as a dense one. This counter
runs one forward pass under a dispatch mode that sees every matrix multiply and convolution, and charges
each one to the target weight whose storage it reads (a Linear's weight, a conv kernel, a slice of
``in_proj_weight``, a GRU matrix in every time step). Dense cost uses torch's own FLOP formulas
(2 FLOPs per multiply-accumulate); the sparse cost of a weight's products is ``density x dense``.
Products that read no target weight (attention scores ``QK^T`` and ``AV``, untargeted layers) stay dense.
Elementwise work (norms, activations, bias adds) is not counted, as in the papers.

Training FLOPs per step follow the RigL accounting (``f_S`` sparse forward, ``f_D`` dense forward):
dense ``3 f_D``; static and MagRan ``3 f_S``; RigL ``(3 f_S * dT + 2 f_S + f_D) / (dT + 1)`` while
updates happen, ``3 f_S`` after ``end_step``.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, sdpa_flop_count

from .base import Engine
from .methods import REGISTRY
from .targets import unwrap_model

aten = torch.ops.aten


def _sdpa_cpu_flop(query, key, value, *args, out_val=None, **kwargs) -> int:
    return sdpa_flop_count(query.shape, key.shape, value.shape)


# Attention kernels torch's registry does not list (the CPU flash kernel); shapes are (B, H, L, E).
_EXTRA = {}
for _name in (
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_fused_attention_overrideable",
):
    if hasattr(aten, _name):
        _EXTRA[getattr(aten, _name)] = _sdpa_cpu_flop
_FORMULAS = {**flop_registry, **_EXTRA}


def _storage_key(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None


class _AttributingFlopMode(TorchDispatchMode):
    """Counts FLOPs of every op with a formula, charging it to target weights it reads."""

    def __init__(self, owners: Mapping[int, str]):
        super().__init__()
        self.owners = owners
        self.by_owner: dict[str, int] = defaultdict(int)
        self.unattributed = 0
        self.by_op: dict[str, int] = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func._overloadpacket
        if packet not in _FORMULAS:
            # Composite ops (matmul, linear, rnn cells on CPU) decompose into ones with formulas.
            with self:
                decomposed = func.decompose(*args, **kwargs)
            if decomposed is not NotImplemented:
                return decomposed
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        flops = int(_FORMULAS[packet](*args, **kwargs, out_val=out))
        self.by_op[str(packet)] += flops
        owner = None
        for a in args:
            if isinstance(a, torch.Tensor):
                key = _storage_key(a)
                if key is not None and key in self.owners:
                    owner = self.owners[key]
                    break
        if owner is None:
            self.unattributed += flops
        else:
            self.by_owner[owner] += flops
        return out


@dataclass
class LayerFlops:
    name: str
    shape: tuple[int, ...]
    density: float
    nonzero: int
    flops_dense: int
    flops_sparse: int


@dataclass
class FlopReport:
    """Inference FLOPs of one forward pass on the example inputs."""

    layers: list[LayerFlops]
    other_flops: int  # products that touch no sparsified weight (attention matmuls, dense layers)
    by_op: dict[str, int] = field(default_factory=dict)

    @property
    def flops_dense(self) -> int:
        return self.other_flops + sum(layer.flops_dense for layer in self.layers)

    @property
    def flops_sparse(self) -> int:
        return self.other_flops + sum(layer.flops_sparse for layer in self.layers)

    def to_dict(self) -> dict[str, Any]:
        return {
            "flops_dense": self.flops_dense,
            "flops_sparse": self.flops_sparse,
            "other_flops": self.other_flops,
            "layers": [vars(layer) for layer in self.layers],
        }


def _densities_from(sparsity: Any, names: list[str], params: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Accepts an engine, a name->mask mapping, a name->density mapping or None (measured from weights)."""
    if isinstance(sparsity, Engine):  # an N:M engine gives the budgets of the pattern in force
        budgets = sparsity.budgets
        return {n: budgets[n] / params[n].numel() for n in sparsity.names}
    if sparsity is None:
        return {n: float(torch.count_nonzero(params[n].detach())) / params[n].numel() for n in names}
    out = {}
    for n, v in sparsity.items():
        if torch.is_tensor(v) and v.dim() > 0:
            out[n] = float(v.bool().sum()) / v.numel()
        else:
            out[n] = float(v)
    return out


def count_flops(
    model: nn.Module,
    example_inputs: tuple | Mapping[str, Any],
    sparsity: Any = None,
    targets: list[str] | None = None,
) -> FlopReport:
    """Count dense and sparse inference FLOPs of ``model(*example_inputs)``.

    Args:
        model: the model (runs once in eval mode; its training flag is restored).
        example_inputs: positional inputs (tuple) or keyword inputs (mapping) for one forward pass.
        sparsity: an engine (:class:`~sparsediff.sparse.base.Engine`), a mapping ``name -> bool mask`` or
            ``name -> density``, or ``None`` to measure each weight's density from its non-zero entries.
        targets: parameter names to report; by default those of ``sparsity`` or every weight with >= 2 dims.
    """
    model = unwrap_model(model)
    if any(hasattr(m, "compact_weights") for m in model.modules()):
        # compact layers (backend "sparse") compute in native kernels that no FLOP counter sees: count on a
        # dense twin, with the densities of their budgets
        from .runtime.to_compact import to_dense

        if isinstance(sparsity, Engine):
            sparsity = {n: b / math.prod(sparsity._shapes[n]) for n, b in sparsity.budgets.items()}
        model = to_dense(copy.deepcopy(model))
    params = dict(model.named_parameters())
    if targets is None:
        if isinstance(sparsity, Engine):
            targets = list(sparsity.names)
        elif isinstance(sparsity, Mapping):
            targets = list(sparsity.keys())
        else:
            targets = [n for n, p in params.items() if p.dim() >= 2]
    densities = _densities_from(sparsity, targets, params)
    owners = {}
    for n in targets:
        key = _storage_key(params[n])
        if key is not None:
            owners[key] = n
    # An N:M engine puts a masked copy (another storage) in place of the weight while its module runs;
    # it reports the copy so that the products reading it are charged to the layer.
    placed: dict[str, int] = {}

    def on_weight_use(name: str, tensor: torch.Tensor | None) -> None:
        if tensor is None:
            key = placed.pop(name, None)
            if key is not None and owners.get(key) == name:
                del owners[key]
        elif name in densities:
            key = _storage_key(tensor)
            if key is not None:
                placed[name] = key
                owners[key] = name

    tracking = (
        sparsity.track_weight_uses(on_weight_use)
        if isinstance(sparsity, Engine)
        else contextlib.nullcontext()
    )
    was_training = model.training
    model.eval()
    # cuDNN's fused RNN kernels do not decompose; the native path exposes each product. Autograd stays on
    # so that fused inference fast paths (nn.MultiheadAttention's) are not taken; no backward is run.
    ctx = (
        torch.backends.cudnn.flags(enabled=False)
        if torch.backends.cudnn.is_available()
        else contextlib.nullcontext()
    )
    try:
        with ctx, tracking, torch.enable_grad(), _AttributingFlopMode(owners) as mode:
            if isinstance(example_inputs, Mapping):
                model(**example_inputs)
            else:
                model(*example_inputs)
    finally:
        model.train(was_training)
    layers = []
    for n in targets:
        dense = mode.by_owner.get(n, 0)
        d = densities.get(n, 1.0)
        p = params[n]
        layers.append(LayerFlops(n, tuple(p.shape), d, round(d * p.numel()), dense, round(d * dense)))
    return FlopReport(layers=layers, other_flops=mode.unattributed, by_op=dict(mode.by_op))


def training_flops_per_step(
    method: str,
    flops_dense: float,
    flops_sparse: float,
    update_every: int = 100,
) -> float:
    """Training FLOPs of one optimiser step while topology updates happen (RigL accounting).

    ``flops_dense`` / ``flops_sparse`` are forward FLOPs for one step's batch; each method gives its own rule
    (:meth:`~sparsediff.sparse.methods.SparseMethod.training_flops`).
    """
    m = REGISTRY.get(method)
    if m is None or not m.has_engine:
        raise ValueError(f"no training-FLOP rule for method {method!r}")
    return m.training_flops(flops_dense, flops_sparse, update_every)


def training_flops_total(
    method: str,
    flops_dense: float,
    flops_sparse: float,
    total_steps: int,
    update_every: int = 100,
    end_step: int | None = None,
) -> float:
    """Training FLOPs of a whole run: a method that reads dense gradients on update steps (RigL) pays for
    them only until ``end_step``."""
    per_step = training_flops_per_step(method, flops_dense, flops_sparse, update_every)
    if not REGISTRY[method].needs_dense_grads:
        return per_step * total_steps
    end = total_steps if end_step is None else min(end_step, total_steps)
    return per_step * end + 3.0 * flops_sparse * (total_steps - end)


def format_flops(x: float) -> str:
    if x <= 0:
        return "0"
    units = ["", "K", "M", "G", "T", "P"]
    i = min(int(math.log10(x) // 3), len(units) - 1)
    return f"{x / 10 ** (3 * i):.3g}{units[i]}"
