"""The LDM denoiser: diffusers' ``UNet2DModel`` behind the common denoiser interface.

Every denoiser in sparsediff is called as ``model(x_t, t) -> eps`` with ``x_t`` of shape (N, C, H, W)
and integer timesteps ``t`` of shape (N,), and offers ``example_inputs(batch_size)`` for FLOP counting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn


class UNetDenoiser(nn.Module):
    """Epsilon-predicting UNet (``diffusers.UNet2DModel``) for images or latents."""

    def __init__(self, **unet_args: Any):
        super().__init__()
        from diffusers import UNet2DModel

        self.unet = UNet2DModel(**unet_args)

    @classmethod
    def from_unet(cls, unet: nn.Module) -> UNetDenoiser:
        obj = cls.__new__(cls)
        nn.Module.__init__(obj)
        obj.unet = unet
        return obj

    @classmethod
    def from_pretrained(cls, path: str | Path, subfolder: str | None = None) -> UNetDenoiser:
        """Load a diffusers ``UNet2DModel`` saved with ``save_pretrained`` (no network access)."""
        from diffusers import UNet2DModel

        kwargs = {"subfolder": subfolder} if subfolder else {}
        return cls.from_unet(UNet2DModel.from_pretrained(str(path), local_files_only=True, **kwargs))

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        cfg = self.unet.config
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        return (cfg.in_channels, size, size)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t).sample  # (N, C, H, W)

    def example_inputs(self, batch_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        p = next(self.parameters())
        x = torch.zeros(batch_size, *self.sample_shape, device=p.device, dtype=p.dtype)
        t = torch.full((batch_size,), 500, device=p.device, dtype=torch.long)
        return x, t
