"""Metrics: FID through torch-fidelity (Inception-v3 or offline sparsediff feature networks).

Imports are lazy: ``import sparsediff.metrics`` does not import torch-fidelity (and its torchvision
models) until a FID function is used (``sparsediff train-features`` never loads it).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "FEATURE_EXTRACTORS": "fid",
    "compute_fid": "fid",
    "metric_name": "fid",
    "register_extractors": "fid",
    "FeatureNet": "features",
    "FeatureNetConfig": "features",
    "load_feature_net": "features",
    "train_feature_net": "features",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
