"""One topology update of one layer, as pure functions over flat tensors: drop, then grow.

Per layer, with ``k = floor(p(t) * budget)``: drop the ``k`` active weights of smallest magnitude, then
grow ``k`` positions among those not kept (largest grow score: the dense gradient's magnitude for RigL,
a seeded random draw for MagRan). Kept and grown sets are disjoint, so each layer keeps exactly its
budget; a position dropped by this update may be grown again (it then keeps its value and state).

These functions know nothing of how a layer holds its weights: the engine hands them the active
positions and scores of one layer at a time and applies the result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


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


def drop_count(fraction: float, budget: int) -> int:
    """How many of a layer's ``budget`` active weights an update at drop fraction ``fraction`` moves."""
    return math.floor(fraction * budget)


def largest_k(scores: torch.Tensor, k: int) -> torch.Tensor:
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


def drop_and_grow(
    active_idx: torch.Tensor, magnitude: torch.Tensor, grow_score: torch.Tensor, k: int
) -> torch.Tensor:
    """The new flat bool mask of one layer.

    Args:
        active_idx: flat positions of the active weights before the update (int64, any order).
        magnitude: ``|w|`` of those weights, in the same order.
        grow_score: float score of every position of the layer (flat; overwritten in place).
        k: weights to drop and grow (at most the number of active positions).
    """
    kept = torch.zeros(grow_score.numel(), dtype=torch.bool, device=grow_score.device)
    kept[active_idx] = True
    kept[active_idx[largest_k(magnitude.float().neg_(), k)]] = False
    grow_score.masked_fill_(kept, -math.inf)
    kept[largest_k(grow_score, k)] = True
    return kept
