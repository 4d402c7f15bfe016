"""Digits as pen strokes: VMNIST files (user-provided) and a bundled stand-in from the Hershey fonts.

**VMNIST** (ChiroDiff, Das et al. 2023) is MNIST with every digit traced as a stroke sequence. It is not
bundled: put it in the QuickDraw formats (see :mod:`sparsediff.data.quickdraw`), either

- a folder of per-digit files (``0.ndjson`` ... ``9.ndjson``, or ``digit_3.npz``...: the digit is the
  last digit in the file name), or
- one file whose lines carry the digit in ``"word"`` (or ``"label"``), or an ``.npz`` with
  ``train_labels`` / ``valid_labels`` / ``test_labels`` arrays next to ``train`` / ``valid`` / ``test``.

**Hershey digits** need no download: the PyPI package ``Hershey-Fonts`` ships 32 vector fonts; 29 have
real digit glyphs (``japanese`` maps 0-9 to kanji numerals, ``markers`` has no glyphs there, ``symbolic``
has arcs and arrows: found by rendering them). Many fonts share glyphs, so by default identical glyphs
are kept once (70 unique digits), and seeded random affine copies (rotation, anisotropic scale, shear)
make a few thousand samples.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DataError
from .fashion_mnist import user_data_dir
from .quickdraw import category_of, read_ndjson, read_npz, resolve_format, stroke_files
from .strokes import DataReport, Strokes, random_affine

DIGITS = tuple("0123456789")
NOT_DIGIT_FONTS = ("japanese", "markers", "symbolic")  # their 0-9 slots hold other glyphs
_DIGIT_IN_NAME = re.compile(r"(\d)(?!.*\d)")  # the last digit in a name


def default_vmnist_dir() -> Path:
    """``$SPARSEDIFF_DATA/vmnist`` (else ``~/.cache/sparsediff/data/vmnist``)."""
    return user_data_dir() / "vmnist"


def _digit_of(name: str) -> str | None:
    m = _DIGIT_IN_NAME.search(name)
    return m.group(1) if m else None


def load_vmnist(
    path: str | Path,
    digits: str | Iterable[str | int] | None = None,
    split: str | None = None,
    limit: int | None = None,
    format: str = "auto",
    progress: bool = False,
) -> tuple[list[tuple[str, Strokes]], DataReport]:
    """``(list of (digit, strokes), report)`` from a VMNIST file or folder (formats: module docstring).

    Args:
        path: one ``.ndjson`` / ``.npz`` file, or a folder of per-digit files.
        digits: only these digits (e.g. ``"038"`` or ``[0, 3, 8]``).
        split: ``.npz`` only: ``train`` / ``valid`` / ``test`` (None: all).
        limit: at most this many drawings per file.
        format: "auto", "ndjson" or "npz".
    """
    path = Path(path)
    if not path.exists():
        raise DataError(
            f"VMNIST not found at {path}. It is not bundled: put per-digit files (0.ndjson ... 9.ndjson "
            f"in QuickDraw's format, or sketch-rnn .npz files) into {default_vmnist_dir()}, or set "
            "data.args.path (or data.root) to a folder or file; data.name: hershey-digits is a bundled "
            "digit dataset that needs no download"
        )
    wanted = None if digits is None else [str(d) for d in ([digits] if isinstance(digits, int) else digits)]
    if wanted is not None and not set(wanted) <= set(DIGITS):
        raise ConfigError(f"data.args.digits must be digits 0-9, got {wanted}")
    fmt = resolve_format(path, format)
    if fmt == "ndjson" and split is not None:
        raise ConfigError(f"{path}: .ndjson files have no {split!r} split; split with split_indices()")
    report = DataReport(source=f"vmnist ({path})")
    items: list[tuple[str, Strokes]] = []
    if path.is_file():
        read = read_ndjson if fmt == "ndjson" else read_npz
        args = (
            {"limit": limit, "report": report}
            if fmt == "ndjson"
            else {"split": split, "limit": limit, "report": report}
        )
        raw = read(path, **args)
        if wanted is not None:  # not a data problem: leave the others out of the counts altogether
            kept = [it for it in raw if it[0] in wanted]
            report.total -= len(raw) - len(kept)
            report.used -= len(raw) - len(kept)
            raw = kept
        return raw, report
    by_digit: dict[str, list[Path]] = {}
    for f in stroke_files(path, fmt):
        d = _digit_of(category_of(f))
        if d is not None:
            by_digit.setdefault(d, []).append(f)
    if not by_digit:
        raise DataError(f"no per-digit .{fmt} files (0.{fmt} ... 9.{fmt}) in {path} (data.args.path)")
    if wanted is not None:
        missing = [d for d in wanted if d not in by_digit]
        if missing:
            raise DataError(f"no .{fmt} file for digits {', '.join(missing)} in {path} (data.args.digits)")
    for d in sorted(by_digit):
        if wanted is not None and d not in wanted:
            continue
        for f in by_digit[d]:
            if fmt == "ndjson":
                got = read_ndjson(f, limit, report=report)
            else:
                got = read_npz(f, split, limit, report=report)
            items += [(d, strokes) for _, strokes in got]  # the file name decides the digit
    return items, report


# ---------------------------------------------------------------------------- Hershey fonts


@functools.lru_cache(maxsize=4)
def _hershey_glyphs(
    fonts: tuple[str, ...] | None, unique: bool
) -> tuple[tuple[str, tuple[np.ndarray, ...]], ...]:
    try:
        from HersheyFonts import HersheyFonts
    except ImportError:  # pragma: no cover - a declared dependency
        raise DataError("hershey-digits needs the Hershey-Fonts package: pip install Hershey-Fonts") from None
    hf = HersheyFonts()
    available = hf.default_font_names
    if fonts is None:
        names = [f for f in available if f not in NOT_DIGIT_FONTS]
    else:
        bad = [f for f in fonts if f not in available]
        if bad:
            raise ConfigError(
                f"unknown Hershey fonts {bad} (data.args.fonts); available: {', '.join(available)}"
            )
        no_digits = [f for f in fonts if f in NOT_DIGIT_FONTS]
        if no_digits:
            raise ConfigError(f"Hershey fonts {no_digits} have no digit glyphs (data.args.fonts)")
        names = list(fonts)
    out, seen = [], set()
    for name in names:
        hf.load_default_font(name)
        for d in DIGITS:
            strokes = tuple(np.asarray(s, dtype=np.float64).reshape(-1, 2) for s in hf.strokes_for_text(d))
            strokes = tuple(s for s in strokes if len(s))
            if not strokes:
                continue
            key = (d, tuple(s.tobytes() for s in strokes))
            if unique and key in seen:
                continue
            seen.add(key)
            out.append((d, strokes))
    return tuple(out)


def hershey_digits(
    fonts: Iterable[str] | None = None,
    augment: int = 0,
    seed: int = 0,
    unique: bool = True,
    rotation: float = 10.0,
    scale: tuple[float, float] = (0.85, 1.15),
    shear: float = 0.15,
) -> list[tuple[str, Strokes]]:
    """``(digit, strokes)`` for the digits 0-9 of the Hershey fonts, y pointing down.

    Args:
        fonts: font names (``HersheyFonts().default_font_names``); None: every font with digits.
        augment: this many random affine copies of each glyph, after it (0: the glyphs only).
        seed: seed of the augmentations (the same seed gives the same copies).
        unique: keep glyphs that several fonts share once.
        rotation, scale, shear: ranges of the augmentation: uniform rotation in +-``rotation`` degrees,
            x and y scales in ``scale``, shear factor in +-``shear``.
    """
    if augment < 0:
        raise ConfigError(f"data.args.augment must be >= 0, not {augment}")
    glyphs = _hershey_glyphs(None if fonts is None else tuple(fonts), unique)
    rng = np.random.default_rng(seed)
    out: list[tuple[str, Strokes]] = []
    for d, strokes in glyphs:
        base = [s.copy() for s in strokes]
        out.append((d, base))
        out += [(d, random_affine(base, rng, rotation, scale, shear)) for _ in range(augment)]
    return out
