"""``--backend sparse``: a trained sparse run samples the same images on compressed weights."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import TINY_LDM
from sparsediff.cli import main as cli
from sparsediff.errors import ConfigError
from sparsediff.run import RunDir
from sparsediff.sample import generate, use_backend
from sparsediff.sparse.runtime import SparseConv, SparseLinear


@pytest.fixture(scope="module")
def rigl90(first_stage, tmp_path_factory):
    out = tmp_path_factory.mktemp("backend") / "rigl90"
    args = ["train", "--preset", TINY_LDM, "--first-stage", str(first_stage), "--method", "rigl"]
    args += ["--sparsity", "0.9", "--update-every", "2", "--steps", "6", "--out", str(out), "--quiet"]
    assert cli(args) == 0
    return out


def test_sparse_backend_gives_the_dense_backends_samples(rigl90):
    dense, info_d, _ = generate(rigl90, 8, steps=10, seed=3, device="cpu", progress=False)
    sparse, info_s, _ = generate(rigl90, 8, steps=10, seed=3, device="cpu", progress=False, backend="sparse")
    assert info_d["backend"] == "dense" and info_s["backend"] == "sparse"
    assert info_s["native_kernels"] and info_s["sparse_layers"] > 0
    assert info_s["generate_seconds"] > 0 and info_d["generate_seconds"] > 0
    diff = (dense.images.int() - sparse.images.int()).abs()
    assert int(diff.max()) <= 2, "uint8 images differ by more than rounding"
    assert float(diff.float().mean()) < 0.05


def test_cli_records_backend_and_time(rigl90, tmp_path, capsys):
    out = tmp_path / "s"
    args = ["sample", "--run", str(rigl90), "--num", "4", "--steps", "5", "--backend", "sparse"]
    assert cli([*args, "--device", "cpu", "--out", str(out), "--quiet", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["backend"] == "sparse" and info["generate_seconds"] > 0
    assert json.loads((out / "sample.json").read_text())["backend"] == "sparse"
    assert RunDir(rigl90).exists()


def test_use_backend_converts_sparse_layers_and_rejects_bad_input():
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Conv2d(4, 4, 3, padding=1))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_((torch.rand(p.shape) < 0.1).float())
    same, info = use_backend(model, "dense")
    assert same is model and info == {"backend": "dense"}
    fast, info = use_backend(model, "sparse")
    assert isinstance(fast[0], SparseLinear) and isinstance(fast[1], SparseConv)
    assert info["sparse_layers"] == 2
    with pytest.raises(ConfigError, match="unknown backend"):
        use_backend(model, "fast")
    meta = torch.nn.Linear(4, 4, device="meta")
    with pytest.raises(ConfigError, match="runs on the CPU"):
        use_backend(meta, "sparse")


def test_demo_times_both_backends(rigl90):
    from sparsediff.demo import time_backends

    t = time_backends(rigl90, 4, "ddim", 3)
    assert t["dense"] > 0 and t["sparse"] > 0 and t["speedup"] == pytest.approx(t["dense"] / t["sparse"])
