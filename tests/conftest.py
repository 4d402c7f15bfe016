"""Shared test settings (few threads, a bounded hypothesis profile) and the fixtures several modules use.

Plain helpers and constants are in ``helpers.py``; test modules never import each other or this file.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

from helpers import TINY_LDM

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 0)) or max(1, min(2, os.cpu_count() or 1)))
settings.register_profile(
    "sparsediff",
    max_examples=int(os.environ.get("SPARSEDIFF_HYPOTHESIS_EXAMPLES", "25")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
settings.load_profile("sparsediff")


@pytest.fixture(scope="session")
def first_stage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny-ldm preset's autoencoder, trained once per session (seconds); tests only read it."""
    from sparsediff.cli import main as cli  # the whole command line: only for the tests that need it

    out = tmp_path_factory.mktemp("fs") / "autoencoder"
    assert cli(["train-autoencoder", "--preset", TINY_LDM, "--out", str(out), "--quiet"]) == 0
    return out
