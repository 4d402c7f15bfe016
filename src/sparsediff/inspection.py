"""Per-layer density, non-zeros, FLOPs and bytes on disk of a preset's denoiser (``sparsediff inspect``).

Bytes on disk: ``bytes_dense`` is the float32 state dict as a plain safetensors file; ``bytes_sparse`` the
file ``sparsediff export --format sparse`` would write for the denoiser at this sparsity (float32, masks
and config included), computed by writing it in memory: the masks are those a run starts with (the
engine's seeded initial masks of the planned budgets), the weights the model's random initial ones.
Everything but the deflated exponents is exact for any weights of that sparsity; trained weights'
exponents deflate a little differently (a few per cent of the file).
"""

from __future__ import annotations

from typing import Any

import torch

from .checkpoint import model_tensors
from .config import load_config
from .export.common import format_bytes
from .export.sparse_file import sparse_export_payload
from .models import build_model
from .sparse import count_flops, plan_sparsity, sparsify
from .sparse.codec import serialized_nbytes
from .sparse.flops import format_flops


@torch.no_grad()
def _bytes_on_disk(cfg, model: torch.nn.Module, sparsity: float, distribution: str, include, exclude) -> dict:
    """Bytes of the dense float32 state dict and of a sparse float32 export at ``sparsity``."""
    from safetensors.torch import save

    dense = len(save({k: v.contiguous() for k, v in model_tensors(model).items()}))
    masks: dict[str, torch.Tensor] = {}
    if sparsity > 0:  # a dense run exports no masks
        engine = sparsify(
            model,
            None,
            cfg.sparse,
            method="static",
            sparsity=sparsity,
            distribution=distribution,
            include=include,
            exclude=exclude,
        )
        masks = {n: m.clone() for n, m in engine.masks.items()}
        engine.remove()
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        params[name].masked_fill_(~mask, 0.0)  # as an export stores them (+0.0 outside the masks)
    info = {"format": "inspect", "sparsity": sparsity, "masked_layers": len(masks)}
    sparse = serialized_nbytes(**sparse_export_payload(cfg, model, masks, info))
    return {"bytes_dense": dense, "bytes_sparse": sparse}


def inspect_preset(
    preset: str,
    sparsity: float = 0.0,
    distribution: str = "erk",
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Build the preset's denoiser (random weights) and report its sparse budget and FLOPs."""
    cfg = load_config(preset, overrides)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    plan = plan_sparsity(
        model,
        sparsity,
        distribution,
        include or cfg.sparse.include or None,
        exclude or cfg.sparse.exclude or None,
    )
    densities = {n: budget / torch.Size(shape).numel() for n, (shape, budget) in plan.items()}
    flops = count_flops(model, model.example_inputs(1), densities)
    on_disk = _bytes_on_disk(
        cfg,
        model,
        sparsity,
        distribution,
        include or cfg.sparse.include or None,
        exclude or cfg.sparse.exclude or None,
    )
    by_name = {layer.name: layer for layer in flops.layers}
    layers = []
    for name, (shape, budget) in plan.items():
        numel = torch.Size(shape).numel()
        layers.append(
            {
                "name": name,
                "shape": list(shape),
                "numel": numel,
                "nonzero": budget,
                "density": budget / numel,
                "flops_dense": by_name[name].flops_dense,
                "flops_sparse": by_name[name].flops_sparse,
            }
        )
    params_total = sum(p.numel() for p in model.parameters())
    target_total = sum(layer["numel"] for layer in layers)
    target_nonzero = sum(layer["nonzero"] for layer in layers)
    params_nonzero = params_total - target_total + target_nonzero
    return {
        "preset": cfg.name,
        "model_kind": cfg.model.kind,
        "sparsity": sparsity,
        "distribution": distribution,
        "input_shape": [list(x.shape) for x in model.example_inputs(1)],
        "layers": layers,
        "params_total": params_total,
        "params_nonzero": params_nonzero,
        "density": params_nonzero / params_total,
        "target_params": target_total,
        "target_nonzero": target_nonzero,
        "flops_dense": flops.flops_dense,
        "flops_sparse": flops.flops_sparse,
        "flops_other": flops.other_flops,
        **on_disk,
    }


def format_report(info: dict[str, Any]) -> str:
    w = max(len(layer["name"]) for layer in info["layers"])
    lines = [
        f"preset {info['preset']} ({info['model_kind']}), sparsity {info['sparsity']} {info['distribution']}, "
        f"input {' + '.join('x'.join(map(str, s)) for s in info['input_shape'])}",
        f"{'layer':<{w}}  {'shape':<20} {'density':>8} {'non-zero':>12} {'FLOPs dense':>12} {'FLOPs sparse':>12}",
    ]
    for layer in info["layers"]:
        shape = "x".join(map(str, layer["shape"]))
        lines.append(
            f"{layer['name']:<{w}}  {shape:<20} {layer['density']:>8.4f} {layer['nonzero']:>12,} "
            f"{format_flops(layer['flops_dense']):>12} {format_flops(layer['flops_sparse']):>12}"
        )
    lines.append(
        f"parameters: {info['params_total']:,} total, {info['params_nonzero']:,} non-zero "
        f"(density {info['density']:.4f})"
    )
    lines.append(
        f"inference FLOPs per forward: {format_flops(info['flops_dense'])} dense, "
        f"{format_flops(info['flops_sparse'])} sparse ({info['flops_sparse'] / max(info['flops_dense'], 1):.3f}x)"
    )
    lines.append(
        f"bytes on disk (float32): {format_bytes(info['bytes_dense'])} dense, "
        f"{format_bytes(info['bytes_sparse'])} as a sparse export "
        f"({info['bytes_sparse'] / max(info['bytes_dense'], 1):.3f}x)"
    )
    return "\n".join(lines)
