"""Sampling from a run directory: ``sparsediff sample --run DIR --num N --sampler ddim --steps K``.

The model is rebuilt from the run's ``config.yaml`` and its latest checkpoint; by default the EMA
weights are used, multiplied by the final masks, so the sampled model has exactly the run's non-zeros
(an EMA of sparse weights keeps fading traces of dropped weights; they are not part of the model).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from .checkpoint import CheckpointDir, load_tensors
from .errors import StateError
from .tasks import Samples, make_task


def _device(device: str | None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def final_nm_pattern(cfg) -> str | None:
    """The N:M pattern an SR-STE run ends with (the last progressive stage, else ``sparse.nm``); None otherwise."""
    s = cfg.sparse
    if s.method != "srste":
        return None
    return s.progressive[-1].split("@")[0] if s.progressive else s.nm


@torch.no_grad()
def apply_final_masks(model: torch.nn.Module, cfg, ckpt: Path) -> dict[str, Any]:
    """Multiply the model's weights by the run's final masks; returns a small report."""
    method = cfg.sparse.method
    if method == "dense":
        return {"masked_layers": 0}
    if method == "srste":
        from .sparse.nm import one_shot_nm, parse_nm

        pattern = parse_nm(final_nm_pattern(cfg))
        masks = one_shot_nm(
            model,
            pattern.n,
            pattern.m,
            include=cfg.sparse.include or None,
            exclude=cfg.sparse.exclude or None,
            incompatible=cfg.sparse.nm_incompatible,
        )
        return {"masked_layers": len(masks), "pattern": f"{pattern.n}:{pattern.m}"}
    from .sparse.io import engine_state_from_tensors

    tensors, meta = load_tensors(ckpt / "engine.safetensors")
    masks = engine_state_from_tensors(tensors, meta)["masks"]
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        if name not in params:
            raise StateError(f"{ckpt}: mask for {name!r}, which the model does not have")
        params[name].mul_(mask.to(params[name].device, params[name].dtype))
    return {"masked_layers": len(masks)}


def latest_checkpoint(run_dir: Path) -> Path:
    """The run's latest checkpoint directory; a clear error when it has none yet."""
    ckpt = CheckpointDir(Path(run_dir) / "checkpoints").latest()
    if ckpt is None:
        raise StateError(
            f"{run_dir} has no checkpoint yet; train it first (sparsediff train ... --out {run_dir})"
        )
    return ckpt


def _restore(model: torch.nn.Module, cfg, ckpt: Path, use_ema: bool) -> dict[str, Any]:
    """Load the checkpoint's (EMA) weights into ``model`` and apply the final masks; a small report."""
    from .train import load_model_weights

    weights = "ema" if use_ema else "model"
    load_model_weights(model, ckpt / f"{weights}.safetensors")
    return {"checkpoint": str(ckpt), "weights": weights, **apply_final_masks(model, cfg, ckpt)}


def load_masked_model(run_dir: str | Path, use_ema: bool = True):
    """``(cfg, model, info)``: the run's denoiser on the CPU with its (EMA) weights and final masks.

    Like :func:`load_for_inference`, without building the task (no first stage or data needed, e.g. to
    export or fine-tune a model).
    """
    from .models import build_model
    from .train import load_run_config

    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    ckpt = latest_checkpoint(run_dir)
    model = build_model(cfg.model)
    info = {"run": str(run_dir), **_restore(model, cfg, ckpt, use_ema)}
    return cfg, model.eval(), info


def load_for_inference(run_dir: str | Path, use_ema: bool = True, device: str | None = None):
    """``(cfg, task, model, info)`` with the latest checkpoint's (EMA) weights and final masks."""
    from .train import load_run_config

    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    ckpt = latest_checkpoint(run_dir)
    task = make_task(cfg, run_dir)
    model = task.build_model()
    info = _restore(model, cfg, ckpt, use_ema)
    dev = _device(device)
    model.to(dev).eval()
    return cfg, task, model, info


def generate(
    run_dir,
    num: int,
    sampler: str | None = None,
    steps: int | None = None,
    eta: float | None = None,
    seed: int = 0,
    use_ema: bool = True,
    batch_size: int | None = None,
    device: str | None = None,
    progress: bool = True,
) -> tuple[Samples, dict[str, Any], Any]:
    """Samples from a run: ``(samples, info, task)``."""
    cfg, task, model, info = load_for_inference(run_dir, use_ema, device)
    s = cfg.sample
    sampler = sampler or s.sampler
    steps = steps or s.steps
    eta = s.eta if eta is None else eta
    gen = torch.Generator().manual_seed(seed)
    samples = task.generate(
        model,
        num,
        gen,
        sampler=sampler,
        steps=steps,
        eta=eta,
        batch_size=batch_size or s.batch_size,
        device=next(model.parameters()).device,
        progress=progress,
    )
    info.update(
        {
            "num": num,
            "sampler": sampler,
            "steps": steps if sampler == "ddim" else task.schedule.num_timesteps,
            "eta": eta,
            "seed": seed,
        }
    )
    return samples, info, task


def save_grid(images: torch.Tensor, path: Path, ncol: int | None = None) -> Path:
    """A PNG grid of uint8 images (N, C, H, W)."""
    from PIL import Image

    n = images.shape[0]
    ncol = ncol or max(1, math.ceil(math.sqrt(n)))
    nrow = math.ceil(n / ncol)
    c, h, w = images.shape[1:]
    pad = 2
    canvas = torch.full((c, nrow * (h + pad) + pad, ncol * (w + pad) + pad), 255, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        canvas[:, y : y + h, x : x + w] = images[i]
    arr = canvas.permute(1, 2, 0).numpy()
    Image.fromarray(arr[..., 0] if c == 1 else arr).save(path)
    return path


def sample_run(
    run_dir,
    num: int = 64,
    sampler: str | None = None,
    steps: int | None = None,
    eta: float | None = None,
    seed: int = 0,
    out: str | Path | None = None,
    use_ema: bool = True,
    batch_size: int | None = None,
    device: str | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Generate ``num`` samples into ``out`` (default ``RUN/samples/<sampler>-<steps>-seed<seed>``)."""
    samples, info, task = generate(
        run_dir, num, sampler, steps, eta, seed, use_ema, batch_size, device, not quiet
    )
    out = Path(out) if out else Path(run_dir) / "samples" / f"{info['sampler']}-{info['steps']}-seed{seed}"
    paths = task.save_samples(samples, out)
    grid = save_grid(samples.images[: min(num, 64)], out / "grid.png")
    info.update({"out": str(out), "grid": str(grid), "files": len(paths)})
    (out / "sample.json").write_text(json.dumps(info, indent=2))
    return info
