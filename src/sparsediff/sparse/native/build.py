"""Building and loading sparsediff's native CPU kernels (the ``.cpp`` and ``.h`` files of this folder).

The kernels are compiled on first use through PyTorch's extension machinery (``torch.utils.cpp_extension``,
with ``ninja``) and cached under ``$SPARSEDIFF_CACHE`` (default ``~/.cache/sparsediff``), in a folder named
by a hash of every source file of this folder (each ``.cpp`` and ``.h``, names and contents), the compiler
flags and the torch version: a change to any of them, or a torch upgrade, rebuilds, and a second process
reuses the build. x86-64 CPUs with AVX2/FMA get the vectorised kernels; other CPUs a portable path.

When no kernels can be had (no compiler, a failed build, or ``SPARSEDIFF_NATIVE=0``), :func:`kernels`
returns None after warning once, and the sparse runtime computes with the dense masked weights: slower,
never wrong.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import platform
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

SOURCE_DIR = Path(__file__).parent
DISABLE_ENV = "SPARSEDIFF_NATIVE"

_cache: dict[str, ModuleType | None] = {}
OPERATORS = hasattr(torch.library, "custom_op")  # the kernels can be torch operators (ops.py; torch >= 2.4)
_warned = False

# What torch.utils.cpp_extension says on import when it finds a CUDA toolkit but no CUDA device: every CPU
# build would print it, and there is nothing a user of the CPU kernels could do about it.
CUDA_HOME_NOTICE = "No CUDA runtime is found"


def sources() -> list[Path]:
    """Every source file of the kernels: the ``.cpp`` files (compiled) and the ``.h`` files they include."""
    return sorted(p for p in SOURCE_DIR.iterdir() if p.suffix in (".cpp", ".h") and p.is_file())


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def compile_flags() -> list[str]:
    flags = ["-O3", "-fopenmp"]
    if platform.machine() in ("x86_64", "AMD64") and {"avx2", "fma"} <= _cpu_flags():
        flags += ["-mavx2", "-mfma"]
    return flags


def build_dir() -> Path:
    """Where the kernels are built: named by a hash of every source file, the flags and torch's version."""
    root = Path(os.environ.get("SPARSEDIFF_CACHE", Path.home() / ".cache" / "sparsediff"))
    digest = hashlib.sha256()
    for path in sources():  # the name too: a renamed or an added file is another build
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    digest.update(" ".join(compile_flags()).encode() + torch.__version__.encode())
    return root / f"kernels-{digest.hexdigest()[:16]}"


def _warn_once(reason: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            f"sparsediff: native sparse kernels are unavailable ({reason}); the sparse runtime falls back "
            "to dense masked weights (correct, not faster). Install a C++ compiler (g++) and ninja to build them.",
            RuntimeWarning,
            stacklevel=3,
        )


class _DropCudaHomeNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(CUDA_HOME_NOTICE)


@contextlib.contextmanager
def without_cuda_home_notice() -> Iterator[None]:
    """Inside the block, torch.utils.cpp_extension's "No CUDA runtime is found, using CUDA_HOME=..." notice
    is dropped, and nothing else. Recent torch logs it: a filter on that module's logger drops that one
    message. Older torch prints it: what the block prints is held back and passed on without that line."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    quiet = _DropCudaHomeNotice()
    logger.addFilter(quiet)
    held = {"stdout": io.StringIO(), "stderr": io.StringIO()}
    try:
        with contextlib.redirect_stdout(held["stdout"]), contextlib.redirect_stderr(held["stderr"]):
            yield
    finally:
        logger.removeFilter(quiet)
        for name, text in held.items():
            kept = [
                line for line in text.getvalue().splitlines(True) if not line.startswith(CUDA_HOME_NOTICE)
            ]
            if kept:
                stream = getattr(sys, name)
                stream.write("".join(kept))
                stream.flush()


def _cpp_extension() -> ModuleType:
    """``torch.utils.cpp_extension``, imported without its CUDA_HOME notice (it speaks once, on import)."""
    with without_cuda_home_notice():
        from torch.utils import cpp_extension
    return cpp_extension


def kernels() -> ModuleType | None:
    """The compiled kernel module, built on first use; None (with one warning) when it cannot be had."""
    if "mod" in _cache:
        return _cache["mod"]
    mod = None
    if os.environ.get(DISABLE_ENV, "1") == "0":
        _warn_once(f"disabled by {DISABLE_ENV}=0")
    else:
        try:
            cpp_extension = _cpp_extension()
            path = build_dir()
            path.mkdir(parents=True, exist_ok=True)
            mod = cpp_extension.load(
                name="sparsediff_kernels",
                sources=[str(p) for p in sources() if p.suffix == ".cpp"],
                extra_cflags=compile_flags(),
                extra_ldflags=["-fopenmp"],
                build_directory=str(path),
                verbose=False,
            )
        except Exception as e:  # no compiler, no ninja, a failed build: fall back, never fail
            _warn_once(f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")
            mod = None
    _cache["mod"] = mod
    return mod


def native_for(*tensors: torch.Tensor | None) -> Any:
    """The kernel module when these inputs can take the native path (float32, on the CPU, no autograd
    graph to record); None when the caller must compute densely. While ``torch.compile`` traces, the
    same kernels as ``torch.ops.sparsediff`` operators (same names and arguments: ops.py)."""
    grad = torch.is_grad_enabled()
    for t in tensors:  # on the hot path of every sparse layer call: the cheapest checks torch offers
        if t is None:
            continue
        if t.dtype is not torch.float32 or not t.is_cpu or (grad and t.requires_grad):
            return None
    mod = kernels()
    if (
        mod is not None and OPERATORS and _compiling()
    ):  # the kernels as operators the compiler traces (ops.py)
        return torch.ops.sparsediff
    return mod


_compiling = getattr(torch.compiler, "is_compiling", lambda: False)  # torch.compile is tracing


def reset() -> None:
    """Forget the loaded module and the warning (tests use it to force a fallback)."""
    global _warned
    _cache.clear()
    _warned = False
