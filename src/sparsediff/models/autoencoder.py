"""The first stage of latent diffusion: a frozen autoencoder between images and latents.

``FirstStage`` wraps a diffusers ``AutoencoderKL`` or ``VQModel``. Latents are multiplied by
``scale = 1 / std`` of the training latents (LDM's ``scale_by_std``), so the diffusion model sees
unit-variance data; ``decode`` divides it out again.

- KL autoencoders encode to the posterior mode (the mean); the KL weight used in training is tiny, so
  the posterior is nearly deterministic and latents can be cached once per dataset.
- VQ autoencoders (LDM's VQ-f4) are diffused in the pre-quantisation space, as in LDM: ``encode``
  returns the continuous latents and ``decode`` quantises before decoding.

A first stage is stored as a diffusers ``save_pretrained`` directory plus ``sparsediff_first_stage.json``
(kind, scale, training summary). Any diffusers ``AutoencoderKL`` / ``VQModel`` directory loads too; its
scale is then taken from the JSON file if present, else from the model config's ``scaling_factor``,
else estimated from data by the caller (:meth:`FirstStage.estimate_scale`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, StateError

META_FILE = "sparsediff_first_stage.json"


def small_kl_autoencoder(
    in_channels: int = 1,
    latent_channels: int = 4,
    sample_size: int = 32,
    block_out_channels: tuple[int, ...] = (32, 64, 64),
    layers_per_block: int = 1,
    norm_num_groups: int = 16,
) -> nn.Module:
    """A small diffusers ``AutoencoderKL``; downsampling factor ``2 ** (len(block_out_channels) - 1)``."""
    from diffusers import AutoencoderKL

    n = len(block_out_channels)
    return AutoencoderKL(
        in_channels=in_channels,
        out_channels=in_channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        latent_channels=latent_channels,
        norm_num_groups=norm_num_groups,
        sample_size=sample_size,
    )


class FirstStage(nn.Module):
    """Frozen encoder/decoder with latent scaling. ``encode``: (N, C, H, W) in [-1, 1] -> (N, c, h, w)."""

    def __init__(self, vae: nn.Module, scale: float = 1.0, meta: dict[str, Any] | None = None):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        self.kind = "vq" if type(vae).__name__ == "VQModel" else "kl"
        self.scale = float(scale)
        self.meta = dict(meta or {})

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        cfg = self.vae.config
        return cfg.latent_channels if self.kind == "kl" else cfg.vq_embed_dim or cfg.latent_channels

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        h = image_size // self.downsample_factor
        return (self.latent_channels, h, h)

    @torch.no_grad()
    def encode_unscaled(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "kl":
            return self.vae.encode(x).latent_dist.mode()
        return self.vae.encode(x).latents

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode_unscaled(x) * self.scale

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        z = z / self.scale
        if self.kind == "kl":
            return self.vae.decode(z).sample
        return self.vae.decode(z, force_not_quantize=False).sample

    @torch.no_grad()
    def estimate_scale(self, images: torch.Tensor, batch_size: int = 256) -> float:
        """``1 / std`` of the unscaled latents of ``images``; sets and returns it."""
        chunks = [self.encode_unscaled(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
        std = torch.cat(chunks).float().std().item()
        if not (std > 0):
            raise StateError("latents of the first stage have zero variance; the autoencoder is broken")
        self.scale = 1.0 / std
        return self.scale

    # ------------------------------------------------------------------ storage

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        self.vae.save_pretrained(str(directory), safe_serialization=True)
        meta = {**self.meta, "kind": self.kind, "scale": self.scale, "class": type(self.vae).__name__}
        (directory / META_FILE).write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, directory: str | Path, subfolder: str | None = None) -> FirstStage:
        """Load a sparsediff first stage or any diffusers ``AutoencoderKL`` / ``VQModel`` directory."""
        directory = Path(directory)
        root = directory / subfolder if subfolder else directory
        config_file = root / "config.json"
        if not config_file.exists():
            raise ConfigError(
                f"{root} is not a first-stage directory: no config.json (expected a diffusers "
                "AutoencoderKL or VQModel saved with save_pretrained, or a `sparsediff train-autoencoder` run)"
            )
        class_name = json.loads(config_file.read_text()).get("_class_name", "AutoencoderKL")
        import diffusers

        if class_name not in ("AutoencoderKL", "VQModel"):
            raise ConfigError(f"{root}: first stage must be an AutoencoderKL or VQModel, found {class_name}")
        model_cls = getattr(diffusers, class_name)
        vae = model_cls.from_pretrained(str(root), local_files_only=True)
        meta_file = root / META_FILE
        meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
        scale = meta.get("scale", getattr(vae.config, "scaling_factor", None) or 1.0)
        return cls(vae, scale=scale, meta=meta)
