"""Shared test settings: few threads, deterministic kernels, a bounded hypothesis profile."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 0)) or max(1, min(2, os.cpu_count() or 1)))
settings.register_profile(
    "sparsediff",
    max_examples=int(os.environ.get("SPARSEDIFF_HYPOTHESIS_EXAMPLES", "25")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
settings.load_profile("sparsediff")

SCRIPTS = Path(__file__).parent / "scripts"


@pytest.fixture
def scripts_dir() -> Path:
    return SCRIPTS


def python_env() -> dict[str, str]:
    """Environment for child processes: the package importable, few threads."""
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONHASHSEED"] = "0"
    return env


PYTHON = sys.executable
