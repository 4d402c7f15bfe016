"""The report's text: ``report.md`` (the paper-style table per preset) and ``results.csv`` (every number
of every run), and :func:`report`, which writes both and the plots.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..config import flatten
from ..errors import ConfigError
from ..export.common import format_bytes
from ..run import RunDir
from ..sparse.methods import is_dense
from ..sweep.plan import GRID_KEYS
from .plots import plot_fid_vs_sparsity, plot_fid_vs_train_flops, plot_sample_grids, plot_topology
from .records import Group, RunRecord, find_runs, group_runs, load_run, mean_std, ratio, unique

__all__ = ["report", "write_csv"]

REPORT = "report.md"
RESULTS = "results.csv"


# ---------------------------------------------------------------------------- formatting


def _fmt_count(n: float | None) -> str:
    """``703.08k``, ``1.50M``: a parameter count in a table cell (``n/a`` for None)."""
    if n is None:
        return "n/a"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _fmt_duration(s: float | None) -> str:
    """``42.0 s``, ``3.5 min``, ``2.25 h``: a duration in a table cell, in decimal units so that rows
    compare at a glance (``n/a`` for None)."""
    if s is None:
        return "n/a"
    for limit, scale, unit in ((120, 1, "s"), (7200, 60, "min")):
        if s < limit:
            return f"{s / scale:.1f} {unit}"
    return f"{s / 3600:.2f} h"


def _fmt_fid(values: Sequence[float]) -> str:
    if not values:
        return "n/a"
    m, s = mean_std(values)
    return f"{m:.2f}" if s is None else f"{m:.2f} ± {s:.2f}"


def _fmt_x(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}x"


def _fmt_bytes(n: float | None, dense: float | None, is_dense: bool) -> str:
    """``1.62 MB (0.142x)``: bytes on disk and the ratio to the dense row (``n/a`` when unknown)."""
    if n is None:
        return "n/a"
    r = ratio(n, dense) if not is_dense else None
    return format_bytes(n) + (f" ({_fmt_x(r)})" if r is not None else "")


def _metrics_of(records: Sequence[RunRecord]) -> list[str]:
    return unique(r.fid[0] for r in records if r.fid is not None)


# ---------------------------------------------------------------------------- results.csv


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
        "params_nonzero_ratio": r.nonzero_ratio,
        "inference_flops_ratio": r.inference_ratio,
        "train_flops_ratio": r.train_flops_ratio,
        "checkpoint_bytes": r.checkpoint_bytes,
        "model_bytes": r.model_bytes,
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
    """One row per run, every column any run has (empty where a run has none)."""
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


# ---------------------------------------------------------------------------- report.md


def _table(groups: Sequence[Group], metric: str | None) -> list[str]:
    dense = next((g for g in groups if is_dense(g.method)), None)
    dense_fid = mean_std(dense.fids(metric))[0] if dense and dense.fids(metric) else None
    dense_time = dense.mean(lambda r: r.train_seconds) if dense else None
    dense_ckpt = dense.mean(lambda r: r.checkpoint_bytes) if dense else None
    dense_model = dense.mean(lambda r: r.model_bytes) if dense else None
    best: dict[float, float] = {}
    for g in groups:
        if not is_dense(g.method) and g.fids(metric):
            m = mean_std(g.fids(metric))[0]
            best[g.sparsity] = min(best.get(g.sparsity, math.inf), m)
    lines = [
        f"| method | sparsity | prune ratio | seeds | {f'`{metric}` ↓' if metric else f'FID (no {RunDir.EVAL} yet)'} | "
        "Δ vs dense | non-zero params | "
        "inference FLOPs | training FLOPs | train wall-clock | checkpoint on disk | model on disk |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for g in groups:
        fids = g.fids(metric)
        fid_text = _fmt_fid(fids)
        rivals = sum(
            1 for x in groups if not is_dense(x.method) and x.sparsity == g.sparsity and x.fids(metric)
        )
        if not is_dense(g.method) and fids and rivals > 1 and mean_std(fids)[0] == best[g.sparsity]:
            fid_text = f"**{fid_text}**"
        delta = (
            ""
            if is_dense(g.method) or not fids or dense_fid is None
            else f"{mean_std(fids)[0] - dense_fid:+.2f}"
        )
        nonzero = g.mean(lambda r: r.get("params_nonzero"))
        time_mean = g.mean(lambda r: r.train_seconds)
        time_ratio = ratio(time_mean, dense_time) if not is_dense(g.method) else None
        n_fid = len(fids)
        seeds = f"{len(g.runs)}" + (f" ({n_fid} eval)" if n_fid != len(g.runs) else "")
        cells = [
            g.method + (" (sparse backend)" if g.backend == "sparse" else ""),
            "0" if is_dense(g.method) else f"{g.sparsity:g}",
            "" if g.prune_ratio is None else f"{g.prune_ratio:g}",
            seeds,
            fid_text,
            delta,
            f"{_fmt_count(nonzero)} ({_fmt_x(g.mean(lambda r: r.nonzero_ratio))})",
            _fmt_x(g.mean(lambda r: r.inference_ratio)),
            _fmt_x(g.mean(lambda r: r.train_flops_ratio)),
            _fmt_duration(time_mean) + (f" ({_fmt_x(time_ratio)})" if time_ratio is not None else ""),
            _fmt_bytes(g.mean(lambda r: r.checkpoint_bytes), dense_ckpt, is_dense(g.method)),
            _fmt_bytes(g.mean(lambda r: r.model_bytes), dense_model, is_dense(g.method)),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _metric_note(records: Sequence[RunRecord], metric: str) -> str:
    evs = [r.eval for r in records if r.fid is not None and r.fid[0] == metric and r.eval]
    fid = evs[0].get("fid", {}) if evs else {}
    gen = unique(e.get("num_samples") for e in evs)
    ref = unique(e.get("num_reference") for e in evs)
    text = (
        f"`{metric}`: metric name as written in {RunDir.EVAL} (extractor `{fid.get('extractor', '?')}`, "
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


def _preset_section(
    preset: str, groups: Sequence[Group], out: Path, suffix: str
) -> tuple[list[str], list[Path]]:
    """The lines and plots of one preset: description, table(s) per FID metric, plots, warnings."""
    recs = [r for g in groups for r in g.runs]
    desc = (recs[0].config.get("description") or "").strip()
    steps = unique((r.summary or {}).get("steps") for r in recs)
    batch = unique((r.summary or {}).get("batch_size") for r in recs)
    plots: list[Path] = []
    lines = [f"## {preset}", ""]
    if desc:
        lines += [desc, ""]
    lines += [
        f"Training: {'/'.join(map(str, steps))} optimiser steps at batch {'/'.join(map(str, batch))}. "
        "FID: mean ± sample standard deviation (n - 1) over seeds; bold: best at that sparsity. "
        "Non-zero parameters of the whole denoiser (ratio to its dense count); inference FLOPs of one "
        "denoiser forward, sparse-aware (ratio to the same model dense; first-stage decoder excluded); "
        "training FLOPs in RigL accounting (ratio to dense training for the same steps); wall-clock is "
        "measured training time (ratio to dense): FLOP savings of masked dense kernels are on paper only. "
        "On disk: one checkpoint directory (model, EMA, optimiser, engine; compressed) and the sparse "
        "float32 export of the model (`sparsediff export --format sparse`), ratios to dense.",
        "",
    ]
    metrics = _metrics_of(recs) or [None]  # no run evaluated yet: the table without FID
    for metric in metrics:
        lines += _table(groups, metric) + [""]
        if metric is None:
            continue
        lines += [_metric_note(recs, metric), ""]
        tag = suffix + (f"-{metric}" if len(metrics) > 1 else "")
        p1 = plot_fid_vs_sparsity(groups, metric, out / f"fid_vs_sparsity{tag}.png")
        p2 = plot_fid_vs_train_flops(groups, metric, out / f"fid_vs_train_flops{tag}.png")
        plots += [p1, p2]
        lines += [f"![{metric} vs sparsity]({p1.name})", "", f"![{metric} vs training FLOPs]({p2.name})", ""]
    grid = plot_sample_grids(groups, out / f"samples{suffix}.png")
    if grid is not None:
        plots.append(grid)
        lines += [f"![samples]({grid.name})", ""]
    topo_lines, topo_plots = _topology_section(recs, out, suffix)
    lines += topo_lines
    plots += topo_plots
    mixes = _config_mixes(recs)
    if mixes:
        lines += [
            f"**Warning**: these runs differ in more than the grid: {', '.join(f'`{k}`' for k in mixes[:8])}.",
            "",
        ]
    for g in groups:
        seeds = [r.seed for r in g.runs]
        for seed in unique(x for x in seeds if seeds.count(x) > 1):
            dirs = ", ".join(f"`{r.path}`" for r in g.runs if r.seed == seed)
            lines += [
                f"**Warning**: {g.series} at sparsity {g.sparsity:g} has seed {seed} twice ({dirs}).",
                "",
            ]
    return lines, plots


def topology_history(r: RunRecord) -> list[tuple[int, float, float]]:
    """``(step, density, fraction ever active)`` of a run's metrics records that have them."""
    return [
        (int(m["step"]), float(m["density"]), float(m["ever_active"]))
        for m in r.metrics
        if isinstance(m.get("ever_active"), (int, float)) and isinstance(m.get("density"), (int, float))
    ]


def _topology_section(recs: Sequence[RunRecord], out: Path, suffix: str) -> tuple[list[str], list[Path]]:
    """One topology plot per finished sparse run that recorded its topology (per-layer density and the
    fraction of weights ever active), with the final fraction in the text."""
    lines: list[str] = []
    plots: list[Path] = []
    for r in sorted(recs, key=lambda x: x.path.name):
        topo = (r.summary or {}).get("topology")
        if not r.finished or not isinstance(topo, dict) or not topo.get("layers"):
            continue
        path = out / f"topology{suffix}-{r.path.name}.png"
        title = f"{r.path.name}: {len(topo['layers'])} sparsified layers"
        plots.append(plot_topology(topo["layers"], topology_history(r) or None, title, path))
        density = (r.summary or {}).get("target_density")
        said = f" at density {density:.3f}" if isinstance(density, (int, float)) else ""
        lines += [
            f"**{r.path.name}**: {topo['ever_active']:.1%} of the sparsified weights were active at some "
            f"step{said}.",
            "",
            f"![topology of {r.path.name}]({path.name})",
            "",
        ]
    if lines:
        lines = [
            "### Topology",
            "",
            "Per layer: the density (dark) and the fraction of its weights active at any step of the run "
            "(light: what a moving topology explored, RigL's in-time over-parameterisation); right: both "
            "for all sparsified weights over the run.",
            "",
            *lines,
        ]
    return lines, plots


def _notes(records: Sequence[RunRecord]) -> list[str]:
    """Runs left out of the table or read with trouble."""
    notes = []
    for r in records:
        if not r.finished:
            step = r.metrics[-1]["step"] if r.metrics else 0
            notes.append(f"- `{r.path.name}`: not finished (last logged step {step}); left out of the table")
        elif r.eval is None:
            notes.append(
                f"- `{r.path.name}`: no {RunDir.EVAL}; no FID (run `sparsediff evaluate --run {r.path}`)"
            )
        if r.bad_metric_lines:
            notes.append(
                f"- `{r.path.name}`: {r.bad_metric_lines} unreadable line(s) in {RunDir.METRICS} skipped"
            )
    return ["## Notes", "", *notes, ""] if notes else []


def report(dirs: Sequence[str | Path], out: str | Path | None = None) -> dict[str, Any]:
    """Write ``report.md``, ``results.csv`` and PNG plots from the run directories found under ``dirs``.

    Only finished runs enter the table and plots (FID over the seeds that have an evaluation); every
    run, finished or not, is a row of ``results.csv``.

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
            f"no run directories ({RunDir.CONFIG} + {RunDir.SUMMARY}/{RunDir.METRICS}) under {', '.join(map(str, dirs))}"
        )
    out = Path(out) if out is not None else Path(dirs[0])
    out.mkdir(parents=True, exist_ok=True)
    records = [load_run(p) for p in paths]
    csv_path = write_csv(records, out / RESULTS)
    grouped = group_runs(records)
    plots: list[Path] = []
    lines = [
        "# sparsediff report",
        "",
        f"{len(records)} run directories under {', '.join(f'`{d}`' for d in dirs)}: "
        f"{sum(r.finished for r in records)} finished, {sum(r.eval is not None for r in records)} evaluated. "
        f"Every number of every run: [`results.csv`]({csv_path.name}).",
        "",
    ]
    for preset, groups in grouped.items():
        section, figures = _preset_section(preset, groups, out, f"-{preset}" if len(grouped) > 1 else "")
        lines += section
        plots += figures
    lines += _notes(records)
    report_path = out / REPORT
    report_path.write_text("\n".join(lines))
    return {
        "report": str(report_path),
        "csv": str(csv_path),
        "plots": [str(p) for p in plots],
        "runs": len(records),
    }
