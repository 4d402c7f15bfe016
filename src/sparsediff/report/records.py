"""Reading run directories for a report: one :class:`RunRecord` per run, grouped into table rows.

Only run directories are read (the config, summary, evaluation and metrics files of
:class:`~sparsediff.run.RunDir`); a torn last line of the metrics, steps logged twice by a resumed run
and a missing evaluation are tolerated.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..run import RunDir
from ..sparse.methods import REGISTRY, SparseMethod, is_dense

# Reports list the unstructured methods first, then the N:M ones, a baseline without training (one-shot
# pruning) before fine-tuning: dense, static, rigl, magran, oneshot, srste.
METHOD_ORDER = {
    name: i
    for i, name in enumerate(sorted(REGISTRY, key=lambda n: (REGISTRY[n].structured, REGISTRY[n].has_engine)))
}


def method_of(name: str) -> SparseMethod | None:
    """The registered method of a run (None for a name no method has: a hand-edited or foreign config)."""
    return REGISTRY.get(name)


def unique(values: Iterable[Any]) -> list[Any]:
    """The values in first-seen order, each once."""
    out: list[Any] = []
    for v in values:
        if v not in out:
            out.append(v)
    return out


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1); the std is None for a single value."""
    vals = [float(v) for v in values]
    if not vals:
        return math.nan, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None)


def ratio(a: Any, b: Any) -> float | None:
    """``a / b``, or None when either is missing or ``b`` is 0."""
    if a is None or b in (None, 0):
        return None
    return float(a) / float(b)


# ---------------------------------------------------------------------------- one run


@dataclass
class RunRecord:
    """Everything a report knows about one run directory."""

    path: Path
    config: dict[str, Any]
    summary: dict[str, Any] | None
    eval: dict[str, Any] | None
    metrics: list[dict[str, Any]]
    bad_metric_lines: int
    preset: str
    method: str
    sparsity: float
    prune_ratio: float | None
    seed: int

    @property
    def finished(self) -> bool:
        return bool(self.summary and self.summary.get("finished"))

    @property
    def fid(self) -> tuple[str, float] | None:
        fid = (self.eval or {}).get("fid") or {}
        if isinstance(fid, dict) and "metric" in fid and isinstance(fid.get("value"), (int, float)):
            return str(fid["metric"]), float(fid["value"])
        return None

    @property
    def backend(self) -> str:
        """How the run trained its sparse weights: ``dense`` (masked dense tensors) or ``sparse``."""
        return str((self.config.get("sparse") or {}).get("backend") or "dense")

    @property
    def series(self) -> str:
        """Label of the method (and prune ratio, and a sparse training backend) this run belongs to:
        ``rigl p=0.05``, ``rigl p=0.5 (sparse backend)``."""
        method = method_of(self.method)
        if method is not None and method.structured:
            nm = self.config.get("sparse", {}).get("nm", "")
            return f"{self.method} {nm}".strip()
        label = self.method if self.prune_ratio is None else f"{self.method} p={self.prune_ratio:g}"
        return label + (" (sparse backend)" if self.backend == "sparse" else "")

    def get(self, key: str) -> Any:
        """A number from the evaluation, else the summary."""
        for src in (self.eval, self.summary):
            if src and src.get(key) is not None:
                return src[key]
        return None

    # -- ratios to the same model dense (None where a number is missing)
    @property
    def nonzero_ratio(self) -> float | None:
        return ratio(self.get("params_nonzero"), self.get("params_total"))

    @property
    def inference_ratio(self) -> float | None:
        s = self.summary or {}
        if s.get("flops_forward_dense"):
            return ratio(s.get("flops_forward_sparse"), s["flops_forward_dense"])
        e = self.eval or {}
        return ratio(e.get("flops_per_step_sparse"), e.get("flops_per_step_dense"))

    @property
    def train_flops_ratio(self) -> float | None:
        return ratio(self.get("flops_train_total"), self.get("flops_train_total_dense"))

    @property
    def checkpoint_bytes(self) -> int | None:
        """Bytes on disk of the run's checkpoint directory (evaluation, else summary)."""
        return self.get("checkpoint_bytes")

    @property
    def model_bytes(self) -> int | None:
        """Bytes of the run's sparse float32 export (``export --format sparse``; from the evaluation)."""
        return (self.eval or {}).get("model_bytes")

    @property
    def train_seconds(self) -> float | None:
        v = self.get("train_seconds")
        return None if v is None else float(v)


def find_runs(dirs: Sequence[str | Path]) -> list[Path]:
    """Run directories (a config next to a summary, metrics, an evaluation or checkpoints; see
    :meth:`RunDir.is_run`) under ``dirs``, each once, in path order."""
    found: dict[Path, None] = {}
    for d in dirs:
        root = Path(d)
        if not root.is_dir():
            raise ConfigError(f"{root} is not a directory")
        for here, subdirs, _files in os.walk(root):
            if RunDir.is_run(here):
                found[Path(here).resolve()] = None
                subdirs[:] = []  # nothing below a run directory is another run
            else:
                subdirs[:] = sorted(s for s in subdirs if not s.startswith("."))
    return sorted(found)


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], int]:
    """Records of a metrics file by step (the last record of a step wins: a resumed run logs the steps
    after its checkpoint again), and the number of unreadable lines (a torn last line of a killed run)."""
    by_step: dict[int, dict[str, Any]] = {}
    bad = 0
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return [], 0
    for line in lines:
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int):
            by_step[rec["step"]] = rec
        else:
            bad += 1
    return [by_step[s] for s in sorted(by_step)], bad


def _final_nm(sparse: dict[str, Any]) -> str:
    """The N:M pattern a run ends with: the last progressive stage, else ``sparse.nm``."""
    progressive = sparse.get("progressive")
    return str(progressive[-1].split("@")[0] if progressive else sparse.get("nm", "2:4"))


def load_run(path: str | Path) -> RunRecord:
    """Read one run directory; a missing or unreadable summary or evaluation becomes None."""
    import yaml

    run = RunDir(path)
    try:
        config = yaml.safe_load(run.config_path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{run.config_path} cannot be read: {e}") from None
    summary = run.read_summary()
    metrics, bad = read_metrics(run.metrics_path)
    sparse = config.get("sparse") or {}
    method = str(sparse.get("method") or (summary or {}).get("method") or "dense")
    # a one-shot N:M run (`finetune --method oneshot`) recorded before its config said so: the config
    # says srste (the engine it prunes with), the summary the method without an engine (oneshot)
    recorded = method_of(str((summary or {}).get("method")))
    if recorded is not None and recorded.structured and not recorded.has_engine:
        method = recorded.name
    prune = None
    info = method_of(method)
    if is_dense(method):
        sparsity = 0.0
    elif info is not None and info.structured:  # the sparsity of an N:M pattern: 1 - N/M
        n, m = (int(x) for x in _final_nm(sparse).split(":"))
        sparsity = 1.0 - n / m
    else:
        sparsity = float(sparse.get("sparsity", (summary or {}).get("sparsity", 0.0)))
        if info is not None and info.dynamic and "prune_ratio" in sparse:
            prune = float(sparse["prune_ratio"])
    return RunRecord(
        path=run.path,
        config=config,
        summary=summary,
        eval=run.read_eval(),
        metrics=metrics,
        bad_metric_lines=bad,
        preset=str(config.get("name") or (summary or {}).get("preset") or "custom"),
        method=method,
        sparsity=sparsity,
        prune_ratio=prune,
        seed=int((config.get("train") or {}).get("seed", 0)),
    )


# ---------------------------------------------------------------------------- table rows


@dataclass
class Group:
    """The runs of one table row: same preset, method, sparsity, prune ratio and training backend; several
    seeds."""

    preset: str
    method: str
    sparsity: float
    prune_ratio: float | None
    runs: list[RunRecord]
    backend: str = "dense"  # the training backend (runs of one setting with another backend: another row)

    @property
    def series(self) -> str:
        return self.runs[0].series

    def fids(self, metric: str | None) -> list[float]:
        return [r.fid[1] for r in self.runs if r.fid is not None and r.fid[0] == metric]

    def values(self, fn: Callable[[RunRecord], Any]) -> list[float]:
        """``fn`` of every run, leaving out runs where it is missing or not finite."""
        out = []
        for r in self.runs:
            try:
                v = fn(r)
            except (TypeError, ZeroDivisionError, KeyError):
                v = None
            if v is not None and math.isfinite(v):
                out.append(float(v))
        return out

    def mean(self, fn: Callable[[RunRecord], Any]) -> float | None:
        vals = self.values(fn)
        return statistics.fmean(vals) if vals else None


def group_runs(records: Sequence[RunRecord]) -> dict[str, list[Group]]:
    """Finished runs by preset, then by (method, sparsity, prune ratio), in table order."""
    by_key: dict[tuple, list[RunRecord]] = {}
    for r in records:
        if r.finished:
            by_key.setdefault((r.preset, r.method, r.sparsity, r.prune_ratio, r.backend), []).append(r)
    out: dict[str, list[Group]] = {}
    for (preset, method, sparsity, prune, backend), runs in by_key.items():
        runs.sort(key=lambda r: r.seed)
        out.setdefault(preset, []).append(Group(preset, method, sparsity, prune, runs, backend))
    for groups in out.values():
        groups.sort(
            key=lambda g: (
                not is_dense(g.method),
                g.sparsity,
                METHOD_ORDER.get(g.method, 9),
                g.method,
                g.prune_ratio or 0,
                g.backend != "dense",
            )
        )
    return dict(sorted(out.items()))
