"""``sparsify``: build the engine a :class:`SparseSpec` asks for (the one place that knows both engines)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .base import Engine
from .compact_engine import CompactEngine
from .engine import SparseEngine
from .methods import NM_FIELDS, get_method, method_names
from .nm import parse_progressive
from .nm_engine import NMSparseEngine
from .schedule import resolve_end_step
from .spec import SPARSIFY_DEFAULTS, SparseSpec
from .targets import as_list

_FIELDS = frozenset(f.name for f in dataclasses.fields(SparseSpec))
# The engine of each family of methods (a method says its family: methods.SparseMethod.family).
ENGINES: dict[str, type[Engine]] = {cls.FAMILY: cls for cls in (SparseEngine, NMSparseEngine)}


def sparsify(
    model: nn.Module,
    optimizer: Any | None = None,
    spec: SparseSpec | None = None,
    *,
    total_steps: int | None = None,
    masks: str | Mapping[str, torch.Tensor] | None = None,
    accelerator: Any | None = None,
    ema: Any | None = None,
    override_schedule: bool = False,
    grad_accum: int | None = None,
    **fields: Any,
) -> Engine:
    """Make ``model`` sparse from now on and return the engine that keeps it so.

    Either pass a :class:`SparseSpec` (a run config's ``cfg.sparse``) or its fields as keywords; keywords
    override the spec's fields (a keyword given as ``None`` keeps the spec's value). Without a spec the
    fields start from :data:`SPARSIFY_DEFAULTS` (``method="rigl"``, ``sparsity=0.9``)::

        engine = sparsify(model, optimizer, method="rigl", sparsity=0.9, total_steps=10_000)
        engine = sparsify(model, optimizer, cfg.sparse, total_steps=steps)

    Args:
        model: any ``nn.Module`` (DDP and ``torch.compile`` wrappers are looked through).
        optimizer: the optimiser that trains ``model``; ``None`` builds an engine for inspection only.
        spec: the settings; see :class:`SparseSpec` for every field. ``method`` is ``"dense"`` (no masks),
            ``"static"`` (random mask fixed at the start), ``"rigl"`` (drop by magnitude, grow by
            dense-gradient magnitude), ``"magran"`` (drop by magnitude, grow at random), all giving a
            :class:`SparseEngine`, or ``"srste"`` (N:M masks recomputed every forward pass, SR-STE
            gradients: an :class:`NMSparseEngine`; ``nm``, ``srste_lambda``, ``progressive``,
            ``nm_incompatible``, ``include`` and ``exclude`` apply to it). ``backend="sparse"`` (static,
            rigl, magran) trains compact layers instead of masked dense tensors: a
            :class:`~sparsediff.sparse.compact_engine.CompactEngine`, which replaces the target layers of
            ``model`` in place and points ``optimizer`` at their compact parameters (build the optimiser on
            ``model.parameters()`` just before; call ``sparsify`` before ``accelerator.prepare`` or a DDP
            wrapper). ``kernels`` chooses each compact layer's kernels (``"auto"``, ``"measure"``).
        total_steps: training length; RigL and MagRan stop updating at ``end_fraction * total_steps``
            unless ``end_step`` is given (``end_step="never"`` keeps updating, with constant decay).
        masks: initial masks instead of random ones (static, RigL, MagRan): ``"weights"`` keeps the
            non-zero positions of weights that are sparse already (a sparse model loaded back from a
            diffusers folder), topped up to each layer's budget with positions where the weight is 0; or
            a mapping ``{layer name: bool mask}`` whose masks keep exactly the budgets of the settings.
            The weights are taken as trained ones: ``rescale_init`` does not apply.
        accelerator: an ``accelerate.Accelerator``: the engine is registered for its checkpoints and its
            ``clip_grad_norm_`` clips the sparse gradient (:meth:`Engine.attach_accelerator`). Before or
            after ``accelerator.prepare`` both work; before ``accelerator.load_state``.
        ema: an EMA copy of the model (diffusers' ``EMAModel(model.parameters())``, torch's
            ``AveragedModel``, an ``nn.Module`` copy) to keep exactly as sparse as the model
            (:meth:`Engine.attach_ema`).
        grad_accum: with ``backend="sparse"`` and RigL: backward passes per optimiser step (gradient
            accumulation), whose dense gradients an update step sums before choosing what to grow (default:
            the accelerator's ``gradient_accumulation_steps``, else 1).
        override_schedule: when the engine's state is loaded later (a resumed run), use the update
            schedule given here instead of the saved one (by default the saved one is kept, and a
            difference is reported with a warning).
        fields: :class:`SparseSpec` fields. ``include`` / ``exclude`` also take one comma-separated string.
            The N:M settings (``nm``, ``srste_lambda``, ``progressive``, ``nm_incompatible``) given as
            keywords are refused for an unstructured method; ``nm`` and ``progressive`` are exclusive (a
            progressive schedule names its own patterns; with a spec whose ``progressive`` is set, ``nm``
            is not used).

    Raises:
        ConfigError: a setting is invalid (the message names it), or ``method="oneshot"``, which is not
            an engine: prune with :func:`~sparsediff.sparse.one_shot_nm` or ``sparsediff finetune
            --method oneshot``; ``masks`` do not fit the model or its budgets.
        StateError: new random masks would zero weights that are sparse already (a sparse run's
            checkpoint loaded before ``sparsify``): restore the engine's state, or pass ``masks="weights"``.
    """
    unknown = sorted(set(fields) - _FIELDS)
    if unknown:
        raise TypeError(f"sparsify() got an unexpected keyword argument {unknown[0]!r}")
    if spec is not None and not isinstance(spec, SparseSpec):
        raise TypeError(f"sparsify() takes a SparseSpec as its spec, got {type(spec).__name__}")
    given = {k: v for k, v in fields.items() if v is not None}
    base = SPARSIFY_DEFAULTS if spec is None else spec
    method = get_method(given.get("method", base.method))
    if not method.has_engine:
        raise ConfigError(
            f"method {method.name!r} prunes once without training, so it has no engine: call "
            "sparsediff.sparse.one_shot_nm(model, n, m) or run `sparsediff finetune --method oneshot`"
        )
    for key in ("include", "exclude"):
        if key in given:
            given[key] = as_list(given[key])
    if method.structured:
        if "nm" in given and "progressive" in given:
            raise ConfigError("give either nm (a fixed N:M pattern) or progressive (a schedule), not both")
        if "progressive" in given:
            parse_progressive(given["progressive"])  # a string or an empty list is refused here
            given["progressive"] = list(given["progressive"])
        elif "nm" in given:
            given["progressive"] = []  # a fixed pattern given now replaces the spec's schedule
    else:
        extra = [k for k in NM_FIELDS if k in given]
        if extra:
            trainers = " / ".join(repr(m) for m in method_names(structured=True, has_engine=True))
            raise ConfigError(f"{', '.join(extra)} apply to method={trainers} only, not {method.name!r}")
    resolved = resolve_spec(base.replace(**given), total_steps)
    if method.structured:
        if masks is not None:
            raise ConfigError("masks= is for unstructured methods: N:M masks follow the weights themselves")
        engine = ENGINES[method.family](model, optimizer, resolved)
    elif resolved.backend == "sparse":
        if grad_accum is None and accelerator is not None:
            grad_accum = int(getattr(accelerator, "gradient_accumulation_steps", 1) or 1)
        engine = CompactEngine(
            model,
            optimizer,
            resolved,
            masks=masks,
            kernels=resolved.kernels,
            grad_accum=1 if grad_accum is None else grad_accum,
        )
    else:
        engine = ENGINES[method.family](model, optimizer, resolved, masks=masks)
    engine.override_schedule = bool(override_schedule)
    return _integrate(engine, accelerator, ema)


def resolve_spec(spec: SparseSpec, total_steps: int | None) -> SparseSpec:
    """``spec`` validated once, with what an engine needs settled: the last update step of a dynamic
    method (from ``end_step`` or ``end_fraction * total_steps``; None for never or no updates), and
    sparsity 0 for a method without masks."""
    spec.validate(None, need_sparsity=False)
    method = spec.sparse_method
    if not method.masked:
        spec.sparsity = 0.0
    spec.end_step = (
        resolve_end_step(spec.end_step, total_steps, spec.end_fraction) if method.dynamic else None
    )
    return spec


def _integrate(engine: Engine, accelerator: Any | None, ema: Any | None) -> Engine:
    if accelerator is not None:
        engine.attach_accelerator(accelerator)
    if ema is not None:
        engine.attach_ema(ema)
    return engine
