"""Reports built from run directories: ``sparsediff report DIR [DIR ...] [--out DIR]``.

Reads nothing but run directories (``config.yaml``, ``summary.json``, ``eval.json``, ``metrics.jsonl``;
a torn last line, steps logged twice by a resumed run and a missing ``eval.json`` are tolerated) and
writes ``report.md`` (the paper-style table: FID mean ± std over seeds next to dense, non-zero
parameters, inference and training FLOPs as ratios to dense, wall-clock), ``results.csv`` (every number
of every run) and PNG plots (FID vs sparsity, FID vs training FLOPs, sample grids side by side).

The FID is shown under the metric name eval.json gives it (``fid_inception_v3``,
``fid_sparsediff_fmnist`` ...): a FID in sparsediff's own feature space is never presented as Inception FID.
"""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import flatten
from .errors import ConfigError

DYNAMIC_METHODS = ("rigl", "magran")
METHOD_ORDER = {"dense": 0, "static": 1, "rigl": 2, "magran": 3, "oneshot": 4, "srste": 5}
# Keys a sweep sets on every run (the grid); --set may not change them.
GRID_KEYS = ("sparse.method", "sparse.sparsity", "sparse.prune_ratio", "sparse.seed", "train.seed")


# ---------------------------------------------------------------------------- small helpers


def unique(values: Iterable[Any]) -> list[Any]:
    """The values in first-seen order, each once."""
    out: list[Any] = []
    for v in values:
        if v not in out:
            out.append(v)
    return out


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``, or None when it is missing, torn or not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


# ---------------------------------------------------------------------------- reading run directories


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
    def series(self) -> str:
        """Label of the method (and prune ratio) this run belongs to: ``rigl p=0.05``."""
        if self.method in ("srste", "oneshot"):
            nm = self.config.get("sparse", {}).get("nm", "")
            return f"{self.method} {nm}".strip()
        return self.method if self.prune_ratio is None else f"{self.method} p={self.prune_ratio:g}"

    def get(self, key: str) -> Any:
        """A number from eval.json, else summary.json."""
        for src in (self.eval, self.summary):
            if src and src.get(key) is not None:
                return src[key]
        return None


def find_runs(dirs: Sequence[str | Path]) -> list[Path]:
    """Run directories (a ``config.yaml`` next to ``summary.json``, ``metrics.jsonl``, ``eval.json`` or
    ``checkpoints/``) under ``dirs``, each once, in path order."""
    found: dict[Path, None] = {}
    for d in dirs:
        root = Path(d)
        if not root.is_dir():
            raise ConfigError(f"{root} is not a directory")
        for here, subdirs, files in os.walk(root):
            p = Path(here)
            if "config.yaml" in files and (
                {"summary.json", "metrics.jsonl", "eval.json"} & set(files) or "checkpoints" in subdirs
            ):
                found[p.resolve()] = None
                subdirs[:] = []  # nothing below a run directory is another run
            else:
                subdirs[:] = sorted(s for s in subdirs if not s.startswith("."))
    return sorted(found)


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], int]:
    """Records of ``metrics.jsonl`` by step (the last record of a step wins: a resumed run logs the steps
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


def load_run(path: str | Path) -> RunRecord:
    """Read one run directory; missing or unreadable summary / eval files become None."""
    import yaml

    path = Path(path)
    try:
        config = yaml.safe_load((path / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path / 'config.yaml'} cannot be read: {e}") from None
    summary = read_json(path / "summary.json")
    ev = read_json(path / "eval.json")
    metrics, bad = read_metrics(path / "metrics.jsonl")
    sparse = config.get("sparse") or {}
    method = str(sparse.get("method") or (summary or {}).get("method") or "dense")
    if (summary or {}).get("method") == "oneshot":  # `finetune --method oneshot`: N:M pruning, no training
        method = "oneshot"
    if method == "dense":
        sparsity, prune = 0.0, None
    elif method in ("srste", "oneshot"):
        nm = str(
            sparse.get("progressive", [""])[-1].split("@")[0]
            if sparse.get("progressive")
            else sparse.get("nm", "2:4")
        )
        n, m = (int(x) for x in nm.split(":"))
        sparsity, prune = 1.0 - n / m, None
    else:
        sparsity = float(sparse.get("sparsity", (summary or {}).get("sparsity", 0.0)))
        prune = (
            float(sparse["prune_ratio"]) if method in DYNAMIC_METHODS and "prune_ratio" in sparse else None
        )
    return RunRecord(
        path=path,
        config=config,
        summary=summary,
        eval=ev,
        metrics=metrics,
        bad_metric_lines=bad,
        preset=str(config.get("name") or (summary or {}).get("preset") or "custom"),
        method=method,
        sparsity=sparsity,
        prune_ratio=prune,
        seed=int((config.get("train") or {}).get("seed", 0)),
    )


# ---------------------------------------------------------------------------- aggregation


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1); the std is None for a single value."""
    vals = [float(v) for v in values]
    if not vals:
        return math.nan, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None)


@dataclass
class Group:
    """The runs of one table row: same preset, method, sparsity and prune ratio; several seeds."""

    preset: str
    method: str
    sparsity: float
    prune_ratio: float | None
    runs: list[RunRecord]

    @property
    def series(self) -> str:
        return self.runs[0].series

    def fids(self, metric: str) -> list[float]:
        return [r.fid[1] for r in self.runs if r.fid is not None and r.fid[0] == metric]

    def values(self, fn) -> list[float]:
        out = []
        for r in self.runs:
            try:
                v = fn(r)
            except (TypeError, ZeroDivisionError, KeyError):
                v = None
            if v is not None and math.isfinite(v):
                out.append(float(v))
        return out

    def mean(self, fn) -> float | None:
        vals = self.values(fn)
        return statistics.fmean(vals) if vals else None


def _ratio(a: Any, b: Any) -> float | None:
    if a is None or b in (None, 0):
        return None
    return float(a) / float(b)


def _nonzero_ratio(r: RunRecord) -> float | None:
    return _ratio(r.get("params_nonzero"), r.get("params_total"))


def _inference_ratio(r: RunRecord) -> float | None:
    s = r.summary or {}
    if s.get("flops_forward_dense"):
        return _ratio(s.get("flops_forward_sparse"), s["flops_forward_dense"])
    e = r.eval or {}
    return _ratio(e.get("flops_per_step_sparse"), e.get("flops_per_step_dense"))


def _train_flops_ratio(r: RunRecord) -> float | None:
    return _ratio(r.get("flops_train_total"), r.get("flops_train_total_dense"))


def _train_seconds(r: RunRecord) -> float | None:
    v = r.get("train_seconds")
    return None if v is None else float(v)


def group_runs(records: Sequence[RunRecord]) -> dict[str, list[Group]]:
    """Finished runs by preset, then by (method, sparsity, prune ratio), in table order."""
    by_key: dict[tuple, list[RunRecord]] = {}
    for r in records:
        if r.finished:
            by_key.setdefault((r.preset, r.method, r.sparsity, r.prune_ratio), []).append(r)
    out: dict[str, list[Group]] = {}
    for (preset, method, sparsity, prune), runs in by_key.items():
        runs.sort(key=lambda r: r.seed)
        out.setdefault(preset, []).append(Group(preset, method, sparsity, prune, runs))
    for groups in out.values():
        groups.sort(
            key=lambda g: (
                g.method != "dense",
                g.sparsity,
                METHOD_ORDER.get(g.method, 9),
                g.method,
                g.prune_ratio or 0,
            )
        )
    return dict(sorted(out.items()))


# ---------------------------------------------------------------------------- formatting


def _fmt_count(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _fmt_duration(s: float | None) -> str:
    if s is None:
        return "n/a"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def _fmt_fid(values: Sequence[float]) -> str:
    if not values:
        return "n/a"
    m, s = mean_std(values)
    return f"{m:.2f}" if s is None else f"{m:.2f} ± {s:.2f}"


def _fmt_x(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}x"


def _metrics_of(records: Sequence[RunRecord]) -> list[str]:
    return unique(r.fid[0] for r in records if r.fid is not None)


# ---------------------------------------------------------------------------- plots


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(fig)  # the Agg backend, without touching pyplot's global state
    return fig


def _styles(groups: Sequence[Group]) -> dict[str, dict[str, Any]]:
    """The same colour and marker for a method (and prune ratio) in every plot of a preset."""
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    markers = "o^vDsP*X"
    series = unique(g.series for g in groups if g.method != "dense")
    out = {s: {"color": cmap(i % 10), "marker": markers[i % len(markers)]} for i, s in enumerate(series)}
    out["dense"] = {"color": "black", "marker": "s"}
    return out


def plot_fid_vs_sparsity(groups: Sequence[Group], metric: str, path: Path) -> Path:
    """FID (mean ± std over seeds) against sparsity, one line per method; dense as a horizontal band."""
    fig = _figure(6.4, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    sparse = [g for g in groups if g.method != "dense" and g.fids(metric)]
    series = unique(g.series for g in sparse)
    styles = _styles(groups)
    levels = sorted(unique(g.sparsity for g in sparse))
    gap = min((b - a for a, b in zip(levels, levels[1:])), default=0.1)
    dodge = 0.04 * gap  # methods side by side at each sparsity, so that equal values stay visible
    for g in groups:
        if g.method == "dense" and g.fids(metric):
            m, s = mean_std(g.fids(metric))
            ax.axhline(m, color="black", lw=1.2, label=f"dense (n={len(g.fids(metric))})")
            if s:
                ax.axhspan(m - s, m + s, color="black", alpha=0.12, lw=0)
    for i, name in enumerate(series):
        pts = sorted((g.sparsity, *mean_std(g.fids(metric))) for g in sparse if g.series == name)
        xs = [p[0] + (i - (len(series) - 1) / 2) * dodge for p in pts]
        ys = [p[1] for p in pts]
        es = [p[2] or 0.0 for p in pts]
        ax.errorbar(xs, ys, yerr=es, capsize=3, label=name, **styles[name])
    if levels:
        ax.set_xticks(levels)
    ax.set_xlabel("sparsity")
    ax.set_ylabel(f"{metric} (lower is better)")
    ax.set_title(f"{groups[0].preset}: {metric} vs sparsity (mean ± std over seeds)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_fid_vs_train_flops(groups: Sequence[Group], metric: str, path: Path) -> Path:
    """FID against total training FLOPs (ratio to dense), one series per method."""
    fig = _figure(6.4, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    series = unique(g.series for g in groups if g.fids(metric))
    styles = _styles(groups)
    for name in series:
        pts = []
        for g in groups:
            x = g.mean(_train_flops_ratio)
            if g.series == name and g.fids(metric) and x is not None:
                pts.append((x, *mean_std(g.fids(metric)), g.sparsity))
        pts.sort()
        if not pts:
            continue
        ax.errorbar(
            [p[0] for p in pts],
            [p[1] for p in pts],
            yerr=[p[2] or 0.0 for p in pts],
            capsize=3,
            label=name,
            **styles[name],
        )
        for x, y, _, s in pts:
            if name != "dense":
                ax.annotate(f"{s:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("training FLOPs / dense (labels: sparsity)")
    ax.set_ylabel(f"{metric} (lower is better)")
    ax.set_title(f"{groups[0].preset}: {metric} vs training FLOPs", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_sample_grids(groups: Sequence[Group], path: Path) -> Path | None:
    """Each configuration's ``eval/grid.png`` side by side (lowest seed): rows sparsity, columns method."""
    from PIL import Image

    def grid_of(g: Group) -> Path | None:
        for r in g.runs:  # sorted by seed: seed 0 first
            p = r.path / "eval" / "grid.png"
            if p.exists():
                return p
        return None

    dense = [g for g in groups if g.method == "dense"]
    sparse = [g for g in groups if g.method != "dense"]
    series = unique(g.series for g in sparse)
    rows = ([("dense", None)] if dense else []) + [
        (f"sparsity {s:g}", s) for s in unique(g.sparsity for g in sparse)
    ]
    cols = series or ["dense"]
    if not any(grid_of(g) for g in groups):
        return None
    fig = _figure(2.3 * len(cols) + 0.6, 2.3 * len(rows) + 0.4)
    for i, (row_label, s) in enumerate(rows):
        for j, col in enumerate(cols):
            ax = fig.add_subplot(len(rows), len(cols), i * len(cols) + j + 1)
            ax.set_xticks([])
            ax.set_yticks([])
            if s is None:
                g = dense[0] if j == 0 else None
            else:
                g = next((x for x in sparse if x.series == col and x.sparsity == s), None)
            if g is not None:
                ax.set_title(g.series, fontsize=8)
            if j == 0:
                ax.set_ylabel(row_label, fontsize=8)
            p = grid_of(g) if g is not None else None
            if p is None:
                for side in ax.spines.values():
                    side.set_visible(False)
                continue
            with Image.open(p) as im:
                img = im.convert("RGB")
            ax.imshow(img)
    fig.suptitle(f"{groups[0].preset}: samples (eval/grid.png, lowest seed)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    return path


# ---------------------------------------------------------------------------- the report


def _csv_row(r: RunRecord) -> dict[str, Any]:
    """Every number of one run: identification, summary.*, eval.*, metrics.*, config.*."""
    fid = r.fid
    row: dict[str, Any] = {
        "run": r.path.name,
        "path": str(r.path),
        "preset": r.preset,
        "method": r.method,
        "sparsity": r.sparsity,
        "prune_ratio": r.prune_ratio,
        "seed": r.seed,
        "finished": r.finished,
        "evaluated": r.eval is not None,
        "fid_metric": fid[0] if fid else None,
        "fid": fid[1] if fid else None,
        "params_nonzero_ratio": _nonzero_ratio(r),
        "inference_flops_ratio": _inference_ratio(r),
        "train_flops_ratio": _train_flops_ratio(r),
    }
    for prefix, src in (("summary", r.summary), ("eval", r.eval)):
        for k, v in flatten(src or {}).items():
            if isinstance(v, (dict, list)):
                v = json.dumps(v)
            row[f"{prefix}.{k}"] = v
    if r.metrics:
        last = r.metrics[-1]
        times = [m["step_time"] for m in r.metrics if isinstance(m.get("step_time"), (int, float))]
        row.update(
            {
                "metrics.records": len(r.metrics),
                "metrics.last_step": last.get("step"),
                "metrics.final_loss": last.get("loss"),
                "metrics.mean_step_time": statistics.fmean(times) if times else None,
                "metrics.topology_changes": sum(int(m.get("topology_changes", 0) or 0) for m in r.metrics),
            }
        )
    row["metrics.bad_lines"] = r.bad_metric_lines
    for k, v in flatten(r.config).items():
        row[f"config.{k}"] = json.dumps(v) if isinstance(v, (dict, list)) else v
    return row


def write_csv(records: Sequence[RunRecord], path: Path) -> Path:
    rows = [_csv_row(r) for r in records]
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return path


def _table(groups: Sequence[Group], metric: str | None) -> list[str]:
    dense = next((g for g in groups if g.method == "dense"), None)
    dense_fid = mean_std(dense.fids(metric))[0] if dense and dense.fids(metric) else None
    dense_time = dense.mean(_train_seconds) if dense else None
    best: dict[float, float] = {}
    for g in groups:
        if g.method != "dense" and g.fids(metric):
            m = mean_std(g.fids(metric))[0]
            best[g.sparsity] = min(best.get(g.sparsity, math.inf), m)
    lines = [
        f"| method | sparsity | prune ratio | seeds | {f'`{metric}` ↓' if metric else 'FID (no eval.json yet)'} | "
        "Δ vs dense | non-zero params | "
        "inference FLOPs | training FLOPs | train wall-clock |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for g in groups:
        fids = g.fids(metric)
        fid_text = _fmt_fid(fids)
        rivals = sum(1 for x in groups if x.method != "dense" and x.sparsity == g.sparsity and x.fids(metric))
        if g.method != "dense" and fids and rivals > 1 and mean_std(fids)[0] == best[g.sparsity]:
            fid_text = f"**{fid_text}**"
        delta = (
            ""
            if g.method == "dense" or not fids or dense_fid is None
            else f"{mean_std(fids)[0] - dense_fid:+.2f}"
        )
        nonzero = g.mean(lambda r: r.get("params_nonzero"))
        time_mean = g.mean(_train_seconds)
        time_ratio = _ratio(time_mean, dense_time) if g.method != "dense" else None
        n_fid = len(fids)
        seeds = f"{len(g.runs)}" + (f" ({n_fid} eval)" if n_fid != len(g.runs) else "")
        lines.append(
            "| "
            + " | ".join(
                [
                    g.series.split(" ")[0],
                    "0" if g.method == "dense" else f"{g.sparsity:g}",
                    "" if g.prune_ratio is None else f"{g.prune_ratio:g}",
                    seeds,
                    fid_text,
                    delta,
                    f"{_fmt_count(nonzero)} ({_fmt_x(g.mean(_nonzero_ratio))})",
                    _fmt_x(g.mean(_inference_ratio)),
                    _fmt_x(g.mean(_train_flops_ratio)),
                    _fmt_duration(time_mean) + (f" ({_fmt_x(time_ratio)})" if time_ratio is not None else ""),
                ]
            )
            + " |"
        )
    return lines


def _metric_note(records: Sequence[RunRecord], metric: str) -> str:
    evs = [r.eval for r in records if r.fid is not None and r.fid[0] == metric and r.eval]
    fid = evs[0].get("fid", {}) if evs else {}
    gen = unique(e.get("num_samples") for e in evs)
    ref = unique(e.get("num_reference") for e in evs)
    text = (
        f"`{metric}`: metric name as written in eval.json (extractor `{fid.get('extractor', '?')}`, "
        f"weights `{fid.get('weights', '?')}`), {'/'.join(map(str, gen))} generated vs "
        f"{'/'.join(map(str, ref))} held-out samples."
    )
    if "inception" not in metric:
        text += (
            " It is computed in sparsediff's own feature space: it ranks these runs against each other "
            "and is **not** comparable with published Inception FIDs."
        )
    if len(gen) > 1 or len(ref) > 1:
        text += " **Warning: runs were evaluated with different sample counts; FIDs are not comparable.**"
    return text


def _config_mixes(records: Sequence[RunRecord]) -> list[str]:
    """Config keys (other than the grid's) whose values differ between the runs of one preset."""
    ignore = set(GRID_KEYS) | {"description", "sparse.nm", "sparse.progressive"}
    flats = [flatten(r.config) for r in records]
    keys = unique(k for f in flats for k in f)
    return [
        k
        for k in keys
        if k not in ignore and len({json.dumps(f.get(k), sort_keys=True, default=str) for f in flats}) > 1
    ]


def report(dirs: Sequence[str | Path], out: str | Path | None = None) -> dict[str, Any]:
    """Write ``report.md``, ``results.csv`` and PNG plots from the run directories found under ``dirs``.

    Only finished runs enter the table and plots (FID over the seeds that have an ``eval.json``);
    every run, finished or not, is a row of ``results.csv``.

    Returns:
        ``{"report", "csv", "plots": [...], "runs"}``.

    Raises:
        ConfigError: a path is not a directory, or no run directory is found under them.
    """
    if isinstance(dirs, (str, Path)):
        dirs = [dirs]
    paths = find_runs(dirs)
    if not paths:
        raise ConfigError(
            f"no run directories (config.yaml + summary.json/metrics.jsonl) under {', '.join(map(str, dirs))}"
        )
    out = Path(out) if out is not None else Path(dirs[0])
    out.mkdir(parents=True, exist_ok=True)
    records = [load_run(p) for p in paths]
    csv_path = write_csv(records, out / "results.csv")
    grouped = group_runs(records)
    plots: list[Path] = []
    multi = len(grouped) > 1
    lines = [
        "# sparsediff report",
        "",
        f"{len(records)} run directories under {', '.join(f'`{d}`' for d in dirs)}: "
        f"{sum(r.finished for r in records)} finished, {sum(r.eval is not None for r in records)} evaluated. "
        f"Every number of every run: [`results.csv`]({csv_path.name}).",
        "",
    ]
    for preset, groups in grouped.items():
        recs = [r for g in groups for r in g.runs]
        suffix = f"-{preset}" if multi else ""
        desc = (recs[0].config.get("description") or "").strip()
        steps = unique((r.summary or {}).get("steps") for r in recs)
        batch = unique((r.summary or {}).get("batch_size") for r in recs)
        lines += [f"## {preset}", ""]
        if desc:
            lines += [desc, ""]
        lines += [
            f"Training: {'/'.join(map(str, steps))} optimiser steps at batch {'/'.join(map(str, batch))}. "
            "FID: mean ± sample standard deviation (n - 1) over seeds; bold: best at that sparsity. "
            "Non-zero parameters of the whole denoiser (ratio to its dense count); inference FLOPs of one "
            "denoiser forward, sparse-aware (ratio to the same model dense; first-stage decoder excluded); "
            "training FLOPs in RigL accounting (ratio to dense training for the same steps); wall-clock is "
            "measured training time (ratio to dense): FLOP savings of masked dense kernels are on paper only.",
            "",
        ]
        metrics = _metrics_of(recs) or [None]  # no run evaluated yet: the table without FID
        for metric in metrics:
            lines += _table(groups, metric) + [""]
            if _metrics_of(recs):
                lines += [_metric_note(recs, metric), ""]
                tag = suffix + (f"-{metric}" if len(metrics) > 1 else "")
                p1 = plot_fid_vs_sparsity(groups, metric, out / f"fid_vs_sparsity{tag}.png")
                p2 = plot_fid_vs_train_flops(groups, metric, out / f"fid_vs_train_flops{tag}.png")
                plots += [p1, p2]
                lines += [
                    f"![{metric} vs sparsity]({p1.name})",
                    "",
                    f"![{metric} vs training FLOPs]({p2.name})",
                    "",
                ]
        grid = plot_sample_grids(groups, out / f"samples{suffix}.png")
        if grid is not None:
            plots.append(grid)
            lines += [f"![samples]({grid.name})", ""]
        mixes = _config_mixes(recs)
        if mixes:
            lines += [
                f"**Warning**: these runs differ in more than the grid: {', '.join(f'`{k}`' for k in mixes[:8])}.",
                "",
            ]
        for g in groups:
            seeds = [r.seed for r in g.runs]
            for seed in unique(x for x in seeds if seeds.count(x) > 1):
                dirs_ = ", ".join(f"`{r.path}`" for r in g.runs if r.seed == seed)
                lines += [
                    f"**Warning**: {g.series} at sparsity {g.sparsity:g} has seed {seed} twice ({dirs_}).",
                    "",
                ]
    notes = []
    for r in records:
        if not r.finished:
            step = r.metrics[-1]["step"] if r.metrics else 0
            notes.append(f"- `{r.path.name}`: not finished (last logged step {step}); left out of the table")
        elif r.eval is None:
            notes.append(
                f"- `{r.path.name}`: no eval.json; no FID (run `sparsediff evaluate --run {r.path}`)"
            )
        if r.bad_metric_lines:
            notes.append(
                f"- `{r.path.name}`: {r.bad_metric_lines} unreadable line(s) in metrics.jsonl skipped"
            )
    if notes:
        lines += ["## Notes", "", *notes, ""]
    report_path = out / "report.md"
    report_path.write_text("\n".join(lines))
    return {
        "report": str(report_path),
        "csv": str(csv_path),
        "plots": [str(p) for p in plots],
        "runs": len(records),
    }
