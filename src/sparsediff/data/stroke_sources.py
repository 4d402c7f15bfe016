"""The stroke sources by name, and :func:`build_stroke_dataset`, which a config's ``data:`` section reads.

Every source is a loader that returns ``(list of (label, strokes), DataReport)``; this module preprocesses
what it returns (:func:`~sparsediff.data.strokes.preprocess`), splits it into train / val and caches the
preprocessed pool, so that the train and val splits of one source are read once.

Sources: ``kanjivg`` (installed PyPI package), ``quickdraw`` and ``vmnist`` (user files: ``.ndjson`` or
sketch-rnn ``.npz``) and ``hershey-digits`` (bundled: the PyPI ``Hershey-Fonts`` package).
"""

from __future__ import annotations

import copy
import json
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import DataSpec
from ..errors import ConfigError, DataError
from .kanjivg import SAMPLES_PER_CURVE, load_kanjivg
from .quickdraw import default_quickdraw_dir, load_quickdraw, resolve_format
from .strokes import (
    MAX_LEN,
    MAX_STROKES,
    REPRESENTATIONS,
    RESAMPLE,
    SCALE,
    VAL_FRACTION,
    DataReport,
    SkipReason,
    StrokeDataset,
    Strokes,
    preprocess,
    split_indices,
)
from .vmnist import default_vmnist_dir, hershey_digits, load_vmnist

Items = list[tuple[str, Strokes]]  # (label, drawing) pairs, as every loader returns them

# data.args that every source takes
COMMON_ARGS = frozenset(
    {
        "representation",
        "resample",
        "scale",
        "max_len",
        "max_strokes",
        "val_fraction",
        "progress",
        "raster_size",  # read by the ChiroDiff task (tasks/strokes.py), not by preprocessing
        "raster_line_width",
    }
)
NPZ_SPLIT = {"train": "train", "val": "valid"}  # our split -> the sketch-rnn .npz array


@dataclass(frozen=True)
class StrokeSource:
    """One named source of drawings.

    Args:
        args: the ``data.args`` it takes besides :data:`COMMON_ARGS`.
        load: ``load(args, path, file_split, progress) -> (items, report)``; ``path`` is ``data.args.path``
            or ``data.root`` (None: the source's default), ``file_split`` the ``.npz`` array to read (None:
            all of them).
        default_dir: where a file source looks without a path (None: not a file source).
    """

    args: frozenset[str]
    load: Callable[[dict[str, Any], str | None, str | None, bool], tuple[Items, DataReport]]
    default_dir: Callable[[], Path] | None = None

    def path(self, args: dict[str, Any], root: str | None) -> str | Path | None:
        """The file or folder to read: ``data.args.path``, else ``data.root``, else the default folder."""
        path = args.get("path") or root
        if path is None and self.default_dir is not None:
            return self.default_dir()
        return path

    def uses_file_splits(self, args: dict[str, Any], root: str | None) -> bool:
        """True when a file source is sketch-rnn ``.npz`` and its own train / valid split is used."""
        if self.default_dir is None or not args.get("use_file_splits", True):
            return False
        return resolve_format(self.path(args, root), args.get("format", "auto")) == "npz"


def _file_options(args: dict[str, Any], file_split: str | None, progress: bool) -> dict[str, Any]:
    """The options QuickDraw and VMNIST files share."""
    return {
        "split": file_split,
        "limit": args.get("limit"),
        "format": args.get("format", "auto"),
        "progress": progress,
    }


def _kanjivg(args: dict[str, Any], path: str | None, file_split: str | None, progress: bool):
    return load_kanjivg(
        chars=args.get("chars"),
        include_variants=bool(args.get("include_variants", False)),
        limit=args.get("limit"),
        path=path,
        samples_per_curve=int(args.get("samples_per_curve", SAMPLES_PER_CURVE)),
        progress=progress,
    )


def _quickdraw(args: dict[str, Any], path: str | Path, file_split: str | None, progress: bool):
    return load_quickdraw(
        path,
        categories=args.get("categories"),
        recognized_only=bool(args.get("recognized_only", False)),
        **_file_options(args, file_split, progress),
    )


def _vmnist(args: dict[str, Any], path: str | Path, file_split: str | None, progress: bool):
    return load_vmnist(path, digits=args.get("digits"), **_file_options(args, file_split, progress))


def _hershey(args: dict[str, Any], path: str | None, file_split: str | None, progress: bool):
    items = hershey_digits(
        fonts=args.get("fonts"),
        augment=int(args.get("augment", 40)),
        seed=int(args.get("seed", 0)),
        unique=bool(args.get("unique", True)),
    )
    report = DataReport(source="hershey-digits")
    report.keep(len(items))
    return items, report


STROKE_SOURCES: dict[str, StrokeSource] = {
    "kanjivg": StrokeSource(
        frozenset({"chars", "include_variants", "limit", "path", "samples_per_curve"}), _kanjivg
    ),
    "quickdraw": StrokeSource(
        frozenset({"path", "categories", "format", "limit", "recognized_only", "use_file_splits"}),
        _quickdraw,
        default_quickdraw_dir,
    ),
    "vmnist": StrokeSource(
        frozenset({"path", "digits", "format", "limit", "use_file_splits"}), _vmnist, default_vmnist_dir
    ),
    "hershey-digits": StrokeSource(frozenset({"fonts", "augment", "seed", "unique"}), _hershey),
}
STROKE_DATASETS = tuple(STROKE_SOURCES)

# ---------------------------------------------------------------------------- preprocessed pools

_POOL_CACHE: OrderedDict[str, tuple[list[np.ndarray], list[str], DataReport]] = OrderedDict()
_POOL_CACHE_SIZE = 2


def _pool(spec: DataSpec, file_split: str | None) -> tuple[list[np.ndarray], list[str], DataReport]:
    """Preprocessed absolute sequences, their labels and the report; cached for the train/val pair."""
    args = spec.args
    key = json.dumps([spec.name, spec.root, file_split, args], sort_keys=True, default=str)
    if key in _POOL_CACHE:
        _POOL_CACHE.move_to_end(key)
        seqs, labels, report = _POOL_CACHE[key]
        return seqs, labels, copy.deepcopy(report)
    source = STROKE_SOURCES[spec.name]
    progress = bool(args.get("progress", False))
    items, report = source.load(args, source.path(args, spec.root), file_split, progress)
    report.source = report.source or spec.name
    kw = {
        "resample": args.get("resample", RESAMPLE),
        "scale": float(args.get("scale", SCALE)),
        "max_strokes": args.get("max_strokes", MAX_STROKES),
        "max_len": args.get("max_len", MAX_LEN),
    }
    seqs, labels = [], []
    for i, (label, strokes) in enumerate(items):
        r = preprocess(strokes, **kw)
        if isinstance(r, SkipReason):
            report.reject(f"{spec.name}[{i}] ({label})", r)
            continue
        seqs.append(r)
        labels.append(label)
    _POOL_CACHE[key] = (seqs, labels, report)
    while len(_POOL_CACHE) > _POOL_CACHE_SIZE:
        _POOL_CACHE.popitem(last=False)
    return seqs, labels, copy.deepcopy(report)


# ---------------------------------------------------------------------------- the dataset of a config


def build_stroke_dataset(spec: DataSpec, split: str) -> StrokeDataset:
    """The ``split`` ("train" or "val") of the stroke source ``spec.name``.

    Sources: ``kanjivg``, ``quickdraw``, ``vmnist``, ``hershey-digits``. Options come from ``spec.args``:

    - all: ``representation`` ("velocity" | "absolute"), ``resample`` (0.05), ``scale`` (10),
      ``max_len`` (300), ``max_strokes`` (25), ``val_fraction`` (0.15), ``progress`` (False);
      ``raster_size`` (32) and ``raster_line_width`` (1.0 pixel) set how the ChiroDiff task rasterises
      samples and references for FID (they do not change the sequences);
    - kanjivg: ``chars`` (a string or list), ``include_variants``, ``limit``, ``path`` (a folder of
      KanjiVG SVGs; default the installed ``kanjivg`` package), ``samples_per_curve``;
    - quickdraw: ``path`` (a file or folder; else ``data.root``, else ``$SPARSEDIFF_DATA/quickdraw``),
      ``categories``, ``format`` ("auto" | "ndjson" | "npz"), ``limit`` (per file),
      ``recognized_only``, ``use_file_splits`` (True: an ``.npz`` source uses its own train / valid);
    - vmnist: ``path``, ``digits``, ``format``, ``limit``, ``use_file_splits``;
    - hershey-digits: ``fonts``, ``augment`` (40 augmented copies per glyph), ``seed``, ``unique``.

    Otherwise the drawings that survive preprocessing are split ``1 - val_fraction`` / ``val_fraction``
    with ``spec.split_seed`` (so the split depends on the preprocessing options). ``spec.train_size`` /
    ``spec.val_size`` cap the split with a random subset. ``dataset.report`` covers the whole source.
    """
    if spec.name not in STROKE_SOURCES:
        raise ConfigError(
            f"data.name {spec.name!r} is not a stroke dataset; choose one of {', '.join(STROKE_DATASETS)}"
        )
    if split not in ("train", "val"):
        raise ConfigError(f"split must be 'train' or 'val', not {split!r}")
    source = STROKE_SOURCES[spec.name]
    allowed = COMMON_ARGS | source.args
    unknown = sorted(set(spec.args) - allowed)
    if unknown:
        raise ConfigError(
            f"unknown data.args {', '.join(unknown)} for data.name={spec.name}; allowed: {', '.join(sorted(allowed))}"
        )
    representation = spec.args.get("representation", "velocity")
    if representation not in REPRESENTATIONS:
        raise ConfigError(
            f"data.args.representation must be one of {', '.join(REPRESENTATIONS)}, not {representation!r}"
        )

    if source.uses_file_splits(spec.args, spec.root):
        seqs, labels, report = _pool(spec, NPZ_SPLIT[split])
        order = np.random.default_rng(spec.split_seed).permutation(len(seqs))
    else:
        seqs, labels, report = _pool(spec, None)
        train_idx, val_idx = split_indices(
            len(seqs), float(spec.args.get("val_fraction", VAL_FRACTION)), spec.split_seed
        )
        order = train_idx if split == "train" else val_idx
    cap = spec.train_size if split == "train" else spec.val_size
    if cap is not None:
        order = order[: int(cap)]
    order = np.sort(order)  # source order within the split
    if len(order) == 0:
        raise DataError(f"the {split} split of {spec.name} is empty ({report})")
    return StrokeDataset([seqs[i] for i in order], representation, [labels[i] for i in order], report=report)
