"""Model families behind one interface: latent diffusion on images, ChiroDiff on pen strokes.

:class:`~.base.Task` is the interface (:mod:`.base`); :func:`make_task` picks the family a config names.
"""

from __future__ import annotations

from pathlib import Path

from ..config import RunConfig
from ..errors import ConfigError
from .base import Samples, Sampling, Task, TrainData, to_uint8
from .latent import LatentDiffusionTask
from .strokes import StrokeDiffusionTask

#: every model family by its config name (``family:`` in a preset)
TASKS: dict[str, type[Task]] = {task.family: task for task in (LatentDiffusionTask, StrokeDiffusionTask)}


def make_task(cfg: RunConfig, run_dir: Path | None = None) -> Task:
    """The task of ``cfg.family``, bound to the run directory ``run_dir`` (None: not bound to a run)."""
    if cfg.family not in TASKS:
        raise ConfigError(f"unknown model family {cfg.family!r}; choose {' or '.join(TASKS)}")
    return TASKS[cfg.family](cfg, run_dir)


__all__ = [
    "TASKS",
    "LatentDiffusionTask",
    "Samples",
    "Sampling",
    "StrokeDiffusionTask",
    "Task",
    "TrainData",
    "make_task",
    "to_uint8",
]
