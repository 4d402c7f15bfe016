"""``sparsediff evaluate --run DIR --num-samples N``: FID, parameters and FLOPs of a run, written to its
evaluation file (``RunDir.EVAL``).

FID goes through torch-fidelity. With ``--fid-weights PATH`` (the standard Inception file
``pt_inception-2015-12-05-6726825d.pth``) it is the usual Inception FID; without it, it is computed in
the feature space of a small network sparsediff trains on the bundled dataset and ships in the package,
and the evaluation names it so (``fid_sparsediff_fmnist`` ...): those numbers compare runs with each other,
never with published Inception FIDs.

Bytes on disk are recorded next to the counts: ``checkpoint_bytes`` (the checkpoint directory the model
came from) and ``model_bytes`` (the file ``sparsediff export --format sparse`` writes for it, float32).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from .checkpoint import directory_nbytes
from .config import RunConfig
from .export.sparse_file import sparse_export_nbytes
from .run import RunDir, load_model_and_masks
from .sample import generate, save_grid
from .sparse import count_flops


def _extractor(task, requested: str | None, fid_weights: str | None) -> str:
    if fid_weights:
        return "inception-v3-compat"
    if requested and requested != "auto":
        return requested
    configured = task.cfg.eval.feature_extractor
    return task.default_feature_extractor if configured == "auto" else configured


def evaluate_run(
    run_dir: str | Path,
    num_samples: int | None = None,
    fid_weights: str | None = None,
    extractor: str | None = None,
    sampler: str | None = None,
    steps: int | None = None,
    eta: float | None = None,
    seed: int = 0,
    num_reference: int | None = None,
    use_ema: bool = True,
    device: str | None = None,
    quiet: bool = False,
    backend: str = "dense",
    report_to: str | None = None,
) -> dict[str, Any]:
    """Generate samples, compute FID against the held-out split, count parameters and FLOPs, and record
    the measured sampling time (``generate_seconds``) of ``backend`` next to the FLOPs.

    ``report_to`` (``tensorboard``, ``wandb``, ``all``; default none) also logs FID, the sampling time and
    the sample grid into the run's tracker runs, at its last training step (see :mod:`sparsediff.watch`).
    """
    from .metrics import compute_fid
    from .watch import log_evaluation, tracker_names

    tracker_names(report_to)  # an unknown or missing tracker fails before the samples are drawn
    run = RunDir(run_dir)
    run_dir = run.path
    t0 = time.perf_counter()
    cfg = run.load_config()
    num = num_samples or cfg.eval.num_samples
    samples, info, task = generate(
        run_dir, num, sampler, steps, eta, seed, use_ema, cfg.eval.batch_size, device, not quiet, backend
    )
    sample_seconds = time.perf_counter() - t0
    ext = _extractor(task, extractor, fid_weights)
    reference = task.reference_images(num_reference)
    fid = compute_fid(
        samples.images,
        reference,
        extractor=ext,
        weights_path=fid_weights,
        device=device or ("cuda" if torch.cuda.is_available() else "cpu"),
    )

    # parameters, FLOPs and bytes of the model that was sampled (EMA weights with the final masks)
    loaded = load_model_and_masks(run, use_ema)
    model = loaded[1]
    targets = _target_names(cfg, model)
    flops = count_flops(model, task.example_inputs(model), None, targets=targets)
    params_total = sum(p.numel() for p in model.parameters())
    nonzero_targets = sum(
        int(torch.count_nonzero(p.detach())) for n, p in model.named_parameters() if n in targets
    )
    target_total = sum(p.numel() for n, p in model.named_parameters() if n in targets)
    params_nonzero = params_total - target_total + nonzero_targets
    denoise_calls = info["steps"]
    decode = task.decode_flops()
    summary = run.read_summary() or {}

    out_dir = run.eval_dir
    out_dir.mkdir(exist_ok=True)
    grid = save_grid(task.preview_images(samples, 64), out_dir / "grid.png")
    result = {
        "run": str(run_dir),
        "preset": cfg.name,
        "method": cfg.sparse.method,
        "sparsity": cfg.sparse.sparsity if cfg.sparse.sparse_method.masked else 0.0,
        fid["metric"]: fid["value"],
        "fid": fid,
        "num_samples": num,
        "num_reference": int(reference.shape[0]),
        "sampler": {k: info[k] for k in ("sampler", "steps", "eta", "seed")},
        "weights": info["weights"],
        "checkpoint": info["checkpoint"],
        # bytes on disk: the checkpoint directory sampled from, and `export --format sparse` (float32)
        "checkpoint_bytes": directory_nbytes(Path(info["checkpoint"])),
        "model_bytes": sparse_export_nbytes(run, use_ema=use_ema, loaded=loaded),
        "params_total": params_total,
        "params_nonzero": params_nonzero,
        "density": params_nonzero / params_total,
        "flops_per_step_dense": flops.flops_dense,
        "flops_per_step_sparse": flops.flops_sparse,
        "flops_per_sample_dense": flops.flops_dense * denoise_calls + decode,
        "flops_per_sample_sparse": flops.flops_sparse * denoise_calls + decode,
        "flops_decode": decode,
        "flops_train_total": summary.get("flops_train_total"),
        "flops_train_total_dense": summary.get("flops_train_total_dense"),
        "train_seconds": summary.get("train_seconds"),
        "train_steps": summary.get("steps"),
        "sample_seconds": sample_seconds,
        "backend": info["backend"],
        "generate_seconds": info["generate_seconds"],
        "grid": str(grid),
    }
    run.write_eval(result)  # atomic: a reader never sees half a file
    if report_to:
        log_evaluation(run, cfg, result, report_to, quiet)
    return result


def _target_names(cfg: RunConfig, model: torch.nn.Module) -> list[str]:
    from .sparse import select_targets

    s = cfg.sparse
    return [n for n, _ in select_targets(model, s.include or None, s.exclude or None)]
