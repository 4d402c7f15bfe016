"""What the training loop, the sampler and the evaluator need from a model family.

A :class:`Task` turns a :class:`~sparsediff.config.RunConfig` into a denoiser, training batches, a loss,
generated samples (as uint8 images, the common currency of FID and sample grids) and the held-out
reference images. Latent diffusion on images and ChiroDiff on pen strokes are the two families
(:mod:`.latent`, :mod:`.strokes`); the loop in ``train.py`` knows nothing else about them.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import nn

from ..config import RunConfig
from ..diffusion import NoiseSchedule, epsilon_loss, sample
from ..errors import ConfigError
from ..models import build_model
from ..progress import track


class TrainData(abc.ABC):
    """Training examples held in memory, gathered into batches by index."""

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of training examples."""

    @abc.abstractmethod
    def batch(self, indices: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        """The examples ``indices`` (B,) as the tensors :meth:`Task.loss` reads, on ``device``."""


@dataclass
class Samples:
    """Generated samples: ``images`` uint8 (N, C, H, W), plus family-specific extras (e.g. strokes)."""

    images: torch.Tensor
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Sampling:
    """One call of :meth:`Task.generate`: how many samples, in which batches, with which sampler.

    A family's :meth:`Task.draw_samples` walks :meth:`batches` and denoises each with :meth:`denoise`,
    which applies the sampler settings; all randomness comes from ``generator``, in call order.
    """

    num: int
    generator: torch.Generator
    sampler: str
    steps: int
    eta: float
    batch_size: int
    device: torch.device
    progress: bool = True

    def batches(self, what: str = "samples") -> Iterator[range]:
        """The sample indices of each batch, in order, reported as ``generating <num> <what>``."""
        starts = range(0, self.num, self.batch_size)
        for start in track(starts, desc=f"generating {self.num} {what}", quiet=not self.progress):
            yield range(start, min(start + self.batch_size, self.num))

    def denoise(
        self,
        eps_model: Callable[..., torch.Tensor],
        schedule: NoiseSchedule,
        shape: tuple[int, ...],
        **kw: Any,
    ) -> torch.Tensor:
        """Samples of ``shape`` from ``eps_model`` (:func:`~sparsediff.diffusion.sample`); ``kw`` adds
        the family's options (``clip_x0``, ``variance_scale``)."""
        return sample(
            eps_model,
            schedule,
            shape,
            sampler=self.sampler,
            steps=self.steps,
            eta=self.eta,
            generator=self.generator,
            device=self.device,
            **kw,
        )


class Task(abc.ABC):
    """One model family: how its denoiser is built, trained, sampled and compared with real data.

    Args:
        cfg: the run's resolved config.
        run_dir: the run directory, where a family may keep caches (None: not bound to a run).
    """

    #: the config's ``family`` this task serves (``ldm``, ``chirodiff``)
    family: ClassVar[str]
    #: the offline FID feature extractor used when eval.feature_extractor is "auto"
    default_feature_extractor: str = "sparsediff-fmnist"

    def __init__(self, cfg: RunConfig, run_dir: Path | None = None):
        self.cfg = cfg
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.schedule = NoiseSchedule.from_config(cfg.diffusion)

    # ------------------------------------------------------------------ model

    def build_model(self) -> nn.Module:
        """The denoiser ``cfg.model`` describes, freshly initialised."""
        return build_model(self.cfg.model)

    def example_inputs(self, model: nn.Module) -> tuple:
        """Inputs of one denoiser call for one sample (FLOP counting)."""
        return model.example_inputs(1)

    # ------------------------------------------------------------------ training

    def train_data(
        self,
        device: torch.device,
        is_main: bool = True,
        barrier: Callable[[], None] | None = None,
        progress: bool = True,
    ) -> TrainData:
        """The training split in memory on ``device``.

        With several processes, only the main one (``is_main``) prepares what the ranks share
        (:meth:`prepare_train_data`: caches on disk); ``barrier`` (e.g. ``accelerator.wait_for_everyone``)
        waits for it before every rank loads its copy (:meth:`load_train_data`). ``progress`` reports a
        long preparation (encoding a dataset into latents).
        """
        if is_main:
            self.prepare_train_data(progress)
        if barrier is not None:
            barrier()
        return self.load_train_data(device)

    def prepare_train_data(self, progress: bool) -> None:
        """Write what every rank's :meth:`load_train_data` reads (run by the main process only); by
        default there is nothing to prepare."""
        return None

    @abc.abstractmethod
    def load_train_data(self, device: torch.device) -> TrainData:
        """The training split in memory on ``device`` (on every rank, after :meth:`prepare_train_data`)."""

    def loss(
        self,
        model: nn.Module,
        batch: dict[str, torch.Tensor],
        generator: torch.Generator,
        teacher: nn.Module | None = None,
        distill_weight: float = 0.0,
    ) -> torch.Tensor:
        """The training loss of ``batch`` (from :meth:`TrainData.batch`): the epsilon MSE on ``batch["x0"]``,
        timesteps and noise drawn from ``generator``; a family adds its options in :meth:`loss_options`.

        With a ``teacher`` (SR-STE fine-tuning), ``distill_weight`` mixes in the distance to the teacher's
        prediction on the same noisy input.
        """
        return epsilon_loss(
            model,
            batch["x0"],
            self.schedule,
            generator,
            teacher=teacher,
            distill_weight=distill_weight,
            **self.loss_options(batch),
        )

    def loss_options(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        """More arguments of :func:`~sparsediff.diffusion.epsilon_loss` for ``batch`` (none by default)."""
        return {}

    # ------------------------------------------------------------------ sampling and evaluation

    @torch.no_grad()
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
        """``num`` samples from ``model``, ``batch_size`` at a time, all randomness from ``generator``.

        ``sampler`` ("ddpm" or "ddim"), ``steps`` (DDIM) and ``eta`` set the denoising; ``progress``
        reports the batches. The family does the work in :meth:`draw_samples`.
        """
        if num < 1:
            raise ConfigError(f"the number of samples must be positive, got {num}")
        return self.draw_samples(
            model, Sampling(num, generator, sampler, steps, eta, batch_size, device, progress)
        )

    @abc.abstractmethod
    def draw_samples(self, model: nn.Module, sampling: Sampling) -> Samples:
        """Denoise the batches of ``sampling`` with ``model`` and turn them into :class:`Samples`."""

    @abc.abstractmethod
    def reference_images(self, n: int | None = None) -> torch.Tensor:
        """uint8 (N, C, H, W) of the held-out split: what FID compares samples against."""

    def save_samples(self, samples: Samples, out_dir: Path) -> list[Path]:
        """Write one PNG per sample (and family-specific files); returns the PNG paths."""
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, img in enumerate(samples.images):
            arr = img.permute(1, 2, 0).numpy()
            arr = arr[..., 0] if arr.shape[-1] == 1 else arr
            path = out_dir / f"{i:06d}.png"
            Image.fromarray(arr).save(path)
            paths.append(path)
        return paths

    def preview_images(self, samples: Samples, limit: int | None = None) -> torch.Tensor:
        """uint8 (N, C, H, W) images of the first ``limit`` (default: all) ``samples`` for looking at
        (sample grids); the samples themselves by default."""
        return samples.images[:limit]

    def decode_flops(self) -> int:
        """Dense FLOPs of turning one generated sample into data (the first-stage decoder)."""
        return 0

    def describe(self) -> dict[str, Any]:
        """What a run summary records about the task (JSON-ready)."""
        return {"family": self.family}


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 [0, 255]."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
