"""The N:M engine: SR-STE fine-tuning with N:M masks recomputed on every forward pass.

``sparsify(model, optimizer, method="srste", nm="2:4")`` builds an :class:`NMSparseEngine`; the masks and
the SR-STE gradient are those of :mod:`sparsediff.sparse.nm`.

How the masked weight reaches the forward without renaming anything (checkpoints of the dense teacher
load into the student and back): while the model's forward runs, every masked weight's registered
Parameter is swapped for its masked tensor, and put back when the forward ends (``always_call`` hooks, so
an exception cannot leave it swapped). Optimisers, DDP and ``state_dict()`` only ever see the Parameter;
it receives the SR-STE gradient through a custom autograd Function. Swapping for the whole forward (not
only while the owning module runs) also masks weights read by another module, as
``nn.MultiheadAttention`` reads ``out_proj.weight``; and a module called several times in one forward
sees one masked tensor, so its gradients add up and the decay term is added once per forward pass.
Each owning module also has hooks of its own, so a submodule called directly is masked as well.

Cost: the masks of every layer are computed when the model's forward starts (a sort of each group of M),
and under ``no_grad`` the masked copies of all weights are alive together until it ends (about one more
copy of the masked weights; in training the autograd graph keeps them anyway).

Copies: ``copy.deepcopy(model)`` copies the hooks, so the copy (an EMA model) is masked the same way by the
same engine. Copy a dense teacher *before* ``sparsify``, or strip a copy with :func:`remove_nm_hooks`. A
hooked model cannot be pickled whole (``torch.save(model)``); save its ``state_dict()``.

With gradient accumulation over k micro-batches the decay is added k times per optimiser step (as in
the reference SR-STE code): divide ``srste_lambda`` by k to keep the per-step decay.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import ConfigError, StateError
from .base import DensityReport, Engine
from .nm import (
    NMPattern,
    has_nm_hooks,
    incompatible_reason,
    input_dim,
    nm_groups,
    nm_hook,
    nm_mask,
    parse_nm,
    parse_progressive,
    raise_incompatible,
    srste_weight,
    weight_owners,
)
from .spec import SparseSpec


def nm_schedule(spec: SparseSpec) -> tuple[tuple[int, NMPattern], ...]:
    """``((step, pattern), ...)`` of a spec: its progressive schedule, else ``((0, nm),)``."""
    if spec.progressive:
        return parse_progressive(spec.progressive)
    return ((0, parse_nm(spec.nm)),)


@dataclass
class NMDensityReport(DensityReport):
    """A :class:`DensityReport` plus the current N:M pattern and the target layers kept dense (and why)."""

    pattern: str = ""
    step: int = 0
    dense_layers: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["pattern"], d["step"], d["dense_layers"] = self.pattern, self.step, dict(self.dense_layers)
        return d

    def __str__(self) -> str:
        lines = [super().__str__(), f"N:M pattern {self.pattern} at step {self.step}"]
        if self.dense_layers:
            lines.append("kept dense:")
            lines.extend(f"  {name}: {why}" for name, why in self.dense_layers.items())
        return "\n".join(lines)


class _ForwardState(threading.local):
    """Per-thread forward bookkeeping (``nn.DataParallel`` runs replicas in threads)."""

    def __init__(self) -> None:
        self.depth = 0  # nesting of the model's own forward
        self.root_entries: list[tuple[nn.Module, str, str]] = []  # swapped in by the model's forward
        # (id(module), attr) -> stack of (dense tensor put back afterwards, whether this call swapped it)
        self.saved: dict[tuple[int, str], list[tuple[torch.Tensor | None, bool]]] = {}


class NMSparseEngine(Engine):
    """N:M masks recomputed on every forward pass, trained with SR-STE (see the module docstring).

    Build it with ``sparsify(model, optimizer, method="srste", nm="2:4")``. Beyond the :class:`Engine`
    members (``names``: the weights that carry an N:M mask in at least one phase of the schedule;
    ``num_updates``: pattern changes so far):
        schedule: ``((step, pattern), ...)``; a single entry without a progressive schedule.
        dense_layers: target weights kept dense under the current pattern -> why.
    """

    FAMILY: ClassVar[str] = "nm"
    STATE_FORMAT: ClassVar[str] = "sparsediff.nm/1"
    STATE_LABEL: ClassVar[str] = "N:M engine"
    STATE_KEYS: ClassVar[tuple[str, ...]] = ("method", "nm", "nm_incompatible")
    MASKS_EMA_UPDATES: ClassVar[bool] = False  # the Parameters stay dense, and so does their EMA

    def __init__(self, model: nn.Module, optimizer: Any | None, spec: SparseSpec):
        schedule = nm_schedule(spec)
        # normalised: the schedule as "N:M@step" entries, and nm its first pattern (what a state records)
        progressive = [f"{p}@{s}" for s, p in schedule] if spec.progressive else []
        super().__init__(model, optimizer, spec.replace(nm=str(schedule[0][1]), progressive=progressive))
        self.schedule = schedule
        self.srste_lambda = float(spec.srste_lambda)
        targets = self._select_targets()
        all_params = dict(targets)
        owners = weight_owners(self.model, all_params)
        self._in_dims = {
            n: input_dim(owners[n][0][0], owners[n][0][1]) if owners[n] else 1 for n in all_params
        }
        self._shapes = {n: tuple(p.shape) for n, p in targets}
        ms = sorted({pat.m for _, pat in self.schedule})
        names = []
        for name, p in targets:
            ok = [m for m in ms if incompatible_reason(p.shape, self._in_dims[name], m) is None]
            if len(ok) < len(ms) and spec.nm_incompatible == "error":
                bad = next(m for m in ms if m not in ok)
                raise_incompatible(name, p.shape, self._in_dims[name], bad)
            if ok:
                names.append(name)
            if not owners[name]:
                raise ConfigError(f"parameter {name!r} is registered by no module; it cannot be masked")
        if not names:
            raise ConfigError(
                f"nothing to make N:M-sparse in {type(self.model).__name__}: no target weight has an input "
                f"size that is a multiple of M={'/'.join(map(str, ms))}"
            )
        self._targets = [n for n, _ in targets]  # every selected weight, masked or kept dense
        self.names = names
        self._params = {n: all_params[n] for n in names}
        self._owners = {n: owners[n] for n in names}
        for name in names:
            for module, _ in self._owners[name]:
                if has_nm_hooks(module):
                    raise ConfigError(
                        f"layer {name!r} already carries an N:M engine's hooks; call .remove() on that "
                        "engine before building another"
                    )
        self._check_optimizer("an N:M target")

        self._fwd = _ForwardState()
        self._on_use: Callable[[str, torch.Tensor | None], None] | None = None
        self._mask_cache: dict[str, tuple[tuple, torch.Tensor]] = {}
        self._pattern: NMPattern = self.schedule[0][1]
        self._layer_pattern: dict[str, NMPattern | None] = {}
        self.dense_layers: dict[str, str] = {}
        self._set_pattern(self._pattern)

        self._own_modules = {id(mod) for pairs in self._owners.values() for mod, _ in pairs}
        paths = {id(mod): path for path, mod in self.model.named_modules(remove_duplicate=False)}
        self._owner_paths = {
            n: [(paths[id(mod)], attr) for mod, attr in pairs] for n, pairs in self._owners.items()
        }
        # Hooks are closures, not bound methods: a deepcopy of the model (an EMA copy) then shares this
        # engine instead of trying to copy it, and masks its own weights the same way.
        for name in names:
            for module, attr in self._owners[name]:
                self._hooks.append(module.register_forward_pre_hook(self._make_pre_hook(name, attr)))
                self._hooks.append(
                    module.register_forward_hook(self._make_post_hook(name, attr), always_call=True)
                )
        root_pre, root_post = self._make_root_hooks()
        # prepend: on a model that is itself a target's owner, the model-level swap comes first
        self._hooks.append(self.model.register_forward_pre_hook(root_pre, prepend=True))
        self._hooks.append(self.model.register_forward_hook(root_post, always_call=True))

    # ------------------------------------------------------------------ patterns

    @property
    def pattern(self) -> str:
        """The N:M pattern in force now (``"2:4"``)."""
        return str(self._pattern)

    def _set_pattern(self, pattern: NMPattern) -> None:
        self._pattern = pattern
        self._layer_pattern = {}
        self.dense_layers = {}
        for name in self._targets:
            reason = incompatible_reason(self._shapes[name], self._in_dims[name], pattern.m)
            if name in self._params:
                self._layer_pattern[name] = pattern if reason is None else None
            if reason is not None:
                self.dense_layers[name] = reason
        self._mask_cache.clear()

    def pattern_at(self, step: int) -> NMPattern:
        """The pattern in force after ``step`` optimiser steps."""
        current = self.schedule[0][1]
        for start, pattern in self.schedule:
            if step >= start:
                current = pattern
        return current

    # ------------------------------------------------------------------ forward hooks

    def _masked(self, name: str, dense: torch.Tensor, pattern: NMPattern) -> torch.Tensor:
        mask = nm_mask(dense, pattern.n, pattern.m, self._in_dims[name])
        if torch.is_grad_enabled() and dense.requires_grad:
            return srste_weight(dense, mask, self.srste_lambda)
        return torch.where(mask, dense, 0.0)

    @staticmethod
    def _put(module: nn.Module, attr: str, value: torch.Tensor) -> None:
        # Written into _parameters directly: Module.__setattr__ only accepts a Parameter there. RNNs read
        # their weights from _flat_weights, which is kept in step the way RNNBase.__setattr__ would.
        module._parameters[attr] = value
        flat_names = getattr(module, "_flat_weights_names", None)
        if flat_names is not None and attr in flat_names:
            module._flat_weights[flat_names.index(attr)] = value

    def _swap_in(
        self, module: nn.Module, attr: str, name: str, made: dict[int, torch.Tensor] | None = None
    ) -> None:
        """Put the masked weight in place of ``module.<attr>`` (a no-op when it already is)."""
        stack = self._fwd.saved.setdefault((id(module), attr), [])
        dense = module._parameters.get(attr)
        pattern = self._layer_pattern.get(name)
        if dense is None or pattern is None or (stack and stack[-1][1]):
            stack.append((None, False))  # kept dense now, or already swapped by the model's forward
            return
        if id(module) in self._own_modules and isinstance(dense, nn.Parameter):
            self._params[name] = dense  # follows a module whose Parameter was replaced
        masked = made.get(id(dense)) if made is not None else None
        if masked is None:
            masked = self._masked(name, dense, pattern)
            if made is not None:
                made[id(dense)] = masked  # a tied weight: one masked tensor for all its owners
        stack.append((dense, True))
        self._put(module, attr, masked)
        if self._on_use is not None:
            self._on_use(name, masked)

    def _swap_out(self, module: nn.Module, attr: str, name: str) -> None:
        key = (id(module), attr)
        stack = self._fwd.saved.get(key)
        if not stack:
            return
        dense, swapped = stack.pop()
        if not stack:
            del self._fwd.saved[key]
        if swapped:
            self._put(module, attr, dense)
            if self._on_use is not None:
                self._on_use(name, None)

    def _make_pre_hook(self, name: str, attr: str):
        @nm_hook
        def nm_pre_hook(module: nn.Module, args: Any) -> None:
            self._swap_in(module, attr, name)

        return nm_pre_hook

    def _make_post_hook(self, name: str, attr: str):
        @nm_hook
        def nm_post_hook(module: nn.Module, args: Any, output: Any) -> None:
            self._swap_out(module, attr, name)

        return nm_post_hook

    def _owners_in(self, root: nn.Module) -> list[tuple[str, nn.Module, str]]:
        if root is self.model:
            return [(n, mod, attr) for n, pairs in self._owners.items() for mod, attr in pairs]
        out = []  # a deepcopy of the model, or an nn.DataParallel replica
        for n, paths in self._owner_paths.items():
            for path, attr in paths:
                try:
                    out.append((n, root.get_submodule(path), attr))
                except AttributeError:
                    continue
        return out

    def _make_root_hooks(self):
        # The model's forward swaps every masked weight in for its whole duration, so a weight that is
        # read outside its own module's forward (nn.MultiheadAttention reads out_proj.weight itself) is
        # masked too, and a module called several times sees one masked tensor: its gradients add up and
        # the SR-STE decay is added once per forward pass. The per-module hooks then do nothing; they
        # mask the weight of a submodule called on its own.
        @nm_hook
        def nm_root_pre_hook(module: nn.Module, args: Any) -> None:
            fwd = self._fwd
            fwd.depth += 1
            if fwd.depth > 1:
                return
            made: dict[int, torch.Tensor] = {}
            # recorded first: if a mask fails midway, the post hook (always called) still swaps back
            fwd.root_entries = entries = self._owners_in(module)
            for name, mod, attr in entries:
                self._swap_in(mod, attr, name, made)

        @nm_hook
        def nm_root_post_hook(module: nn.Module, args: Any, output: Any) -> None:
            fwd = self._fwd
            fwd.depth = max(0, fwd.depth - 1)
            if fwd.depth == 0:
                entries, fwd.root_entries = fwd.root_entries, []
                for name, mod, attr in reversed(entries):
                    self._swap_out(mod, attr, name)

        return nm_root_pre_hook, nm_root_post_hook

    @contextlib.contextmanager
    def track_weight_uses(self, callback: Callable[[str, torch.Tensor | None], None]) -> Iterator[None]:
        """Within the block, ``callback(name, masked)`` runs when a masked weight is put in place of its
        Parameter and ``callback(name, None)`` when it is taken out again.

        :func:`count_flops` uses it to charge the products that read the masked copy (another storage
        than the Parameter's) to the layer.
        """
        previous = self._on_use
        self._on_use = callback
        try:
            yield
        finally:
            self._on_use = previous

    # ------------------------------------------------------------------ masks and budgets

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """Layer name -> bool mask the next forward pass will use (from the current dense weights)."""
        out = {}
        for name in self.names:
            p = self._params[name]
            pattern = self._layer_pattern[name]
            key = (p._version, p.data_ptr(), p.dtype, p.device, pattern)
            hit = self._mask_cache.get(name)
            if hit is None or hit[0] != key:
                if pattern is None:
                    mask = torch.ones(p.shape, dtype=torch.bool, device=p.device)
                else:
                    mask = nm_mask(p, pattern.n, pattern.m, self._in_dims[name])
                hit = (key, mask)
                self._mask_cache[name] = hit
            out[name] = hit[1]
        return out

    @property
    def budgets(self) -> dict[str, int]:
        """Layer name -> number of weights the current pattern keeps (every weight when kept dense)."""
        out = {}
        for name in self.names:
            numel = math.prod(self._shapes[name])
            pattern = self._layer_pattern[name]
            out[name] = numel if pattern is None else numel // pattern.m * pattern.n
        return out

    @property
    def densities(self) -> dict[str, float]:
        """Layer name -> current density (N/M, or 1.0 while kept dense)."""
        return {n: b / math.prod(self._shapes[n]) for n, b in self.budgets.items()}

    @torch.no_grad()
    def fold(self) -> None:
        """Multiply every masked weight by its current mask, in place (for export or one-off evaluation).

        The hooks stay; the next forward recomputes the same effective weights from the folded ones.
        """
        for name, mask in self.masks.items():
            self._params[name].masked_fill_(~mask, 0)
        self._mask_cache.clear()

    # ------------------------------------------------------------------ stepping

    def _advance(self, step: int) -> bool:
        pattern = self.pattern_at(step)
        if pattern == self._pattern:
            return False
        self._set_pattern(pattern)
        self.num_updates += 1
        return True

    @torch.no_grad()
    def _mask_ema_tensors(self, tensors) -> None:
        """Mask each EMA weight with the N:M mask of its own magnitudes (what sampling and export do)."""
        for name, t in tensors:
            pattern = self._layer_pattern[name]
            if pattern is not None:
                t.masked_fill_(nm_mask(t, pattern.n, pattern.m, self._in_dims[name]).logical_not(), 0)

    # ------------------------------------------------------------------ reports

    def _effective_weight(self, name: str, mask: torch.Tensor) -> torch.Tensor:
        return self._params[name].detach().masked_fill(~mask, 0)

    def _make_report(self, **fields: Any) -> NMDensityReport:
        """Density of the effective (masked) weights, the pattern in force and the layers kept dense."""
        return NMDensityReport(
            **fields, pattern=self.pattern, step=self.step_count, dense_layers=dict(self.dense_layers)
        )

    def check_invariants(self) -> list[str]:
        """Problems found (empty when all hold): a mask that does not keep exactly N of every M."""
        problems = []
        for name, mask in self.masks.items():
            pattern = self._layer_pattern[name]
            if pattern is None:
                continue
            groups, _ = nm_groups(mask, pattern.m, self._in_dims[name])
            wrong = int((groups.sum(-1) != pattern.n).sum())
            if wrong:
                problems.append(f"{name}: {wrong} groups of {pattern.m} do not keep exactly {pattern.n}")
        return problems

    # ------------------------------------------------------------------ state

    def _state_extra(self) -> dict[str, Any]:
        # the masks follow from the weights, so none are stored
        return {
            "pattern": self.pattern,
            "schedule": [f"{p}@{s}" for s, p in self.schedule],
            "layers": {n: list(self._shapes[n]) for n in self.names},
            "dense_layers": dict(self.dense_layers),
        }

    def _check_state(self, state: Mapping[str, Any]) -> None:
        mine = [f"{p}@{s}" for s, p in self.schedule]
        if list(state.get("schedule", mine)) != mine:
            raise StateError(
                f"N:M engine state was saved with schedule {list(state['schedule'])} "
                f"but this engine has {mine}"
            )

    def _saved_shapes(self, state: Mapping[str, Any]) -> Mapping[str, Sequence[int]]:
        return state.get("layers", {})

    def _restore(self, state: Mapping[str, Any], step: int) -> None:
        self._set_pattern(self.pattern_at(step))

    def hooked_modules(self) -> set[nn.Module]:
        """The modules this engine has forward hooks on (the owners of its weights and the model)."""
        return {self.model} | {mod for owners in self._owners.values() for mod, _ in owners}

    def remove(self) -> None:
        """Detach every hook: the model is left with its plain dense Parameters (call :meth:`fold` first to
        keep the sparsity)."""
        super().remove()
        for name in self.names:
            for module, attr in self._owners[name]:
                if not isinstance(module._parameters.get(attr), nn.Parameter):
                    self._put(module, attr, self._params[name])
        self._fwd.saved.clear()
        self._fwd.root_entries = []
        self._fwd.depth = 0

    def __repr__(self) -> str:
        c = self.spec
        return (
            f"NMSparseEngine(method={c.method!r}, pattern={self.pattern!r}, lambda={c.srste_lambda}, "
            f"layers={len(self.names)}, dense={len(self.dense_layers)}, step={self.step_count})"
        )
