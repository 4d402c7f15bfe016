"""The engine's public behaviour: wrapped optimisers, mixed precision, errors, state dicts, real models.

What holds for both backends runs on both: the masked dense tensors (``backend="dense"``) and the compact
layers (``backend="sparse"``), whose weights, gradients and optimiser state are read through
``engine.dense_view`` in the dense weight's shape."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sparsediff
from helpers import LayerBank, invariant_problems, tiny_unet, train_steps
from sparsediff.errors import ConfigError, StateError

BACKENDS = ("dense", "sparse")


def _model_and_opt(seed=0):
    torch.manual_seed(seed)
    model = LayerBank([("linear", 12, 10), ("conv", 3, 5, 3)])
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)


def _sparsify_and_prepare(acc, model, opt, **kwargs):
    """``sparsify`` and ``accelerator.prepare`` in the order the backend needs: compact layers replace
    the parameters, so with ``backend="sparse"`` sparsify comes first; the masked engine is also built on
    the prepared objects, as here."""
    if kwargs.get("backend") == "sparse":
        engine = sparsediff.sparsify(model, opt, **kwargs)
        model, opt = acc.prepare(model, opt)
    else:
        model, opt = acc.prepare(model, opt)
        engine = sparsediff.sparsify(model, opt, **kwargs)
    return model, opt, engine


# ---------------------------------------------------------------- optimiser wrappers and mixed precision


@pytest.mark.parametrize("backend", BACKENDS)
def test_accelerate_wrapped_optimizer(backend):
    from accelerate import Accelerator

    model, opt = _model_and_opt()
    accelerator = Accelerator(cpu=True)
    kwargs = dict(method="rigl", sparsity=0.7, update_every=2, total_steps=40, backend=backend)
    model, opt, eng = _sparsify_and_prepare(accelerator, model, opt, **kwargs)
    assert type(opt).__name__ == "AcceleratedOptimizer"
    gen = torch.Generator().manual_seed(0)
    changes = 0
    for _ in range(20):
        before = {n: m.clone() for n, m in eng.masks.items()}
        accelerator.backward(model.loss(model.inputs(gen)))
        opt.step()
        changes += eng.step()
        opt.zero_grad()
        assert invariant_problems(eng, opt) == []
        for name, p in eng.named_parameters():
            newly = eng.masks[name] & ~before[name]
            assert torch.all(eng.dense_view(name)[newly] == 0)
            for s in opt.optimizer.state[p].values():
                if torch.is_tensor(s) and s.shape == p.shape:
                    assert torch.all(eng.dense_view(name, s)[newly] == 0)
    assert eng.step_count == 20 and changes > 0


# The method matters with compact layers: RigL sums the dense gradients of the micro-batches (the
# accelerator's gradient_accumulation_steps, given to sparsify) before an update chooses what grows.
@pytest.mark.parametrize(
    ("backend", "method"), [("dense", "magran"), ("sparse", "magran"), ("sparse", "rigl")]
)
def test_accelerate_gradient_accumulation_counts_optimizer_steps(backend, method):
    from accelerate import Accelerator

    model, opt = _model_and_opt()
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=4)
    model, opt, eng = _sparsify_and_prepare(
        accelerator,
        model,
        opt,
        method=method,
        sparsity=0.5,
        update_every=3,
        end_step="never",
        decay="constant",
        backend=backend,
        accelerator=accelerator,
    )
    gen = torch.Generator().manual_seed(0)
    for _ in range(24):  # 24 micro-batches = 6 optimiser steps
        with accelerator.accumulate(model):
            accelerator.backward(model.loss(model.inputs(gen)))
            opt.step()
            if accelerator.sync_gradients:
                eng.step()
            opt.zero_grad()
    assert eng.step_count == 6
    assert eng.num_updates == 2
    assert invariant_problems(eng, opt) == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_overflowing_mixed_precision_step_makes_no_topology_update(backend):
    model, opt = _model_and_opt()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    eng = sparsediff.sparsify(
        model, opt, method="rigl", sparsity=0.7, update_every=3, total_steps=100, backend=backend
    )
    first = dict(eng.named_parameters())["layers.0.weight"]  # the dense weight, or its compact values
    gen = torch.Generator().manual_seed(0)

    def one_step(overflow: bool) -> bool:
        scaler.scale(model.loss(model.inputs(gen))).backward()
        if overflow:
            first.grad.view(-1)[0] = float("inf")
        scaler.step(opt)
        scaler.update()
        changed = eng.step()
        opt.zero_grad()
        return changed

    for _ in range(2):
        one_step(False)
    masks_before = {n: m.clone() for n, m in eng.masks.items()}
    weights_before = eng.dense_view("layers.0.weight").clone()
    # Step 3 is due for an update, but its gradients overflow: the scaler skips it.
    assert one_step(True) is False
    assert eng.step_count == 2 and eng.num_updates == 0
    assert all(torch.equal(masks_before[n], eng.masks[n]) for n in eng.names)
    assert torch.equal(weights_before, eng.dense_view("layers.0.weight"))
    # The retried step 3 updates, with the gradients of its own (finite) batch.
    one_step(False)
    assert eng.step_count == 3 and eng.num_updates == 1
    assert invariant_problems(eng, opt) == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_gradients_before_clipping_gives_sparse_norm(backend):
    model, opt = _model_and_opt()
    eng = sparsediff.sparsify(model, opt, method="static", sparsity=0.8, backend=backend)
    model.loss(model.inputs(torch.Generator().manual_seed(0))).backward()
    eng.mask_gradients()
    for name, p in eng.named_parameters():
        assert torch.all(eng.dense_view(name, p.grad)[~eng.masks[name]] == 0)


# ---------------------------------------------------------------- real models


# backend="sparse" on this UNet: tests/test_backend_trajectories.py (invariants, updates, report, by the dense run)
def test_works_unchanged_on_diffusers_unet():
    torch.manual_seed(0)
    unet = tiny_unet()
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    eng = sparsediff.sparsify(unet, opt, method="rigl", sparsity=0.8, update_every=2, total_steps=20)
    names = set(eng.names)
    assert "conv_in.weight" in names and any("to_q.weight" in n for n in names)
    assert any("time_embedding.linear_1.weight" in n for n in names)
    assert not any(n.endswith("bias") or "norm" in n for n in names)
    gen = torch.Generator().manual_seed(0)
    for _ in range(6):
        x = torch.randn(2, 4, 8, 8, generator=gen)
        t = torch.randint(0, 1000, (2,), generator=gen)
        loss = (unet(x, t).sample - x).pow(2).mean()
        loss.backward()
        opt.step()
        eng.step()
        opt.zero_grad()
        assert invariant_problems(eng, opt) == []
    assert eng.num_updates == 3
    rep = eng.report()
    assert abs(rep.target_density - 0.2) < 1e-3
    assert rep.params_total == sum(p.numel() for p in unet.parameters())


@pytest.mark.parametrize("backend", BACKENDS)
def test_works_unchanged_on_gru(backend):
    torch.manual_seed(0)
    gru = nn.GRU(5, 16, num_layers=2, bidirectional=True, batch_first=True)
    weights = sorted(n for n, p in gru.named_parameters() if n.startswith("weight_"))
    opt = torch.optim.AdamW(gru.parameters(), lr=1e-2)
    eng = sparsediff.sparsify(
        gru, opt, method="magran", sparsity=0.6, update_every=1, total_steps=20, backend=backend
    )
    assert sorted(eng.names) == weights
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        out, _ = gru(torch.randn(3, 7, 5, generator=gen))
        out.pow(2).mean().backward()
        opt.step()
        eng.step()
        opt.zero_grad()
        assert invariant_problems(eng, opt) == []
    assert eng.num_updates == 5


def test_include_exclude_patterns():
    model, opt = _model_and_opt()
    eng = sparsediff.sparsify(model, opt, method="static", sparsity=0.5, exclude=["layers.1.*"])
    assert eng.names == ["layers.0.weight"]
    eng2 = sparsediff.sparsify(model, opt, method="static", sparsity=0.5, include="re:^layers\\.1\\.")
    assert eng2.names == ["layers.1.weight"]


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, float("nan")])
def test_bad_sparsity_names_the_value(sparsity):
    model, opt = _model_and_opt()
    with pytest.raises(ConfigError, match="sparsity"):
        sparsediff.sparsify(model, opt, method="rigl", sparsity=sparsity, total_steps=10)


@pytest.mark.parametrize("ratio", [0.0, -0.5, 1.01])
def test_bad_prune_ratio_names_the_value(ratio):
    model, opt = _model_and_opt()
    with pytest.raises(ConfigError, match=rf"prune ratio must be in \(0, 1\], got {ratio}"):
        sparsediff.sparsify(model, opt, method="rigl", sparsity=0.5, prune_ratio=ratio, total_steps=10)


def test_pattern_matching_nothing_names_the_pattern():
    model, opt = _model_and_opt()
    with pytest.raises(ConfigError, match="'decoder.*' matches no parameter"):
        sparsediff.sparsify(model, opt, method="static", sparsity=0.5, exclude=["decoder.*"])


def test_other_bad_settings():
    model, opt = _model_and_opt()
    with pytest.raises(ConfigError, match="unknown sparse method 'set'"):
        sparsediff.sparsify(model, opt, method="set", sparsity=0.5)
    with pytest.raises(ConfigError, match="unknown distribution 'gaussian'"):
        sparsediff.sparsify(model, opt, method="static", sparsity=0.5, distribution="gaussian")
    with pytest.raises(ConfigError, match="needs end_step"):
        sparsediff.sparsify(model, opt, method="rigl", sparsity=0.5)
    with pytest.raises(ConfigError, match="cosine decay"):
        sparsediff.sparsify(model, opt, method="rigl", sparsity=0.5, end_step="never")
    with pytest.raises(ConfigError, match="not update it"):
        sparsediff.sparsify(
            model, torch.optim.SGD(model.layers[0].parameters(), lr=0.1), method="static", sparsity=0.5
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_from_another_model_names_the_layer(backend):
    model, opt = _model_and_opt()
    eng = sparsediff.sparsify(model, opt, method="rigl", sparsity=0.5, total_steps=10, backend=backend)
    state = eng.state_dict()

    torch.manual_seed(0)
    other = LayerBank([("linear", 12, 11), ("conv", 3, 5, 3)])
    other_eng = sparsediff.sparsify(
        other,
        torch.optim.AdamW(other.parameters()),
        method="rigl",
        sparsity=0.5,
        total_steps=10,
        backend=backend,
    )
    with pytest.raises(
        StateError, match=r"layer 'layers.0.weight' has shape \(10, 12\) in the state but \(11, 12\)"
    ):
        other_eng.load_state_dict(state)

    third = LayerBank([("linear", 12, 10)])
    third_eng = sparsediff.sparsify(
        third,
        torch.optim.AdamW(third.parameters()),
        method="rigl",
        sparsity=0.5,
        total_steps=10,
        backend=backend,
    )
    with pytest.raises(StateError, match="unexpected layer.*layers.1.weight"):
        third_eng.load_state_dict(state)

    model2, opt2 = _model_and_opt()
    eng_other_sparsity = sparsediff.sparsify(
        model2, opt2, method="rigl", sparsity=0.6, total_steps=10, backend=backend
    )
    with pytest.raises(StateError, match="sparsity=0.5"):
        eng_other_sparsity.load_state_dict(state)
    with pytest.raises(StateError, match="not a sparsediff engine state"):
        eng.load_state_dict({"masks": {}})


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_round_trip_in_process(backend):
    kwargs = dict(method="magran", sparsity=0.6, update_every=2, total_steps=50, backend=backend)
    model, opt = _model_and_opt()
    eng = sparsediff.sparsify(model, opt, **kwargs)
    train_steps(model, opt, eng, 9)
    state = eng.state_dict()
    model2, opt2 = _model_and_opt(seed=1)
    eng2 = sparsediff.sparsify(model2, opt2, **kwargs)
    eng2.load_state_dict(state)
    assert eng2.step_count == 9 and eng2.num_updates == eng.num_updates
    assert all(torch.equal(eng.masks[n], eng2.masks[n]) for n in eng.names)


def test_weights_loaded_behind_the_engine_are_refused_not_zeroed():
    model, opt = _model_and_opt()
    eng = sparsediff.sparsify(model, opt, method="static", sparsity=0.6)
    dense, _ = _model_and_opt(seed=3)
    model.load_state_dict(dense.state_dict())  # dense weights, the engine's state untouched
    loaded = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.loss(model.inputs(torch.Generator().manual_seed(0))).backward()
    with pytest.raises(StateError, match=r"layer 'layers.0.weight' has \d+ non-zero weights at positions"):
        opt.step()
    assert all(torch.equal(p.detach(), loaded[n]) for n, p in model.named_parameters())
    eng.apply_masks()  # pruning them on purpose
    opt.step()
    eng.step()
    assert eng.step_count == 1 and eng.check_invariants() == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_density_report_text_and_dict(backend):
    model, opt = _model_and_opt()
    eng = sparsediff.sparsify(
        model, opt, method="static", sparsity=0.75, distribution="uniform", backend=backend
    )
    rep = eng.report()
    d = rep.to_dict()
    assert d["target_nonzero"] == sum(eng.budgets.values())
    assert abs(d["target_density"] - 0.25) < 0.01
    text = str(rep)
    assert "layers.0.weight" in text and "whole model" in text
