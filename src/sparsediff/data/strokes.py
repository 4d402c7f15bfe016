"""Pen-stroke data for ChiroDiff: representation, preprocessing, dataset and collate.

A *drawing* is ``list[np.ndarray]``: one (K, 2) float array of absolute (x, y) per stroke, in drawing
order. Every source here uses image coordinates (y grows downwards): KanjiVG SVGs, QuickDraw and the
Hershey fonts all do.

A *sequence* is what the denoiser sees: an (L, 3) array of (x, y, pen) with pen = 1 on the last point of
each stroke. ``to_points`` makes the absolute form, ``to_velocity`` the velocity form (first row absolute,
then deltas), which is ChiroDiff's main representation (Das et al., ICLR 2023; docs/chirodiff.md collects
the facts this module takes from the paper).

Preprocessing follows ChiroDiff (docs/chirodiff.md, section 2): move the first point to the origin,
divide by the largest distance of any point from the origin, resample every stroke by arc length every
0.05 units, multiply by 10, drop drawings with more than 25 strokes or longer than 300 points. All of
these are arguments.
What ChiroDiff leaves unsaid and is **assumed** here (documented defaults, never hidden constants):

- both endpoints of every stroke are kept; the last gap of a stroke may be shorter than the step;
- a stroke of one point (or of zero arc length) becomes a single point;
- the stroke limit is checked on the input strokes, the length limit on the resampled sequence;
- train/val are split 0.85 / 0.15 over the drawings that survive preprocessing, with ``data.split_seed``.

This module is what every stroke loader (:mod:`~sparsediff.data.kanjivg`, :mod:`~sparsediff.data.quickdraw`,
:mod:`~sparsediff.data.vmnist`) builds on; the sources are registered by name in
:mod:`sparsediff.data.stroke_sources`, whose :func:`~sparsediff.data.stroke_sources.build_stroke_dataset`
a config's ``data:`` section reads.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import ConfigError, DataError

Strokes = list[np.ndarray]  # one (K, 2) float array of absolute (x, y) per stroke

# ChiroDiff's preprocessing defaults (docs/chirodiff.md, section 2)
RESAMPLE = 0.05
SCALE = 10.0
MAX_STROKES = 25
MAX_LEN = 300
VAL_FRACTION = 0.15
REPRESENTATIONS = ("velocity", "absolute")


class SkipReason(str, enum.Enum):
    """Why a drawing was left out; the ``value`` is the key used in :class:`DataReport`."""

    NO_PATHS = "no_paths"  # an SVG with no <path> element
    MALFORMED = "malformed"  # unreadable: bad JSON / XML / path data, wrong shapes, non-finite numbers
    MISSING = "missing"  # a requested item (a character) that the source does not have
    EMPTY = "empty"  # no points at all
    DEGENERATE = "degenerate"  # every point identical: nothing to normalise
    TOO_LONG = "too_long"  # more than max_len points after resampling
    TOO_MANY_STROKES = "too_many_strokes"  # more than max_strokes strokes
    NOT_RECOGNIZED = "not_recognized"  # QuickDraw drawing with recognized == false (recognized_only)


def _reason_key(reason: str | SkipReason) -> str:
    return reason.value if isinstance(reason, SkipReason) else str(reason)


# ---------------------------------------------------------------------------- report


@dataclass
class DataReport:
    """What happened to every item of a source: ``total == used + sum(skipped.values())``.

    ``skipped`` counts items by reason (see :class:`SkipReason`); ``examples`` keeps the first few
    ``(source, reason)`` pairs, where source names the file and line or array index.
    """

    source: str = ""
    total: int = 0
    used: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    examples: list[tuple[str, str]] = field(default_factory=list)

    MAX_EXAMPLES: ClassVar[int] = 5

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def keep(self, n: int = 1) -> None:
        """Count ``n`` items that were used."""
        self.total += n
        self.used += n

    def skip(self, source: str, reason: str | SkipReason) -> None:
        """Count one item left out for ``reason``; ``source`` says which (file, line, index)."""
        self.total += 1
        self._add_skip(source, _reason_key(reason))

    def reject(self, source: str, reason: str | SkipReason) -> None:
        """A later stage drops an item that an earlier one counted as used."""
        if self.used <= 0:
            raise ValueError("reject() without a used item to take back")
        self.used -= 1
        self._add_skip(source, _reason_key(reason))

    def _add_skip(self, source: str, key: str) -> None:
        self.skipped[key] = self.skipped.get(key, 0) + 1
        if len(self.examples) < self.MAX_EXAMPLES:
            self.examples.append((source, key))

    def merge(self, other: DataReport) -> DataReport:
        """A new report that adds up ``self`` and ``other`` (e.g. the files of several categories)."""
        skipped = dict(self.skipped)
        for k, v in other.skipped.items():
            skipped[k] = skipped.get(k, 0) + v
        names = [s for s in (self.source, other.source) if s]
        return DataReport(
            source=" + ".join(dict.fromkeys(names)),
            total=self.total + other.total,
            used=self.used + other.used,
            skipped=skipped,
            examples=(self.examples + other.examples)[: self.MAX_EXAMPLES],
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {
            "source": self.source,
            "total": self.total,
            "used": self.used,
            "skipped": dict(sorted(self.skipped.items())),
            "examples": [list(e) for e in self.examples],
        }

    def __str__(self) -> str:
        head = f"{self.source or 'data'}: {self.used} of {self.total} used"
        if not self.skipped:
            return head
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items(), key=lambda kv: -kv[1]))
        eg = "; ".join(f"{s}: {r}" for s, r in self.examples[:3])
        return f"{head}, {self.n_skipped} skipped ({reasons}); e.g. {eg}"


# ---------------------------------------------------------------------------- representation


def _check_strokes(strokes: Sequence[np.ndarray]) -> Strokes:
    out = []
    for i, s in enumerate(strokes):
        a = np.asarray(s, dtype=np.float64)
        if a.ndim != 2 or a.shape[1] != 2:
            raise DataError(f"stroke {i} has shape {a.shape}; strokes are (K, 2) arrays of (x, y)")
        out.append(a)
    return out


def to_points(strokes: Sequence[np.ndarray]) -> np.ndarray:
    """Absolute (x, y, pen) sequence (L, 3), pen = 1 on the last point of each stroke, else 0.

    Empty strokes contribute nothing. The dtype is float64.
    """
    parts = []
    for s in _check_strokes(strokes):
        if len(s) == 0:
            continue
        p = np.zeros((len(s), 3))  # (K, 3)
        p[:, :2] = s
        p[-1, 2] = 1.0
        parts.append(p)
    return np.concatenate(parts) if parts else np.zeros((0, 3))


def to_velocity(points: np.ndarray) -> np.ndarray:
    """Velocity form (L, 3): row 0 = (x0, y0, pen0) absolute, then (dx, dy, pen); pen is copied."""
    p = np.asarray(points)
    v = p.copy()
    v[1:, :2] = p[1:, :2] - p[:-1, :2]
    return v


def from_velocity(velocity: np.ndarray) -> np.ndarray:
    """Inverse of :func:`to_velocity`: cumulative sums of (x, y); pen copied."""
    v = np.asarray(velocity)
    p = v.copy()
    p[:, :2] = np.cumsum(v[:, :2], axis=0)
    return p


def random_affine(
    strokes: Sequence[np.ndarray],
    rng: np.random.Generator,
    rotation: float,
    scale: tuple[float, float],
    shear: float,
) -> Strokes:
    """A seeded random affine copy of a drawing, about the centre of its bounding box.

    Draws, in this order, a rotation in +-``rotation`` degrees, x and y scales in ``scale`` and a shear
    factor in +-``shear``; the same generator state gives the same copy.
    """
    pts = np.concatenate(strokes)
    centre = (pts.min(0) + pts.max(0)) / 2  # (2,)
    th = np.deg2rad(rng.uniform(-rotation, rotation))
    sx, sy = rng.uniform(scale[0], scale[1], size=2)
    k = rng.uniform(-shear, shear)
    rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    m = rot @ np.array([[1.0, k], [0.0, 1.0]]) @ np.diag([sx, sy])  # (2, 2)
    return [(s - centre) @ m.T + centre for s in strokes]


def _resample(xy: np.ndarray, counts: np.ndarray, step: float) -> tuple[np.ndarray, np.ndarray]:
    """Resample every stroke every ``step`` of arc length, both endpoints kept, all strokes at once.

    ``xy`` (P, 2) holds the strokes one after another, ``counts`` (S,) their point counts. Returns the
    new points (L, 2) and the new counts (S,). A stroke of zero arc length becomes one point (assumed);
    the last gap of a stroke is shorter than ``step`` unless its length is a multiple of it (assumed).
    """
    sid = np.repeat(np.arange(len(counts)), counts)  # (P,) stroke of each point
    seg = np.linalg.norm(np.diff(xy, axis=0), axis=1)  # (P-1,)
    seg[sid[1:] != sid[:-1]] = 0.0  # no length between strokes
    cum = np.concatenate([[0.0], np.cumsum(seg)])  # (P,) arc length, continuous over strokes
    # one increasing coordinate for a single np.interp: stroke k is shifted by k units, so samples of
    # one stroke never interpolate into the next (repeated points give repeated, harmless, xp values)
    coord = cum + sid
    first = np.cumsum(counts) - counts  # (S,) index of each stroke's first point
    start, length = coord[first], cum[first + counts - 1] - cum[first]  # (S,), (S,)
    n = np.floor(length / step).astype(np.int64) + 1  # (S,) samples at 0, step, 2 step, ...
    within = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)  # (M,) sample index in its stroke
    at = np.repeat(start, n) + within * step  # (M,)
    end = start + length
    short = length - (n - 1) * step > 1e-6 * step  # the end point is no sample yet: add it
    at[(np.cumsum(n) - 1)[~short]] = end[~short]  # (else snap the last sample onto it exactly)
    at = np.insert(at, np.cumsum(n)[short], end[short])
    out = np.stack([np.interp(at, coord, xy[:, 0]), np.interp(at, coord, xy[:, 1])], axis=1)  # (L, 2)
    return out, n + short


def preprocess(
    strokes: Sequence[np.ndarray],
    resample: float | None = RESAMPLE,
    scale: float = SCALE,
    max_strokes: int | None = MAX_STROKES,
    max_len: int | None = MAX_LEN,
) -> np.ndarray | SkipReason:
    """ChiroDiff preprocessing of one drawing: an absolute (L, 3) float64 sequence, or why it was dropped.

    Steps: drop empty strokes; shift so the first point is the origin; divide by the largest distance
    of any point from the origin; resample each stroke every ``resample`` units of arc length (``None``
    or 0 keeps the points as they are); multiply by ``scale``. Returns :class:`SkipReason` ``EMPTY`` (no
    points), ``MALFORMED`` (non-finite values), ``DEGENERATE`` (all points identical),
    ``TOO_MANY_STROKES`` (more than ``max_strokes``) or ``TOO_LONG`` (more than ``max_len`` points after
    resampling). ``None`` disables a limit.
    """
    strokes = [s for s in _check_strokes(strokes) if len(s)]
    if not strokes:
        return SkipReason.EMPTY
    if not all(np.isfinite(s).all() for s in strokes):
        return SkipReason.MALFORMED
    if max_strokes is not None and len(strokes) > max_strokes:
        return SkipReason.TOO_MANY_STROKES
    counts = np.array([len(x) for x in strokes])  # (S,)
    xy = np.concatenate(strokes)  # (P, 2)
    xy = xy - xy[0]  # first point at the origin
    radius = float(np.sqrt((xy**2).sum(axis=1).max()))
    if radius <= 0.0:
        return SkipReason.DEGENERATE
    xy = xy / radius
    if resample:
        xy, counts = _resample(xy, counts, float(resample))
    points = np.zeros((len(xy), 3))  # (L, 3)
    points[:, :2] = xy * scale
    points[np.cumsum(counts) - 1, 2] = 1.0  # pen up after the last point of each stroke
    if max_len is not None and len(points) > max_len:
        return SkipReason.TOO_LONG
    return points


# ---------------------------------------------------------------------------- dataset


class StrokeDataset(Dataset):
    """Preprocessed stroke sequences; ``ds[i]`` is a float32 tensor (L_i, 3).

    Args:
        sequences: absolute (L, 3) sequences as :func:`preprocess` returns them.
        representation: ``"velocity"`` (ChiroDiff's default) or ``"absolute"``; ``sequences`` are
            stored converted to it, as float32.
        labels: optional label of each sequence (a character, a category, a digit).
        report: the :class:`DataReport` of the source these sequences came from.
    """

    def __init__(
        self,
        sequences: Sequence[np.ndarray],
        representation: str = "velocity",
        labels: Sequence[str] | None = None,
        report: DataReport | None = None,
    ) -> None:
        if representation not in REPRESENTATIONS:
            raise ConfigError(
                f"data.args.representation must be one of {', '.join(REPRESENTATIONS)}, "
                f"not {representation!r}"
            )
        if labels is not None and len(labels) != len(sequences):
            raise ValueError(f"{len(labels)} labels for {len(sequences)} sequences")
        self.representation = representation
        conv = to_velocity if representation == "velocity" else np.asarray
        self.sequences = [
            np.ascontiguousarray(conv(np.asarray(s, np.float64)), np.float32) for s in sequences
        ]
        self.labels = list(labels) if labels is not None else None
        self.lengths = np.array([len(s) for s in self.sequences], dtype=np.int64)  # (N,)
        self.report = report if report is not None else DataReport(total=len(sequences), used=len(sequences))

    @classmethod
    def from_drawings(
        cls,
        drawings: Sequence[Strokes],
        representation: str = "velocity",
        labels: Sequence[str] | None = None,
        source: str = "drawings",
        **preprocess_kwargs: Any,
    ) -> StrokeDataset:
        """Preprocess raw drawings (lists of strokes), count the dropped ones, and build the dataset."""
        report = DataReport(source=source)
        seqs, keep_labels = [], []
        for i, d in enumerate(drawings):
            r = preprocess(d, **preprocess_kwargs)
            if isinstance(r, SkipReason):
                report.skip(f"{source}[{i}]", r)
                continue
            report.keep()
            seqs.append(r)
            if labels is not None:
                keep_labels.append(labels[i])
        return cls(seqs, representation, keep_labels if labels is not None else None, report)

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.sequences[i])  # (L, 3)

    def absolute(self, i: int) -> np.ndarray:
        """Sequence ``i`` as absolute (L, 3) float64 points, whatever the stored representation."""
        s = self.sequences[i].astype(np.float64)
        return from_velocity(s) if self.representation == "velocity" else s

    def __repr__(self) -> str:
        lens = f", length {self.lengths.min()}..{self.lengths.max()}" if len(self) else ""
        return f"StrokeDataset({len(self)} sequences, {self.representation}{lens})"


def collate_strokes(batch: Sequence[torch.Tensor | np.ndarray]) -> dict[str, torch.Tensor]:
    """Pad a list of (L_i, 3) sequences: ``x`` (N, Lmax, 3) float32 zero-padded, ``lengths`` (N,) int64,
    ``mask`` (N, Lmax) bool, True on real points."""
    seqs = [torch.as_tensor(np.asarray(b) if not isinstance(b, torch.Tensor) else b) for b in batch]
    if not seqs:
        raise ValueError("collate_strokes got an empty batch")
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.int64)  # (N,)
    lmax = int(lengths.max())
    x = torch.zeros(len(seqs), lmax, 3, dtype=torch.float32)  # (N, Lmax, 3)
    for i, s in enumerate(seqs):
        x[i, : len(s)] = s.to(torch.float32)
    mask = torch.arange(lmax)[None, :] < lengths[:, None]  # (N, Lmax)
    return {"x": x, "lengths": lengths, "mask": mask}


def split_indices(n: int, val_fraction: float = VAL_FRACTION, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic random split of ``range(n)``: ``(train_idx, val_idx)``, ``round(n * val_fraction)``
    in val. Both are in shuffled order, so a prefix of either is a random subset (used for size caps)."""
    if not 0.0 <= val_fraction <= 1.0:
        raise ConfigError(f"data.args.val_fraction must be in [0, 1], not {val_fraction}")
    perm = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * val_fraction))
    return perm[n_val:], perm[:n_val]
