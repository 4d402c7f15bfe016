"""The unstructured engine (dense, static, RigL, MagRan): masks, topology updates and the hooks keeping them.

A ``SparseEngine`` owns one mask per target weight and plugs into any training loop::

    engine = sparsediff.sparsify(model, optimizer, method="rigl", sparsity=0.9, total_steps=10_000)
    for batch in loader:
        loss = ...
        loss.backward()
        optimizer.step()
        engine.step()          # topology update when one is due; returns whether the masks changed
        optimizer.zero_grad()

How the invariants are kept, for any ``torch.optim`` optimiser (and wrappers such as accelerate's):

- a step *pre*-hook on the optimiser masks the gradients (after DDP's all-reduce and GradScaler's unscale),
  so inactive weights get no update and no optimiser state; on a step that ends in a RigL update it first
  keeps ``|grad|``, the dense gradient the grow criterion needs;
- a step *post*-hook multiplies the weights by their masks (so weight decay, momentum or any other
  optimiser rule can never revive a masked weight);
- ``step()`` sees whether the optimiser really stepped since the last call: a mixed-precision step whose
  gradients overflowed is skipped by the scaler, the hooks never run, and no topology update happens;
- a topology update (:mod:`~sparsediff.sparse.topology`) drops the ``k`` active weights of smallest
  magnitude and grows ``k`` among the positions not kept, scored by the method
  (:mod:`~sparsediff.sparse.methods`), so each layer keeps exactly its budget. Weights that were inactive
  and are grown start at exactly 0 and every optimiser state tensor with the weight's shape is zeroed there
  (:mod:`~sparsediff.sparse.optim_state`);
- random choices (initial masks, MagRan growth) use generators seeded from ``(seed, layer name, step)``,
  so every data-parallel rank makes the same choice and resumption needs no generator state; the masks
  are still broadcast from rank 0 after every update (:mod:`~sparsediff.sparse.sync`);
- masks follow their weights: when a weight moves to another device or dtype (``accelerator.prepare``
  after ``sparsify``, ``model.half()``), its mask moves with it in the next hook. A model on the meta
  device gets its masks (made on the CPU, the same as anywhere) once :meth:`SparseEngine.apply_masks` is
  called after its weights are loaded;
- nothing trained is zeroed silently (:mod:`~sparsediff.sparse.guard`): weights changed by something else
  than the engine (a checkpoint loaded without the engine's state) are checked before a step, and
  ``sparsify`` refuses new random masks on weights that are sparse already.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import ConfigError, StateError
from .base import Engine, derive_seed
from .distribution import layer_budgets, layer_densities
from .ever_active import EverActive
from .guard import WeightGuard, refuse_pruned_writes, refuse_sparse_weights
from .masks import check_given_masks, masks_from_weights, random_mask
from .optim_state import zero_state_where
from .schedule import UpdateSchedule
from .spec import SparseSpec
from .sync import broadcast_masks
from .topology import UpdateStats, drop_and_grow, drop_count

__all__ = ["SparseEngine", "UpdateStats"]


class SparseEngine(Engine):
    """Masks and dynamic topology for the target weights of one model (see the module docstring).

    Build it with :func:`sparsediff.sparsify`. Beyond the :class:`Engine` members:
        schedule: the :class:`UpdateSchedule` of RigL / MagRan (None for static and dense).
        last_update: :class:`UpdateStats` of the latest topology update.
        stats: also ``sync_mismatch``: mask entries rank 0 had to correct on another rank.
    """

    FAMILY: ClassVar[str] = "unstructured"
    STATE_FORMAT: ClassVar[str] = "sparsediff.sparse/1"
    STATE_LABEL: ClassVar[str] = "engine"
    STATE_KEYS: ClassVar[tuple[str, ...]] = ("method", "sparsity", "distribution")

    def __init__(
        self,
        model: nn.Module,
        optimizer: Any | None,
        spec: SparseSpec,
        masks: str | Mapping[str, torch.Tensor] | None = None,
    ):
        super().__init__(model, optimizer, spec)
        self._setup_targets()
        self._grads_masked = False
        self._dense_grads: dict[str, torch.Tensor] | None = None

        # Masks are kept in the weight's dtype: multiplying by a float mask is several times faster than
        # by a bool one, and the hot path (two multiplies per step) is all the engine costs between updates.
        given = self._given_masks(masks) if masks is not None else None
        self._fresh = given is None  # new random masks (not the user's or restored ones)
        self._masks: dict[str, torch.Tensor] = {}
        for name in self.names:
            p = self._params[name]
            mask = given[name] if given is not None else self._initial_mask(name, p)
            device = torch.device("cpu") if p.is_meta else p.device  # a meta mask would hold no values
            self._masks[name] = mask.to(device=device, dtype=p.dtype)
        self._sync_masks(self._masks)
        self._record_ever_active(self._masks)
        self._guard = WeightGuard(self._params, self.names)
        self._pending = any(p.is_meta for p in self._params.values())  # masks not applied yet
        if not self._pending:
            self._apply_initial_masks()
        if self.optimizer is not None and self.method.masked:
            self._hooks.append(self.optimizer.register_step_pre_hook(self._pre_step_hook))
            self._hooks.append(self.optimizer.register_step_post_hook(self._post_step_hook))

    def _setup_targets(self) -> None:
        """The targets, their budgets and the update schedule (what every unstructured engine has)."""
        spec = self.spec
        targets = self._select_targets()
        self.names = [n for n, _ in targets]
        self._params = dict(targets)
        self._shapes = {n: tuple(p.shape) for n, p in targets}
        sparsity = spec.sparsity if self.method.masked else 0.0
        self._densities = layer_densities(self._shapes, sparsity, spec.distribution, spec.erk_power)
        self._budgets = layer_budgets(self._shapes, self._densities, sparsity)
        self.schedule = self._make_schedule()
        self.last_update = UpdateStats()
        self.stats["sync_mismatch"] = 0
        self._bool_cache: dict[str, torch.Tensor] | None = None
        # the positions ever active, where the topology moves (static and dense: the mask itself)
        self._ever = EverActive(self._shapes) if self.method.dynamic else None
        self._check_optimizer("a sparsification target")

    def _make_schedule(self) -> UpdateSchedule | None:
        s = self.spec
        if not self.method.dynamic:
            return None
        return UpdateSchedule(s.prune_ratio, s.update_every, s.end_step, s.decay)

    # ------------------------------------------------------------------ masks

    def _initial_mask(self, name: str, p: torch.Tensor) -> torch.Tensor:
        return random_mask(tuple(p.shape), self.budgets[name], self.spec.seed, name)

    def _given_masks(self, masks: str | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Initial masks from ``sparsify(..., masks=...)`` (bool, on the CPU), checked against the budgets."""
        if not self.method.masked:
            raise ConfigError(f"masks= applies to masked methods; method {self.method.name!r} has no masks")
        settings = f"sparsity={self.spec.sparsity} with distribution={self.spec.distribution!r}"
        if isinstance(masks, Mapping):
            return check_given_masks(masks, self._shapes, self.budgets, settings)
        if masks != "weights":
            raise ConfigError(f"masks= takes 'weights' or a mapping of layer name -> mask, got {masks!r}")
        return masks_from_weights(self._params, self.budgets, self.spec.seed, settings)

    @torch.no_grad()
    def _apply_initial_masks(self) -> None:
        for name, p in self._params.items():
            if p.is_meta:
                self._refuse_meta(name)
        self._follow_devices()
        if self._fresh:
            refuse_sparse_weights(self._params, self._masks, self.budgets, self.names)
        for name in self.names:
            p, m = self._params[name], self._masks[name]
            p.mul_(m)
            if self.spec.rescale_init and self._fresh:
                # Keep the output variance of the dense initialisation despite the smaller fan-in.
                p.div_(math.sqrt(max(self.budgets[name] / p.numel(), 1e-12)))
            zero_state_where(self.optimizer, p, m.bool())
        self._pending = False
        self._guard.record()

    # ------------------------------------------------------------------ following the weights

    def _move_mask(self, name: str) -> None:
        p, m = self._params[name], self._masks[name]
        self._masks[name] = m.to(device=p.device, dtype=p.dtype)
        self._bool_cache = None

    def _follow_devices(self) -> None:
        """Move every mask to its weight's device and dtype (a meta weight keeps its mask where it is)."""
        for name in self.names:
            p, m = self._params[name], self._masks[name]
            if (m.device != p.device or m.dtype != p.dtype) and not p.is_meta:
                self._move_mask(name)

    @staticmethod
    def _refuse_meta(name: str) -> None:
        raise StateError(
            f"weight {name!r} is on the meta device: materialise the model in place (its Parameters must "
            "stay the same objects, e.g. torch.__future__.set_swap_module_params_on_conversion(True) before "
            "to_empty()) and load its weights, or sparsify it after its weights are loaded"
        )

    def _check_weights(self) -> None:
        """The pre-step check: masks on their weights' devices, weights changed behind the engine refused.

        Runs before the optimiser touches anything; costs one pass over the weights comparing version
        counters and devices, plus a look at the masked positions of the weights that changed.
        """
        if self._pending:
            raise StateError(
                "the engine was built while the model was on the meta device and its masks are not applied "
                "yet: call engine.apply_masks() once the weights are loaded (before the first step)"
            )
        changed = set(self._guard.changed())
        for name in self.names:
            p, m = self._params[name], self._masks[name]
            if m.device != p.device or m.dtype != p.dtype:
                if p.is_meta:
                    self._refuse_meta(name)
                self._move_mask(name)
                changed.add(name)
        if changed:
            refuse_pruned_writes(self._params, self._masks, [n for n in self.names if n in changed])
            self._guard.record()

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """Layer name -> bool mask (True = active). Read-only copies; cached until the next update."""
        self._follow_devices()
        if self._bool_cache is None:
            self._bool_cache = {n: m.bool() for n, m in self._masks.items()}
        return self._bool_cache

    @property
    def budgets(self) -> dict[str, int]:
        """Layer name -> number of non-zeros it keeps."""
        return self._budgets

    @property
    def densities(self) -> dict[str, float]:
        """Layer name -> the real-valued density the distribution gave."""
        return self._densities

    @property
    def end_step(self) -> int | None:
        return self.schedule.end_step if self.schedule is not None else None

    def new_connections(self) -> int:
        last = self.last_update
        if last.step != self.step_count or self.step_count == 0:
            return 0
        return last.new

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero every masked weight now (the post-step hook does this after each optimiser step).

        Call it to prune weights loaded into the model on purpose (the next step refuses weights changed
        outside the engine otherwise), and after loading the weights of a model sparsified on the meta
        device (its initial masks are applied then).
        """
        if self._pending:
            self._apply_initial_masks()
            return
        self._follow_devices()
        self._mask_weights()
        self._guard.record()

    @torch.no_grad()
    def _mask_weights(self) -> None:
        params = [self._params[n] for n in self.names]
        torch._foreach_mul_(params, [self._masks[n] for n in self.names])

    @torch.no_grad()
    def mask_gradients(self) -> None:
        """Zero the gradients of masked weights. Idempotent within a step.

        The pre-step hook calls it; call it yourself before gradient clipping so the clip norm is the
        norm of the sparse gradient. On a step that ends in a RigL update it first keeps a copy of the
        dense gradient.
        """
        if self._grads_masked or not self.method.masked:
            return
        self._check_weights()
        names = [n for n in self.names if self._params[n].grad is not None]
        if self._needs_dense_grads():
            self._dense_grads = {n: self._params[n].grad.detach().clone() for n in names}
        if names:
            torch._foreach_mul_([self._params[n].grad for n in names], [self._masks[n] for n in names])
        self._grads_masked = True

    def _needs_dense_grads(self) -> bool:
        return (
            self.method.needs_dense_grads
            and self.schedule is not None
            and self.schedule.is_update_step(self._opt_steps + 1)
        )

    def _pre_step_hook(self, optimizer, args, kwargs) -> None:
        self.mask_gradients()

    def _post_step_hook(self, optimizer, args, kwargs) -> None:
        self._mask_weights()
        self._grads_masked = False
        self._guard.record()

    # ------------------------------------------------------------------ stepping

    def _advance(self, step: int) -> bool:
        if self.schedule is not None and self.schedule.is_update_step(step):
            return self._update_topology(step)
        return False

    def _end_step(self, idle: bool) -> None:
        # Gradients kept for an update are used up; after a call without an optimiser step (the scaler
        # skipped it after an overflow, or a gradient-accumulation micro-step) they belong to no update.
        self._dense_grads = None
        if idle:
            self._grads_masked = False

    def _grow_score(self, name: str, p: torch.Tensor, step: int) -> torch.Tensor:
        grad = None
        if self.method.needs_dense_grads:
            if self._dense_grads is None or name not in self._dense_grads:
                raise RuntimeError(
                    f"{self.method.name} update at step {step} has no dense gradient for {name!r}: call "
                    "engine.step() right after optimizer.step(), with gradients from this step's backward pass"
                )
            grad = self._dense_grads[name]
        seed = derive_seed(self.spec.seed, name, "grow", step)
        return self.method.grow_score(p.numel(), grad, seed, p.device)

    @torch.no_grad()
    def _update_topology(self, step: int) -> bool:
        fraction = self.schedule.drop_fraction(step)
        stats = UpdateStats(step=step, drop_fraction=fraction)
        old = {n: m.bool() for n, m in self._masks.items()}
        new: dict[str, torch.Tensor] = {}
        for name in self.names:
            p, active = self._params[name], old[name]
            budget = self.budgets[name]
            k = drop_count(fraction, budget)
            if budget >= p.numel() or k == 0:
                new[name] = active
                continue
            magnitude = p.detach().reshape(-1).abs()
            score = self._grow_score(name, p, step)
            new[name] = drop_and_grow(active.reshape(-1), magnitude, score, k).view(p.shape)
            stats.dropped += k
            stats.grown += k
        if stats.dropped == 0:  # no layer large enough to move a weight: no update happened
            return False
        resynced = self._sync_masks(new)
        for name in self.names:
            before, after = old[name], new[name]
            if after is before and not resynced:
                continue
            p, mask = self._params[name], self._masks[name]
            both = after & before
            newly = int(after.count_nonzero()) - int(both.count_nonzero())
            stats.new += newly
            stats.per_layer[name] = newly
            mask.copy_(after)
            self._record_ever_active({name: after})
            survive = both.to(p.dtype)  # 1 where value and state carry over (float: fast multiplies)
            p.mul_(survive)
            zero_state_where(self.optimizer, p, survive)
        stats.regrown = stats.grown - stats.new
        self._bool_cache = None
        self._guard.record()
        self.num_updates += 1
        self.last_update = stats
        return stats.new > 0

    def _record_ever_active(self, masks: Mapping[str, torch.Tensor]) -> None:
        """Add these layers' masks to the positions ever active (dynamic methods)."""
        if self._ever is not None:
            for name, mask in masks.items():
                self._ever.record(name, mask)

    def _ever_active_counts(self, active: dict[str, int]) -> dict[str, int] | None:
        if not self.method.masked:
            return None  # dense: every weight is active, nothing to tell
        return self._ever.counts() if self._ever is not None else dict(active)

    def _sync_masks(self, masks: dict[str, torch.Tensor]) -> int:
        """Make every data-parallel rank use rank 0's masks (in place); returns the entries corrected."""
        mismatch = broadcast_masks(masks, self.names)
        self.stats["sync_mismatch"] += mismatch
        return mismatch

    @torch.no_grad()
    def _mask_ema_tensors(self, tensors) -> None:
        if not self.method.masked:
            return
        self._follow_devices()
        pairs = [(t, self._masks[n]) for n, t in tensors]
        if not pairs:
            return
        if all(t.device == m.device and t.dtype == m.dtype for t, m in pairs):
            torch._foreach_mul_([t for t, _ in pairs], [m for _, m in pairs])
        else:
            for t, m in pairs:
                t.mul_(m.to(device=t.device, dtype=t.dtype))

    # ------------------------------------------------------------------ reports

    def check_invariants(self) -> list[str]:
        """Problems found (empty when all hold): masked weights non-zero, active counts off budget."""
        self._follow_devices()
        problems = []
        for name in self.names:
            p, m = self._params[name], self._masks[name].bool()
            if int(m.sum()) != self.budgets[name]:
                problems.append(f"{name}: {int(m.sum())} active positions, budget {self.budgets[name]}")
            if bool((p.detach()[~m] != 0).any()):
                problems.append(f"{name}: {int((p.detach()[~m] != 0).sum())} masked weights are non-zero")
        return problems

    # ------------------------------------------------------------------ state

    def _state_extra(self) -> dict[str, Any]:
        return {
            "budgets": dict(self.budgets),
            "masks": {n: m.detach().bool().cpu().clone() for n, m in self._masks.items()},
            **self._ever_active_state(),
        }

    def _ever_active_state(self) -> dict[str, Any]:
        return {"ever_active": self._ever.state()} if self._ever is not None else {}

    def _restore_ever_active(self, state: Mapping[str, Any]) -> None:
        """The saved positions ever active (a state without them starts again from its restored masks);
        call it once the masks are restored."""
        if self._ever is not None:
            self._ever.load(state.get("ever_active") or {}, self._layer_mask)

    def _layer_mask(self, name: str) -> torch.Tensor:
        return self._masks[name]

    def _saved_shapes(self, state: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
        return {n: tuple(m.shape) for n, m in state.get("masks", {}).items()}

    def _schedule_changed(self) -> None:
        self.schedule = self._make_schedule()

    def _saved_masks_in_budget(self, state: Mapping[str, Any]) -> Mapping[str, torch.Tensor]:
        """The state's masks, each checked to hold exactly its layer's budget of active weights."""
        masks = state["masks"]
        for name in self.names:
            nnz = int(masks[name].bool().sum())
            if nnz != self.budgets[name]:
                raise StateError(
                    f"engine state does not match this model: layer {name!r} has {nnz} active weights "
                    f"in the state but a budget of {self.budgets[name]}"
                )
        return masks

    @torch.no_grad()
    def _restore(self, state: Mapping[str, Any], step: int) -> None:
        masks = self._saved_masks_in_budget(state)
        for name in self.names:
            self._masks[name].copy_(masks[name].to(self._masks[name].device))
        self._bool_cache = None
        self._restore_ever_active(state)
        self._dense_grads = None
        self._grads_masked = False
        self._guard.forget()  # the next step checks every weight against the restored masks
        self._fresh = False  # restored masks: a pending apply_masks() neither checks nor rescales

    def __repr__(self) -> str:
        c = self.spec
        return (
            f"SparseEngine(method={c.method!r}, sparsity={c.sparsity}, distribution={c.distribution!r}, "
            f"layers={len(self.names)}, step={self.step_count}, updates={self.num_updates})"
        )
