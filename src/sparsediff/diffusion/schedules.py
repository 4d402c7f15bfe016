"""Noise schedules, built in float64.

- ``scaled_linear``: the LDM "linear" schedule, linear in sqrt(beta):
  ``betas = linspace(sqrt(b0), sqrt(b1), T) ** 2`` (0.0015 -> 0.0195 for LDM; diffusers' ``scaled_linear``).
- ``linear``: ``betas = linspace(b0, b1, T)`` (DDPM, ChiroDiff: 1e-4 -> 2e-2).
- ``cosine``: Nichol & Dhariwal's ``alpha_bar(t) = cos((t/T + s) / (1 + s) * pi / 2) ** 2``, s = 0.008,
  betas clipped at 0.999 (diffusers' ``squaredcos_cap_v2``).

Sampling and training use the same :class:`NoiseSchedule`; its tensors are moved to the data's device
and dtype only when used, so nothing is rounded to float32 before it has to be.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..config import DiffusionSpec

SCHEDULES = ("scaled_linear", "linear", "cosine")


def make_betas(
    schedule: str, timesteps: int, beta_start: float = 0.0015, beta_end: float = 0.0195
) -> torch.Tensor:
    """Betas of shape (T,), float64."""
    if timesteps < 1:
        raise ConfigError(f"diffusion.timesteps must be positive, got {timesteps}")
    if schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, timesteps, dtype=torch.float64) ** 2
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)
    if schedule == "cosine":
        s = 0.008
        t = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
        alpha_bar = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
        return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
    raise ConfigError(f"unknown noise schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")


@dataclass
class NoiseSchedule:
    """Betas and the quantities derived from them, all float64 tensors of shape (T,)."""

    betas: torch.Tensor

    def __post_init__(self) -> None:
        self.betas = self.betas.to(torch.float64)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)

    @classmethod
    def from_config(cls, spec: DiffusionSpec) -> NoiseSchedule:
        """From a :class:`sparsediff.config.DiffusionSpec`."""
        return cls(make_betas(spec.schedule, spec.timesteps, spec.beta_start, spec.beta_end))

    @property
    def num_timesteps(self) -> int:
        return self.betas.numel()

    def _gather(self, values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        out = values.to(t.device)[t].to(like.dtype)
        return out.view(-1, *([1] * (like.dim() - 1)))  # (N, 1, ..., 1)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps`` for integer timesteps ``t`` of shape (N,)."""
        ab = self.alphas_cumprod.to(t.device)[t]
        a = ab.sqrt().to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
        b = (1 - ab).sqrt().to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
        return a * x0 + b * noise
