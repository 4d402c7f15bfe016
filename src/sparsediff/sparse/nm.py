"""N:M structured sparsity: patterns, masks, the SR-STE gradient and one-shot N:M pruning.

An N:M mask keeps, in every group of M consecutive weights along a layer's *input* dimension, the N of
largest magnitude. For a Linear weight ``(out, in)`` the groups run along ``in``; for a convolution
``(out, in/groups, kh, kw)`` the input channels are moved last, ``(out, kh, kw, in)``, and the groups run
along them (the layout sparse tensor-core kernels use). Any other weight with >= 2 dims groups along
dim 1, except transposed convolutions, whose input channels are dim 0. Ties go to the lower index.

SR-STE (SparseDM, Paper B) trains the dense weights ``w`` while the forward pass only ever sees
``w * mask(w)``, the mask recomputed from ``|w|`` on every forward pass (:func:`srste_weight`)::

    forward:   w_eff = w * mask                      mask = N:M top-|w| of the current dense w
    backward:  dL/dw = dL/dw_eff + lambda * (1 - mask) * w       (straight-through + sparse-refined decay)

The engine that puts these masked weights into a model's forward pass is
:class:`~sparsediff.sparse.nm_engine.NMSparseEngine`; :func:`one_shot_nm` prunes once, without training.
"""

from __future__ import annotations

import logging
import re
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from .targets import select_targets, unwrap_model

logger = logging.getLogger(__name__)

INCOMPATIBLE_POLICIES = ("dense", "error")
DEFAULT_SRSTE_LAMBDA = 2e-4  # Paper B
DEFAULT_NM = "2:4"

# The hook functions N:M engines have registered, held by reference: a module carries an N:M engine's
# hooks when one of these very functions is among its hooks (also in a deepcopy of the model, whose hooks
# are the same function objects). Weak: a function leaves the set once no module holds it any more.
_NM_HOOKS: weakref.WeakSet = weakref.WeakSet()


def nm_hook(fn):
    """Mark ``fn`` as an N:M engine's hook (the engine registers every forward hook through this)."""
    _NM_HOOKS.add(fn)
    return fn


def _is_nm_hook(hook: object) -> bool:
    try:
        return hook in _NM_HOOKS
    except TypeError:  # not weak-referenceable (a functools.partial...): not one of ours
        return False


def has_nm_hooks(module: nn.Module) -> bool:
    """Whether ``module`` itself carries an N:M engine's forward hooks."""
    hooks = (*module._forward_pre_hooks.values(), *module._forward_hooks.values())
    return any(_is_nm_hook(h) for h in hooks)


def remove_nm_hooks(model: nn.Module) -> int:
    """Remove every N:M engine hook from ``model`` and its submodules; returns how many were removed.

    For a copy of a sparsified model (``copy.deepcopy`` copies the hooks, which keep masking the copy's
    weights with the engine's pattern), for example a dense teacher copied after ``sparsify``. On the
    engine's own model, prefer :meth:`NMSparseEngine.remove`.
    """
    removed = 0
    for module in unwrap_model(model).modules():
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for key in [k for k, h in hooks.items() if _is_nm_hook(h)]:
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


def nm_groups(weight: torch.Tensor, m: int, in_dim: int) -> tuple[torch.Tensor, torch.Size]:
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
        groups, moved_shape = nm_groups(weight.detach(), m, in_dim)  # (rows, G, M)
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


def weight_owners(
    model: nn.Module, params: Mapping[str, nn.Parameter]
) -> dict[str, list[tuple[nn.Module, str]]]:
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


def incompatible_reason(shape: Sequence[int], in_dim: int, m: int) -> str | None:
    """Why a weight of ``shape`` cannot take groups of ``m`` along ``in_dim``; None when it can."""
    k = shape[in_dim]
    if k % m:
        return f"input size {k} (dim {in_dim} of shape {tuple(shape)}) is not a multiple of M={m}"
    return None


def raise_incompatible(name: str, shape: Sequence[int], in_dim: int, m: int) -> None:
    """Refuse layer ``name`` (policy ``nm_incompatible="error"``), naming it and its input size."""
    raise ConfigError(
        f"layer {name!r} with shape {tuple(shape)} cannot take an N:M mask with M={m}: its input size "
        f"{shape[in_dim]} (dim {in_dim}) is not a multiple of {m}; exclude it or use nm_incompatible='dense'"
    )


def check_policy(incompatible: str) -> None:
    """``nm_incompatible`` must be one of :data:`INCOMPATIBLE_POLICIES`."""
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
    check_policy(incompatible)
    model = unwrap_model(model)
    targets = select_targets(model, include, exclude)
    owners = weight_owners(model, dict(targets))
    masks: dict[str, torch.Tensor] = {}
    for name, p in targets:
        owner = owners[name][0][0] if owners[name] else None
        dim = input_dim(owner, owners[name][0][1] if owners[name] else "weight")
        reason = incompatible_reason(p.shape, dim, pattern.m)
        if reason is not None:
            if incompatible == "error":
                raise_incompatible(name, p.shape, dim, pattern.m)
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


# ---------------------------------------------------------------------------------------------- checks


def nm_violating_groups(weight: torch.Tensor, n: int, m: int, in_dim: int = 1) -> int:
    """The number of groups of ``m`` along ``in_dim`` with more than ``n`` non-zeros (the input size
    must be a multiple of ``m``)."""
    groups, _ = nm_groups(weight.detach(), m, in_dim)
    return int(((groups != 0).sum(-1) > n).sum())


def check_nm(weight: torch.Tensor, n: int, m: int, in_dim: int = 1) -> bool:
    """Whether every group of ``m`` consecutive entries along ``in_dim`` has at most ``n`` non-zeros.

    A weight whose input size is not a multiple of ``m`` cannot hold the pattern: False. For a
    convolution the groups run over input channels at one kernel position (channels moved last).

    Raises:
        ConfigError: ``n``/``m`` invalid, or ``weight`` has fewer than 2 dims.
    """
    NMPattern(n, m)
    if weight.dim() < 2:
        raise ConfigError(f"N:M check needs a weight with >= 2 dims, got shape {tuple(weight.shape)}")
    if weight.shape[in_dim] % m:
        return False
    return nm_violating_groups(weight, n, m, in_dim) == 0


def nm_violations(
    model: nn.Module,
    n: int,
    m: int,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
) -> dict[str, int]:
    """Target weight -> number of groups of ``m`` with more than ``n`` non-zeros, for weights that break
    the pattern (empty when the whole model is N:M).

    Weights whose input size is not a multiple of ``m`` cannot be N:M at all and are not listed: the
    engine and :func:`one_shot_nm` keep those dense (:func:`check_nm` is False for them).
    """
    NMPattern(n, m)
    model = unwrap_model(model)
    dims = _input_dims(model)
    out = {}
    for name, p in select_targets(model, include, exclude):
        dim = dims.get(name, 1)
        if p.shape[dim] % m:
            continue
        bad = nm_violating_groups(p, n, m, dim)
        if bad:
            out[name] = bad
    return out


def _input_dims(model: nn.Module) -> dict[str, int]:
    dims = {}
    for mod_name, mod in model.named_modules():
        for attr in mod._parameters:
            dims[f"{mod_name}.{attr}" if mod_name else attr] = input_dim(mod, attr)
    return dims
