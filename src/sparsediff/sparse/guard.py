"""Nothing trained is zeroed silently: the checks that stand between a mask and weights it did not make.

Two ways a mask could destroy trained weights, both refused with a :class:`StateError` that says how to
resume instead:

- weights written behind the engine's back (a checkpoint loaded into the model without the engine's state,
  whose masks and step count then are those of a fresh engine): :class:`WeightGuard` notices them by their
  version counters (the engine records them after each of its own writes; comparing integers costs
  microseconds per step) and :func:`refuse_pruned_writes` checks only the weights that changed;
- new random masks put on weights that are sparse already (a sparse run's checkpoint loaded before
  ``sparsify``): :func:`refuse_sparse_weights`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..errors import StateError

_RESTORE = (
    "restore the engine with the weights: sparsify(..., accelerator=accelerator) (or "
    "accelerator.register_for_checkpointing(engine)) before accelerator.load_state(), or "
    "engine.load_state_dict(state) / sparsediff.sparse.load_engine_state(engine, path)"
)


class WeightGuard:
    """The version counters of a set of weights after the engine's last write to them."""

    def __init__(self, params: Mapping[str, torch.Tensor], names: Sequence[str]):
        self._params = params
        self._names = names
        self._versions: list[int] | None = None  # None: every weight counts as changed

    def record(self) -> None:
        """Call after the engine wrote the weights (masked them, restored them)."""
        self._versions = [self._params[n]._version for n in self._names]

    def forget(self) -> None:
        """Count every weight as changed at the next :meth:`changed` (restored masks must be checked)."""
        self._versions = None

    def changed(self) -> list[str]:
        """Names of the weights written since :meth:`record` (all of them after :meth:`forget`)."""
        versions = self._versions
        if versions is None:
            return list(self._names)
        return [n for i, n in enumerate(self._names) if self._params[n]._version != versions[i]]


@torch.no_grad()
def refuse_pruned_writes(
    params: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor], names: Sequence[str]
) -> None:
    """Raise when a weight of ``names`` is non-zero where its mask (0/1, any dtype) prunes."""
    found = []
    for name in names:
        count = int(params[name].detach().ne(0).logical_and_(masks[name].eq(0)).count_nonzero())
        if count:
            found.append((name, count))
    if found:
        name, count = found[0]
        total = sum(c for _, c in found)
        raise StateError(
            f"layer {name!r} has {count} non-zero weights at positions its mask prunes ({total} in "
            f"{len(found)} layer(s)): the weights were changed outside the engine, as when a checkpoint "
            "is loaded into the model without the engine's state (masks, step count, update schedule). "
            f"This optimiser step would zero them, so it was refused. To resume, {_RESTORE}. To prune "
            "the new weights with the current masks on purpose, call engine.apply_masks() first."
        )


@torch.no_grad()
def refuse_sparse_weights(
    params: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
    budgets: Mapping[str, int],
    names: Sequence[str],
) -> None:
    """Refuse new random masks that would zero weights which already look sparse-trained.

    A layer with at least as many exact zeros as its mask prunes (random or pretrained dense weights
    have next to none) is sparse already, as when a sparse run's checkpoint was loaded before
    ``sparsify``; putting other masks on it would destroy trained weights.
    """
    bad = []
    for name in names:
        p, numel, budget = params[name].detach(), params[name].numel(), budgets[name]
        zeros = numel - int(p.count_nonzero())
        if budget >= numel or zeros < numel - budget:
            continue
        lost = int(p.ne(0).logical_and_(masks[name].eq(0)).count_nonzero())
        if lost:
            bad.append((name, zeros, lost))
    if bad:
        name, zeros, lost = bad[0]
        more = f" (and {len(bad) - 1} more layer(s))" if len(bad) > 1 else ""
        raise StateError(
            f"sparsify() would zero trained weights: layer {name!r} already has {zeros} of "
            f"{params[name].numel()} weights at exactly 0, as a sparse run's weights have, and new "
            f"random masks would zero {lost} of its non-zero weights{more}. To resume a sparse run, "
            "restore the engine's state instead of making new masks: sparsify() before loading, then "
            "accelerator.load_state() with the engine registered (sparsify(..., accelerator=acc)), "
            "engine.load_state_dict(state) or sparsediff.sparse.load_engine_state(engine, path). To keep "
            "the sparsity these weights have, pass masks='weights'. To prune them with new random masks "
            "on purpose, load them after sparsify() and call engine.apply_masks()."
        )
