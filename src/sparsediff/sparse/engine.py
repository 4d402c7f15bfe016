"""The sparse engine: masks, topology updates and the hooks that keep them true.

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
  optimiser rule can never revive a masked weight) and counts the optimiser step;
- ``step()`` sees whether the optimiser really stepped since the last call: a mixed-precision step whose
  gradients overflowed is skipped by the scaler, the hooks never run, and no topology update happens;
- a topology update drops the ``k`` active weights of smallest magnitude and grows ``k`` among the
  positions not kept (largest dense gradient for RigL, uniform at random for MagRan), so kept and grown
  sets are disjoint and each layer keeps exactly its budget. Weights that were inactive and are grown
  start at exactly 0 and every optimiser state tensor with the weight's shape is zeroed there (and at
  every inactive position), without a list of optimiser types;
- random choices (initial masks, MagRan growth) use generators seeded from ``(seed, layer name, step)``,
  so every data-parallel rank makes the same choice and resumption needs no generator state; the masks
  are still broadcast from rank 0 after every update, and a disagreement is counted in ``stats``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import ConfigError, StateError
from .distribution import DISTRIBUTIONS, check_sparsity, layer_budgets, layer_densities
from .schedule import DECAYS, UpdateSchedule, resolve_end_step
from .targets import select_targets, unwrap_model

if TYPE_CHECKING:
    from .nm import NMSparseEngine

METHODS = ("dense", "static", "rigl", "magran")
STATE_FORMAT = "sparsediff.sparse/1"


@dataclass(frozen=True)
class SparseConfig:
    """Everything that defines a sparse engine; saved in its state dict."""

    method: str = "rigl"
    sparsity: float = 0.9
    distribution: str = "erk"
    prune_ratio: float = 0.3
    decay: str = "cosine"
    update_every: int = 100
    end_step: int | None = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    seed: int = 0
    erk_power: float = 1.0
    rescale_init: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(
                f"unknown sparse method {self.method!r}; choose one of {', '.join(METHODS)} (or srste for N:M)"
            )
        check_sparsity(self.sparsity)
        if self.distribution not in DISTRIBUTIONS:
            raise ConfigError(
                f"unknown distribution {self.distribution!r}; choose one of {', '.join(DISTRIBUTIONS)}"
            )
        if self.decay not in DECAYS:
            raise ConfigError(f"unknown prune-ratio decay {self.decay!r}; choose one of {', '.join(DECAYS)}")

    @property
    def dynamic(self) -> bool:
        return self.method in ("rigl", "magran")


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, ...]
    numel: int
    active: int  # positions the mask keeps (== budget)
    nonzero: int  # entries that are literally non-zero now (just-grown weights are still 0)
    budget: int
    density: float  # active / numel


@dataclass
class DensityReport:
    """Per-layer and total density of the sparsified weights and of the whole model."""

    layers: list[LayerReport]
    params_total: int  # every parameter of the model
    params_nonzero: int  # active entries of targets + every entry of the other parameters
    target_total: int  # entries of the sparsified weights
    target_nonzero: int  # active entries of the sparsified weights

    @property
    def density(self) -> float:
        return self.params_nonzero / max(self.params_total, 1)

    @property
    def target_density(self) -> float:
        return self.target_nonzero / max(self.target_total, 1)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "layers"}
        d["density"] = self.density
        d["target_density"] = self.target_density
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


@dataclass
class UpdateStats:
    """What the last topology update did (summed over layers)."""

    step: int = 0
    drop_fraction: float = 0.0
    dropped: int = 0  # active weights removed by magnitude
    grown: int = 0  # positions chosen by the grow criterion (== dropped)
    regrown: int = 0  # grown positions that were active before the update (keep their value)
    new: int = 0  # grown positions that were inactive before: start at 0 with zeroed state
    per_layer: dict[str, int] = field(default_factory=dict)  # layer -> new connections


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed from ``seed`` and labels; the same on every process and platform."""
    text = "/".join([str(seed), *map(str, parts)]).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & ((1 << 63) - 1)


def _generator(device: torch.device, seed: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def _largest_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries of a 1-D tensor (exact).

    ``topk`` over a multi-million-entry tensor is the slowest part of an update on the CPU. For large
    tensors a threshold is first read off a strided sample, set low enough that usually a little more than
    k entries pass it; whenever at least k pass, they contain a true top k, and ``topk`` runs on them only.
    Otherwise it falls back to ``topk`` over everything. Deterministic: no randomness is involved.
    """
    n = scores.numel()
    if n < 1_000_000 or k > n // 4:
        return torch.topk(scores, k, sorted=False).indices
    sample = scores[:: max(1, n // 65_536)]
    m = sample.numel()
    share = k / n
    # ask the sample for ~1.3x the wanted share plus four binomial standard deviations
    j = min(m, math.ceil(m * share * 1.3 + 4.0 * math.sqrt(m * share) + 1))
    threshold = torch.topk(sample, j, sorted=False).values.min()
    candidates = (scores >= threshold).nonzero().squeeze(1)
    if candidates.numel() < k:
        return torch.topk(scores, k, sorted=False).indices
    return candidates[torch.topk(scores[candidates], k, sorted=False).indices]


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


def _dist_world() -> tuple[bool, int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return True, dist.get_rank(), dist.get_world_size()
    return False, 0, 1


class SparseEngine:
    """Masks and dynamic topology for the target weights of one model (see the module docstring).

    Build it with :func:`sparsediff.sparsify`. Attributes:
        config: the :class:`SparseConfig`.
        names: target parameter names, in model order.
        budgets: layer name -> number of non-zeros it keeps.
        densities: layer name -> the real-valued density the distribution gave.
        step_count: optimiser steps taken (skipped mixed-precision steps do not count).
        num_updates: topology updates done.
        last_update: :class:`UpdateStats` of the latest update.
        stats: running counters (``sync_mismatch``: mask entries rank 0 had to correct on another rank).
    """

    def __init__(self, model: nn.Module, optimizer: Any | None, config: SparseConfig):
        self.config = config
        self.model = unwrap_model(model)
        self.optimizer = unwrap_optimizer(optimizer) if optimizer is not None else None
        targets = select_targets(self.model, config.include or None, config.exclude or None)
        self.names: list[str] = [n for n, _ in targets]
        self._params: dict[str, nn.Parameter] = dict(targets)
        shapes = {n: tuple(p.shape) for n, p in targets}
        sparsity = 0.0 if config.method == "dense" else config.sparsity
        self.densities = layer_densities(shapes, sparsity, config.distribution, config.erk_power)
        self.budgets = layer_budgets(shapes, self.densities, sparsity)
        self.schedule = (
            UpdateSchedule(config.prune_ratio, config.update_every, config.end_step, config.decay)
            if config.dynamic
            else None
        )
        self.step_count = 0
        self.num_updates = 0
        self.last_update = UpdateStats()
        self.stats: dict[str, int] = {"sync_mismatch": 0, "idle_calls": 0}
        self._opt_steps = 0  # counted by the post-step hook
        self._grads_masked = False
        self._dense_grads: dict[str, torch.Tensor] | None = None
        self._hooks: list[Any] = []
        self._bool_cache: dict[str, torch.Tensor] | None = None

        if self.optimizer is not None:
            in_opt = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
            for name in self.names:
                p = self._params[name]
                if p.requires_grad and id(p) not in in_opt:
                    raise ConfigError(
                        f"parameter {name!r} is a sparsification target but the optimiser does not update it; "
                        "add it to the optimiser or exclude it"
                    )

        # Masks are kept in the weight's dtype: multiplying by a float mask is several times faster than
        # by a bool one, and the hot path (two multiplies per step) is all the engine costs between updates.
        self._masks: dict[str, torch.Tensor] = {}
        for name in self.names:
            p = self._params[name]
            self._masks[name] = self._initial_mask(name, p).to(device=p.device, dtype=p.dtype)
        self._sync_masks(self._masks)
        self._apply_initial_masks()
        if self.optimizer is not None and config.method != "dense":
            self._hooks.append(self.optimizer.register_step_pre_hook(self._pre_step_hook))
            self._hooks.append(self.optimizer.register_step_post_hook(self._post_step_hook))

    # ------------------------------------------------------------------ masks

    def _initial_mask(self, name: str, p: torch.Tensor) -> torch.Tensor:
        numel, budget = p.numel(), self.budgets[name]
        if budget >= numel:
            return torch.ones(p.shape, dtype=torch.bool)
        # CPU generator: the same mask whatever the device, on every rank.
        scores = torch.rand(
            numel, generator=_generator(torch.device("cpu"), derive_seed(self.config.seed, name, "init"))
        )
        mask = torch.zeros(numel, dtype=torch.bool)
        mask[torch.topk(scores, budget, sorted=False).indices] = True
        return mask.view(p.shape)

    @torch.no_grad()
    def _apply_initial_masks(self) -> None:
        for name in self.names:
            p, m = self._params[name], self._masks[name]
            p.mul_(m)
            if self.config.rescale_init:
                # Keep the output variance of the dense initialisation despite the smaller fan-in.
                p.div_(math.sqrt(max(self.budgets[name] / p.numel(), 1e-12)))
            self._zero_optimizer_state(p, m.bool())

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """Layer name -> bool mask (True = active). Read-only copies; cached until the next update."""
        if self._bool_cache is None:
            self._bool_cache = {n: m.bool() for n, m in self._masks.items()}
        return self._bool_cache

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The target parameters, in model order."""
        for name in self.names:
            yield name, self._params[name]

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero every masked weight (the post-step hook does this after each optimiser step)."""
        params = [self._params[n] for n in self.names]
        torch._foreach_mul_(params, [self._masks[n] for n in self.names])

    @torch.no_grad()
    def mask_gradients(self) -> None:
        """Zero the gradients of masked weights. Idempotent within a step.

        The pre-step hook calls it; call it yourself before gradient clipping so the clip norm is the
        norm of the sparse gradient. On a step that ends in a RigL update it first keeps ``|grad|``.
        """
        if self._grads_masked or self.config.method == "dense":
            return
        names = [n for n in self.names if self._params[n].grad is not None]
        if self._needs_dense_grads():
            self._dense_grads = {n: self._params[n].grad.detach().abs() for n in names}
        if names:
            torch._foreach_mul_([self._params[n].grad for n in names], [self._masks[n] for n in names])
        self._grads_masked = True

    def _needs_dense_grads(self) -> bool:
        return (
            self.config.method == "rigl"
            and self.schedule is not None
            and self.schedule.is_update_step(self._opt_steps + 1)
        )

    def _pre_step_hook(self, optimizer, args, kwargs) -> None:
        self.mask_gradients()

    def _post_step_hook(self, optimizer, args, kwargs) -> None:
        self.apply_masks()
        self._opt_steps += 1
        self._grads_masked = False

    # ------------------------------------------------------------------ stepping

    def step(self) -> bool:
        """Call once after each ``optimizer.step()``. Returns whether the topology changed.

        Does nothing (and returns False) when the optimiser did not actually step since the last call,
        as after a mixed-precision step with overflowing gradients.
        """
        if self.optimizer is None:
            raise ConfigError("this engine was built without an optimiser (inspection only); it cannot step")
        if self._opt_steps == self.step_count:
            # No optimiser step since the last call (the scaler skipped it after an overflow, or a
            # gradient-accumulation micro-step): forget gradients kept for an update that did not happen.
            self.stats["idle_calls"] += 1
            self._dense_grads = None
            self._grads_masked = False
            return False
        changed = False
        while self.step_count < self._opt_steps:  # normally exactly one step
            self.step_count += 1
            if self.schedule is not None and self.schedule.is_update_step(self.step_count):
                changed |= self._update_topology(self.step_count)
        self._dense_grads = None
        return changed

    @torch.no_grad()
    def _update_topology(self, step: int) -> bool:
        fraction = self.schedule.drop_fraction(step)
        stats = UpdateStats(step=step, drop_fraction=fraction)
        old = {n: m.bool() for n, m in self._masks.items()}
        new: dict[str, torch.Tensor] = {}
        for name in self.names:
            p, active = self._params[name], old[name]
            budget = self.budgets[name]
            k = math.floor(fraction * budget)
            if budget >= p.numel() or k == 0:
                new[name] = active
                continue
            if self.config.method == "rigl":
                if self._dense_grads is None or name not in self._dense_grads:
                    raise RuntimeError(
                        f"RigL update at step {step} has no dense gradient for {name!r}: call engine.step() "
                        "right after optimizer.step(), with gradients from this step's backward pass"
                    )
                grow_score = self._dense_grads[name]
            else:
                grow_score = None
            new[name] = self._drop_and_grow(name, p, active, k, step, grow_score)
            stats.dropped += k
            stats.grown += k
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
            survive = both.to(p.dtype)  # 1 where value and state carry over (float: fast multiplies)
            p.mul_(survive)
            self._zero_optimizer_state(p, survive)
        stats.regrown = stats.grown - stats.new
        self._bool_cache = None
        self.num_updates += 1
        self.last_update = stats
        return stats.new > 0

    def _drop_and_grow(
        self,
        name: str,
        p: torch.Tensor,
        active: torch.Tensor,
        k: int,
        step: int,
        grad_abs: torch.Tensor | None,
    ) -> torch.Tensor:
        flat_active = active.reshape(-1)
        # Drop: the k active weights of smallest magnitude (scored on the active entries only).
        active_idx = flat_active.nonzero().squeeze(1)
        magnitude = p.detach().reshape(-1)[active_idx].abs().float()
        kept = flat_active.clone()
        kept[active_idx[_largest_k(magnitude.neg_(), k)]] = False
        # Grow: k positions among those not kept (a just-dropped one may come back with its value).
        if grad_abs is not None:
            grow_score = torch.nan_to_num(grad_abs.reshape(-1).float(), nan=0.0, posinf=0.0)
        else:
            g = _generator(p.device, derive_seed(self.config.seed, name, "grow", step))
            grow_score = torch.rand(p.numel(), generator=g, device=p.device)
        grow_score.masked_fill_(kept, -math.inf)
        new = kept
        new[_largest_k(grow_score, k)] = True
        return new.view(p.shape)

    def _zero_optimizer_state(self, p: torch.Tensor, keep: torch.Tensor) -> None:
        """Zero every optimiser state tensor shaped like ``p`` wherever ``keep`` (0/1 or bool) is 0."""
        if self.optimizer is None:
            return
        state = self.optimizer.state.get(p)
        if not state:
            return
        for value in state.values():
            if torch.is_tensor(value) and value.shape == p.shape:
                if value.is_floating_point() and keep.is_floating_point() and value.dtype == keep.dtype:
                    value.mul_(keep)
                else:
                    value.masked_fill_(keep.to(device=value.device, dtype=torch.bool).logical_not(), 0)

    def _sync_masks(self, masks: dict[str, torch.Tensor]) -> int:
        """Make every data-parallel rank use rank 0's masks (in place); returns the entries corrected."""
        distributed, _, _ = _dist_world()
        if not distributed:
            return 0
        import torch.distributed as dist

        names = self.names
        device = torch.device("cpu")
        if dist.get_backend() == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        local = torch.cat([masks[n].reshape(-1).to(device=device, dtype=torch.uint8) for n in names])
        received = local.clone()
        dist.broadcast(received, src=0)
        mismatch = int((received != local).sum())
        self.stats["sync_mismatch"] += mismatch
        if mismatch:
            offset = 0
            for n in names:
                numel = masks[n].numel()
                chunk = received[offset : offset + numel].view(masks[n].shape)
                masks[n].copy_(chunk.to(device=masks[n].device, dtype=masks[n].dtype))
                offset += numel
        return mismatch

    # ------------------------------------------------------------------ reports

    def report(self) -> DensityReport:
        """Per-layer and total density from the masks (active positions), with measured non-zeros."""
        layers = []
        for name in self.names:
            p = self._params[name]
            active = int(self._masks[name].count_nonzero())
            nonzero = int(torch.count_nonzero(p.detach()))
            layers.append(
                LayerReport(
                    name, tuple(p.shape), p.numel(), active, nonzero, self.budgets[name], active / p.numel()
                )
            )
        params_total = sum(p.numel() for p in self.model.parameters())
        target_total = sum(layer.numel for layer in layers)
        target_nonzero = sum(layer.active for layer in layers)
        return DensityReport(
            layers=layers,
            params_total=params_total,
            params_nonzero=params_total - target_total + target_nonzero,
            target_total=target_total,
            target_nonzero=target_nonzero,
        )

    def check_invariants(self) -> list[str]:
        """Problems found (empty when all hold): masked weights non-zero, active counts off budget."""
        problems = []
        for name in self.names:
            p, m = self._params[name], self._masks[name].bool()
            if int(m.sum()) != self.budgets[name]:
                problems.append(f"{name}: {int(m.sum())} active positions, budget {self.budgets[name]}")
            if bool((p.detach()[~m] != 0).any()):
                problems.append(f"{name}: {int((p.detach()[~m] != 0).sum())} masked weights are non-zero")
        return problems

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: config, counters and masks (bool tensors, on CPU)."""
        cfg = asdict(self.config)
        cfg["include"], cfg["exclude"] = list(self.config.include), list(self.config.exclude)
        return {
            "format": STATE_FORMAT,
            "config": cfg,
            "step": self.step_count,
            "num_updates": self.num_updates,
            "budgets": dict(self.budgets),
            "masks": {n: m.detach().bool().cpu().clone() for n, m in self._masks.items()},
        }

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore masks and counters saved by :meth:`state_dict`.

        Raises:
            StateError: the state dict comes from another model (layer names or shapes differ) or from an
                engine with another method, sparsity or distribution.
        """
        if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
            raise StateError(
                "not a sparsediff engine state dict (missing format marker 'sparsediff.sparse/1')"
            )
        saved_cfg = state.get("config", {})
        for key in ("method", "sparsity", "distribution"):
            if key in saved_cfg and saved_cfg[key] != getattr(self.config, key):
                raise StateError(
                    f"engine state was saved with {key}={saved_cfg[key]!r} but this engine has "
                    f"{key}={getattr(self.config, key)!r}"
                )
        masks = state["masks"]
        missing = [n for n in self.names if n not in masks]
        unexpected = [n for n in masks if n not in self._masks]
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"missing layer(s) {', '.join(missing[:5])}")
            if unexpected:
                parts.append(f"unexpected layer(s) {', '.join(unexpected[:5])}")
            raise StateError("engine state does not match this model: " + "; ".join(parts))
        for name in self.names:
            saved = masks[name]
            if tuple(saved.shape) != tuple(self._masks[name].shape):
                raise StateError(
                    f"engine state does not match this model: layer {name!r} has shape "
                    f"{tuple(saved.shape)} in the state but {tuple(self._masks[name].shape)} in the model"
                )
            nnz = int(saved.bool().sum())
            if nnz != self.budgets[name]:
                raise StateError(
                    f"engine state does not match this model: layer {name!r} has {nnz} active weights "
                    f"in the state but a budget of {self.budgets[name]}"
                )
        for name in self.names:
            self._masks[name].copy_(masks[name].to(self._masks[name].device))
        self.step_count = int(state["step"])
        self._opt_steps = self.step_count
        self.num_updates = int(state.get("num_updates", 0))
        self._bool_cache = None
        self._dense_grads = None
        self._grads_masked = False

    def remove(self) -> None:
        """Detach the optimiser hooks (the masks stay as they are)."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def __repr__(self) -> str:
        c = self.config
        return (
            f"SparseEngine(method={c.method!r}, sparsity={c.sparsity}, distribution={c.distribution!r}, "
            f"layers={len(self.names)}, step={self.step_count}, updates={self.num_updates})"
        )


def sparsify(
    model: nn.Module,
    optimizer: Any | None = None,
    *,
    method: str = "rigl",
    sparsity: float = 0.9,
    distribution: str = "erk",
    prune_ratio: float = 0.3,
    decay: str = "cosine",
    update_every: int = 100,
    end_step: int | str | None = None,
    total_steps: int | None = None,
    end_fraction: float = 0.75,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    seed: int = 0,
    erk_power: float = 1.0,
    rescale_init: bool = False,
    nm: str | tuple[int, int] | None = None,
    srste_lambda: float | None = None,
    progressive: Sequence[str] | None = None,
    nm_incompatible: str = "dense",
) -> SparseEngine | NMSparseEngine:
    """Make ``model`` sparse from now on and return the engine that keeps it so.

    Args:
        model: any ``nn.Module`` (DDP and ``torch.compile`` wrappers are looked through).
        optimizer: the optimiser that trains ``model``; ``None`` builds an engine for inspection only.
        method: ``"dense"`` (no masks), ``"static"`` (random mask fixed at the start), ``"rigl"`` (drop by
            magnitude, grow by dense-gradient magnitude), ``"magran"`` (drop by magnitude, grow at random)
            or ``"srste"`` (N:M masks recomputed every forward pass, SR-STE gradients: returns an
            :class:`~sparsediff.sparse.nm.NMSparseEngine`; only ``nm``, ``srste_lambda``, ``progressive``,
            ``nm_incompatible``, ``include`` and ``exclude`` apply to it).
        sparsity: global fraction of zeros over the target weights, in [0, 1).
        distribution: how the sparsity is spread over layers: ``"uniform"``, ``"er"`` or ``"erk"``.
        prune_ratio: fraction of each layer's active weights moved at the first update, in (0, 1].
        decay: ``"cosine"`` or ``"constant"`` decay of the prune ratio.
        update_every: optimiser steps between topology updates.
        end_step: last step with a topology update; ``"never"`` keeps updating (constant decay only).
        total_steps: training length; when ``end_step`` is not given it is ``end_fraction * total_steps``.
        end_fraction: see ``total_steps`` (0.75 by default).
        include / exclude: name patterns (globs, or regexes prefixed ``re:``) selecting target weights.
        seed: seeds the initial masks and MagRan's growth.
        erk_power: exponent on ER/ERK raw densities.
        rescale_init: divide the active initial weights by ``sqrt(density)``.
        nm: ``"srste"`` only: the N:M pattern (``"2:4"`` by default).
        srste_lambda: ``"srste"`` only: decay of the pruned weights in the backward pass (2e-4 by default).
        progressive: ``"srste"`` only: N:M schedule such as ``["7:8@0", "4:8@1000", "2:4@2000"]``.
        nm_incompatible: ``"srste"`` only: keep layers whose input size is not a multiple of M ``"dense"``
            or raise (``"error"``).
    """
    if method == "srste":
        from .nm import sparsify_nm

        return sparsify_nm(
            model,
            optimizer,
            method=method,
            nm=nm,
            srste_lambda=srste_lambda,
            progressive=progressive,
            nm_incompatible=nm_incompatible,
            include=include,
            exclude=exclude,
        )
    if nm is not None or srste_lambda is not None or progressive is not None:
        raise ConfigError(f"nm, srste_lambda and progressive apply to method='srste' only, not {method!r}")
    if method in ("rigl", "magran"):
        end = resolve_end_step(end_step, total_steps, end_fraction)
    else:
        end = None
    as_tuple = lambda v: tuple(v.split(",")) if isinstance(v, str) else tuple(v or ())  # noqa: E731
    config = SparseConfig(
        method=method,
        sparsity=0.0 if method == "dense" else sparsity,
        distribution=distribution,
        prune_ratio=prune_ratio,
        decay=decay,
        update_every=update_every,
        end_step=end,
        include=as_tuple(include),
        exclude=as_tuple(exclude),
        seed=seed,
        erk_power=erk_power,
        rescale_init=rescale_init,
    )
    if config.dynamic:
        UpdateSchedule(prune_ratio, update_every, end, decay)  # validate early, with the user's values
    elif not (isinstance(prune_ratio, (int, float)) and 0.0 < prune_ratio <= 1.0):
        raise ConfigError(f"prune ratio must be in (0, 1], got {prune_ratio!r}")
    return SparseEngine(model, optimizer, config)
