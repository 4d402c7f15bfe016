"""A loop shaped like diffusers' unconditional training script, made sparse with one sparsify() call.

accelerate (prepare, gradient accumulation, clipping, save_state / load_state), a diffusers UNet2DModel
and EMAModel, a learning-rate scheduler; the data of each step depends on the step only, so a run
resumed in a new process can be compared with a straight one bit for bit.

    python accelerate_loop.py --out DIR --stop N [--save-at K] [--resume CHECKPOINT_DIR] [--backend sparse]

With ``--backend sparse`` the UNet trains on compact layers: sparsify comes before accelerator.prepare
(the compact layers replace the parameters prepare would hold), and the EMA, built on the dense model,
is made compact by the engine. Writes DIR/result.safetensors (model, EMA shadows, masks; the sparsified
weights in their dense shape whatever the backend) and DIR/result.json (engine counters, the topology
updates this process made, the clip norms).
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers.training_utils import EMAModel
from safetensors.torch import save_file

import sparsediff

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared test models
from helpers import tiny_unet  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--out", required=True)
ap.add_argument("--stop", type=int, required=True)
ap.add_argument("--save-at", type=int)
ap.add_argument("--resume")
ap.add_argument("--backend", default="dense")
a = ap.parse_args()

TOTAL_STEPS, ACCUM, BATCH = 10, 2, 4
accelerator = Accelerator(cpu=True, gradient_accumulation_steps=ACCUM)
torch.manual_seed(0)
unet = tiny_unet()
ema = EMAModel(unet.parameters(), decay=0.9, use_ema_warmup=True, power=0.75)
optimizer = torch.optim.AdamW(unet.parameters(), lr=3e-3, weight_decay=1e-2)
lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 3))


def make_sparse(unet, optimizer):
    return sparsediff.sparsify(
        unet,
        optimizer,
        method="rigl",
        sparsity=0.8,
        update_every=2,
        prune_ratio=0.5,
        total_steps=TOTAL_STEPS,
        accelerator=accelerator,
        ema=ema,
        backend=a.backend,
    )


if a.backend == "sparse":
    engine = make_sparse(unet, optimizer)
unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
ema.to(accelerator.device)
if a.backend == "dense":  # the masked engine is built on the prepared objects, as a diffusers script would
    engine = make_sparse(unet, optimizer)
accelerator.register_for_checkpointing(ema)

step = 0
if a.resume:
    accelerator.load_state(a.resume)
    ema.to(accelerator.device)
    step = int(Path(a.resume).name.split("-")[1])  # as the diffusers script reads global_step

updates = []
norms = []
while step < a.stop:
    for micro in range(ACCUM):
        gen = torch.Generator().manual_seed(1000 * step + micro)
        clean = torch.randn(BATCH, 4, 8, 8, generator=gen)
        noise = torch.randn(BATCH, 4, 8, 8, generator=gen)
        t = torch.randint(0, 1000, (BATCH,), generator=gen)
        alpha = (1.0 - t.float() / 1000).view(-1, 1, 1, 1)
        noisy = alpha.sqrt() * clean + (1 - alpha).sqrt() * noise
        with accelerator.accumulate(unet):
            loss = F.mse_loss(unet(noisy, t).sample, noise)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                norms.append(float(accelerator.clip_grad_norm_(unet.parameters(), 0.5)))
            optimizer.step()
            lr_scheduler.step()
            if engine.step():
                u = engine.last_update
                updates.append([u.step, u.drop_fraction, u.dropped, u.new])
            optimizer.zero_grad()
    if accelerator.sync_gradients:
        ema.step(unet.parameters())
        step += 1
        if step == a.save_at:
            accelerator.save_state(str(Path(a.out) / f"checkpoint-{step}"))

out = Path(a.out)
out.mkdir(parents=True, exist_ok=True)
model = accelerator.unwrap_model(unet)
targets = {id(p): n for n, p in engine.named_parameters()}  # the dense weights, or the compact values
tensors = {}
for (pname, p), shadow in zip(model.named_parameters(), ema.shadow_params):  # the EMA's order is the model's
    if id(p) in targets:
        name = targets[id(p)]
        tensors[f"model/{name}"] = engine.dense_view(name).clone()
        tensors[f"ema/{name}"] = engine.dense_view(name, shadow).clone()
    else:
        tensors[f"model/{pname}"] = p.detach().clone()
        tensors[f"ema/{pname}"] = shadow.detach().clone()
tensors.update({f"mask/{n}": m.to(torch.uint8) for n, m in engine.masks.items()})
save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "result.safetensors"))
state = engine.state_dict()
result = {
    "step": step,
    "engine_step": engine.step_count,
    "num_updates": engine.num_updates,
    "end_step": engine.end_step,
    "updates": updates,
    "norms": norms,
    "config": state["config"],
    "budgets": state["budgets"],
    "idle_calls": engine.stats["idle_calls"],
}
(out / "result.json").write_text(json.dumps(result))
