"""sparsediff's native CPU kernels: the C++ sources, their build, and the kernels as torch operators.

The kernels compute the products of the sparse runtime's layers on compressed weights (``sparse/runtime/``
holds the layers and the converter). Files, by concern:

- ``tiles.h``: what every kernel builds on (AVX2 detection, input packing, the register tiles, the tile
  width and the dispatch over it); ``kernels.h``: the kernels' entry points.
- ``spmm.cpp`` (sparse linears), ``conv.cpp`` (direct sparse convolution), ``gru.cpp`` (the GRU
  recurrence, with its vectorised exp / sigmoid / tanh, and its training variant that saves the gates):
  one file per kernel; beside each its backward for training: ``spmm_backward.cpp`` (the values gradient
  of a linear, an SDDMM; its input gradient is the forward SpMM over ``W^T``), ``conv_backward.cpp`` (the
  values gradient at the kept taps; the input gradient is the forward convolution over the transposed,
  flipped kernel), ``gru_backward.cpp`` (the backward through time) with ``gru.h``, what the GRU's forward
  and backward share.
- ``bindings.cpp``: the module definition, every kernel bound in one place.
- ``build.py``: compiling and loading (:func:`kernels`; the build is keyed by a hash of every ``.cpp`` and
  ``.h`` here, the flags and torch's version), the warn-once dense fallback, :func:`native_for`.
- ``ops.py``: each kernel declared once, as a torch operator with its shapes (for ``torch.compile``).

Where things go: a kernel's backward sits next to its forward, in the same ``.cpp`` or a
``<kernel>_backward.cpp`` beside it (``spmm_backward.cpp``, ...), sharing ``tiles.h``; it is bound in
``bindings.cpp`` and declared once in ``ops.py`` like every kernel. The autograd of training lives with
the trainable layers that call the kernels (``sparse/runtime/compact_*.py``). A new ``.cpp`` here is compiled, and every ``.cpp`` and ``.h`` is part of
the build's hash, with no further step. The trainable layers that call these kernels go to
``sparse/runtime/``, next to the inference ones.
"""

from __future__ import annotations

from . import ops  # noqa: F401  (registers torch.ops.sparsediff for torch.compile)
from .build import DISABLE_ENV, OPERATORS, kernels, native_for, reset

__all__ = ["DISABLE_ENV", "OPERATORS", "kernels", "native_for", "reset"]
