"""What the training loop, the sampler and the evaluator need from a model family.

A :class:`Task` turns a :class:`~sparsediff.config.RunConfig` into a denoiser, training batches, a loss,
generated samples (as uint8 images, the common currency of FID and sample grids) and the held-out
reference images. Latent diffusion on images and ChiroDiff on pen strokes are the two families; the
loop in ``train.py`` knows nothing else about them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import RunConfig
from ..diffusion import NoiseSchedule


class TrainData:
    """Training examples held in memory, gathered into batches by index."""

    def __len__(self) -> int:
        raise NotImplementedError

    def batch(self, indices: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        raise NotImplementedError


@dataclass
class Samples:
    """Generated samples: ``images`` uint8 (N, C, H, W), plus family-specific extras (e.g. strokes)."""

    images: torch.Tensor
    extras: dict[str, Any] = field(default_factory=dict)


class Task:
    family = "base"
    #: the offline FID feature extractor used when eval.feature_extractor is "auto"
    default_feature_extractor = "sparsediff-fmnist"

    def __init__(self, cfg: RunConfig, run_dir: Path | None = None):
        self.cfg = cfg
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.schedule = NoiseSchedule.from_config(cfg.diffusion)

    def build_model(self) -> nn.Module:
        from ..models import build_model

        return build_model(self.cfg.model)

    def train_data(self, device: torch.device, is_main: bool = True, barrier=None) -> TrainData:
        raise NotImplementedError

    def loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator
    ) -> torch.Tensor:
        raise NotImplementedError

    def example_inputs(self, model: nn.Module) -> tuple:
        """Inputs of one denoiser call for one sample (FLOP counting)."""
        return model.example_inputs(1)

    def generate(
        self,
        model: nn.Module,
        num: int,
        generator: torch.Generator,
        *,
        sampler: str,
        steps: int,
        eta: float,
        batch_size: int,
        device: torch.device,
        progress: bool = True,
    ) -> Samples:
        raise NotImplementedError

    def reference_images(self, n: int | None = None) -> torch.Tensor:
        """uint8 (N, C, H, W) of the held-out split: what FID compares samples against."""
        raise NotImplementedError

    def save_samples(self, samples: Samples, out_dir: Path) -> list[Path]:
        """Write one PNG per sample (and family-specific files); returns the PNG paths."""
        from PIL import Image

        out_dir.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, img in enumerate(samples.images):
            arr = img.permute(1, 2, 0).numpy()
            arr = arr[..., 0] if arr.shape[-1] == 1 else arr
            path = out_dir / f"{i:06d}.png"
            Image.fromarray(arr).save(path)
            paths.append(path)
        return paths

    def decode_flops(self) -> int:
        """Dense FLOPs of turning one generated sample into data (the first-stage decoder)."""
        return 0

    def describe(self) -> dict[str, Any]:
        return {"family": self.family}


def make_task(cfg: RunConfig, run_dir: Path | None = None) -> Task:
    from ..errors import ConfigError

    if cfg.family == "ldm":
        from .latent import LatentDiffusionTask

        return LatentDiffusionTask(cfg, run_dir)
    if cfg.family == "chirodiff":
        from .strokes import StrokeDiffusionTask

        return StrokeDiffusionTask(cfg, run_dir)
    raise ConfigError(f"unknown model family {cfg.family!r}; choose ldm or chirodiff")


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 [0, 255]."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
