"""One training loop for every model family and sparse method.

Reads top to bottom: :func:`train` starts the run (checks, task, model, data, optimiser, sparse engine,
EMA; only then is the run directory written), maybe resumes it, then runs :func:`train_step` for each
optimiser step (gather the batch, forward/backward over the accumulation micro-batches, stop on a
non-finite loss, mask and clip gradients, step, let the engine update the topology, update the EMA),
logs, checkpoints, and writes the run's summary.

Reproducibility and exact resumption come from one rule: every random draw of step ``s`` (batch
indices, timesteps, noise) is made from generators seeded by ``(seed, s, micro-batch, rank)``. A run
therefore needs no random-number state in its checkpoints, and 10 steps + resume + 10 steps equals 20
straight steps bit for bit.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint import (
    EMA_FILE,
    ENGINE_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
    directory_nbytes,
    ema_tensors,
    load_ema,
    load_model_weights,
    load_state_checked,
    load_tensors,
    model_tensors,
    optimizer_from_tensors,
    optimizer_param_names,
    optimizer_to_tensors,
    read_trainer_state,
)
from .config import RunConfig
from .errors import ConfigError, StateError, TrainingError
from .progress import progress_bar
from .run import RunDir, RunSummary, load_init_weights
from .sparse import Engine, count_flops, derive_seed, sparsify, training_flops_per_step, training_flops_total
from .sparse.io import engine_state_from_tensors, engine_state_to_tensors
from .tasks import Task, TrainData, make_task
from .watch import (
    Watch,
    check_watch_settings,
    finish_trackers,
    make_trackers,
    start_trackers,
    topology_layers,
)

# ---------------------------------------------------------------------------- helpers


def total_steps(cfg: RunConfig, num_examples: int) -> int:
    """Optimiser steps of a run: ``train.max_steps``, else ``train.epochs`` over ``num_examples``."""
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


# ---------------------------------------------------------------------------- setup


@dataclass
class Trainer:
    """Everything one training process works with, built by :func:`start_run`."""

    cfg: RunConfig
    run: RunDir
    accelerator: Any  # accelerate.Accelerator
    task: Task
    model: torch.nn.Module  # as prepared by accelerate (maybe wrapped for data parallelism)
    raw_model: torch.nn.Module  # the denoiser itself
    teacher: torch.nn.Module | None  # frozen dense copy of the initial weights (distillation)
    init_info: dict[str, Any] | None
    data: TrainData
    steps: int  # optimiser steps of the whole run
    micro: int  # examples per process and micro-batch
    optimizer: Any
    scheduler: torch.optim.lr_scheduler.LRScheduler
    engine: Engine
    ema: Any  # diffusers EMAModel

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process


def start_run(
    cfg: RunConfig,
    run: RunDir,
    accelerator: Any,
    resume: bool,
    quiet: bool,
    init_weights: str | Path | Mapping[str, torch.Tensor] | None = None,
) -> Trainer:
    """Check and build everything, then write the run's config.

    Nothing is written to the run directory until the configuration, the task, the first stage, the
    training data and the sparse engine are all in place: a start that fails (the trackers' start
    included) leaves no directory behind (when there was none before), so the corrected command can
    run, and a resumed run's config as it was. The main process creates the directory; the others wait
    for it.
    """
    if accelerator.is_main_process:
        run.check_start(cfg, resume)
    created = not run.path.exists()
    try:
        trainer = _build(cfg, run, accelerator, quiet, init_weights)
        # before the config: a tracker that cannot start (W&B not logged in) leaves a resumed run's as it was
        start_trackers(accelerator, cfg, run)
        if accelerator.is_main_process:
            run.write_config(cfg)
            run.checkpoints.clean_temporary()
    except BaseException:
        with contextlib.suppress(Exception):
            finish_trackers(accelerator)  # before their directories go
        if accelerator.is_main_process and created:
            shutil.rmtree(run.path, ignore_errors=True)  # e.g. a latent cache written into it
        raise
    accelerator.wait_for_everyone()
    return trainer


def _build(
    cfg: RunConfig,
    run: RunDir,
    accelerator: Any,
    quiet: bool,
    init_weights: str | Path | Mapping[str, torch.Tensor] | None,
) -> Trainer:
    from diffusers.training_utils import EMAModel

    t_cfg = cfg.train
    world = accelerator.num_processes
    if t_cfg.batch_size % (world * t_cfg.grad_accum):
        raise ConfigError(
            f"train.batch_size={t_cfg.batch_size} must be divisible by processes x grad_accum "
            f"= {world} x {t_cfg.grad_accum}"
        )
    device = accelerator.device
    task = make_task(cfg, run.path)
    torch.manual_seed(t_cfg.seed)  # the same initial weights on every rank
    model = task.build_model().to(device)
    init = init_weights if init_weights is not None else t_cfg.init_from
    init_state, init_info = load_init_weights(init, run.path)
    teacher = None
    if init_state is not None:
        load_state_checked(model, init_state, init_info.get("path") or "init_weights")
        if t_cfg.distill_weight > 0:
            # copied before the engine adds its hooks: the teacher stays dense (see sparse/nm.py)
            teacher = copy.deepcopy(model).eval().requires_grad_(False)
    data = task.train_data(
        device, is_main=accelerator.is_main_process, barrier=accelerator.wait_for_everyone, progress=not quiet
    )
    steps = total_steps(cfg, len(data))
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=t_cfg.lr, betas=tuple(t_cfg.betas), weight_decay=t_cfg.weight_decay
    )
    warmup = max(0, t_cfg.warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0
    )
    # before accelerator.prepare: with backend 'sparse' the engine replaces the layers and their parameters
    engine = sparsify(model, optimizer, cfg.sparse, total_steps=steps, grad_accum=t_cfg.grad_accum)
    ema = EMAModel(model.parameters(), decay=t_cfg.ema_decay, foreach=True)
    ema.to(device)
    engine.attach_ema(ema)  # zero where the model is: after every EMA step and topology update
    prepared, optimizer = accelerator.prepare(model, optimizer)
    return Trainer(
        cfg=cfg,
        run=run,
        accelerator=accelerator,
        task=task,
        model=prepared,
        raw_model=accelerator.unwrap_model(prepared),
        teacher=teacher,
        init_info=init_info,
        data=data,
        steps=steps,
        micro=t_cfg.batch_size // (world * t_cfg.grad_accum),
        optimizer=optimizer,
        scheduler=scheduler,
        engine=engine,
        ema=ema,
    )


# ---------------------------------------------------------------------------- checkpoints


def resume_from_checkpoint(tr: Trainer, quiet: bool) -> tuple[int, float, dict[str, Any]]:
    """Load the run's latest checkpoint into ``tr``; ``(step, training seconds so far, trainer state)``."""
    ckpt = tr.run.checkpoints.latest()
    if ckpt is None:
        if not quiet and tr.is_main:
            print(f"no checkpoint in {tr.run.path}; starting from step 0")
        return 0, 0.0, {}
    state = read_trainer_state(ckpt)
    load_model_weights(tr.raw_model, ckpt / MODEL_FILE)
    opt_tensors, opt_meta = load_tensors(ckpt / OPTIMIZER_FILE)
    saved_names = json.loads(opt_meta.get("param_names", "null"))
    if saved_names is not None and saved_names != optimizer_param_names(tr.optimizer, tr.raw_model):
        raise StateError(f"{ckpt / OPTIMIZER_FILE} holds the optimiser state of another model's parameters")
    tr.optimizer.optimizer.load_state_dict(optimizer_from_tensors(opt_tensors, opt_meta))
    eng_tensors, eng_meta = load_tensors(ckpt / ENGINE_FILE)
    tr.engine.load_state_dict(engine_state_from_tensors(eng_tensors, eng_meta))
    load_ema(tr.ema, tr.raw_model, ckpt / EMA_FILE)
    tr.scheduler.load_state_dict(state["scheduler"])
    start = int(state["step"])
    if not quiet and tr.is_main:
        print(f"resumed {tr.run.path} from {ckpt.name} (step {start} of {tr.steps})")
    return start, float(state.get("train_seconds", 0.0)), state


def save_checkpoint(
    tr: Trainer, step: int, train_seconds: float, watched: Mapping[str, Any] | None = None
) -> Path | None:
    """Write checkpoint ``step`` (main process; every process waits for it); its path on the main one.
    ``watched``: what the run's watching has done so far (grids drawn), kept with the trainer state."""
    tr.accelerator.wait_for_everyone()
    if not tr.is_main:
        return None
    files = {
        MODEL_FILE: (model_tensors(tr.raw_model), None),
        EMA_FILE: ema_tensors(tr.ema, tr.raw_model),
        OPTIMIZER_FILE: optimizer_to_tensors(
            tr.optimizer.optimizer.state_dict(), optimizer_param_names(tr.optimizer, tr.raw_model)
        ),
        ENGINE_FILE: engine_state_to_tensors(tr.engine.state_dict()),
    }
    trainer_state = {
        "scheduler": tr.scheduler.state_dict(),
        "total_steps": tr.steps,
        "train_seconds": train_seconds,
        **dict(watched or {}),
    }
    return tr.run.checkpoints.save(step, files, trainer_state)


# ---------------------------------------------------------------------------- one step


def train_step(tr: Trainer, sampler: EpochSampler, step: int, last_ckpt: Path | None) -> tuple[float, float]:
    """Optimiser step ``step`` (counted from 1); ``(mean loss, seconds)``."""
    t_cfg, acc = tr.cfg.train, tr.accelerator
    world, rank = acc.num_processes, acc.process_index
    t0 = time.perf_counter()
    first = (step - 1) * t_cfg.batch_size
    loss_sum = torch.zeros((), device=acc.device)
    for m in range(t_cfg.grad_accum):
        offset = first + (m * world + rank) * tr.micro
        batch = tr.data.batch(sampler.indices(offset, tr.micro), acc.device)
        gen = torch.Generator().manual_seed(derive_seed(t_cfg.seed, "step", step, m, rank))
        # gradients are all-reduced across processes on the last micro-batch only
        sync = contextlib.nullcontext() if m == t_cfg.grad_accum - 1 else acc.no_sync(tr.model)
        with sync, acc.autocast():
            if tr.teacher is None:
                loss = tr.task.loss(tr.model, batch, gen)
            else:
                w = t_cfg.distill_weight
                loss = tr.task.loss(tr.model, batch, gen, teacher=tr.teacher, distill_weight=w)
            loss = loss / t_cfg.grad_accum
        acc.backward(loss)
        loss_sum += loss.detach()
    # Stop before a non-finite loss reaches the weights (all ranks agree on the verdict).
    bad = (~torch.isfinite(loss_sum)).float()
    if acc.reduce(bad, reduction="sum").item() > 0:
        where = (
            f"The last good checkpoint is {last_ckpt} (resume with --resume after lowering train.lr)."
            if last_ckpt
            else "No checkpoint was written yet."
        )
        raise TrainingError(f"the loss became {loss_sum.item()} at step {step}; training stopped. {where}")
    tr.engine.mask_gradients()  # clip the norm of the sparse gradient, not of the dense one
    if t_cfg.grad_clip:
        acc.clip_grad_norm_(tr.model.parameters(), t_cfg.grad_clip)
    tr.optimizer.step()
    tr.scheduler.step()
    tr.engine.step()
    tr.optimizer.zero_grad(set_to_none=True)
    tr.ema.step(tr.raw_model.parameters())
    dt = time.perf_counter() - t0
    return loss_sum.item(), dt


# ---------------------------------------------------------------------------- logging


class MetricsLog:
    """The run's metrics records (``RunDir.METRICS``), averaged over ``train.log_every`` steps, and the
    progress bar."""

    def __init__(self, tr: Trainer, start: int, quiet: bool):
        self.tr = tr
        self.file = open(tr.run.metrics_path, "a") if tr.is_main else None  # noqa: SIM115
        desc = f"train {tr.cfg.name} {tr.cfg.sparse.method}"
        self.bar = progress_bar(total=tr.steps, initial=start, desc=desc, quiet=quiet or not tr.is_main)
        self._reset()

    def _reset(self) -> None:
        self.loss, self.n, self.new, self.time = 0.0, 0, 0, 0.0

    def add(self, step: int, end: int, loss: float, seconds: float) -> dict[str, Any] | None:
        """Account for step ``step``; write a record every ``log_every`` steps and at ``end`` (returned;
        None on the other steps and processes)."""
        tr = self.tr
        self.loss += loss
        self.n += 1
        self.time += seconds
        self.new += tr.engine.new_connections()
        record = None
        if self.file is not None and (step % tr.cfg.train.log_every == 0 or step == end):
            report = tr.engine.report()
            record = {
                "step": step,
                "loss": self.loss / self.n,
                "lr": tr.scheduler.get_last_lr()[0],
                "density": report.target_density,
                "topology_updates": tr.engine.num_updates,
                "topology_changes": self.new,
                **(
                    {"ever_active": report.ever_active_fraction}
                    if report.ever_active_fraction is not None
                    else {}
                ),
                **({"pattern": str(tr.engine.pattern)} if tr.engine.pattern is not None else {}),
                "step_time": self.time / self.n,
                "samples_per_s": tr.cfg.train.batch_size * self.n / max(self.time, 1e-9),
            }
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", density=f"{record['density']:.3f}")
            self._reset()
        self.bar.update(1)
        return record

    def close(self) -> None:
        self.bar.close()
        if self.file is not None:
            self.file.close()


# ---------------------------------------------------------------------------- the loop


def train(
    cfg: RunConfig,
    run_dir: str | Path | RunDir,
    resume: bool = False,
    quiet: bool = False,
    stop_after: int | None = None,
    init_weights: str | Path | Mapping[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Train ``cfg`` into ``run_dir``; returns the summary (also written to the run's summary file).

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

    run = RunDir(run_dir)
    trackers = check_watch_settings(cfg)  # a tracker that is not installed fails before anything is written
    accelerator = Accelerator(
        mixed_precision=cfg.train.mixed_precision,
        cpu=not torch.cuda.is_available(),
        log_with=make_trackers(trackers, cfg, run, quiet=quiet) or None,
    )
    tr = start_run(cfg, run, accelerator, resume, quiet, init_weights)
    log = None
    try:  # from here on the trackers are open: closed whatever happens
        start, seconds_before, state = resume_from_checkpoint(tr, quiet) if resume else (0, 0.0, {})
        flops = count_flops(tr.raw_model, tr.task.example_inputs(tr.raw_model), tr.engine)

        sampler = EpochSampler(len(tr.data), cfg.train.seed)
        watch = Watch(tr, int(state.get("sample_grids", 0)), float(state.get("sample_grid_seconds", 0.0)))
        log = MetricsLog(tr, start, quiet)
        train_seconds = 0.0
        last_ckpt = run.checkpoints.latest()
        step = start
        end = tr.steps if stop_after is None else min(tr.steps, start + stop_after)

        def checkpoint() -> Path | None:
            watched = {"sample_grids": watch.grids, "sample_grid_seconds": watch.grid_seconds}
            return save_checkpoint(tr, step, seconds_before + train_seconds, watched) or last_ckpt

        tr.model.train()
        while step < end:
            step += 1
            loss, seconds = train_step(tr, sampler, step, last_ckpt)
            train_seconds += seconds
            record = log.add(step, end, loss, seconds)
            if record is not None:
                watch.log_record(record)
            watch.after_step(step)  # the topology after an update, the sample grid when one is due
            if step % cfg.train.ckpt_every == 0 and step < end:
                last_ckpt = checkpoint()
        last_ckpt = checkpoint()
    finally:
        if log is not None:
            log.close()
        finish_trackers(accelerator)

    consistency = _rank_consistency(accelerator, tr.engine, tr.raw_model)
    summary: dict[str, Any] = {}
    if tr.is_main:
        result = summarize(tr, step, seconds_before + train_seconds, last_ckpt, flops, consistency)
        result.sample_grids = watch.grids or None  # the whole run's (kept in its checkpoints)
        result.sample_grid_seconds = watch.grid_seconds if watch.grids else None
        summary = run.write_summary(result)
    accelerator.wait_for_everyone()
    tr.engine.remove()
    return summary


# ---------------------------------------------------------------------------- summary


def summarize(
    tr: Trainer,
    step: int,
    train_seconds: float,
    last_ckpt: Path | None,
    flops: Any,
    consistency: dict[str, bool],
) -> RunSummary:
    """The run's :class:`RunSummary` after ``step`` steps (``flops``: the model's forward FLOP report)."""
    cfg, t_cfg = tr.cfg, tr.cfg.train
    # FLOPs of one optimiser step's batch, by the method's own rule (N:M fine-tuning pays dense FLOPs)
    cost_method = cfg.sparse.method
    dense, sparse = flops.flops_dense * t_cfg.batch_size, flops.flops_sparse * t_cfg.batch_size
    teacher = dense if tr.teacher is not None else 0  # the teacher's forward
    per_step = training_flops_per_step(cost_method, dense, sparse, cfg.sparse.update_every)
    total = training_flops_total(
        cost_method, dense, sparse, tr.steps, cfg.sparse.update_every, tr.engine.end_step
    )
    report = tr.engine.report()
    return RunSummary(
        preset=cfg.name,
        family=cfg.family,
        method=cfg.sparse.method,
        sparsity=1.0 - report.target_density,
        steps=step,
        total_steps=tr.steps,
        finished=step >= tr.steps,
        world_size=tr.accelerator.num_processes,
        masks_identical_across_ranks=consistency["masks_identical_across_ranks"],
        weights_identical_across_ranks=consistency["weights_identical_across_ranks"],
        batch_size=t_cfg.batch_size,
        train_seconds=train_seconds,
        params_total=report.params_total,
        params_nonzero=report.params_nonzero,
        density=report.density,
        target_density=report.target_density,
        topology_updates=tr.engine.num_updates,
        flops_forward_dense=flops.flops_dense,
        flops_forward_sparse=flops.flops_sparse,
        flops_train_per_step=per_step + teacher,
        flops_train_total=total + teacher * tr.steps,
        flops_train_total_dense=3.0 * dense * tr.steps,
        checkpoint=str(last_ckpt) if last_ckpt else None,
        checkpoint_bytes=directory_nbytes(last_ckpt) if last_ckpt else None,
        init_from=tr.init_info,
        distill_weight=t_cfg.distill_weight if tr.teacher is not None else 0.0,
        task=tr.task.describe(),
        topology=_topology(report),
    )


def _topology(report: Any) -> dict[str, Any] | None:
    """The summary's picture of the topology: the fraction of the sparsified weights ever active and, per
    layer, density and fraction ever active (None for dense and N:M runs)."""
    if report.ever_active_fraction is None or not report.layers:
        return None
    return {"ever_active": report.ever_active_fraction, "layers": topology_layers(report)}


def _digest(tensors) -> int:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return int.from_bytes(h.digest()[:7], "little")  # fits an int64


def _rank_consistency(accelerator: Any, engine: Engine, model: torch.nn.Module) -> dict[str, bool]:
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
