"""The engine contract: what every sparse engine offers, the report types, and the helpers both share.

:class:`Engine` is the base class of the unstructured :class:`~sparsediff.sparse.engine.SparseEngine`
(static, RigL, MagRan) and the N:M :class:`~sparsediff.sparse.nm_engine.NMSparseEngine` (SR-STE). A
training loop, a FLOP counter or an exporter uses only the members declared here, whatever engine it
holds:

- ``names``, ``masks``, ``budgets``, ``densities``: the target weights and their masks;
- ``step_count``, ``num_updates`` (0 for static and dense), ``pattern`` (``"2:4"`` for N:M, else None),
  ``end_step`` (last topology-update step, or None), ``new_connections()``;
- ``step()`` after each optimiser step, ``mask_gradients()`` before clipping, ``track_weight_uses()``;
- ``report()``, ``check_invariants()``, ``state_dict()`` / ``load_state_dict()``, ``remove()``;
- ``attach_accelerator()`` (accelerate checkpoints and sparse clipping), ``attach_ema()`` /
  ``mask_ema()`` (EMA copies exactly as sparse as the model).
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import ConfigError, StateError
from .counts import parameter_counts
from .integrations import EMATargets, hook_accelerator
from .methods import SCHEDULE_FIELDS, get_method, method_names
from .spec import SparseSpec
from .targets import select_targets, unwrap_model

# ---------------------------------------------------------------------------------------------- reports


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, ...]
    numel: int
    active: int  # positions the mask keeps (== budget)
    nonzero: int  # entries that are literally non-zero now (just-grown weights are still 0)
    budget: int
    density: float  # active / numel
    ever_active: int | None = None  # positions active at any step so far (None: the engine does not say)


@dataclass
class DensityReport:
    """Per-layer and total density of the sparsified weights and of the whole model."""

    layers: list[LayerReport]
    params_total: int  # every parameter of the model
    params_nonzero: int  # active entries of targets + every entry of the other parameters
    target_total: int  # entries of the sparsified weights
    target_nonzero: int  # active entries of the sparsified weights
    target_ever_active: int | None = None  # entries of the sparsified weights active at any step so far

    @property
    def density(self) -> float:
        return self.params_nonzero / max(self.params_total, 1)

    @property
    def target_density(self) -> float:
        return self.target_nonzero / max(self.target_total, 1)

    @property
    def ever_active_fraction(self) -> float | None:
        """Fraction of the sparsified weights active at any step so far (RigL's in-time
        over-parameterisation rate; the density itself for a static mask), or None where the engine does
        not track it (N:M)."""
        if self.target_ever_active is None:
            return None
        return self.target_ever_active / max(self.target_total, 1)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "layers"}
        d["density"] = self.density
        d["target_density"] = self.target_density
        d["ever_active_fraction"] = self.ever_active_fraction
        d["layers"] = [asdict(layer) for layer in self.layers]
        return d

    def __str__(self) -> str:
        w = max([len(layer.name) for layer in self.layers] + [5])
        lines = [f"{'layer':<{w}}  {'shape':<22} {'density':>8} {'active':>12} {'total':>12}"]
        for layer in self.layers:
            shape = "x".join(map(str, layer.shape))
            lines.append(
                f"{layer.name:<{w}}  {shape:<22} {layer.density:>8.4f} {layer.active:>12,} {layer.numel:>12,}"
            )
        lines.append(
            f"{'sparsified weights':<{w}}  {'':<22} {self.target_density:>8.4f} "
            f"{self.target_nonzero:>12,} {self.target_total:>12,}"
        )
        lines.append(
            f"{'whole model':<{w}}  {'':<22} {self.density:>8.4f} {self.params_nonzero:>12,} {self.params_total:>12,}"
        )
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- helpers


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed from ``seed`` and labels; the same on every process and platform."""
    text = "/".join([str(seed), *map(str, parts)]).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & ((1 << 63) - 1)


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The innermost ``torch.optim.Optimizer`` of a wrapper (accelerate's ``AcceleratedOptimizer``...)."""
    opt = optimizer
    for _ in range(16):
        inner = getattr(opt, "optimizer", None)
        if isinstance(inner, torch.optim.Optimizer):
            opt = inner
        else:
            break
    if not isinstance(opt, torch.optim.Optimizer):
        raise ConfigError(
            f"sparsify() needs a torch.optim.Optimizer (or a wrapper exposing one as .optimizer), "
            f"got {type(optimizer).__name__}"
        )
    return opt


class _LayerMasks(Mapping):
    """An engine's masks as a mapping that builds each one when it is read and keeps none: reports count
    them layer by layer without the masks of the whole model existing at once."""

    def __init__(self, engine: Engine):
        self._engine = engine

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._engine.names:
            raise KeyError(name)
        return self._engine._layer_mask(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._engine.names)

    def __len__(self) -> int:
        return len(self._engine.names)


# ---------------------------------------------------------------------------------------------- contract


class Engine(abc.ABC):
    """Masks for the target weights of one model, kept true through a training loop.

    Build one with :func:`sparsediff.sparsify`. Attributes every engine has:
        spec: the :class:`SparseSpec` it was built from (resolved: ``end_step`` is a step or None).
        method: the :class:`~sparsediff.sparse.methods.SparseMethod` of ``spec.method``.
        model: the user's module (DDP / ``torch.compile`` wrappers looked through).
        optimizer: the innermost ``torch.optim.Optimizer``, or None for an inspection-only engine.
        names: target parameter names carrying a mask, in model order.
        step_count: optimiser steps taken (skipped mixed-precision steps do not count).
        num_updates: mask updates done (topology updates, N:M pattern changes; 0 for static and dense).
        stats: running counters (``idle_calls``: ``step()`` calls without an optimiser step before them).
    """

    FAMILY: ClassVar[str]  # the family of methods this engine implements ("unstructured", "nm")
    BACKEND: ClassVar[str] = "dense"  # how the weights train: dense tensors (masked) or compact ("sparse")
    STATE_FORMAT: ClassVar[str]  # the format marker of state_dict()
    STATE_LABEL: ClassVar[str] = "engine"  # how error messages name this engine's state
    STATE_KEYS: ClassVar[tuple[str, ...]] = ("method",)  # spec fields a loaded state must agree on
    # whether attached EMA copies are masked after every update (False: the engine keeps dense
    # Parameters itself and masks them on use, so an EMA of them stays dense too)
    MASKS_EMA_UPDATES: ClassVar[bool] = True

    def __init__(self, model: nn.Module, optimizer: Any | None, spec: SparseSpec):
        # The spec comes validated and resolved from sparsify(); the method must be one of this engine's.
        self.method = get_method(spec.method)
        if self.method.family != self.FAMILY or not self.method.has_engine:
            mine = method_names(structured=self.FAMILY == "nm", has_engine=True)
            raise ConfigError(
                f"{type(self).__name__} implements method {' / '.join(mine)}, not {spec.method!r}; "
                "build engines with sparsediff.sparsify()"
            )
        self.spec = spec.for_engine()
        self.model = unwrap_model(model)
        self.optimizer = unwrap_optimizer(optimizer) if optimizer is not None else None
        self.names: list[str] = []
        self.step_count = 0
        self.num_updates = 0
        self.stats: dict[str, int] = {"idle_calls": 0}
        self._params: dict[str, nn.Parameter] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._opt_steps = 0  # counted by an optimiser step hook
        self._hooks: list[Any] = []
        self._emas: list[tuple[EMATargets, Callable[[], None]]] = []  # attached EMA copies, their undo
        self._cleanups: list[Callable[[], None]] = []  # run by remove()
        # Resuming: the saved update schedule wins unless this is True (sparsify(..., override_schedule=)).
        self.override_schedule = False
        self.schedule_changes: dict[str, tuple[Any, Any]] = {}  # field -> (saved, given) at the last load
        if self.optimizer is not None:
            self._hooks.append(self.optimizer.register_step_post_hook(self._count_step))

    def _count_step(self, optimizer, args, kwargs) -> None:
        # Counted by the optimiser itself: step() compares it with its own count to see whether the
        # optimiser really stepped (a skipped mixed-precision step runs no hook).
        self._opt_steps += 1

    def _select_targets(self) -> list[tuple[str, nn.Parameter]]:
        return select_targets(self.model, self.spec.include or None, self.spec.exclude or None)

    def _check_optimizer(self, what: str) -> None:
        """Refuse a target the optimiser does not update (its mask could never be kept by the hooks)."""
        if self.optimizer is None:
            return
        in_opt = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        for name in self.names:
            p = self._params[name]
            if p.requires_grad and id(p) not in in_opt:
                raise ConfigError(
                    f"parameter {name!r} is {what} but the optimiser does not update it; "
                    "add it to the optimiser or exclude it"
                )

    # ------------------------------------------------------------------ masks

    @property
    @abc.abstractmethod
    def masks(self) -> dict[str, torch.Tensor]:
        """Layer name -> bool mask (True = active)."""

    @property
    @abc.abstractmethod
    def budgets(self) -> dict[str, int]:
        """Layer name -> number of weights the mask keeps."""

    @property
    @abc.abstractmethod
    def densities(self) -> dict[str, float]:
        """Layer name -> density of the layer."""

    @property
    def pattern(self) -> str | None:
        """The N:M pattern in force (``"2:4"``), or None for unstructured masks."""
        return None

    @property
    def end_step(self) -> int | None:
        """The last step with a topology update, or None when there is none or no end."""
        return None

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The target parameters, in model order (a compact engine's: the kept values)."""
        for name in self.names:
            yield name, self._params[name]

    def dense_view(self, name: str, tensor: torch.Tensor | None = None) -> torch.Tensor:
        """Target ``name``'s weight (or ``tensor``, shaped like its parameter: a gradient, an optimiser
        state) in the dense weight's shape, detached. Whatever form the engine holds weights in, so code
        that inspects them (tests, reports) reads every backend alike."""
        return (self._params[name] if tensor is None else tensor).detach()

    def mask_gradients(self) -> None:  # noqa: B027 (optional: a no-op unless overridden)
        """Zero the gradients of masked weights (call before gradient clipping); a no-op where the
        method updates every weight."""

    def new_connections(self) -> int:
        """Weights grown from zero by a topology update in the step just taken (0 without one)."""
        return 0

    @contextlib.contextmanager
    def track_weight_uses(self, callback: Callable[[str, torch.Tensor | None], None]) -> Iterator[None]:
        """Within the block, ``callback(name, tensor)`` runs when a masked copy of a weight is put in
        place of its Parameter, ``callback(name, None)`` when it is taken out again (for FLOP
        attribution); engines that mask the Parameter in place never call it."""
        yield

    # ------------------------------------------------------------------ stepping

    def step(self) -> bool:
        """Call once after each ``optimizer.step()``. Returns whether the masks changed.

        Does nothing (and returns False) when the optimiser did not actually step since the last call,
        as after a mixed-precision step whose gradients overflowed, or a gradient-accumulation micro-step.
        """
        if self.optimizer is None:
            raise ConfigError("this engine was built without an optimiser (inspection only); it cannot step")
        if self._opt_steps == self.step_count:
            self.stats["idle_calls"] += 1
            self._end_step(idle=True)
            return False
        changed = False
        while self.step_count < self._opt_steps:  # normally exactly one step
            self.step_count += 1
            changed |= self._advance(self.step_count)
        self._end_step(idle=False)
        if changed and self.MASKS_EMA_UPDATES:
            for targets, _ in self._emas:  # weights dropped now must leave the EMA copies too
                self._mask_ema_tensors(targets.tensors())
        return changed

    @abc.abstractmethod
    def _advance(self, step: int) -> bool:
        """Bring the masks to optimiser step ``step``; whether they changed."""

    def _end_step(self, idle: bool) -> None:  # noqa: B027 (optional hook)
        """Forget per-step state once ``step()`` is done (``idle``: no optimiser step happened)."""

    # ------------------------------------------------------------------ reports

    def _effective_weight(self, name: str, mask: torch.Tensor) -> torch.Tensor:
        """The weight the forward pass uses (its non-zeros are counted in reports)."""
        return self._params[name].detach()

    def _make_report(self, **fields: Any) -> DensityReport:
        return DensityReport(**fields)

    def report(self) -> DensityReport:
        """Per-layer and total density from the masks (active positions), with measured non-zeros."""
        budgets = self.budgets
        layers = []
        for name in self.names:  # one layer's mask at a time (a compact engine builds each from its layout)
            shape, mask = self._shapes[name], self._layer_mask(name)
            active = int(mask.count_nonzero())
            nonzero = int(torch.count_nonzero(self._effective_weight(name, mask)))
            numel = math.prod(shape)
            layers.append(LayerReport(name, shape, numel, active, nonzero, budgets[name], active / numel))
        ever = self._ever_active_counts({layer.name: layer.active for layer in layers})
        if ever is not None:
            for layer in layers:
                layer.ever_active = ever[layer.name]
        # the one definition (counts.py), its masks again one layer at a time
        counts = parameter_counts(self._counted_parameters(), _LayerMasks(self))
        return self._make_report(
            layers=layers,
            params_total=counts.total,
            params_nonzero=counts.nonzero,
            target_total=counts.target_total,
            target_nonzero=counts.target_nonzero,
            target_ever_active=None if ever is None else sum(ever.values()),
        )

    def _layer_mask(self, name: str) -> torch.Tensor:
        """The current mask of target ``name`` (bool or 0/1, the weight's shape)."""
        return self.masks[name]

    def _ever_active_counts(self, active: dict[str, int]) -> dict[str, int] | None:
        """Layer name -> positions active at any step so far, given each layer's ``active`` count now;
        None where the engine does not track it."""
        return None

    def _counted_parameters(self) -> Any:
        """What :meth:`report` counts: the model's parameters (an engine that holds its weights in another
        form gives their dense-equivalent shapes)."""
        return self.model

    @abc.abstractmethod
    def check_invariants(self) -> list[str]:
        """Problems found (empty when every invariant holds)."""

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly (tensors on the CPU, the rest JSON-serialisable)."""
        return {
            "format": self.STATE_FORMAT,
            "config": self.spec.to_dict(),
            "step": self.step_count,
            "num_updates": self.num_updates,
            **self._state_extra(),
        }

    @abc.abstractmethod
    def _state_extra(self) -> dict[str, Any]:
        """What this engine adds to :meth:`state_dict`."""

    def load_state_dict(self, state: Mapping[str, Any], *, override_schedule: bool | None = None) -> None:
        """Restore what :meth:`state_dict` saved.

        The update schedule (prune ratio, decay, update interval, last update step, growth seed) is the
        saved one: a resumed run goes on exactly as it started, even when this engine was built with other
        settings (a longer ``total_steps`` moves ``end_step``). Any difference is reported once, with a
        ``UserWarning`` naming the fields and both values, and kept in :attr:`schedule_changes`.

        Args:
            state: what :meth:`state_dict` returned.
            override_schedule: use this engine's schedule instead of the saved one (default:
                :attr:`override_schedule`, which ``sparsify(..., override_schedule=True)`` sets).

        Raises:
            StateError: the state comes from another kind of engine, from one with other settings, or
                from a model whose target layers or their shapes differ (the layer is named).
        """
        label = self.STATE_LABEL
        if not isinstance(state, Mapping) or state.get("format") != self.STATE_FORMAT:
            raise StateError(
                f"not a sparsediff {label} state dict (missing format marker {self.STATE_FORMAT!r})"
            )
        saved = state.get("config", {})
        for key in self.STATE_KEYS:
            mine = getattr(self.spec, key)
            if key in saved and saved[key] != mine:
                raise StateError(
                    f"{label} state was saved with {key}={saved[key]!r} but this engine has {key}={mine!r}"
                )
        self._check_state(state)
        self._check_layers(self._saved_shapes(state))
        step = state.get("step")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise StateError(f"{label} state has an invalid step {step!r}")
        changes = self._schedule_differences(saved)
        self._restore(state, step)
        self.step_count = self._opt_steps = step
        self.num_updates = int(state.get("num_updates", 0))
        override = self.override_schedule if override_schedule is None else override_schedule
        self._resume_schedule(saved, changes, override)

    def _schedule_differences(self, saved: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
        """Schedule field -> (saved value, this engine's value) where they differ (dynamic methods)."""
        if not self.method.dynamic:
            return {}
        return {
            k: (saved[k], getattr(self.spec, k))
            for k in SCHEDULE_FIELDS
            if k in saved and saved[k] != getattr(self.spec, k)
        }

    def _resume_schedule(self, saved: Mapping[str, Any], changes: dict[str, tuple[Any, Any]], override: bool):
        self.schedule_changes = dict(changes)
        if not changes:
            return
        listed = ", ".join(f"{k} {a!r} (saved) vs {b!r} (now)" for k, (a, b) in changes.items())
        if override:
            message = (
                f"{self.STATE_LABEL} state: the update schedule given now replaces the saved one: {listed}"
            )
        else:
            kept = {k: saved[k] for k in changes}
            if "end_fraction" in saved:
                kept["end_fraction"] = saved["end_fraction"]
            self.spec = self.spec.replace(**kept)
            try:
                self._schedule_changed()
            except ConfigError as e:
                raise StateError(f"{self.STATE_LABEL} state has an invalid update schedule: {e}") from e
            message = (
                f"{self.STATE_LABEL} state: the saved update schedule is kept, not the one given now: {listed}; "
                "pass override_schedule=True (sparsify or load_state_dict) to use the new one"
            )
        warnings.warn(message, UserWarning, stacklevel=3)

    def _schedule_changed(self) -> None:  # noqa: B027 (optional hook: engines with a drop/grow schedule)
        """Rebuild what depends on the schedule fields of :attr:`spec` (they were restored from a state)."""

    def _check_state(self, state: Mapping[str, Any]) -> None:  # noqa: B027 (optional hook)
        """Engine-specific checks of a state before anything is restored."""

    @abc.abstractmethod
    def _saved_shapes(self, state: Mapping[str, Any]) -> Mapping[str, Sequence[int]]:
        """Layer name -> shape, as the state records them."""

    @abc.abstractmethod
    def _restore(self, state: Mapping[str, Any], step: int) -> None:
        """Restore the engine-specific part of a checked state (may check more first)."""

    def _check_layers(self, saved: Mapping[str, Sequence[int]]) -> None:
        """The state's layers must be this engine's, with the same shapes."""
        prefix = f"{self.STATE_LABEL} state does not match this model: "
        missing = [n for n in self.names if n not in saved]
        unexpected = [n for n in saved if n not in self._params]
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"missing layer(s) {', '.join(missing[:5])}")
            if unexpected:
                parts.append(f"unexpected layer(s) {', '.join(unexpected[:5])}")
            raise StateError(prefix + "; ".join(parts))
        for name in self.names:
            if tuple(saved[name]) != self._shapes[name]:
                raise StateError(
                    f"{prefix}layer {name!r} has shape {tuple(saved[name])} in the state but "
                    f"{self._shapes[name]} in the model"
                )

    # ------------------------------------------------------------------ integrations

    def attach_accelerator(self, accelerator: Any, *, checkpoint: bool = True, clip: bool = True) -> Engine:
        """Keep this engine through an accelerate loop (``sparsify(..., accelerator=acc)`` calls it).

        Call it before ``accelerator.load_state``; before or after ``accelerator.prepare`` both work (the
        masks follow the parameters to the device ``prepare`` puts them on).

        Args:
            accelerator: an ``accelerate.Accelerator``.
            checkpoint: register the engine with ``accelerator.register_for_checkpointing``, so that
                ``save_state`` writes its state and ``load_state`` restores masks, step count and update
                schedule exactly. Registered objects are stored by position: register the same objects
                in the same order in the process that resumes.
            clip: make ``accelerator.clip_grad_norm_`` mask this engine's gradients first (once the
                gradient is complete, i.e. when ``accelerator.sync_gradients``), so that the clip norm is
                the sparse gradient's.

        Returns:
            the engine.
        """
        self._cleanups.append(hook_accelerator(self, accelerator, checkpoint=checkpoint, clip=clip))
        return self

    def attach_ema(self, ema: Any, parameters: Iterable[torch.Tensor] | None = None) -> Any:
        """Keep an EMA copy of the model exactly as sparse as the model (``sparsify(..., ema=ema)``).

        The EMA's masked positions are zeroed now, after each of its updates (diffusers' ``EMAModel.step``,
        ``AveragedModel.update_parameters``; both are wrapped) and after each topology update, so that a
        weight dropped from the model leaves the EMA at once instead of decaying towards 0. A plain
        ``nn.Module`` copy has no update to wrap: call :meth:`mask_ema` after updating it. The N:M engine
        keeps dense Parameters (the forward masks them), so their EMA stays dense as well; call
        :meth:`mask_ema` before saving it.

        Args:
            ema: diffusers' ``EMAModel``, torch's ``AveragedModel`` or an ``nn.Module`` copy of the model.
            parameters: for an ``EMAModel``, the parameters it was built from (default: every parameter
                of the engine's model, as ``EMAModel(model.parameters())`` has them).

        Returns:
            ``ema``.
        """
        targets = EMATargets(ema, dict(self.named_parameters()), self.model, parameters)

        def after_update() -> None:
            if self.MASKS_EMA_UPDATES and any(t is targets for t, _ in self._emas):
                self._mask_ema_tensors(targets.tensors())

        self._emas.append((targets, targets.wrap_update(after_update)))
        if self.MASKS_EMA_UPDATES:
            self._mask_ema_tensors(targets.tensors())
        return ema

    @torch.no_grad()
    def mask_ema(self, ema: Any, parameters: Iterable[torch.Tensor] | None = None) -> None:
        """Zero the EMA copy's weights wherever the model's are masked (call it before saving an EMA).

        Takes the same ``ema`` and ``parameters`` as :meth:`attach_ema`; the N:M engine masks each EMA
        weight with the N:M mask of its own magnitudes, as sampling and export do.
        """
        targets = next((t for t, _ in self._emas if t.ema is ema and parameters is None), None)
        if targets is None:
            targets = EMATargets(ema, dict(self.named_parameters()), self.model, parameters)
        self._mask_ema_tensors(targets.tensors())

    @abc.abstractmethod
    def _mask_ema_tensors(self, tensors: Sequence[tuple[str, torch.Tensor]]) -> None:
        """Zero the masked positions of EMA tensors (``(target name, tensor)``), in place."""

    def remove(self) -> None:
        """Detach the engine's hooks, its EMA copies and its accelerator clipping."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for _, undo in self._emas:
            undo()
        self._emas.clear()
        for undo in self._cleanups:
            undo()
        self._cleanups.clear()
