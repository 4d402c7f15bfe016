"""Sampling from a run directory: ``sparsediff sample --run DIR --num N --sampler ddim --steps K``.

The model is rebuilt from the run's config and its latest checkpoint by ``run.load_for_inference``; by
default the EMA weights are used, multiplied by the final masks, so the sampled model has exactly the
run's non-zeros.

``backend="sparse"`` (``--backend sparse``) samples with the same model on compressed weights through
sparsediff's native CPU kernels (:func:`sparsediff.sparse.runtime.to_sparse_inference`): the same samples
within float32 tolerance, faster where the layers are sparse enough to gain (denser layers stay dense).
The backend and the measured generation time are recorded with the samples.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from .data import raster
from .errors import ConfigError
from .run import RunDir, load_for_inference
from .sparse.runtime import BACKENDS, kernels, sparse_layers, to_sparse_inference
from .tasks import Samples


def use_backend(
    model: torch.nn.Module, backend: str, example_inputs: tuple | None = None
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """``model`` ready to sample with ``backend``, and what was done (recorded with the samples).

    ``"sparse"`` converts the (masked) model in place: each layer computes on compressed weights where
    that is faster -- measured on ``example_inputs`` (one forward pass at the sampling batch size) when
    given, else by its density. Its zeros define the sparsity, so apply the run's final masks first
    (``load_for_inference`` does).
    """
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "dense":
        return model, {"backend": "dense"}
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise ConfigError(
            f"--backend sparse runs on the CPU (sparsediff's native kernels); the model is on {device}: "
            "add --device cpu"
        )
    t0 = time.perf_counter()
    model = to_sparse_inference(model, example_inputs=example_inputs, inplace=True)
    return model, {
        "backend": "sparse",
        "native_kernels": kernels() is not None,
        "sparse_layers": len(sparse_layers(model)),
        "backend_setup_seconds": time.perf_counter() - t0,  # conversion and per-layer measurement
    }


def _example_inputs(model: torch.nn.Module, batch_size: int, seed: int) -> tuple | None:
    """Inputs of one denoiser call at ``batch_size`` (noise for the sample), for the per-layer choice."""
    make = getattr(model, "example_inputs", None)  # sparsediff's denoisers have it; other models may not
    if make is None:
        return None
    inputs = tuple(make(batch_size))
    noise = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(seed), dtype=inputs[0].dtype)
    return (noise.to(inputs[0].device), *inputs[1:])


def generate(
    run_dir: str | Path | RunDir,
    num: int,
    sampler: str | None = None,
    steps: int | None = None,
    eta: float | None = None,
    seed: int = 0,
    use_ema: bool = True,
    batch_size: int | None = None,
    device: str | None = None,
    progress: bool = True,
    backend: str = "dense",
) -> tuple[Samples, dict[str, Any], Any]:
    """Samples from a run: ``(samples, info, task)``; ``info["generate_seconds"]`` is the measured
    wall-clock of generating them (model loading excluded) with ``backend``."""
    cfg, task, model, info = load_for_inference(run_dir, use_ema, device)
    model_device = next(model.parameters()).device
    s = cfg.sample
    batch = min(num, batch_size or s.batch_size)
    example = _example_inputs(model, batch, seed) if backend == "sparse" else None
    model, backend_info = use_backend(model, backend, example)
    info.update(backend_info)
    sampler = sampler or s.sampler
    steps = steps or s.steps
    eta = s.eta if eta is None else eta
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    samples = task.generate(
        model,
        num,
        gen,
        sampler=sampler,
        steps=steps,
        eta=eta,
        batch_size=batch_size or s.batch_size,
        device=model_device,
        progress=progress,
    )
    info.update(
        {
            "generate_seconds": time.perf_counter() - t0,
            "num": num,
            "sampler": sampler,
            "steps": steps if sampler == "ddim" else task.schedule.num_timesteps,
            "eta": eta,
            "seed": seed,
        }
    )
    return samples, info, task


def save_grid(images: torch.Tensor, path: Path, ncol: int | None = None) -> Path:
    """A PNG grid of a batch of uint8 images (N, C, H, W), white between the cells, about square."""
    arr = images.permute(0, 2, 3, 1).numpy()  # (N, H, W, C)
    ncol = ncol or max(1, math.ceil(math.sqrt(len(arr))))
    return raster.save_grid(arr[..., 0] if arr.shape[-1] == 1 else arr, path, ncol=ncol, pad_value=255)


def sample_run(
    run_dir: str | Path | RunDir,
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
    backend: str = "dense",
) -> dict[str, Any]:
    """Generate ``num`` samples into ``out`` (default ``RUN/samples/<sampler>-<steps>-seed<seed>``)."""
    samples, info, task = generate(
        run_dir, num, sampler, steps, eta, seed, use_ema, batch_size, device, not quiet, backend
    )
    out = Path(out) if out else RunDir(run_dir).samples_dir / f"{info['sampler']}-{info['steps']}-seed{seed}"
    paths = task.save_samples(samples, out)
    grid = save_grid(task.preview_images(samples, 64), out / "grid.png")
    info.update({"out": str(out), "grid": str(grid), "files": len(paths)})
    (out / "sample.json").write_text(json.dumps(info, indent=2))
    return info
