"""Property-based tests of the engine's invariants over random layer shapes, sparsities, prune ratios,
seeds, methods and optimisers, on both backends (masked dense tensors, and compact layers: weights and
optimiser state are read through ``engine.dense_view``, the same dense shape whatever the engine holds)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import sparsediff
from helpers import LayerBank, invariant_problems, state_tensors, train_steps
from sparsediff.sparse.methods import get_method
from sparsediff.sparse.topology import drop_and_grow

layer_spec = st.one_of(
    st.tuples(st.just("linear"), st.integers(2, 24), st.integers(2, 24)),
    st.tuples(st.just("conv"), st.integers(1, 6), st.integers(1, 8), st.sampled_from([1, 3])),
    st.tuples(st.just("gru"), st.integers(2, 8), st.integers(2, 8)),
)

OPTIMIZERS = {
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    "adam_amsgrad": lambda ps: torch.optim.Adam(ps, lr=1e-2, amsgrad=True),
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, weight_decay=1e-3, nesterov=True),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-3, momentum=0.5, centered=True),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=1e-2),
    "nadam": lambda ps: torch.optim.NAdam(ps, lr=1e-2, weight_decay=1e-2),
}
BACKENDS = ("dense", "sparse")


@pytest.mark.parametrize("backend", BACKENDS)
@given(
    specs=st.lists(layer_spec, min_size=1, max_size=3),
    sparsity=st.floats(0.05, 0.98),
    prune_ratio=st.floats(0.01, 1.0),
    seed=st.integers(0, 2**31 - 1),
    method=st.sampled_from(["rigl", "magran"]),
    distribution=st.sampled_from(["uniform", "er", "erk"]),
    optimizer=st.sampled_from(sorted(OPTIMIZERS)),
)
def test_invariants_hold_after_every_step(
    backend, specs, sparsity, prune_ratio, seed, method, distribution, optimizer
):
    torch.manual_seed(seed)
    model = LayerBank(specs)
    opt = OPTIMIZERS[optimizer](model.parameters())
    engine = sparsediff.sparsify(
        model,
        opt,
        method=method,
        sparsity=sparsity,
        distribution=distribution,
        prune_ratio=prune_ratio,
        decay="constant",
        update_every=2,
        end_step="never",
        seed=seed,
        backend=backend,
    )
    initial = {n: m.clone() for n, m in engine.masks.items()}
    ever_active = {n: m.clone() for n, m in initial.items()}
    reported_new = 0  # connections the engine's update statistics call new
    gen = torch.Generator().manual_seed(seed)

    for _ in range(8):
        before = {n: m.clone() for n, m in engine.masks.items()}
        model.loss(model.inputs(gen)).backward()
        opt.step()
        changed = engine.step()
        assert invariant_problems(engine, opt) == []
        after = engine.masks
        any_new = False
        for name, p in engine.named_parameters():
            assert int(after[name].sum()) == engine.budgets[name]
            newly = after[name] & ~before[name]
            any_new |= bool(newly.any())
            # Grown weights start at exactly 0, with all their optimiser state zeroed: also those that
            # were active in an earlier update (the stale-value failure of some libraries).
            assert torch.all(engine.dense_view(name)[newly] == 0)
            for s in state_tensors(opt, p):
                assert torch.all(engine.dense_view(name, s)[newly] == 0)
            ever_active[name] |= after[name]
        assert changed == any_new
        reported_new += engine.new_connections()
        opt.zero_grad()

    # Weights explored outside the initial mask: each one entered as a new connection of some update (so
    # the engine's statistics account for all of them), and the run explored iff an update reported one.
    explored = sum(int((ever_active[n] & ~initial[n]).sum()) for n in engine.names)
    assert explored <= reported_new
    assert (explored > 0) == (reported_new > 0)


@given(
    rows=st.integers(2, 40),
    cols=st.integers(2, 40),
    sparsity=st.floats(0.0, 0.95),
    k_frac=st.floats(0.0, 1.0),
    seed=st.integers(0, 10_000),
    method=st.sampled_from(["rigl", "magran"]),
)
def test_drop_and_grow_match_an_independent_reference(rows, cols, sparsity, k_frac, seed, method):
    """Drop = the k smallest active magnitudes; grow = k positions outside the kept set (for RigL the
    k largest gradients there); kept and grown never overlap, so the count is exact."""
    torch.manual_seed(seed)
    layer = nn.Linear(cols, rows, bias=False)
    engine = sparsediff.sparsify(layer, None, method=method, sparsity=sparsity, total_steps=100, seed=seed)
    name = engine.names[0]
    active = engine.masks[name].clone()
    budget = engine.budgets[name]
    k = min(budget, max(1, int(k_frac * budget)))
    with torch.no_grad():
        layer.weight.copy_(torch.randn(rows, cols) * active)  # distinct magnitudes, almost surely
    grad = torch.rand(rows, cols) if method == "rigl" else None

    magnitude = layer.weight.detach().reshape(-1).abs()
    score = get_method(method).grow_score(rows * cols, grad, seed, torch.device("cpu"))
    new = drop_and_grow(active.reshape(-1), magnitude, score, k).view(rows, cols)

    # independent reference for the kept set
    flat_w, flat_a = layer.weight.detach().abs().reshape(-1), active.reshape(-1)
    active_idx = flat_a.nonzero().squeeze(1)
    order = active_idx[torch.argsort(flat_w[active_idx])]
    kept = torch.zeros_like(flat_a)
    kept[order[k:]] = True
    kept = kept.view(rows, cols)
    grown = new & ~kept
    assert int(new.sum()) == budget
    assert bool((new & kept).eq(kept).all()), "a kept weight was lost"
    assert int(grown.sum()) == k and not bool((grown & kept).any())
    if method == "rigl":
        candidates = grad.masked_fill(kept, -1.0).reshape(-1)
        expected = torch.zeros(rows * cols, dtype=torch.bool)
        expected[torch.argsort(candidates, descending=True)[:k]] = True
        assert torch.equal(grown.reshape(-1), expected)


# The compact layers' steps cost more in Python on models this small: fewer updates there, still every
# weight of a layer churned many times over (half the budget moves at each update).
@pytest.mark.parametrize(("backend", "updates"), [("dense", 1000), ("sparse", 100)])
def test_active_counts_preserved_over_many_updates(backend, updates):
    for method in ("rigl", "magran"):
        # a fresh model each time: new random masks on sparse-trained weights are refused
        torch.manual_seed(0)
        model = LayerBank([("linear", 16, 12), ("conv", 4, 6, 3), ("gru", 5, 7)])
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        engine = sparsediff.sparsify(
            model,
            opt,
            method=method,
            sparsity=0.8,
            prune_ratio=0.5,
            decay="constant",
            update_every=1,
            end_step="never",
            backend=backend,
        )

        initial = {n: m.clone() for n, m in engine.masks.items()}
        ever_active = {n: m.clone() for n, m in initial.items()}

        def check(engine=engine, ever_active=ever_active):
            for name in engine.names:
                assert int(engine.masks[name].sum()) == engine.budgets[name]
                weight = engine.dense_view(name)
                assert int(torch.count_nonzero(weight)) <= engine.budgets[name]
                assert not bool(weight[~engine.masks[name]].any())
                ever_active[name] |= engine.masks[name]

        train_steps(model, opt, engine, updates, check=check)
        assert engine.num_updates == updates
        # Dynamic sparse training explores: every layer grew weights outside its initial mask.
        for name in engine.names:
            assert bool((ever_active[name] & ~initial[name]).any()), f"{method}: {name} never explored"
        assert invariant_problems(engine, opt) == []
        engine.remove()


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_same_masks_and_different_seed_differs(backend):
    def masks(seed, method="magran"):
        torch.manual_seed(123)  # same weights
        model = LayerBank([("linear", 20, 20), ("conv", 3, 8, 3)])
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        eng = sparsediff.sparsify(
            model,
            opt,
            method=method,
            sparsity=0.7,
            update_every=3,
            total_steps=40,
            seed=seed,
            backend=backend,
        )
        train_steps(model, opt, eng, 20, seed=5)
        return {n: m.clone() for n, m in eng.masks.items()}

    a, b, c = masks(1), masks(1), masks(2)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)
    r1, r2 = masks(1, "rigl"), masks(1, "rigl")
    assert all(torch.equal(r1[n], r2[n]) for n in r1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_static_masks_never_change(backend):
    torch.manual_seed(0)
    model = LayerBank([("linear", 10, 10)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    eng = sparsediff.sparsify(model, opt, method="static", sparsity=0.6, backend=backend)
    m0 = eng.masks[eng.names[0]].clone()
    train_steps(model, opt, eng, 30)
    assert torch.equal(m0, eng.masks[eng.names[0]])
    assert eng.num_updates == 0 and invariant_problems(eng, opt) == []


def test_dense_does_nothing():
    model2 = LayerBank([("linear", 10, 10)])
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    dense = sparsediff.sparsify(model2, opt2, method="dense", sparsity=0.9)
    assert dense.spec.sparsity == 0.0
    assert int(torch.count_nonzero(model2.layers[0].weight)) == 100


@pytest.mark.parametrize("backend", BACKENDS)
def test_topology_updates_follow_schedule(backend):
    torch.manual_seed(0)
    model = LayerBank([("linear", 30, 30)])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    eng = sparsediff.sparsify(
        model,
        opt,
        method="magran",
        sparsity=0.5,
        prune_ratio=0.4,
        update_every=10,
        end_step=35,
        decay="cosine",
        backend=backend,
    )
    steps_with_updates = []
    gen = torch.Generator().manual_seed(0)
    for step in range(1, 61):
        n_before = eng.num_updates
        model.loss(model.inputs(gen)).backward()
        opt.step()
        eng.step()
        opt.zero_grad()
        if eng.num_updates > n_before:
            steps_with_updates.append(step)
            import math

            expected = 0.4 / 2 * (1 + math.cos(math.pi * step / 35))
            assert abs(eng.last_update.drop_fraction - expected) < 1e-12
            assert eng.last_update.dropped == math.floor(expected * eng.budgets[eng.names[0]])
    assert steps_with_updates == [10, 20, 30]
