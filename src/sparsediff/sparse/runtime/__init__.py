"""Inference on compressed sparse weights: the layers of a trained sparse model run through native kernels.

``to_sparse_inference(model, masks)`` returns a copy of ``model`` with the same forward semantics in which
every sparsified layer sparse enough to gain runs on compressed weights through the native kernels of
``kernels.cpp``: ``nn.Linear`` -> :class:`SparseLinear` (SpMM), ``nn.Conv1d``/``nn.Conv2d`` with stride 1
and groups 1 -> :class:`SparseConv` (direct sparse convolution), ``nn.GRU`` -> :class:`SparseGRU` (one SpMM
for the input projections, the recurrence in native code). Other layers, and layers too dense to
gain, stay as they are. Works on any module built from these layers (diffusers models included).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn

from .conv import SparseConv, convertible
from .gru import SparseGRU
from .linear import SparseLinear
from .native import kernels

# Measured on a 2-core AVX2 machine (benchmarks/sparse_runtime.py): the kernel wins up to about this
# density on the linears of sparsediff's denoisers and loses above it, so denser layers stay dense.
MAX_DENSITY = 0.3

# How a model can run: "dense" (masked dense weights, torch's kernels) or "sparse" (this runtime).
BACKENDS = ("dense", "sparse")

__all__ = [
    "BACKENDS",
    "MAX_DENSITY",
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
    max_density: float = MAX_DENSITY,
    inplace: bool = False,
) -> nn.Module:
    """A copy of ``model`` whose sparse ``nn.Linear`` layers compute with compressed weights.

    Args:
        model: any module; it is not changed unless ``inplace``.
        masks: parameter name -> bool mask (an engine's ``masks``); without it a weight's zeros define it.
        max_density: a layer whose weight keeps more than this fraction of entries stays dense (it would
            run slower sparse).
        inplace: convert ``model`` itself instead of a copy.
    """
    out = model if inplace else copy.deepcopy(model)
    masks = dict(masks or {})
    for name, module in list(out.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is nn.GRU:
                weights = {n: p for n, p in child.named_parameters() if n.startswith("weight_")}
                layer_masks = {n: _active(p, masks.get(f"{full}.{n}")) for n, p in weights.items()}
                total = sum(p.numel() for p in weights.values())
                if sum(int(m.sum()) for m in layer_masks.values()) <= max_density * total:
                    setattr(module, child_name, SparseGRU(child, layer_masks))
                continue
            if not (_is_plain_linear(child) or convertible(child)):
                continue
            active = _active(child.weight, masks.get(f"{full}.weight"))
            if float(active.float().mean()) > max_density:
                continue
            if isinstance(child, nn.Linear):
                setattr(module, child_name, SparseLinear(child.weight, child.bias, active))
            else:
                setattr(module, child_name, SparseConv(child, active))
    return out


def sparse_layers(model: nn.Module) -> list[str]:
    """Names of the modules of ``model`` that compute on compressed weights."""
    return [n for n, m in model.named_modules() if isinstance(m, (SparseLinear, SparseConv, SparseGRU))]


def _active(weight: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Where a weight is active: its mask (when given) and non-zero."""
    nonzero = weight.detach() != 0
    return nonzero if mask is None else nonzero & mask.to(nonzero.device).bool()
