"""Running a sweep: where each run directory stands, the shared first stage, training and evaluating
every planned run (in this process, or ``--jobs`` at a time as subprocesses), resumable at any moment.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..checkpoint import read_trainer_state
from ..config import load_config
from ..errors import ConfigError, SparsediffError, TrainingError
from ..progress import format_seconds, progress_bar
from ..run import RunDir
from .plan import (
    CONFIGS,
    Overrides,
    PlannedRun,
    SweepSpec,
    override_dict,
    overrides_for_method,
    plan_runs,
    write_manifest,
)

__all__ = ["FIRST_STAGE", "RunStatus", "cpu_count", "resolve_first_stage", "run_status", "sweep"]

FIRST_STAGE = "first-stage"


# ---------------------------------------------------------------------------- state of a run directory


@dataclass
class RunStatus:
    """Where a run directory stands: ``new``, ``partial`` (a checkpoint, not finished), ``trained``
    (finished, no up-to-date evaluation) or ``evaluated`` (nothing left to do)."""

    state: str
    step: int = 0


def run_status(run_dir: str | Path, max_steps: int | None = None) -> RunStatus:
    """Inspect ``run_dir``. A finished run counts as unfinished when ``max_steps`` asks for more steps."""
    run = RunDir(run_dir)
    ckpt = run.checkpoints.latest()
    step = int(read_trainer_state(ckpt).get("step", 0)) if ckpt is not None else 0
    summary = run.read_summary() or {}
    finished = bool(summary.get("finished")) and ckpt is not None
    if finished and max_steps is not None and int(summary.get("steps", 0)) < max_steps:
        finished = False
    if not finished:
        return RunStatus("partial" if step else "new", step)
    eval_path = run.eval_path
    newer = eval_path.exists() and eval_path.stat().st_mtime_ns > (ckpt / "trainer.json").stat().st_mtime_ns
    if newer and run.read_eval() is not None:  # a torn eval file (killed while writing) counts as none
        return RunStatus("evaluated", step)
    return RunStatus("trained", step)


# ---------------------------------------------------------------------------- first stage


def resolve_first_stage(
    preset: str,
    overrides: Overrides,
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
    # the first stage is the same for every method: read the preset as a dense run would
    cfg = load_config(preset, overrides_for_method(override_dict(overrides), "dense"))
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
    from ..train_autoencoder import train_autoencoder

    target = out / FIRST_STAGE
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

    from ..tasks import make_task

    data = make_task(cfg, run.run_dir).train_data(torch.device("cpu"), progress=not quiet)
    del data


# ---------------------------------------------------------------------------- status lines


class _Console:
    """Thread-safe status lines, one per run event (``[2/8] rigl-s0.5-p0.05-seed0: done in 3m05s``),
    written so that they do not break a progress bar on the terminal."""

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


def _fid_text(run_dir: Path) -> str:
    fid = (RunDir(run_dir).read_eval() or {}).get("fid") or {}
    if "metric" in fid and "value" in fid:
        return f" ({fid['metric']} {fid['value']:.3f})"
    return ""


# ---------------------------------------------------------------------------- one run


def _child_env(threads: int, gpu: str | None) -> dict[str, str]:
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2])  # the sparsediff the parent runs
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    env["TQDM_MININTERVAL"] = "30"  # a progress line every 30 s in the log, not every 0.1 s
    env["PYTHONUNBUFFERED"] = "1"
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    return env


def _report_to(run: PlannedRun) -> str | None:
    """The trackers a run's evaluation logs to: its training's (None when it has none)."""
    value = run.cfg.train.report_to
    return None if value == "none" else value


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
        from ..train import train

        # resume only what exists, so that a fresh run does not announce a missing checkpoint
        train(run.cfg, run.run_dir, resume=RunDir(run.run_dir).exists(), quiet=self.quiet)

    def _evaluate_here(self, run: PlannedRun) -> None:
        from ..evaluate import evaluate_run

        evaluate_run(
            run.run_dir,
            num_samples=self.eval_samples,
            fid_weights=self.fid_weights,
            quiet=self.quiet,
            report_to=_report_to(run),
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
                if RunDir(run.run_dir).exists():
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
            if _report_to(run):
                args += ["--report-to", _report_to(run)]
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


# ---------------------------------------------------------------------------- several runs at a time


def cpu_count() -> int:
    """The CPU cores this process may use."""
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

    threads = max(1, cpu_count() // jobs)
    gpus = _gpu_ids()
    slots: Queue[int] = Queue()
    for s in range(jobs):
        slots.put(s)
    bar = progress_bar(len(todo), desc="sweep", unit="run", quiet=quiet)

    def in_slot(run: PlannedRun) -> None:
        slot = slots.get()
        try:
            if runner.stop.is_set():
                return
            gpu = gpus[slot % len(gpus)] if len(gpus) > 1 else None
            do(run, _child_env(threads, gpu))
        finally:
            slots.put(slot)
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
        bar.close()
    pool.shutdown(wait=True)


# ---------------------------------------------------------------------------- the sweep


def _train_and_evaluate(
    run: PlannedRun, env: dict[str, str] | None, status: RunStatus, runner: _Runner
) -> dict[str, Any]:
    """One run's entry of the sweep's result; a failure is recorded, not raised (one failed run must
    not stop the others)."""
    begun = {"start": status.state, "from_step": status.step}
    t0 = time.perf_counter()
    try:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        runner.run(run, env)
    except Exception as e:
        detail = str(e) if isinstance(e, SparsediffError) else f"{type(e).__name__}: {e}"
        if not isinstance(e, SparsediffError):
            (run.run_dir / "error.log").write_text(traceback.format_exc())
            detail += f" (traceback in {run.run_dir / 'error.log'})"
        return {"status": "failed", "seconds": time.perf_counter() - t0, "error": detail, **begun}
    return {"status": "done", "seconds": time.perf_counter() - t0, "error": None, **begun}


def sweep(spec: SweepSpec | None = None, /, *, quiet: bool = False, **fields: Any) -> dict[str, Any]:
    """Train and evaluate every point of a grid into ``out/<run>``; safe to interrupt and call again.

    Call it with a :class:`SweepSpec` or with its fields by name (``sweep(preset=..., methods=...,
    sparsities=..., prune_ratios=..., seeds=..., out=..., steps=...)``; given both, the fields override
    the spec's). A finished and evaluated run is never repeated, an interrupted one resumes from its
    latest checkpoint, and a run whose evaluation is older than its last checkpoint is evaluated again.

    Returns:
        ``{"out", "runs": [...], "failed": [...]}``; each run ``{"name", "dir", "status"`` (skipped / done
        / failed), ``"start"`` (the state it was found in: new / partial / trained / evaluated),
        ``"from_step", "seconds", "error"}``.

    Raises:
        ConfigError: a bad grid, preset or override (before anything is trained).
        TrainingError: after all other runs are done, when some failed (naming them and their logs).
    """
    spec = SweepSpec(**fields) if spec is None else dataclasses.replace(spec, **fields)
    t_start = time.perf_counter()
    out = Path(spec.out).resolve()
    if spec.jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {spec.jobs}")
    points = spec.points()
    # validate before training anything (a tracker that is not installed included)
    plan_runs(spec.preset, points, out, spec.steps, spec.overrides, report_to=spec.report_to)
    out.mkdir(parents=True, exist_ok=True)
    fs = resolve_first_stage(spec.preset, spec.overrides, spec.first_stage, out, quiet)
    runs = plan_runs(spec.preset, points, out, spec.steps, spec.overrides, fs, spec.report_to)
    (out / CONFIGS).mkdir(exist_ok=True)
    for run in runs:
        run.config_file.write_text(run.cfg.to_yaml())
    write_manifest(spec, runs, fs)

    statuses = {r.point.name: run_status(r.run_dir, r.cfg.train.max_steps) for r in runs}
    todo = [r for r in runs if statuses[r.point.name].state != "evaluated"]
    index = {r.point.name: i for i, r in enumerate(runs, 1)}
    console = _Console(quiet, len(runs))
    if not quiet:
        print(f"sweep: {len(runs)} runs of {spec.preset} in {out}, {len(runs) - len(todo)} already done")
    results: dict[str, dict[str, Any]] = {}
    for r in runs:
        if statuses[r.point.name].state == "evaluated":
            text = "skipped (finished and evaluated)" + _fid_text(r.run_dir)
            console.line(index[r.point.name], r.point.name, text)
            results[r.point.name] = {"status": "skipped", "seconds": 0.0, "error": None, "start": "evaluated"}
    subprocess_mode = spec.jobs > 1 and len(todo) > 0
    runner = _Runner(spec.eval_samples, spec.fid_weights, quiet, subprocess_mode)
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
        result = results[name] = _train_and_evaluate(run, env, st, runner)
        if result["status"] == "failed":
            console.line(index[name], name, f"FAILED: {result['error']}")
        else:
            done = f"done in {format_seconds(result['seconds'])}{_fid_text(run.run_dir)}"
            console.line(index[name], name, done)

    if subprocess_mode:
        _run_parallel(todo, do, runner, spec.jobs, console, quiet)
    else:
        for run in todo:
            do(run, None)
    return _finish(runs, results, out, quiet, time.perf_counter() - t_start)


def _finish(
    runs: Sequence[PlannedRun], results: dict[str, dict[str, Any]], out: Path, quiet: bool, seconds: float
) -> dict[str, Any]:
    """The sweep's result in grid order; a summary line; an error naming the failed runs."""
    ordered = [
        {"name": r.point.name, "dir": str(r.run_dir), **results.get(r.point.name, {"status": "not run"})}
        for r in runs
    ]
    failed = [r for r in ordered if r["status"] == "failed"]
    if not quiet:
        counts = {s: sum(r["status"] == s for r in ordered) for s in ("done", "skipped", "failed")}
        print(
            f"sweep: {counts['done']} trained/evaluated, {counts['skipped']} skipped, {counts['failed']} failed "
            f"in {format_seconds(seconds)}; `sparsediff report {out}` writes the table"
        )
    if failed:
        raise TrainingError(
            f"{len(failed)} of {len(runs)} runs failed (run the same command again to retry them): "
            + "; ".join(f"{r['name']}: {r['error']}" for r in failed)
        )
    return {"out": str(out), "runs": ordered, "failed": failed}
