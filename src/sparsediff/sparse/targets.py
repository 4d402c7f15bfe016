"""Which parameters of a model the engine makes sparse.

By default every weight with two or more dimensions: Linear, Conv1d/2d/3d and transposed convolutions,
attention projections (including ``nn.MultiheadAttention.in_proj_weight``) and recurrent matrices
(``weight_ih_l*`` / ``weight_hh_l*``). One-dimensional tensors (biases, norms) stay dense, and so do
``nn.Embedding`` tables, which are lookups rather than products.

Patterns are shell-style globs matched against the full parameter name (``*`` also matches dots), or
regular expressions when prefixed with ``re:``. Every pattern must match at least one parameter name:
a pattern that matches nothing is almost always a typo, so it is an error.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence

from torch import nn

from ..errors import ConfigError


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the user's module inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def _compile(pattern: str):
    if not isinstance(pattern, str) or not pattern:
        raise ConfigError(f"layer pattern must be a non-empty string, got {pattern!r}")
    if pattern.startswith("re:"):
        try:
            rx = re.compile(pattern[3:])
        except re.error as e:
            raise ConfigError(f"invalid regular expression in layer pattern {pattern!r}: {e}") from None
        return lambda name: rx.search(name) is not None
    return lambda name: fnmatch.fnmatchcase(name, pattern)


def as_list(patterns: str | Iterable[str] | None) -> list[str]:
    """Layer patterns as a list: None -> [], ``"a, b"`` -> ``["a", "b"]``, a sequence -> its list."""
    if patterns is None:
        return []
    if isinstance(patterns, str):
        return [p for p in (s.strip() for s in patterns.split(",")) if p]
    return list(patterns)


def _embedding_params(model: nn.Module) -> set[str]:
    names = set()
    for mod_name, mod in model.named_modules():
        if isinstance(mod, (nn.Embedding, nn.EmbeddingBag)):
            for p_name, _ in mod.named_parameters(recurse=False):
                names.add(f"{mod_name}.{p_name}" if mod_name else p_name)
    return names


def select_targets(
    model: nn.Module,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
) -> list[tuple[str, nn.Parameter]]:
    """List ``(name, parameter)`` pairs to sparsify, in the model's parameter order.

    Args:
        model: any module (wrappers such as DDP are looked through).
        include: if given, only candidate parameters matching one of these patterns are targets.
        exclude: candidate parameters matching one of these patterns stay dense.

    Raises:
        ConfigError: a pattern matches no parameter, or nothing is left to sparsify.
    """
    model = unwrap_model(model)
    include_l, exclude_l = as_list(include), as_list(exclude)
    named = list(model.named_parameters())
    all_names = [n for n, _ in named]
    for pat in include_l + exclude_l:
        match = _compile(pat)
        if not any(match(n) for n in all_names):
            raise ConfigError(
                f"layer pattern {pat!r} matches no parameter of {type(model).__name__} "
                f"(parameter names look like {all_names[0]!r})"
                if all_names
                else f"layer pattern {pat!r} matches nothing: the model has no parameters"
            )
    inc = [_compile(p) for p in include_l]
    exc = [_compile(p) for p in exclude_l]
    embeddings = _embedding_params(model)
    targets = []
    for name, p in named:
        if p.dim() < 2 or name in embeddings:
            continue
        if inc and not any(m(name) for m in inc):
            continue
        if any(m(name) for m in exc):
            continue
        targets.append((name, p))
    if not targets:
        raise ConfigError(
            f"nothing to sparsify in {type(model).__name__}: no parameter with >= 2 dimensions is left "
            f"after include={include_l or None} and exclude={exclude_l or None}"
        )
    return targets
