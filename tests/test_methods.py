"""The method registry: what each method is, that nothing else lists names, and the resumed schedule."""

from __future__ import annotations

import copy
import math
import re
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import sparsediff
from helpers import LayerBank, train_steps
from sparsediff.errors import ConfigError
from sparsediff.sparse import NMSparseEngine, SparseEngine
from sparsediff.sparse.api import ENGINES
from sparsediff.sparse.flops import training_flops_per_step
from sparsediff.sparse.methods import REGISTRY, get_method, is_dense, method_names
from sparsediff.sparse.nm import has_nm_hooks, remove_nm_hooks
from sparsediff.sparse.spec import DYNAMIC_METHODS, ENGINE_METHODS, METHODS, NM_METHODS, UNSTRUCTURED_METHODS
from sparsediff.sparse.topology import largest_k as largest_k_positions

SPARSE_DIR = Path(sparsediff.__file__).parent / "sparse"


def test_each_method_says_what_it_is():
    traits = {
        name: (m.masked, m.dynamic, m.structured, m.has_engine, m.needs_dense_grads, m.random_growth)
        for name, m in REGISTRY.items()
    }
    assert traits == {
        "dense": (False, False, False, True, False, False),
        "static": (True, False, False, True, False, False),
        "rigl": (True, True, False, True, True, False),
        "magran": (True, True, False, True, False, True),
        "srste": (True, False, True, True, False, False),
        "oneshot": (True, False, True, False, False, False),
    }
    assert ENGINES[get_method("rigl").family] is SparseEngine
    assert ENGINES[get_method("srste").family] is NMSparseEngine
    assert get_method("oneshot").engine_method() == "srste"
    with pytest.raises(ConfigError, match="unknown sparse method 'set'.*dense, static, rigl"):
        get_method("set")
    with pytest.raises(TypeError, match="'fast'"):
        method_names(fast=True)
    assert is_dense("dense") and not is_dense("rigl") and not is_dense("no-such-method")


def test_the_spec_tuples_are_views_of_the_registry():
    assert tuple(REGISTRY) == METHODS
    assert method_names(structured=False) == UNSTRUCTURED_METHODS
    assert method_names(structured=True) == NM_METHODS
    assert DYNAMIC_METHODS == method_names(dynamic=True) == ("rigl", "magran")
    assert tuple(n for n, m in REGISTRY.items() if m.has_engine) == ENGINE_METHODS


def test_grow_scores_and_flop_rules_come_from_the_method():
    grad = torch.tensor([[-3.0, 1.0], [float("nan"), 2.0]])
    assert torch.equal(
        get_method("rigl").grow_score(4, grad, 0, torch.device("cpu")), torch.tensor([3.0, 1, 0, 2])
    )
    a = get_method("magran").grow_score(4, None, 7, torch.device("cpu"))
    assert torch.equal(a, get_method("magran").grow_score(4, None, 7, torch.device("cpu")))
    assert not torch.equal(a, get_method("magran").grow_score(4, None, 8, torch.device("cpu")))
    with pytest.raises(ConfigError, match="grows no weights"):
        get_method("static").grow_score(4, None, 0, torch.device("cpu"))
    d, s = 100.0, 10.0
    assert training_flops_per_step("dense", d, s) == 300.0
    assert training_flops_per_step("static", d, s) == training_flops_per_step("magran", d, s) == 30.0
    assert training_flops_per_step("rigl", d, s, update_every=4) == pytest.approx((3 * s * 4 + 2 * s + d) / 5)
    assert training_flops_per_step("srste", d, s) == 300.0  # trains the dense weights
    with pytest.raises(ValueError, match="oneshot"):
        training_flops_per_step("oneshot", d, s)


def _code_lines(path: Path) -> list[str]:
    """The lines of a module without comments and docstrings (a method name may be displayed there)."""
    text = re.sub(r'"""[\s\S]*?"""', "", path.read_text())
    return [line.split("#", 1)[0] for line in text.splitlines()]


def test_no_method_name_is_compared_inside_the_engine_package():
    """Inside sparse/, only the registry knows method names: code asks it what a method is. (A backend or a
    kernel mode may also be called "dense": a comparison counts when it is about a method, and any tuple of
    two or more method names does.)"""
    names = "|".join(REGISTRY)
    quoted = rf"""["']({names})["']"""
    compared = re.compile(rf"(==|!=|\bin\b)\s*\(?\s*{quoted}|{quoted}\s*(==|!=|\bin\b)")
    listed = re.compile(rf"\(\s*{quoted}\s*,\s*{quoted}")
    found = [
        f"{path.relative_to(SPARSE_DIR)}:{i}: {line.strip()}"
        for path in sorted(SPARSE_DIR.rglob("*.py"))
        if path.name != "methods.py"
        for i, line in enumerate(_code_lines(path), 1)
        if (compared.search(line) and "method" in line) or listed.search(line)
    ]
    assert len(list(SPARSE_DIR.rglob("*.py"))) > 10  # the scan saw the package
    assert found == []
    assert compared.search('if spec.method == "rigl":') and listed.search('DYNAMIC = ("rigl", "magran")')


# ---------------------------------------------------------------- N:M hooks held by reference


def test_nm_hooks_are_recognised_by_reference_not_by_name():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))

    def nm_pre_hook(module, args):  # a user's hook that happens to share the engine's name
        return None

    handle = model[0].register_forward_pre_hook(nm_pre_hook)
    assert not has_nm_hooks(model[0])
    engine = sparsediff.sparsify(model, None, method="srste", nm="2:4")
    assert has_nm_hooks(model[0]) and has_nm_hooks(model)
    copied = copy.deepcopy(model)  # the copy's hooks are the same functions
    assert has_nm_hooks(copied[0])
    assert remove_nm_hooks(copied) > 0 and not has_nm_hooks(copied[0]) and not has_nm_hooks(copied)
    assert nm_pre_hook in copied[0]._forward_pre_hooks.values()  # the user's hook stays
    engine.remove()
    assert not has_nm_hooks(model[0])
    handle.remove()


# ---------------------------------------------------------------- the schedule of a resumed engine


def _engine(total_steps, update_every, prune_ratio, **kw):
    torch.manual_seed(0)
    model = LayerBank([("linear", 24, 24), ("conv", 4, 6, 3)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    eng = sparsediff.sparsify(
        model,
        opt,
        method="rigl",
        sparsity=0.8,
        total_steps=total_steps,
        update_every=update_every,
        prune_ratio=prune_ratio,
        **kw,
    )
    return model, opt, eng


def test_a_resumed_engine_keeps_the_saved_schedule_and_says_what_differed():
    model, opt, eng = _engine(40, 5, 0.3)
    train_steps(model, opt, eng, 10)
    state = eng.state_dict()

    # The same run resumed with a longer training, another interval and prune ratio (what a changed
    # --num_epochs in a user's script does to total_steps): the saved schedule goes on.
    model2, opt2, resumed = _engine(80, 2, 0.6)
    model2.load_state_dict(model.state_dict())
    opt2.load_state_dict(opt.state_dict())
    with pytest.warns(UserWarning, match="saved update schedule is kept") as caught:
        resumed.load_state_dict(state)
    message = str(caught[0].message)
    for field, saved, now in (("end_step", 30, 60), ("update_every", 5, 2), ("prune_ratio", 0.3, 0.6)):
        assert f"{field} {saved!r} (saved) vs {now!r} (now)" in message
    assert resumed.schedule_changes == {
        "prune_ratio": (0.3, 0.6),
        "update_every": (5, 2),
        "end_step": (30, 60),
    }
    assert (resumed.end_step, resumed.schedule.update_every, resumed.schedule.prune_ratio) == (30, 5, 0.3)
    assert resumed.state_dict()["config"]["end_step"] == 30  # and it is saved again as it was
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reported once, at the load: training on says nothing more
        train_steps(model2, opt2, resumed, 12)
    assert resumed.num_updates == 4  # updates at steps 15, 20, 25 and 30 (interval 5, end 30)

    # Asked for explicitly, the new schedule replaces the saved one (and that is reported too).
    _, _, replaced = _engine(80, 2, 0.6, override_schedule=True)
    with pytest.warns(UserWarning, match="given now replaces the saved one"):
        replaced.load_state_dict(state)
    assert (replaced.end_step, replaced.schedule.update_every, replaced.schedule.prune_ratio) == (60, 2, 0.6)
    _, _, again = _engine(80, 2, 0.6)
    with pytest.warns(UserWarning, match="replaces"):
        again.load_state_dict(state, override_schedule=True)
    assert again.end_step == 60


def test_an_unchanged_schedule_resumes_silently():
    model, opt, eng = _engine(40, 5, 0.3)
    train_steps(model, opt, eng, 7)
    _, _, resumed = _engine(40, 5, 0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resumed.load_state_dict(eng.state_dict())
    assert resumed.schedule_changes == {} and resumed.step_count == 7


def test_an_update_that_would_move_nothing_is_no_update():
    """Cosine decay reaches a drop fraction of 0 at end_step: no update happens there (none is counted
    and no dense gradient is kept for it)."""
    model, opt, eng = _engine(20, 5, 0.3, end_step=15)
    fractions = []
    for _ in range(20):
        before = eng.num_updates
        train_steps(model, opt, eng, 1)
        if eng.num_updates > before:
            fractions.append((eng.step_count, eng.last_update.drop_fraction))
    assert [s for s, _ in fractions] == [5, 10]
    assert all(f > 0 for _, f in fractions)
    assert eng.schedule.drop_fraction(15) == 0.0 and not eng.schedule.is_update_step(15)
    assert math.isclose(fractions[0][1], 0.15 * (1 + math.cos(math.pi / 3)))


# ---------------------------------------------------------------- drop and grow choose by position on ties


@pytest.mark.parametrize("n", [10, 2_000_000])
def test_largest_k_breaks_ties_towards_the_lower_position(n):
    scores = torch.zeros(n)
    scores[n // 2] = 2.0
    scores[n - 1] = 1.0
    got = largest_k_positions(scores, 5)
    assert got.tolist() == [0, 1, 2, n // 2, n - 1]  # the two largest, then ties by position
    shuffled = torch.randperm(n, generator=torch.Generator().manual_seed(0)).float()
    assert torch.equal(largest_k_positions(shuffled, 7), torch.topk(shuffled, 7).indices.sort().values)
    assert largest_k_positions(scores, 0).numel() == 0 and largest_k_positions(scores[:3], 5).tolist() == [
        0,
        1,
        2,
    ]
