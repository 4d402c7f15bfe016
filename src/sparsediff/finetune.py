"""N:M fine-tuning of a pretrained denoiser (SparseDM, Paper B) and the one-shot N:M baseline.

``sparsediff finetune --from SOURCE --method srste|oneshot --nm 2:4 --out DIR`` makes a new run directory
from a pretrained denoiser:

- **SOURCE** is a sparsediff run directory (its config and the EMA weights of its latest checkpoint,
  with the run's final masks) or a diffusers ``UNet2DModel`` directory saved with
  ``save_pretrained`` (or a pipeline directory holding ``unet/``); a diffusers source needs ``--preset``
  for everything a UNet does not carry: data, first stage, noise schedule, sampling.
- **srste**: SR-STE fine-tuning with distillation. The new run's config is the source's with
  ``sparse.method=srste`` and the N:M pattern (or a progressive schedule), SparseDM's optimiser
  settings scaled to the run's length (below), and ``train.init_from`` naming the source weights,
  copied into the run directory (``RunDir.INIT``) so that it stays self-contained and resumable
  (``sparsediff train --resume --out DIR``). The training loop starts the student from them and, with
  ``train.distill_weight > 0``, distils from a frozen dense copy of them:
  ``loss = ||eps - eps_s||^2 + w * ||eps_teacher - eps_s||^2``.
- **oneshot**: no training; the source weights are pruned to N:M by magnitude (``one_shot_nm``) and
  written as a finished run (step 0) that ``sparsediff sample`` / ``evaluate`` / ``export`` read like any
  other. Its config says ``sparse.method: oneshot`` (masked to ``sparse.nm``) with
  ``train.max_steps: 0``, and so does its summary.

SparseDM's optimiser (Paper B): AdamW, lr 2e-4, weight decay 0.03, betas (0.99, 0.999), 2,500 warm-up
steps, EMA 0.9999. The paper does not give its fine-tuning length, so for a run of S steps the warm-up
is ``min(2500, ceil(0.05 S))`` and the EMA decay ``min(0.9999, 1 - 1 / max(1, 0.1 S))`` (an EMA horizon
of a tenth of the run) **(assumed)**. Anything given with ``--set`` wins over these defaults.
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint import (
    EMA_FILE,
    ENGINE_FILE,
    MODEL_FILE,
    load_state_checked,
    model_tensors,
    read_trainer_state,
    save_tensors,
)
from .config import RunConfig, config_from_dict, deep_update, load_raw, preset_path
from .errors import ConfigError
from .run import RunDir, RunSummary, load_masked_model
from .sparse import count_flops, one_shot_nm, sparsify
from .sparse.io import engine_state_to_tensors
from .sparse.methods import get_method, method_names
from .sparse.nm import parse_nm, parse_progressive, progressive_schedule
from .tasks import make_task
from .train import total_steps, train

FINETUNE_METHODS = method_names(structured=True)  # N:M methods: fine-tuning (srste) or pruning once

# SparseDM (Paper B) fine-tuning settings.
SPARSEDM_OPTIMIZER = {"lr": 2e-4, "weight_decay": 0.03, "betas": [0.99, 0.999]}
SPARSEDM_WARMUP_STEPS = 2500
SPARSEDM_EMA_DECAY = 0.9999
WARMUP_FRACTION = 0.05  # (assumed) warm-up as a fraction of the fine-tuning steps, at most 2,500
EMA_HORIZON_FRACTION = 0.1  # (assumed) EMA horizon 1 / (1 - decay) as a fraction of the steps


# ---------------------------------------------------------------------------- sources


@dataclass
class Source:
    """A pretrained denoiser: its settings, its weights and where they came from.

    Attributes:
        kind: ``"run"`` (a sparsediff run directory) or ``"diffusers"`` (a ``UNet2DModel`` directory).
        path: the directory.
        config: the run's resolved config as a dict; for a diffusers source, the preset's with the UNet's
            own architecture as ``model``.
        state: the denoiser's state dict (CPU, float32), keys as in sparsediff's denoiser.
        info: JSON-able provenance (recorded in the run's init weights and summary).
    """

    kind: str
    path: Path
    config: dict[str, Any]
    state: dict[str, torch.Tensor]
    info: dict[str, Any]


def _diffusers_unet_dir(path: Path) -> tuple[str | None, str | None]:
    """``(subfolder, class name)`` of a diffusers directory's model, or ``(None, None)``."""
    for sub in (None, "unet"):
        cfg_file = path / sub / "config.json" if sub else path / "config.json"
        if sub and not (path / "model_index.json").exists():
            continue
        if cfg_file.exists():
            try:
                cls = json.loads(cfg_file.read_text()).get("_class_name")
            except (OSError, json.JSONDecodeError) as e:
                raise ConfigError(f"{cfg_file} is not a readable diffusers config: {e}") from None
            return sub, cls
    return None, None


def _plain(value: Any) -> Any:
    """Tuples -> lists, recursively (YAML's safe dumper and the config loader take lists)."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def load_source(source: str | Path, preset: str | None = None, use_ema: bool = True) -> Source:
    """Read a pretrained denoiser from a sparsediff run directory or a diffusers ``UNet2DModel`` directory.

    Args:
        source: the directory.
        preset: preset name or YAML path; required for (and only allowed with) a diffusers source.
        use_ema: for a run, start from its EMA weights (default) rather than the raw ones.

    Raises:
        ConfigError: the path does not exist, is neither kind of directory, holds another diffusers
            class, or ``preset`` is missing / superfluous.
        StateError: the run has no checkpoint, or its files do not fit its model.
    """
    path = Path(source)
    if not path.exists():
        raise ConfigError(f"--from {source}: no such file or directory")
    if not path.is_dir():
        raise ConfigError(
            f"--from {source} is a file; give a sparsediff run directory (with {RunDir.CONFIG}) or a "
            "diffusers UNet2DModel directory (with config.json)"
        )
    if RunDir(path).exists():
        if preset is not None:
            raise ConfigError(
                f"--preset is only for a diffusers source; {source} is a sparsediff run whose "
                f"{RunDir.CONFIG} gives every setting (change single fields with --set)"
            )
        cfg, model, loaded = load_masked_model(path, use_ema)  # a sparse source is the model it samples with
        ckpt = Path(loaded["checkpoint"])
        info = {
            "kind": "run",
            "source": str(path.resolve()),
            "checkpoint": str(ckpt.resolve()),
            "step": int(read_trainer_state(ckpt).get("step", 0)),
            "weights": loaded["weights"],
            "source_method": cfg.sparse.method,
            "masked_layers": loaded.get("masked_layers", 0),
        }
        return Source("run", path, cfg.to_dict(), model_tensors(model), info)

    subfolder, cls = _diffusers_unet_dir(path)
    if cls is None:
        raise ConfigError(
            f"--from {source} is neither a sparsediff run directory (no {RunDir.CONFIG}) nor a diffusers "
            "UNet2DModel directory (no config.json, nor model_index.json with unet/config.json)"
        )
    if cls != "UNet2DModel":
        raise ConfigError(
            f"--from {source} holds a diffusers {cls}; finetune takes a UNet2DModel (or a pipeline "
            "directory with unet/)"
        )
    if preset is None:
        raise ConfigError(
            f"--from {source} is a diffusers UNet2DModel: give --preset too, for the data, first stage, "
            "noise schedule and sampling settings a UNet does not carry"
        )
    from .models.unet import UNetDenoiser

    try:
        denoiser = UNetDenoiser.from_pretrained(path, subfolder=subfolder)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--from {source}: cannot load the UNet2DModel: {e}") from None
    args = {k: _plain(v) for k, v in denoiser.unet.config.items() if not k.startswith("_")}
    data = load_raw(preset)
    data["model"] = {"kind": "unet2d", "args": args}
    state = {k: v.float() if v.is_floating_point() else v for k, v in model_tensors(denoiser).items()}
    info = {
        "kind": "diffusers",
        "source": str(path.resolve()),
        "subfolder": subfolder,
        "preset": str(preset_path(preset)),
        "weights": "model",
    }
    return Source("diffusers", path, data, state, info)


# ---------------------------------------------------------------------------- configs


def _progressive(
    progressive: str | list[str] | None, nm: str | None, steps: int | None
) -> tuple[str, list[str]]:
    """``(final pattern, schedule entries "N:M@step")`` from ``--nm`` / ``--progressive``."""
    if progressive is None or progressive == [] or progressive == "":
        return str(parse_nm(nm or "2:4")), []
    entries = (
        [e.strip() for e in progressive.split(",")] if isinstance(progressive, str) else list(progressive)
    )
    entries = [e for e in entries if e]
    with_steps = [("@" in e) for e in entries]
    if all(with_steps):
        schedule = [f"{p}@{s}" for s, p in parse_progressive(entries)]
    elif not any(with_steps):
        if steps is None:
            raise ConfigError("a progressive schedule at equal intervals needs the number of steps")
        schedule = progressive_schedule(steps, entries)
    else:
        raise ConfigError(
            f"--progressive: give every pattern without steps (equal intervals, e.g. 7:8,6:8,2:4) or every "
            f"one with its step (7:8@0,2:4@500), not a mix: {entries}"
        )
    final = schedule[-1].split("@")[0]
    if nm is not None and str(parse_nm(nm)) != final:
        raise ConfigError(f"--nm {nm} differs from the progressive schedule's final pattern {final}")
    return final, schedule


def _planned_steps(data: dict[str, Any], run_dir: Path) -> int:
    """Optimiser steps of the run ``data`` describes (loads the dataset only when it is set in epochs)."""
    cfg = config_from_dict(data, source="finetune config")
    if cfg.train.max_steps is not None:
        return int(cfg.train.max_steps)
    if cfg.train.epochs is None:
        raise ConfigError("set the fine-tuning length with --steps (or train.max_steps / train.epochs)")
    n = len(make_task(cfg, run_dir).train_data(torch.device("cpu"), progress=False))
    return total_steps(cfg, n)


def sparsedm_schedule(steps: int) -> dict[str, Any]:
    """SparseDM's warm-up and EMA decay scaled to a run of ``steps`` optimiser steps (see module doc)."""
    warmup = min(SPARSEDM_WARMUP_STEPS, math.ceil(WARMUP_FRACTION * steps))
    horizon = max(1.0, EMA_HORIZON_FRACTION * steps)
    ema = round(min(SPARSEDM_EMA_DECAY, 1.0 - 1.0 / horizon), 6)
    return {"warmup_steps": int(warmup), "ema_decay": ema}


def finetune_config(
    source: Source,
    method: str,
    *,
    nm: str | None = None,
    progressive: str | list[str] | None = None,
    distill_weight: float | None = None,
    steps: int | None = None,
    overrides: dict[str, Any] | None = None,
    run_dir: Path | None = None,
) -> RunConfig:
    """The new run's config: the source's, made N:M (see the module docstring for what changes).

    Args:
        source: from :func:`load_source`.
        method: ``"srste"`` or ``"oneshot"``.
        nm: N:M pattern (``"2:4"`` by default; the final one of a progressive schedule).
        progressive: ``"7:8,6:8,5:8,4:8,2:4"`` (equal intervals of training) or entries ``"N:M@step"``
            (srste only).
        distill_weight: weight of the teacher term (``train.distill_weight``; 0.1 by default).
        steps: fine-tuning steps (``train.max_steps``); by default the source config's length.
        overrides: nested ``--set`` overrides, applied last.
        run_dir: where the run goes (only used to cache latents when the length is given in epochs).
    """
    if method not in FINETUNE_METHODS:
        raise ConfigError(f"unknown finetune method {method!r}; choose one of {', '.join(FINETUNE_METHODS)}")
    trains = get_method(method).has_engine
    if not trains and progressive:
        raise ConfigError("--progressive is for --method srste; oneshot prunes once, to --nm")
    overrides = copy.deepcopy(overrides or {})
    user_train = dict(overrides.get("train", {}))
    data = copy.deepcopy(source.config)
    base_desc = f"{source.kind} {source.path}"

    if not trains:
        pattern = parse_nm(nm or "2:4")
        deep_update(
            data,
            {
                "description": f"one-shot {pattern} magnitude pruning of {base_desc} (no training)",
                "sparse": {
                    "method": "oneshot",
                    "nm": str(pattern),
                    "progressive": [],
                    "sparsity": 1 - pattern.density,
                },
                "train": {"max_steps": 0, "epochs": None, "init_from": None},
            },
        )
        deep_update(data, overrides)
        return config_from_dict(data, source=f"finetune of {source.path}")

    # srste: the length first (the schedule and the scaled defaults depend on it)
    train_update: dict[str, Any] = dict(SPARSEDM_OPTIMIZER)
    if steps is not None:
        if steps < 1:
            raise ConfigError(f"--steps must be at least 1, got {steps}")
        train_update.update(max_steps=int(steps), epochs=None)
    if distill_weight is not None:
        if not math.isfinite(distill_weight) or distill_weight < 0:
            raise ConfigError(f"--distill-weight must be a finite number >= 0, got {distill_weight}")
        train_update["distill_weight"] = float(distill_weight)
    deep_update(data, {"train": train_update})
    deep_update(data, overrides)
    total = _planned_steps(data, run_dir or Path("."))
    if data["train"].get("max_steps") is None:
        data["train"]["max_steps"], data["train"]["epochs"] = total, None  # explicit in the run's config
    final, schedule = _progressive(progressive, nm, total)
    pattern = parse_nm(final)
    scaled = {k: v for k, v in sparsedm_schedule(total).items() if k not in user_train}
    how = f"progressive {' -> '.join(e.split('@')[0] for e in schedule)}" if schedule else str(pattern)
    deep_update(
        data,
        {
            "description": f"SR-STE {how} fine-tuning (SparseDM) of {base_desc}",
            "sparse": {
                "method": "srste",
                "nm": final,
                "progressive": schedule,
                "sparsity": 1 - pattern.density,
            },
            "train": {**scaled, "init_from": RunDir.INIT},
        },
    )
    deep_update(data, overrides)  # --set still wins
    return config_from_dict(data, source=f"finetune of {source.path}")


# ---------------------------------------------------------------------------- checks


def _check_model(cfg: RunConfig, source: Source, run_dir: Path) -> torch.nn.Module:
    """Build the new run's denoiser with the source weights and check that N:M masks fit it."""
    from .models import build_model

    model = build_model(cfg.model)
    load_state_checked(model, source.state, f"the weights of {source.path}")
    sparsify(
        model, None, cfg.sparse, **_as_engine(cfg), total_steps=max(1, cfg.train.max_steps or 1)
    ).remove()
    if source.kind == "diffusers":
        expected = tuple(make_task(cfg, run_dir).data_shape())
        if tuple(model.sample_shape) != expected:
            raise ConfigError(
                f"the UNet2DModel in {source.path} takes inputs of shape {tuple(model.sample_shape)} but the "
                f"preset's data (first stage {cfg.first_stage.kind}, image_size {cfg.data.image_size}) gives "
                f"{expected}; choose a matching --preset"
            )
    return model


def _as_engine(cfg: RunConfig) -> dict[str, Any]:
    """``sparsify`` keywords for the run's engine: a one-shot run is masked like an SR-STE run to its
    pattern (one-shot pruning itself is no engine)."""
    method = cfg.sparse.sparse_method
    return {} if method.has_engine else {"method": method.engine_method()}


def _check_out(out: RunDir) -> None:
    if out.exists():
        raise ConfigError(
            f"{out.path} already holds a run; continue it with `sparsediff train --resume --out {out.path}` "
            "or choose another --out"
        )


# ---------------------------------------------------------------------------- the two methods


def finetune(
    source: str | Path,
    out: str | Path,
    *,
    method: str = "srste",
    nm: str | None = None,
    progressive: str | list[str] | None = None,
    distill_weight: float | None = None,
    steps: int | None = None,
    preset: str | None = None,
    overrides: dict[str, Any] | None = None,
    use_ema: bool = True,
    quiet: bool = False,
    stop_after: int | None = None,
    prepare_only: bool = False,
) -> dict[str, Any]:
    """Make ``source`` N:M-sparse into the run directory ``out``; returns the run's summary.

    Args:
        source: a sparsediff run directory or a diffusers ``UNet2DModel`` directory.
        out: the new run directory (must not hold a run yet).
        method: ``"srste"`` (SR-STE fine-tuning with distillation) or ``"oneshot"`` (magnitude pruning).
        nm, progressive, distill_weight, steps, overrides: see :func:`finetune_config`.
        preset: the preset of a diffusers source.
        use_ema: start from a run's EMA weights (default) or its raw weights.
        stop_after: srste only: stop (with a checkpoint) after this many steps; resume with
            ``train(load_run_config(out), out, resume=True)``.
        prepare_only: srste only: write the run's config and init weights and return without
            training (``{"out", "config"}``); train with ``sparsediff train --resume --out OUT``, for
            example under ``accelerate launch`` or ``torchrun`` for several GPUs.
    """
    run = RunDir(out)
    _check_out(run)
    src = load_source(source, preset, use_ema)
    cfg = finetune_config(
        src,
        method,
        nm=nm,
        progressive=progressive,
        distill_weight=distill_weight,
        steps=steps,
        overrides=overrides,
        run_dir=run.path,
    )
    model = _check_model(cfg, src, run.path)  # every check that can fail runs before anything is written
    if not cfg.sparse.sparse_method.has_engine:
        if prepare_only:
            raise ConfigError("--prepare-only is for --method srste; oneshot does not train")
        return _oneshot(cfg, src, model, run)

    run.path.mkdir(parents=True, exist_ok=True)
    tmp = run.path / f".tmp-{os.getpid()}-{RunDir.INIT}"  # renamed into place: readers never see half a file
    save_tensors(tmp, src.state, {"sparsediff_init": json.dumps(src.info)})
    os.replace(tmp, run.init_path)
    if prepare_only:
        run.write_config(cfg)
        return {"out": str(run.path), "config": cfg.to_dict()}
    return train(cfg, run, quiet=quiet, stop_after=stop_after)


def _oneshot(cfg: RunConfig, src: Source, model: torch.nn.Module, run: RunDir) -> dict[str, Any]:
    """Prune ``model`` (holding the source weights) to N:M by magnitude and write it as a finished run."""
    s = cfg.sparse
    pattern = parse_nm(s.nm)
    masks = one_shot_nm(
        model,
        pattern.n,
        pattern.m,
        include=s.include or None,
        exclude=s.exclude or None,
        incompatible=s.nm_incompatible,
    )
    task = make_task(cfg, run.path)
    engine = sparsify(model, None, s, **_as_engine(cfg))  # the masks of the pruned weights
    try:
        problems = engine.check_invariants()
        if problems:  # cannot happen unless one_shot_nm and the engine disagree
            raise RuntimeError(f"one-shot N:M pruning left groups that are not {pattern}: {problems[:3]}")
        report = engine.report()
        flops = count_flops(model, task.example_inputs(model), engine)
        engine_files = engine_state_to_tensors(engine.state_dict())
    finally:
        engine.remove()

    run.write_config(cfg)
    ema = {n: p.detach() for n, p in model.named_parameters()}
    ckpt = run.checkpoints.save(
        0,
        {
            MODEL_FILE: (model_tensors(model), None),
            EMA_FILE: (ema, {"optimization_step": "0", "decay": str(cfg.train.ema_decay)}),
            ENGINE_FILE: engine_files,
        },
        {"total_steps": 0, "train_seconds": 0.0, "oneshot": True},
    )
    summary = RunSummary(
        preset=cfg.name,
        family=cfg.family,
        method=s.method,
        pattern=str(pattern),
        sparsity=1.0 - report.target_density,
        steps=0,
        total_steps=0,
        finished=True,
        world_size=1,
        batch_size=cfg.train.batch_size,
        train_seconds=0.0,
        params_total=report.params_total,
        params_nonzero=report.params_nonzero,
        density=report.density,
        target_density=report.target_density,
        masked_layers=len(masks),
        dense_layers=dict(report.dense_layers),
        topology_updates=0,
        flops_forward_dense=flops.flops_dense,
        flops_forward_sparse=flops.flops_sparse,
        flops_train_per_step=0.0,
        flops_train_total=0.0,
        flops_train_total_dense=0.0,
        checkpoint=str(ckpt),
        init_from={"path": None, **src.info},
        distill_weight=0.0,
        task=task.describe(),
    )
    return run.write_summary(summary)
