"""Train a small model with the engine for steps [start, stop), optionally loading / saving everything.

Used by test_engine_distributed.py to check exact resumption across processes, on either backend (with
``--backend sparse`` the model's state dict holds the compact layers: values and their layout).
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from safetensors.torch import load_file, save_file  # noqa: E402

import sparsediff  # noqa: E402
from helpers import LayerBank  # noqa: E402
from sparsediff.sparse import load_engine_state, save_engine_state  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--method", required=True)
ap.add_argument("--backend", default="dense")
ap.add_argument("--start", type=int, default=0)
ap.add_argument("--stop", type=int, required=True)
ap.add_argument("--load")
ap.add_argument("--save", required=True)
a = ap.parse_args()

torch.manual_seed(0)
model = LayerBank([("linear", 16, 12), ("conv", 3, 6, 3), ("gru", 4, 6)])
opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
engine = sparsediff.sparsify(
    model,
    opt,
    method=a.method,
    sparsity=0.8,
    update_every=3,
    total_steps=40,
    prune_ratio=0.5,
    seed=7,
    backend=a.backend,
)
if a.load:
    d = Path(a.load)
    model.load_state_dict(load_file(d / "model.safetensors"))
    opt.load_state_dict(torch.load(d / "optimizer.pt", weights_only=True))
    load_engine_state(engine, d / "engine.safetensors")
    assert engine.step_count == a.start, (engine.step_count, a.start)

for step in range(a.start, a.stop):
    gen = torch.Generator().manual_seed(1000 + step)  # the data of a step depends on the step only
    model.loss(model.inputs(gen)).backward()
    opt.step()
    engine.step()
    opt.zero_grad(set_to_none=True)

out = Path(a.save)
out.mkdir(parents=True, exist_ok=True)
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "model.safetensors")
torch.save(opt.state_dict(), out / "optimizer.pt")
save_engine_state(engine, out / "engine.safetensors")
print("updates", engine.num_updates)
