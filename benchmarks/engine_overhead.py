"""Engine overhead on this machine (not a test).

1. Training-step time of a 90 %-sparse RigL model (update every 100 steps) over the same dense model,
   in one process. Dense and sparse run in alternating blocks of ``update_every`` steps so that drift of
   the machine hits both alike; the time per step of a block includes its topology update (amortised).
   The ratio is the median over blocks of sparse / dense.
2. Wall-clock of one topology update (RigL and MagRan) for models of about 1 M and 100 M parameters.

    python benchmarks/engine_overhead.py            # writes benchmarks/results/engine_overhead.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import sparsediff
from sparsediff.config import load_config
from sparsediff.models import build_model

RESULTS = Path(__file__).parent / "results" / "engine_overhead.json"


def _unet_batch(model, batch: int, gen: torch.Generator):
    c, h, w = model.sample_shape
    x = torch.randn(batch, c, h, w, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    return x, t


def step_time_ratio(preset: str, batch: int, blocks: int, update_every: int, sparsity: float) -> dict:
    torch.manual_seed(0)
    runs = {}
    for kind in ("dense", "rigl"):
        model = build_model(load_config(preset).model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-2)
        engine = sparsediff.sparsify(
            model,
            opt,
            method=kind,
            sparsity=sparsity if kind == "rigl" else 0.0,
            update_every=update_every,
            end_step="never",
            decay="constant",
            prune_ratio=0.3,
        )
        runs[kind] = (model, opt, engine, torch.Generator().manual_seed(1))

    def block(kind: str) -> float:
        model, opt, engine, gen = runs[kind]
        t0 = time.perf_counter()
        for _ in range(update_every):
            x, t = _unet_batch(model, batch, gen)
            loss = (model(x, t) - x).pow(2).mean()
            loss.backward()
            opt.step()
            engine.step()
            opt.zero_grad(set_to_none=True)
        return (time.perf_counter() - t0) / update_every

    block("dense"), block("rigl")  # warm-up (allocator, first Adam state)
    times = {"dense": [], "rigl": []}
    for i in range(blocks):
        order = ("dense", "rigl") if i % 4 in (0, 3) else ("rigl", "dense")  # ABBA: cancels linear drift
        for kind in order:
            times[kind].append(block(kind))
    ratios = [s / d for s, d in zip(times["rigl"], times["dense"])]
    engine = runs["rigl"][2]
    return {
        "preset": preset,
        "batch_size": batch,
        "sparsity": sparsity,
        "update_every": update_every,
        "blocks": blocks,
        "steps_per_block": update_every,
        "params": sum(p.numel() for p in runs["dense"][0].parameters()),
        "topology_updates_done": engine.num_updates,
        "dense_step_s_median": statistics.median(times["dense"]),
        "rigl_step_s_median": statistics.median(times["rigl"]),
        "ratio_median": statistics.median(ratios),
        "ratio_of_medians": statistics.median(times["rigl"]) / statistics.median(times["dense"]),
        "ratio_per_block": ratios,
    }


class _Stack(nn.Module):
    def __init__(self, width: int, depth: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width, bias=False) for _ in range(depth))

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def update_time(width: int, depth: int, method: str, repeats: int) -> dict:
    torch.manual_seed(0)
    model = _Stack(width, depth)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    engine = sparsediff.sparsify(
        model,
        opt,
        method=method,
        sparsity=0.9,
        update_every=1,
        end_step="never",
        decay="constant",
        prune_ratio=0.3,
    )
    x = torch.randn(8, width)
    times = []
    for _ in range(repeats):
        model(x).pow(2).mean().backward()
        engine.mask_gradients()  # keeps |grad| for RigL: the update below is due
        opt.step()
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
        opt.zero_grad(set_to_none=True)
    assert engine.num_updates == repeats and not engine.check_invariants()
    return {
        "method": method,
        "params": sum(p.numel() for p in model.parameters()),
        "layers": depth,
        "update_s_median": statistics.median(times),
        "update_s_all": times,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="ldm-fmnist,unet-tiny", help="comma-separated preset names")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--blocks", type=int, default=12)
    ap.add_argument("--update-every", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    result = {
        "machine": {
            "cpu_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "python": sys.version.split()[0],
        },
        "step_time": [
            step_time_ratio(preset, args.batch, args.blocks, args.update_every, 0.9)
            for preset in args.presets.split(",")
        ],
        "topology_update": [
            update_time(width, depth, method, args.repeats)
            for width, depth in ((1000, 1), (2000, 25))  # 1.0 M and 100 M parameters
            for method in ("rigl", "magran")
        ],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    for st in result["step_time"]:
        print(
            f"step time, {st['preset']} batch {st['batch_size']}: dense {st['dense_step_s_median'] * 1e3:.1f} ms, "
            f"RigL 90% {st['rigl_step_s_median'] * 1e3:.1f} ms, ratio (median of {st['blocks']} blocks) "
            f"{st['ratio_median']:.3f}"
        )
    for u in result["topology_update"]:
        print(
            f"topology update, {u['method']:<6} {u['params'] / 1e6:6.1f} M params: {u['update_s_median'] * 1e3:8.1f} ms"
        )
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
