"""Speed of the sparse inference runtime against torch dense, per layer and per whole denoiser.

    .venv/bin/python benchmarks/sparse_runtime.py            # full table (about 30-60 minutes on 2 cores)
    .venv/bin/python benchmarks/sparse_runtime.py --quick    # a few minutes: small models, 90 % only

Every number is a ratio taken in one process: dense and sparse calls alternate (ABAB...), each timing is
the median of the repeats, and the ratio is dense median / sparse median (> 1: sparse is faster). Masks are
ERK at the given sparsity (static engine, seed 0) on the preset's own initialisation; the dense model is
the masked dense model, so both compute the same function (the largest output difference is recorded).
Run it on a quiet machine: anything else on the cores makes the numbers worthless.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import sparsediff
from sparsediff.config import load_config
from sparsediff.models import build_model
from sparsediff.sparse.runtime import (
    MAX_DENSITY,
    SparseConv,
    SparseGRU,
    SparseLinear,
    kernels,
    to_sparse_inference,
)

OUT = Path(__file__).parent / "results" / "sparse_runtime.json"

# (name, preset, batches). The paper-scale models (PAPER_SCALE) take seconds per dense forward on 2 cores:
# they run at 2 threads, 50 % and 90 % only, with the per-layer choice by density (measuring every layer
# would cost about ten more forwards); the others use the measured per-layer choice, as `sample` does.
PAPER_SCALE = ("dit-s-latent64", "ldm-celebahq")
MODELS = [
    ("ldm-fmnist", "ldm-fmnist", (1, 8)),
    ("dit-xs-fmnist", "dit-xs-fmnist", (1, 8)),
    ("chirodiff-kanjivg", "chirodiff-kanjivg", (1, 8)),
    ("dit-s-latent64", "dit-s-latent64", (1, 8)),
    ("ldm-celebahq", "ldm-celebahq", (1, 8)),
]


def timed(fns: list, repeats: int, min_seconds: float = 0.0) -> list[float]:
    """Median seconds of each callable, calls interleaved; each sample repeats a call until min_seconds."""
    for f in fns:  # warm-up (first-call allocations, kernel build)
        f()
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, f in enumerate(fns):
            n, t0 = 0, time.perf_counter()
            while True:
                f()
                n += 1
                dt = time.perf_counter() - t0
                if dt >= min_seconds:
                    break
            samples[i].append(dt / n)
    return [statistics.median(s) for s in samples]


# ---------------------------------------------------------------------------- layers


def layer_cases() -> list[dict[str, Any]]:
    """The layer shapes of the denoisers: DiT-S attention and MLP, LDM convolutions, a GRU."""
    return [
        {"name": "DiT-S qkv linear 1152x384, N 2048", "kind": "linear", "m": 1152, "k": 384, "n": 2048},
        {"name": "DiT-S mlp linear 1536x384, N 2048", "kind": "linear", "m": 1536, "k": 384, "n": 2048},
        {"name": "DiT-S mlp linear 384x1536, N 2048", "kind": "linear", "m": 384, "k": 1536, "n": 2048},
        {"name": "LDM conv3x3 224->224, 64x64, batch 2", "kind": "conv", "c": 224, "hw": 64, "b": 2},
        {"name": "LDM conv3x3 896->896, 8x8, batch 8", "kind": "conv", "c": 896, "hw": 8, "b": 8},
        {"name": "conv3x3 64->64, 8x8, batch 64", "kind": "conv", "c": 64, "hw": 8, "b": 64},
        {"name": "conv3x3 128->128, 16x16, batch 64", "kind": "conv", "c": 128, "hw": 16, "b": 64},
        {"name": "GRU 96 (W_hh 288x96), batch 64, 64 steps", "kind": "gru", "h": 96, "b": 64, "t": 64},
    ]


def _mask_(module: nn.Module, density: float, gen: torch.Generator) -> None:
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() >= 2:
                p.mul_((torch.rand(p.shape, generator=gen) < density).to(p.dtype))


@torch.no_grad()
def bench_layer(case: dict[str, Any], density: float, repeats: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    if case["kind"] == "linear":
        dense = nn.Linear(case["k"], case["m"])
        x = torch.randn(case["n"], case["k"], generator=gen)
    elif case["kind"] == "conv":
        dense = nn.Conv2d(case["c"], case["c"], 3, padding=1)
        x = torch.randn(case["b"], case["c"], case["hw"], case["hw"], generator=gen)
    else:
        dense = nn.GRU(case["h"], case["h"], batch_first=True)
        x = torch.randn(case["b"], case["t"], case["h"], generator=gen)
    _mask_(dense, density, gen)
    sparse = {"linear": lambda m: SparseLinear(m.weight, m.bias), "conv": SparseConv, "gru": SparseGRU}[
        case["kind"]
    ](dense)
    first = lambda y: y[0] if isinstance(y, tuple) else y  # noqa: E731
    err = float((first(sparse(x)) - first(dense(x))).abs().max())
    t_dense, t_sparse = timed([lambda: dense(x), lambda: sparse(x)], repeats, min_seconds=0.05)
    return {
        "layer": case["name"],
        "density": density,
        "dense_ms": t_dense * 1e3,
        "sparse_ms": t_sparse * 1e3,
        "speedup": t_dense / t_sparse,
        "max_abs_diff": err,
    }


# ---------------------------------------------------------------------------- whole denoisers


def build(preset: str, sparsity: float) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    cfg = load_config(preset)
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    with torch.no_grad():  # a trained model has no zero-initialised layers (DiT's adaLN-Zero): randomise
        for p in model.parameters():
            p.normal_(0.0, 0.5 / max(1, p[0].numel()) ** 0.5 if p.dim() > 1 else 0.1)
    engine = sparsediff.sparsify(model, None, method="static", sparsity=sparsity, distribution="erk")
    masks = dict(engine.masks)
    engine.remove()
    return model, masks


def inputs(model: nn.Module, batch: int) -> tuple:
    xs = list(model.example_inputs(batch))
    gen = torch.Generator().manual_seed(1)
    xs[0] = torch.randn(xs[0].shape, generator=gen)
    return tuple(xs)


@torch.no_grad()
def bench_model(name: str, preset: str, sparsity: float, batch: int, repeats: int) -> dict[str, Any]:
    model, masks = build(preset, sparsity)
    xs = inputs(model, batch)
    measured = name not in PAPER_SCALE
    t0 = time.perf_counter()
    fast = to_sparse_inference(model, masks, example_inputs=xs if measured else None)
    setup = time.perf_counter() - t0
    converted = [n for n, m in fast.named_modules() if isinstance(m, (SparseLinear, SparseConv, SparseGRU))]
    y_dense, y_sparse = model(*xs), fast(*xs)
    err = float((y_dense - y_sparse).abs().max() / y_dense.abs().max().clamp_min(1e-12))
    t_dense, t_sparse = timed([lambda: model(*xs), lambda: fast(*xs)], repeats, min_seconds=0.2)
    return {
        "model": name,
        "sparsity": sparsity,
        "batch": batch,
        "dense_ms": t_dense * 1e3,
        "sparse_ms": t_sparse * 1e3,
        "speedup": t_dense / t_sparse,
        "converted_layers": len(converted),
        "layer_choice": "measured"
        if measured
        else "density <= " + ", ".join(f"{k} {v}" for k, v in MAX_DENSITY.items()),
        "setup_s": setup,
        "max_rel_diff": err,
    }


@torch.no_grad()
def bench_sampling(sparsity: float, num: int, steps: int, repeats: int) -> dict[str, Any]:
    """One whole DDIM sampling run of ldm-fmnist's denoiser (latents; decoding not included)."""
    from sparsediff.diffusion.samplers import sample
    from sparsediff.diffusion.schedules import NoiseSchedule

    cfg = load_config("ldm-fmnist")
    model, masks = build("ldm-fmnist", sparsity)
    fast = to_sparse_inference(model, masks, example_inputs=inputs(model, num))
    schedule = NoiseSchedule.from_config(cfg.diffusion)
    shape = (num, *model.sample_shape)

    def run(m):
        return sample(
            m, schedule, shape, sampler="ddim", steps=steps, generator=torch.Generator().manual_seed(0)
        )

    err = float((run(model) - run(fast)).abs().max())
    t_dense, t_sparse = timed([lambda: run(model), lambda: run(fast)], repeats)
    return {
        "model": "ldm-fmnist",
        "what": f"DDIM-{steps} sampling of {num} latents",
        "sparsity": sparsity,
        "dense_s": t_dense,
        "sparse_s": t_sparse,
        "speedup": t_dense / t_sparse,
        "max_abs_diff": err,
    }


# ---------------------------------------------------------------------------- main


def table(path: Path) -> str:
    """Markdown tables of a results file (for benchmarks/README.md)."""
    r = json.loads(Path(path).read_text())
    out = ["| layer | density | threads | dense | sparse | speed-up |", "|---|---|---|---|---|---|"]
    for x in r["layers"]:
        out.append(
            f"| {x['layer']} | {x['density']} | {x['threads']} | {x['dense_ms']:.2f} ms | {x['sparse_ms']:.2f} ms "
            f"| **{x['speedup']:.2f}x** |"
        )
    out += ["", "| model | sparsity | batch | threads | dense | sparse | speed-up | sparse layers |"]
    out.append("|---|---|---|---|---|---|---|---|")
    for x in r["models"]:
        out.append(
            f"| {x['model']} | {x['sparsity']:.0%} | {x['batch']} | {x['threads']} | {x['dense_ms']:.2f} ms "
            f"| {x['sparse_ms']:.2f} ms | **{x['speedup']:.2f}x** | {x['converted_layers']} |"
        )
    out += ["", "| sampling | sparsity | threads | dense | sparse | speed-up |", "|---|---|---|---|---|---|"]
    for x in r["sampling"]:
        out.append(
            f"| {x['model']}, {x['what']} | {x['sparsity']:.0%} | {x['threads']} | {x['dense_s']:.2f} s "
            f"| {x['sparse_s']:.2f} s | **{x['speedup']:.2f}x** |"
        )
    return "\n".join(out)


def only_the_table(args: argparse.Namespace, tables) -> bool:
    """With ``--table``, print ``tables(--out)`` and say so; otherwise make sure there is something to
    measure (the kernels built)."""
    if args.table:
        print(tables(Path(args.out)))
        return True
    if kernels() is None:
        raise SystemExit("the native kernels did not build; nothing to measure")
    return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small models, 90 %% only, few repeats")
    ap.add_argument("--threads", default="1,2", help="torch thread counts, e.g. 1,2")
    ap.add_argument("--sparsities", default="0.5,0.75,0.9,0.95")
    ap.add_argument("--models", default=",".join(m[0] for m in MODELS))
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--table", action="store_true", help="print the markdown tables of --out and exit")
    args = ap.parse_args()
    if only_the_table(args, table):
        return
    sparsities = [float(s) for s in args.sparsities.split(",")]
    models = [m for m in MODELS if m[0] in args.models.split(",")]
    repeats = args.repeats
    if args.quick:
        sparsities, repeats = [0.9], 3
        models = [m for m in models if m[0] in ("ldm-fmnist", "dit-xs-fmnist", "chirodiff-kanjivg")]
    result: dict[str, Any] = {
        "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__},
        "layers": [],
        "models": [],
        "sampling": [],
    }
    thread_counts = [int(t) for t in args.threads.split(",")]
    for threads in thread_counts:
        torch.set_num_threads(threads)
        for case in layer_cases():
            for density in (0.1, 0.5):
                row = {"threads": threads, **bench_layer(case, density, repeats)}
                result["layers"].append(row)
                print(json.dumps(row), flush=True)
        for name, preset, batches in models:
            paper = name in PAPER_SCALE
            if paper and threads != max(thread_counts):
                continue
            for sparsity in [s for s in sparsities if not paper or s in (0.5, 0.9)]:
                for batch in batches:
                    reps = max(3, repeats // 2) if paper else repeats
                    row = {"threads": threads, **bench_model(name, preset, sparsity, batch, reps)}
                    result["models"].append(row)
                    print(json.dumps(row), flush=True)
        if "ldm-fmnist" in args.models:
            for sparsity in sparsities:
                row = {"threads": threads, **bench_sampling(sparsity, 64, 50, max(3, repeats // 2))}
                result["sampling"].append(row)
                print(json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
