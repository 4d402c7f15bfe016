"""What a sweep runs: its parameters, the grid of runs, each run's configuration, ``sweep.json``.

A :class:`SweepSpec` holds everything ``sparsediff sweep`` is given, declared once: :func:`expand_grid`
turns it into :class:`GridPoint` s (``rigl-s0.9-p0.05-seed0``; dense once per seed; static ignores the
prune ratio), :func:`plan_runs` resolves each point's configuration and run directory, and
:meth:`SweepSpec.command` gives the command line that reproduces the sweep (recorded in ``sweep.json``).
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import RunConfig, deep_update, flatten, load_config, parse_overrides
from ..errors import ConfigError
from ..sparse.methods import REGISTRY, is_dense
from ..sparse.spec import DYNAMIC_METHODS, UNSTRUCTURED_METHODS
from ..watch import check_watch_settings

__all__ = [
    "DYNAMIC_METHODS",
    "GRID_KEYS",
    "MANIFEST",
    "SWEEP_METHODS",
    "GridPoint",
    "PlannedRun",
    "SweepSpec",
    "expand_grid",
    "override_args",
    "override_dict",
    "plan_runs",
    "write_manifest",
]

# A sweep trains from scratch: the unstructured methods (N:M methods fine-tune: `sparsediff finetune`).
SWEEP_METHODS = UNSTRUCTURED_METHODS
# Keys a sweep sets on every run (the grid); --set may not change them.
GRID_KEYS = ("sparse.method", "sparse.sparsity", "sparse.prune_ratio", "sparse.seed", "train.seed")
MANIFEST = "sweep.json"
CONFIGS = "configs"

Overrides = dict[str, Any] | Sequence[str] | None


# ---------------------------------------------------------------------------- overrides


def override_dict(overrides: Overrides) -> dict[str, Any]:
    """``overrides`` as a nested dict: a deep copy of a dict, or parsed ``section.key=value`` items."""
    if overrides is None:
        return {}
    if isinstance(overrides, dict):
        return json.loads(json.dumps(overrides))  # a deep copy of plain data
    return parse_overrides(list(overrides))


def override_args(overrides: Overrides) -> list[str]:
    """``overrides`` as ``section.key=value`` items, as ``--set`` takes them."""
    if overrides is None:
        return []
    if not isinstance(overrides, dict):
        return [str(x) for x in overrides]
    return [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in flatten(overrides).items()]


# ---------------------------------------------------------------------------- the parameters


@dataclass(frozen=True)
class SweepSpec:
    """The parameters of a sweep (the options of ``sparsediff sweep``).

    Args:
        preset: preset name or YAML path.
        methods: subset of ``dense, static, rigl, magran``.
        sparsities: global sparsities of the sparse methods, each in (0, 1).
        prune_ratios: initial prune/regrow fractions of rigl and magran (static ignores them).
        seeds: one run per seed (seeds the weights, the data order, the timesteps and the masks).
        out: the sweep directory.
        jobs: runs at a time; above 1 each run is ``python -m sparsediff train/evaluate`` subprocesses
            with the CPU threads split between them (and GPUs assigned round-robin), logging to
            ``RUN/train.log`` and ``RUN/evaluate.log``.
        steps: optimiser steps per run (``train.max_steps``); default: the preset's.
        overrides: nested dict or ``["section.key=value", ...]`` applied to every run.
        eval_samples: generated samples for FID (default: the preset's ``eval.num_samples``).
        first_stage: first-stage directory of latent presets (default: the preset's, else one trained
            once into ``out/first-stage``).
        fid_weights: the standard Inception weights file, for Inception FID.
        report_to: trackers every run logs to (``train.report_to``: tensorboard, wandb, all), its
            evaluation too; each run is its own tracker run, named by its grid point and grouped by the
            sweep directory's name (``train.tracker_name`` / ``train.tracker_group`` unless set).
    """

    preset: str
    methods: Sequence[str]
    sparsities: Sequence[float]
    prune_ratios: Sequence[float] | None
    seeds: Sequence[int]
    out: str | Path
    jobs: int = 1
    steps: int | None = None
    overrides: Overrides = None
    eval_samples: int | None = None
    first_stage: str | Path | None = None
    fid_weights: str | None = None
    report_to: str | None = None

    def points(self) -> list[GridPoint]:
        """The grid's points (see :func:`expand_grid`)."""
        return expand_grid(self.methods, self.sparsities, self.prune_ratios, self.seeds)

    def grid(self) -> dict[str, Any]:
        """The grid as ``sweep.json`` records it."""
        return {
            "methods": list(dict.fromkeys(self.methods)),
            "sparsities": list(self.sparsities),
            "prune_ratios": list(self.prune_ratios or []),
            "seeds": list(self.seeds),
        }

    def command(self) -> str:
        """The ``sparsediff sweep`` command line equivalent to these parameters."""

        def join(xs: Iterable[Any]) -> str:
            return ",".join(f"{x:g}" if isinstance(x, float) else str(x) for x in xs)

        cmd = ["sparsediff", "sweep", "--preset", str(self.preset), "--methods", join(self.methods)]
        if self.sparsities:
            cmd += ["--sparsities", join(self.sparsities)]
        if self.prune_ratios:
            cmd += ["--prune-ratios", join(self.prune_ratios)]
        cmd += ["--seeds", join(self.seeds), "--out", str(self.out)]
        if self.jobs != 1:
            cmd += ["--jobs", str(self.jobs)]
        options = (
            ("--steps", self.steps),
            ("--eval-samples", self.eval_samples),
            ("--first-stage", self.first_stage),
            ("--fid-weights", self.fid_weights),
            ("--report-to", self.report_to),
        )
        for flag, value in options:
            if value is not None:
                cmd += [flag, str(value)]
        for item in override_args(self.overrides):
            cmd += ["--set", item]
        return shlex.join(cmd)


# ---------------------------------------------------------------------------- the grid


@dataclass(frozen=True)
class GridPoint:
    """One run of a sweep: a method, its sparsity and prune ratio (None where unused), a seed."""

    method: str
    sparsity: float
    prune_ratio: float | None
    seed: int

    @property
    def name(self) -> str:
        """Stable, readable run-directory name: ``dense-seed0``, ``static-s0.5-seed0``, ``rigl-s0.9-p0.05-seed1``."""
        parts = [self.method]
        if not is_dense(self.method):
            parts.append(f"s{self.sparsity:g}")
        if self.prune_ratio is not None:
            parts.append(f"p{self.prune_ratio:g}")
        parts.append(f"seed{self.seed}")
        return "-".join(parts)

    def overrides(self) -> dict[str, Any]:
        """Config overrides of this point (the seed drives both the weights/data and the masks)."""
        sparse: dict[str, Any] = {"method": self.method, "sparsity": self.sparsity, "seed": self.seed}
        if self.prune_ratio is not None:
            sparse["prune_ratio"] = self.prune_ratio
        return {"sparse": sparse, "train": {"seed": self.seed}}


def expand_grid(
    methods: Sequence[str],
    sparsities: Sequence[float],
    prune_ratios: Sequence[float] | None,
    seeds: Sequence[int],
) -> list[GridPoint]:
    """All points of the grid, seed by seed: dense once per seed, static once per sparsity, RigL and
    MagRan once per sparsity and prune ratio.

    Raises:
        ConfigError: an unknown method, a sparsity outside (0, 1), a prune ratio outside (0, 1], a
            negative seed, or a sparse method without sparsities (or a dynamic one without prune ratios).
    """
    methods = list(dict.fromkeys(m.strip().lower() for m in methods))
    unknown = [m for m in methods if m not in SWEEP_METHODS]
    if unknown:
        structured = [m for m in unknown if m in REGISTRY and REGISTRY[m].structured]
        hint = (
            f" ({structured[0]} makes a pretrained model N:M-sparse: use `sparsediff finetune`)"
            if structured
            else ""
        )
        raise ConfigError(
            f"unknown sweep method {unknown[0]!r}; choose from {', '.join(SWEEP_METHODS)}{hint}"
        )
    if not methods:
        raise ConfigError("the sweep needs at least one method")
    sparsities = list(dict.fromkeys(float(s) for s in sparsities))
    prunes = list(dict.fromkeys(float(p) for p in prune_ratios or []))
    seeds = list(dict.fromkeys(int(s) for s in seeds))
    for s in sparsities:
        if not 0.0 < s < 1.0:
            raise ConfigError(f"sparsity must be in (0, 1), got {s:g} (dense is its own method)")
    for p in prunes:
        if not 0.0 < p <= 1.0:
            raise ConfigError(f"prune ratio must be in (0, 1], got {p:g}")
    if not seeds or any(s < 0 for s in seeds):
        raise ConfigError(f"seeds must be one or more whole numbers >= 0, got {seeds}")
    sparse = [m for m in methods if not is_dense(m)]
    if sparse and not sparsities:
        raise ConfigError(f"method(s) {', '.join(sparse)} need --sparsities")
    dynamic = [m for m in methods if REGISTRY[m].dynamic]
    if dynamic and not prunes:
        raise ConfigError(f"method(s) {', '.join(dynamic)} need --prune-ratios")
    points = []
    for seed in seeds:
        for method in methods:
            if is_dense(method):
                points.append(GridPoint(method, 0.0, None, seed))
                continue
            for s in sparsities:
                for p in prunes if REGISTRY[method].dynamic else [None]:
                    points.append(GridPoint(method, s, p, seed))
    return points


# ---------------------------------------------------------------------------- each run's configuration


def overrides_for_method(overrides: dict[str, Any], method: str) -> dict[str, Any]:
    """A copy of a sweep's ``overrides`` for its runs of ``method``: ``sparse.backend`` is the sparse methods' setting
    (``--set sparse.backend=sparse`` trains a sweep's sparse runs on compact layers), so a dense run of the
    same sweep trains plainly instead of being refused."""
    data = json.loads(json.dumps(overrides))
    if is_dense(method) and isinstance(data.get("sparse"), dict):
        data["sparse"].pop("backend", None)
    return data


@dataclass
class PlannedRun:
    """A grid point with its resolved configuration and run directory."""

    point: GridPoint
    cfg: RunConfig
    run_dir: Path
    config_file: Path


def plan_runs(
    preset: str,
    points: Sequence[GridPoint],
    out: str | Path,
    steps: int | None = None,
    overrides: Overrides = None,
    first_stage: str | Path | None = None,
    report_to: str | None = None,
) -> list[PlannedRun]:
    """Resolve every point's configuration (preset + ``overrides`` + steps + first stage + the point).

    Each run is named on a dashboard by its point (``rigl-s0.9-p0.05-seed1``) and grouped by the sweep
    directory's name, unless ``overrides`` name them; ``report_to`` sets ``train.report_to``.

    Raises:
        ConfigError: a bad preset or override (naming the key), an override of a key the grid sets, or
            watch settings a run could not start with (a tracker that is not installed).
    """
    out = Path(out).resolve()
    base = override_dict(overrides)
    clash = sorted(k for k in flatten(base) if k in GRID_KEYS)
    if clash:
        raise ConfigError(
            f"--set {clash[0]} conflicts with the grid; use --methods / --sparsities / --prune-ratios / --seeds"
        )
    if steps is not None:
        if steps < 1:
            raise ConfigError(f"--steps must be >= 1, got {steps}")
        deep_update(base, {"train": {"max_steps": int(steps)}})
    if first_stage is not None:
        deep_update(base, {"first_stage": {"path": str(Path(first_stage).resolve())}})
    if report_to is not None:
        deep_update(base, {"train": {"report_to": report_to}})
    given = base.get("train", {})
    planned = []
    for point in points:
        data = deep_update(overrides_for_method(base, point.method), point.overrides())
        naming = {"tracker_name": given.get("tracker_name") or point.name}
        naming["tracker_group"] = given.get("tracker_group") or out.name
        deep_update(data, {"train": naming})
        cfg = load_config(preset, data)
        check_watch_settings(cfg)  # grids and trackers too, before anything trains
        planned.append(PlannedRun(point, cfg, out / point.name, out / CONFIGS / f"{point.name}.yaml"))
    return planned


# ---------------------------------------------------------------------------- sweep.json


def write_manifest(spec: SweepSpec, runs: Sequence[PlannedRun], first_stage: str | None) -> Path:
    """Write ``OUT/sweep.json`` atomically: the grid, the settings, the command that reproduces the sweep,
    one entry per run, and earlier invocations' commands under ``history``."""
    out = Path(spec.out).resolve()
    path = out / MANIFEST
    try:
        previous = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        previous = {}
    previous = previous if isinstance(previous, dict) else {}
    history = list(previous.get("history", []))
    if previous.get("command"):
        history.append({"command": previous["command"], "started": previous.get("started")})
    manifest = {
        "preset": spec.preset,
        "grid": spec.grid(),
        "steps": spec.steps,
        "overrides": override_args(spec.overrides),
        "eval_samples": spec.eval_samples,
        "first_stage": first_stage,
        "fid_weights": spec.fid_weights,
        "jobs": spec.jobs,
        "command": spec.command(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "runs": [
            {
                "name": r.point.name,
                "dir": r.point.name,
                "config": str(r.config_file.relative_to(out)),
                "method": r.point.method,
                "sparsity": r.point.sparsity,
                "prune_ratio": r.point.prune_ratio,
                "seed": r.point.seed,
            }
            for r in runs
        ],
        "history": history[-20:],
    }
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.replace(path)
    return path
