"""ChiroDiff on pen strokes: padded sequences in memory, masked epsilon loss, DDPM/DDIM, decode, rasterise.

A training example is one preprocessed drawing as an (L, 3) sequence of (dx, dy, pen) in velocity form
(or (x, y, pen) with ``data.args.representation: absolute``), pen = 1 on the last point of each stroke.
Batches are zero-padded to the longest sequence of the batch; the loss only counts the valid points and
is averaged per sequence over its own valid points (ChiroDiff, Das et al., ICLR 2023; the facts this
module relies on, and where it departs from them, are in docs/chirodiff.md).

Sampling draws each sample's length from the real training lengths (seeded by the sampling generator),
denoises a noise sequence of that length (DDPM, the standard deviation of its noise multiplied by
``sample.variance_scale``, 0.75 in the ChiroDiff presets; or DDIM), then decodes it: velocities ->
absolute points -> strokes, split where the pen channel exceeds ``sample.pen_threshold`` (0.8). The
drawings are rasterised (white on black, like the rest of the project) to ``data.args.raster_size``
pixels (32: what the stroke FID feature network reads), with the same rasteriser as the held-out
references, so that FID compares like with like.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..config import RunConfig
from ..data.raster import points_to_strokes, rasterize, to_svg
from ..data.stroke_sources import build_stroke_dataset
from ..data.strokes import MAX_LEN, StrokeDataset, from_velocity
from ..errors import ConfigError
from ..metrics.features import INPUT_SIZE, STROKE_LINE_WIDTH, STROKE_PADDING
from ..models.chirodiff import FourierTimeEmbedding
from .base import Samples, Sampling, Task, TrainData

# Rasters for FID are drawn as the stroke feature network's training images were (metrics/features.py)
RASTER_SIZE = INPUT_SIZE  # default data.args.raster_size (32): the feature network's input size
RASTER_LINE_WIDTH = STROKE_LINE_WIDTH  # default data.args.raster_line_width, pixels at RASTER_SIZE
RASTER_PADDING = STROKE_PADDING  # empty margin on each side of a raster, as a fraction of its size
PREVIEW_SIZE = 128  # side of the PNGs save_samples writes for looking at (the FID images stay small)
GRID_CELL_SIZE = 64  # side of one drawing in a sample grid
SVG_SIZE = 256  # viewBox side of the SVGs save_samples writes


# ---------------------------------------------------------------------------- decoding and rasterising


def decode_sequence(
    seq: np.ndarray | torch.Tensor, representation: str, pen_threshold: float
) -> list[np.ndarray]:
    """One generated sequence (L, 3) -> strokes: a list of (K, 2) float64 arrays of absolute (x, y).

    ``representation`` says what the sequence holds: ``velocity`` (first row absolute, then deltas,
    accumulated here) or ``absolute``. A stroke ends on a point whose pen value is above
    ``pen_threshold``; points after the last pen lift form a final stroke. Strokes with non-finite
    coordinates (a diverged model) are dropped, so the result may be empty (a blank drawing).
    """
    s = seq.detach().cpu().numpy() if isinstance(seq, torch.Tensor) else np.asarray(seq)
    s = s.astype(np.float64)
    if s.ndim != 2 or s.shape[1] != 3:
        raise ValueError(f"a stroke sequence is (L, 3) of (x, y, pen), got shape {s.shape}")
    if representation == "velocity":
        s = from_velocity(s)
    elif representation != "absolute":
        raise ConfigError(f"data.args.representation must be velocity or absolute, not {representation!r}")
    return [st for st in points_to_strokes(s, pen_threshold) if np.isfinite(st).all()]


def rasterize_drawings(drawings: list[list[np.ndarray]], size: int, line_width: float) -> torch.Tensor:
    """uint8 (N, 1, size, size) rasters of ``drawings`` (lists of strokes), white ink on black."""
    out = np.zeros((len(drawings), 1, size, size), dtype=np.uint8)
    for i, strokes in enumerate(drawings):
        out[i, 0] = rasterize(strokes, size=size, line_width=line_width, padding=RASTER_PADDING)
    return torch.from_numpy(out)


# ---------------------------------------------------------------------------- training data


class SequenceTrainData(TrainData):
    """Stroke sequences held in memory as one zero-padded tensor; batches are cut to their longest one.

    Args:
        sequences: float (L_i, 3) sequences.
        device: where the padded tensor lives (batches are gathered there).
    """

    def __init__(self, sequences: list[torch.Tensor], device: torch.device):
        if not sequences:
            raise ValueError("SequenceTrainData needs at least one sequence")
        self.lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)  # (N,)
        longest = int(self.lengths.max())
        x = torch.zeros(len(sequences), longest, 3, dtype=torch.float32)  # (N, Lmax, 3)
        for i, s in enumerate(sequences):
            x[i, : len(s)] = torch.as_tensor(s, dtype=torch.float32)
        self.x = x.to(device)
        self._lengths_dev = self.lengths.to(device)

    def __len__(self) -> int:
        return self.x.shape[0]

    def batch(self, indices: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        """``x0`` (B, L, 3) zero-padded to the batch's longest sequence L, ``lengths`` (B,), ``mask`` (B, L)."""
        lengths = self.lengths[indices.cpu()]  # (B,) on the CPU: the slice length needs no device sync
        longest = int(lengths.max())
        idx = indices.to(self.x.device)
        x0 = self.x[idx, :longest].to(device, non_blocking=True)  # (B, L, 3)
        lengths = self._lengths_dev[idx].to(device)  # (B,)
        mask = torch.arange(longest, device=device)[None, :] < lengths[:, None]  # (B, L)
        return {"x0": x0, "lengths": lengths, "mask": mask}


# ---------------------------------------------------------------------------- the task


class StrokeDiffusionTask(Task):
    """ChiroDiff: diffusion over pen-point sequences (see the module docstring)."""

    family = "chirodiff"
    default_feature_extractor = "sparsediff-strokes"

    def __init__(self, cfg: RunConfig, run_dir: Path | None = None):
        super().__init__(cfg, run_dir)
        args = cfg.data.args
        self.representation = str(args.get("representation", "velocity"))
        self.raster_size = _positive(args.get("raster_size", RASTER_SIZE), "data.args.raster_size", int)
        self.raster_line_width = _positive(
            args.get("raster_line_width", RASTER_LINE_WIDTH), "data.args.raster_line_width", float
        )
        self.pen_threshold = float(cfg.sample.pen_threshold)
        self._train_lengths: np.ndarray | None = None  # (N,) lengths of the training sequences
        self._reference: torch.Tensor | None = None

    # ------------------------------------------------------------------ model

    def build_model(self) -> nn.Module:
        model = super().build_model()
        config = getattr(model, "config", None)
        steps = getattr(config, "num_timesteps", None)
        if steps is not None and steps != self.cfg.diffusion.timesteps:
            raise ConfigError(
                f"model.args.num_timesteps ({steps}) must equal diffusion.timesteps "
                f"({self.cfg.diffusion.timesteps}): the time embedding divides the step by it"
            )
        if getattr(config, "pos_encoding", None) == "learned":
            longest = self.cfg.data.args.get("max_len", MAX_LEN)
            if longest is None or longest > config.max_len:
                raise ConfigError(
                    f"model.args.max_len ({config.max_len}) is shorter than the longest training sequence "
                    f"(data.args.max_len {longest}); raise model.args.max_len or lower data.args.max_len"
                )
        _fourier_buffers_not_persistent(model)
        return model

    # ------------------------------------------------------------------ data

    def _dataset(self, split: str) -> StrokeDataset:
        return build_stroke_dataset(self.cfg.data, split)

    def train_lengths(self) -> np.ndarray:
        """Lengths (N,) of the training sequences: what generated lengths are drawn from."""
        if self._train_lengths is None:
            self._train_lengths = self._dataset("train").lengths.copy()
        return self._train_lengths

    def typical_length(self) -> int:
        """The median training length (rounded): the sequence length of :meth:`example_inputs`."""
        return max(1, int(round(float(np.median(self.train_lengths())))))

    def load_train_data(self, device: torch.device) -> TrainData:
        """The training split in memory (on ``device``), as :class:`SequenceTrainData`.

        Every rank preprocesses the (small) stroke source itself: there is nothing to cache or wait for.
        """
        ds = self._dataset("train")
        self._train_lengths = ds.lengths.copy()
        return SequenceTrainData([ds[i] for i in range(len(ds))], device)

    # ------------------------------------------------------------------ training

    def loss_options(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The loss counts the valid points only, averaged per sequence over its length, then over the
        batch; the denoiser reads the lengths."""
        return {"mask": batch["mask"], "model_kwargs": {"lengths": batch["lengths"]}}

    def example_inputs(self, model: nn.Module) -> tuple:
        """``(x, t, lengths)`` of one sequence of the median training length (FLOP counting).

        The median is the typical cost of one denoiser call: a packed GRU pays per valid point, so FLOPs
        per sample scale with the length and the median is the honest single number.
        """
        p = next(model.parameters())
        seq_len = self.typical_length()
        x = torch.zeros(1, seq_len, 3, device=p.device, dtype=p.dtype)  # (1, L, 3)
        t = torch.full((1,), self.schedule.num_timesteps // 2, device=p.device, dtype=torch.long)
        lengths = torch.full((1,), seq_len, device=p.device, dtype=torch.long)
        return x, t, lengths

    # ------------------------------------------------------------------ sampling

    def draw_samples(self, model: nn.Module, sampling: Sampling) -> Samples:
        """Drawings: uint8 rasters (N, 1, S, S) in ``images``; ``extras`` holds ``strokes`` (the decoded
        drawings), ``sequences`` (the raw generated (L_i, 3) float32 arrays) and ``lengths`` (N,)."""
        pool = torch.from_numpy(self.train_lengths())  # (M,)
        # the lengths come first from the generator, so they depend on the seed only
        lengths = pool[torch.randint(0, len(pool), (sampling.num,), generator=sampling.generator)]  # (N,)
        sequences: list[np.ndarray] = []
        for batch in sampling.batches("drawings"):
            lens = lengths[batch.start : batch.stop]  # (n,)
            lens_dev = lens.to(sampling.device)

            def eps_model(x_t: torch.Tensor, t: torch.Tensor, lens_dev=lens_dev) -> torch.Tensor:
                return model(x_t, t, lens_dev)

            x = sampling.denoise(
                eps_model,
                self.schedule,
                (len(lens), int(lens.max()), 3),
                clip_x0=False,  # sequences are not bounded like pixels
                variance_scale=self.cfg.sample.variance_scale,
            )  # (n, L, 3)
            x = x.float().cpu().numpy()
            sequences += [x[i, : int(n)].copy() for i, n in enumerate(lens)]
        drawings = [decode_sequence(s, self.representation, self.pen_threshold) for s in sequences]
        images = rasterize_drawings(drawings, self.raster_size, self.raster_line_width)
        return Samples(
            images=images, extras={"strokes": drawings, "sequences": sequences, "lengths": lengths}
        )

    def reference_drawings(self) -> list[list[np.ndarray]]:
        """The validation split as drawings (lists of absolute (K, 2) strokes), in split order."""
        ds = self._dataset("val")
        return [decode_sequence(ds.absolute(i), "absolute", 0.5) for i in range(len(ds))]

    def reference_images(self, n: int | None = None) -> torch.Tensor:
        """The validation split rasterised like the samples: uint8 (N, 1, S, S).

        With ``n`` smaller than the split, a random subset seeded by ``data.split_seed`` (the split is in
        source order, which for KanjiVG is code-point order: a prefix would be all kana).
        """
        if self._reference is None:
            drawings = self.reference_drawings()
            self._reference = rasterize_drawings(drawings, self.raster_size, self.raster_line_width)
        ref = self._reference
        if n is not None and n < len(ref):
            if n < 1:
                raise ConfigError(f"the number of reference images must be positive, got {n}")
            rng = np.random.default_rng(self.cfg.data.split_seed)
            keep = np.sort(rng.choice(len(ref), size=int(n), replace=False))
            ref = ref[torch.from_numpy(keep)]
        return ref

    def preview_images(self, samples: Samples, limit: int | None = None) -> torch.Tensor:
        """The drawings rasterised at ``GRID_CELL_SIZE`` with proportionally wider lines (the FID rasters
        are too small to read in a grid); the rasters themselves for samples made elsewhere."""
        drawings = samples.extras.get("strokes")
        if drawings is None:
            return samples.images[:limit]
        width = self.raster_line_width * GRID_CELL_SIZE / self.raster_size
        return rasterize_drawings(drawings[:limit], GRID_CELL_SIZE, width)

    def save_samples(self, samples: Samples, out_dir: Path) -> list[Path]:
        """``000000.png`` (a ``PREVIEW_SIZE`` raster, for looking at) and ``000000.svg`` per sample."""
        drawings = samples.extras.get("strokes")
        if drawings is None:  # samples made elsewhere: the rasters are all there is
            return super().save_samples(samples, out_dir)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        width = self.raster_line_width * PREVIEW_SIZE / self.raster_size
        paths = []
        for i, strokes in enumerate(drawings):
            png = out_dir / f"{i:06d}.png"
            img = rasterize(strokes, size=PREVIEW_SIZE, line_width=width, padding=RASTER_PADDING)
            Image.fromarray(img).save(png)
            svg = to_svg(strokes, size=SVG_SIZE, line_width=2.0, padding=RASTER_PADDING)
            (out_dir / f"{i:06d}.svg").write_text(svg)
            paths.append(png)
        return paths

    def describe(self) -> dict[str, Any]:
        lengths = self.train_lengths()
        return {
            "family": self.family,
            "data": self.cfg.data.name,
            "representation": self.representation,
            "train_sequences": int(len(lengths)),
            "length_median": self.typical_length(),
            "length_max": int(lengths.max()),
            "raster_size": self.raster_size,
            "pen_threshold": self.pen_threshold,
        }


def _fourier_buffers_not_persistent(model: nn.Module) -> None:
    """Leave the Fourier projection ``W`` of ChiroDiff's time embedding out of the state dict.

    ``W`` is drawn from a fixed seed when the model is built (``time_seed``), so it is part of the
    architecture, not of the learned state. The trainer's EMA file holds parameters only; with ``W`` in
    the state dict, the strict load of ``ema.safetensors`` at sampling time would find it missing.
    """
    for module in model.modules():
        if isinstance(module, FourierTimeEmbedding):
            module.register_buffer("W", module.W, persistent=False)


def _positive(value: Any, where: str, kind: type) -> Any:
    try:
        v = kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where} must be a positive number, got {value!r}") from None
    if isinstance(value, bool) or v <= 0 or (kind is int and v != value):
        raise ConfigError(
            f"{where} must be a positive {'whole ' if kind is int else ''}number, got {value!r}"
        )
    return v
