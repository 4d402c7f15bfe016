"""Latent diffusion on images: frozen first stage, cached latents, epsilon loss, DDIM/DDPM + decode."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..checkpoint import load_tensors, save_tensors
from ..config import RunConfig
from ..data.images import build_image_dataset, reference_images_uint8
from ..errors import ConfigError
from ..models.autoencoder import FirstStage
from ..progress import track
from ..sparse import count_flops
from .base import Samples, Sampling, Task, TrainData, to_uint8


class TensorTrainData(TrainData):
    """Training examples (latents or pixels) as one tensor (N, C, H, W)."""

    def __init__(self, x: torch.Tensor):
        self.x = x  # (N, C, H, W)

    def __len__(self) -> int:
        return self.x.shape[0]

    def batch(self, indices: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        return {"x0": self.x[indices.to(self.x.device)].to(device, non_blocking=True)}


def _all_images(
    dataset: Dataset, batch_size: int = 256, num_workers: int = 0, progress: bool = True
) -> Iterator[torch.Tensor]:
    """Iterate a dataset of float (C, H, W) images in batches (B, C, H, W)."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    yield from track(loader, desc="encoding training images", quiet=not progress)


class LatentDiffusionTask(Task):
    """Latent diffusion on images (pixel-space diffusion when ``first_stage.kind`` is ``none``)."""

    family = "ldm"

    def __init__(self, cfg: RunConfig, run_dir: Path | None = None):
        super().__init__(cfg, run_dir)
        self._first_stage: FirstStage | None = None
        self.default_feature_extractor = (
            "sparsediff-fmnist" if cfg.data.name == "fashion-mnist" else "inception-v3-compat"
        )

    # ------------------------------------------------------------------ first stage

    @property
    def pixel_space(self) -> bool:
        return self.cfg.first_stage.kind == "none"

    @property
    def first_stage(self) -> FirstStage | None:
        """The frozen first stage (loaded on first use), or None in pixel space."""
        if self.pixel_space:
            return None
        if self._first_stage is None:
            spec = self.cfg.first_stage
            if spec.kind not in ("autoencoder-kl", "pretrained"):
                raise ConfigError(
                    f"first_stage.kind must be none, autoencoder-kl or pretrained, got {spec.kind!r}"
                )
            if not spec.path:
                raise ConfigError(
                    "first_stage.path is not set: train a first stage with "
                    f"`sparsediff train-autoencoder --preset {self.cfg.name} --out DIR` and pass "
                    "--first-stage DIR (or --set first_stage.path=DIR), or point it at a diffusers "
                    "AutoencoderKL / VQModel directory"
                )
            if not Path(spec.path).exists():
                raise ConfigError(f"first_stage.path {spec.path!r} does not exist")
            self._first_stage = FirstStage.load(spec.path)
        return self._first_stage

    def data_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of what the denoiser sees: latents, or pixels in pixel space."""
        d = self.cfg.data
        if self.pixel_space:
            return (d.channels, d.image_size, d.image_size)
        return self.first_stage.latent_shape(d.image_size)

    def build_model(self) -> nn.Module:
        model = super().build_model()
        expected = self.data_shape()
        got = tuple(getattr(model, "sample_shape", expected))
        if got != expected:
            raise ConfigError(
                f"the denoiser takes inputs of shape {got} but the data (first stage {self.cfg.first_stage.kind}, "
                f"image_size {self.cfg.data.image_size}) gives {expected}; adjust model.args"
            )
        return model

    # ------------------------------------------------------------------ data

    def _cache_key(self) -> str:
        fs = self.first_stage
        ident = {
            "data": {k: v for k, v in vars(self.cfg.data).items() if k != "num_workers"},
            "first_stage": str(Path(self.cfg.first_stage.path).resolve()),
            "scale": fs.scale,
            "weights_mtime": max(
                (p.stat().st_mtime_ns for p in Path(self.cfg.first_stage.path).glob("*.safetensors")),
                default=0,
            ),
        }
        return hashlib.sha1(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def _cache_path(self) -> Path:
        fs_dir = Path(self.cfg.first_stage.path)
        base = fs_dir / "latent-cache"
        try:
            base.mkdir(exist_ok=True)
            probe = base / f".write-test-{os.getpid()}"  # one per process: ranks probe at once
            probe.write_text("")
            probe.unlink()
        except OSError:  # a read-only first stage (a downloaded model): cache in the run directory
            base = (self.run_dir or Path(".")) / "latent-cache"
            base.mkdir(parents=True, exist_ok=True)
        return base / f"latents-{self._cache_key()}.safetensors"

    def encode_dataset(self, progress: bool = True) -> torch.Tensor:
        """Latents (N, c, h, w) of the training split, scaled, on the CPU."""
        fs = self.first_stage
        dataset = build_image_dataset(self.cfg.data, "train")
        device = next(fs.parameters()).device
        chunks = [
            fs.encode(x.to(device)).cpu()
            for x in _all_images(dataset, 256, self.cfg.data.num_workers, progress)
        ]
        return torch.cat(chunks)

    def prepare_train_data(self, progress: bool) -> None:
        """Encode the training split once into a latent cache, next to the first stage (or in the run
        directory when the first stage is read-only); nothing to do in pixel space."""
        if self.pixel_space:
            return
        path = self._cache_path()
        if not path.exists():
            latents = self.encode_dataset(progress)
            tmp = path.with_suffix(f".tmp-{os.getpid()}")  # two processes may encode at once
            save_tensors(tmp, {"latents": latents}, {"scale": str(self.first_stage.scale)})
            tmp.replace(path)

    def load_train_data(self, device: torch.device) -> TrainData:
        """The training split as one tensor on ``device``: the cached latents, or pixels in pixel space."""
        if self.pixel_space:
            dataset = build_image_dataset(self.cfg.data, "train")
            x = torch.cat(list(_all_images(dataset, 512, self.cfg.data.num_workers, progress=False)))
            return TensorTrainData(x.to(device))
        latents = load_tensors(self._cache_path())[0]["latents"]
        return TensorTrainData(latents.to(device))

    # ------------------------------------------------------------------ sampling

    def draw_samples(self, model: nn.Module, sampling: Sampling) -> Samples:
        """Images: latents denoised batch by batch and decoded by the first stage."""
        shape = self.data_shape()
        fs = self.first_stage
        home = next(fs.parameters()).device if fs is not None else None
        if fs is not None:
            fs.to(sampling.device)
        images = []
        try:
            for batch in sampling.batches("samples"):
                z = sampling.denoise(model, self.schedule, (len(batch), *shape), clip_x0=self.pixel_space)
                x = z if fs is None else fs.decode(z)
                images.append(to_uint8(x.float().cpu()))
        finally:
            if fs is not None:
                fs.to(home)  # back where it was: during training it waits on the CPU between grids
        return Samples(images=torch.cat(images))

    def reference_images(self, n: int | None = None) -> torch.Tensor:
        """The first ``n`` validation images (all with None), uint8 (N, C, H, W)."""
        return reference_images_uint8(self.cfg.data, "val", n)

    def decode_flops(self) -> int:
        fs = self.first_stage
        if fs is None:
            return 0
        z = torch.zeros(1, *self.data_shape())
        return count_flops(_Decoder(fs), (z,), None, targets=[]).flops_dense

    def describe(self) -> dict[str, Any]:
        out = {"family": self.family, "data_shape": list(self.data_shape())}
        if self.first_stage is not None:
            out["first_stage"] = {
                "path": self.cfg.first_stage.path,
                "kind": self.first_stage.kind,
                "scale": self.first_stage.scale,
            }
        return out


class _Decoder(nn.Module):
    """The first stage's decoder as a module of its own (FLOP counting traces ``forward``)."""

    def __init__(self, fs: FirstStage):
        super().__init__()
        self.fs = fs

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.fs.decode(z)
