"""2:4-sparse Linear layers converted to PyTorch's semi-structured sparse format (inference on GPUs).

``to_semi_structured(model)`` swaps the weight of every ``nn.Linear`` that is exactly 2:4 along its input
dimension for ``torch.sparse.to_sparse_semi_structured(weight)``, so ``F.linear`` runs on the sparse
tensor cores (cuSPARSELt, or CUTLASS when cuSPARSELt is missing or forced). Everything else stays dense:
convolutions (the kernels cover 2-D matrix products only), layers whose shape the kernel does not take,
and weights that are not 2:4. The result is an inference-only model in float16 or bfloat16.

Measured speed-ups on the 2:4 sparse tensor cores are modest: 1.1-1.3x on large linears, about 1.0x or
slower on small ones, so measure before claiming one. The N:M checks themselves (``check_nm``,
``nm_violations``) are in ``nm.py``; the export of a whole run is ``sparsediff.export.semi_structured``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .base import Engine
from .masks import mask_mismatch
from .nm import has_nm_hooks, nm_violating_groups
from .nm_engine import NMSparseEngine
from .targets import unwrap_model

EXPORT_DTYPES = (torch.float16, torch.bfloat16)


@dataclass
class ExportLayer:
    name: str  # parameter name
    shape: tuple[int, ...]
    converted: bool
    reason: str


@dataclass
class SemiStructuredReport:
    """What :func:`to_semi_structured` converted and what it kept dense, and why."""

    backend: str  # "cusparselt" or "cutlass"
    dtype: str
    layers: list[ExportLayer] = field(default_factory=list)

    @property
    def converted(self) -> list[str]:
        return [layer.name for layer in self.layers if layer.converted]

    @property
    def kept(self) -> dict[str, str]:
        return {layer.name: layer.reason for layer in self.layers if not layer.converted}

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "dtype": self.dtype,
            "converted": self.converted,
            "kept": self.kept,
            "layers": [asdict(layer) for layer in self.layers],
        }

    def __str__(self) -> str:
        lines = [
            f"semi-structured 2:4 export ({self.backend}, {self.dtype}): {len(self.converted)} converted"
        ]
        for layer in self.layers:
            status = "2:4 sparse" if layer.converted else "dense"
            lines.append(
                f"  {layer.name:<40} {'x'.join(map(str, layer.shape)):<14} {status:<10} {layer.reason}"
            )
        return "\n".join(lines)


def _backend() -> tuple[type, str]:
    """The subclass ``to_sparse_semi_structured`` would build here, and its name."""
    sst = torch.sparse.SparseSemiStructuredTensor
    if getattr(sst, "_FORCE_CUTLASS", False) or not torch.backends.cusparselt.is_available():
        return torch.sparse.SparseSemiStructuredTensorCUTLASS, "cutlass"
    return torch.sparse.SparseSemiStructuredTensorCUSPARSELT, "cusparselt"


# Minimum (rows, cols) of the sparse operand, and the multiple both must be, per backend and dtype; read
# from torch when it has them (torch 2.14: cuSPARSELt fp16/bf16 (16, 16), CUTLASS fp16/bf16 (32, 64)).
_FALLBACK_MIN = {"cusparselt": (16, 16), "cutlass": (32, 64)}


def _min_shape(cls: type, backend: str, dtype: torch.dtype) -> tuple[int, int]:
    constraints = getattr(cls, "_DTYPE_SHAPE_CONSTRAINTS", {}).get(dtype)
    if constraints is None:
        return _FALLBACK_MIN[backend]
    return constraints.sparse_min_rows, constraints.sparse_min_cols


def _check_dtype(dtype: Any) -> None:
    if dtype not in EXPORT_DTYPES:
        raise ConfigError(
            f"semi-structured export needs dtype torch.float16 or torch.bfloat16, got {dtype!r}"
        )


def _resolve_masks(masks: Any, model: nn.Module) -> dict[str, torch.Tensor]:
    """name -> bool mask from a mapping or an engine, checked against the model's parameters."""
    if masks is None:
        return {}
    if isinstance(masks, Mapping):
        out = dict(masks)
    elif isinstance(masks, Engine):
        out = dict(masks.masks)
    else:
        raise ConfigError(
            f"masks must be a mapping name -> bool mask or an engine, got {type(masks).__name__}"
        )
    problem = mask_mismatch(out, dict(model.named_parameters()))
    if problem:
        raise ConfigError(f"masks do not fit {type(model).__name__}: {problem}")
    return out


def plan_semi_structured(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor] | Any | None = None,
    dtype: torch.dtype = torch.float16,
) -> SemiStructuredReport:
    """Decide, without changing anything, which weights :func:`to_semi_structured` converts and why the
    others stay dense. Runs on the CPU.

    Args:
        model: the model.
        masks: name -> bool mask applied to the weights before the check, or an engine (its ``masks``).
        dtype: export dtype (``torch.float16`` or ``torch.bfloat16``); the kernel's shape limits depend on it.
    """
    _check_dtype(dtype)
    model = unwrap_model(model)
    mask_map = _resolve_masks(masks, model)
    cls, backend = _backend()
    min_rows, min_cols = _min_shape(cls, backend, dtype)
    report = SemiStructuredReport(backend=backend, dtype=str(dtype).replace("torch.", ""))
    mha_children = {
        id(child)
        for mod in model.modules()
        if isinstance(mod, nn.MultiheadAttention)
        for child in mod.children()
    }
    for mod_name, mod in model.named_modules():
        for attr, p in mod._parameters.items():
            if p is None or p.dim() < 2:
                continue
            name = f"{mod_name}.{attr}" if mod_name else attr
            shape = tuple(p.shape)

            def keep(reason: str, name: str = name, shape: tuple[int, ...] = shape) -> None:
                report.layers.append(ExportLayer(name, shape, False, reason))

            if isinstance(mod, nn.modules.conv._ConvNd):
                keep("convolution: semi-structured kernels cover nn.Linear (2-D matrix products) only")
                continue
            if not isinstance(mod, nn.Linear) or attr != "weight":
                keep(f"{type(mod).__name__}.{attr}: semi-structured kernels cover nn.Linear weights only")
                continue
            if id(mod) in mha_children:
                keep("inside nn.MultiheadAttention, whose fused kernels read the weight directly")
                continue
            out_f, in_f = shape
            if in_f % 4:
                keep(f"input size {in_f} is not a multiple of 4: cannot be 2:4")
                continue
            w = p.detach()
            if name in mask_map:
                w = w.masked_fill(~mask_map[name].to(device=w.device, dtype=torch.bool), 0)
            # The dtype cast can only turn small values into zeros, so the fp32 check is the strict one.
            bad = nm_violating_groups(w, 2, 4, 1)
            if bad:
                keep(f"not 2:4: {bad} of {out_f * in_f // 4} groups of 4 have more than 2 non-zeros")
                continue
            if out_f < min_rows or out_f % min_rows or in_f < min_cols or in_f % min_cols:
                keep(
                    f"shape ({out_f}, {in_f}): the {backend} kernel for {report.dtype} needs out and in "
                    f"features to be positive multiples of {min_rows} and {min_cols}"
                )
                continue
            report.layers.append(ExportLayer(name, shape, True, "2:4"))
    return report


def to_semi_structured(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor] | Any | None = None,
    dtype: torch.dtype = torch.float16,
) -> nn.Module:
    """Convert every 2:4 ``nn.Linear`` weight of ``model`` to a semi-structured sparse tensor, in place.

    The model is moved to the current CUDA device (if it is on the CPU) and cast to ``dtype``; masks, when
    given, are multiplied into their weights first (every masked layer, conv included, so the exported
    model computes what the masked model computes). Converted weights become
    ``nn.Parameter(..., requires_grad=False)``: the model is for inference, with inputs in ``dtype``.
    The :class:`SemiStructuredReport` is returned as ``model.semi_structured_report``.

    Args:
        model: the model (DDP / ``torch.compile`` wrappers are looked through).
        masks: name -> bool mask, or an engine. An :class:`NMSparseEngine` is folded into the weights and
            removed (its hooks would otherwise mask the compressed weight on every call).
        dtype: ``torch.float16`` (default) or ``torch.bfloat16``.

    Raises:
        ConfigError: dtype not fp16/bf16, no 2:4 ``nn.Linear`` in the model, no CUDA GPU (or one older than
            Ampere), or the model still carries an N:M engine's hooks that were not passed as ``masks``.
    """
    _check_dtype(dtype)
    model = unwrap_model(model)
    engine = masks if isinstance(masks, NMSparseEngine) else None
    owned = engine.hooked_modules() if engine is not None else set()
    stray = [name for name, mod in model.named_modules() if has_nm_hooks(mod) and mod not in owned]
    if stray:
        raise ConfigError(
            f"layer {stray[0] or type(model).__name__!r} still carries an N:M engine's hooks: pass the engine "
            "as masks, or call engine.fold() and engine.remove() first (remove_nm_hooks(model) for a copy)"
        )
    report = plan_semi_structured(model, masks, dtype)
    if not report.converted:
        reasons = "; ".join(f"{n}: {r}" for n, r in list(report.kept.items())[:4])
        raise ConfigError(
            f"{type(model).__name__} has no nn.Linear with a 2:4 weight the semi-structured kernel takes "
            f"({reasons or 'no weights with >= 2 dims'})"
        )
    if not torch.cuda.is_available():
        raise ConfigError("semi-structured export needs a CUDA GPU; none is available here")
    device = next(
        (p.device for p in model.parameters() if p.is_cuda), torch.device("cuda", torch.cuda.current_device())
    )
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        raise ConfigError(
            f"semi-structured export needs a GPU with 2:4 sparse tensor cores (compute capability >= 8.0, "
            f"Ampere or newer); {torch.cuda.get_device_name(device)} has {major}.{minor}"
        )

    # Only now change the model: every check that can fail has passed.
    mask_map = _resolve_masks(masks, model)
    if engine is not None:
        engine.fold()
        engine.remove()
    else:
        _fold(model, mask_map)
    model.to(device=device, dtype=dtype)
    cls, backend = _backend()
    for name in report.converted:
        mod_name, _, attr = name.rpartition(".")
        mod = model.get_submodule(mod_name)
        weight = getattr(mod, attr).detach().contiguous()
        if backend == "cutlass" and not getattr(
            torch.sparse.SparseSemiStructuredTensor, "_FORCE_CUTLASS", False
        ):
            sparse = cls.from_dense(weight)  # cuSPARSELt missing: to_sparse_semi_structured would pick it
        else:
            sparse = torch.sparse.to_sparse_semi_structured(weight)
        setattr(mod, attr, nn.Parameter(sparse, requires_grad=False))
        mod.register_forward_pre_hook(_semi_structured_contiguous_input)
    model.semi_structured_report = report
    return model


def _semi_structured_contiguous_input(module: nn.Module, args: tuple) -> tuple | None:
    # torch's semi-structured F.linear (``semi_sparse_linear``) flattens the input with ``.view(-1, k)``,
    # which fails on a non-contiguous input, such as diffusers' attention projections read after a
    # transpose; ``.contiguous()`` is free for the usual contiguous input.
    if args and isinstance(args[0], torch.Tensor) and not args[0].is_contiguous():
        return (args[0].contiguous(), *args[1:])
    return None


@torch.no_grad()
def _fold(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        p = params[name]
        p.masked_fill_(~mask.to(device=p.device, dtype=torch.bool), 0)


__all__ = [
    "EXPORT_DTYPES",
    "ExportLayer",
    "SemiStructuredReport",
    "plan_semi_structured",
    "to_semi_structured",
]
