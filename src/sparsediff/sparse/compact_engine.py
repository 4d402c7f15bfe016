"""The unstructured engine on compact layers: truly sparse training (``sparsify(..., backend="sparse")``).

The masked engine (:mod:`~sparsediff.sparse.engine`) trains a dense tensor times a mask: every step
costs what a dense step costs. :class:`CompactEngine` makes the target layers compact instead
(:mod:`~sparsediff.sparse.runtime.compact`): each weight is held as exactly its budget of non-zeros, an
``nn.Parameter`` the optimiser trains, plus index buffers, and its forward and backward run on sparse
kernels. The user's loop stays as it is::

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    engine = sparsediff.sparsify(model, optimizer, method="rigl", sparsity=0.9, backend="sparse", ...)
    for batch in loader:
        loss = ...
        loss.backward()
        optimizer.step()
        engine.step()
        optimizer.zero_grad()

What it keeps of the masked engine's guarantees, and how:

- each layer holds exactly its budget (the values tensor never changes size), grown weights and their
  optimiser state start at exactly 0 (a topology update moves every values-shaped tensor of the
  optimiser and of an attached EMA to the new layout, the new entries at 0), the masks are identical on
  every data-parallel rank (the same seeded choices, rank 0's masks broadcast after each update), no
  update on an overflow-skipped step, same seed -> same masks, and a state dict that resumes exactly;
- RigL's growth reads the dense gradient of the update step without the model's dense gradients ever
  being held: each layer's backward hands its own dense gradient to a
  :class:`~sparsediff.sparse.topology.GrowCapture`, which keeps only the candidates growth can pick;
- ``engine.masks`` is built on demand from the layouts.

The optimiser must have been built on ``model.parameters()`` and not have stepped yet: the engine points
it at the compact parameters. ``sparsify`` must come before ``accelerator.prepare`` or a DDP wrapper
(they hold the parameters they were given); the other order is refused.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import ConfigError
from .base import derive_seed
from .engine import SparseEngine
from .guard import refuse_sparse_weights
from .runtime.compact import permute_, pin_positions
from .runtime.to_compact import CompactTarget, to_compact
from .spec import POLICIES, SparseSpec
from .sync import average_, broadcast_masks, dist_world
from .topology import GrowCapture, UpdateStats, drop_and_grow, drop_count

__all__ = ["CompactEngine"]


def _refuse_wrapped(model: nn.Module, optimizer: Any) -> None:
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        raise ConfigError(
            "backend='sparse' replaces the model's sparse layers and their parameters, which a DDP wrapper "
            "already holds: call sparsify(..., backend='sparse') before wrapping the model in "
            "DistributedDataParallel (or before accelerator.prepare)"
        )
    if optimizer is not None and type(optimizer).__name__ == "AcceleratedOptimizer":
        raise ConfigError(
            "backend='sparse' replaces the model's sparse layers and their parameters, which "
            "accelerator.prepare already holds: call sparsify(..., backend='sparse') before "
            "accelerator.prepare(model, optimizer)"
        )


def _stepped(state: Mapping[str, Any] | None) -> bool:
    """Whether an optimiser's state of one parameter comes from a step: Adagrad makes its state (step 0)
    at construction, every other torch optimiser at its first step."""
    if not state:
        return False
    step = state.get("step")
    return step is None or float(step) != 0


class CompactEngine(SparseEngine):
    """Static, RigL and MagRan on compact layers (see the module docstring).

    Beyond the :class:`SparseEngine` members:
        targets: target name -> :class:`~sparsediff.sparse.runtime.to_compact.CompactTarget` (its host
            module and compact weight).
        kernels: the kernel policy of the layers (``"auto"``, ``"measure"``, ``"sparse"``, ``"dense"``:
            :mod:`~sparsediff.sparse.runtime.choose`).
        grad_accum: backward passes per optimiser step (RigL sums their dense gradients on update steps).
    """

    BACKEND: ClassVar[str] = "sparse"
    MASKS_EMA_UPDATES: ClassVar[bool] = False  # compact EMA copies hold no masked entries to zero

    def __init__(
        self,
        model: nn.Module,
        optimizer: Any | None,
        spec: SparseSpec,
        masks: str | Mapping[str, torch.Tensor] | None = None,
        *,
        kernels: str = "auto",
        grad_accum: int = 1,
    ):
        _refuse_wrapped(model, optimizer)
        if not spec.sparse_method.masked:
            raise ConfigError("backend='sparse' needs a sparse method (static, rigl, magran), not 'dense'")
        if kernels not in POLICIES:
            raise ConfigError(f"kernels= takes one of {', '.join(POLICIES)}, got {kernels!r}")
        if isinstance(grad_accum, bool) or not isinstance(grad_accum, int) or grad_accum < 1:
            raise ConfigError(f"grad_accum must be a positive whole number, got {grad_accum!r}")
        super(SparseEngine, self).__init__(model, optimizer, spec)  # Engine's: the masked store is not built
        self._setup_targets()
        self.kernels, self.grad_accum = kernels, grad_accum
        for name, p in self._params.items():
            if p.is_meta:
                raise ConfigError(
                    f"backend='sparse' needs the weights' values; {name!r} is on the meta device"
                )
        if self.optimizer is not None and any(
            _stepped(self.optimizer.state.get(p)) for p in self._params.values()
        ):
            raise ConfigError(
                "backend='sparse' moves the optimiser to the compact parameters, so it must not have stepped "
                "yet: call sparsify right after building the optimiser"
            )
        given = self._given_masks(masks) if masks is not None else None
        self._fresh = given is None
        bool_masks = {
            n: (given[n] if given is not None else self._initial_mask(n, self._params[n])).bool()
            for n in self.names
        }
        broadcast_masks(bool_masks, self.names)
        self._record_ever_active(bool_masks)
        if self._fresh:
            refuse_sparse_weights(self._params, bool_masks, self.budgets, self.names)
        with torch.no_grad():
            for name in self.names:
                p = self._params[name]
                if self.spec.rescale_init and self._fresh:
                    p.div_(math.sqrt(max(self.budgets[name] / p.numel(), 1e-12)))
        self._dense_params = dict(
            self._params
        )  # before conversion: what the optimiser and EMAs were built on
        # the model's parameters before conversion, in order, with their shapes: what an EMAModel built
        # before sparsify lines its shadows up with (the dense target weights are freed below)
        self._dense_order = [(p, tuple(p.shape)) for p in self.model.parameters()]
        self.targets: dict[str, CompactTarget] = to_compact(self.model, self._params, bool_masks)
        self._params = {n: t.values for n, t in self.targets.items()}
        for target in self.targets.values():
            target.host.policy = kernels
        self._repoint_optimizer()
        self._compact_emas: list[_CompactEMA] = []
        self._arm()

    # ------------------------------------------------------------------ the optimiser and the EMA copies

    def _repoint_optimizer(self) -> None:
        if self.optimizer is None:
            return
        swap = {id(self._dense_params[n]): self._params[n] for n in self.names}
        for group in self.optimizer.param_groups:
            group["params"] = [swap.get(id(p), p) for p in group["params"]]
        # State an optimiser makes at construction (Adagrad's accumulator, filled with its initial value)
        # moves to the compact parameter: the dense-shaped tensors taken at the kept positions.
        state = self.optimizer.state
        for name in self.names:
            dense, target = self._dense_params[name], self.targets[name]
            if dense not in state:
                continue
            state[target.values] = {
                key: target.weight.gather(target.host, s).clone()
                if torch.is_tensor(s) and tuple(s.shape) == self._shapes[name]
                else s
                for key, s in state.pop(dense).items()
            }

    def attach_ema(self, ema: Any, parameters: Iterable[torch.Tensor] | None = None) -> Any:
        """Keep an EMA copy of the model on the compact layout (``sparsify(..., ema=ema)``).

        An EMA built before ``sparsify`` (diffusers' ``EMAModel(model.parameters())``, an ``nn.Module``
        copy, torch's ``AveragedModel``) is made compact now: its weights are taken at the kept positions,
        and a module copy's layers become compact layers like the model's. After each topology update its
        values move with the model's (the new ones at 0), so its weights stay exactly the model's topology.
        """
        tracked = _CompactEMA(self, ema, parameters)
        self._compact_emas.append(tracked)
        return ema

    def mask_ema(self, ema: Any, parameters: Iterable[torch.Tensor] | None = None) -> None:
        """Nothing to zero: a compact EMA copy holds only the kept positions."""

    def _mask_ema_tensors(self, tensors) -> None:
        return None

    # ------------------------------------------------------------------ masks

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """Layer name -> bool mask (True = active), built from the layouts; cached until the next update."""
        if self._bool_cache is None:
            self._bool_cache = {n: t.weight.mask(t.host) for n, t in self.targets.items()}
        return self._bool_cache

    def _layer_mask(self, name: str) -> torch.Tensor:
        target = self.targets[name]  # from the layout, one layer at a time
        return target.weight.mask(target.host)

    def dense_view(self, name: str, tensor: torch.Tensor | None = None) -> torch.Tensor:
        target = self.targets[name]
        values = target.values if tensor is None else tensor
        return target.weight.scatter(target.host, values.detach())

    def apply_masks(self) -> None:
        """Nothing to do: a compact layer holds no weight outside its topology."""

    def mask_gradients(self) -> None:
        """Nothing to do: gradients exist only at the kept positions."""

    def _check_weights(self) -> None:
        return None

    # ------------------------------------------------------------------ RigL's dense gradient

    def _arm(self) -> None:
        """Give each layer the captures the next optimiser step's update needs (none when no RigL update
        follows it)."""
        for target in self.targets.values():
            target.host.capture = None
            pin_positions(target.host, False)
        step = self._opt_steps + 1
        if not (
            self.method.needs_dense_grads and self.schedule is not None and self.schedule.is_update_step(step)
        ):
            return
        fraction = self.schedule.drop_fraction(step)
        distributed, _, _ = dist_world()
        for name, target in self.targets.items():
            cw, budget = target.weight, self.budgets[name]
            k = drop_count(fraction, budget)
            if k == 0 or budget >= cw.numel:
                continue
            numel, device = cw.numel, target.values.device

            def score(grad, numel=numel, device=device):
                return self.method.grow_score(numel, grad, 0, device)

            capture = GrowCapture(
                numel, k, score, accumulate=self.grad_accum > 1, all_reduce=average_ if distributed else None
            )
            if target.host.capture is None:
                target.host.capture = {}
            target.host.capture[cw.name] = capture
            pin_positions(target.host, True)  # the capture and the update read the positions

    def _capture_of(self, name: str) -> GrowCapture | None:
        target = self.targets[name]
        return (target.host.capture or {}).get(target.weight.name)

    def _end_step(self, idle: bool) -> None:
        # A call without an optimiser step keeps the captures of a gradient-accumulation window; without
        # accumulation it was a skipped (overflowed) step, whose backward's gradients belong to no update.
        if idle and self.grad_accum > 1:
            return
        self._arm()

    # ------------------------------------------------------------------ topology updates

    def _grow_score(self, name: str, p: torch.Tensor, step: int) -> torch.Tensor:
        target = self.targets[name]
        if self.method.needs_dense_grads:
            capture = self._capture_of(name)
            if capture is None or (capture.candidates is None and capture.passes == 0):
                raise RuntimeError(
                    f"{self.method.name} update at step {step} has no dense gradient for {name!r}: call "
                    "engine.step() right after optimizer.step(), after this step's backward pass"
                )
            capture.finish()
            return capture.grow_score(target.weight.flat(target.host))
        seed = derive_seed(self.spec.seed, name, "grow", step)  # as the masked engine draws it
        return self.method.grow_score(target.weight.numel, None, seed, target.values.device)

    @torch.no_grad()
    def _update_topology(self, step: int) -> bool:
        # Layer by layer, so that the dense-size temporaries of an update (the masks, the magnitudes and
        # scores, the new layout's index) exist for one layer at a time, never for the whole model.
        fraction = self.schedule.drop_fraction(step)
        stats = UpdateStats(step=step, drop_fraction=fraction)
        moving = [
            n
            for n in self.names
            if self.budgets[n] < self.targets[n].weight.numel and drop_count(fraction, self.budgets[n]) > 0
        ]
        if not moving:
            return False
        for name in moving:
            pin_positions(self.targets[name].host, True)
        for name in moving:
            target, k = self.targets[name], drop_count(fraction, self.budgets[name])
            before = target.weight.mask(target.host).reshape(-1)
            magnitude = target.weight.scatter(target.host, target.values.detach().abs()).reshape(-1)
            after = drop_and_grow(before, magnitude, self._grow_score(name, None, step), k)
            del magnitude
            stats.dropped += k
            stats.grown += k
            self.stats["sync_mismatch"] += broadcast_masks({name: after}, [name])  # every rank: rank 0's
            if torch.equal(before, after):
                continue
            newly = int((after & ~before).count_nonzero())
            stats.new += newly
            stats.per_layer[name] = newly
            self._move(name, after)
            self._record_ever_active({name: after})
        stats.regrown = stats.grown - stats.new
        self._bool_cache = None
        self.num_updates += 1
        self.last_update = stats
        return stats.new > 0

    def _move(self, name: str, new_mask: torch.Tensor) -> None:
        """Lay weight ``name`` out for ``new_mask`` and move every values-shaped tensor with it."""
        target = self.targets[name]
        values = target.values
        old_index, new_index = target.weight.reindex(target.host, new_mask)
        permute_(values.data, old_index, new_index)
        if self.optimizer is not None:
            for state in self.optimizer.state.get(values, {}).values():
                if torch.is_tensor(state) and state.shape == values.shape:
                    permute_(state, old_index, new_index)
        for ema in self._compact_emas:
            ema.move(name, old_index, new_index)

    # ------------------------------------------------------------------ reports and checks

    def _effective_weight(self, name: str, mask: torch.Tensor) -> torch.Tensor:
        return self._params[name].detach()

    def _counted_parameters(self) -> Any:
        values = {id(t.values): n for n, t in self.targets.items()}
        out = {}
        for pname, p in self.model.named_parameters():
            target = values.get(id(p))
            if target is None:
                out[pname] = p
            else:
                out[target] = torch.empty(self._shapes[target], device="meta")
        return out

    def check_invariants(self) -> list[str]:
        """Problems found (empty when all hold): a layer off its budget, a layout that does not match its
        values, optimiser state of another shape than its values."""
        problems = []
        for name, target in self.targets.items():
            v, cw = target.values, target.weight
            if v.numel() != self.budgets[name]:
                problems.append(f"{name}: {v.numel()} values, budget {self.budgets[name]}")
            flat = cw.flat(target.host)
            if flat.numel() != v.numel() or int(torch.unique(flat).numel()) != flat.numel():
                problems.append(f"{name}: the layout does not hold its {v.numel()} values once each")
            if self.optimizer is not None:
                for key, s in self.optimizer.state.get(v, {}).items():
                    if torch.is_tensor(s) and s.dim() > 0 and s.shape != v.shape:
                        problems.append(f"{name}: optimiser state {key!r} has shape {tuple(s.shape)}")
        return problems

    # ------------------------------------------------------------------ state

    def _state_extra(self) -> dict[str, Any]:
        return {
            "budgets": dict(self.budgets),
            # built layer by layer from the layouts, not kept: the masks are not held between updates
            "masks": {n: self._layer_mask(n).detach().cpu().clone() for n in self.names},
            "backend": self.BACKEND,
            "kernel_modes": {n: t.host.kernel_mode for n, t in self.targets.items()},
            **self._ever_active_state(),
        }

    @torch.no_grad()
    def _restore(self, state: Mapping[str, Any], step: int) -> None:
        masks = self._saved_masks_in_budget(state)
        current = self.masks
        for name in self.names:
            saved = masks[name].to(current[name].device).bool().reshape(-1)
            if not torch.equal(saved, current[name].reshape(-1)):
                self._move(name, saved)
        self._bool_cache = None  # built from the layouts before the moves
        self._restore_ever_active(state)
        modes = state.get("kernel_modes") or {}
        for name, target in self.targets.items():
            if modes.get(name) in ("sparse", "dense"):
                target.host.kernel_mode = modes[name]
        self._fresh = False

    def load_state_dict(self, state: Mapping[str, Any], *, override_schedule: bool | None = None) -> None:
        super().load_state_dict(state, override_schedule=override_schedule)
        self._arm()

    def __repr__(self) -> str:
        c = self.spec
        return (
            f"CompactEngine(method={c.method!r}, sparsity={c.sparsity}, distribution={c.distribution!r}, "
            f"layers={len(self.names)}, step={self.step_count}, updates={self.num_updates})"
        )


class _CompactEMA:
    """An EMA copy of a compact model: its tensors for each target, made compact if it was dense."""

    def __init__(self, engine: CompactEngine, ema: Any, parameters: Iterable[torch.Tensor] | None):
        self.engine, self.ema = engine, ema
        self.index: dict[str, int] = {}
        self.module: nn.Module | None = None
        self.targets: dict[str, CompactTarget] = {}
        if hasattr(ema, "shadow_params"):
            self._shadows(list(parameters) if parameters is not None else None)
        elif isinstance(ema, nn.Module):
            inner = getattr(ema, "module", None)
            averaged = callable(getattr(ema, "update_parameters", None)) and isinstance(inner, nn.Module)
            self._module(inner if averaged else ema)
        else:
            raise ConfigError(
                f"cannot find the weights of an EMA of type {type(ema).__name__}: give a diffusers EMAModel "
                "(shadow_params), a torch.optim.swa_utils.AveragedModel or an nn.Module copy of the model"
            )

    @torch.no_grad()
    def _shadows(self, parameters: list[torch.Tensor] | None) -> None:
        engine, shadows = self.engine, self.ema.shadow_params
        now = list(engine.model.parameters())
        values = {id(t.values): n for n, t in engine.targets.items()}
        if parameters is None:  # EMAModel(model.parameters()), built after sparsify or before it
            shapes = [tuple(s.shape) for s in shadows]
            if shapes == [tuple(p.shape) for p in now]:
                parameters = now
            elif shapes == [shape for _, shape in engine._dense_order]:
                parameters = [p for p, _ in engine._dense_order]
        if parameters is None or len(parameters) != len(shadows):
            raise ConfigError(
                f"the EMA tracks {len(shadows)} tensors; pass parameters= the iterable it was built from"
            )
        position = {id(p): i for i, p in enumerate(parameters)}
        dense = {id(engine._dense_params[n]): n for n in engine.names}
        rebuilt, found = [], set()
        for p in now:  # the EMA's tensors in the order of the compact model's parameters
            name = values.get(id(p))
            # an EMA built on the compact parameters (a scattered weight keeps its Parameter object: its
            # shadow's shape tells whether the EMA was built before the conversion)
            if name is not None and id(p) in position and shadows[position[id(p)]].shape == p.shape:
                i = position[id(p)]
                rebuilt.append(shadows[i])
                self.index[name] = len(rebuilt) - 1
                found.add(name)
                continue
            if name is not None:
                src = next((i for q, i in position.items() if dense.get(q) == name), None)
                if src is None:
                    raise ConfigError(f"the EMA does not track the sparsified weight {name!r}")
                t = self.engine.targets[name]
                rebuilt.append(t.weight.gather(t.host, shadows[src].to(p.device)).clone())
                self.index[name] = len(rebuilt) - 1
                found.add(name)
            elif id(p) in position:
                rebuilt.append(shadows[position[id(p)]])
            else:
                raise ConfigError("the EMA does not track every parameter of the model; pass parameters=")
        self.ema.shadow_params = rebuilt

    @torch.no_grad()
    def _module(self, module: nn.Module) -> None:
        from .targets import unwrap_model

        module = unwrap_model(module)
        engine = self.engine
        named = dict(module.named_parameters())
        dense_names = [n for n in engine.names if n in named and tuple(named[n].shape) == engine._shapes[n]]
        if dense_names:  # a dense copy made before sparsify: make it compact the same way
            if len(dense_names) != len(engine.names):
                raise ConfigError("the EMA copy does not hold every sparsified weight of the model")
            masks = {n: m.to(named[n].device) for n, m in engine.masks.items()}
            self.targets = to_compact(module, {n: named[n] for n in engine.names}, masks)
        else:
            hosts = dict(module.named_modules())
            model_hosts = {id(m): path for path, m in engine.model.named_modules()}
            for name, t in engine.targets.items():
                path = model_hosts.get(id(t.host))
                host = hosts.get(path) if path is not None else None
                if host is None or not hasattr(host, "compact_weights"):
                    raise ConfigError(
                        f"the EMA copy has no compact layer for {name!r}: copy the sparsified model"
                    )
                self.targets[name] = CompactTarget(host, host.compact_weights[t.weight.name])
        for t in self.targets.values():
            t.values.requires_grad_(False)
        self.module = module

    @torch.no_grad()
    def move(self, name: str, old_index: torch.Tensor, new_index: torch.Tensor) -> None:
        if name in self.index:
            permute_(self.ema.shadow_params[self.index[name]], old_index, new_index)
            return
        target = self.targets.get(name)
        if target is None:
            return
        model_target = self.engine.targets[name]
        target.weight.follow(target.host, model_target.host, model_target.weight)
        permute_(target.values.data, old_index, new_index)
