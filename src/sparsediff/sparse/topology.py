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


def _top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``topk``'s (values, positions) of the k largest entries of a 1-D tensor (1 <= k <= numel), in no
    particular order.

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
        passed = (scores >= threshold).nonzero().squeeze(1)
        if passed.numel() >= k:
            top = torch.topk(scores[passed], k, sorted=False)
            return top.values, passed[top.indices]
    top = torch.topk(scores, k, sorted=False)
    return top.values, top.indices


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
    values, positions = _top_k(scores, k)
    v = values.min()
    if int((values == v).sum()) == int((scores == v).sum()):  # no tie left out: topk's set is the one
        return positions.sort().values
    above = scores > v
    ties = (scores == v).nonzero().squeeze(1)
    chosen = above.clone()
    chosen[ties[: k - int(above.count_nonzero())]] = True
    out = chosen.nonzero().squeeze(1)
    if out.numel() != k:  # NaN scores compare unequal to everything: take topk's choice among them
        out = positions.sort().values
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
    positions = active.nonzero().squeeze(1)  # ascending: a tie among them goes to the lower position
    kept = active.clone()
    kept[positions[largest_k(magnitude[positions].float().neg(), k)]] = False  # the smallest |w|
    grow_score.masked_fill_(kept, -math.inf)
    kept[largest_k(grow_score, k)] = True
    return kept


class GrowCapture:
    """What a RigL update needs from one layer's dense gradient, kept without the gradient itself.

    On an update step a compact layer's backward computes its dense weight gradient ``G`` (which the
    sparse backward never forms) and hands it to :meth:`add`. Growth takes the ``k`` best-scoring
    positions among those not kept after the drop, which are the inactive ones and the dropped ones; so it
    is enough to keep the ``k`` best inactive positions (with their scores, ties going to the lower
    position, as :func:`largest_k` breaks them) and the score of every active position. :meth:`grow_score`
    rebuilds from these a dense score under which :func:`drop_and_grow` grows exactly what it grows on the
    full dense gradient. The layer's dense gradient is alive only during its own backward: the model's
    dense gradients are never held together.

    With gradient accumulation (``accumulate``), the micro-batches' gradients must be summed before any
    choice: then the dense gradient is kept (summed) until :meth:`finish`, at the optimiser step. With a
    process group, the gradient is all-reduced first (averaged, as data-parallel training averages
    gradients) so every rank scores the same gradient.

    Args:
        numel: entries of the dense weight.
        k: positions to keep candidates for (the update's drop count).
        score: dense gradient (flat) -> grow score (flat float32): the method's ``grow_score``.
        accumulate: sum several backward passes before choosing.
        all_reduce: a function averaging a tensor over data-parallel ranks in place (None: one process).
    """

    def __init__(self, numel: int, k: int, score, accumulate: bool = False, all_reduce=None):
        self.numel, self.k, self._score = numel, k, score
        self.accumulate = accumulate
        self._all_reduce = all_reduce
        self._sum: torch.Tensor | None = None
        self._active: torch.Tensor | None = None
        self.candidates: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # pos, score, active
        self.passes = 0

    def add(self, grad: torch.Tensor, active: torch.Tensor) -> None:
        """Take one backward pass's dense gradient (flat) of a layer whose values sit at ``active``."""
        self.passes += 1
        if self.accumulate:
            g = grad.detach().float()
            self._sum = g.clone() if self._sum is None else self._sum.add_(g)
            self._active = active
            return
        if self.candidates is not None:
            raise RuntimeError(
                "a RigL update step saw a second backward pass before the optimiser step (gradient "
                "accumulation): build the engine with grad_accum=N (sparsify(..., grad_accum=N), or pass "
                "the accelerator), so that the dense gradients of the micro-batches are summed first"
            )
        self._choose(grad.detach().float().clone(), active)

    def finish(self) -> None:
        """Choose from the summed gradient (gradient accumulation; a no-op otherwise)."""
        if self._sum is not None:
            grad, self._sum = self._sum, None
            self._choose(grad, self._active)

    def _choose(self, grad: torch.Tensor, active: torch.Tensor) -> None:
        if self._all_reduce is not None:
            self._all_reduce(grad)
        score = self._score(grad)
        active_score = score.index_select(0, active)
        score.index_fill_(0, active.long(), -math.inf)
        pos = largest_k(score, min(self.k, self.numel))
        self.candidates = (pos, score[pos], active_score)

    def grow_score(self, active: torch.Tensor) -> torch.Tensor:
        """The dense grow score (flat) for the layer whose values sit at ``active`` (the same positions
        as at :meth:`add`): the captured scores, -inf where nothing can be grown."""
        if self.candidates is None:
            raise RuntimeError("RigL update without a captured dense gradient: no backward pass on this step")
        pos, cand, active_score = self.candidates
        out = torch.full((self.numel,), -math.inf, dtype=torch.float32, device=cand.device)
        out[pos] = cand
        out[active] = active_score
        return out
