"""Building and loading sparsediff's native CPU kernels (``kernels.cpp``).

The kernels are compiled on first use through PyTorch's extension machinery (``torch.utils.cpp_extension``,
with ``ninja``) and cached under ``$SPARSEDIFF_CACHE`` (default ``~/.cache/sparsediff``), in a folder named
by a hash of the source, the compiler flags and the torch version, so an upgrade rebuilds and a second
process reuses the build. x86-64 CPUs with AVX2/FMA get the vectorised kernels; other CPUs a portable path.

When no kernels can be had (no compiler, a failed build, or ``SPARSEDIFF_NATIVE=0``), :func:`kernels`
returns None after warning once, and the sparse runtime computes with the dense masked weights: slower,
never wrong.
"""

from __future__ import annotations

import hashlib
import os
import platform
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

SOURCE = Path(__file__).with_name("kernels.cpp")
DISABLE_ENV = "SPARSEDIFF_NATIVE"

_cache: dict[str, ModuleType | None] = {}
OPERATORS = hasattr(torch.library, "custom_op")  # the kernels can be torch operators (ops.py; torch >= 2.4)
_warned = False


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
    root = Path(os.environ.get("SPARSEDIFF_CACHE", Path.home() / ".cache" / "sparsediff"))
    key = hashlib.sha256(
        SOURCE.read_bytes() + " ".join(compile_flags()).encode() + torch.__version__.encode()
    ).hexdigest()[:16]
    return root / f"kernels-{key}"


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


def kernels() -> ModuleType | None:
    """The compiled kernel module, built on first use; None (with one warning) when it cannot be had."""
    if "mod" in _cache:
        return _cache["mod"]
    mod = None
    if os.environ.get(DISABLE_ENV, "1") == "0":
        _warn_once(f"disabled by {DISABLE_ENV}=0")
    else:
        try:
            from torch.utils import cpp_extension

            path = build_dir()
            path.mkdir(parents=True, exist_ok=True)
            mod = cpp_extension.load(
                name="sparsediff_kernels",
                sources=[str(SOURCE)],
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
    same kernels as ``torch.ops.sparsediff`` operators (same names and arguments)."""
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
