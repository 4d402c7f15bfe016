"""Per-layer density, non-zeros and FLOPs of a preset's denoiser (what ``sparsediff inspect`` prints)."""

from __future__ import annotations

from typing import Any

import torch

from .config import load_config
from .models import build_model
from .sparse import count_flops, plan_sparsity
from .sparse.flops import format_flops


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
    return "\n".join(lines)
