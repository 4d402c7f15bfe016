"""The paper's grid with one command, and a report built from run directories.

``sparsediff sweep`` expands methods x sparsities x prune ratios x seeds into one run directory per
point (``rigl-s0.9-p0.05-seed0``; dense once per seed; static ignores the prune ratio), trains and
evaluates each, and can be stopped and started again at any moment: a finished and evaluated run is never
repeated, an interrupted one resumes from its latest checkpoint, and a run whose ``eval.json`` is older
than its last checkpoint is evaluated again. ``sparsediff report`` (:mod:`sparsediff.reporting`,
re-exported here) reads nothing but run directories and writes ``report.md`` (the paper-style table),
``results.csv`` (every number of every run) and PNG plots.

Layout of a sweep directory::

    OUT/sweep.json              the grid, the command that reproduces it, earlier invocations
    OUT/configs/<run>.yaml      the exact configuration of every run
    OUT/first-stage/            the shared first stage, when the sweep had to train one
    OUT/<run>/                  one run directory per grid point (+ train.log / evaluate.log with --jobs > 1)
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, SparsediffError, TrainingError
from .reporting import (
    DYNAMIC_METHODS,
    GRID_KEYS,
    RunRecord,
    find_runs,
    flatten,
    load_run,
    mean_std,
    read_json,
    read_metrics,
    report,
    unique,
)

__all__ = [
    "GridPoint",
    "PlannedRun",
    "RunRecord",
    "RunStatus",
    "expand_grid",
    "find_runs",
    "load_run",
    "mean_std",
    "plan_runs",
    "read_metrics",
    "report",
    "resolve_first_stage",
    "run_status",
    "sweep",
    "sweep_command",
]

SWEEP_METHODS = ("dense", "static", "rigl", "magran")


# ---------------------------------------------------------------------------- the grid


@dataclass(frozen=True)
class GridPoint:
    """One run of a sweep: a method, its sparsity and prune ratio (None where unused), a seed."""

    method: str
    sparsity: float
    prune_ratio: float | None
    seed: int

    @property
    def name(self) -> str:
        """Stable, readable run-directory name: ``dense-seed0``, ``static-s0.5-seed0``, ``rigl-s0.9-p0.05-seed1``."""
        parts = [self.method]
        if self.method != "dense":
            parts.append(f"s{self.sparsity:g}")
        if self.prune_ratio is not None:
            parts.append(f"p{self.prune_ratio:g}")
        parts.append(f"seed{self.seed}")
        return "-".join(parts)

    def overrides(self) -> dict[str, Any]:
        """Config overrides of this point (the seed drives both the weights/data and the masks)."""
        sparse: dict[str, Any] = {"method": self.method, "sparsity": self.sparsity, "seed": self.seed}
        if self.prune_ratio is not None:
            sparse["prune_ratio"] = self.prune_ratio
        return {"sparse": sparse, "train": {"seed": self.seed}}


def expand_grid(
    methods: Sequence[str],
    sparsities: Sequence[float],
    prune_ratios: Sequence[float] | None,
    seeds: Sequence[int],
) -> list[GridPoint]:
    """All points of the grid, seed by seed: dense once per seed, static once per sparsity, RigL and
    MagRan once per sparsity and prune ratio.

    Raises:
        ConfigError: an unknown method, a sparsity outside (0, 1), a prune ratio outside (0, 1], a
            negative seed, or a sparse method without sparsities (or a dynamic one without prune ratios).
    """
    methods = unique(m.strip().lower() for m in methods)
    unknown = [m for m in methods if m not in SWEEP_METHODS]
    if unknown:
        hint = (
            " (srste fine-tunes a pretrained model: use `sparsediff finetune`)" if "srste" in unknown else ""
        )
        raise ConfigError(
            f"unknown sweep method {unknown[0]!r}; choose from {', '.join(SWEEP_METHODS)}{hint}"
        )
    if not methods:
        raise ConfigError("the sweep needs at least one method")
    sparsities = unique(float(s) for s in sparsities)
    prunes = unique(float(p) for p in prune_ratios or [])
    seeds = unique(int(s) for s in seeds)
    for s in sparsities:
        if not 0.0 < s < 1.0:
            raise ConfigError(f"sparsity must be in (0, 1), got {s:g} (dense is its own method)")
    for p in prunes:
        if not 0.0 < p <= 1.0:
            raise ConfigError(f"prune ratio must be in (0, 1], got {p:g}")
    if not seeds or any(s < 0 for s in seeds):
        raise ConfigError(f"seeds must be one or more whole numbers >= 0, got {seeds}")
    sparse = [m for m in methods if m != "dense"]
    if sparse and not sparsities:
        raise ConfigError(f"method(s) {', '.join(sparse)} need --sparsities")
    if any(m in DYNAMIC_METHODS for m in methods) and not prunes:
        raise ConfigError("rigl and magran need --prune-ratios")
    points = []
    for seed in seeds:
        for method in methods:
            if method == "dense":
                points.append(GridPoint("dense", 0.0, None, seed))
                continue
            for s in sparsities:
                for p in prunes if method in DYNAMIC_METHODS else [None]:
                    points.append(GridPoint(method, s, p, seed))
    return points


@dataclass
class PlannedRun:
    """A grid point with its resolved configuration and run directory."""

    point: GridPoint
    cfg: Any  # RunConfig
    run_dir: Path
    config_file: Path


def _as_override_dict(overrides: dict[str, Any] | Sequence[str] | None) -> dict[str, Any]:
    from .config import parse_overrides

    if overrides is None:
        return {}
    if isinstance(overrides, dict):
        return json.loads(json.dumps(overrides))  # a deep copy of plain data
    return parse_overrides(list(overrides))


def plan_runs(
    preset: str,
    points: Sequence[GridPoint],
    out: str | Path,
    steps: int | None = None,
    overrides: dict[str, Any] | Sequence[str] | None = None,
    first_stage: str | Path | None = None,
) -> list[PlannedRun]:
    """Resolve every point's configuration (preset + ``overrides`` + steps + first stage + the point).

    Raises:
        ConfigError: a bad preset or override (naming the key), or an override of a key the grid sets.
    """
    from .config import deep_update, load_config

    out = Path(out).resolve()
    base = _as_override_dict(overrides)
    clash = sorted(k for k in flatten(base) if k in GRID_KEYS)
    if clash:
        raise ConfigError(
            f"--set {clash[0]} conflicts with the grid; use --methods / --sparsities / --prune-ratios / --seeds"
        )
    if steps is not None:
        if steps < 1:
            raise ConfigError(f"--steps must be >= 1, got {steps}")
        deep_update(base, {"train": {"max_steps": int(steps)}})
    if first_stage is not None:
        deep_update(base, {"first_stage": {"path": str(Path(first_stage).resolve())}})
    planned = []
    for point in points:
        data = deep_update(json.loads(json.dumps(base)), point.overrides())
        cfg = load_config(preset, data)
        planned.append(PlannedRun(point, cfg, out / point.name, out / "configs" / f"{point.name}.yaml"))
    return planned


# ---------------------------------------------------------------------------- state of a run directory


@dataclass
class RunStatus:
    """Where a run directory stands: ``new``, ``partial`` (a checkpoint, not finished), ``trained``
    (finished, no up-to-date evaluation) or ``evaluated`` (nothing left to do)."""

    state: str
    step: int = 0


def run_status(run_dir: str | Path, max_steps: int | None = None) -> RunStatus:
    """Inspect ``run_dir``. A finished run counts as unfinished when ``max_steps`` asks for more steps."""
    from .checkpoint import CheckpointDir, read_trainer_state

    run_dir = Path(run_dir)
    ckpt = CheckpointDir(run_dir / "checkpoints").latest()
    step = int(read_trainer_state(ckpt).get("step", 0)) if ckpt is not None else 0
    summary = read_json(run_dir / "summary.json") or {}
    finished = bool(summary.get("finished")) and ckpt is not None
    if finished and max_steps is not None and int(summary.get("steps", 0)) < max_steps:
        finished = False
    if not finished:
        return RunStatus("partial" if step else "new", step)
    eval_path = run_dir / "eval.json"
    newer = eval_path.exists() and eval_path.stat().st_mtime_ns > (ckpt / "trainer.json").stat().st_mtime_ns
    if newer and read_json(eval_path) is not None:  # a torn eval.json (killed while writing) counts as none
        return RunStatus("evaluated", step)
    return RunStatus("trained", step)


# ---------------------------------------------------------------------------- first stage


def resolve_first_stage(
    preset: str,
    overrides: dict[str, Any] | Sequence[str] | None,
    first_stage: str | Path | None,
    out: Path,
    quiet: bool = False,
) -> str | None:
    """The first-stage directory the sweep's runs share, or None when the preset needs none.

    Order: ``first_stage``; else ``first_stage.path`` of the preset (after ``overrides``); else one
    trained once into ``OUT/first-stage`` with ``train_autoencoder`` (reused when already complete).

    Raises:
        ConfigError: the directory does not exist, or the preset needs a pretrained first stage (a VQ-f4
            for the paper's LDM presets) that cannot be trained here.
    """
    from .config import load_config

    cfg = load_config(preset, _as_override_dict(overrides))
    if cfg.family != "ldm" or cfg.first_stage.kind == "none":
        return None
    path = first_stage or cfg.first_stage.path
    if path:
        if not Path(path).exists():
            raise ConfigError(f"first stage {str(path)!r} does not exist")
        return str(Path(path).resolve())
    if cfg.first_stage.kind == "pretrained":
        raise ConfigError(
            f"preset {cfg.name!r} needs a pretrained first stage (first_stage.kind: pretrained); pass "
            "--first-stage DIR (a diffusers VQModel / AutoencoderKL directory)"
        )
    from .train_autoencoder import train_autoencoder

    target = out / "first-stage"
    if not quiet:
        print(f"sweep: first stage -> {target}")
    train_autoencoder(cfg, target, quiet=quiet)
    return str(target.resolve())


def _warm_latent_cache(run: PlannedRun, quiet: bool) -> None:
    """Encode the training set once before parallel runs start: they would all encode it at the same
    time, into the same cache file (kept next to the first stage when that directory is writable)."""
    cfg = run.cfg
    if cfg.family != "ldm" or cfg.first_stage.kind == "none":
        return
    import torch

    from .tasks import make_task

    data = make_task(cfg, run.run_dir).train_data(torch.device("cpu"), progress=not quiet)
    del data


# ---------------------------------------------------------------------------- running


class _Console:
    """Thread-safe progress lines that do not break tqdm bars."""

    def __init__(self, quiet: bool, total: int):
        self.quiet, self.total, self.lock = quiet, total, threading.Lock()

    def line(self, index: int, name: str, text: str) -> None:
        if self.quiet:
            return
        width = len(str(self.total))
        msg = f"[{index:>{width}}/{self.total}] {name}: {text}"
        with self.lock:
            from tqdm.auto import tqdm

            tqdm.write(msg, file=sys.stdout)


def _fmt_seconds(s: float) -> str:
    s = float(s)
    if s < 60:
        return f"{s:.1f}s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"


def _fid_text(run_dir: Path) -> str:
    ev = read_json(run_dir / "eval.json") or {}
    fid = ev.get("fid") or {}
    if "metric" in fid and "value" in fid:
        return f" ({fid['metric']} {fid['value']:.3f})"
    return ""


def _child_env(threads: int, gpu: str | None) -> dict[str, str]:
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1])  # the sparsediff the parent runs
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    env["TQDM_MININTERVAL"] = "30"  # a progress line every 30 s in the log, not every 0.1 s
    env["PYTHONUNBUFFERED"] = "1"
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    return env


@dataclass
class _Runner:
    """Trains and evaluates one planned run, in this process or as subprocesses."""

    eval_samples: int | None
    fid_weights: str | None
    quiet: bool
    subprocess_mode: bool
    procs: dict[int, subprocess.Popen] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)

    # -- in this process
    def _train_here(self, run: PlannedRun) -> None:
        from .train import train

        # resume only what exists, so that a fresh run does not announce a missing checkpoint
        train(run.cfg, run.run_dir, resume=(run.run_dir / "config.yaml").exists(), quiet=self.quiet)

    def _evaluate_here(self, run: PlannedRun) -> None:
        from .evaluate import evaluate_run

        evaluate_run(
            run.run_dir, num_samples=self.eval_samples, fid_weights=self.fid_weights, quiet=self.quiet
        )

    # -- as subprocesses
    def _call(self, args: list[str], log_path: Path, env: dict[str, str]) -> None:
        if self.stop.is_set():
            raise KeyboardInterrupt
        cmd = [sys.executable, "-m", "sparsediff", *args]
        with open(log_path, "a") as log:
            pinned = " ".join(
                f"{k}={env[k]}" for k in ("OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES") if k in env
            )
            log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {pinned} {shlex.join(cmd)}\n")
            log.flush()
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            self.procs[proc.pid] = proc
            try:
                rc = proc.wait()
            finally:
                self.procs.pop(proc.pid, None)
        if rc != 0:
            if self.stop.is_set():
                raise KeyboardInterrupt
            tail = [x for x in log_path.read_text(errors="replace").splitlines() if x.strip()][-1:]
            raise TrainingError(
                f"`{' '.join(args[:1])}` exited with {rc}: {' '.join(tail)} (log: {log_path})"
            )

    def run(self, run: PlannedRun, env: dict[str, str] | None) -> None:
        status = run_status(run.run_dir, run.cfg.train.max_steps)
        if status.state in ("new", "partial"):
            if self.subprocess_mode:
                args = ["train", "--preset", str(run.config_file), "--out", str(run.run_dir)]
                if (run.run_dir / "config.yaml").exists():
                    args.append("--resume")
                self._call(args, run.run_dir / "train.log", env or {})
            else:
                self._train_here(run)
        if self.subprocess_mode:
            args = ["evaluate", "--run", str(run.run_dir), "--quiet"]
            if self.eval_samples:
                args += ["--num-samples", str(self.eval_samples)]
            if self.fid_weights:
                args += ["--fid-weights", str(self.fid_weights)]
            self._call(args, run.run_dir / "evaluate.log", env or {})
        else:
            self._evaluate_here(run)

    def terminate(self) -> None:
        self.stop.set()
        for proc in list(self.procs.values()):
            if proc.poll() is None:
                proc.terminate()
        for proc in list(self.procs.values()):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _gpu_ids() -> list[str]:
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [x.strip() for x in visible.split(",") if x.strip()] if visible else [str(i) for i in range(n)]
    return ids[:n]


def _override_args(overrides: dict[str, Any] | Sequence[str] | None) -> list[str]:
    if overrides is None:
        return []
    if not isinstance(overrides, dict):
        return [str(x) for x in overrides]
    return [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in flatten(overrides).items()]


def sweep_command(
    preset: str,
    methods: Sequence[str],
    sparsities: Sequence[float],
    prune_ratios: Sequence[float] | None,
    seeds: Sequence[int],
    out: str | Path,
    jobs: int = 1,
    steps: int | None = None,
    overrides: dict[str, Any] | Sequence[str] | None = None,
    eval_samples: int | None = None,
    first_stage: str | Path | None = None,
    fid_weights: str | None = None,
) -> str:
    """The ``sparsediff sweep`` command line equivalent to these arguments."""

    def join(xs: Iterable[Any]) -> str:
        return ",".join(f"{x:g}" if isinstance(x, float) else str(x) for x in xs)

    cmd = ["sparsediff", "sweep", "--preset", str(preset), "--methods", join(methods)]
    if sparsities:
        cmd += ["--sparsities", join(sparsities)]
    if prune_ratios:
        cmd += ["--prune-ratios", join(prune_ratios)]
    cmd += ["--seeds", join(seeds), "--out", str(out)]
    if jobs != 1:
        cmd += ["--jobs", str(jobs)]
    if steps is not None:
        cmd += ["--steps", str(steps)]
    if eval_samples is not None:
        cmd += ["--eval-samples", str(eval_samples)]
    if first_stage is not None:
        cmd += ["--first-stage", str(first_stage)]
    if fid_weights is not None:
        cmd += ["--fid-weights", str(fid_weights)]
    for item in _override_args(overrides):
        cmd += ["--set", item]
    return shlex.join(cmd)


def _manifest(
    preset: str,
    grid: dict[str, Any],
    settings: dict[str, Any],
    runs: Sequence[PlannedRun],
    out: Path,
    command: str,
) -> dict[str, Any]:
    """The content of ``sweep.json``: the grid, the settings, the command, one entry per run."""
    return {
        "preset": preset,
        "grid": grid,
        **settings,
        "command": command,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "runs": [
            {
                "name": r.point.name,
                "dir": r.point.name,
                "config": str(r.config_file.relative_to(out)),
                "method": r.point.method,
                "sparsity": r.point.sparsity,
                "prune_ratio": r.point.prune_ratio,
                "seed": r.point.seed,
            }
            for r in runs
        ],
    }


def _write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    """Write ``sweep.json`` atomically, keeping earlier invocations' commands under ``history``."""
    path = out / "sweep.json"
    previous = read_json(path) or {}
    history = list(previous.get("history", []))
    if previous.get("command"):
        history.append({"command": previous["command"], "started": previous.get("started")})
    manifest["history"] = history[-20:]
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.replace(path)


def _run_parallel(
    todo: Sequence[PlannedRun],
    do: Callable[[PlannedRun, dict[str, str] | None], None],
    runner: _Runner,
    jobs: int,
    console: _Console,
    quiet: bool,
) -> None:
    """Run ``do`` on ``jobs`` runs at a time, each in a slot with its CPU threads (and GPU); on an
    interruption stop the children and re-raise."""
    from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
    from queue import Queue

    threads = max(1, _cpu_count() // jobs)
    gpus = _gpu_ids()
    slots: Queue[int] = Queue()
    for s in range(jobs):
        slots.put(s)

    bar = None
    if not quiet:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="sweep", unit="run", dynamic_ncols=True)

    def in_slot(run: PlannedRun) -> None:
        slot = slots.get()
        try:
            if runner.stop.is_set():
                return
            gpu = gpus[slot % len(gpus)] if len(gpus) > 1 else None
            do(run, _child_env(threads, gpu))
        finally:
            slots.put(slot)
            if bar is not None:
                with console.lock:
                    bar.update(1)

    if not quiet:
        print(
            f"sweep: {jobs} runs at a time, {threads} thread(s) each"
            + (f", GPUs {gpus}" if len(gpus) > 1 else "")
        )
    pool = ThreadPoolExecutor(max_workers=jobs)
    futures = [pool.submit(in_slot, run) for run in todo]
    try:
        wait(futures, return_when=FIRST_EXCEPTION)
        for f in futures:
            f.result()
    except BaseException:
        runner.terminate()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    pool.shutdown(wait=True)


def sweep(
    preset: str,
    methods: Sequence[str],
    sparsities: Sequence[float],
    prune_ratios: Sequence[float] | None,
    seeds: Sequence[int],
    out: str | Path,
    jobs: int = 1,
    steps: int | None = None,
    overrides: dict[str, Any] | Sequence[str] | None = None,
    eval_samples: int | None = None,
    first_stage: str | Path | None = None,
    quiet: bool = False,
    fid_weights: str | None = None,
) -> dict[str, Any]:
    """Train and evaluate every point of a grid into ``out/<run>``; safe to interrupt and call again.

    Args:
        preset: preset name or YAML path.
        methods: subset of ``dense, static, rigl, magran``.
        sparsities: global sparsities of the sparse methods, each in (0, 1).
        prune_ratios: initial prune/regrow fractions of rigl and magran (static ignores them).
        seeds: one run per seed (seeds the weights, the data order, the timesteps and the masks).
        out: the sweep directory.
        jobs: runs at a time; above 1 each run is ``python -m sparsediff train/evaluate`` subprocesses
            with the CPU threads split between them (and GPUs assigned round-robin), logging to
            ``RUN/train.log`` and ``RUN/evaluate.log``.
        steps: optimiser steps per run (``train.max_steps``); default: the preset's.
        overrides: nested dict or ``["section.key=value", ...]`` applied to every run.
        eval_samples: generated samples for FID (default: the preset's ``eval.num_samples``).
        first_stage: first-stage directory of latent presets (default: the preset's, else one trained
            once into ``out/first-stage``).
        fid_weights: the standard Inception weights file, for Inception FID.

    Returns:
        ``{"out", "runs": [...], "failed": [...]}``; each run ``{"name", "dir", "status"`` (skipped / done
        / failed), ``"start"`` (the state it was found in: new / partial / trained / evaluated),
        ``"from_step", "seconds", "error"}``.

    Raises:
        ConfigError: a bad grid, preset or override (before anything is trained).
        TrainingError: after all other runs are done, when some failed (naming them and their logs).
    """
    t_start = time.perf_counter()
    out = Path(out).resolve()
    if jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {jobs}")
    points = expand_grid(methods, sparsities, prune_ratios, seeds)
    plan_runs(preset, points, out, steps, overrides)  # validate everything before training anything
    out.mkdir(parents=True, exist_ok=True)
    fs = resolve_first_stage(preset, overrides, first_stage, out, quiet)
    runs = plan_runs(preset, points, out, steps, overrides, fs)
    command = sweep_command(
        preset,
        methods,
        sparsities,
        prune_ratios,
        seeds,
        out,
        jobs,
        steps,
        overrides,
        eval_samples,
        first_stage,
        fid_weights,
    )
    (out / "configs").mkdir(exist_ok=True)
    for run in runs:
        run.config_file.write_text(run.cfg.to_yaml())
    grid = {
        "methods": unique(methods),
        "sparsities": list(sparsities),
        "prune_ratios": list(prune_ratios or []),
        "seeds": list(seeds),
    }
    settings = {
        "steps": steps,
        "overrides": _override_args(overrides),
        "eval_samples": eval_samples,
        "first_stage": fs,
        "fid_weights": fid_weights,
        "jobs": jobs,
    }
    _write_manifest(out, _manifest(preset, grid, settings, runs, out, command))
    statuses = {r.point.name: run_status(r.run_dir, r.cfg.train.max_steps) for r in runs}
    todo = [r for r in runs if statuses[r.point.name].state != "evaluated"]
    console = _Console(quiet, len(runs))
    if not quiet:
        print(f"sweep: {len(runs)} runs of {preset} in {out}, {len(runs) - len(todo)} already done")
    results: dict[str, dict[str, Any]] = {}
    for i, r in enumerate(runs, 1):
        if statuses[r.point.name].state == "evaluated":
            console.line(i, r.point.name, "skipped (finished and evaluated)" + _fid_text(r.run_dir))
            results[r.point.name] = {"status": "skipped", "seconds": 0.0, "error": None, "start": "evaluated"}
    index = {r.point.name: i for i, r in enumerate(runs, 1)}
    subprocess_mode = jobs > 1 and len(todo) > 0
    runner = _Runner(eval_samples, fid_weights, quiet, subprocess_mode)
    if subprocess_mode and any(statuses[r.point.name].state in ("new", "partial") for r in todo):
        _warm_latent_cache(todo[0], quiet)

    def do(run: PlannedRun, env: dict[str, str] | None) -> None:
        name, st = run.point.name, statuses[run.point.name]
        start_text = {
            "new": "started",
            "partial": f"resumed from step {st.step}",
            "trained": "evaluating (trained earlier)",
        }[st.state]
        console.line(index[name], name, start_text)
        begun = {"start": st.state, "from_step": st.step}
        t0 = time.perf_counter()
        try:
            run.run_dir.mkdir(parents=True, exist_ok=True)
            runner.run(run, env)
        except Exception as e:  # one failed run must not stop the others
            detail = str(e) if isinstance(e, SparsediffError) else f"{type(e).__name__}: {e}"
            if not isinstance(e, SparsediffError):
                (run.run_dir / "error.log").write_text(traceback.format_exc())
                detail += f" (traceback in {run.run_dir / 'error.log'})"
            results[name] = {
                "status": "failed",
                "seconds": time.perf_counter() - t0,
                "error": detail,
                **begun,
            }
            console.line(index[name], name, f"FAILED: {detail}")
            return
        dt = time.perf_counter() - t0
        results[name] = {"status": "done", "seconds": dt, "error": None, **begun}
        console.line(index[name], name, f"done in {_fmt_seconds(dt)}{_fid_text(run.run_dir)}")

    if subprocess_mode:
        _run_parallel(todo, do, runner, jobs, console, quiet)
    else:
        for run in todo:
            do(run, None)

    ordered = [
        {"name": r.point.name, "dir": str(r.run_dir), **results.get(r.point.name, {"status": "not run"})}
        for r in runs
    ]
    failed = [r for r in ordered if r["status"] == "failed"]
    if not quiet:
        counts = {s: sum(r["status"] == s for r in ordered) for s in ("done", "skipped", "failed")}
        print(
            f"sweep: {counts['done']} trained/evaluated, {counts['skipped']} skipped, {counts['failed']} failed "
            f"in {_fmt_seconds(time.perf_counter() - t_start)}; `sparsediff report {out}` writes the table"
        )
    if failed:
        raise TrainingError(
            f"{len(failed)} of {len(runs)} runs failed (run the same command again to retry them): "
            + "; ".join(f"{r['name']}: {r['error']}" for r in failed)
        )
    return {"out": str(out), "runs": ordered, "failed": failed}


# ---------------------------------------------------------------------------- command line


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def add_sweep_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``sparsediff sweep``: train and evaluate a grid of runs."""
    p = sub.add_parser(
        "sweep",
        help="train + evaluate a grid of methods x sparsities x prune ratios x seeds (resumable)",
        description="Train and evaluate every point of the grid into OUT/<run>. Run the same command again "
        "after an interruption: finished runs are skipped, interrupted ones resume from their checkpoint.",
    )
    p.add_argument("--preset", required=True, help="preset name or YAML path")
    p.add_argument(
        "--methods", type=_names, default=list(SWEEP_METHODS), help="comma-separated (default all four)"
    )
    p.add_argument(
        "--sparsities", type=_floats, default=[0.25, 0.5, 0.75, 0.9], help="e.g. 0.25,0.5,0.75,0.9"
    )
    p.add_argument(
        "--prune-ratios", type=_floats, default=[0.05, 0.5], help="rigl/magran only, e.g. 0.05,0.5"
    )
    p.add_argument("--seeds", type=_ints, default=[0], help="e.g. 0,1,2")
    p.add_argument("--out", required=True, help="sweep directory (one run directory per grid point)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (subprocesses, threads split)")
    p.add_argument("--steps", type=int, help="optimiser steps per run (train.max_steps)")
    p.add_argument("--eval-samples", type=int, help="generated samples for FID (eval.num_samples)")
    p.add_argument("--first-stage", help="first-stage directory for latent presets (default: trained once)")
    p.add_argument("--fid-weights", help="standard Inception weights file: Inception FID")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", default=[], help="override a preset field")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_sweep)
    return p


def cmd_sweep(args: argparse.Namespace) -> int:
    sweep(
        args.preset,
        args.methods,
        args.sparsities,
        args.prune_ratios,
        args.seeds,
        args.out,
        jobs=args.jobs,
        steps=args.steps,
        overrides=args.set,
        eval_samples=args.eval_samples,
        first_stage=args.first_stage,
        quiet=args.quiet,
        fid_weights=args.fid_weights,
    )
    return 0


def add_report_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``sparsediff report``: the paper-style table, plots and CSV from run directories."""
    p = sub.add_parser("report", help="table (report.md), plots and results.csv from run directories")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="directories holding run directories (searched)")
    p.add_argument("--out", help="output directory (default: the first DIR)")
    p.add_argument("--json", action="store_true", help="print the written paths as JSON")
    p.set_defaults(func=cmd_report)
    return p


def cmd_report(args: argparse.Namespace) -> int:
    result = report(args.dirs, args.out)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['runs']} runs -> {result['report']}, {result['csv']}, {len(result['plots'])} plot(s)")
    return 0
