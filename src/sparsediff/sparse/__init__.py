"""The model-agnostic sparse engine (depends on torch only).

``sparsify(model, optimizer, method=..., sparsity=..., distribution=...)`` (or ``sparsify(model, optimizer,
spec)`` with a :class:`SparseSpec`) returns an :class:`Engine`: a :class:`SparseEngine` (masked dense
weights) or, with ``backend="sparse"``, a :class:`CompactEngine` (compact layers that hold only the
non-zeros) for dense, static, RigL and MagRan; an :class:`NMSparseEngine` for SR-STE. Call its ``step()``
after every ``optimizer.step()``.

Modules: ``spec`` (the settings), ``methods`` (one class per method and its traits), ``base`` (the engine
contract, step counting and reports), ``engine`` (masked unstructured masks) with its parts ``topology``
(drop and grow), ``ever_active`` (the weights ever active, RigL's in-time over-parameterisation),
``guard`` (changed-weights check), ``optim_state``, ``sync`` (DDP), ``compact_engine``
(the sparse backend), ``nm`` (N:M patterns, masks, one-shot pruning) and ``nm_engine`` (SR-STE), ``api``
(``sparsify``), ``masks`` (initial masks), ``integrations`` (accelerate, EMA copies), ``distribution``,
``schedule``, ``targets``, ``io`` (engine state files), ``codec`` (sparse tensors on disk), ``counts``
(the one definition of a model's parameter and non-zero counts), ``flops``, ``semi_structured`` (2:4
conversion for CUDA), ``runtime`` (sparse inference and compact training layers) and ``native`` (the
C++ kernels).
"""

from .api import sparsify
from .base import DensityReport, Engine, LayerReport, derive_seed, unwrap_optimizer
from .codec import Support, load_compressed, save_compressed
from .compact_engine import CompactEngine
from .counts import ParameterCounts, parameter_counts
from .distribution import DISTRIBUTIONS, layer_budgets, layer_densities, plan_sparsity
from .engine import SparseEngine, UpdateStats
from .flops import FlopReport, count_flops, training_flops_per_step, training_flops_total
from .integrations import EMATargets, hook_accelerator
from .io import load_engine_state, save_engine_state
from .masks import masks_from_weights
from .nm import (
    NMPattern,
    check_nm,
    has_nm_hooks,
    nm_mask,
    nm_violations,
    one_shot_nm,
    parse_nm,
    parse_progressive,
    progressive_schedule,
    remove_nm_hooks,
    srste_weight,
)
from .nm_engine import NMDensityReport, NMSparseEngine
from .schedule import UpdateSchedule
from .semi_structured import SemiStructuredReport, plan_semi_structured, to_semi_structured
from .spec import DYNAMIC_METHODS, ENGINE_METHODS, METHODS, NM_METHODS, UNSTRUCTURED_METHODS, SparseSpec
from .targets import select_targets, unwrap_model

__all__ = [
    "DISTRIBUTIONS",
    "DYNAMIC_METHODS",
    "ENGINE_METHODS",
    "METHODS",
    "UNSTRUCTURED_METHODS",
    "CompactEngine",
    "DensityReport",
    "EMATargets",
    "Engine",
    "FlopReport",
    "LayerReport",
    "ParameterCounts",
    "SparseEngine",
    "SparseSpec",
    "UpdateSchedule",
    "UpdateStats",
    "count_flops",
    "derive_seed",
    "hook_accelerator",
    "layer_budgets",
    "load_engine_state",
    # compressed sparse tensors in safetensors files (codec/)
    "Support",
    "load_compressed",
    "save_compressed",
    "save_engine_state",
    "layer_densities",
    "masks_from_weights",
    "parameter_counts",
    "plan_sparsity",
    "select_targets",
    "sparsify",
    "training_flops_per_step",
    "training_flops_total",
    "unwrap_model",
    "unwrap_optimizer",
    # N:M sparsity, SR-STE and 2:4 export
    "NM_METHODS",
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
    "parse_progressive",
    "plan_semi_structured",
    "progressive_schedule",
    "remove_nm_hooks",
    "srste_weight",
    "to_semi_structured",
]
