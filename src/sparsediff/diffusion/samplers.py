"""DDPM and DDIM samplers over any epsilon-prediction callable ``eps_model(x_t, t) -> eps``.

Both take an explicit ``torch.Generator`` and draw all their noise from it, so that a run is
reproducible and two samplers can be fed the same noise (DDIM with eta = 1 over every step is then
DDPM, step for step). Arithmetic is done in float64 for the schedule terms and in the data's dtype
for tensors. ``clip_x0`` clamps the predicted clean sample to [-1, 1]: use it in pixel space only,
never for latents.

``variance_scale`` multiplies the ancestral noise standard deviation (ChiroDiff samples with 0.75).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import ConfigError
from ..progress import track
from .schedules import NoiseSchedule

EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SAMPLERS = ("ddpm", "ddim")


def ddim_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """Evenly spaced timesteps, descending, always ending at 0 (``leading`` spacing as in DDIM)."""
    if not (1 <= steps <= num_timesteps):
        raise ConfigError(f"sampling steps must be in [1, {num_timesteps}], got {steps}")
    stride = num_timesteps // steps
    return list(range(0, stride * steps, stride))[::-1]


def _scalar(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.to(device=like.device, dtype=like.dtype)


@torch.no_grad()
def sample(
    eps_model: EpsModel,
    schedule: NoiseSchedule,
    shape: tuple[int, ...],
    *,
    sampler: str = "ddim",
    steps: int | None = None,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    clip_x0: bool = False,
    variance_scale: float = 1.0,
    x_T: torch.Tensor | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Draw samples of ``shape`` (N, ...).

    Args:
        eps_model: callable predicting the noise from ``(x_t, t)`` with ``t`` an int64 tensor of shape (N,).
        schedule: the training noise schedule.
        sampler: ``"ddpm"`` (ancestral, posterior variance "fixed small") or ``"ddim"``.
        steps: number of denoising steps (DDIM; DDPM always uses all ``T``).
        eta: DDIM stochasticity (0 deterministic, 1 equals DDPM when ``steps == T``).
        generator: source of all noise (CPU generator; noise is moved to ``device``).
        clip_x0: clamp the predicted ``x0`` to [-1, 1] (pixel space only).
        variance_scale: multiplier on the noise standard deviation of each step.
        x_T: starting noise; drawn from ``generator`` when not given.
        progress: report the denoising steps (a bar on a terminal, throttled lines in a log).
    """
    if sampler not in SAMPLERS:
        raise ConfigError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    T = schedule.num_timesteps
    timesteps = list(range(T))[::-1] if sampler == "ddpm" else ddim_timesteps(T, steps or 50)

    def randn(s):
        return torch.randn(s, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)

    x = randn(shape) if x_T is None else x_T.to(device=device, dtype=dtype)
    step = _ddpm_step if sampler == "ddpm" else _ddim_step
    for i, t in enumerate(track(timesteps, desc=f"sampling ({sampler})", quiet=not progress)):
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        t_batch = torch.full((shape[0],), t, device=device, dtype=torch.long)
        eps = eps_model(x, t_batch).to(dtype)
        x = step(schedule, x, eps, t, t_prev, eta, clip_x0, variance_scale, randn)
    return x


def _predict_x0(schedule: NoiseSchedule, x: torch.Tensor, eps: torch.Tensor, t: int, clip: bool):
    ab_t = schedule.alphas_cumprod[t]
    x0 = (x - _scalar((1 - ab_t).sqrt(), x) * eps) / _scalar(ab_t.sqrt(), x)
    if clip:
        x0 = x0.clamp(-1, 1)
        eps = (x - _scalar(ab_t.sqrt(), x) * x0) / _scalar((1 - ab_t).sqrt(), x)
    return x0, eps


def _ddpm_step(schedule, x, eps, t, t_prev, eta, clip, variance_scale, randn):
    """Ancestral step: the mean of q(x_{t-1} | x_t, x0) plus noise of the posterior variance."""
    x0, _ = _predict_x0(schedule, x, eps, t, clip)
    ab_t = schedule.alphas_cumprod[t]
    ab_prev = schedule.alphas_cumprod[t - 1] if t > 0 else torch.tensor(1.0, dtype=torch.float64)
    beta_t, alpha_t = schedule.betas[t], schedule.alphas[t]
    coef_x0 = ab_prev.sqrt() * beta_t / (1 - ab_t)
    coef_xt = alpha_t.sqrt() * (1 - ab_prev) / (1 - ab_t)
    mean = _scalar(coef_x0, x) * x0 + _scalar(coef_xt, x) * x
    if t == 0:
        return mean
    variance = (1 - ab_prev) / (1 - ab_t) * beta_t  # "fixed small"
    return mean + _scalar(variance.sqrt() * variance_scale, x) * randn(x.shape)


def _ddim_step(schedule, x, eps, t, t_prev, eta, clip, variance_scale, randn):
    """Generalised DDIM step from t to t_prev (t_prev = -1 means the final, noise-free x0)."""
    x0, eps = _predict_x0(schedule, x, eps, t, clip)
    ab_t = schedule.alphas_cumprod[t]
    ab_prev = schedule.alphas_cumprod[t_prev] if t_prev >= 0 else torch.tensor(1.0, dtype=torch.float64)
    sigma = eta * ((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)).sqrt()
    direction = _scalar((1 - ab_prev - sigma**2).clamp(min=0).sqrt(), x) * eps
    out = _scalar(ab_prev.sqrt(), x) * x0 + direction
    if t_prev >= 0 and eta > 0:
        out = out + _scalar(sigma * variance_scale, x) * randn(x.shape)
    return out
