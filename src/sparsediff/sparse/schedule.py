"""When topology updates happen and how many weights each one moves."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ConfigError

DECAYS = ("cosine", "constant")
NEVER = "never"


@dataclass(frozen=True)
class UpdateSchedule:
    """Drop/grow schedule in optimiser steps.

    Args:
        prune_ratio: fraction ``p0`` of the active weights of a layer moved at the first update, in (0, 1].
        update_every: ``Delta T``, optimiser steps between topology updates.
        end_step: last optimiser step at which an update may happen; ``None`` means never stop
            (only with ``decay="constant"``, since cosine decay needs an end).
        decay: ``"cosine"``: ``p(t) = p0 / 2 * (1 + cos(pi * t / end_step))``; ``"constant"``: ``p(t) = p0``.
    """

    prune_ratio: float = 0.3
    update_every: int = 100
    end_step: int | None = None
    decay: str = "cosine"

    def __post_init__(self) -> None:
        if not isinstance(self.prune_ratio, (int, float)) or not (0.0 < self.prune_ratio <= 1.0):
            raise ConfigError(f"prune ratio must be in (0, 1], got {self.prune_ratio!r}")
        if (
            not isinstance(self.update_every, int)
            or isinstance(self.update_every, bool)
            or self.update_every < 1
        ):
            raise ConfigError(
                f"update_every must be a positive whole number of steps, got {self.update_every!r}"
            )
        if self.decay not in DECAYS:
            raise ConfigError(f"unknown prune-ratio decay {self.decay!r}; choose one of {', '.join(DECAYS)}")
        if self.end_step is not None and (not isinstance(self.end_step, int) or self.end_step < 0):
            raise ConfigError(
                f"end_step must be a non-negative whole number of steps or 'never', got {self.end_step!r}"
            )
        if self.end_step is None and self.decay == "cosine":
            raise ConfigError(
                "cosine decay of the prune ratio needs an end_step (or total_steps); "
                "use decay='constant' to update forever"
            )

    def is_update_step(self, step: int) -> bool:
        """Whether a topology update follows optimiser step ``step`` (1-based). Not at a step whose drop
        fraction is 0 (cosine decay reaches 0 at ``end_step``): such an update would move nothing."""
        if step <= 0 or step % self.update_every:
            return False
        if self.end_step is not None and step > self.end_step:
            return False
        return self.drop_fraction(step) > 0.0

    def drop_fraction(self, step: int) -> float:
        if self.decay == "constant":
            return self.prune_ratio
        t = min(step, self.end_step) / max(self.end_step, 1)
        return self.prune_ratio / 2.0 * (1.0 + math.cos(math.pi * t))


def resolve_end_step(end_step: int | str | None, total_steps: int | None, end_fraction: float) -> int | None:
    """Turn the user's ``end_step`` / ``total_steps`` into a step number, or ``None`` for never."""
    if end_step == NEVER or (isinstance(end_step, float) and math.isinf(end_step)):
        return None
    if end_step is not None:
        if isinstance(end_step, bool) or not isinstance(end_step, int) or end_step < 0:
            raise ConfigError(
                f"end_step must be a non-negative whole number of steps or 'never', got {end_step!r}"
            )
        return end_step
    if total_steps is not None:
        if not (0.0 < end_fraction <= 1.0):
            raise ConfigError(f"end_fraction must be in (0, 1], got {end_fraction!r}")
        return int(end_fraction * total_steps)
    raise ConfigError(
        "dynamic sparse training needs end_step=N, end_step='never' or total_steps=N "
        "(updates then stop at end_fraction * total_steps)"
    )
