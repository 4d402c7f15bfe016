"""What the compact engine (``sparsify(..., backend="sparse")``, sparse/compact_engine.py) promises: the
refusals, the optimiser pointed at the compact values with the dense weights freed, exact budgets and
reports, grown values and their AdamW state exactly 0, EMA copies of every kind on the model's layout,
gradient accumulation for RigL, overflow-skipped steps, and engine state round trips."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import sparsediff
from helpers import invariant_problems, mlp_run
from sparsediff.errors import ConfigError
from sparsediff.sparse.api import resolve_spec
from sparsediff.sparse.compact_engine import CompactEngine
from sparsediff.sparse.runtime.compact_conv import CompactConv
from sparsediff.sparse.runtime.compact_gru import CompactGRU
from sparsediff.sparse.runtime.compact_linear import CompactLinear
from sparsediff.sparse.runtime.scattered import is_scattered_host
from sparsediff.sparse.spec import SparseSpec

DYNAMIC = {"update_every": 2, "total_steps": 40}  # an update every other step, all through the tests


class _Mixed(nn.Module):
    """A linear, a stride-1 convolution, a strided one (the scattered fallback) and a GRU."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(24, 16)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.down = nn.Conv2d(6, 4, 3, stride=2, padding=1)
        self.gru = nn.GRU(5, 8, batch_first=True)

    @staticmethod
    def inputs(gen: torch.Generator, batch: int = 3) -> list[torch.Tensor]:
        return [
            torch.randn(batch, 24, generator=gen),
            torch.randn(batch, 3, 6, 6, generator=gen),
            torch.randn(batch, 4, 5, generator=gen),
        ]

    def loss(self, xs: list[torch.Tensor]) -> torch.Tensor:
        a, b, c = xs
        out, _ = self.gru(c)
        return (
            (self.linear(a) - 1).pow(2).mean()
            + self.down(self.conv(b)).pow(2).mean()
            + (out - 0.5).pow(2).mean()
        )


def _model(seed: int = 0) -> _Mixed:
    torch.manual_seed(seed)
    return _Mixed()


def _adamw(model: nn.Module) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)


def _sparse(model: nn.Module, method: str = "rigl", **kw):
    opt = _adamw(model)
    settings = {"sparsity": 0.8, **(DYNAMIC if method != "static" else {}), **kw}
    return opt, sparsediff.sparsify(model, opt, method=method, backend="sparse", **settings)


def _pair(method: str = "rigl", **kw):
    """The same model trained by both backends: ``(model, opt, engine)`` masked dense, then compact."""
    dense = _model()
    compact = copy.deepcopy(dense)
    settings = {"sparsity": 0.8, **(DYNAMIC if method != "static" else {}), **kw}
    opt_d, opt_c = _adamw(dense), _adamw(compact)
    eng_d = sparsediff.sparsify(dense, opt_d, method=method, **settings)
    eng_c = sparsediff.sparsify(compact, opt_c, method=method, backend="sparse", **settings)
    return (dense, opt_d, eng_d), (compact, opt_c, eng_c)


def _assert_same_topology(eng_d, eng_c, atol: float = 1e-5) -> None:
    assert eng_d.step_count == eng_c.step_count and eng_d.num_updates == eng_c.num_updates
    for name in eng_d.names:
        assert torch.equal(eng_d.masks[name], eng_c.masks[name]), name
        torch.testing.assert_close(eng_c.dense_view(name), eng_d.dense_view(name), rtol=1e-4, atol=atol)


def _state(opt, values: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        k: v for k, v in opt.state.get(values, {}).items() if torch.is_tensor(v) and v.shape == values.shape
    }


# ---------------------------------------------------------------------------- refusals


class _FakeDDP(nn.parallel.DistributedDataParallel):
    """A DistributedDataParallel wrapper without a process group (only its type is looked at)."""

    def __init__(self, module: nn.Module):
        nn.Module.__init__(self)
        self.module = module


def _refused(model: nn.Module, opt, match: str, **kw) -> None:
    with pytest.raises(ConfigError, match=match):
        sparsediff.sparsify(
            model, opt, **{"method": "rigl", "sparsity": 0.8, "backend": "sparse", **DYNAMIC, **kw}
        )


def test_wrapped_models_are_refused_before_anything_changes():
    model = _model()
    opt = _adamw(model)
    _refused(nn.DataParallel(model), opt, "before wrapping the model in DistributedDataParallel")
    _refused(_FakeDDP(model), opt, "before wrapping")
    assert type(model.linear) is nn.Linear and model.linear.weight.numel() == 16 * 24
    assert all(p is q for p, q in zip(opt.param_groups[0]["params"], model.parameters(), strict=True))


def test_accelerate_prepared_optimizer_is_refused():
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = _model()
    prepared_model, opt = accelerator.prepare(model, _adamw(model))
    assert type(opt).__name__ == "AcceleratedOptimizer"
    _refused(prepared_model, opt, r"before accelerator\.prepare")
    assert type(model.linear) is nn.Linear


def test_optimizer_that_stepped_is_refused():
    model = _model()
    opt = _adamw(model)
    model.loss(model.inputs(torch.Generator().manual_seed(0))).backward()
    opt.step()
    _refused(model, opt, "must not have stepped")
    assert type(model.conv) is nn.Conv2d and not hasattr(model.down, "parametrizations")


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"method": "dense"}, "method 'dense' has none"),
        ({"method": "srste"}, "use backend 'dense'"),
        ({"kernels": "bogus"}, "unknown kernel policy 'bogus'"),
        ({"backend": "compact"}, "unknown backend 'compact'"),
    ],
)
def test_settings_refused_by_sparsify(settings, match):
    model = _model()
    _refused(model, _adamw(model), match, **settings)
    assert type(model.gru) is nn.GRU


def test_settings_refused_by_spec_validation():
    with pytest.raises(ConfigError, match=r"sparse\.backend: .*use backend 'dense'"):
        SparseSpec(method="srste", backend="sparse").validate()
    with pytest.raises(ConfigError, match=r"sparse\.backend: backend 'sparse' trains sparse weights"):
        SparseSpec(method="dense", backend="sparse").validate(need_sparsity=False)
    with pytest.raises(ConfigError, match=r"sparse\.kernels"):
        SparseSpec(method="rigl", sparsity=0.9, backend="sparse", kernels="bogus").validate()
    spec = SparseSpec(method="srste", backend="sparse")
    model = _model()
    with pytest.raises(ConfigError, match="use backend 'dense'"):
        sparsediff.sparsify(model, _adamw(model), spec)
    resolved = resolve_spec(SparseSpec(method="rigl", sparsity=0.8), total_steps=10)
    with pytest.raises(ConfigError, match="kernels= takes one of"):  # the engine built directly
        CompactEngine(model, _adamw(model), resolved, kernels="bogus")
    assert type(model.linear) is nn.Linear


# ---------------------------------------------------------------------------- after sparsify


def test_optimizer_holds_the_compact_values_and_the_dense_weights_are_freed():
    model = _model()
    reference = copy.deepcopy(model)
    dense = dict(model.named_parameters())
    opt, eng = _sparse(model)
    assert isinstance(model.linear, CompactLinear) and isinstance(model.conv, CompactConv)
    assert isinstance(model.gru, CompactGRU) and is_scattered_host(eng.targets["down.weight"].host)
    in_opt = [p for group in opt.param_groups for p in group["params"]]
    assert {id(p) for p in in_opt} == {id(p) for p in model.parameters()}
    assert len(in_opt) == len(dense)
    for name in eng.names:
        values = eng.targets[name].values
        assert any(p is values for p in in_opt) and values.numel() == eng.budgets[name]
        assert dict(eng.named_parameters())[name] is values
        if dense[name] is values:  # the scattered fallback keeps its Parameter, now the values alone
            assert is_scattered_host(eng.targets[name].host)
        else:  # the dense weight is freed, whoever still holds it
            assert dense[name].numel() == 0 and not any(p is dense[name] for p in in_opt)
    for name in ("linear.bias", "conv.bias", "gru.bias_hh_l0"):
        assert any(p is dense[name] for p in in_opt)  # biases: the same Parameters

    masks = eng.masks
    assert list(masks) == eng.names
    for name, mask in masks.items():
        assert mask.dtype == torch.bool and tuple(mask.shape) == tuple(reference.get_parameter(name).shape)
        assert int(mask.sum()) == eng.budgets[name]
    masked = sparsediff.sparsify(reference, _adamw(reference), method="rigl", sparsity=0.8, **DYNAMIC)
    for name in eng.names:  # the same seeded masks, and the kept values are the dense weights there
        assert torch.equal(masks[name], masked.masks[name]), name
        assert torch.equal(eng.dense_view(name), masked.dense_view(name))
    report, want = eng.report(), masked.report()
    assert report.params_total == sum(p.numel() for p in reference.parameters())
    assert report.params_nonzero == want.params_nonzero
    assert (report.target_total, report.target_nonzero) == (want.target_total, want.target_nonzero)
    assert [(r.name, r.shape, r.active, r.budget) for r in report.layers] == [
        (r.name, r.shape, r.active, r.budget) for r in want.layers
    ]


# ---------------------------------------------------------------------------- training steps


@pytest.mark.parametrize(
    ("method", "kernels"), [("static", "auto"), ("rigl", "sparse"), ("rigl", "dense"), ("magran", "auto")]
)
def test_training_keeps_budgets_and_starts_grown_values_at_zero(method, kernels):
    model = _model()
    opt, eng = _sparse(model, method, kernels=kernels)
    gen = torch.Generator().manual_seed(0)
    new_total = 0
    for _ in range(7):
        model.loss(model.inputs(gen)).backward()
        opt.step()
        before = {n: m.clone() for n, m in eng.masks.items()}
        weights = {n: eng.dense_view(n).clone() for n in eng.names}
        states = {
            n: {k: eng.dense_view(n, s).clone() for k, s in _state(opt, v).items()}
            for n, v in eng.named_parameters()
        }
        changed = eng.step()
        opt.zero_grad(set_to_none=True)
        assert eng.check_invariants() == [] and invariant_problems(eng, opt) == []
        for name, values in eng.named_parameters():
            assert values.numel() == eng.budgets[name] and int(eng.masks[name].sum()) == eng.budgets[name]
            after = eng.masks[name]
            stays, newly = before[name] & after, after & ~before[name]
            new_total += int(newly.sum())
            state = _state(opt, values)
            assert set(state) == {"exp_avg", "exp_avg_sq"}
            assert torch.all(eng.dense_view(name)[newly] == 0)
            # what stays keeps its value and its state, moved with it to the new layout
            assert torch.equal(eng.dense_view(name)[stays], weights[name][stays])
            for key, s in state.items():
                assert torch.all(eng.dense_view(name, s)[newly] == 0), key
                assert torch.all(eng.dense_view(name, s)[~after] == 0), key
                assert torch.equal(eng.dense_view(name, s)[stays], states[name][key][stays]), key
        assert changed == any(not torch.equal(before[n], eng.masks[n]) for n in eng.names)
    modes = {t.host.kernel_mode for n, t in eng.targets.items() if not is_scattered_host(t.host)}
    if kernels != "auto":
        assert modes == {kernels}
    if method == "static":
        assert eng.num_updates == 0 and new_total == 0
    else:
        assert eng.num_updates == 3 and new_total > 0


# ---------------------------------------------------------------------------- EMA copies


def _ema_check(eng, ema_tensors, run_update) -> None:
    """Train with topology updates; after each step ``ema_tensors()`` ({target: values-shaped tensor}) sit
    on the model's layout: what stays keeps its EMA value, what is new is exactly 0."""
    model, opt = eng.model, eng.optimizer
    gen = torch.Generator().manual_seed(1)
    grown = 0
    for step in range(6):
        model.loss(model.inputs(gen)).backward()
        opt.step()
        run_update()
        before = {n: m.clone() for n, m in eng.masks.items()}
        kept = {n: eng.dense_view(n, t).clone() for n, t in ema_tensors().items()}
        eng.step()
        opt.zero_grad(set_to_none=True)
        tensors = ema_tensors()
        assert set(tensors) == set(eng.names)
        for name, t in tensors.items():
            values = eng.targets[name].values
            assert t.shape == values.shape and t.dtype == values.dtype
            stays, newly = before[name] & eng.masks[name], eng.masks[name] & ~before[name]
            view = eng.dense_view(name, t)
            assert torch.all(view[newly] == 0)
            assert torch.equal(view[stays], kept[name][stays])
            if step > 0:  # an average (the first update of each EMA kind copies the weights)
                assert not torch.equal(view[stays], eng.dense_view(name)[stays])
            grown += int(newly.sum())
    assert eng.num_updates == 3 and grown > 0


def _shadow_tensors(eng, ema) -> dict[str, torch.Tensor]:
    params = list(eng.model.parameters())
    return {n: ema.shadow_params[[id(p) for p in params].index(id(v))] for n, v in eng.named_parameters()}


@pytest.mark.parametrize("built", ["before", "after"])
def test_diffusers_ema_follows_the_topology(built):
    from diffusers.training_utils import EMAModel

    model = _model()
    opt = _adamw(model)
    ema = EMAModel(model.parameters(), decay=0.9) if built == "before" else None
    eng = sparsediff.sparsify(model, opt, method="rigl", sparsity=0.8, backend="sparse", ema=ema, **DYNAMIC)
    if ema is None:  # built on the compact parameters, then attached
        ema = EMAModel(model.parameters(), decay=0.9)
        eng.attach_ema(ema)
    for name, shadow in _shadow_tensors(eng, ema).items():  # the dense weights at the kept positions
        assert torch.equal(shadow, eng.targets[name].values.detach())
    _ema_check(eng, lambda: _shadow_tensors(eng, ema), lambda: ema.step(model.parameters()))


def _module_tensors(eng, copy_module: nn.Module) -> dict[str, torch.Tensor]:
    """Each target's values in an EMA module copy, through the copy's compact layer at the model's path."""
    paths = {id(m): p for p, m in eng.model.named_modules()}
    out = {}
    for name, target in eng.targets.items():
        host = copy_module.get_submodule(paths[id(target.host)])
        assert hasattr(host, "compact_weights")
        cw = host.compact_weights[target.weight.name]
        assert torch.equal(cw.mask(host), eng.masks[name])  # the copy's own layout is the model's
        out[name] = cw.values(host).detach()
    return out


@torch.no_grad()
def _lerp(ema_module: nn.Module, model: nn.Module) -> None:
    for e, p in zip(ema_module.parameters(), model.parameters(), strict=True):
        e.lerp_(p, 0.1)


def test_module_copy_made_before_sparsify_is_made_compact():
    model = _model()
    ema_copy = copy.deepcopy(model)
    opt = _adamw(model)
    eng = sparsediff.sparsify(
        model, opt, method="rigl", sparsity=0.8, backend="sparse", ema=ema_copy, **DYNAMIC
    )
    assert isinstance(ema_copy.linear, CompactLinear) and isinstance(ema_copy.gru, CompactGRU)
    assert [tuple(p.shape) for p in ema_copy.parameters()] == [tuple(p.shape) for p in model.parameters()]
    _ema_check(eng, lambda: _module_tensors(eng, ema_copy), lambda: _lerp(ema_copy, model))


@pytest.mark.parametrize("built", ["before", "after"])
def test_averaged_model_follows_the_topology(built):
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    model = _model()
    opt = _adamw(model)

    def averaged():
        return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))

    ema = averaged() if built == "before" else None
    eng = sparsediff.sparsify(model, opt, method="rigl", sparsity=0.8, backend="sparse", ema=ema, **DYNAMIC)
    if ema is None:
        ema = averaged()
        eng.attach_ema(ema)
    assert isinstance(ema.module.conv, CompactConv)
    _ema_check(eng, lambda: _module_tensors(eng, ema.module), lambda: ema.update_parameters(model))


# ---------------------------------------------------------------------------- gradient accumulation


def test_gradient_accumulation_sums_the_backward_passes_before_growing():
    (dense, opt_d, eng_d), (compact, opt_c, eng_c) = _pair(kernels="sparse", grad_accum=2)
    assert eng_c.grad_accum == 2
    gen = torch.Generator().manual_seed(3)
    for _ in range(6):
        batches = [_Mixed.inputs(gen) for _ in range(2)]
        for model, opt, eng in ((dense, opt_d, eng_d), (compact, opt_c, eng_c)):
            for xs in batches:
                (model.loss(xs) / 2).backward()
            opt.step()
            eng.step()
            opt.zero_grad(set_to_none=True)
        _assert_same_topology(eng_d, eng_c)
        assert invariant_problems(eng_c, opt_c) == []
    assert eng_c.num_updates == 3 and eng_c.last_update.new > 0


def test_two_backward_passes_without_grad_accum_are_refused_on_an_update_step():
    model = _model()
    opt, eng = _sparse(model, kernels="sparse")
    gen = torch.Generator().manual_seed(0)
    model.loss(model.inputs(gen)).backward()  # step 1: no update due, passes accumulate freely
    model.loss(model.inputs(gen)).backward()
    opt.step()
    eng.step()
    opt.zero_grad()
    model.loss(model.inputs(gen)).backward()  # step 2 is an update step
    with pytest.raises(RuntimeError, match=r"grad_accum=N"):
        model.loss(model.inputs(gen)).backward()


# ---------------------------------------------------------------------------- mixed precision


def test_overflow_skipped_step_makes_no_update_and_the_retried_step_does():
    (dense, opt_d, eng_d), (compact, opt_c, eng_c) = _pair(kernels="sparse", update_every=3, total_steps=100)
    gen = torch.Generator().manual_seed(0)
    runs = [
        (dense, opt_d, eng_d, lambda: dense.linear.weight.grad),
        (compact, opt_c, eng_c, lambda: eng_c.targets["linear.weight"].values.grad),
    ]
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**8) for _ in runs]

    def one_step(overflow: bool) -> list[bool]:
        xs = _Mixed.inputs(gen)
        changed = []
        for (model, opt, eng, grad), scaler in zip(runs, scalers, strict=True):
            scaler.scale(model.loss(xs)).backward()
            if overflow:
                grad()[0] = float("inf")
            scaler.step(opt)
            scaler.update()
            changed.append(eng.step())
            opt.zero_grad()
        return changed

    for _ in range(2):
        one_step(False)
    masks = {n: m.clone() for n, m in eng_c.masks.items()}
    values = {n: v.detach().clone() for n, v in eng_c.named_parameters()}
    assert one_step(True) == [False, False]  # step 3 is due for an update, but the scaler skips it
    assert eng_c.step_count == 2 and eng_c.num_updates == 0
    assert all(torch.equal(masks[n], eng_c.masks[n]) for n in eng_c.names)
    assert all(torch.equal(values[n], v) for n, v in eng_c.named_parameters())
    assert one_step(False) == [True, True]  # the retried step 3, on its own batch's dense gradient
    assert eng_c.step_count == 3 and eng_c.num_updates == 1
    _assert_same_topology(eng_d, eng_c)
    assert invariant_problems(eng_c, opt_c) == []


# ---------------------------------------------------------------------------- engine state


def _train(model, opt, eng, steps: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        model.loss(model.inputs(gen)).backward()
        opt.step()
        eng.step()
        opt.zero_grad(set_to_none=True)


def test_state_dict_round_trip_re_lays_a_fresh_engine_out():
    model = _model()
    opt, eng = _sparse(model, kernels="sparse")
    _train(model, opt, eng, 5, seed=0)
    eng.targets["linear.weight"].host.kernel_mode = "dense"  # a mix of modes, as a measured choice makes
    state = eng.state_dict()
    assert state["backend"] == "sparse" and state["step"] == 5 and state["num_updates"] == 2
    assert all(torch.equal(state["masks"][n], eng.masks[n]) for n in eng.names)

    fresh = _model()
    fresh_opt, fresh_eng = _sparse(fresh)  # "auto" kernels, the initial masks
    initial = {n: m.clone() for n, m in fresh_eng.masks.items()}
    weights = {n: fresh_eng.dense_view(n).clone() for n in fresh_eng.names}
    assert any(not torch.equal(initial[n], eng.masks[n]) for n in eng.names)
    fresh_eng.load_state_dict(state)
    assert fresh_eng.step_count == 5 and fresh_eng.num_updates == 2
    for name in eng.names:
        mask = fresh_eng.masks[name]
        assert torch.equal(mask, eng.masks[name]) and torch.equal(
            fresh_eng.targets[name].weight.mask(fresh_eng.targets[name].host), mask
        )
        view = fresh_eng.dense_view(name)
        assert torch.all(view[mask & ~initial[name]] == 0)  # the positions new to this layout start at 0
        assert torch.equal(view[mask & initial[name]], weights[name][mask & initial[name]])
        assert fresh_eng.targets[name].host.kernel_mode == eng.targets[name].host.kernel_mode
    assert fresh_eng.check_invariants() == []

    # with the model's and the optimiser's states too, both go on alike (bit for bit: same modes, threads)
    fresh.load_state_dict(model.state_dict())
    fresh_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # in process: not the same state tensors
    _train(model, opt, eng, 4, seed=1)
    _train(fresh, fresh_opt, fresh_eng, 4, seed=1)
    assert eng.num_updates == fresh_eng.num_updates == 4
    for name in eng.names:
        assert torch.equal(eng.masks[name], fresh_eng.masks[name])
        assert torch.equal(eng.dense_view(name), fresh_eng.dense_view(name))
    assert eng.state_dict()["masks"].keys() == fresh_eng.state_dict()["masks"].keys()


def _rigl_on_compact_layers(compiled: bool) -> tuple[list[torch.Tensor], int, dict[str, torch.Tensor]]:
    engine, model, _, _ = mlp_run(
        9,
        sizes=(32, 128, 16),
        batch=8,
        compiled=compiled,
        total_steps=20,
        update_every=3,
        backend="sparse",
        kernels="sparse",
    )
    return [p.detach().clone() for p in model.parameters()], engine.num_updates, engine.masks


def test_torch_compile_trains_compact_layers_as_eager_does():
    """The RigL bookkeeping of a compact layer's backward runs eagerly inside compiled code
    (torch.compiler.disable, applied once torch's compiler is loaded): the same updates, masks and weights."""
    eager, compiled = _rigl_on_compact_layers(False), _rigl_on_compact_layers(True)
    assert eager[1] == compiled[1] == 3
    assert all(torch.equal(eager[2][n], compiled[2][n]) for n in eager[2])
    assert all(torch.equal(a, b) for a, b in zip(eager[0], compiled[0]))


def test_importing_sparsediff_does_not_load_the_compiler():
    """torch's compiler (torch._dynamo) costs about 1.7 s to import: sparsediff loads it only when used."""
    import subprocess

    from helpers import PYTHON, python_env

    code = "import sys, sparsediff.train, sparsediff.commands; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([PYTHON, "-c", code], env=python_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"
