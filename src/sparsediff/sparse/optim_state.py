"""Optimiser state of sparse weights, for any ``torch.optim`` optimiser (no list of optimiser types).

Every state tensor shaped like its parameter (Adam's ``exp_avg`` / ``exp_avg_sq``, SGD's momentum, ...) is
per-entry state: where a weight is pruned or grown from zero, its state is zeroed too, so a grown weight
starts exactly as a weight that was never trained. Scalars (Adam's ``step``) are shared by the whole
tensor and left alone.
"""

from __future__ import annotations

from typing import Any

import torch


def state_tensors(optimizer: Any, p: torch.Tensor) -> list[torch.Tensor]:
    """The per-entry state tensors the optimiser holds for ``p`` (empty before its first step)."""
    if optimizer is None:
        return []
    state = optimizer.state.get(p)
    if not state:
        return []
    return [v for v in state.values() if torch.is_tensor(v) and v.shape == p.shape]


def zero_state_where(optimizer: Any, p: torch.Tensor, keep: torch.Tensor) -> None:
    """Zero every optimiser state tensor shaped like ``p`` wherever ``keep`` (0/1 or bool) is 0."""
    for value in state_tensors(optimizer, p):
        if value.is_floating_point() and keep.is_floating_point() and value.dtype == keep.dtype:
            value.mul_(keep)
        else:
            value.masked_fill_(keep.to(device=value.device, dtype=torch.bool).logical_not(), 0)
