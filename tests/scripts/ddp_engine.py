"""Run under torchrun (gloo, CPU): DDP training with the engine; rank 0 writes what every rank saw."""

import gc
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sparsediff  # noqa: E402
from helpers import LayerBank  # noqa: E402


def run(rank: int, world: int) -> dict:
    """Train each method and wrapping order for 30 steps; what every rank saw, gathered."""
    results = {}
    for method in ("rigl", "magran"):
        for wrap_first in (False, True):
            torch.manual_seed(100 + rank)  # different initial weights per rank: DDP must broadcast rank 0's
            model = LayerBank([("linear", 16, 12), ("conv", 3, 6, 3), ("gru", 4, 6)])
            settings = dict(
                method=method, sparsity=0.8, update_every=2, total_steps=60, prune_ratio=0.5, seed=3
            )
            ddp = DDP(model) if wrap_first else None  # the engine sees the DDP wrapper, or the bare model
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
            engine = sparsediff.sparsify(model if ddp is None else ddp, opt, **settings)
            if ddp is None:
                ddp = DDP(model)
            changes = 0
            for step in range(30):
                gen = torch.Generator().manual_seed(10_000 * rank + step)  # each rank its own data
                ddp(model.inputs(gen)).backward()  # DDP all-reduces the (dense) gradients
                opt.step()
                changes += engine.step()
                opt.zero_grad()
            masks = torch.cat([engine.masks[n].reshape(-1).to(torch.uint8) for n in engine.names])
            weights = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
            gathered_m = [torch.zeros_like(masks) for _ in range(world)]
            gathered_w = [torch.zeros_like(weights) for _ in range(world)]
            dist.all_gather(gathered_m, masks)
            dist.all_gather(gathered_w, weights)
            mismatch = torch.tensor([engine.stats["sync_mismatch"]])
            dist.all_reduce(mismatch)
            results[f"{method}-wrap{int(wrap_first)}"] = {
                "masks_equal": all(torch.equal(gathered_m[0], g) for g in gathered_m),
                "weights_equal": all(torch.equal(gathered_w[0], g) for g in gathered_w),
                "sync_mismatch": int(mismatch),
                "updates": engine.num_updates,
                "changes": int(changes),
                "invariants": engine.check_invariants(),
            }
    return results


# The DDP wrappers hold the process group: they must be gone (the function returned, reference cycles
# collected) before it is destroyed, or the group is torn down at interpreter exit, which can abort the process.
dist.init_process_group("gloo")
results = run(dist.get_rank(), dist.get_world_size())
gc.collect()
if dist.get_rank() == 0:
    Path(sys.argv[1]).write_text(json.dumps(results, indent=2))
dist.destroy_process_group()
