"""The engine inside loops built on accelerate and diffusers: checkpoints across processes, weights
arriving without the engine's state, sparsify before or after prepare, EMA copies, sparse clipping,
diffusers folders out and back, and the README's accelerate script."""

from __future__ import annotations

import copy
import json
import re
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import sparsediff
from helpers import PYTHON, SCRIPTS, TINY_LDM, LayerBank, invariant_problems, python_env, tiny_unet
from helpers import tiny_ldm as tiny
from sparsediff.checkpoint import load_tensors
from sparsediff.errors import ConfigError, StateError
from sparsediff.run import RunDir
from sparsediff.sparse.io import engine_state_from_tensors

README = Path(__file__).resolve().parents[1] / "README.md"

# ---------------------------------------------------------------- helpers


def _unet_batch(gen: torch.Generator, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(batch, 4, 8, 8, generator=gen), torch.randint(0, 1000, (batch,), generator=gen)


def _unet_steps(unet, opt, engine, steps: int, seed: int, ema=None, clip=None) -> None:
    """``steps`` optimiser steps of a denoising-shaped loss on seeded data."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, t = _unet_batch(gen)
        (unet(x, t).sample - x).pow(2).mean().backward()
        if clip is not None:
            clip()
        opt.step()
        engine.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(unet.parameters())


def _zero_where_masked(tensors: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> list[str]:
    return [n for n, m in masks.items() if bool((tensors[n][~m.bool()] != 0).any())]


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [PYTHON, *args], env=python_env(), cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


# ---------------------------------------------------------------- 1. accelerate checkpoints across processes


@pytest.mark.parametrize("backend", ["dense", "sparse"])
def test_accelerate_loop_resumed_in_a_new_process_equals_the_straight_run(tmp_path, backend):
    script = str(SCRIPTS / "accelerate_loop.py")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    # the straight run also saves its state at step 4; a new process resumes from there
    _run(script, "--backend", backend, "--out", str(straight), "--stop", "10", "--save-at", "4")
    _run(
        script,
        "--backend",
        backend,
        "--out",
        str(resumed),
        "--stop",
        "10",
        "--resume",
        str(straight / "checkpoint-4"),
    )
    a, b = (json.loads((d / "result.json").read_text()) for d in (straight, resumed))
    ta, tb = (load_file(d / "result.safetensors") for d in (straight, resumed))

    # the engine came back with its step count and schedule: the same updates at the same steps
    assert a["engine_step"] == b["engine_step"] == 10 and a["num_updates"] == b["num_updates"] == 3
    assert [u[0] for u in a["updates"]] == [2, 4, 6]
    assert b["updates"] == [u for u in a["updates"] if u[0] > 4]  # step, drop fraction, dropped, new
    assert a["end_step"] == b["end_step"] and a["config"] == b["config"] and a["budgets"] == b["budgets"]
    assert b["norms"] == a["norms"][4:]  # clip norms of the resumed steps
    # masks, weights and EMA bit for bit
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    # the final model and its EMA are exactly zero at every masked position
    masks = {k[len("mask/") :]: v.bool() for k, v in ta.items() if k.startswith("mask/")}
    assert len(masks) > 40 and sum(int(m.sum()) for m in masks.values()) == sum(a["budgets"].values())
    for prefix in ("model/", "ema/"):
        weights = {k[len(prefix) :]: v for k, v in ta.items() if k.startswith(prefix)}
        assert _zero_where_masked(weights, masks) == [], prefix
    # the topology moved: the final masks are not the initial random ones
    torch.manual_seed(0)
    fresh = sparsediff.sparsify(tiny_unet(), None, method="rigl", sparsity=0.8, total_steps=10)
    assert any(not torch.equal(fresh.masks[n], masks[n]) for n in masks)


# ---------------------------------------------------------------- 2. weights without the engine's state


def _accelerated(accelerate_engine: bool, seed: int = 0):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(seed)
    unet = tiny_unet()
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-2, weight_decay=1e-2)
    unet, opt = accelerator.prepare(unet, opt)
    engine = sparsediff.sparsify(
        unet,
        opt,
        method="rigl",
        sparsity=0.8,
        update_every=2,
        total_steps=20,
        accelerator=accelerator if accelerate_engine else None,
    )
    return accelerator, unet, opt, engine


def test_loading_a_checkpoint_without_the_engine_state_is_refused(tmp_path):
    accelerator, unet, opt, engine = _accelerated(accelerate_engine=False)
    _unet_steps(unet, opt, engine, 4, seed=1)
    assert engine.num_updates == 2
    trained = {n: m.clone() for n, m in engine.masks.items()}
    accelerator.save_state(str(tmp_path / "ckpt"))  # the engine is not registered: not in the checkpoint

    accelerator, unet, opt, engine = _accelerated(accelerate_engine=False)
    accelerator.load_state(str(tmp_path / "ckpt"))
    assert engine.step_count == 0  # a fresh engine with its initial masks
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    gen = torch.Generator().manual_seed(5)
    x, t = _unet_batch(gen)
    (unet(x, t).sample - x).pow(2).mean().backward()
    with pytest.raises(StateError) as info:
        opt.step()
    msg = str(info.value)
    layer, count = re.search(
        r"layer '([^']+)' has (\d+) non-zero weights at positions its mask prunes", msg
    ).groups()
    # the count is the number of trained weights outside the fresh mask, in that layer
    weight = dict(unet.named_parameters())[layer].detach()
    assert int(count) == int((weight[~engine.masks[layer]] != 0).sum()) > 0
    assert int(count) <= int((trained[layer] & ~engine.masks[layer]).sum())  # grown ones can still be 0
    assert "accelerator.register_for_checkpointing(engine)" in msg and "load_state_dict" in msg
    # refused before anything changed: no weight was zeroed or updated
    for n, p in unet.named_parameters():
        assert torch.equal(p.detach(), before[n]), n


def test_with_the_engine_registered_the_checkpoint_restores_it(tmp_path):
    accelerator, unet, opt, engine = _accelerated(accelerate_engine=True)
    _unet_steps(unet, opt, engine, 4, seed=1)
    trained = {n: m.clone() for n, m in engine.masks.items()}
    accelerator.save_state(str(tmp_path / "ckpt"))

    accelerator, unet, opt, engine = _accelerated(accelerate_engine=True)
    accelerator.load_state(str(tmp_path / "ckpt"))
    assert engine.step_count == 4 and engine.num_updates == 2
    assert all(torch.equal(engine.masks[n], trained[n]) for n in trained)
    _unet_steps(unet, opt, engine, 2, seed=2)  # steps without complaint
    assert engine.step_count == 6 and invariant_problems(engine, opt) == []


def test_sparsify_after_loading_sparse_weights_is_refused_unless_asked():
    torch.manual_seed(0)
    unet = tiny_unet()
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-2)
    engine = sparsediff.sparsify(unet, opt, method="rigl", sparsity=0.8, update_every=2, total_steps=20)
    _unet_steps(unet, opt, engine, 5, seed=1)  # step 5 trains the weights grown at step 4 away from 0
    sparse_state = copy.deepcopy(unet.state_dict())
    masks = {n: m.clone() for n, m in engine.masks.items()}

    def fresh():
        torch.manual_seed(1)
        model = tiny_unet()
        model.load_state_dict(sparse_state)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2)

    # new random masks over sparse-trained weights would zero some of them
    model, opt = fresh()
    with pytest.raises(StateError, match=r"already has \d+ of \d+ weights at exactly 0.*masks='weights'"):
        sparsediff.sparsify(model, opt, method="rigl", sparsity=0.8, total_steps=20)
    assert all(torch.equal(p, sparse_state[n]) for n, p in model.state_dict().items())
    # masks="weights" keeps exactly the trained topology (no active weight is 0 here)
    model, opt = fresh()
    kept = sparsediff.sparsify(model, opt, method="rigl", sparsity=0.8, total_steps=20, masks="weights")
    assert all(torch.equal(kept.masks[n], masks[n]) for n in masks)
    assert all(torch.equal(p, sparse_state[n]) for n, p in model.state_dict().items())
    # pruning loaded weights on purpose: load after sparsify, then apply_masks()
    torch.manual_seed(1)
    model = tiny_unet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    other = sparsediff.sparsify(model, opt, method="static", sparsity=0.8, seed=3)
    model.load_state_dict(sparse_state)
    other.apply_masks()
    _unet_steps(model, opt, other, 1, seed=2)
    assert invariant_problems(other, opt) == []


def test_weights_changed_by_the_engine_itself_or_restored_with_it_pass_the_check():
    model = LayerBank([("linear", 12, 10), ("conv", 3, 5, 3)])
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    engine = sparsediff.sparsify(
        model, opt, method="magran", sparsity=0.7, update_every=1, end_step="never", decay="constant"
    )
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):  # an update at every step
        model.loss(model.inputs(gen)).backward()
        opt.step()
        assert engine.step()
        opt.zero_grad()
    state, weights = engine.state_dict(), copy.deepcopy(model.state_dict())
    model.load_state_dict(weights)  # the same (masked) weights: allowed
    model.loss(model.inputs(gen)).backward()
    opt.step()
    engine.step()
    # weights and engine restored together, in either order
    model.load_state_dict(weights)
    engine.load_state_dict(state)
    opt.zero_grad()
    model.loss(model.inputs(gen)).backward()
    opt.step()
    engine.load_state_dict(state)
    model.load_state_dict(weights)
    opt.zero_grad()
    model.loss(model.inputs(gen)).backward()
    opt.step()
    assert engine.check_invariants() == []


# ---------------------------------------------------------------- 3. before or after prepare, devices


def test_sparsify_before_and_after_prepare_give_the_same_masks_and_training():
    from accelerate import Accelerator

    runs = []
    for order in ("before", "after"):
        accelerator = Accelerator(cpu=True)
        torch.manual_seed(0)
        unet = tiny_unet()
        opt = torch.optim.AdamW(unet.parameters(), lr=1e-2, weight_decay=1e-2)
        kwargs = {"method": "rigl", "sparsity": 0.8, "update_every": 2, "total_steps": 20}
        if order == "before":
            engine = sparsediff.sparsify(unet, opt, accelerator=accelerator, **kwargs)
            unet, opt = accelerator.prepare(unet, opt)
        else:
            unet, opt = accelerator.prepare(unet, opt)
            engine = sparsediff.sparsify(unet, opt, accelerator=accelerator, **kwargs)
        initial = {n: m.clone() for n, m in engine.masks.items()}
        _unet_steps(
            unet,
            opt,
            engine,
            4,
            seed=1,
            clip=lambda u=unet, a=accelerator: a.clip_grad_norm_(u.parameters(), 1.0),
        )
        runs.append((initial, engine.masks, copy.deepcopy(accelerator.unwrap_model(unet).state_dict())))
    (i0, m0, w0), (i1, m1, w1) = runs
    assert i0.keys() == i1.keys() and all(torch.equal(i0[n], i1[n]) for n in i0)
    assert all(torch.equal(m0[n], m1[n]) for n in m0)
    assert all(torch.equal(w0[k], w1[k]) for k in w0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_sparsify_on_the_cpu_then_prepare_on_the_gpu():
    from accelerate import Accelerator

    accelerator = Accelerator()
    torch.manual_seed(0)
    unet = tiny_unet()
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-2)
    kwargs = {"method": "rigl", "sparsity": 0.8, "update_every": 2, "total_steps": 20}
    engine = sparsediff.sparsify(unet, opt, accelerator=accelerator, **kwargs)  # masks made on the CPU
    cpu_masks = {n: m.clone() for n, m in engine.masks.items()}
    unet, opt = accelerator.prepare(unet, opt)  # moves the weights to the GPU
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        x, t = _unet_batch(gen)
        x, t = x.to(accelerator.device), t.to(accelerator.device)
        accelerator.backward((unet(x, t).sample - x).pow(2).mean())
        accelerator.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        engine.step()
        opt.zero_grad()
    assert engine.num_updates == 2 and engine.check_invariants() == []
    assert all(m.device.type == "cuda" for m in engine.masks.values())
    torch.manual_seed(0)
    reference = accelerator.prepare(tiny_unet())
    ref_engine = sparsediff.sparsify(reference, None, **kwargs)  # built on the GPU
    assert all(torch.equal(ref_engine.masks[n].cpu(), cpu_masks[n]) for n in cpu_masks)


def test_masks_follow_weights_moved_to_another_dtype():
    torch.manual_seed(0)
    unet = tiny_unet()
    reference = copy.deepcopy(unet).double()
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-2)
    engine = sparsediff.sparsify(unet, opt, method="rigl", sparsity=0.8, update_every=2, total_steps=20)
    unet.double()  # moved after sparsify, as prepare moves a model to the GPU
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    ref_engine = sparsediff.sparsify(
        reference, ref_opt, method="rigl", sparsity=0.8, update_every=2, total_steps=20
    )
    assert all(torch.equal(engine.masks[n], ref_engine.masks[n]) for n in engine.names)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        x, t = _unet_batch(gen)
        for model, o, e in ((unet, opt, engine), (reference, ref_opt, ref_engine)):
            (model(x.double(), t).sample - x.double()).pow(2).mean().backward()
            o.step()
            e.step()
            o.zero_grad()
    assert engine.num_updates == 2 and invariant_problems(engine, opt) == []
    assert all(torch.equal(engine.masks[n], ref_engine.masks[n]) for n in engine.names)
    assert all(torch.equal(a, b) for a, b in zip(unet.state_dict().values(), reference.state_dict().values()))


def test_a_model_on_the_meta_device_gets_the_same_masks_once_materialised():
    torch.manual_seed(0)
    dense = tiny_unet().state_dict()
    kwargs = {"method": "rigl", "sparsity": 0.8, "update_every": 2, "total_steps": 20}
    reference = tiny_unet()
    reference.load_state_dict(dense)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    ref_engine = sparsediff.sparsify(reference, ref_opt, **kwargs)

    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)  # Parameters keep their identity
    try:
        with torch.device("meta"):
            unet = tiny_unet()
        opt = torch.optim.AdamW(unet.parameters(), lr=1e-2)
        engine = sparsediff.sparsify(unet, opt, **kwargs)
        assert all(m.device.type == "cpu" for m in engine.masks.values())  # made where values exist
        unet.to_empty(device="cpu")
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
    unet.load_state_dict(dense)
    gen = torch.Generator().manual_seed(0)
    x, t = _unet_batch(gen)
    (unet(x, t).sample - x).pow(2).mean().backward()
    with pytest.raises(StateError, match=r"meta device.*engine.apply_masks\(\)"):
        opt.step()  # the masks are not on the weights yet
    opt.zero_grad()
    engine.apply_masks()
    assert all(torch.equal(engine.masks[n], ref_engine.masks[n]) for n in engine.names)
    _unet_steps(unet, opt, engine, 4, seed=1)
    _unet_steps(reference, ref_opt, ref_engine, 4, seed=1)
    assert all(torch.equal(engine.masks[n], ref_engine.masks[n]) for n in engine.names)
    assert all(torch.equal(a, b) for a, b in zip(unet.state_dict().values(), reference.state_dict().values()))


def test_weights_replaced_by_a_meta_to_empty_move_are_named():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = sparsediff.sparsify(model, opt, method="static", sparsity=0.5)
    model.to_empty(device="cpu")  # new Parameters: the engine and the optimiser keep the meta ones
    with pytest.raises(StateError, match=r"'0.weight' is on the meta device"):
        engine.apply_masks()
        for p in opt.param_groups[0]["params"]:
            p.grad = torch.zeros_like(p)
        opt.step()


# ---------------------------------------------------------------- clipping


def test_accelerator_clip_grad_norm_clips_the_sparse_gradient():
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    unet = tiny_unet()
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    unet, opt = accelerator.prepare(unet, opt)
    engine = sparsediff.sparsify(unet, opt, method="static", sparsity=0.9, accelerator=accelerator)
    x, t = _unet_batch(torch.Generator().manual_seed(0))
    (unet(x, t).sample - x).pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in unet.named_parameters()}
    masked = {n: g * engine.masks[n] if n in engine.masks else g for n, g in grads.items()}
    dense_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads.values()]))
    sparse_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in masked.values()]))
    assert sparse_norm < 0.9 * dense_norm
    norm = accelerator.clip_grad_norm_(unet.parameters(), 1e9)
    assert torch.allclose(norm, sparse_norm, rtol=1e-6)
    # attaching again changes nothing; remove() stops the masking
    engine.attach_accelerator(accelerator)
    engine.remove()
    for n, p in unet.named_parameters():
        p.grad = grads[n].clone()
    assert torch.allclose(accelerator.clip_grad_norm_(unet.parameters(), 1e9), dense_norm, rtol=1e-6)
    with pytest.raises(ConfigError, match="accelerate.Accelerator"):
        sparsediff.sparsify(nn.Linear(4, 4), None, method="static", sparsity=0.5, accelerator=object())


def test_accelerator_clip_grad_norm_on_compact_layers_is_the_masked_norm():
    """With backend='sparse' a gradient exists only at the kept positions: the accelerator's norm and
    the clipped gradients are the masked engine's for the same model, masks and batch (up to float32
    rounding: the compact layers sum in another order)."""
    from accelerate import Accelerator

    norms, grads = {}, {}
    for backend in ("dense", "sparse"):
        accelerator = Accelerator(cpu=True)
        torch.manual_seed(0)
        unet = tiny_unet()
        opt = torch.optim.AdamW(unet.parameters(), lr=1e-3)
        kwargs = {"method": "static", "sparsity": 0.9, "accelerator": accelerator, "backend": backend}
        if backend == "sparse":  # compact layers replace the parameters: before prepare
            engine = sparsediff.sparsify(unet, opt, **kwargs)
            unet, opt = accelerator.prepare(unet, opt)
        else:
            unet, opt = accelerator.prepare(unet, opt)
            engine = sparsediff.sparsify(unet, opt, **kwargs)
        x, t = _unet_batch(torch.Generator().manual_seed(0))
        (unet(x, t).sample - x).pow(2).mean().backward()
        norms[backend] = float(accelerator.clip_grad_norm_(unet.parameters(), 0.05))
        model = accelerator.unwrap_model(unet)
        grads[backend] = _by_dense_name(engine, model, [p.grad for p in model.parameters()])
    assert norms["dense"] > 0.05  # so the clipping scaled every gradient
    assert norms["sparse"] == pytest.approx(norms["dense"], rel=1e-5)
    assert grads["sparse"].keys() == grads["dense"].keys()
    # one absolute scale for all: some gradients are 0 up to rounding (attention's key bias)
    scale = max(float(g.abs().max()) for g in grads["dense"].values())
    for n, g in grads["dense"].items():
        assert torch.allclose(grads["sparse"][n], g, rtol=1e-4, atol=1e-6 * scale), n


def test_clipping_leaves_an_accumulating_gradient_alone():
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = LayerBank([("linear", 12, 10)])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = accelerator.prepare(model, opt)
    engine = sparsediff.sparsify(model, opt, method="static", sparsity=0.7, accelerator=accelerator)
    gen = torch.Generator().manual_seed(0)
    with accelerator.accumulate(model):  # the first micro-batch: gradients are not complete yet
        accelerator.backward(model.loss(model.inputs(gen)))
        assert not accelerator.sync_gradients
        grad = model.layers[0].weight.grad.clone()
        accelerator.clip_grad_norm_(model.parameters(), 1e9)
        assert torch.equal(model.layers[0].weight.grad, grad)
        opt.step()
        engine.step()
    with accelerator.accumulate(model):
        accelerator.backward(model.loss(model.inputs(gen)))
        assert accelerator.sync_gradients
        accelerator.clip_grad_norm_(model.parameters(), 1e9)
        assert bool((model.layers[0].weight.grad[~engine.masks["layers.0.weight"]] == 0).all())
        opt.step()
        engine.step()
    assert engine.step_count == 1 and engine.check_invariants() == []


# ---------------------------------------------------------------- EMA copies


def _by_dense_name(engine, model, tensors) -> dict[str, torch.Tensor]:
    """``tensors`` (one per parameter of ``model``, in its order: the model's own, an EMA's shadows)
    by the dense parameter's name and in its shape, for either backend (compact values seen through
    ``engine.dense_view``)."""
    targets = {id(p): n for n, p in engine.named_parameters()}
    out = {}
    for (pname, p), t in zip(model.named_parameters(), tensors):
        name = targets.get(id(p))
        out[pname if name is None else name] = t.detach() if name is None else engine.dense_view(name, t)
    return out


@pytest.mark.parametrize("backend", ["dense", "sparse"])
def test_diffusers_ema_stays_exactly_as_sparse_as_the_model(backend):
    from diffusers.training_utils import EMAModel

    torch.manual_seed(0)
    unet = tiny_unet()
    ema = EMAModel(unet.parameters(), decay=0.9)  # built before sparsify: dense shadows
    plain = EMAModel(unet.parameters(), decay=0.9)  # the same EMA, not attached
    reference = {n: p.detach().clone() for n, p in unet.named_parameters()}  # computed by hand below
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-2, weight_decay=1e-2)
    engine = sparsediff.sparsify(
        unet,
        opt,
        method="rigl",
        sparsity=0.8,
        update_every=2,
        prune_ratio=0.5,
        total_steps=40,
        ema=ema,
        backend=backend,
    )
    gen = torch.Generator().manual_seed(0)
    for step in range(1, 7):
        x, t = _unet_batch(gen)
        (unet(x, t).sample - x).pow(2).mean().backward()
        opt.step()
        changed = engine.step()
        opt.zero_grad()
        shadows = _by_dense_name(engine, unet, ema.shadow_params)
        for n in engine.names:  # right after a topology update the EMA is already masked
            assert bool((shadows[n][~engine.masks[n]] == 0).all()), (step, n)
        ema.step(unet.parameters())
        if backend == "dense":  # the plain EMA holds the dense weights, which only the masked model has
            plain.step(unet.parameters())
        decay = ema.cur_decay_value
        weights = _by_dense_name(engine, unet, list(unet.parameters()))
        for n, r in reference.items():
            r.sub_((1 - decay) * (r - weights[n]))
            if n in engine.masks:
                r.mul_(engine.masks[n])
        assert changed == (step % 2 == 0)
    shadows = _by_dense_name(engine, unet, ema.shadow_params)
    assert _zero_where_masked(shadows, engine.masks) == []
    assert shadows.keys() == reference.keys()
    assert all(torch.allclose(shadows[n], r, atol=1e-7, rtol=0) for n, r in reference.items())
    if backend == "dense":
        # without the integration the dropped weights linger in the EMA
        names = list(reference)
        lingering = dict(zip(names, plain.shadow_params))
        assert len(_zero_where_masked(lingering, engine.masks)) > 10
        engine.mask_ema(plain)
        assert _zero_where_masked(lingering, engine.masks) == []
    # remove() gives the EMA its own step back
    engine.remove()
    assert "step" not in vars(ema)


def test_averaged_model_and_module_copies():
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    torch.manual_seed(0)
    model = LayerBank([("linear", 12, 10), ("conv", 3, 5, 3)])
    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    copy_ = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine = sparsediff.sparsify(
        model, opt, method="magran", sparsity=0.7, update_every=1, end_step="never", decay="constant"
    )
    engine.attach_ema(averaged)
    engine.attach_ema(copy_)  # no update to wrap: masked at attach and at every topology update
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        model.loss(model.inputs(gen)).backward()
        opt.step()
        engine.step()
        opt.zero_grad()
        averaged.update_parameters(model)
        for n, m in engine.masks.items():
            assert bool((dict(averaged.module.named_parameters())[n][~m] == 0).all())
            assert bool((dict(copy_.named_parameters())[n][~m] == 0).all())
    with pytest.raises(ConfigError, match="cannot find the weights of an EMA"):
        engine.attach_ema(object())
    with pytest.raises(ConfigError, match="no weight named"):
        engine.attach_ema(nn.Linear(3, 3))


def test_ema_built_from_other_parameters_needs_them():
    from diffusers.training_utils import EMAModel

    model = LayerBank([("linear", 12, 10), ("conv", 3, 5, 3)])
    params = list(model.parameters())[::-1]
    ema = EMAModel(params, decay=0.9)
    engine = sparsediff.sparsify(model, None, method="static", sparsity=0.7)
    with pytest.raises(ConfigError, match="shape"):
        engine.attach_ema(ema)  # aligned with model.parameters() by default: the shapes differ
    engine.attach_ema(ema, parameters=params)
    position = {id(p): i for i, p in enumerate(params)}
    shadows = {n: ema.shadow_params[position[id(p)]] for n, p in engine.named_parameters()}
    assert _zero_where_masked(shadows, engine.masks) == []
    with pytest.raises(ConfigError, match="tracks 4 tensors but 2"):
        engine.mask_ema(ema, parameters=params[:2])


def test_nm_engine_keeps_the_ema_dense_and_masks_it_on_request():
    from diffusers.training_utils import EMAModel

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 8))
    ema = EMAModel(model.parameters(), decay=0.5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine = sparsediff.sparsify(model, opt, method="srste", nm="2:4", ema=ema)
    x = torch.randn(4, 16)
    model(x).pow(2).mean().backward()
    opt.step()
    engine.step()
    ema.step(model.parameters())
    assert all(bool((s != 0).all()) for s in ema.shadow_params[::2])  # dense, like the Parameters
    engine.mask_ema(ema)
    for s in ema.shadow_params[::2]:
        assert sparsediff.sparse.check_nm(s, 2, 4)


# ---------------------------------------------------------------- masks=


def test_given_masks_must_fit_the_budgets():
    model = LayerBank([("linear", 12, 10), ("conv", 3, 5, 3)])
    engine = sparsediff.sparsify(model, None, method="static", sparsity=0.7, seed=4)
    masks = {n: m.clone() for n, m in engine.masks.items()}
    engine.remove()
    again = sparsediff.sparsify(
        LayerBank([("linear", 12, 10), ("conv", 3, 5, 3)]),
        None,
        method="rigl",
        sparsity=0.7,
        total_steps=10,
        masks=masks,
    )
    assert all(torch.equal(again.masks[n], masks[n]) for n in masks)
    bad = dict(masks)
    bad["layers.0.weight"] = torch.ones_like(masks["layers.0.weight"])
    with pytest.raises(ConfigError, match=r"mask of 'layers.0.weight' keeps 120 weights.*budget of"):
        sparsediff.sparsify(model, None, method="static", sparsity=0.7, masks=bad)
    with pytest.raises(ConfigError, match="no mask for layers.1.weight"):
        sparsediff.sparsify(
            model, None, method="static", sparsity=0.7, masks={"layers.0.weight": masks["layers.0.weight"]}
        )
    with pytest.raises(ConfigError, match="unknown layer"):
        sparsediff.sparsify(
            model, None, method="static", sparsity=0.7, masks={**masks, "x": masks["layers.0.weight"]}
        )
    with pytest.raises(ConfigError, match=r"'layers.0.weight' has 120 non-zero weights, more than the \d+"):
        sparsediff.sparsify(
            LayerBank([("linear", 12, 10), ("conv", 3, 5, 3)]),
            None,
            method="static",
            sparsity=0.7,
            masks="weights",
        )
    with pytest.raises(ConfigError, match="N:M masks follow the weights"):
        sparsediff.sparsify(nn.Linear(8, 8), None, method="srste", masks="weights")
    with pytest.raises(ConfigError, match="takes 'weights' or a mapping"):
        sparsediff.sparsify(model, None, method="static", sparsity=0.7, masks="zeros")


# ---------------------------------------------------------------- sparsediff's training loop and export


@pytest.fixture(scope="module")
def rigl_run(first_stage, tmp_path_factory) -> Path:
    from sparsediff.train import train

    run = tmp_path_factory.mktemp("integrations") / "rigl"
    cfg = tiny(
        first_stage,
        sparse={"method": "rigl", "sparsity": 0.7, "update_every": 2},
        train={"max_steps": 6, "ckpt_every": 3},
    )
    train(cfg, run, quiet=True)
    return run


def test_training_saves_an_ema_exactly_as_sparse_as_the_model(rigl_run):
    checkpoints = RunDir(rigl_run).checkpoints.list()
    assert len(checkpoints) == 2
    for ckpt in checkpoints:
        tensors, meta = load_tensors(ckpt / "engine.safetensors")
        masks = engine_state_from_tensors(tensors, meta)["masks"]
        ema = load_tensors(ckpt / "ema.safetensors")[0]
        assert masks and _zero_where_masked(ema, masks) == [], ckpt.name


def test_export_diffusers_loads_with_plain_diffusers_in_a_fresh_process(rigl_run, tmp_path):
    from sparsediff.cli import main as cli
    from sparsediff.run import load_model_and_masks

    out = tmp_path / "unet"
    assert cli(["export", "--run", str(rigl_run), "--format", "diffusers", "--out", str(out)]) == 0
    assert {
        "config.json",
        "diffusion_pytorch_model.safetensors",
        "sparsediff.json",
        "sparsediff_masks.safetensors",
    } <= {p.name for p in out.iterdir()}
    info = json.loads((out / "sparsediff.json").read_text())
    assert info["verification"]["passed"] and info["method"] == "rigl" and info["weights"] == "ema"

    cfg, model, masks, _ = load_model_and_masks(rigl_run)
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(3, 4, 8, 8, generator=gen), torch.tensor([0, 321, 999])
    with torch.no_grad():
        expected = model(x, t)
    save_file({"x": x, "t": t}, str(tmp_path / "inputs.safetensors"))
    child = (
        "import sys\n"
        "sys.modules['sparsediff'] = None  # any import of sparsediff fails\n"
        "import torch\n"
        "from diffusers import UNet2DModel\n"
        "from safetensors.torch import load_file, save_file\n"
        f"torch.set_num_threads({torch.get_num_threads()})\n"
        f"inputs = load_file({str(tmp_path / 'inputs.safetensors')!r})\n"
        f"unet = UNet2DModel.from_pretrained({str(out)!r}).eval()\n"
        "with torch.no_grad():\n"
        "    y = unet(inputs['x'], inputs['t']).sample\n"
        f"save_file({{'y': y}}, {str(tmp_path / 'y.safetensors')!r})\n"
        "assert not any(m.startswith('sparsediff') for m in sys.modules if sys.modules[m] is not None)\n"
    )
    _run("-c", child)
    got = load_file(tmp_path / "y.safetensors")["y"]
    assert torch.equal(got, expected)  # same machine, same threads: the same output bit for bit
    # the folder holds the run's masked weights, bit for bit
    exported = load_file(out / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(exported[k], v) for k, v in model.unet.state_dict().items())
    unet_masks = {n.removeprefix("unet."): m for n, m in masks.items()}
    assert _zero_where_masked(exported, unet_masks) == []


def test_a_diffusers_folder_back_into_sparse_training(rigl_run, tmp_path):
    from diffusers import UNet2DModel

    from sparsediff.export import export_diffusers
    from sparsediff.finetune import load_source
    from sparsediff.run import load_model_and_masks

    out = tmp_path / "unet"
    info = export_diffusers(rigl_run, out)
    _, model, run_masks, _ = load_model_and_masks(rigl_run)
    run_masks = {n.removeprefix("unet."): m for n, m in run_masks.items()}
    spec = sparsediff.SparseSpec(**info["sparse"])

    # restored: the masks saved beside the model
    unet = UNet2DModel.from_pretrained(str(out))
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    saved = load_file(out / "sparsediff_masks.safetensors")
    engine = sparsediff.sparsify(unet, opt, spec, total_steps=10, masks=saved)
    assert engine.names == list(run_masks) and all(
        torch.equal(engine.masks[n], run_masks[n]) for n in run_masks
    )
    # re-derived: the non-zeros, topped up among the zeros where an active weight is exactly 0
    unet2 = UNet2DModel.from_pretrained(str(out))
    derived = sparsediff.sparsify(
        unet2, torch.optim.AdamW(unet2.parameters()), spec, total_steps=10, masks="weights"
    )
    for n, p in unet2.named_parameters():
        if n in run_masks:
            assert bool(derived.masks[n][p != 0].all()) and int(derived.masks[n].sum()) == int(
                run_masks[n].sum()
            )
    assert all(
        torch.equal(a, b) for a, b in zip(unet2.state_dict().values(), model.unet.state_dict().values())
    )
    _unet_steps(unet2, derived.optimizer, derived, 2, seed=0)
    assert derived.check_invariants() == []
    # and sparsediff finetune takes the folder as a diffusers source
    source = load_source(out, preset=TINY_LDM)
    assert source.kind == "diffusers"
    assert all(torch.equal(source.state[f"unet.{k}"], v) for k, v in model.unet.state_dict().items())


def test_export_diffusers_refuses_a_file_as_output(rigl_run, tmp_path):
    from sparsediff.export import export_diffusers

    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        export_diffusers(rigl_run, tmp_path / "f")


# ---------------------------------------------------------------- the README's script


def _readme_block(title: str) -> str:
    text = README.read_text()
    section = text.split(f"### {title}", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_accelerate_script_runs_and_resumes(tmp_path):
    code = _readme_block("Your own training loop with accelerate and diffusers")
    (tmp_path / "train.py").write_text(code)
    first = _run("train.py", cwd=tmp_path)
    out = tmp_path / "sparse-unet"
    checkpoints = sorted(p.name for p in out.glob("checkpoint-*"))
    assert len(checkpoints) >= 2, first.stdout
    # the saved EMA is a diffusers folder exactly as sparse as the model
    from diffusers import UNet2DModel

    ema = UNet2DModel.from_pretrained(str(out / "unet-ema"))
    engine = sparsediff.sparsify(ema, None, method="rigl", sparsity=0.9, total_steps=8, masks="weights")
    assert abs(engine.report().target_density - 0.1) < 1e-3
    # a second process resumes from the last checkpoint but one and finishes
    import shutil

    shutil.rmtree(out / checkpoints[-1])
    second = _run("train.py", cwd=tmp_path)
    assert f"resumed at step {int(checkpoints[-2].split('-')[1])}" in second.stdout
    assert (out / checkpoints[-1]).exists()
