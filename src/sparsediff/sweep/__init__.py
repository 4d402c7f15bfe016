"""The paper's grid with one command: ``sparsediff sweep``.

A sweep expands methods x sparsities x prune ratios x seeds into one run directory per point
(``rigl-s0.9-p0.05-seed0``; dense once per seed; static ignores the prune ratio), trains and evaluates
each, and can be stopped and started again at any moment: a finished and evaluated run is never
repeated, an interrupted one resumes from its latest checkpoint, and a run whose evaluation is older
than its last checkpoint is evaluated again. ``sparsediff report`` (:mod:`sparsediff.report`) then
reads the run directories.

- :mod:`.plan`: what to run (:class:`SweepSpec`, the grid, each run's configuration, ``sweep.json``);
- :mod:`.runner`: running it (the state of each run directory, the shared first stage, subprocesses).

Layout of a sweep directory::

    OUT/sweep.json              the grid, the command that reproduces it, earlier invocations
    OUT/configs/<run>.yaml      the exact configuration of every run
    OUT/first-stage/            the shared first stage, when the sweep had to train one
    OUT/<run>/                  one run directory per grid point (+ train.log / evaluate.log with --jobs > 1)
"""

from .plan import (
    DYNAMIC_METHODS,
    GRID_KEYS,
    SWEEP_METHODS,
    GridPoint,
    PlannedRun,
    SweepSpec,
    expand_grid,
    plan_runs,
)
from .runner import RunStatus, cpu_count, resolve_first_stage, run_status, sweep

__all__ = [
    "DYNAMIC_METHODS",
    "GRID_KEYS",
    "SWEEP_METHODS",
    "GridPoint",
    "PlannedRun",
    "RunStatus",
    "SweepSpec",
    "cpu_count",
    "expand_grid",
    "plan_runs",
    "resolve_first_stage",
    "run_status",
    "sweep",
]
