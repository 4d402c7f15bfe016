"""Training on compact layers (``backend="sparse"``) follows the masked-dense trajectory.

A diffusers UNet, a DiT and the ChiroDiff GRU are each trained twice in lock step, with the same seed,
data and AdamW: once on the masked dense engine and once on compact layers (native kernels, and once the
compact layers' dense kernels), with RigL (and once MagRan) over enough steps for two topology updates.
After every step the masks are equal and the weights agree within the tolerance below.

Why the weights agree only within a tolerance, and how close: both runs compute the same mathematics,
but the compact layers sum their products in another order, so every gradient differs by float32
rounding. Measured: up to about 1e-6 of the tensor's own largest gradient (each layer's reductions, and
the errors of the layers above passed down), and for a gradient that is mathematically 0 but made of
cancelling terms (an attention key's bias) up to about 1e-8 of the model's largest gradient. AdamW's
step ``lr * m / (sqrt(v) + eps)`` changes by at most ``lr / eps`` times a change of the gradient (the
most where the gradient is far below ``eps``; well above it the step hardly changes). So after ``t``
steps a weight of the two runs differs by at most ``RTOL * max|w|`` (the rounding of the weights' own
arithmetic) plus ``lr / eps`` times the sum over the steps of ``GRAD_RTOL * max|g|`` (the tensor's)
``+ NOISE_RTOL * max|g|`` (the model's): ten times the rounding measured. ``eps`` is 1e-6 rather than
1e-8, so that Adam does not blow rounding noise up to whole steps of ``lr``. The differences measured
stay below a fortieth of that bound (over several seeds); a wrong gradient, or a value or optimiser
state misplaced by an update, moves weights by a good part of ``lr`` at once.

The masks are compared exactly: RigL drops by ``|w|`` and grows by the dense gradient's magnitude, so a
mask can differ only where two candidates' scores are equal to within that rounding (a near-tie). The
setups avoid them; the UNet's resnets' ``time_emb_proj`` layers stay dense because their growth has
such near-ties (measured: two candidates' scores equal to 7 digits), where the two runs' rounding picks
either. A mask that differs is reported with the masked run's closest decision of that step, to tell a
near-tie (a gap at rounding level) from a bug.

The time_emb_proj exclusion and the other settings were checked over four seeds without a mask
differing; the masked dense kernels of a compact layer (``kernels="dense"``) give the masked run's
bits on the GRU model (measured), the native ones differ by rounding only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import sparsediff
import sparsediff.sparse.engine as masked_engine
from helpers import invariant_problems, tiny_unet
from sparsediff.models.chirodiff import ChiroDiffGRU
from sparsediff.models.dit import DiT, DiTConfig
from sparsediff.sparse.topology import drop_and_grow

STEPS, UPDATE_EVERY = 5, 2  # updates at steps 2 and 4, and a step trained after the second one
LR, EPS = 1e-3, 1e-6
RTOL, GRAD_RTOL, NOISE_RTOL = 1e-5, 1e-5, 1e-7


@dataclass
class Case:
    build: Callable[[], nn.Module]
    batch: Callable[[torch.Generator], tuple]
    loss: Callable[[nn.Module, tuple], torch.Tensor]
    exclude: tuple[str, ...] = ()


def _latents(gen: torch.Generator, batch: int = 2) -> tuple:
    clean, noise = torch.randn(batch, 4, 8, 8, generator=gen), torch.randn(batch, 4, 8, 8, generator=gen)
    return clean, noise, torch.randint(0, 1000, (batch,), generator=gen)


def _noisy(clean: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    alpha = (1.0 - t.float() / 1000).view(-1, 1, 1, 1)
    return alpha.sqrt() * clean + (1 - alpha).sqrt() * noise


def _unet_loss(model: nn.Module, batch: tuple) -> torch.Tensor:
    clean, noise, t = batch
    return (model(_noisy(clean, noise, t), t).sample - noise).pow(2).mean()


def _dit_loss(model: nn.Module, batch: tuple) -> torch.Tensor:
    clean, noise, t = batch
    return (model(_noisy(clean, noise, t), t) - noise).pow(2).mean()


def _strokes(gen: torch.Generator) -> tuple:
    lengths = torch.tensor([9, 4, 7])  # ragged: the GRU runs packed sequences
    x, noise = torch.randn(3, 9, 3, generator=gen), torch.randn(3, 9, 3, generator=gen)
    return x, noise, torch.randint(0, 50, (3,), generator=gen), lengths


def _gru_loss(model: nn.Module, batch: tuple) -> torch.Tensor:
    x, noise, t, lengths = batch
    valid = (torch.arange(x.shape[1])[None] < lengths[:, None]).float()[..., None]
    return ((model(x + noise, t, lengths) - noise).pow(2) * valid).sum() / valid.sum()


CASES = {
    # 51 sparsified layers, 45 compact: convolutions, attention and time-embedding linears
    "unet": Case(tiny_unet, _latents, _unet_loss, exclude=("*time_emb_proj*",)),
    # the dit preset's model, small: linears, and the strided patch embedding through the fallback
    "dit": Case(
        lambda: DiT(
            DiTConfig(input_size=8, in_channels=4, patch_size=2, hidden_size=32, depth=2, num_heads=2)
        ),
        _latents,
        _dit_loss,
    ),
    # two bidirectional GRU layers (their recurrence and its backward in native code) and the head
    "gru": Case(lambda: ChiroDiffGRU(hidden=16, layers=2, time_dim=8, num_timesteps=50), _strokes, _gru_loss),
}


def _by_dense_name(engine, model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter of ``model`` by its dense name and in its dense shape (targets through
    ``engine.dense_view``, so both backends read alike)."""
    targets = {id(p): n for n, p in engine.named_parameters()}
    return {
        targets.get(id(p), name): engine.dense_view(targets[id(p)]) if id(p) in targets else p.detach()
        for name, p in model.named_parameters()
    }


def _train(case: Case, backend: str, method: str, kernels: str):
    torch.manual_seed(0)
    model = case.build()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS, weight_decay=1e-2)
    engine = sparsediff.sparsify(
        model,
        opt,
        method=method,
        sparsity=0.8,
        prune_ratio=0.3,
        update_every=UPDATE_EVERY,
        end_step="never",
        decay="constant",
        seed=1,
        exclude=list(case.exclude) or None,
        backend=backend,
        kernels=kernels,
    )
    return model, opt, engine


def _closest_decision(decisions: list[tuple[str, float, float]]) -> str:
    if not decisions:
        return "no update this step"
    name, drop, grow = min(decisions, key=lambda d: min(d[1], d[2]))
    return f"the masked run's closest decision: {name}, drop gap {drop:.1e}, grow gap {grow:.1e} (relative)"


def _gaps(active: torch.Tensor, magnitude: torch.Tensor, score: torch.Tensor, k: int) -> tuple[float, float]:
    """How far the masked run's choice of ``k`` was from its alternatives, relative to the scores' range:
    the gap between the k-th and (k+1)-th smallest kept magnitude, and between the k-th and (k+1)-th
    grow score among the positions not kept (``score`` as drop_and_grow leaves it: -inf where kept)."""
    kept = magnitude[active].float().sort().values
    drop = math.inf if k >= kept.numel() else float(kept[k] - kept[k - 1]) / max(float(kept[-1]), 1e-30)
    free = score[torch.isfinite(score)].float().sort(descending=True).values
    grow = math.inf if k >= free.numel() else float(free[k - 1] - free[k]) / max(float(free[0].abs()), 1e-30)
    return drop, grow


@pytest.mark.parametrize(
    ("model", "method", "kernels"),
    [
        ("unet", "rigl", "sparse"),
        ("dit", "rigl", "sparse"),
        ("dit", "magran", "sparse"),
        ("gru", "rigl", "sparse"),
        ("gru", "rigl", "dense"),
    ],
)
def test_compact_training_follows_the_masked_dense_trajectory(model, method, kernels, monkeypatch):
    case = CASES[model]
    decisions: list[tuple[str, float, float]] = []  # the masked run's choices of the current step

    def recording(active, magnitude, score, k):
        new = drop_and_grow(active, magnitude, score, k)
        name = next(n for n, m in dense.masks.items() if torch.equal(m.reshape(-1), active))  # before update
        decisions.append((name, *_gaps(active, magnitude, score, k)))
        return new

    monkeypatch.setattr(masked_engine, "drop_and_grow", recording)
    runs = {backend: _train(case, backend, method, kernels) for backend in ("dense", "sparse")}
    (dense_model, dense_opt, dense), (compact_model, compact_opt, compact) = runs["dense"], runs["sparse"]
    assert compact.BACKEND == "sparse" and compact.names == dense.names
    grad_error = dict.fromkeys(_by_dense_name(dense, dense_model), 0.0)  # the gradients' rounding, summed
    gen = torch.Generator().manual_seed(0)
    for step in range(1, STEPS + 1):
        batch = case.batch(gen)
        decisions.clear()
        for net, opt, engine in runs.values():
            case.loss(net, batch).backward()
            if engine is dense:  # the masked model's full dense gradients (before the engine masks them)
                largest = {name: float(p.grad.abs().max()) for name, p in net.named_parameters()}
                for name, g in largest.items():
                    grad_error[name] += GRAD_RTOL * g + NOISE_RTOL * max(largest.values())
            opt.step()
            engine.step()
            opt.zero_grad(set_to_none=True)
        assert compact.num_updates == dense.num_updates == step // UPDATE_EVERY
        modes = {t.host.kernel_mode for t in compact.targets.values() if t.host.kind != "scattered"}
        assert modes == {kernels}  # each compact layer on the kernels asked for (the fallback has none)
        differ = [n for n in dense.names if not torch.equal(dense.masks[n], compact.masks[n])]
        assert differ == [], f"step {step}: masks differ in {differ}; {_closest_decision(decisions)}"
        for engine, opt in ((dense, dense_opt), (compact, compact_opt)):
            assert invariant_problems(engine, opt) == [], (step, engine.BACKEND)
        a, b = _by_dense_name(dense, dense_model), _by_dense_name(compact, compact_model)
        assert a.keys() == b.keys()
        for name, w in a.items():
            bound = RTOL * float(w.abs().max()) + LR / EPS * grad_error[name]
            worst = float((b[name] - w).abs().max())
            assert worst <= bound, f"step {step}: {name} differs by {worst:.2e} (tolerance {bound:.2e})"
    # the topology moved in both alike: the final masks are not the initial ones
    torch.manual_seed(0)
    initial = _train(case, "dense", method, kernels)[2].masks
    assert any(not torch.equal(initial[n], compact.masks[n]) for n in compact.names)
    # the compact model's report is the masked one's (the same counts, and the dense model's size)
    assert compact.report().to_dict() == dense.report().to_dict()
