"""N:M structured sparsity: masks, SR-STE fine-tuning (SparseDM, Paper B) and one-shot N:M pruning.

An N:M mask keeps, in every group of M consecutive weights along a layer's *input* dimension, the N of
largest magnitude. For a Linear weight ``(out, in)`` the groups run along ``in``; for a convolution
``(out, in/groups, kh, kw)`` the input channels are moved last, ``(out, kh, kw, in)``, and the groups run
along them (the layout sparse tensor-core kernels use). Any other weight with >= 2 dims groups along
dim 1, except transposed convolutions, whose input channels are dim 0. Ties go to the lower index.

SR-STE (``sparsify(model, optimizer, method="srste", nm="2:4")``) trains the dense weights ``w`` while the
forward pass only ever sees ``w * mask(w)``, the mask recomputed from ``|w|`` on every forward pass::

    forward:   w_eff = w * mask                      mask = N:M top-|w| of the current dense w
    backward:  dL/dw = dL/dw_eff + lambda * (1 - mask) * w       (straight-through + sparse-refined decay)

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
import logging
import math
import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, StateError
from .engine import DensityReport, LayerReport, unwrap_optimizer
from .targets import _as_list, select_targets, unwrap_model

logger = logging.getLogger(__name__)

NM_METHODS = ("srste",)
NM_STATE_FORMAT = "sparsediff.nm/1"
INCOMPATIBLE_POLICIES = ("dense", "error")
DEFAULT_SRSTE_LAMBDA = 2e-4  # Paper B
DEFAULT_NM = "2:4"

# Names of the hook functions an engine registers: how a module that carries them (also in a deepcopy of
# the model, whose hooks are the same functions) is recognised.
_HOOK_NAMES = frozenset({"nm_pre_hook", "nm_post_hook", "nm_root_pre_hook", "nm_root_post_hook"})


def has_nm_hooks(module: nn.Module) -> bool:
    """Whether ``module`` itself carries an N:M engine's forward hooks."""
    hooks = (*module._forward_pre_hooks.values(), *module._forward_hooks.values())
    return any(getattr(h, "__name__", "") in _HOOK_NAMES for h in hooks)


def remove_nm_hooks(model: nn.Module) -> int:
    """Remove every N:M engine hook from ``model`` and its submodules; returns how many were removed.

    For a copy of a sparsified model (``copy.deepcopy`` copies the hooks, which keep masking the copy's
    weights with the engine's pattern), for example a dense teacher copied after ``sparsify``. On the
    engine's own model, prefer :meth:`NMSparseEngine.remove`.
    """
    removed = 0
    for module in unwrap_model(model).modules():
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for key in [k for k, h in hooks.items() if getattr(h, "__name__", "") in _HOOK_NAMES]:
                del hooks[key]
                module._forward_hooks_always_called.pop(key, None)
                removed += 1
    return removed


# ---------------------------------------------------------------------------------------------- patterns


@dataclass(frozen=True, order=True)
class NMPattern:
    """Keep ``n`` of every ``m`` consecutive weights along the input dimension (``1 <= n < m``)."""

    n: int
    m: int

    def __post_init__(self) -> None:
        for v in (self.n, self.m):
            if isinstance(v, bool) or not isinstance(v, int):
                raise ConfigError(f"N:M pattern needs integers N and M, got {self.n!r}:{self.m!r}")
        if self.n < 1:
            raise ConfigError(f"N:M pattern {self.n}:{self.m}: N must be at least 1 (N=0 keeps nothing)")
        if self.n >= self.m:
            raise ConfigError(
                f"N:M pattern {self.n}:{self.m}: N must be smaller than M (N >= M keeps every weight)"
            )

    @property
    def density(self) -> float:
        return self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


_PATTERN_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
_STEP_RE = re.compile(r"^\s*(\d+\s*:\s*\d+)\s*@\s*(\d+)\s*$")


def parse_nm(spec: str | tuple[int, int] | NMPattern) -> NMPattern:
    """``"2:4"``, ``(2, 4)`` or an :class:`NMPattern` -> :class:`NMPattern`.

    Raises:
        ConfigError: the string is not ``"N:M"`` (``"2-4"``), or ``N < 1`` or ``N >= M``.
    """
    if isinstance(spec, NMPattern):
        return spec
    if isinstance(spec, str):
        match = _PATTERN_RE.match(spec)
        if match is None:
            raise ConfigError(f"N:M pattern must look like '2:4' (N and M integers), got {spec!r}")
        return NMPattern(int(match.group(1)), int(match.group(2)))
    if isinstance(spec, (tuple, list)) and len(spec) == 2:
        return NMPattern(*spec)
    raise ConfigError(f"N:M pattern must be a string like '2:4' or a pair (N, M), got {spec!r}")


def parse_progressive(
    entries: Sequence[str | tuple[str | tuple[int, int], int]],
) -> tuple[tuple[int, NMPattern], ...]:
    """Parse a progressive schedule into ``((step, pattern), ...)``.

    Each entry is ``"N:M@step"`` or a pair ``(pattern, step)``: the pattern takes effect once ``step``
    optimiser steps have been taken. The first entry must start at step 0 and steps must increase.
    """
    if isinstance(entries, str) or not isinstance(entries, Sequence) or len(entries) == 0:
        raise ConfigError(
            f"progressive schedule must be a non-empty list like ['7:8@0', '4:8@1000'], got {entries!r}"
        )
    out: list[tuple[int, NMPattern]] = []
    for entry in entries:
        if isinstance(entry, str):
            match = _STEP_RE.match(entry)
            if match is None:
                raise ConfigError(
                    f"progressive schedule entry must look like 'N:M@step' (e.g. '6:8@1000'), got {entry!r}"
                )
            pattern, step = parse_nm(match.group(1)), int(match.group(2))
        elif isinstance(entry, (tuple, list)) and len(entry) == 2:
            pattern, step = parse_nm(entry[0]), entry[1]
            if isinstance(step, bool) or not isinstance(step, int) or step < 0:
                raise ConfigError(f"progressive schedule step must be an integer >= 0, got {step!r}")
        else:
            raise ConfigError(
                f"progressive schedule entry must be 'N:M@step' or (pattern, step), got {entry!r}"
            )
        if out and step <= out[-1][0]:
            raise ConfigError(
                f"progressive schedule steps must increase: {pattern}@{step} comes after "
                f"{out[-1][1]}@{out[-1][0]}"
            )
        out.append((step, pattern))
    if out[0][0] != 0:
        raise ConfigError(
            f"progressive schedule must start at step 0 (the pattern used before any step), got "
            f"{out[0][1]}@{out[0][0]}"
        )
    return tuple(out)


def progressive_schedule(total_steps: int, patterns: Sequence[str | tuple[int, int]]) -> list[str]:
    """Equal-interval progressive schedule: pattern ``i`` takes effect at ``round(i * total_steps / k)``.

    ``progressive_schedule(5000, ["7:8", "6:8", "5:8", "4:8", "2:4"])`` ->
    ``["7:8@0", "6:8@1000", "5:8@2000", "4:8@3000", "2:4@4000"]`` (Paper B's progressive variant).
    """
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ConfigError(f"total_steps must be a positive integer, got {total_steps!r}")
    if isinstance(patterns, str) or len(patterns) == 0:
        raise ConfigError(f"patterns must be a non-empty list like ['7:8', '2:4'], got {patterns!r}")
    if len(patterns) > total_steps:
        raise ConfigError(
            f"{len(patterns)} patterns do not fit into {total_steps} steps (one step each at least)"
        )
    k = len(patterns)
    return [f"{parse_nm(p)}@{round(i * total_steps / k)}" for i, p in enumerate(patterns)]


# ---------------------------------------------------------------------------------------------- masks


def input_dim(module: nn.Module | None, param_name: str = "weight") -> int:
    """The dimension of a weight that is contracted with the layer's input (the N:M grouping dim)."""
    if isinstance(module, nn.modules.conv._ConvTransposeNd) and param_name == "weight":
        return 0  # (in, out/groups, *kernel)
    return 1


def _check_groupable(weight: torch.Tensor, m: int, in_dim: int, what: str = "weight") -> int:
    if weight.dim() < 2:
        raise ConfigError(f"N:M masks need a weight with >= 2 dims; {what} has shape {tuple(weight.shape)}")
    k = weight.shape[in_dim]
    if k % m:
        raise ConfigError(
            f"{what} with shape {tuple(weight.shape)} has input size {k} (dim {in_dim}), "
            f"not a multiple of M={m}"
        )
    return k


def _groups(weight: torch.Tensor, m: int, in_dim: int) -> tuple[torch.Tensor, torch.Size]:
    """View ``weight`` as ``(rows, k/m, m)`` groups along ``in_dim`` (moved last); also the moved shape."""
    moved = weight.movedim(in_dim, -1)  # conv: (out, kh, kw, in)
    return moved.reshape(-1, moved.shape[-1] // m, m), moved.shape


def nm_mask(weight: torch.Tensor, n: int, m: int, in_dim: int = 1) -> torch.Tensor:
    """Bool mask keeping the ``n`` largest ``|w|`` of every ``m`` consecutive weights along ``in_dim``.

    Ties are broken towards the lower index (a stable sort), so the mask is the same on every device and
    every run.

    Raises:
        ConfigError: ``n``/``m`` invalid, or the size of ``in_dim`` is not a multiple of ``m``.
    """
    NMPattern(n, m)
    _check_groupable(weight, m, in_dim)
    with torch.no_grad():
        groups, moved_shape = _groups(weight.detach(), m, in_dim)  # (rows, G, M)
        keep = torch.argsort(groups.abs(), dim=-1, descending=True, stable=True)[..., :n]
        mask = torch.zeros(groups.shape, dtype=torch.bool, device=weight.device)
        mask.scatter_(-1, keep, True)
        return mask.reshape(moved_shape).movedim(-1, in_dim).contiguous()


class _SRSTEFunction(torch.autograd.Function):
    """``w * mask`` forward; ``grad + lambda * (1 - mask) * w`` backward (SR-STE)."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, mask: torch.Tensor, lam: float) -> torch.Tensor:
        ctx.save_for_backward(weight, mask)
        ctx.lam = lam
        return torch.where(mask, weight, 0.0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight, mask = ctx.saved_tensors
        if ctx.lam == 0.0:
            return grad, None, None
        # The straight-through gradient reaches every weight; pruned ones also decay towards 0, so that
        # weights that keep flipping in and out of the mask settle (Zhou et al., 2021).
        return grad + ctx.lam * torch.where(mask, 0.0, weight), None, None


def srste_weight(
    weight: torch.Tensor, mask: torch.Tensor, srste_lambda: float = DEFAULT_SRSTE_LAMBDA
) -> torch.Tensor:
    """``weight * mask`` whose backward gives ``weight`` the SR-STE gradient (see the module docstring)."""
    return _SRSTEFunction.apply(weight, mask, float(srste_lambda))


def _owners(model: nn.Module, params: Mapping[str, nn.Parameter]) -> dict[str, list[tuple[nn.Module, str]]]:
    """name -> every ``(module, attribute)`` registering that Parameter (a tied weight has several)."""
    by_id = {id(p): n for n, p in params.items()}
    out: dict[str, list[tuple[nn.Module, str]]] = {n: [] for n in params}
    seen: set[tuple[int, str]] = set()
    for _, module in model.named_modules(remove_duplicate=False):
        for attr, p in module._parameters.items():
            if p is not None and id(p) in by_id and (id(module), attr) not in seen:
                seen.add((id(module), attr))
                out[by_id[id(p)]].append((module, attr))
    return out


def _incompatible_reason(shape: Sequence[int], in_dim: int, m: int) -> str | None:
    k = shape[in_dim]
    if k % m:
        return f"input size {k} (dim {in_dim} of shape {tuple(shape)}) is not a multiple of M={m}"
    return None


def _raise_incompatible(name: str, shape: Sequence[int], in_dim: int, m: int) -> None:
    raise ConfigError(
        f"layer {name!r} with shape {tuple(shape)} cannot take an N:M mask with M={m}: its input size "
        f"{shape[in_dim]} (dim {in_dim}) is not a multiple of {m}; exclude it or use nm_incompatible='dense'"
    )


def _check_policy(incompatible: str) -> None:
    if incompatible not in INCOMPATIBLE_POLICIES:
        raise ConfigError(
            f"nm_incompatible must be one of {', '.join(INCOMPATIBLE_POLICIES)}, got {incompatible!r}"
        )


@torch.no_grad()
def one_shot_nm(
    model: nn.Module,
    n: int,
    m: int,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    incompatible: str = "dense",
) -> dict[str, torch.Tensor]:
    """Prune ``model`` to N:M by magnitude, in place (the one-shot baseline, no training).

    Args:
        model: any module; its target weights (see :func:`select_targets`) are multiplied by their masks.
        n, m: keep ``n`` of every ``m`` consecutive weights along the input dimension.
        include / exclude: name patterns selecting the target weights.
        incompatible: ``"dense"`` keeps a layer whose input size is not a multiple of ``m`` dense (it is
            then absent from the result, and logged); ``"error"`` raises.

    Returns:
        layer name -> bool mask, for the layers that were pruned.
    """
    pattern = NMPattern(n, m)
    _check_policy(incompatible)
    model = unwrap_model(model)
    targets = select_targets(model, include, exclude)
    owners = _owners(model, dict(targets))
    masks: dict[str, torch.Tensor] = {}
    for name, p in targets:
        owner = owners[name][0][0] if owners[name] else None
        dim = input_dim(owner, owners[name][0][1] if owners[name] else "weight")
        reason = _incompatible_reason(p.shape, dim, pattern.m)
        if reason is not None:
            if incompatible == "error":
                _raise_incompatible(name, p.shape, dim, pattern.m)
            logger.info("one_shot_nm: %s kept dense: %s", name, reason)
            continue
        mask = nm_mask(p, pattern.n, pattern.m, dim)
        p.masked_fill_(~mask, 0)
        masks[name] = mask
    if not masks:
        raise ConfigError(
            f"nothing to prune to {pattern}: no target weight of {type(model).__name__} has an input size "
            f"that is a multiple of {pattern.m}"
        )
    return masks


# ---------------------------------------------------------------------------------------------- engine


@dataclass(frozen=True)
class NMConfig:
    """Everything that defines an N:M engine; saved in its state dict.

    ``nm`` is the pattern when ``progressive`` is empty; otherwise ``progressive`` (normalised entries
    ``"N:M@step"``) decides and ``nm`` is its first pattern.
    """

    method: str = "srste"
    nm: str = DEFAULT_NM
    srste_lambda: float = DEFAULT_SRSTE_LAMBDA
    progressive: tuple[str, ...] = ()
    nm_incompatible: str = "dense"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.method not in NM_METHODS:
            raise ConfigError(f"unknown N:M method {self.method!r}; choose one of {', '.join(NM_METHODS)}")
        parse_nm(self.nm)
        if self.progressive:
            parse_progressive(self.progressive)
        lam = self.srste_lambda
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
            raise ConfigError(f"srste_lambda must be a finite number >= 0, got {lam!r}")
        _check_policy(self.nm_incompatible)

    @property
    def schedule(self) -> tuple[tuple[int, NMPattern], ...]:
        if self.progressive:
            return parse_progressive(self.progressive)
        return ((0, parse_nm(self.nm)),)


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


class NMSparseEngine:
    """N:M masks recomputed on every forward pass, trained with SR-STE (see the module docstring).

    Build it with ``sparsify(model, optimizer, method="srste", nm="2:4")``. It offers the surface of
    :class:`SparseEngine`. Attributes:
        config: the :class:`NMConfig`.
        names: the weights that carry an N:M mask (in at least one phase of the schedule), in model order.
        pattern: the N:M pattern in force now.
        schedule: ``((step, pattern), ...)``; a single entry without a progressive schedule.
        step_count: optimiser steps taken (skipped mixed-precision steps do not count).
        num_updates: pattern changes so far.
        dense_layers: target weights kept dense under the current pattern -> why.
    """

    def __init__(self, model: nn.Module, optimizer: Any | None, config: NMConfig):
        self.config = config
        self.model = unwrap_model(model)
        self.optimizer = unwrap_optimizer(optimizer) if optimizer is not None else None
        self.schedule = config.schedule
        self.srste_lambda = float(config.srste_lambda)
        targets = select_targets(self.model, config.include or None, config.exclude or None)
        all_params = dict(targets)
        owners = _owners(self.model, all_params)
        self._in_dims = {
            n: input_dim(owners[n][0][0], owners[n][0][1]) if owners[n] else 1 for n in all_params
        }
        self._shapes = {n: tuple(p.shape) for n, p in targets}
        ms = sorted({pat.m for _, pat in self.schedule})
        names = []
        for name, p in targets:
            ok = [m for m in ms if _incompatible_reason(p.shape, self._in_dims[name], m) is None]
            if len(ok) < len(ms) and config.nm_incompatible == "error":
                bad = next(m for m in ms if m not in ok)
                _raise_incompatible(name, p.shape, self._in_dims[name], bad)
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
        self.names: list[str] = names
        self._params: dict[str, nn.Parameter] = {n: all_params[n] for n in names}
        self._owners = {n: owners[n] for n in names}
        for name in names:
            for module, _ in self._owners[name]:
                if has_nm_hooks(module):
                    raise ConfigError(
                        f"layer {name!r} already carries an N:M engine's hooks; call .remove() on that "
                        "engine before building another"
                    )

        if self.optimizer is not None:
            in_opt = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
            for name in names:
                p = self._params[name]
                if p.requires_grad and id(p) not in in_opt:
                    raise ConfigError(
                        f"parameter {name!r} is an N:M target but the optimiser does not update it; "
                        "add it to the optimiser or exclude it"
                    )

        self.step_count = 0
        self.num_updates = 0
        self.stats: dict[str, int] = {"idle_calls": 0}
        self._opt_steps = 0
        self._fwd = _ForwardState()
        self._on_use: Callable[[str, torch.Tensor | None], None] | None = None
        self._mask_cache: dict[str, tuple[tuple, torch.Tensor]] = {}
        self.pattern: NMPattern = self.schedule[0][1]
        self._layer_pattern: dict[str, NMPattern | None] = {}
        self.dense_layers: dict[str, str] = {}
        self._set_pattern(self.pattern)

        self._own_modules = {id(mod) for pairs in self._owners.values() for mod, _ in pairs}
        paths = {id(mod): path for path, mod in self.model.named_modules(remove_duplicate=False)}
        self._owner_paths = {
            n: [(paths[id(mod)], attr) for mod, attr in pairs] for n, pairs in self._owners.items()
        }
        # Hooks are closures, not bound methods: a deepcopy of the model (an EMA copy) then shares this
        # engine instead of trying to copy it, and masks its own weights the same way.
        self._hooks: list[Any] = []
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
        if self.optimizer is not None:
            self._hooks.append(self.optimizer.register_step_post_hook(self._make_step_hook()))

    # ------------------------------------------------------------------ patterns

    def _set_pattern(self, pattern: NMPattern) -> None:
        self.pattern = pattern
        self._layer_pattern = {}
        self.dense_layers = {}
        for name in self._targets:
            reason = _incompatible_reason(self._shapes[name], self._in_dims[name], pattern.m)
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
            return _SRSTEFunction.apply(dense, mask, self.srste_lambda)
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
        def nm_pre_hook(module: nn.Module, args: Any) -> None:
            self._swap_in(module, attr, name)

        return nm_pre_hook

    def _make_post_hook(self, name: str, attr: str):
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

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The masked (dense-stored) parameters, in model order."""
        for name in self.names:
            yield name, self._params[name]

    def mask_gradients(self) -> None:
        """Nothing to do: SR-STE updates every dense weight (kept for parity with :class:`SparseEngine`)."""

    @torch.no_grad()
    def fold(self) -> None:
        """Multiply every masked weight by its current mask, in place (for export or one-off evaluation).

        The hooks stay; the next forward recomputes the same effective weights from the folded ones.
        """
        for name, mask in self.masks.items():
            self._params[name].masked_fill_(~mask, 0)
        self._mask_cache.clear()

    # ------------------------------------------------------------------ stepping

    def _make_step_hook(self):
        def nm_step_hook(optimizer, args, kwargs) -> None:
            self._opt_steps += 1

        return nm_step_hook

    def step(self) -> bool:
        """Call once after each ``optimizer.step()``; returns whether the N:M pattern changed.

        Does nothing (and returns False) when the optimiser did not really step since the last call, as
        after a mixed-precision step whose gradients overflowed.
        """
        if self.optimizer is None:
            raise ConfigError("this engine was built without an optimiser (inspection only); it cannot step")
        if self._opt_steps == self.step_count:
            self.stats["idle_calls"] += 1
            return False
        changed = False
        while self.step_count < self._opt_steps:
            self.step_count += 1
            pattern = self.pattern_at(self.step_count)
            if pattern != self.pattern:
                self._set_pattern(pattern)
                self.num_updates += 1
                changed = True
        return changed

    # ------------------------------------------------------------------ reports

    def report(self) -> NMDensityReport:
        """Density of the effective (masked) weights, the pattern in force and the layers kept dense."""
        layers = []
        masks = self.masks
        for name in self.names:
            p, mask = self._params[name], masks[name]
            active = int(mask.count_nonzero())
            nonzero = int(torch.count_nonzero(p.detach().masked_fill(~mask, 0)))
            numel = p.numel()
            layers.append(
                LayerReport(name, tuple(p.shape), numel, active, nonzero, self.budgets[name], active / numel)
            )
        params_total = sum(p.numel() for p in self.model.parameters())
        target_total = sum(layer.numel for layer in layers)
        target_nonzero = sum(layer.active for layer in layers)
        return NMDensityReport(
            layers=layers,
            params_total=params_total,
            params_nonzero=params_total - target_total + target_nonzero,
            target_total=target_total,
            target_nonzero=target_nonzero,
            pattern=str(self.pattern),
            step=self.step_count,
            dense_layers=dict(self.dense_layers),
        )

    def check_invariants(self) -> list[str]:
        """Problems found (empty when all hold): a mask that does not keep exactly N of every M."""
        problems = []
        for name, mask in self.masks.items():
            pattern = self._layer_pattern[name]
            if pattern is None:
                continue
            groups, _ = _groups(mask, pattern.m, self._in_dims[name])
            wrong = int((groups.sum(-1) != pattern.n).sum())
            if wrong:
                problems.append(f"{name}: {wrong} groups of {pattern.m} do not keep exactly {pattern.n}")
        return problems

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Step, pattern and schedule (masks are recomputed from the weights, so none are stored)."""
        cfg = asdict(self.config)
        for key in ("progressive", "include", "exclude"):
            cfg[key] = list(cfg[key])
        return {
            "format": NM_STATE_FORMAT,
            "config": cfg,
            "step": self.step_count,
            "num_updates": self.num_updates,
            "pattern": str(self.pattern),
            "schedule": [f"{p}@{s}" for s, p in self.schedule],
            "layers": {n: list(self._shapes[n]) for n in self.names},
            "dense_layers": dict(self.dense_layers),
            "masks": {},  # keeps sparsediff.sparse.io's save/load working
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the step counter and the pattern saved by :meth:`state_dict`.

        Raises:
            StateError: the state comes from another kind of engine, another pattern or schedule, or a
                model whose masked layers or their shapes differ (the layer is named).
        """
        if not isinstance(state, Mapping) or state.get("format") != NM_STATE_FORMAT:
            raise StateError(
                f"not a sparsediff N:M engine state dict (missing format marker {NM_STATE_FORMAT!r})"
            )
        saved_cfg = state.get("config", {})
        for key in ("method", "nm", "nm_incompatible"):
            if key in saved_cfg and saved_cfg[key] != getattr(self.config, key):
                raise StateError(
                    f"N:M engine state was saved with {key}={saved_cfg[key]!r} but this engine has "
                    f"{key}={getattr(self.config, key)!r}"
                )
        mine = [f"{p}@{s}" for s, p in self.schedule]
        if list(state.get("schedule", mine)) != mine:
            raise StateError(
                f"N:M engine state was saved with schedule {list(state['schedule'])} but this engine has {mine}"
            )
        layers = state.get("layers", {})
        missing = [n for n in self.names if n not in layers]
        unexpected = [n for n in layers if n not in self._shapes or n not in self._params]
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"missing layer(s) {', '.join(missing[:5])}")
            if unexpected:
                parts.append(f"unexpected layer(s) {', '.join(unexpected[:5])}")
            raise StateError("N:M engine state does not match this model: " + "; ".join(parts))
        for name in self.names:
            if tuple(layers[name]) != self._shapes[name]:
                raise StateError(
                    f"N:M engine state does not match this model: layer {name!r} has shape "
                    f"{tuple(layers[name])} in the state but {self._shapes[name]} in the model"
                )
        step = state.get("step")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise StateError(f"N:M engine state has an invalid step {step!r}")
        self.step_count = self._opt_steps = step
        self.num_updates = int(state.get("num_updates", 0))
        self._set_pattern(self.pattern_at(step))

    def remove(self) -> None:
        """Detach every hook: the model is left with its plain dense Parameters (call :meth:`fold` first to
        keep the sparsity)."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for name in self.names:
            for module, attr in self._owners[name]:
                if not isinstance(module._parameters.get(attr), nn.Parameter):
                    self._put(module, attr, self._params[name])
        self._fwd.saved.clear()
        self._fwd.root_entries = []
        self._fwd.depth = 0

    def __repr__(self) -> str:
        c = self.config
        return (
            f"NMSparseEngine(method={c.method!r}, pattern={str(self.pattern)!r}, lambda={c.srste_lambda}, "
            f"layers={len(self.names)}, dense={len(self.dense_layers)}, step={self.step_count})"
        )


def sparsify_nm(
    model: nn.Module,
    optimizer: Any | None = None,
    *,
    method: str = "srste",
    nm: str | tuple[int, int] | None = None,
    srste_lambda: float | None = None,
    progressive: Sequence[str | tuple[Any, int]] | None = None,
    nm_incompatible: str = "dense",
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
) -> NMSparseEngine:
    """Build an :class:`NMSparseEngine` (what ``sparsify(..., method="srste")`` calls).

    Args:
        model: any ``nn.Module`` (DDP and ``torch.compile`` wrappers are looked through).
        optimizer: the optimiser that trains ``model`` (counts the steps); ``None`` for evaluation only.
        method: ``"srste"``.
        nm: the N:M pattern, ``"2:4"`` by default; give either ``nm`` or ``progressive``.
        srste_lambda: SR-STE decay of the pruned weights (2e-4 by default; 0 is the plain STE).
        progressive: ``["7:8@0", "6:8@1000", ...]``: each pattern takes effect once that many optimiser
            steps were taken (see :func:`progressive_schedule` for equal intervals).
        nm_incompatible: a target whose input size is not a multiple of M is kept dense (``"dense"``) or
            rejected (``"error"``).
        include / exclude: name patterns (globs, or regexes prefixed ``re:``) selecting target weights.
    """
    if nm is not None and progressive is not None:
        raise ConfigError("give either nm (a fixed N:M pattern) or progressive (a schedule), not both")
    if progressive is not None:
        schedule = parse_progressive(progressive)
        prog = tuple(f"{p}@{s}" for s, p in schedule)
        first = str(schedule[0][1])
    else:
        prog, first = (), str(parse_nm(DEFAULT_NM if nm is None else nm))
    config = NMConfig(
        method=method,
        nm=first,
        srste_lambda=DEFAULT_SRSTE_LAMBDA if srste_lambda is None else srste_lambda,
        progressive=prog,
        nm_incompatible=nm_incompatible,
        include=tuple(_as_list(include)),
        exclude=tuple(_as_list(exclude)),
    )
    return NMSparseEngine(model, optimizer, config)
