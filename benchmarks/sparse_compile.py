"""Sparse runtime under torch.compile: eager and compiled, dense and sparse, whole denoiser forwards.

    .venv/bin/python benchmarks/sparse_compile.py            # about 5 minutes on 2 cores (compilation included)
    .venv/bin/python benchmarks/sparse_compile.py --table    # the table of results/sparse_compile.json

Users compile their samplers; a sparse model must stay faster than the dense one when both are compiled.
Same models, masks and timing rules as ``sparse_runtime.py`` (ERK at 90 %, measured per-layer choice,
2 threads); the four variants of a model alternate in one process, each time the median of the repeats.
``torch.compile`` with its default backend (inductor); the compile time of the first call is recorded.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from sparse_runtime import build, inputs, only_the_table, timed
from sparsediff.sparse.runtime import sparse_layers, to_sparse_inference

OUT = Path(__file__).parent / "results" / "sparse_compile.json"
CASES = [
    ("ldm-fmnist", 1),
    ("ldm-fmnist", 8),
    ("dit-xs-fmnist", 1),
    ("dit-xs-fmnist", 8),
    ("chirodiff-kanjivg", 8),
]
VARIANTS = ("eager dense", "eager sparse", "compiled dense", "compiled sparse")


@torch.no_grad()
def bench(preset: str, batch: int, sparsity: float, repeats: int) -> dict[str, Any]:
    model, masks = build(preset, sparsity)
    xs = inputs(model, batch)
    fast = to_sparse_inference(model, masks, example_inputs=xs)
    compile_s = {}
    compiled = {}
    for label, m in (("dense", model), ("sparse", fast)):
        t0 = time.perf_counter()
        compiled[label] = torch.compile(m)
        compiled[label](*xs)
        compile_s[label] = time.perf_counter() - t0
    ref = model(*xs)
    err = float((compiled["sparse"](*xs) - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
    fns = [
        lambda: model(*xs),
        lambda: fast(*xs),
        lambda: compiled["dense"](*xs),
        lambda: compiled["sparse"](*xs),
    ]
    times = timed(fns, repeats, min_seconds=0.05)
    ms = {v: t * 1e3 for v, t in zip(VARIANTS, times)}
    return {
        "model": preset,
        "batch": batch,
        "sparsity": sparsity,
        "ms": ms,
        "eager_speedup": ms["eager dense"] / ms["eager sparse"],
        "compiled_speedup": ms["compiled dense"] / ms["compiled sparse"],
        "compile_s": compile_s,
        "converted_layers": len(sparse_layers(fast)),
        "max_rel_diff": err,
    }


def table(path: Path) -> str:
    r = json.loads(Path(path).read_text())
    out = [
        "| model | batch | eager dense | eager sparse | compiled dense | compiled sparse | speed-up eager "
        "| speed-up compiled |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for x in r["rows"]:
        ms = x["ms"]
        out.append(
            f"| {x['model']} | {x['batch']} | "
            + " | ".join(f"{ms[v]:.2f} ms" for v in VARIANTS)
            + f" | **{x['eager_speedup']:.2f}x** | **{x['compiled_speedup']:.2f}x** |"
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--table", action="store_true", help="print the markdown table of --out and exit")
    args = ap.parse_args()
    if only_the_table(args, table):
        return
    torch.set_num_threads(args.threads)
    rows = []
    for preset, batch in CASES:
        row = bench(preset, batch, args.sparsity, args.repeats)
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"torch": torch.__version__, "threads": args.threads, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
