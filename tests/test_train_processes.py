"""Training across processes: SIGKILL at random moments, and two ranks with torchrun (gloo)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import PYTHON, python_env
from sparsediff.checkpoint import CheckpointDir
from test_train_ldm import TINY, assert_same_state, first_stage  # noqa: F401  (fixture)


def _train_cmd(fs: Path, out: Path, *extra: str) -> list[str]:
    return [
        PYTHON,
        "-m",
        "sparsediff",
        "train",
        "--preset",
        TINY,
        "--first-stage",
        str(fs),
        "--method",
        "magran",
        "--sparsity",
        "0.5",
        "--update-every",
        "2",
        "--steps",
        "12",
        "--set",
        "train.ckpt_every=1",
        "--out",
        str(out),
        "--quiet",
        *extra,
    ]


@pytest.mark.slow
def test_sigkill_at_random_moments_always_resumes(first_stage, tmp_path):  # noqa: F811
    env = python_env()
    straight = subprocess.run(
        _train_cmd(first_stage, tmp_path / "straight"), env=env, capture_output=True, text=True, timeout=300
    )
    assert straight.returncode == 0, straight.stderr[-2000:]

    run = tmp_path / "killed"
    rng = random.Random(1234)
    kills = 0
    for _attempt in range(8):
        proc = subprocess.Popen(
            _train_cmd(first_stage, run, "--resume"),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        ckpts = CheckpointDir(run / "checkpoints")
        before = ckpts.latest()
        # wait until this process is training (it wrote a new checkpoint), then kill it at a random moment
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline and ckpts.latest() == before:
            time.sleep(0.05)
        if proc.poll() is not None:
            out, err = proc.communicate()
            assert proc.returncode == 0, err[-2000:]
            break
        time.sleep(rng.uniform(0.0, 0.6))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        kills += 1
        # whatever moment it died at, a complete checkpoint is there to resume from
        assert CheckpointDir(run / "checkpoints").latest() is not None
    else:
        final = subprocess.run(
            _train_cmd(first_stage, run, "--resume"), env=env, capture_output=True, text=True, timeout=300
        )
        assert final.returncode == 0, final.stderr[-2000:]
    assert kills >= 2
    summary = json.loads((run / "summary.json").read_text())
    assert summary["finished"] and summary["steps"] == 12
    assert not list((run / "checkpoints").glob(".tmp-*"))
    assert_same_state(tmp_path / "straight", run)


@pytest.mark.distributed
def test_two_process_torchrun_training(first_stage, tmp_path):  # noqa: F811
    run = tmp_path / "ddp"
    cmd = [
        PYTHON,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "sparsediff",
        "train",
        "--preset",
        TINY,
        "--first-stage",
        str(first_stage),
        "--method",
        "rigl",
        "--sparsity",
        "0.5",
        "--update-every",
        "2",
        "--steps",
        "8",
        "--out",
        str(run),
        "--quiet",
    ]
    proc = subprocess.run(cmd, env=python_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["topology_updates"] == 3  # steps 2, 4, 6 (updates end at 75 % of 8 steps)
    assert summary["masks_identical_across_ranks"] is True
    assert summary["weights_identical_across_ranks"] is True
