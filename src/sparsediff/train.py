"""One training loop for every model family and sparse method.

Reads top to bottom: set up (accelerate, task, model, data, optimiser, sparse engine, EMA), maybe
resume, then for each optimiser step: gather the batch, forward/backward over the accumulation
micro-batches, stop on a non-finite loss, mask and clip gradients, step, let the engine update the
topology, update the EMA, log, checkpoint.

Reproducibility and exact resumption come from one rule: every random draw of step ``s`` (batch
indices, timesteps, noise) is made from generators seeded by ``(seed, s, micro-batch, rank)``. A run
therefore needs no random-number state in its checkpoints, and 10 steps + resume + 10 steps equals 20
straight steps bit for bit.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .checkpoint import (
    CheckpointDir,
    load_tensors,
    optimizer_from_tensors,
    optimizer_to_tensors,
    read_trainer_state,
)
from .config import RunConfig, config_from_dict, flatten
from .errors import ConfigError, StateError, TrainingError
from .sparse import count_flops, sparsify, training_flops_per_step, training_flops_total
from .sparse.engine import derive_seed
from .sparse.io import engine_state_from_tensors, engine_state_to_tensors
from .tasks import make_task

# Fields a resumed run may change; anything else must match the run directory's config.
RESUMABLE_CHANGES = {"train.max_steps", "train.epochs", "train.ckpt_every", "train.log_every", "description"}


# ---------------------------------------------------------------------------- helpers


def total_steps(cfg: RunConfig, num_examples: int) -> int:
    t = cfg.train
    if t.max_steps is not None:
        return int(t.max_steps)
    if t.epochs is not None:
        return max(1, math.ceil(t.epochs * num_examples / t.batch_size))
    raise ConfigError("set train.max_steps or train.epochs")


class EpochSampler:
    """Example indices for any optimiser step: epochs are seeded permutations of the dataset."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._cache: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._cache:
            if len(self._cache) > 4:
                self._cache.pop(min(self._cache))
            g = torch.Generator().manual_seed(derive_seed(self.seed, "epoch", epoch))
            self._cache[epoch] = torch.randperm(self.n, generator=g)
        return self._cache[epoch]

    def indices(self, start: int, count: int) -> torch.Tensor:
        """Indices of examples ``start .. start + count`` of the infinite stream of epochs."""
        out, pos = [], start
        while len(out) < count:
            epoch, offset = divmod(pos, self.n)
            take = min(count - len(out), self.n - offset)
            out.extend(self._perm(epoch)[offset : offset + take].tolist())
            pos += take
        return torch.tensor(out, dtype=torch.long)


def config_differences(a: RunConfig, b: RunConfig) -> list[str]:
    fa, fb = flatten(a.to_dict()), flatten(b.to_dict())
    return sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k))


def load_run_config(run_dir: Path) -> RunConfig:
    import yaml

    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise StateError(f"{run_dir} is not a sparsediff run directory (no config.yaml)")
    return config_from_dict(yaml.safe_load(path.read_text()), source=str(path))


def _engine_kwargs(cfg: RunConfig, steps: int) -> dict[str, Any]:
    s = cfg.sparse
    kw: dict[str, Any] = dict(method=s.method, include=s.include or None, exclude=s.exclude or None)
    if s.method == "srste":
        kw.update(
            nm=None if s.progressive else s.nm,  # a progressive schedule names its own patterns
            srste_lambda=s.srste_lambda,
            progressive=s.progressive or None,
            nm_incompatible=s.nm_incompatible,
        )
        return kw
    kw.update(
        sparsity=s.sparsity,
        distribution=s.distribution,
        prune_ratio=s.prune_ratio,
        decay=s.decay,
        update_every=s.update_every,
        seed=s.seed,
    )
    if s.method in ("rigl", "magran"):
        kw.update(end_step=s.end_step, total_steps=steps, end_fraction=s.end_fraction)
    return kw


# ---------------------------------------------------------------------------- state I/O


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if torch.is_tensor(v)}


def ema_tensors(ema, model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    names = [n for n, _ in model.named_parameters()]
    tensors = dict(zip(names, ema.shadow_params))
    meta = {"optimization_step": str(ema.optimization_step), "decay": str(ema.decay)}
    return tensors, meta


def load_ema(ema, model: torch.nn.Module, path: Path) -> None:
    tensors, meta = load_tensors(path)
    names = [n for n, _ in model.named_parameters()]
    missing = [n for n in names if n not in tensors]
    if missing:
        raise StateError(f"{path}: EMA weights miss parameter(s) {', '.join(missing[:3])}")
    for shadow, n in zip(ema.shadow_params, names):
        shadow.copy_(tensors[n])
    ema.optimization_step = int(meta.get("optimization_step", 0))


def load_model_weights(model: torch.nn.Module, path: Path) -> None:
    tensors, _ = load_tensors(path)
    load_state_checked(model, tensors, path)


def load_state_checked(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor], path: Any) -> None:
    """``model.load_state_dict(tensors, strict=True)`` with an error naming ``path`` and the first
    missing, unexpected or mis-shaped entries."""
    own = model.state_dict()
    missing = [k for k in own if k not in tensors]
    unexpected = [k for k in tensors if k not in own]
    wrong = [k for k in own if k in tensors and tuple(own[k].shape) != tuple(tensors[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:3])}")
        if wrong:
            k = wrong[0]
            parts.append(
                f"{k} has shape {tuple(tensors[k].shape)} in the file, {tuple(own[k].shape)} in the model"
            )
        raise StateError(f"{path} does not fit this model: " + "; ".join(parts))
    model.load_state_dict(dict(tensors), strict=True)


def load_init_weights(
    init: str | Path | Mapping[str, torch.Tensor] | None, run_dir: Path
) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any] | None]:
    """The weights a run starts from (``train.init_from`` or ``train(init_weights=...)``) and what they are.

    A relative path is looked up in the run directory first (``sparsediff finetune`` copies the source
    weights to ``RUN/init.safetensors``, so a run directory stays self-contained and resumable), then in
    the working directory. The file's metadata key ``sparsediff_init`` (JSON) describes the source.
    """
    if init is None:
        return None, None
    if isinstance(init, Mapping):
        return dict(init), {"path": None}
    path = Path(init)
    if not path.is_absolute() and (run_dir / path).exists():
        path = run_dir / path
    if not path.exists():
        raise ConfigError(
            f"train.init_from: {init!s} does not exist (looked in {run_dir} and the working directory)"
        )
    tensors, meta = load_tensors(path)
    info = {"path": str(path)}
    if "sparsediff_init" in meta:
        info.update(json.loads(meta["sparsediff_init"]))
    return tensors, info


# ---------------------------------------------------------------------------- the loop


def prepare_run_dir(cfg: RunConfig, run_dir: Path, resume: bool) -> RunConfig:
    """Create the run directory, or check that resuming it with ``cfg`` is possible."""
    cfg_path = run_dir / "config.yaml"
    if cfg_path.exists():
        if not resume:
            raise ConfigError(
                f"{run_dir} already holds a run; pass --resume to continue it or choose another --out"
            )
        saved = load_run_config(run_dir)
        diffs = [d for d in config_differences(saved, cfg) if d not in RESUMABLE_CHANGES]
        if diffs:
            raise ConfigError(
                f"{run_dir} was trained with another configuration; it differs in "
                + ", ".join(
                    f"{d} ({flatten(saved.to_dict()).get(d)!r} there, {flatten(cfg.to_dict()).get(d)!r} now)"
                    for d in diffs[:4]
                )
            )
    return cfg


def train(
    cfg: RunConfig,
    run_dir: str | Path,
    resume: bool = False,
    quiet: bool = False,
    stop_after: int | None = None,
    init_weights: str | Path | Mapping[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Train ``cfg`` into ``run_dir``; returns the summary (also written to ``summary.json``).

    Args:
        resume: continue from the run directory's latest checkpoint.
        stop_after: stop (with a checkpoint) after this many optimiser steps in this process; for tests
            and for running long jobs in parts.
        init_weights: denoiser weights to start from (a safetensors path or a state dict); defaults to
            ``cfg.train.init_from``. With ``cfg.train.distill_weight > 0`` a frozen dense copy of them is
            the teacher of SparseDM's distillation loss. On resume the student comes from the checkpoint
            and the teacher again from these weights.
    """
    from accelerate import Accelerator
    from diffusers.training_utils import EMAModel

    run_dir = Path(run_dir)
    t_cfg = cfg.train
    accelerator = Accelerator(mixed_precision=t_cfg.mixed_precision, cpu=not torch.cuda.is_available())
    is_main = accelerator.is_main_process
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        prepare_run_dir(cfg, run_dir, resume)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
    accelerator.wait_for_everyone()
    ckpts = CheckpointDir(run_dir / "checkpoints")
    if is_main:
        ckpts.clean_temporary()
    world, rank = accelerator.num_processes, accelerator.process_index
    if t_cfg.batch_size % (world * t_cfg.grad_accum):
        raise ConfigError(
            f"train.batch_size={t_cfg.batch_size} must be divisible by processes x grad_accum "
            f"= {world} x {t_cfg.grad_accum}"
        )
    micro = t_cfg.batch_size // (world * t_cfg.grad_accum)
    device = accelerator.device

    # -------------------------------------------------------------- model, data, optimiser, engine
    task = make_task(cfg, run_dir)
    torch.manual_seed(t_cfg.seed)  # the same initial weights on every rank
    model = task.build_model().to(device)
    init_state, init_info = load_init_weights(
        init_weights if init_weights is not None else t_cfg.init_from, run_dir
    )
    teacher = None
    if init_state is not None:
        load_state_checked(model, init_state, init_info.get("path") or "init_weights")
        if t_cfg.distill_weight > 0:
            # copied before the engine adds its hooks: the teacher stays dense (see sparse/nm.py)
            teacher = copy.deepcopy(model).eval().requires_grad_(False)
    data = task.train_data(device, is_main=is_main, barrier=accelerator.wait_for_everyone, progress=not quiet)
    steps = total_steps(cfg, len(data))
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=t_cfg.lr, betas=tuple(t_cfg.betas), weight_decay=t_cfg.weight_decay
    )
    warmup = max(0, t_cfg.warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0
    )
    engine = sparsify(model, optimizer, **_engine_kwargs(cfg, steps))
    ema = EMAModel(model.parameters(), decay=t_cfg.ema_decay, foreach=True)
    ema.to(device)
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)

    # -------------------------------------------------------------- resume
    start, seconds_before = 0, 0.0
    if resume:
        ckpt = ckpts.latest()
        if ckpt is not None:
            state = read_trainer_state(ckpt)
            load_model_weights(raw_model, ckpt / "model.safetensors")
            opt_tensors, opt_meta = load_tensors(ckpt / "optimizer.safetensors")
            optimizer.optimizer.load_state_dict(optimizer_from_tensors(opt_tensors, opt_meta))
            eng_tensors, eng_meta = load_tensors(ckpt / "engine.safetensors")
            engine.load_state_dict(engine_state_from_tensors(eng_tensors, eng_meta))
            load_ema(ema, raw_model, ckpt / "ema.safetensors")
            scheduler.load_state_dict(state["scheduler"])
            start = int(state["step"])
            seconds_before = float(state.get("train_seconds", 0.0))
            if not quiet and is_main:
                print(f"resumed {run_dir} from {ckpt.name} (step {start} of {steps})")
        elif not quiet and is_main:
            print(f"no checkpoint in {run_dir}; starting from step 0")

    # -------------------------------------------------------------- FLOPs of this model
    flops = count_flops(raw_model, task.example_inputs(raw_model), engine)
    per_step = training_flops_per_step(
        cfg.sparse.method if cfg.sparse.method != "srste" else "dense",
        flops.flops_dense * t_cfg.batch_size,
        flops.flops_sparse * t_cfg.batch_size,
        cfg.sparse.update_every,
    )
    teacher_flops = flops.flops_dense * t_cfg.batch_size if teacher is not None else 0  # its forward

    def save_checkpoint(step: int) -> Path | None:
        accelerator.wait_for_everyone()
        if not is_main:
            return None
        files = {
            "model.safetensors": (model_tensors(raw_model), None),
            "ema.safetensors": ema_tensors(ema, raw_model),
            "optimizer.safetensors": optimizer_to_tensors(optimizer.optimizer.state_dict()),
            "engine.safetensors": engine_state_to_tensors(engine.state_dict()),
        }
        trainer_state = {
            "scheduler": scheduler.state_dict(),
            "total_steps": steps,
            "train_seconds": seconds_before + train_seconds,
        }
        return ckpts.save(step, files, trainer_state)

    # -------------------------------------------------------------- the loop
    sampler = EpochSampler(len(data), t_cfg.seed)
    metrics_path = run_dir / "metrics.jsonl"
    log = open(metrics_path, "a") if is_main else None  # noqa: SIM115
    progress = None
    if is_main and not quiet:
        from tqdm.auto import tqdm

        progress = tqdm(
            total=steps, initial=start, desc=f"train {cfg.name} {cfg.sparse.method}", dynamic_ncols=True
        )
    window = {"loss": 0.0, "n": 0, "new": 0, "time": 0.0}
    train_seconds = 0.0
    last_ckpt = ckpts.latest()
    step = start
    end = steps if stop_after is None else min(steps, start + stop_after)
    try:
        model.train()
        while step < end:
            step += 1
            t0 = time.perf_counter()
            first = (step - 1) * t_cfg.batch_size
            loss_sum = torch.zeros((), device=device)
            for m in range(t_cfg.grad_accum):
                offset = first + (m * world + rank) * micro
                batch = data.batch(sampler.indices(offset, micro), device)
                gen = torch.Generator().manual_seed(derive_seed(t_cfg.seed, "step", step, m, rank))
                sync = m == t_cfg.grad_accum - 1
                ctx = accelerator.no_sync(model) if not sync else _null()
                with ctx, accelerator.autocast():
                    if teacher is None:
                        loss = task.loss(model, batch, gen)
                    else:
                        w = t_cfg.distill_weight
                        loss = task.loss(model, batch, gen, teacher=teacher, distill_weight=w)
                    loss = loss / t_cfg.grad_accum
                accelerator.backward(loss)
                loss_sum += loss.detach()
            # Stop before a non-finite loss reaches the weights (all ranks agree on the verdict).
            bad = (~torch.isfinite(loss_sum)).float()
            if accelerator.reduce(bad, reduction="sum").item() > 0:
                raise TrainingError(
                    f"the loss became {loss_sum.item()} at step {step}; training stopped. "
                    + (
                        f"The last good checkpoint is {last_ckpt} (resume with --resume after lowering "
                        "train.lr)."
                        if last_ckpt
                        else "No checkpoint was written yet."
                    )
                )
            engine.mask_gradients()  # clip the norm of the sparse gradient, not of the dense one
            if t_cfg.grad_clip:
                accelerator.clip_grad_norm_(model.parameters(), t_cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            engine.step()
            optimizer.zero_grad(set_to_none=True)
            ema.step(raw_model.parameters())
            dt = time.perf_counter() - t0
            train_seconds += dt

            window["loss"] += loss_sum.item()
            window["n"] += 1
            window["time"] += dt
            window["new"] += _new_connections(engine)
            if is_main and (step % t_cfg.log_every == 0 or step == end):
                report = engine.report()
                record = {
                    "step": step,
                    "loss": window["loss"] / window["n"],
                    "lr": scheduler.get_last_lr()[0],
                    "density": report.target_density,
                    "topology_updates": getattr(engine, "num_updates", 0),
                    "topology_changes": window["new"],
                    **({"pattern": str(engine.pattern)} if hasattr(engine, "pattern") else {}),
                    "step_time": window["time"] / window["n"],
                    "samples_per_s": t_cfg.batch_size * window["n"] / max(window["time"], 1e-9),
                }
                log.write(json.dumps(record) + "\n")
                log.flush()
                if progress is not None:
                    progress.set_postfix(loss=f"{record['loss']:.4f}", density=f"{record['density']:.3f}")
                window = {"loss": 0.0, "n": 0, "new": 0, "time": 0.0}
            if progress is not None:
                progress.update(1)
            if step % t_cfg.ckpt_every == 0 and step < end:
                last_ckpt = save_checkpoint(step) or last_ckpt
        last_ckpt = save_checkpoint(step) or last_ckpt
    finally:
        if progress is not None:
            progress.close()
        if log is not None:
            log.close()

    consistency = _rank_consistency(accelerator, engine, raw_model)
    summary = None
    if is_main:
        report = engine.report()
        summary = {
            "preset": cfg.name,
            "family": cfg.family,
            "method": cfg.sparse.method,
            "sparsity": 1.0 - report.target_density,
            "steps": step,
            "total_steps": steps,
            "finished": step >= steps,
            "world_size": world,
            **consistency,
            "batch_size": t_cfg.batch_size,
            "train_seconds": seconds_before + train_seconds,
            "params_total": report.params_total,
            "params_nonzero": report.params_nonzero,
            "density": report.density,
            "target_density": report.target_density,
            "topology_updates": getattr(engine, "num_updates", 0),
            "flops_forward_dense": flops.flops_dense,
            "flops_forward_sparse": flops.flops_sparse,
            "flops_train_per_step": per_step + teacher_flops,
            "flops_train_total": training_flops_total(
                cfg.sparse.method if cfg.sparse.method != "srste" else "dense",
                flops.flops_dense * t_cfg.batch_size,
                flops.flops_sparse * t_cfg.batch_size,
                steps,
                cfg.sparse.update_every,
                getattr(getattr(engine, "config", None), "end_step", None),
            )
            + teacher_flops * steps,
            "flops_train_total_dense": 3.0 * flops.flops_dense * t_cfg.batch_size * steps,
            "checkpoint": str(last_ckpt) if last_ckpt else None,
            "init_from": init_info,
            "distill_weight": t_cfg.distill_weight if teacher is not None else 0.0,
            "task": task.describe(),
        }
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    accelerator.wait_for_everyone()
    engine.remove()
    return summary or {}


def _digest(tensors) -> int:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return int.from_bytes(h.digest()[:7], "little")  # fits an int64


def _rank_consistency(accelerator, engine, model) -> dict[str, bool]:
    """Whether every data-parallel rank ends with the same masks and the same weights."""
    masks = engine.masks
    local = torch.tensor(
        [[_digest(masks[n] for n in engine.names), _digest(p for p in model.parameters())]],
        dtype=torch.long,
        device=accelerator.device,
    )
    everyone = accelerator.gather(local).view(-1, 2)
    return {
        "masks_identical_across_ranks": bool((everyone[:, 0] == everyone[0, 0]).all()),
        "weights_identical_across_ranks": bool((everyone[:, 1] == everyone[0, 1]).all()),
    }


def _new_connections(engine) -> int:
    """Weights grown from zero by a topology update made in the step just taken."""
    last = getattr(engine, "last_update", None)
    if last is None or last.step != engine.step_count or engine.step_count == 0:
        return 0
    return last.new


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
