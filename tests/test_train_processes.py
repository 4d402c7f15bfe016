"""Training across processes, on both backends (``--backend dense|sparse``): SIGKILL at any moment of a
step, and two ranks with torchrun (gloo)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from helpers import PYTHON, assert_same_state, python_env, torchrun, train_args
from sparsediff.run import RunDir

STEPS = 12  # of the killed run; a checkpoint after every step
KILLS = 3


def _latest_step(run: Path) -> int:
    """The step of the run's latest complete checkpoint (-1 without one)."""
    ckpt = RunDir(run).checkpoints.latest()
    return -1 if ckpt is None else int(ckpt.name.rsplit("-", 1)[1])


def _next_checkpoint(proc: subprocess.Popen, run: Path, after: int, log: Path) -> tuple[int, float]:
    """Wait until ``run`` has a checkpoint newer than step ``after``: ``(its step, when it was seen)``."""
    deadline = time.monotonic() + 120
    while (step := _latest_step(run)) <= after:
        assert proc.poll() is None, f"training exited ({proc.returncode}) early: {log.read_text()[-2000:]}"
        assert time.monotonic() < deadline, f"no checkpoint after step {after} within 120 s"
        time.sleep(0.005)
    return step, time.monotonic()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["dense", "sparse"])
def test_sigkill_at_any_moment_of_a_step_resumes_bit_exactly(first_stage, tmp_path, backend):
    """Kill the training process three times, each at a seeded random moment of a training step
    (forward, backward, topology update or checkpoint writing alike), resume each time: the result is
    bit for bit the run that was never interrupted.

    The kill points follow the run's progress, not the clock: a process is killed only once it has
    written two checkpoints of its own (so it is training, and the time between them says how long a
    step takes), at a random fraction of the next step. Every kill therefore lands inside training, and
    each process moves the run on by at least two steps.
    """
    env = python_env()
    every_step = ("--set", "train.ckpt_every=1", "--backend", backend)
    straight = subprocess.run(
        [PYTHON, *train_args(first_stage, tmp_path / "straight", "magran", STEPS, *every_step)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert straight.returncode == 0, straight.stderr[-2000:]

    run = tmp_path / "killed"
    resume = [PYTHON, *train_args(first_stage, run, "magran", STEPS, *every_step, "--resume")]
    rng = random.Random(1234)
    for kill in range(KILLS):
        start = _latest_step(run)
        log = tmp_path / f"attempt-{kill}.log"
        with log.open("w") as err:
            proc = subprocess.Popen(resume, env=env, stdout=subprocess.DEVNULL, stderr=err)
            try:
                first, t_first = _next_checkpoint(proc, run, start, log)
                second, t_second = _next_checkpoint(proc, run, first, log)
                assert second <= STEPS - 3, f"attempt {kill}: too few steps left to kill it while training"
                time.sleep(rng.uniform(0.0, t_second - t_first))  # a random moment of the next step
                assert proc.poll() is None, f"attempt {kill} finished before the kill (at step {second})"
                os.kill(proc.pid, signal.SIGKILL)
            finally:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
        assert proc.returncode == -signal.SIGKILL
        # whatever moment it died at, the checkpoints it completed are there to resume from
        assert _latest_step(run) >= second

    final = subprocess.run(resume, env=env, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr[-2000:]
    summary = RunDir(run).read_summary()
    assert summary["finished"] and summary["steps"] == STEPS
    assert RunDir(run).load_config().sparse.backend == backend
    assert not list(RunDir(run).checkpoints.root.glob(".tmp-*"))
    assert_same_state(tmp_path / "straight", run)


@pytest.mark.distributed
@pytest.mark.parametrize("backend", ["dense", "sparse"])
def test_two_process_torchrun_training(first_stage, tmp_path, backend):
    run = tmp_path / "ddp"
    cmd = torchrun(2, *train_args(first_stage, run, "rigl", 8, "--backend", backend))
    proc = subprocess.run(cmd, env=python_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary = RunDir(run).read_summary()
    assert summary["world_size"] == 2
    assert RunDir(run).load_config().sparse.backend == backend
    # steps 2 and 4: updates end at 75 % of 8 steps, and at step 6 the cosine drop fraction is 0 (no update)
    assert summary["topology_updates"] == 2
    assert summary["masks_identical_across_ranks"] is True
    assert summary["weights_identical_across_ranks"] is True
