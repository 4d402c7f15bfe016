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


def _kth_largest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest value of a 1-D tensor (1 <= k <= numel).

    ``topk`` over a multi-million-entry tensor is the slowest part of an update on the CPU. For large
    tensors a threshold is first read off a strided sample, set low enough that usually a little more than
    k entries pass it; whenever at least k pass, they contain a true top k, and ``topk`` runs on them only.
    Otherwise it falls back to ``topk`` over everything. Deterministic: no randomness is involved.
    """
    n = scores.numel()
    if n >= 1_000_000 and k <= n // 4:
        sample = scores[:: max(1, n // 65_536)]
        m = sample.numel()
        share = k / n
        # ask the sample for ~1.3x the wanted share plus four binomial standard deviations
        j = min(m, math.ceil(m * share * 1.3 + 4.0 * math.sqrt(m * share) + 1))
        threshold = torch.topk(sample, j, sorted=False).values.min()
        passed = scores[scores >= threshold]
        if passed.numel() >= k:
            return torch.topk(passed, k, sorted=False).values.min()
    return torch.topk(scores, k, sorted=False).values.min()


def largest_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the k largest entries of a 1-D tensor, ties going to the lower position (exact).

    The tie rule makes the choice a function of the scores alone, whatever order a layer keeps its
    weights in: the masked-dense and the compact backend choose the same positions from the same scores
    (a layer's just-grown weights are all exactly 0, so ties are common). Sorted by position.
    """
    n = scores.numel()
    if k <= 0:
        return torch.empty(0, dtype=torch.long, device=scores.device)
    if k >= n:
        return torch.arange(n, device=scores.device)
    v = _kth_largest(scores, k)
    above = scores > v
    ties = (scores == v).nonzero().squeeze(1)
    chosen = above.clone()
    chosen[ties[: k - int(above.count_nonzero())]] = True
    out = chosen.nonzero().squeeze(1)
    if out.numel() != k:  # NaN scores compare unequal to everything: take topk's choice among them
        out = torch.topk(scores, k, sorted=False).indices.sort().values
    return out


def drop_and_grow(
    active: torch.Tensor, magnitude: torch.Tensor, grow_score: torch.Tensor, k: int
) -> torch.Tensor:
    """The new flat bool mask of one layer.

    Args:
        active: flat bool mask of the active positions before the update.
        magnitude: ``|w|`` at every position (flat; only the active ones are read).
        grow_score: float score of every position (flat; overwritten in place).
        k: weights to drop and grow (at most the number of active positions).
    """
    drop_score = torch.where(active, magnitude.float().neg(), -math.inf)  # the smallest |w| score highest
    kept = active.clone()
    kept[largest_k(drop_score, k)] = False
    grow_score.masked_fill_(kept, -math.inf)
    kept[largest_k(grow_score, k)] = True
    return kept
