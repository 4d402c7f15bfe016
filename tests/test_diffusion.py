"""Noise schedules, the epsilon loss and the samplers, against reference values and diffusers."""

from __future__ import annotations

import pytest
import torch

from sparsediff.diffusion import NoiseSchedule, ddim_timesteps, epsilon_loss, make_betas, sample
from sparsediff.errors import ConfigError


def test_ldm_schedule_reference_values():
    betas = make_betas("scaled_linear", 1000, 0.0015, 0.0195)
    assert betas.dtype == torch.float64
    assert betas[0].item() == pytest.approx(0.0015, rel=1e-12)
    assert betas[-1].item() == pytest.approx(0.0195, rel=1e-12)
    assert betas[499].item() == pytest.approx(0.00795, abs=5e-5)
    ab = NoiseSchedule(betas).alphas_cumprod
    assert ab[-1].item() == pytest.approx(1.4e-4, rel=0.05)
    # linear in sqrt(beta)
    d = torch.diff(betas.sqrt())
    assert torch.allclose(d, d[0].expand_as(d), rtol=1e-9)


def test_linear_and_cosine_schedules():
    lin = make_betas("linear", 1000, 1e-4, 2e-2)
    assert torch.allclose(torch.diff(lin), torch.full((999,), (2e-2 - 1e-4) / 999, dtype=torch.float64))
    cos = make_betas("cosine", 1000)
    assert cos.max() <= 0.999 and (cos > 0).all()
    with pytest.raises(ConfigError, match="unknown noise schedule"):
        make_betas("quadratic", 10)


@pytest.mark.parametrize("schedule", ["scaled_linear", "linear", "cosine"])
def test_add_noise_agrees_with_diffusers(schedule):
    from diffusers import DDPMScheduler

    names = {"scaled_linear": "scaled_linear", "linear": "linear", "cosine": "squaredcos_cap_v2"}
    ours = NoiseSchedule(make_betas(schedule, 1000, 0.0015, 0.0195))
    ref = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.0015, beta_end=0.0195, beta_schedule=names[schedule]
    )
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(16, 4, 8, 8, generator=g)
    noise = torch.randn(16, 4, 8, 8, generator=g)
    t = torch.tensor([0, 1, 10, 100, 250, 499, 500, 750, 900, 998, 999, 5, 50, 300, 600, 800])
    a = ours.add_noise(x0, noise, t)
    b = ref.add_noise(x0, noise, t)
    # diffusers builds the schedule in float32; ours is float64 rounded at use
    assert torch.allclose(a, b, atol=2e-5, rtol=1e-5)


def test_ddpm_step_matches_diffusers():
    """One ancestral step with the same noise as diffusers' DDPMScheduler (fixed small variance)."""
    from diffusers import DDPMScheduler

    ours = NoiseSchedule(make_betas("scaled_linear", 1000, 0.0015, 0.0195))
    ref = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.0015,
        beta_end=0.0195,
        beta_schedule="scaled_linear",
        clip_sample=False,
        variance_type="fixed_small",
    )
    ref.set_timesteps(1000)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 5, 5, generator=g)
    eps = torch.randn(4, 3, 5, 5, generator=g)
    from sparsediff.diffusion.samplers import _ddpm_step

    for t in (999, 500, 10, 0):
        z = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(t))
        mine = _ddpm_step(ours, x, eps, t, t - 1, 1.0, False, 1.0, lambda shape, z=z: z)
        theirs = ref.step(eps, t, x, generator=torch.Generator().manual_seed(t)).prev_sample
        assert torch.allclose(mine, theirs, atol=1e-4, rtol=1e-4), t


def test_ddim_eta1_all_steps_equals_ddpm():
    sched = NoiseSchedule(make_betas("scaled_linear", 1000, 0.0015, 0.0195))

    def eps_model(x, t):  # any smooth function of (x, t) will do
        return torch.tanh(x) * (t.view(-1, 1, 1, 1).float() / 1000)

    shape = (3, 2, 4, 4)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(1))

    def draw(**sampler) -> torch.Tensor:  # the same start and the same noise stream for every sampler
        gen = torch.Generator().manual_seed(7)
        return sample(eps_model, sched, shape, generator=gen, x_T=x_T, dtype=torch.float64, **sampler)

    a = draw(sampler="ddpm")
    b = draw(sampler="ddim", steps=1000, eta=1.0)
    assert torch.allclose(a, b, atol=1e-9, rtol=1e-9)
    c = draw(sampler="ddim", steps=1000, eta=0.0)
    assert not torch.allclose(a, c, atol=1e-3)


def _oracle(sched: NoiseSchedule, s: float):
    ab = sched.alphas_cumprod

    def eps_hat(x, t):
        a = ab[t].to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
        return (1 - a).sqrt() * x / (a * s**2 + 1 - a)

    return eps_hat


@pytest.mark.parametrize("s", [0.5, 2.0])
def test_gaussian_oracle_samplers_recover_data_std(s):
    """For x0 ~ N(0, s^2 I) the optimal predictor is known; a correct sampler returns std ~ s."""
    sched = NoiseSchedule(make_betas("scaled_linear", 1000, 0.0015, 0.0195))
    shape = (4000, 16)
    x = sample(
        _oracle(sched, s),
        sched,
        shape,
        sampler="ddpm",
        generator=torch.Generator().manual_seed(0),
        dtype=torch.float64,
    )
    assert abs(x.std().item() / s - 1) < 0.02
    assert abs(x.mean().item()) < 0.02 * s
    # Deterministic DDIM integrates the probability-flow ODE to first order: the error shrinks as the
    # number of steps grows, to within 1 % at 1000 steps.
    errors = []
    for steps in (10, 50, 200, 1000):
        y = sample(
            _oracle(sched, s),
            sched,
            shape,
            sampler="ddim",
            steps=steps,
            eta=0.0,
            generator=torch.Generator().manual_seed(0),
            dtype=torch.float64,
        )
        errors.append(abs(y.std().item() / s - 1))
    assert errors == sorted(errors, reverse=True)
    assert errors[1] < 0.10 and errors[2] < 0.03 and errors[3] < 0.01


def test_variance_scale_shrinks_ancestral_noise():
    sched = NoiseSchedule(make_betas("linear", 1000, 1e-4, 2e-2))
    shape = (2000, 8)
    full = sample(
        _oracle(sched, 1.0), sched, shape, sampler="ddpm", generator=torch.Generator().manual_seed(0)
    )
    shrunk = sample(
        _oracle(sched, 1.0),
        sched,
        shape,
        sampler="ddpm",
        variance_scale=0.75,
        generator=torch.Generator().manual_seed(0),
    )
    assert shrunk.std() < full.std() * 0.95


def test_ddim_timesteps_and_errors():
    assert ddim_timesteps(1000, 4) == [750, 500, 250, 0]
    assert ddim_timesteps(10, 10) == list(range(9, -1, -1))
    with pytest.raises(ConfigError, match="sampling steps"):
        ddim_timesteps(10, 11)
    with pytest.raises(ConfigError, match="unknown sampler"):
        sample(lambda x, t: x, NoiseSchedule(make_betas("linear", 10, 1e-4, 2e-2)), (1, 2), sampler="plms")


def test_epsilon_loss_masked_average():
    sched = NoiseSchedule(make_betas("linear", 100, 1e-4, 2e-2))
    x0 = torch.zeros(2, 5, 3)
    noise = torch.ones(2, 5, 3)
    t = torch.tensor([10, 20])

    def model(x_t, t):  # predicts 0 everywhere, except 3 at padded positions of sample 1
        out = torch.zeros_like(x_t)
        out[1, 3:] = 3.0
        return out

    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    loss = epsilon_loss(model, x0, sched, mask=mask, t=t, noise=noise)
    assert loss.item() == pytest.approx(1.0)  # padding ignored, per-sample means averaged
    unmasked = epsilon_loss(model, x0, sched, t=t, noise=noise)
    assert unmasked.item() > 1.0
