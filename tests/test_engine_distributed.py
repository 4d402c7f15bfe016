"""Across processes, on both backends: exact resumption in a fresh process, and identical masks on two
DDP ranks."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from helpers import PYTHON, SCRIPTS, python_env, torchrun


def _run(args, timeout=300):
    proc = subprocess.run([PYTHON, *args], env=python_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


# On compact layers the two dynamic methods (RigL's dense-gradient capture must be armed again after the
# load, MagRan's draws continue from the step); static adds nothing there that they do not cover.
@pytest.mark.parametrize(
    ("method", "backend"),
    [("rigl", "dense"), ("magran", "dense"), ("static", "dense"), ("rigl", "sparse"), ("magran", "sparse")],
)
def test_resumption_in_fresh_process_is_bitwise_exact(tmp_path, method, backend):
    script = str(SCRIPTS / "engine_resume.py")
    # 25 steps straight vs 11 steps, save, new process loads and trains 14 more (updates every 3 steps,
    # so the split falls between updates and both halves contain several).
    common = ["--method", method, "--backend", backend]
    out = _run([script, *common, "--stop", "25", "--save", str(tmp_path / "straight")])
    _run([script, *common, "--stop", "11", "--save", str(tmp_path / "half")])
    _run(
        [
            script,
            *common,
            "--start",
            "11",
            "--stop",
            "25",
            "--load",
            str(tmp_path / "half"),
            "--save",
            str(tmp_path / "resumed"),
        ]
    )
    for fname in ("model.safetensors", "engine.safetensors"):
        a, b = load_file(tmp_path / "straight" / fname), load_file(tmp_path / "resumed" / fname)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{fname}:{k} differs after resumption"
    oa = torch.load(tmp_path / "straight" / "optimizer.pt", weights_only=True)
    ob = torch.load(tmp_path / "resumed" / "optimizer.pt", weights_only=True)
    for pid, st in oa["state"].items():
        for k, v in st.items():
            assert torch.equal(v, ob["state"][pid][k])
    if method != "static":
        assert int(out.split()[-1]) >= 5  # updates really happened


@pytest.mark.distributed
def test_two_process_ddp_keeps_masks_identical(tmp_path):
    result = tmp_path / "ddp.json"
    proc = subprocess.run(
        torchrun(2, str(SCRIPTS / "ddp_engine.py"), str(result)),
        env=python_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(result.read_text())
    runs = {"rigl-wrap0", "rigl-wrap1", "magran-wrap0", "magran-wrap1", "rigl-sparse", "magran-sparse"}
    assert set(res) == runs | {"rigl-sparse-unsynced", "sparse-after-wrapping"}
    for key in runs:
        r = res[key]
        assert r["masks_equal"], key
        assert r["weights_equal"], key
        assert r["sync_mismatch"] == 0, key  # each rank computed the same masks on its own
        assert r["updates"] == 15 and r["changes"] > 0, key
        assert r["invariants"] == [], key
    # Compact layers: RigL's captured dense gradient is all-reduced (sync.average_) before each rank
    # chooses; without it the ranks' choices differ, and only the broadcast of rank 0's masks hides it.
    unsynced = res["rigl-sparse-unsynced"]
    assert unsynced["sync_mismatch"] > 0 and unsynced["masks_equal"] and unsynced["weights_equal"]
    assert "before wrapping the model in DistributedDataParallel" in res["sparse-after-wrapping"]
