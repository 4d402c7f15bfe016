"""``sparsediff demo``: the main job on bundled data, end to end.

``--engine`` runs the engine-only demo: the same small network trained dense and 90 %-sparse with RigL
on a synthetic regression task (a fixed random teacher), printing losses and the density report.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from .sparse import count_flops, sparsify


def _teacher_task(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    teacher = nn.Sequential(nn.Linear(32, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 8))
    for p in teacher.parameters():
        p.requires_grad_(False)
        p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)

    def batch(gen: torch.Generator, n: int = 128):
        x = torch.randn(n, 32, generator=gen)
        return x, teacher(x)

    return batch


def engine_demo(steps: int = 1500, sparsity: float = 0.9, quiet: bool = False) -> dict:
    batch = _teacher_task()
    results = {}
    for method in ("dense", "rigl"):
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Linear(32, 512), nn.GELU(), nn.Linear(512, 512), nn.GELU(), nn.Linear(512, 8)
        )
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-2)
        engine = sparsify(
            model,
            opt,
            method=method,
            sparsity=sparsity,
            distribution="erk",
            update_every=100,
            total_steps=steps,
            prune_ratio=0.3,
        )
        gen = torch.Generator().manual_seed(1)
        t0, losses = time.perf_counter(), []
        for step in range(1, steps + 1):
            x, y = batch(gen)
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            engine.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if not quiet and step % 500 == 0:
                print(f"  {method:<5} step {step:>5}  loss {sum(losses[-100:]) / 100:.5f}")
        elapsed = time.perf_counter() - t0
        x, y = batch(torch.Generator().manual_seed(99), 4096)
        with torch.no_grad():
            test = nn.functional.mse_loss(model(x), y).item()
        flops = count_flops(model, (x[:1],), engine)
        results[method] = {
            "test_mse": test,
            "seconds": elapsed,
            "updates": engine.num_updates,
            "report": engine.report(),
            "flops_dense": flops.flops_dense,
            "flops_sparse": flops.flops_sparse,
        }
        if not quiet:
            print(f"\n{method}: density report\n{engine.report()}\n")
    if not quiet:
        print(
            f"{'method':<8} {'test MSE':>10} {'density':>8} {'FLOPs/sample':>13} {'updates':>8} {'time':>7}"
        )
        for m, r in results.items():
            print(
                f"{m:<8} {r['test_mse']:>10.5f} {r['report'].density:>8.3f} {r['flops_sparse']:>13,} "
                f"{r['updates']:>8} {r['seconds']:>6.1f}s"
            )
    return results


def main(args) -> int:
    engine_demo(steps=args.steps, quiet=args.quiet)
    return 0
