"""Run under torchrun (gloo, CPU): DDP training with the engine; rank 0 writes what every rank saw.

Both backends: the masked engine built on the bare model or on the DDP wrapper, and compact layers
(``backend="sparse"``), which must be built before the wrapper (the other order is refused). On compact
layers RigL's growth reads a dense gradient that DDP never sees (each layer's backward hands it to the
engine's capture): the capture all-reduces it, so that every rank grows the same weights on its own. The
``rigl-sparse-unsynced`` run takes that all-reduce away: the ranks then choose different masks, and only
the broadcast of rank 0's masks keeps them equal (counted in ``sync_mismatch``).
"""

import gc
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sparsediff  # noqa: E402
import sparsediff.sparse.compact_engine as compact_engine  # noqa: E402
from helpers import LayerBank  # noqa: E402
from sparsediff.errors import ConfigError  # noqa: E402

RUNS = [  # (key, method, backend, wrap first, the capture's all-reduce)
    *[(f"{m}-wrap{w}", m, "dense", bool(w), True) for m in ("rigl", "magran") for w in (0, 1)],
    ("rigl-sparse", "rigl", "sparse", False, True),
    ("magran-sparse", "magran", "sparse", False, True),
    ("rigl-sparse-unsynced", "rigl", "sparse", False, False),
]


def refused_after_wrapping(rank: int) -> str:
    """The message sparsify(..., backend="sparse") gives for a model already wrapped in DDP."""
    torch.manual_seed(100 + rank)
    model = LayerBank([("linear", 16, 12)])
    ddp = DDP(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    try:
        sparsediff.sparsify(ddp, opt, method="rigl", sparsity=0.8, total_steps=60, backend="sparse")
    except ConfigError as e:
        return str(e)
    return ""


def train(rank: int, world: int, method: str, backend: str, wrap_first: bool) -> dict:
    """30 steps of one run; what every rank saw, gathered."""
    torch.manual_seed(100 + rank)  # different initial weights per rank: DDP must broadcast rank 0's
    model = LayerBank([("linear", 16, 12), ("conv", 3, 6, 3), ("gru", 4, 6)])
    settings = dict(
        method=method, sparsity=0.8, update_every=2, total_steps=60, prune_ratio=0.5, seed=3, backend=backend
    )
    ddp = DDP(model) if wrap_first else None  # the engine sees the DDP wrapper, or the bare model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    engine = sparsediff.sparsify(model if ddp is None else ddp, opt, **settings)
    if ddp is None:
        ddp = DDP(model)
    changes = 0
    for step in range(30):
        gen = torch.Generator().manual_seed(10_000 * rank + step)  # each rank its own data
        ddp(model.inputs(gen)).backward()  # DDP all-reduces the gradients of the parameters
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
    return {
        "masks_equal": all(torch.equal(gathered_m[0], g) for g in gathered_m),
        "weights_equal": all(torch.equal(gathered_w[0], g) for g in gathered_w),
        "sync_mismatch": int(mismatch),
        "updates": engine.num_updates,
        "changes": int(changes),
        "invariants": engine.check_invariants(),
    }


def run(rank: int, world: int) -> dict:
    """Every run of RUNS, and the refusal of compact layers under an existing DDP wrapper."""
    results = {}
    for key, method, backend, wrap_first, synced in RUNS:
        average = compact_engine.average_
        if not synced:  # the engine looks the all-reduce up whenever it arms a capture
            compact_engine.average_ = lambda tensor: None
        try:
            results[key] = train(rank, world, method, backend, wrap_first)
        finally:
            compact_engine.average_ = average
    results["sparse-after-wrapping"] = refused_after_wrapping(rank)
    return results


# The DDP wrappers hold the process group: they must be gone (the function returned, reference cycles
# collected) before it is destroyed, or the group is torn down at interpreter exit, which can abort the process.
dist.init_process_group("gloo")
results = run(dist.get_rank(), dist.get_world_size())
gc.collect()
if dist.get_rank() == 0:
    Path(sys.argv[1]).write_text(json.dumps(results, indent=2))
dist.destroy_process_group()
