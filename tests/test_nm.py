"""N:M masks, SR-STE training, progressive schedules and one-shot N:M pruning."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import sparsediff
from helpers import tiny_unet
from sparsediff.errors import ConfigError, StateError
from sparsediff.sparse import (
    NMSparseEngine,
    check_nm,
    count_flops,
    has_nm_hooks,
    load_engine_state,
    nm_mask,
    nm_violations,
    one_shot_nm,
    progressive_schedule,
    remove_nm_hooks,
    save_engine_state,
    srste_weight,
)

# ---------------------------------------------------------------- independent references


def ref_mask(w: torch.Tensor, n: int, m: int, in_dim: int = 1) -> torch.Tensor:
    """N:M mask by explicit loops: for every index of the other dims and every group of m input indices,
    keep the n largest |w| (lower index first on ties)."""
    w = w.detach().double()
    mask = torch.zeros(w.shape, dtype=torch.bool)
    other = [range(s) if d != in_dim else [None] for d, s in enumerate(w.shape)]
    for idx in itertools.product(*other):
        for g in range(w.shape[in_dim] // m):
            positions = []
            for j in range(m):
                full = list(idx)
                full[in_dim] = g * m + j
                positions.append(tuple(full))
            ranked = sorted(range(m), key=lambda j: (-abs(float(w[positions[j]])), j))
            for j in ranked[:n]:
                mask[positions[j]] = True
    return mask


@torch.no_grad()
def ref_masked_copy(module: nn.Module, n: int, m: int) -> nn.Module:
    """A copy of ``module`` whose weights (>= 2 dims) are multiplied by their :func:`ref_mask`."""
    ref = copy.deepcopy(module)
    for p in ref.parameters():
        if p.dim() > 1:
            p.mul_(ref_mask(p, n, m))
    return ref


def nonzeros_per_group(w: torch.Tensor, m: int) -> torch.Tensor:
    """Non-zeros in each group of m input channels (dim 1) at every other index."""
    return (w.movedim(1, -1).reshape(-1, m) != 0).sum(-1)


class Capture:
    """Records the weight a module's forward actually uses (registered after the engine's hook)."""

    def __init__(self, module: nn.Module, attr: str = "weight"):
        self.seen: list[torch.Tensor] = []
        self.types: list[type] = []
        module.register_forward_pre_hook(self._hook)
        self.attr = attr

    def _hook(self, module, args):
        w = getattr(module, self.attr)
        self.types.append(type(w))
        self.seen.append(w.detach().clone())


class ConvLinear(nn.Module):
    """A small diffusers-like stack: conv -> conv -> pooled features -> linear -> linear."""

    def __init__(self, c_in=4, c=8, hidden=16, out=4):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.fc1 = nn.Linear(c, hidden)
        self.fc2 = nn.Linear(hidden, out)

    def forward(self, x):
        h = F.silu(self.conv2(F.silu(self.conv1(x))))
        return self.fc2(F.silu(self.fc1(h.mean((2, 3)))))


def _engine(model, nm="2:4", lr=1e-2, **kw):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    return sparsediff.sparsify(model, opt, method="srste", nm=nm, **kw), opt


# ---------------------------------------------------------------- masks


nm_pairs = st.integers(2, 8).flatmap(lambda m: st.tuples(st.integers(1, m - 1), st.just(m)))


@given(
    nm=nm_pairs,
    kind=st.sampled_from(["linear", "conv", "conv_t"]),
    groups=st.integers(1, 3),
    out=st.integers(1, 4),
    ties=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_nm_mask_matches_loop_reference(nm, kind, groups, out, ties, seed):
    n, m = nm
    gen = torch.Generator().manual_seed(seed)
    k_in = m * groups
    shape = {"linear": (out, k_in), "conv": (out, k_in, 2, 3), "conv_t": (k_in, out, 2, 2)}[kind]
    in_dim = 0 if kind == "conv_t" else 1
    w = torch.randn(shape, generator=gen)
    if ties:  # few distinct magnitudes: ties everywhere
        w = torch.randint(-2, 3, shape, generator=gen).float()
    mask = nm_mask(w, n, m, in_dim)
    assert mask.dtype == torch.bool and mask.shape == w.shape
    assert torch.equal(mask, ref_mask(w, n, m, in_dim))
    assert torch.all(mask.movedim(in_dim, -1).reshape(-1, m).sum(-1) == n)


def test_conv_groups_run_over_input_channels_at_one_kernel_position():
    w = torch.zeros(1, 4, 1, 2)  # (out, in, kh, kw)
    w[0, :, 0, 0] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    w[0, :, 0, 1] = torch.tensor([5.0, 6.0, 7.0, 8.0])
    mask = nm_mask(w, 2, 4)
    assert mask[0, :, 0, 0].tolist() == [False, False, True, True]
    assert mask[0, :, 0, 1].tolist() == [False, False, True, True]
    # grouping the contiguous memory instead (1,5,2,6 | 3,7,4,8) keeps only kernel column 1
    flat = w.reshape(-1, 4).abs().topk(2, dim=-1).indices
    wrong = torch.zeros(2, 4, dtype=torch.bool).scatter_(1, flat, True).reshape(w.shape)
    assert wrong[0, :, 0, 1].all() and not torch.equal(wrong, mask)


def test_ties_go_to_the_lower_index():
    assert nm_mask(torch.ones(2, 8), 3, 8).tolist() == [[True] * 3 + [False] * 5] * 2
    assert nm_mask(torch.tensor([[0.0, -1.0, 1.0, 0.0]]), 1, 4).tolist() == [[False, True, False, False]]


# ---------------------------------------------------------------- the forward sees N:M weights


class Pair(nn.Module):
    def __init__(self, lin, conv):
        super().__init__()
        self.lin, self.conv = lin, conv

    def forward(self, x_l, x_c):
        return self.lin(x_l).sum() + self.conv(x_c).sum()


@given(
    nm=nm_pairs,
    seed=st.integers(0, 2**16),
    mode=st.sampled_from(["train", "eval", "no_grad"]),
    via_root=st.booleans(),
)
def test_effective_weights_are_nm_in_every_mode(nm, seed, mode, via_root):
    n, m = nm
    torch.manual_seed(seed)
    lin, conv = nn.Linear(2 * m, 3), nn.Conv2d(m, 2, 3, padding=1)
    model = Pair(lin, conv)
    eng = sparsediff.sparsify(model, None, method="srste", nm=f"{n}:{m}")
    cap_l, cap_c = Capture(lin), Capture(conv)
    model.train(mode == "train")
    x_l, x_c = torch.randn(2, 2 * m), torch.randn(2, m, 4, 4)

    def run():
        # through the model's forward (everything swapped in at once) and through a direct call
        return model(x_l, x_c) if via_root else lin(x_l).sum() + conv(x_c).sum()

    if mode == "no_grad":
        with torch.no_grad():
            out = run()
    else:
        out = run()
    for cap, layer in ((cap_l, lin), (cap_c, conv)):
        (w_eff,) = cap.seen
        assert cap.types == [torch.Tensor]  # a masked copy, not the Parameter
        assert torch.all(nonzeros_per_group(w_eff, m) == n)
        assert torch.equal(w_eff, layer.weight.detach() * ref_mask(layer.weight, n, m))
        assert isinstance(layer.weight, nn.Parameter)  # restored after the call
    expected = (
        F.linear(x_l, cap_l.seen[0], lin.bias).sum()
        + F.conv2d(x_c, cap_c.seen[0], conv.bias, padding=1).sum()
    )
    torch.testing.assert_close(out, expected)
    assert eng.check_invariants() == []
    assert all(torch.equal(eng.masks[name], ref_mask(p, n, m)) for name, p in eng.named_parameters())


# ---------------------------------------------------------------- SR-STE gradient


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("lam", [0.0, 2e-4, 0.3])
def test_srste_gradient_is_straight_through_plus_decay(kind, lam):
    torch.manual_seed(0)
    layer = nn.Linear(8, 5) if kind == "linear" else nn.Conv2d(8, 3, 3, padding=1)
    x = torch.randn(4, 8) if kind == "linear" else torch.randn(2, 8, 5, 5)
    target = torch.randn_like(layer(x))
    sparsediff.sparsify(layer, None, method="srste", nm="2:4", srste_lambda=lam)
    ((layer(x) - target) ** 2).mean().backward()

    # independent: autograd through the masked product, then the SR-STE rule by hand
    w = layer.weight.detach()
    mask = ref_mask(w, 2, 4).float()
    wm = (w * mask).requires_grad_()
    b = layer.bias.detach().clone().requires_grad_()
    y = F.linear(x, wm, b) if kind == "linear" else F.conv2d(x, wm, b, padding=1)
    ((y - target) ** 2).mean().backward()
    expected = wm.grad + lam * (1 - mask) * w
    torch.testing.assert_close(layer.weight.grad, expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(layer.bias.grad, b.grad)
    assert lam == 0.0 or not torch.allclose(layer.weight.grad, wm.grad)  # the decay term is there


def test_srste_weight_function_on_its_own():
    w = torch.randn(3, 8, requires_grad=True)
    mask = nm_mask(w, 2, 4)
    out = srste_weight(w, mask, 0.5)
    assert torch.equal(out.detach(), w.detach() * mask)
    g = torch.randn(3, 8)
    out.backward(g)
    torch.testing.assert_close(w.grad, g + 0.5 * (~mask) * w.detach())


class Reuse(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return self.lin(torch.tanh(self.lin(x)))


def test_module_used_twice_in_one_forward_gets_one_masked_weight_and_one_decay():
    torch.manual_seed(0)
    model = Reuse()
    lam = 0.1
    eng = sparsediff.sparsify(model, None, method="srste", nm="2:4", srste_lambda=lam)
    cap = Capture(model.lin)
    x = torch.randn(3, 8)
    model(x).pow(2).sum().backward()
    assert len(cap.seen) == 2 and torch.equal(cap.seen[0], cap.seen[1])
    assert isinstance(model.lin.weight, nn.Parameter)

    w = model.lin.weight.detach()
    mask = ref_mask(w, 2, 4).float()
    wm = (w * mask).requires_grad_()
    F.linear(torch.tanh(F.linear(x, wm, model.lin.bias)), wm, model.lin.bias).pow(2).sum().backward()
    torch.testing.assert_close(model.lin.weight.grad, wm.grad + lam * (1 - mask) * w)
    eng.remove()


def test_parameters_optimizer_and_state_dict_keys_unchanged():
    torch.manual_seed(0)
    model = ConvLinear()
    keys = list(model.state_dict().keys())
    params = list(model.parameters())
    eng, opt = _engine(model)
    assert list(model.state_dict().keys()) == keys
    model(torch.randn(2, 4, 5, 5)).sum().backward()
    assert [id(p) for p in model.parameters()] == [id(p) for p in params]
    assert all(isinstance(p, nn.Parameter) and p.grad is not None for p in model.parameters())
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in params}
    before = [p.detach().clone() for p in params]
    opt.step()
    assert all(not torch.equal(a, p.detach()) for a, p in zip(before, params))
    assert list(model.state_dict().keys()) == keys
    # weights stay dense: SR-STE trains them all, only the forward is masked
    assert int((model.fc1.weight == 0).sum()) == 0
    assert eng.step() is False and eng.step_count == 1
    # the next forward recomputes the mask from the updated dense weights
    cap = Capture(model.fc1)
    model(torch.randn(2, 4, 5, 5))
    assert torch.equal(cap.seen[0], model.fc1.weight.detach() * ref_mask(model.fc1.weight, 2, 4))


def test_teacher_checkpoint_loads_into_student_and_back():
    torch.manual_seed(0)
    teacher = ConvLinear()
    student = ConvLinear()
    eng, _ = _engine(student)
    student.load_state_dict(teacher.state_dict())  # strict
    x = torch.randn(2, 4, 5, 5)
    masked_teacher = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in masked_teacher.parameters():
            if p.dim() > 1:
                p.mul_(ref_mask(p, 2, 4))
    torch.testing.assert_close(student(x), masked_teacher(x))
    teacher2 = ConvLinear()
    teacher2.load_state_dict(student.state_dict())
    torch.testing.assert_close(teacher2(x), teacher(x))
    assert eng.names == ["conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"]


def test_model_to_another_dtype_keeps_working():
    torch.manual_seed(0)
    model = ConvLinear()
    eng, _ = _engine(model)
    model.to(torch.float64)
    cap = Capture(model.fc1)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    model(x).sum().backward()
    (w_eff,) = cap.seen
    assert w_eff.dtype == torch.float64 and torch.all(nonzeros_per_group(w_eff, 4) == 2)
    assert model.fc1.weight.grad.dtype == torch.float64
    assert eng.masks["fc1.weight"].shape == model.fc1.weight.shape


def test_gru_and_multihead_attention_use_masked_weights():
    torch.manual_seed(0)
    gru = nn.GRU(8, 4, batch_first=True)
    ref = ref_masked_copy(gru, 1, 4)  # copied before sparsify: no hooks
    sparsediff.sparsify(gru, None, method="srste", nm="1:4")
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(gru(x)[0], ref(x)[0])
    assert all(isinstance(w, nn.Parameter) for w in gru._flat_weights)

    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    ref = ref_masked_copy(mha, 2, 4)
    sparsediff.sparsify(mha, None, method="srste", nm="2:4")
    q = torch.randn(2, 5, 8)
    torch.testing.assert_close(mha(q, q, q)[0], ref(q, q, q)[0])


def test_skipped_mixed_precision_step_does_not_count():
    torch.manual_seed(0)
    model = ConvLinear()
    eng, opt = _engine(model, progressive=None)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    scaler.scale(model(torch.randn(2, 4, 5, 5)).sum()).backward()
    model.fc1.weight.grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()
    assert eng.step() is False and eng.step_count == 0


def test_deepcopy_of_a_sparsified_model_masks_its_own_weights():
    torch.manual_seed(0)
    model = ConvLinear()
    eng, opt = _engine(model)
    ema = copy.deepcopy(model)  # e.g. an EMA copy
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(torch.randn_like(p))
    cap = Capture(ema.fc1)
    x = torch.randn(2, 4, 5, 5)
    ema(x)
    assert torch.equal(cap.seen[0], ema.fc1.weight.detach() * ref_mask(ema.fc1.weight, 2, 4))
    assert all(isinstance(p, nn.Parameter) for p in ema.parameters())
    # the engine still tracks the original model's weights
    assert eng.masks["fc1.weight"].equal(ref_mask(model.fc1.weight, 2, 4))
    assert dict(eng.named_parameters())["fc1.weight"] is model.fc1.weight
    with pytest.raises(ConfigError, match="already carries"):
        sparsediff.sparsify(ema, None, method="srste")


def test_remove_nm_hooks_makes_a_copy_dense_again():
    torch.manual_seed(0)
    model = ConvLinear()
    dense = copy.deepcopy(model)
    eng, _ = _engine(model)
    teacher = copy.deepcopy(model)  # copied after sparsify: carries the hooks
    x = torch.randn(2, 4, 5, 5)
    assert has_nm_hooks(teacher.fc1) and not torch.allclose(teacher(x), dense(x))
    assert remove_nm_hooks(teacher) == 2 * 4 + 2  # pre + post per weight, two on the model
    assert not any(has_nm_hooks(m) for m in teacher.modules())
    torch.testing.assert_close(teacher(x), dense(x))
    assert has_nm_hooks(model.fc1) and eng.check_invariants() == []  # the original is untouched
    sparsediff.sparsify(teacher, None, method="srste").remove()  # can be sparsified on its own now


# ---------------------------------------------------------------- progressive schedule


def test_progressive_schedule_switches_at_the_configured_steps():
    torch.manual_seed(0)
    model = ConvLinear()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    eng = sparsediff.sparsify(model, opt, method="srste", progressive=["3:4@0", "2:4@3", "1:4@5"])
    cap = Capture(model.fc1)
    changed, kept = [], []
    for _ in range(7):
        model(torch.randn(2, 4, 5, 5)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        changed.append(eng.step())
        kept.append(int(nonzeros_per_group(cap.seen[-1], 4).unique().item()))
    # forward i (0-based) runs after i steps: 3:4 for steps 0-2, 2:4 for 3-4, 1:4 from 5 on
    assert kept == [3, 3, 3, 2, 2, 1, 1]
    assert changed == [False, False, True, False, True, False, False]
    assert str(eng.pattern) == "1:4" and eng.num_updates == 2 and eng.step_count == 7
    assert eng.budgets["fc1.weight"] == 16 * 8 // 4


def test_progressive_schedule_helper():
    assert progressive_schedule(5000, ["7:8", "6:8", "5:8", "4:8", "2:4"]) == [
        "7:8@0",
        "6:8@1000",
        "5:8@2000",
        "4:8@3000",
        "2:4@4000",
    ]
    assert progressive_schedule(10, ["3:4", "2:4", "1:4"]) == ["3:4@0", "2:4@3", "1:4@7"]
    with pytest.raises(ConfigError, match="do not fit"):
        progressive_schedule(2, ["3:4", "2:4", "1:4"])
    with pytest.raises(ConfigError, match="total_steps"):
        progressive_schedule(0, ["2:4"])
    with pytest.raises(ConfigError, match="N:M pattern"):
        progressive_schedule(10, ["2-4"])


def test_progressive_with_mixed_m_keeps_a_layer_dense_only_where_it_does_not_fit():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 4))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    eng = sparsediff.sparsify(model, opt, method="srste", progressive=["4:8@0", "2:4@1"])
    cap = Capture(model[0])
    assert eng.names == ["0.weight", "2.weight"]
    assert "0.weight" in eng.dense_layers and "M=8" in eng.dense_layers["0.weight"]
    assert eng.report().layers[0].density == 1.0
    model(torch.randn(3, 12)).sum().backward()
    assert torch.equal(cap.seen[-1], model[0].weight.detach())  # 12 is not a multiple of 8: dense
    opt.step()
    assert eng.step() is True
    assert eng.dense_layers == {}
    model(torch.randn(3, 12)).sum().backward()
    assert torch.all(nonzeros_per_group(cap.seen[-1], 4) == 2)
    with pytest.raises(ConfigError, match=r"'0.weight' with shape \(8, 12\).*M=8"):
        sparsediff.sparsify(
            copy.deepcopy(model),
            None,
            method="srste",
            progressive=["4:8@0", "2:4@1"],
            nm_incompatible="error",
        )


# ---------------------------------------------------------------- incompatible layers and bad input


def test_incompatible_layers_kept_dense_or_rejected():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 6), nn.ReLU(), nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    eng = sparsediff.sparsify(model, None, method="srste", nm="2:4")
    assert eng.names == ["4.weight"]
    rep = eng.report()
    assert set(rep.dense_layers) == {"0.weight", "2.weight"}
    assert "input size 10" in rep.dense_layers["0.weight"] and "M=4" in rep.dense_layers["0.weight"]
    assert "kept dense" in str(rep) and rep.to_dict()["pattern"] == "2:4"
    cap0, cap4 = Capture(model[0]), Capture(model[4])
    model(torch.randn(2, 10))
    assert torch.equal(cap0.seen[0], model[0].weight.detach())
    assert torch.all(nonzeros_per_group(cap4.seen[0], 4) == 2)
    assert count_flops(model, (torch.randn(2, 10),), eng).layers[0].density == 0.5
    eng.remove()
    with pytest.raises(ConfigError, match=r"layer '0.weight' with shape \(6, 10\).*M=4"):
        sparsediff.sparsify(model, None, method="srste", nm="2:4", nm_incompatible="error")
    with pytest.raises(ConfigError, match="nothing to make N:M-sparse"):
        sparsediff.sparsify(nn.Linear(6, 3), None, method="srste", nm="2:4")


@pytest.mark.parametrize("spec", ["2-4", "0:4", "4:4", "5:4", "2:", "a:b", "", "2:4:8", "2:0"])
def test_bad_patterns_name_the_value(spec):
    with pytest.raises(ConfigError, match="N:M pattern"):
        sparsediff.sparsify(nn.Linear(8, 4), None, method="srste", nm=spec)


@pytest.mark.parametrize(
    "progressive, message",
    [
        (["2:4@5"], "start at step 0"),
        (["3:4@0", "2:4@0"], "must increase"),
        (["3:4@0", "2:4"], "N:M@step"),
        ("2:4@0", "non-empty list"),
        ([], "non-empty list"),
        (["3:4@0", "4:4@10"], "N must be smaller than M"),
    ],
)
def test_bad_progressive_schedules(progressive, message):
    with pytest.raises(ConfigError, match=message):
        sparsediff.sparsify(nn.Linear(8, 4), None, method="srste", progressive=progressive)


def test_other_bad_settings():
    model = nn.Linear(8, 4)
    with pytest.raises(ConfigError, match="not both"):
        sparsediff.sparsify(model, None, method="srste", nm="2:4", progressive=["2:4@0"])
    with pytest.raises(ConfigError, match="method='srste' only"):
        sparsediff.sparsify(model, None, method="static", sparsity=0.5, nm="2:4")
    for lam in (-1.0, float("nan")):
        with pytest.raises(ConfigError, match="srste_lambda"):
            sparsediff.sparsify(model, None, method="srste", srste_lambda=lam)
    with pytest.raises(ConfigError, match="nm_incompatible"):
        sparsediff.sparsify(model, None, method="srste", nm_incompatible="skip")
    eng = sparsediff.sparsify(model, None, method="srste")
    with pytest.raises(ConfigError, match="already carries"):
        sparsediff.sparsify(model, None, method="srste")
    with pytest.raises(ConfigError, match="without an optimiser"):
        eng.step()
    eng.remove()
    sparsediff.sparsify(model, None, method="srste").remove()  # fine once the first is removed


# ---------------------------------------------------------------- real training and FLOPs


def test_sparsify_srste_trains_a_diffusers_unet_with_adamw():
    torch.manual_seed(0)
    unet = tiny_unet()
    keys = list(unet.state_dict())
    dense_unet = copy.deepcopy(unet)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=0.03, betas=(0.99, 0.999))
    eng = sparsediff.sparsify(unet, opt, method="srste", nm="2:4")
    assert isinstance(eng, NMSparseEngine)
    assert "conv_in.weight" in eng.names and any("to_q.weight" in n for n in eng.names)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randn(2, 4, 8, 8, generator=gen)
        t = torch.randint(0, 1000, (2,), generator=gen)
        loss = (unet(x, t).sample - x).pow(2).mean()
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
        eng.step()
        opt.zero_grad()
    assert eng.step_count == 3 and eng.check_invariants() == []
    assert list(unet.state_dict()) == keys
    rep = eng.report()
    assert rep.target_density == pytest.approx(0.5)
    flops = count_flops(unet, (torch.randn(1, 4, 8, 8), torch.tensor([3])), eng)
    assert all(layer.flops_dense > 0 for layer in flops.layers), "every masked weight is charged"
    dense = count_flops(dense_unet, (torch.randn(1, 4, 8, 8), torch.tensor([3])), None)
    assert flops.flops_dense == dense.flops_dense and flops.other_flops == dense.other_flops


@pytest.mark.parametrize("nm", ["1:4", "3:8", "2:4"])
def test_flops_scale_with_n_over_m(nm):
    n, m = map(int, nm.split(":"))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 16))
    eng = sparsediff.sparsify(model, None, method="srste", nm=nm)
    x = torch.randn(2, 8, 4, 4)
    rep = count_flops(model, (x,), eng)
    conv, fc = rep.layers
    assert conv.flops_dense == 2 * (8 * 3 * 3) * (2 * 8 * 4 * 4)
    assert fc.flops_dense == 2 * 128 * 16 * 2
    assert rep.other_flops == 0  # the masked copies are attributed to their layers
    for layer in rep.layers:
        assert layer.density == pytest.approx(n / m)
        assert layer.flops_sparse == round(n / m * layer.flops_dense)


# ---------------------------------------------------------------- state, remove, fold


def test_state_dict_round_trip_and_mismatches(tmp_path):
    torch.manual_seed(0)
    schedule = ["3:4@0", "2:4@2"]
    model = ConvLinear()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    eng = sparsediff.sparsify(model, opt, method="srste", progressive=schedule)
    for _ in range(3):
        model(torch.randn(2, 4, 5, 5)).sum().backward()
        opt.step()
        eng.step()
    state = eng.state_dict()
    assert state["step"] == 3 and state["pattern"] == "2:4"
    path = tmp_path / "nm.safetensors"
    save_engine_state(eng, path)

    model2 = ConvLinear()
    opt2 = torch.optim.SGD(model2.parameters(), lr=1e-3)
    eng2 = sparsediff.sparsify(model2, opt2, method="srste", progressive=schedule)
    load_engine_state(eng2, path)
    assert eng2.step_count == 3 and str(eng2.pattern) == "2:4" and eng2.num_updates == 1

    fixed = sparsediff.sparsify(ConvLinear(), None, method="srste", nm="2:4")
    with pytest.raises(StateError, match="nm='3:4'"):
        fixed.load_state_dict(state)
    other = sparsediff.sparsify(ConvLinear(hidden=24), None, method="srste", progressive=schedule)
    with pytest.raises(
        StateError, match=r"layer 'fc1.weight' has shape \(16, 8\) in the state but \(24, 8\)"
    ):
        other.load_state_dict(state)
    fewer = sparsediff.sparsify(ConvLinear(), None, method="srste", progressive=schedule, exclude="conv*")
    with pytest.raises(StateError, match="unexpected layer.*conv1.weight"):
        fewer.load_state_dict(state)
    with pytest.raises(StateError, match="not a sparsediff N:M engine state"):
        eng2.load_state_dict(
            sparsediff.sparsify(ConvLinear(), None, method="static", sparsity=0.5).state_dict()
        )


def test_fold_then_remove_leaves_an_nm_dense_model():
    torch.manual_seed(0)
    model = ConvLinear()
    eng, _ = _engine(model, nm="1:4")
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        masked_out = model(x)
    eng.fold()
    for name, p in eng.named_parameters():
        assert check_nm(p, 1, 4), name
    eng.remove()
    assert all(len(mod._forward_pre_hooks) == 0 and len(mod._forward_hooks) == 0 for mod in model.modules())
    assert all(isinstance(p, nn.Parameter) for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(x), masked_out)
    assert nm_violations(model, 1, 4) == {}


def test_remove_restores_the_dense_forward():
    torch.manual_seed(0)
    model = ConvLinear()
    ref = copy.deepcopy(model)
    eng, _ = _engine(model)
    x = torch.randn(2, 4, 5, 5)
    assert not torch.allclose(model(x), ref(x))
    eng.remove()
    torch.testing.assert_close(model(x), ref(x))


def test_single_process_ddp_sees_the_parameters(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    model = ConvLinear()
    ref = copy.deepcopy(model)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = DDP(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        eng = sparsediff.sparsify(ddp, opt, method="srste", nm="2:4", srste_lambda=0.0)
        x = torch.randn(2, 4, 5, 5)
        ddp(x).pow(2).sum().backward()
        sparsediff.sparsify(ref, None, method="srste", nm="2:4", srste_lambda=0.0)
        ref(x).pow(2).sum().backward()
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, msg=name)
        opt.step()
        assert eng.step() is False and eng.step_count == 1
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------- one-shot baseline


def test_one_shot_nm_prunes_in_place_by_magnitude():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 4, 3), nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6))
    dense = copy.deepcopy(model)
    masks = one_shot_nm(model, 2, 4)
    assert set(masks) == {"0.weight", "2.weight", "4.weight"}
    for name, p in model.named_parameters():
        if name in masks:
            q = dict(dense.named_parameters())[name]
            assert torch.equal(masks[name], ref_mask(q, 2, 4))
            assert torch.equal(p.detach(), q.detach() * masks[name])
            assert check_nm(p, 2, 4)
    assert nm_violations(model, 2, 4) == {}
    assert nm_violations(dense, 2, 4).keys() == masks.keys()

    model2 = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    before = model2[0].weight.detach().clone()
    assert set(one_shot_nm(model2, 1, 4)) == {"2.weight"}
    assert torch.equal(model2[0].weight.detach(), before)  # 6 inputs: kept dense
    with pytest.raises(ConfigError, match=r"'0.weight' with shape \(8, 6\).*M=4"):
        one_shot_nm(model2, 1, 4, incompatible="error")
    with pytest.raises(ConfigError, match="N must be smaller than M"):
        one_shot_nm(model2, 4, 4)
    assert set(one_shot_nm(model2, 1, 4, exclude="0.*")) == {"2.weight"}
