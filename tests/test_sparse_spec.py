"""The sparse settings declared once (SparseSpec: validation, config loading, sparsify) and the engine
contract both engines implement."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

import sparsediff
from helpers import LayerBank, train_steps
from sparsediff.config import config_from_dict, load_config, parse_overrides
from sparsediff.errors import ConfigError
from sparsediff.sparse import (
    METHODS,
    NM_METHODS,
    UNSTRUCTURED_METHODS,
    Engine,
    NMSparseEngine,
    SparseEngine,
    SparseSpec,
    layer_densities,
)


def _model_and_opt(seed: int = 0):
    torch.manual_seed(seed)
    model = LayerBank([("linear", 12, 8), ("conv", 4, 8, 3)])
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _cfg(source: str = "test.yaml", **sparse: Any):
    return config_from_dict({"sparse": sparse}, source=source)


# ---------------------------------------------------------------- one declaration


def test_method_tuples_are_declared_once():
    assert UNSTRUCTURED_METHODS == ("dense", "static", "rigl", "magran")
    assert NM_METHODS == ("srste", "oneshot")
    assert METHODS == UNSTRUCTURED_METHODS + NM_METHODS
    from sparsediff.config import SparseSpec as ConfigSparseSpec

    assert ConfigSparseSpec is SparseSpec


def test_every_field_is_settable_from_overrides():
    overrides = parse_overrides(
        [
            "sparse.method=magran",
            "sparse.sparsity=0.6",
            "sparse.erk_power=0.5",
            "sparse.rescale_init=true",
            "sparse.end_step=never",
            "sparse.decay=constant",
            "sparse.include=layers.*",
        ]
    )
    cfg = load_config("unet-tiny", overrides)
    s = cfg.sparse
    assert (s.method, s.sparsity, s.erk_power, s.rescale_init) == ("magran", 0.6, 0.5, True)
    assert s.end_step == "never" and s.include == ["layers.*"]
    assert "erk_power: 0.5" in cfg.to_yaml() and "rescale_init: true" in cfg.to_yaml()


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "sparse, field, message",
    [
        ({"method": "set"}, "sparse.method", "unknown sparse method 'set'"),
        ({"method": "rigl"}, "sparse", "method rigl needs --sparsity"),
        ({"method": "static"}, "sparse", "method static needs --sparsity"),
        ({"method": "static", "sparsity": 1.0}, "sparse.sparsity", r"sparsity must be in \[0, 1\)"),
        ({"method": "static", "sparsity": -0.1}, "sparse.sparsity", "sparsity must be"),
        ({"method": "static", "sparsity": 0.5, "distribution": "gauss"}, "sparse.distribution", "gauss"),
        (
            {"method": "static", "sparsity": 0.5, "decay": "linear"},
            "sparse.decay",
            "unknown prune-ratio decay",
        ),
        ({"method": "rigl", "sparsity": 0.5, "prune_ratio": 0.0}, "sparse.prune_ratio", r"in \(0, 1\]"),
        ({"method": "rigl", "sparsity": 0.5, "update_every": 0}, "sparse.update_every", "positive whole"),
        ({"method": "rigl", "sparsity": 0.5, "end_fraction": 1.5}, "sparse.end_fraction", r"in \(0, 1\]"),
        ({"method": "rigl", "sparsity": 0.5, "end_step": "soon"}, "sparse.end_step", "'never'"),
        ({"method": "rigl", "sparsity": 0.5, "end_step": -3}, "sparse.end_step", "non-negative"),
        ({"method": "srste", "nm": "2-4"}, "sparse.nm", "N:M pattern must look like '2:4'"),
        ({"method": "srste", "nm": "4:4"}, "sparse.nm", "N must be smaller than M"),
        ({"method": "oneshot", "nm": "0:4"}, "sparse.nm", "N must be at least 1"),
        ({"method": "srste", "progressive": ["2:4@5"]}, "sparse.progressive", "start at step 0"),
        ({"method": "srste", "progressive": ["3:4@0", "2:4"]}, "sparse.progressive", "N:M@step"),
        ({"method": "srste", "srste_lambda": -1.0}, "sparse.srste_lambda", "finite number >= 0"),
        ({"method": "srste", "nm_incompatible": "skip"}, "sparse.nm_incompatible", "dense, error"),
    ],
)
def test_config_loading_names_the_bad_field(sparse, field, message):
    with pytest.raises(ConfigError, match=message) as info:
        _cfg("run.yaml", **sparse)
    assert str(info.value).startswith(f"run.yaml.{field}: ")


@pytest.mark.parametrize(
    "sparse",
    [
        {},
        {"method": "dense", "sparsity": 0.0},
        {"method": "static", "sparsity": 0.5},
        {"method": "rigl", "sparsity": 0.9, "end_step": "never", "decay": "constant"},
        {"method": "magran", "sparsity": 0.5, "erk_power": 0.0, "rescale_init": True},
        {"method": "srste", "nm": "2:4", "progressive": ["7:8@0", "2:4@100"], "sparsity": 0.5},
        {"method": "oneshot", "nm": "1:4", "sparsity": 0.75},
        # settings a method does not use are not its business (a source config's rigl schedule stays)
        {"method": "srste", "prune_ratio": 0.0, "distribution": "uniform"},
        {"method": "static", "sparsity": 0.5, "nm": "2-4"},
    ],
)
def test_valid_sparse_sections_load(sparse):
    cfg = _cfg(**sparse)
    for key, value in sparse.items():
        assert getattr(cfg.sparse, key) == value


def test_every_preset_validates():
    from sparsediff.config import list_presets

    for name in list_presets():
        load_config(name).sparse.validate()


def test_validate_without_a_prefix_gives_bare_messages():
    with pytest.raises(ConfigError, match=r"^unknown distribution 'x'"):
        SparseSpec(method="static", sparsity=0.5, distribution="x").validate(None)
    SparseSpec(method="static").validate(need_sparsity=False)  # an engine may keep every weight


def test_final_nm_pattern():
    assert SparseSpec(method="srste", nm="2:4", progressive=["7:8@0", "1:4@9"]).final_nm_pattern() == "1:4"
    assert SparseSpec(method="oneshot", nm=" 2 : 4 ").final_nm_pattern() == "2:4"
    assert SparseSpec(method="rigl", sparsity=0.5).final_nm_pattern() is None


# ---------------------------------------------------------------- every field reaches the engine


def test_unstructured_fields_from_a_config_reach_the_engine():
    sparse = {
        "method": "magran",
        "sparsity": 0.6,
        "distribution": "er",
        "prune_ratio": 0.2,
        "decay": "constant",
        "update_every": 3,
        "end_fraction": 0.5,
        "include": ["layers.*"],
        "exclude": ["layers.1.*"],
        "seed": 7,
        "erk_power": 0.5,
        "rescale_init": True,
    }
    cfg = _cfg(**sparse)
    model, opt = _model_and_opt()
    dense_weight = model.layers[0].weight.detach().clone()
    eng = sparsediff.sparsify(model, opt, cfg.sparse, total_steps=20)
    assert isinstance(eng, SparseEngine) and eng.names == ["layers.0.weight"]
    for key, value in sparse.items():
        if key != "end_fraction":
            assert getattr(eng.spec, key) == value, key
    assert eng.end_step == 10  # end_fraction * total_steps
    sched = eng.schedule
    assert (sched.prune_ratio, sched.update_every, sched.end_step, sched.decay) == (0.2, 3, 10, "constant")
    shapes = {"layers.0.weight": (8, 12)}
    assert eng.densities == layer_densities(shapes, 0.6, "er", 0.5)
    # rescale_init: the active initial weights are divided by sqrt(density)
    mask = eng.masks["layers.0.weight"]
    density = eng.budgets["layers.0.weight"] / mask.numel()
    torch.testing.assert_close(model.layers[0].weight.detach(), dense_weight * mask / math.sqrt(density))
    # the seed decides the initial mask
    other = sparsediff.sparsify(*_model_and_opt(), cfg.sparse.replace(seed=8), total_steps=20)
    assert not torch.equal(other.masks["layers.0.weight"], mask)


def test_erk_power_changes_the_distribution():
    model, _ = _model_and_opt()
    one = sparsediff.sparsify(model, None, _cfg(method="static", sparsity=0.5).sparse)
    zero = sparsediff.sparsify(model, None, _cfg(method="static", sparsity=0.5, erk_power=0.0).sparse)
    assert one.densities != zero.densities
    assert all(d == pytest.approx(0.5) for d in zero.densities.values())  # power 0 is uniform


def test_nm_fields_from_a_config_reach_the_engine():
    cfg = _cfg(
        method="srste",
        nm="1:4",  # the final pattern, as `sparsediff finetune` writes it
        progressive=["3:4@0", "1:4@4"],
        srste_lambda=0.01,
        nm_incompatible="error",
        exclude=["layers.1.*"],
        sparsity=0.75,
    )
    model, opt = _model_and_opt()
    eng = sparsediff.sparsify(model, opt, cfg.sparse, total_steps=10)
    assert isinstance(eng, NMSparseEngine)
    assert eng.names == ["layers.0.weight"] and eng.srste_lambda == 0.01
    assert [(s, str(p)) for s, p in eng.schedule] == [(0, "3:4"), (4, "1:4")]
    assert eng.pattern == "3:4" and eng.spec.nm_incompatible == "error"
    with pytest.raises(ConfigError, match="M=4"):  # nm_incompatible="error" is in force
        sparsediff.sparsify(LayerBank([("linear", 6, 4)]), None, cfg.sparse.replace(exclude=[]))


# ---------------------------------------------------------------- sparsify(spec) == the keyword path


def _keywords(spec: SparseSpec, steps: int) -> dict[str, Any]:
    """The keywords training passed to sparsify before it took a spec."""
    kw: dict[str, Any] = dict(method=spec.method, include=spec.include or None, exclude=spec.exclude or None)
    if spec.method == "srste":
        kw.update(
            nm=None if spec.progressive else spec.nm,
            srste_lambda=spec.srste_lambda,
            progressive=spec.progressive or None,
            nm_incompatible=spec.nm_incompatible,
        )
        return kw
    kw.update(
        sparsity=spec.sparsity,
        distribution=spec.distribution,
        prune_ratio=spec.prune_ratio,
        decay=spec.decay,
        update_every=spec.update_every,
        seed=spec.seed,
    )
    if spec.method in ("rigl", "magran"):
        kw.update(end_step=spec.end_step, total_steps=steps, end_fraction=spec.end_fraction)
    return kw


@pytest.mark.parametrize(
    "sparse",
    [
        {"method": "dense"},
        {"method": "static", "sparsity": 0.7, "distribution": "uniform", "seed": 3},
        {
            "method": "rigl",
            "sparsity": 0.6,
            "update_every": 2,
            "end_fraction": 0.5,
            "exclude": ["layers.1.*"],
        },
        {"method": "magran", "sparsity": 0.5, "update_every": 3, "end_step": 9, "prune_ratio": 0.5},
        {"method": "srste", "nm": "2:4", "srste_lambda": 1e-3},
        {"method": "srste", "nm": "2:4", "progressive": ["3:4@0", "2:4@3"]},
    ],
)
def test_sparsify_with_a_spec_builds_the_engine_the_keywords_built(sparse):
    spec = _cfg(**sparse).sparse
    steps = 12
    model_a, opt_a = _model_and_opt()
    model_b, opt_b = _model_and_opt()
    a = sparsediff.sparsify(model_a, opt_a, spec, total_steps=steps)
    b = sparsediff.sparsify(model_b, opt_b, **_keywords(spec, steps))
    assert type(a) is type(b)
    assert a.spec == b.spec and a.end_step == b.end_step and a.pattern == b.pattern
    train_steps(model_a, opt_a, a, 8)
    train_steps(model_b, opt_b, b, 8)
    sa, sb = a.state_dict(), b.state_dict()
    for key in ("masks", "ever_active"):  # the tensors of the state, compared as tensors
        ta, tb = sa.pop(key, {}), sb.pop(key, {})
        assert ta.keys() == tb.keys() and all(torch.equal(ta[n], tb[n]) for n in ta), key
    assert sa == sb
    assert all(torch.equal(a.masks[n], b.masks[n]) for n in a.names)


def test_keywords_override_the_spec():
    spec = _cfg(method="srste", nm="2:4", progressive=["3:4@0", "2:4@5"]).sparse
    model, _ = _model_and_opt()
    eng = sparsediff.sparsify(model, None, spec, nm="1:4")  # a fixed pattern replaces the schedule
    assert eng.pattern == "1:4" and len(eng.schedule) == 1
    eng.remove()
    eng = sparsediff.sparsify(model, None, spec, nm=None)  # None keeps the spec's value
    assert [str(p) for _, p in eng.schedule] == ["3:4", "2:4"]
    eng.remove()
    static = sparsediff.sparsify(model, None, spec, method="static", sparsity=0.5)
    assert isinstance(static, SparseEngine) and static.spec.sparsity == 0.5


def test_keyword_defaults_are_sparsifys_own():
    model, opt = _model_and_opt()
    eng = sparsediff.sparsify(model, opt, total_steps=100)
    assert (eng.spec.method, eng.spec.sparsity, eng.end_step) == ("rigl", 0.9, 75)


def test_sparsify_refuses_oneshot_and_unknown_keywords():
    model, opt = _model_and_opt()
    with pytest.raises(ConfigError, match="one_shot_nm.*finetune --method oneshot"):
        sparsediff.sparsify(model, opt, method="oneshot")
    with pytest.raises(ConfigError, match="one_shot_nm"):
        sparsediff.sparsify(model, opt, _cfg(method="oneshot", nm="2:4").sparse)
    with pytest.raises(TypeError, match="'sparsityy'"):
        sparsediff.sparsify(model, opt, sparsityy=0.5)
    with pytest.raises(ConfigError, match="SparseEngine implements method"):
        SparseEngine(model, opt, SparseSpec(method="srste"))


# ---------------------------------------------------------------- the engine contract


@pytest.mark.parametrize("method", ["dense", "static", "rigl", "magran", "srste"])
def test_both_engines_fulfil_the_contract(method):
    model, opt = _model_and_opt()
    kw = {"nm": "2:4"} if method == "srste" else {"sparsity": 0.5, "update_every": 2}
    eng = sparsediff.sparsify(model, opt, method=method, total_steps=8, **kw)
    assert isinstance(eng, Engine)
    assert isinstance(eng, NMSparseEngine if method == "srste" else SparseEngine)
    assert eng.names and set(eng.masks) == set(eng.budgets) == set(eng.densities) == set(eng.names)
    assert all(eng.masks[n].dtype == torch.bool for n in eng.names)
    assert [n for n, _ in eng.named_parameters()] == eng.names
    assert eng.pattern == ("2:4" if method == "srste" else None)
    assert eng.end_step == (6 if method in ("rigl", "magran") else None)
    uses = []
    with eng.track_weight_uses(lambda name, tensor: uses.append(name)):
        model.loss(model.inputs(torch.Generator().manual_seed(0)))
    assert bool(uses) == (method == "srste")  # only the N:M engine swaps masked copies in
    new = 0
    for step in range(1, 5):
        model.loss(model.inputs(torch.Generator().manual_seed(step))).backward()
        eng.mask_gradients()
        opt.step()
        eng.step()
        opt.zero_grad()
        new += eng.new_connections()
    assert eng.step_count == 4
    assert eng.num_updates == (2 if method in ("rigl", "magran") else 0)
    assert (new > 0) == (method in ("rigl", "magran"))
    assert eng.check_invariants() == []
    rep = eng.report()
    assert rep.target_nonzero == sum(eng.budgets.values())
    state = eng.state_dict()
    assert ("masks" in state) == (method != "srste")  # N:M masks follow from the weights
    eng.load_state_dict(state)
    eng.remove()
