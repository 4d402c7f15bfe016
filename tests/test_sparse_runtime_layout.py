"""How the sparse runtime is put together: the kernels' build and operators, and the planner's table."""

from __future__ import annotations

import fnmatch
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import PYTHON, python_env
from sparsediff.sparse.native import build, ops
from sparsediff.sparse.runtime import MAX_DENSITY, SparseLinear, planner, sparse_layers, to_sparse_inference

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def built():
    mod = build.kernels()
    if mod is None:
        pytest.fail("the native kernels did not build on this machine (g++ and ninja are installed by make)")
    return mod


def test_the_build_is_keyed_by_every_source_file(tmp_path, monkeypatch):
    # an edit to any .cpp or .h must rebuild: a header shared by every kernel included
    names = [p.name for p in build.sources()]
    assert {"tiles.h", "spmm.cpp", "conv.cpp", "gru.cpp", "bindings.cpp"} <= set(names)
    copy = tmp_path / "native"
    copy.mkdir()
    for path in build.sources():
        shutil.copy(path, copy / path.name)
    (copy / "notes.txt").write_text("not a source")
    monkeypatch.setattr(build, "SOURCE_DIR", copy)
    monkeypatch.setenv("SPARSEDIFF_CACHE", str(tmp_path / "cache"))
    first = build.build_dir()
    assert first.parent == tmp_path / "cache"
    seen = {first}
    for name in names:
        original = (copy / name).read_bytes()
        (copy / name).write_bytes(original + b"\n// edited\n")
        assert build.build_dir() not in seen, f"editing {name} does not change the build"
        seen.add(build.build_dir())
        (copy / name).write_bytes(original)
    assert build.build_dir() == first
    (copy / "notes.txt").write_text("still not a source")
    assert build.build_dir() == first
    (copy / "extra.h").write_text("// a new header\n")
    assert build.build_dir() != first


def test_the_package_ships_every_kernel_source():
    # a non-editable install takes only what [tool.setuptools.package-data] names
    tomllib = pytest.importorskip("tomllib")
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    package = ROOT / "src" / "sparsediff"
    for path in build.sources():
        rel = path.relative_to(package).as_posix()
        assert any(fnmatch.fnmatch(rel, p) for p in patterns["sparsediff"]), f"{rel} is not package data"


def test_every_bound_kernel_is_declared_once_as_an_operator(built):
    bound = {n for n in dir(built) if not n.startswith("_")} - {"has_avx2"}  # a query, not a kernel
    assert bound == set(ops.DECLARED)
    if build.OPERATORS:
        for name in ops.DECLARED:
            assert getattr(ops, name) is not ops.DECLARED[name]  # an operator, not the bare declaration
            assert hasattr(torch.ops.sparsediff, name)


def test_only_the_cuda_home_notice_is_dropped(capsys):
    # torch logs the notice (older versions print it); everything else said meanwhile still comes through
    logger = logging.getLogger("torch.utils.cpp_extension")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        with build.without_cuda_home_notice():
            logger.warning("No CUDA runtime is found, using CUDA_HOME='%s'", "/usr/local/cuda")
            logger.warning("something else")
            print("No CUDA runtime is found, using CUDA_HOME='/usr/local/cuda'")
            print("a line of output")
            print("No CUDA runtime is found, using CUDA_HOME='/opt/cuda'", file=sys.stderr)
            print("a line of errors", file=sys.stderr)
        logger.warning("No CUDA runtime is found (after the block)")
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == [
        "something else",
        "No CUDA runtime is found (after the block)",
    ]
    out, err = capsys.readouterr()  # torch's own handler may have written the other records to stderr
    assert out == "a line of output\n"
    assert "a line of errors\n" in err and "using CUDA_HOME" not in err


def test_loading_the_kernels_says_nothing_about_cuda(tmp_path):
    # a CUDA toolkit and no CUDA device: torch's extension machinery would print its CUDA_HOME notice
    env = {**python_env(), "CUDA_HOME": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""}

    def said(code: str) -> str:
        proc = subprocess.run([PYTHON, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout + proc.stderr

    assert "No CUDA runtime is found" in said("import torch.utils.cpp_extension")  # it would, here
    quiet = said("from sparsediff.sparse.native import build; build._cpp_extension(); print('imported')")
    assert "imported" in quiet and "No CUDA runtime is found" not in quiet


class _Doubled(nn.Linear):
    """A linear with a forward of its own: no built-in kind converts it."""

    def forward(self, x):
        return 2 * super().forward(x)


class _SparseDoubled(nn.Module):
    def __init__(self, inner: SparseLinear):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return 2 * self.inner(x)


def test_a_registered_layer_kind_is_converted_by_its_own_limit_and_listed(built):
    torch.manual_seed(0)
    model = nn.Sequential(_Doubled(64, 32), nn.GELU(), nn.Linear(32, 8))
    mask = torch.zeros(32, 64, dtype=torch.bool)
    mask.view(-1)[torch.randperm(mask.numel())[: int(0.45 * mask.numel())]] = True  # above linears' 0.4
    with torch.no_grad():
        model[0].weight.mul_(mask)
    assert sparse_layers(to_sparse_inference(model)) == []  # the dense head and no kind for _Doubled
    kind = planner.LayerKind(
        "doubled",
        0.5,
        accepts=lambda m: type(m) is _Doubled,
        weights=lambda m: ["weight"],
        convert=lambda m, active: _SparseDoubled(SparseLinear(m.weight, m.bias, active["weight"])),
        layer=_SparseDoubled,
    )
    planner.register(kind)
    try:
        assert MAX_DENSITY["doubled"] == 0.5
        report: dict = {}
        fast = to_sparse_inference(model, report=report)
        assert isinstance(fast[0], _SparseDoubled) and sparse_layers(fast) == ["0", "0.inner"]
        assert report["0"] == {"density": pytest.approx(0.45, abs=1e-3), "sparse": True}
        x = torch.randn(5, 64)
        with torch.no_grad():
            torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(fast[0](x), 2 * F.linear(x, model[0].weight, model[0].bias))
        assert sparse_layers(to_sparse_inference(model, max_density=0.4)) == []  # one limit for all kinds
    finally:
        planner.KINDS.pop("doubled")
        MAX_DENSITY.pop("doubled")
    assert sparse_layers(fast) == ["0.inner"]  # no longer a kind: only its inner SparseLinear is listed
