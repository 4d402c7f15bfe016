"""QuickDraw sketches from the standard on-disk formats (no download here: the user provides the files).

Two formats, one file per category:

- ``.ndjson`` (https://github.com/googlecreativelab/quickdraw-dataset): one JSON object per line with
  ``"drawing"`` = list of strokes, each ``[xs, ys, ts]`` (raw) or ``[xs, ys]`` (simplified), plus
  ``"word"``, ``"recognized"``, ``"countrycode"``... Get them with
  ``gsutil cp gs://quickdraw_dataset/full/simplified/cat.ndjson DIR`` (or ``full/raw``).
- sketch-rnn ``.npz`` (``gs://quickdraw_dataset/sketchrnn/cat.npz``): arrays ``train`` / ``valid`` /
  ``test``, each an object array of int16 (L, 3) "stroke-3" arrays of (dx, dy, pen) where pen = 1 means
  the pen lifts after that point. These object arrays can only be read with ``allow_pickle=True``,
  which can run code hidden in a crafted file: only load ``.npz`` files from sources you trust, from
  paths you gave yourself (sparsediff never fetches or opens one on its own).

Malformed lines and arrays (bad JSON, no ``"drawing"``, wrong shapes, non-finite numbers) are skipped
and counted in the :class:`DataReport`, never read half-way. Category names come from the file name
(``cat.ndjson``, ``full_simplified_cat.ndjson``, ``cat.full.npz`` are all "cat").
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DataError
from ..progress import track
from .fashion_mnist import user_data_dir
from .strokes import DataReport, SkipReason, Strokes

FORMATS = ("auto", "ndjson", "npz")
NPZ_SPLITS = ("train", "valid", "test")
_PREFIXES = ("full_simplified_", "full_raw_", "simplified_", "raw_", "sketchrnn_")


def default_quickdraw_dir() -> Path:
    """``$SPARSEDIFF_DATA/quickdraw`` (else ``~/.cache/sparsediff/data/quickdraw``)."""
    return user_data_dir() / "quickdraw"


def category_of(path: str | Path) -> str:
    """Category of a QuickDraw file from its name: ``full_raw_The Eiffel Tower.ndjson`` -> ``The Eiffel Tower``."""
    name = Path(path).name
    for suffix in (".full.npz", ".npz", ".ndjson"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    for prefix in _PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


# ---------------------------------------------------------------------------- stroke-3


def stroke3_to_strokes(seq: np.ndarray) -> Strokes:
    """sketch-rnn stroke-3 (L, 3) of (dx, dy, pen) to absolute strokes; pen = 1 ends a stroke.

    Points after the last pen lift (a sequence whose last pen bit is 0) form a final stroke.
    """
    a = np.asarray(seq, dtype=np.float64)
    xy = np.cumsum(a[:, :2], axis=0)  # (L, 2) absolute
    ends = np.flatnonzero(a[:, 2] > 0.5) + 1
    return [s for s in np.split(xy, ends) if len(s)]


def strokes_to_stroke3(strokes: Sequence[np.ndarray], dtype: np.dtype | type = np.int16) -> np.ndarray:
    """Absolute strokes to stroke-3 (L, 3) of (dx, dy, pen), the first row relative to (0, 0).

    With an integer ``dtype`` the absolute points are rounded first (so that deltas do not drift);
    values outside the dtype's range raise :class:`DataError`.
    """
    strokes = [np.asarray(s, dtype=np.float64).reshape(-1, 2) for s in strokes]
    strokes = [s for s in strokes if len(s)]
    if not strokes:
        raise DataError("cannot write an empty drawing as stroke-3")
    pts = np.concatenate(strokes)  # (L, 2)
    pen = np.concatenate([np.eye(1, len(s), len(s) - 1)[0] for s in strokes])  # (L,)
    if np.issubdtype(np.dtype(dtype), np.integer):
        pts = np.round(pts)
    out = np.zeros((len(pts), 3))
    out[:, :2] = np.diff(pts, axis=0, prepend=0.0)
    out[:, 2] = pen
    if np.issubdtype(np.dtype(dtype), np.integer):
        info = np.iinfo(dtype)
        if out.min() < info.min or out.max() > info.max:
            raise DataError(f"stroke deltas exceed the range of {np.dtype(dtype).name}")
    return out.astype(dtype)


# ---------------------------------------------------------------------------- ndjson


def parse_drawing(drawing: object) -> Strokes | SkipReason:
    """QuickDraw ``"drawing"`` value (raw ``[[xs, ys, ts], ...]`` or simplified ``[[xs, ys], ...]``) to
    strokes, or ``EMPTY`` / ``MALFORMED``. Every stroke needs equally long, finite, numeric lists."""
    if not isinstance(drawing, list):
        return SkipReason.MALFORMED
    if not drawing:
        return SkipReason.EMPTY
    strokes = []
    for stroke in drawing:
        if not isinstance(stroke, list) or len(stroke) not in (2, 3):
            return SkipReason.MALFORMED
        if not all(isinstance(c, list) for c in stroke):
            return SkipReason.MALFORMED
        n = len(stroke[0])
        if n == 0 or any(len(c) != n for c in stroke):
            return SkipReason.MALFORMED
        xs, ys = stroke[0], stroke[1]
        if not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in xs + ys
        ):
            return SkipReason.MALFORMED
        strokes.append(np.array([xs, ys], dtype=np.float64).T)  # (K, 2)
    return strokes


def read_ndjson(
    path: str | Path,
    limit: int | None = None,
    recognized_only: bool = False,
    report: DataReport | None = None,
    label: str | None = None,
) -> list[tuple[str, Strokes]]:
    """``(label, strokes)`` of each good line of a QuickDraw ``.ndjson`` file, up to ``limit`` of them.

    The label is the line's ``"word"`` (or ``"label"``), else ``label``, else the category from the
    file name. Bad lines are counted in ``report`` as ``malformed`` / ``empty`` (and as
    ``not_recognized`` with ``recognized_only``); blank lines are ignored.
    """
    path = Path(path)
    report = report if report is not None else DataReport(source=str(path))
    default = category_of(path)
    out: list[tuple[str, Strokes]] = []
    try:
        f = path.open("r", encoding="utf-8", errors="replace")
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from None
    with f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(out) >= limit:
                break
            if not line.strip():
                continue
            where = f"{path.name}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                report.skip(where, SkipReason.MALFORMED)
                continue
            if not isinstance(obj, dict) or "drawing" not in obj:
                report.skip(where, SkipReason.MALFORMED)
                continue
            strokes = parse_drawing(obj["drawing"])
            if isinstance(strokes, SkipReason):
                report.skip(where, strokes)
                continue
            if recognized_only and obj.get("recognized") is False:
                report.skip(where, SkipReason.NOT_RECOGNIZED)
                continue
            name = obj.get("word") or obj.get("label") or label or default
            report.keep()
            out.append((str(name), strokes))
    return out


def write_ndjson(
    path: str | Path, drawings: Iterable[Sequence[np.ndarray]], word: str = "", raw: bool = False
) -> None:
    """Write drawings as QuickDraw ``.ndjson`` lines (simplified ``[xs, ys]``, or raw with ``ts`` = 0)."""
    with Path(path).open("w", encoding="utf-8") as f:
        for strokes in drawings:
            drawing = []
            for s in strokes:
                a = np.asarray(s)
                xs, ys = a[:, 0].tolist(), a[:, 1].tolist()
                drawing.append([xs, ys, [0] * len(xs)] if raw else [xs, ys])
            f.write(json.dumps({"word": word, "recognized": True, "drawing": drawing}) + "\n")


# ---------------------------------------------------------------------------- npz


def read_npz(
    path: str | Path,
    split: str | None = None,
    limit: int | None = None,
    report: DataReport | None = None,
    label: str | None = None,
) -> list[tuple[str, Strokes]]:
    """``(label, strokes)`` from a sketch-rnn ``.npz``: the ``split`` array (``train`` / ``valid`` /
    ``test``), or all three in that order. ``limit`` applies per file. Labels come from a
    ``{split}_labels`` array when the file has one, else ``label``, else the file's category.

    Uses ``allow_pickle=True`` (the arrays are object arrays): trusted files from your own paths only.
    """
    path = Path(path)
    report = report if report is not None else DataReport(source=str(path))
    if split is not None and split not in NPZ_SPLITS:
        raise ConfigError(f"npz split must be one of {', '.join(NPZ_SPLITS)}, not {split!r}")
    try:
        # latin1: the published sketch-rnn files were written by Python 2
        npz = np.load(path, allow_pickle=True, encoding="latin1")
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"cannot read {path} as .npz: {e}") from None
    default = label or category_of(path)
    out: list[tuple[str, Strokes]] = []
    with npz:
        names = [split] if split else [s for s in NPZ_SPLITS if s in npz.files]
        if not names or any(s not in npz.files for s in names):
            raise DataError(
                f"{path} has arrays {', '.join(npz.files) or 'none'}; expected sketch-rnn arrays "
                f"{', '.join(names or NPZ_SPLITS)}"
            )
        for s in names:
            seqs = npz[s]
            labels = npz[f"{s}_labels"] if f"{s}_labels" in npz.files else None
            for i, seq in enumerate(seqs):
                if limit is not None and len(out) >= limit:
                    return out
                where = f"{path.name}:{s}[{i}]"
                try:
                    a = np.asarray(seq, dtype=np.float64)
                except (TypeError, ValueError):
                    report.skip(where, SkipReason.MALFORMED)
                    continue
                if a.ndim != 2 or a.shape[1] != 3 or not np.isfinite(a).all():
                    report.skip(where, SkipReason.EMPTY if a.size == 0 else SkipReason.MALFORMED)
                    continue
                if len(a) == 0:
                    report.skip(where, SkipReason.EMPTY)
                    continue
                report.keep()
                name = str(labels[i]) if labels is not None and i < len(labels) else default
                out.append((name, stroke3_to_strokes(a)))
    return out


def write_npz(
    path: str | Path,
    splits: dict[str, Sequence[Sequence[np.ndarray]]],
    labels: dict[str, Sequence[str]] | None = None,
    dtype: np.dtype | type = np.int16,
) -> None:
    """Write drawings as a sketch-rnn ``.npz``: ``splits`` maps "train" / "valid" / "test" to drawings.

    ``labels`` (optional) are stored as ``{split}_labels`` string arrays (read back by :func:`read_npz`).
    """
    arrays: dict[str, np.ndarray] = {}
    for name, drawings in splits.items():
        arr = np.empty(len(drawings), dtype=object)
        for i, d in enumerate(drawings):
            arr[i] = strokes_to_stroke3(d, dtype)
        arrays[name] = arr
        if labels and name in labels:
            arrays[f"{name}_labels"] = np.asarray([str(x) for x in labels[name]])
    np.savez(path, **arrays)


# ---------------------------------------------------------------------------- files and categories


def stroke_files(path: Path, fmt: str) -> list[Path]:
    """``path`` itself if it is a file, else the ``.ndjson`` / ``.npz`` files in it (``fmt`` "auto": both)
    by name."""
    exts = (".ndjson", ".npz") if fmt == "auto" else (f".{fmt}",)
    if path.is_file():
        return [path]
    return sorted((f for f in path.iterdir() if f.is_file() and f.name.endswith(exts)), key=lambda f: f.name)


def resolve_format(path: str | Path, format: str = "auto") -> str:
    """ "ndjson" or "npz": ``format`` if given, else what the file (or the folder's files) are."""
    if format not in FORMATS:
        raise ConfigError(f"data.args.format must be one of {', '.join(FORMATS)}, not {format!r}")
    path = Path(path)
    if format != "auto":
        return format
    if not path.exists():
        return "ndjson"  # the loader reports the missing path
    found = {f.suffix.lstrip(".") for f in stroke_files(path, "auto")}
    if found == {"ndjson", "npz"}:
        raise ConfigError(f"{path} holds both .ndjson and .npz files: set data.args.format to ndjson or npz")
    return found.pop() if found else "ndjson"


def load_quickdraw(
    path: str | Path,
    categories: str | Iterable[str] | None = None,
    split: str | None = None,
    limit: int | None = None,
    format: str = "auto",
    recognized_only: bool = False,
    progress: bool = False,
) -> tuple[list[tuple[str, Strokes]], DataReport]:
    """``(list of (category, strokes), report)`` from a QuickDraw file or folder of per-category files.

    Args:
        path: an ``.ndjson`` / ``.npz`` file, or a folder of them.
        categories: only these categories (file names, see :func:`category_of`); a missing one is an
            error that lists what the folder has.
        split: for ``.npz``: ``train`` / ``valid`` / ``test`` (None: all three); ``.ndjson`` has none.
        limit: at most this many drawings per file.
        format: "auto" (by extension), "ndjson" or "npz".
        recognized_only: ndjson only: skip drawings with ``"recognized": false``.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(
            f"QuickDraw data not found at {path}. Download per-category files from "
            "https://github.com/googlecreativelab/quickdraw-dataset (e.g. `gsutil cp "
            "gs://quickdraw_dataset/full/simplified/cat.ndjson DIR` or `gs://quickdraw_dataset/sketchrnn/cat.npz`) "
            f"into {default_quickdraw_dir()}, or set data.args.path (or data.root) to their folder"
        )
    fmt = resolve_format(path, format)
    files = stroke_files(path, fmt)
    if categories is not None:
        wanted = [categories] if isinstance(categories, str) else list(categories)
        by_cat = {category_of(f): f for f in files}
        missing = [c for c in wanted if c not in by_cat]
        if missing:
            raise DataError(
                f"no .{fmt} file for categories {', '.join(map(repr, missing))} in {path} "
                f"(data.args.categories); found: {', '.join(sorted(by_cat)) or 'none'}"
            )
        files = [by_cat[c] for c in wanted]
    if not files:
        raise DataError(f"no .{fmt} files in {path} (data.args.path)")
    if fmt == "ndjson" and split is not None:
        raise ConfigError(f"{path}: .ndjson files have no {split!r} split; split with split_indices()")
    report = DataReport(source=f"quickdraw ({path})")
    items: list[tuple[str, Strokes]] = []
    for f in track(files, desc="quickdraw", quiet=not progress, leave=True):
        if fmt == "ndjson":
            items += read_ndjson(f, limit, recognized_only, report, label=category_of(f))
        else:
            items += read_npz(f, split, limit, report, label=category_of(f))
    return items, report
