"""2:4 semi-structured sparse vs dense speed on a CUDA GPU, fp16 (not a test).

    python benchmarks/nm_speed.py            # writes benchmarks/results/nm_speed.json, prints a table
    python benchmarks/nm_speed.py --quick    # fewer repeats and widths

What is timed (inference, ``torch.inference_mode``, fp16):

1. Wide synthetic ``nn.Linear(w, w)`` layers, w = 1024 .. 16384, on 4096 tokens: ``F.linear`` with the
   2:4-pruned weight as a dense tensor vs as a ``SparseSemiStructuredTensor``.
2. Denoiser forwards of the presets ``dit-s-latent64`` and ``dit-b-latent64`` (every Linear converts; the
   patch-embedding conv stays dense) and ``ldm-celebahq`` (the UNet's convolutions stay dense: only its
   attention projections and time-embedding Linears convert; the table says what share of the forward
   FLOPs that is), plus one DDIM sampling step (forward + update, averaged over a 10-step run).

Both sides hold the same 2:4-pruned weights (random initialisation; a zero-initialised weight, as in
DiT's adaLN-Zero layers, gets small random values first so that the outputs are not trivially 0), so the
outputs agree up to fp16 rounding: the relative L2 difference is recorded next to every timing. Times are
the median over ``repeats`` of CUDA-event times of blocks of ``inner`` calls, after warm-up, dense and
sparse blocks interleaved so that clock drift hits both alike. The GPU, torch, CUDA and cuSPARSELt
versions are recorded. Without a CUDA GPU with 2:4 sparse tensor cores (compute capability >= 8.0) the
script exits with status 2 and writes nothing.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

RESULTS = Path(__file__).parent / "results" / "nm_speed.json"
MODEL_PRESETS = ("dit-s-latent64", "dit-b-latent64", "ldm-celebahq")
WIDTHS = (1024, 2048, 4096, 8192, 16384)


# ---------------------------------------------------------------------------- environment


def cuda_problem() -> str | None:
    """Why this machine cannot run the benchmark, or None."""
    if not torch.cuda.is_available():
        return "no CUDA GPU is available (torch.cuda.is_available() is False)"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return (
            f"{torch.cuda.get_device_name()} has compute capability {major}.{minor}; 2:4 sparse tensor cores "
            "need 8.0 (Ampere) or newer"
        )
    return None


def environment() -> dict[str, Any]:
    cusparselt = torch.backends.cusparselt
    return {
        "gpu": torch.cuda.get_device_name(),
        "compute_capability": ".".join(map(str, torch.cuda.get_device_capability())),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cusparselt": cusparselt.version() if cusparselt.is_available() else None,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
    }


# ---------------------------------------------------------------------------- timing


def time_pair(
    dense: Callable[[], Any], sparse: Callable[[], Any], warmup: int, repeats: int, inner: int
) -> dict[str, Any]:
    """Milliseconds per call of ``dense()`` and ``sparse()``: median over ``repeats`` interleaved blocks."""
    for _ in range(warmup):
        dense()
        sparse()
    torch.cuda.synchronize()
    times: dict[str, list[float]] = {"dense": [], "sparse": []}
    for _ in range(repeats):
        for name, fn in (("dense", dense), ("sparse", sparse)):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end) / inner)
    out: dict[str, Any] = {"repeats": repeats, "inner": inner, "warmup": warmup}
    for name, ts in times.items():
        out[f"{name}_ms"] = statistics.median(ts)
        out[f"{name}_ms_range"] = [min(ts), max(ts)]
    out["speedup"] = out["dense_ms"] / out["sparse_ms"]
    return out


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# ---------------------------------------------------------------------------- cases


def bench_linear(width: int, tokens: int, args: argparse.Namespace) -> dict[str, Any]:
    from sparsediff.sparse import one_shot_nm, to_semi_structured

    torch.manual_seed(0)
    layer = nn.Linear(width, width)
    one_shot_nm(layer, 2, 4)
    dense = copy.deepcopy(layer).to(device="cuda", dtype=torch.float16).eval()
    sparse = to_semi_structured(layer, dtype=torch.float16).eval()
    x = torch.randn(tokens, width, device="cuda", dtype=torch.float16)
    with torch.inference_mode():
        err = rel_l2(sparse(x), dense(x))
        t = time_pair(lambda: dense(x), lambda: sparse(x), args.warmup, args.repeats, args.inner)
    flops = 2.0 * tokens * width * width
    return {
        "case": f"linear {width}x{width}",
        "width": width,
        "tokens": tokens,
        "backend": layer.semi_structured_report.backend,
        "rel_l2": err,
        "dense_tflops": flops / (t["dense_ms"] * 1e9),
        "sparse_tflops_effective": flops / (t["sparse_ms"] * 1e9),
        **t,
    }


def _fill_zero_weights(model: nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2 and not p.any():
                p.normal_(0.0, 0.02)


def bench_model(preset: str, batch: int, args: argparse.Namespace) -> dict[str, Any]:
    from sparsediff.config import load_config
    from sparsediff.diffusion import NoiseSchedule, sample
    from sparsediff.models import build_model
    from sparsediff.sparse import count_flops, one_shot_nm, plan_semi_structured, to_semi_structured

    cfg = load_config(preset)
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    _fill_zero_weights(model)
    one_shot_nm(model, 2, 4)  # every maskable weight, convolutions too: the dense side computes the same
    plan = plan_semi_structured(model, None, torch.float16)
    converted = set(plan.converted)
    model.cuda()
    flops = count_flops(model, model.example_inputs(1))
    share = sum(la.flops_dense for la in flops.layers if la.name in converted) / max(flops.flops_dense, 1)
    dense = copy.deepcopy(model).to(dtype=torch.float16)
    sparse = to_semi_structured(model, dtype=torch.float16)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, *model.sample_shape, generator=gen).to("cuda", torch.float16)
    t = torch.randint(0, cfg.diffusion.timesteps, (batch,), generator=gen).cuda()
    with torch.inference_mode():
        err = rel_l2(sparse(x, t), dense(x, t))
        fwd = time_pair(lambda: dense(x, t), lambda: sparse(x, t), args.warmup, args.repeats, args.inner)
    row: dict[str, Any] = {
        "case": f"{preset} forward",
        "preset": preset,
        "batch": batch,
        "params": sum(p.numel() for p in dense.parameters()),
        "backend": plan.backend,
        "converted_layers": len(converted),
        "dense_layers": len(plan.kept),
        "flops_forward_per_sample": flops.flops_dense,
        "flops_share_converted": share,
        "rel_l2": err,
        **fwd,
    }
    if args.sampling_steps:
        schedule = NoiseSchedule.from_config(cfg.diffusion)
        k = args.sampling_steps

        def run(m: nn.Module) -> Callable[[], Any]:
            return lambda: sample(
                m,
                schedule,
                tuple(x.shape),
                sampler="ddim",
                steps=k,
                x_T=x,
                device="cuda",
                dtype=torch.float16,
            )

        with torch.inference_mode():
            steps = time_pair(run(dense), run(sparse), 1, max(3, args.repeats // 4), 1)
        row["sampling_step"] = {
            "steps_per_run": k,
            "dense_ms": steps["dense_ms"] / k,
            "sparse_ms": steps["sparse_ms"] / k,
            "speedup": steps["speedup"],
            "repeats": steps["repeats"],
        }
    return row


# ---------------------------------------------------------------------------- report


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        f"{'case':<32} {'dense ms':>10} {'2:4 ms':>10} {'speed-up':>9} {'FLOPs in 2:4':>13} {'rel L2':>9}",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['case']:<32} failed: {r['error']}")
            continue
        share = f"{100 * r['flops_share_converted']:.1f} %" if "flops_share_converted" in r else "100 %"
        lines.append(
            f"{r['case']:<32} {r['dense_ms']:>10.3f} {r['sparse_ms']:>10.3f} {r['speedup']:>8.2f}x "
            f"{share:>13} {r['rel_l2']:>9.1e}"
        )
        s = r.get("sampling_step")
        if s:
            lines.append(
                f"{'  + DDIM step':<32} {s['dense_ms']:>10.3f} {s['sparse_ms']:>10.3f} {s['speedup']:>8.2f}x"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="widths 1024..4096, fewer repeats")
    parser.add_argument("--tokens", type=int, default=4096, help="rows of the synthetic Linear inputs")
    parser.add_argument("--widths", type=int, nargs="*", help=f"synthetic Linear widths (default {WIDTHS})")
    parser.add_argument("--presets", nargs="*", default=list(MODEL_PRESETS))
    parser.add_argument("--batch", type=int, default=8, help="latents per denoiser forward")
    parser.add_argument("--sampling-steps", type=int, default=10, help="DDIM steps per timed run (0: skip)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--inner", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    problem = cuda_problem()
    if problem is not None:
        print(
            f"nm_speed.py measures 2:4 sparse kernels on a CUDA GPU: {problem}. Nothing was written.",
            file=sys.stderr,
        )
        return 2
    if args.quick:
        args.repeats, args.inner, args.warmup = min(args.repeats, 10), min(args.inner, 3), min(args.warmup, 3)
    widths = args.widths or (WIDTHS[:3] if args.quick else WIDTHS)
    env = environment()
    print(
        f"{env['gpu']} (sm {env['compute_capability']}), torch {env['torch']}, CUDA {env['cuda']}, "
        f"cuSPARSELt {env['cusparselt']}"
    )

    print(table([]))
    rows: list[dict[str, Any]] = []
    cases: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        (f"linear {w}x{w}", lambda w=w: bench_linear(w, args.tokens, args)) for w in widths
    ]
    cases += [(f"{p} forward", lambda p=p: bench_model(p, args.batch, args)) for p in args.presets]
    for name, fn in cases:
        try:
            rows.append(fn())
        except Exception as e:  # one case failing (memory, an unsupported shape) must not lose the others
            rows.append({"case": name, "error": f"{type(e).__name__}: {e}"[:300]})
        torch.cuda.empty_cache()  # the case's models are gone: give their memory back
        print("\n".join(table(rows[-1:]).splitlines()[1:]), flush=True)

    result = {
        "environment": env,
        "settings": {
            "dtype": "float16",
            "tokens": args.tokens,
            "batch": args.batch,
            "repeats": args.repeats,
            "inner": args.inner,
            "warmup": args.warmup,
            "sampling_steps": args.sampling_steps,
        },
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print()
    print(table(rows))
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
