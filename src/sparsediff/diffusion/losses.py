"""Training losses of epsilon-prediction diffusion models."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .schedules import NoiseSchedule


def sample_timesteps(
    n: int, num_timesteps: int, generator: torch.Generator | None, device: torch.device | str
) -> torch.Tensor:
    """Uniform integer timesteps in [0, T), shape (n,)."""
    return torch.randint(0, num_timesteps, (n,), generator=generator).to(device)


def epsilon_loss(
    model: Callable[..., torch.Tensor],
    x0: torch.Tensor,
    schedule: NoiseSchedule,
    generator: torch.Generator | None = None,
    mask: torch.Tensor | None = None,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    model_kwargs: dict | None = None,
    teacher: Callable[..., torch.Tensor] | None = None,
    distill_weight: float = 0.0,
) -> torch.Tensor:
    """``E ||eps - model(x_t, t)||^2`` with ``t`` uniform and ``x_t = sqrt(ab) x0 + sqrt(1 - ab) eps``.

    Args:
        model: epsilon predictor ``model(x_t, t, **model_kwargs)``.
        x0: clean data (N, ...).
        generator: CPU generator for ``t`` and ``eps`` (explicit, so runs are reproducible and resumable).
        mask: optional (N, L) or broadcastable 0/1 mask of valid positions (padding excluded); the loss is
            then averaged over valid entries of each sample, then over samples.
        teacher: optional frozen model; adds ``distill_weight * ||teacher(x_t, t) - model(x_t, t)||^2``
            (SparseDM's distillation), computed on the same ``x_t`` and ``t``.
    """
    n = x0.shape[0]
    if t is None:
        t = sample_timesteps(n, schedule.num_timesteps, generator, x0.device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device, x0.dtype)
    x_t = schedule.add_noise(x0, noise, t)
    pred = model(x_t, t, **(model_kwargs or {}))
    loss = _masked_mse(pred, noise, mask)
    if teacher is not None and distill_weight:
        with torch.no_grad():
            target = teacher(x_t, t, **(model_kwargs or {}))
        loss = loss + distill_weight * _masked_mse(pred, target, mask)
    return loss


def _masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    err = (pred.float() - target.float()) ** 2
    if mask is None:
        return err.mean()
    m = mask.to(err.dtype)
    while m.dim() < err.dim():
        m = m.unsqueeze(-1)
    m = m.expand_as(err)
    per_sample = (err * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp(min=1)
    return per_sample.mean()
