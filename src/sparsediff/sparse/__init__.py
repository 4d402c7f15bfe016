"""The model-agnostic sparse engine (depends on torch only).

``sparsify(model, optimizer, method=..., sparsity=..., distribution=...)`` returns a :class:`SparseEngine`;
call its ``step()`` after every ``optimizer.step()``.
"""

from .distribution import DISTRIBUTIONS, layer_budgets, layer_densities, plan_sparsity
from .engine import (
    METHODS,
    DensityReport,
    LayerReport,
    SparseConfig,
    SparseEngine,
    UpdateStats,
    sparsify,
    unwrap_optimizer,
)
from .flops import FlopReport, count_flops, training_flops_per_step, training_flops_total
from .io import load_engine_state, save_engine_state
from .schedule import UpdateSchedule
from .targets import select_targets, unwrap_model

__all__ = [
    "DISTRIBUTIONS",
    "METHODS",
    "DensityReport",
    "FlopReport",
    "LayerReport",
    "SparseConfig",
    "SparseEngine",
    "UpdateSchedule",
    "UpdateStats",
    "count_flops",
    "layer_budgets",
    "load_engine_state",
    "save_engine_state",
    "layer_densities",
    "plan_sparsity",
    "select_targets",
    "sparsify",
    "training_flops_per_step",
    "training_flops_total",
    "unwrap_model",
    "unwrap_optimizer",
]
