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
from .export import (
    SemiStructuredReport,
    check_nm,
    nm_violations,
    plan_semi_structured,
    to_semi_structured,
)
from .flops import FlopReport, count_flops, training_flops_per_step, training_flops_total
from .io import load_engine_state, save_engine_state
from .nm import (
    NM_METHODS,
    NMConfig,
    NMDensityReport,
    NMPattern,
    NMSparseEngine,
    has_nm_hooks,
    nm_mask,
    one_shot_nm,
    parse_nm,
    progressive_schedule,
    remove_nm_hooks,
    sparsify_nm,
    srste_weight,
)
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
    # N:M sparsity, SR-STE and 2:4 export
    "NM_METHODS",
    "NMConfig",
    "NMDensityReport",
    "NMPattern",
    "NMSparseEngine",
    "SemiStructuredReport",
    "check_nm",
    "has_nm_hooks",
    "nm_mask",
    "nm_violations",
    "one_shot_nm",
    "parse_nm",
    "plan_semi_structured",
    "progressive_schedule",
    "remove_nm_hooks",
    "sparsify_nm",
    "srste_weight",
    "to_semi_structured",
]
