"""How the sparse runtime is put together: the kernels' build and operators."""

from __future__ import annotations

import fnmatch
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import PYTHON, python_env
from sparsediff.sparse.native import build, ops

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
