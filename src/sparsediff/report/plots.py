"""The report's PNG plots: FID against sparsity, FID against training FLOPs, sample grids side by side,
and one run's topology (per-layer density and fraction of weights ever active).

Figures are drawn with matplotlib's Agg backend directly, without touching pyplot's global state.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..run import RunDir
from ..sparse.methods import is_dense
from .records import Group, mean_std, unique

__all__ = ["plot_fid_vs_sparsity", "plot_fid_vs_train_flops", "plot_sample_grids", "plot_topology"]

GRID_PNG = "grid.png"  # the sample grid `sparsediff evaluate` writes into the run's evaluation folder


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(fig)  # the Agg backend, without touching pyplot's global state
    return fig


def _save(fig, ax, xlabel: str, ylabel: str, title: str, path: Path) -> Path:
    """Label a one-axes line plot, give it a grid and a legend, and write it to ``path``."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # a plot of unlabelled lines (no curves to tell apart) has none
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path


def _styles(groups: Sequence[Group]) -> dict[str, dict[str, Any]]:
    """The same colour and marker for a method (and prune ratio) in every plot of a preset."""
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    markers = "o^vDsP*X"
    series = unique(g.series for g in groups if not is_dense(g.method))
    out = {s: {"color": cmap(i % 10), "marker": markers[i % len(markers)]} for i, s in enumerate(series)}
    out["dense"] = {"color": "black", "marker": "s"}
    return out


def plot_fid_vs_sparsity(groups: Sequence[Group], metric: str, path: Path) -> Path:
    """FID (mean ± std over seeds) against sparsity, one line per method; dense as a horizontal band."""
    fig = _figure(6.4, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    sparse = [g for g in groups if not is_dense(g.method) and g.fids(metric)]
    series = unique(g.series for g in sparse)
    styles = _styles(groups)
    levels = sorted(unique(g.sparsity for g in sparse))
    gap = min((b - a for a, b in zip(levels, levels[1:])), default=0.1)
    dodge = 0.04 * gap  # methods side by side at each sparsity, so that equal values stay visible
    for g in groups:
        if is_dense(g.method) and g.fids(metric):
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
    title = f"{groups[0].preset}: {metric} vs sparsity (mean ± std over seeds)"
    return _save(fig, ax, "sparsity", f"{metric} (lower is better)", title, path)


def plot_fid_vs_train_flops(groups: Sequence[Group], metric: str, path: Path) -> Path:
    """FID against total training FLOPs (ratio to dense), one series per method."""
    fig = _figure(6.4, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    series = unique(g.series for g in groups if g.fids(metric))
    styles = _styles(groups)
    for name in series:
        pts = []
        for g in groups:
            x = g.mean(lambda r: r.train_flops_ratio)
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
    xlabel = "training FLOPs / dense (labels: sparsity)"
    title = f"{groups[0].preset}: {metric} vs training FLOPs"
    return _save(fig, ax, xlabel, f"{metric} (lower is better)", title, path)


def _grid_of(g: Group) -> Path | None:
    """The evaluation's sample grid of the group's lowest seed that has one."""
    for r in g.runs:  # sorted by seed: seed 0 first
        p = RunDir(r.path).eval_dir / GRID_PNG
        if p.exists():
            return p
    return None


def plot_sample_grids(groups: Sequence[Group], path: Path) -> Path | None:
    """Each configuration's ``eval/grid.png`` side by side (lowest seed): rows sparsity, columns method."""
    from PIL import Image

    dense = [g for g in groups if is_dense(g.method)]
    sparse = [g for g in groups if not is_dense(g.method)]
    series = unique(g.series for g in sparse)
    rows = ([("dense", None)] if dense else []) + [
        (f"sparsity {s:g}", s) for s in unique(g.sparsity for g in sparse)
    ]
    cols = series or ["dense"]
    if not any(_grid_of(g) for g in groups):
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
            p = _grid_of(g) if g is not None else None
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


def plot_topology(
    layers: Sequence[dict[str, Any]],
    history: Sequence[tuple[int, float, float]] | None,
    title: str,
    path: Path,
) -> Path:
    """One run's topology: per layer, its density and the fraction of its weights ever active (bars, one
    row per layer); with ``history`` (``(step, density, fraction ever active)`` of the sparsified weights),
    also both over the steps of the run: the gap is what the moving topology explored beyond its budget.

    ``layers``: ``{"name", "density", "ever_active"}`` per layer (fractions, as the run summary holds).
    """
    import numpy as np

    n = len(layers)
    panels = 2 if history else 1
    fig = _figure(4.2 * panels + 1.2, max(2.4, 0.16 * n + 1.0))
    ax = fig.add_subplot(1, panels, 1)
    y = np.arange(n)
    ever = [x["ever_active"] if x.get("ever_active") is not None else x["density"] for x in layers]
    ax.barh(y, ever, color="#9ecae1", label="ever active")
    ax.barh(y, [x["density"] for x in layers], color="#08519c", height=0.5, label="active (density)")
    ax.set_yticks(y)
    ax.set_yticklabels([x["name"] for x in layers], fontsize=5 if n > 30 else 7)
    ax.invert_yaxis()  # model order, top to bottom
    ax.set_xlim(0, 1)
    ax.set_xlabel("fraction of the layer's weights")
    ax.grid(alpha=0.3, axis="x")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("per layer", fontsize=9)
    if history:
        ax2 = fig.add_subplot(1, panels, 2)
        steps = [h[0] for h in history]
        ax2.plot(steps, [h[2] for h in history], color="#9ecae1", marker=".", label="ever active")
        ax2.plot(steps, [h[1] for h in history], color="#08519c", linestyle="--", label="active (density)")
        ax2.set_ylim(0, max(0.05, min(1.0, max(h[2] for h in history) * 1.15)))
        ax2.set_xlabel("optimiser step")
        ax2.set_ylabel("fraction of the sparsified weights")
        ax2.grid(alpha=0.3)
        ax2.legend(fontsize=7)
        ax2.set_title("all sparsified weights", fontsize=9)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    return path
