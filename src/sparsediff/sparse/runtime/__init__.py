"""Inference on compressed sparse weights: the layers of a trained sparse model run through native kernels.

``to_sparse_inference(model, masks)`` returns a copy of ``model`` with the same forward semantics in which
every sparsified layer sparse enough to gain runs on compressed weights through the native kernels of
``sparse/native/``: ``nn.Linear`` -> :class:`SparseLinear` (SpMM), ``nn.Conv1d``/``nn.Conv2d`` with stride
1 and groups 1 -> :class:`SparseConv` (direct sparse convolution), ``nn.GRU`` -> :class:`SparseGRU` (one
SpMM for the input projections, the recurrence in native code). Other layers, and layers too dense to
gain, stay as they are. Works on any module built from these layers (diffusers models included).

Modules:

- ``matrix.py``: :class:`~.matrix.CompressedMatrix`, the one compressed-matrix type (the linear's weight,
  the convolution's kernel, both matrices of a GRU layer), and :class:`~.matrix.CompressedLayer`, the base
  of the layers (one place where what they derive from their weights is dropped when those change).
- ``linear.py``, ``conv.py``, ``gru.py``: the inference layers.
- ``planner.py``: the conversion policy, one table of layer kinds (:data:`~.planner.KINDS`: which dense
  layers each takes, its density limit, its compressed layer) read by :func:`to_sparse_inference` and
  :func:`sparse_layers`; the measured choice.

Where things go: a new layer kind is one entry in the planner's table (:func:`~.planner.register`), with
its layer class here. Trainable compressed layers go here too, next to the inference ones (for example
``train_linear.py``, or a ``training`` module), built on the same :class:`~.matrix.CompressedMatrix`.
Their kernels live in ``sparse/native/``: a backward kernel next to its forward, and every operator
declared once in ``native/ops.py`` with its shapes and its autograd formula.
"""

from __future__ import annotations

from ..native import kernels
from .conv import SparseConv
from .gru import SparseGRU
from .linear import SparseLinear
from .planner import (
    MAX_DENSITY,
    MEASURE_ROUNDS,
    MEASURE_SECONDS,
    MEASURED_MARGIN,
    sparse_layers,
    to_sparse_inference,
)

# How a model can run: "dense" (masked dense weights, torch's kernels) or "sparse" (this runtime).
BACKENDS = ("dense", "sparse")

__all__ = [
    "BACKENDS",
    "MAX_DENSITY",
    "MEASURED_MARGIN",
    "MEASURE_ROUNDS",
    "MEASURE_SECONDS",
    "SparseConv",
    "SparseGRU",
    "SparseLinear",
    "kernels",
    "sparse_layers",
    "to_sparse_inference",
]
