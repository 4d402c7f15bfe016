"""Noise schedules, training losses, samplers (DDPM, DDIM) and EMA."""

from .losses import epsilon_loss, sample_timesteps
from .samplers import SAMPLERS, ddim_timesteps, sample
from .schedules import SCHEDULES, NoiseSchedule, make_betas

__all__ = [
    "SAMPLERS",
    "SCHEDULES",
    "NoiseSchedule",
    "ddim_timesteps",
    "epsilon_loss",
    "make_betas",
    "sample",
    "sample_timesteps",
]
