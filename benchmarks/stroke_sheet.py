"""A large-print sample sheet for stroke runs: held-out characters on top, then one row per run.

The report's ``samples.png`` shows 64 samples per run at 32 pixels, too small to judge whether strokes
form characters. This sheet draws ``--num`` samples per run at ``--size`` pixels, sampled with each
run's own sampler settings (its preset's DDPM / DDIM and variance multiplier), EMA weights and final
masks, next to as many held-out characters drawn the same way::

    .venv/bin/python benchmarks/stroke_sheet.py runs/rec/chirodiff-kanjivg-long \
        --out benchmarks/results/chirodiff-kanjivg-long/samples-large.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def _row(drawings, size: int, line_width: float) -> np.ndarray:
    from sparsediff.data.raster import rasterize
    from sparsediff.tasks.strokes import RASTER_PADDING

    cells = [rasterize(d, size=size, line_width=line_width, padding=RASTER_PADDING) for d in drawings]
    gap = np.full((size, 2), 96, dtype=np.uint8)
    parts = [part for c in cells for part in (gap, c)][1:]  # cells separated by gaps
    return np.concatenate(parts, axis=1)


def sheet_rows(
    run_dirs: list[Path], num: int = 12, size: int = 128, seed: int = 0
) -> tuple[list[np.ndarray], list[str], str]:
    """``(rows, labels, preset)``: held-out characters first, then one row of samples per run."""
    from sparsediff.report import find_runs, load_run
    from sparsediff.sample import generate

    runs = [load_run(r) for r in find_runs(run_dirs)]
    if not runs:
        raise SystemExit(f"no run directories under {', '.join(map(str, run_dirs))}")
    order = {"dense": 0, "static": 1, "rigl": 2, "magran": 3}
    runs.sort(key=lambda r: (order.get(r.method, 9), r.sparsity, str(r.path)))
    rows, labels, task = [], [], None
    line_width = 2.5 * size / 128
    for r in runs:
        samples, info, task = generate(r.path, num, seed=seed, progress=False)
        rows.append(_row(samples.extras["strokes"], size, line_width))
        label = r.method if r.method == "dense" else f"{r.method} {r.sparsity:g}"
        labels.append(f"{label}\n({info['sampler']} {info['steps']})")
    held_out = task.reference_drawings()
    pick = np.random.default_rng(seed).choice(len(held_out), size=min(num, len(held_out)), replace=False)
    real = [held_out[i] for i in pick]
    return [_row(real, size, line_width), *rows], ["held-out\n(real)", *labels], runs[0].preset


def sheet(run_dirs: list[Path], out: Path, num: int = 12, size: int = 128, seed: int = 0) -> Path:
    """Write the sheet of :func:`sheet_rows` to ``out`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, labels, preset = sheet_rows(run_dirs, num, size, seed)
    width = rows[0].shape[1] / 100 + 1.2
    fig, axes = plt.subplots(len(rows), 1, figsize=(width, len(rows) * (size / 100 + 0.15)), dpi=100)
    for ax, img, label in zip(np.atleast_1d(axes), rows, labels, strict=True):
        ax.imshow(img, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(f"{preset}: {num} samples per run (seed {seed}) and held-out characters", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", nargs="+", type=Path, help="directories holding finished stroke runs")
    p.add_argument("--out", type=Path, required=True, help="PNG to write")
    p.add_argument("--num", type=int, default=12, help="samples per run")
    p.add_argument("--size", type=int, default=128, help="cell size in pixels")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    print(sheet(args.src, args.out, args.num, args.size, args.seed))


if __name__ == "__main__":
    main()
