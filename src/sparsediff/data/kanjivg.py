"""KanjiVG: stroke-order SVGs of kanji (and kana, digits, punctuation), from the PyPI package ``kanjivg``.

``pip install kanjivg`` puts a top-level folder ``kanji/`` in site-packages: 6,703 SVGs named by code
point (``kanji/04e00.svg`` is 一) plus variants with a ``-`` in the name (``04e00-Kaisho.svg``). Each
stroke is one ``<path d=...>``, in stroke order, in a 109 x 109 viewBox with y pointing down.

The SVG path-data parser here handles every command of SVG 1.1 (M L H V C S Q T A Z, absolute and
relative, implicit repeats, compact numbers like ``1.5-2.3e-1`` and ``.5.5``) and samples curves to
points; :func:`preprocess` resamples them by arc length afterwards. ``transform`` attributes are not
applied: an SVG that has them is reported as malformed rather than read wrongly.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import re
import site
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..progress import track
from .strokes import DataReport, SkipReason, Strokes

SAMPLES_PER_CURVE = 16  # points per Bezier / arc segment (assumed; preprocessing resamples later)

# ---------------------------------------------------------------------------- path data

_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_TOKEN = re.compile(r"\s*,?\s*([MmLlHhVvCcSsQqTtAaZz]|" + _NUMBER + ")")
_TOKENS = re.compile(r"[MmLlHhVvCcSsQqTtZz]|" + _NUMBER)
_SEPARATORS = frozenset(" \t\r\n\f,")
_FLAG = re.compile(r"\s*,?\s*([01])")


class PathSyntaxError(ValueError):
    """Path data that does not follow the SVG grammar."""


def _tokenize(d: str) -> list[str | float]:
    """Commands as 1-char strings, numbers as floats."""
    if "A" in d or "a" in d:
        return _tokenize_with_arcs(d)
    tokens = _TOKENS.findall(d)
    rest = _TOKENS.sub(" ", d)
    if not set(rest) <= _SEPARATORS:  # find where, for the message
        pos = 0
        for m in [*_TOKENS.finditer(d), None]:
            gap = d[pos : m.start() if m else len(d)]
            if not set(gap) <= _SEPARATORS:
                bad = pos + next(k for k, ch in enumerate(gap) if ch not in _SEPARATORS)
                raise PathSyntaxError(f"unexpected {d[bad : bad + 10]!r} at character {bad}")
            pos = m.end() if m else pos
    return [t if t.isalpha() else float(t) for t in tokens]


def _tokenize_with_arcs(d: str) -> list[str | float]:
    """Slow path: arc flags are single digits that may be written without separators ("a5 5 0 011 1")."""
    out: list[str | float] = []
    pos, n = 0, len(d)
    while pos < n:
        if d[pos:].strip(" \t\r\n,") == "":
            break
        m = _TOKEN.match(d, pos)
        if not m:
            raise PathSyntaxError(f"unexpected {d[pos : pos + 10]!r} at character {pos}")
        tok = m.group(1)
        pos = m.end()
        if tok in "Aa":
            out.append(tok)
            while True:
                args, pos = _scan_arc(d, pos)
                if args is None:
                    break
                out.extend(args)
            continue
        out.append(tok if tok.isalpha() else float(tok))
    return out


def _scan_arc(d: str, pos: int) -> tuple[list[float] | None, int]:
    """One arc argument group (7 numbers) from ``pos``, or (None, pos) when the next token is no number."""
    vals: list[float] = []
    p = pos
    for k in range(7):
        m = (_FLAG if k in (3, 4) else _TOKEN).match(d, p)
        if not m or m.group(1).isalpha():
            if k == 0:
                return None, pos
            raise PathSyntaxError(f"incomplete arc arguments at character {p}")
        vals.append(float(m.group(1)))
        p = m.end()
    return vals, p


@functools.lru_cache(maxsize=16)
def _bernstein(degree: int, n: int) -> np.ndarray:
    """(n, degree + 1) Bernstein basis at t = 1/n, 2/n, ..., 1 (t = 0 is the current point, already out)."""
    t = np.linspace(0.0, 1.0, n + 1)[1:, None]  # (n, 1)
    k = np.arange(degree + 1)[None, :]
    binom = np.array([math.comb(degree, j) for j in range(degree + 1)], dtype=float)[None, :]
    return binom * t**k * (1.0 - t) ** (degree - k)


def _cubics(ctrl: list[tuple[float, ...]], n: int) -> np.ndarray:
    """Points (m, n, 2) of m cubic Beziers, each given as 8 numbers (x0, y0, x1, y1, x2, y2, x3, y3)."""
    c = np.asarray(ctrl, dtype=np.float64).reshape(-1, 4, 2)  # (m, 4, 2)
    return np.einsum("nk,mkd->mnd", _bernstein(3, n), c)


def _arc(p0, rx, ry, phi_deg, large, sweep, p1, n: int) -> np.ndarray:
    """Elliptical arc by the endpoint-to-centre conversion of SVG 1.1 appendix F.6."""
    rx, ry = abs(rx), abs(ry)
    if rx == 0 or ry == 0 or np.allclose(p0, p1):
        return np.asarray([p1], dtype=float)  # F.6.2: a straight line (or nothing)
    phi = math.radians(phi_deg % 360.0)
    c, s = math.cos(phi), math.sin(phi)
    dx, dy = (p0[0] - p1[0]) / 2, (p0[1] - p1[1]) / 2
    x1, y1 = c * dx + s * dy, -s * dx + c * dy
    lam = (x1 / rx) ** 2 + (y1 / ry) ** 2
    if lam > 1:  # radii too small: scale up (F.6.6)
        rx, ry = rx * math.sqrt(lam), ry * math.sqrt(lam)
    num = rx**2 * ry**2 - rx**2 * y1**2 - ry**2 * x1**2
    den = rx**2 * y1**2 + ry**2 * x1**2
    coef = math.sqrt(max(num, 0.0) / den) * (-1.0 if large == sweep else 1.0)
    cx1, cy1 = coef * rx * y1 / ry, -coef * ry * x1 / rx
    cx = c * cx1 - s * cy1 + (p0[0] + p1[0]) / 2
    cy = s * cx1 + c * cy1 + (p0[1] + p1[1]) / 2

    def angle(ux, uy, vx, vy):
        return math.atan2(ux * vy - uy * vx, ux * vx + uy * vy)

    th1 = angle(1, 0, (x1 - cx1) / rx, (y1 - cy1) / ry)
    dth = angle((x1 - cx1) / rx, (y1 - cy1) / ry, (-x1 - cx1) / rx, (-y1 - cy1) / ry)
    if not sweep and dth > 0:
        dth -= 2 * math.pi
    elif sweep and dth < 0:
        dth += 2 * math.pi
    th = th1 + dth * np.linspace(0.0, 1.0, n + 1)[1:]
    x = cx + rx * c * np.cos(th) - ry * s * np.sin(th)
    y = cy + rx * s * np.cos(th) + ry * c * np.sin(th)
    out = np.stack([x, y], axis=1)
    out[-1] = p1  # exact end point
    return out


def parse_path(d: str, samples_per_curve: int = SAMPLES_PER_CURVE) -> Strokes:
    """Points of SVG path data ``d``: one (K, 2) array per subpath (each moveto starts a new one).

    Lines contribute their end points; cubic / quadratic Beziers and arcs contribute
    ``samples_per_curve`` points each (the last one exactly on the end point). ``S``/``T`` reflect the
    previous control point (or use the current point when the previous command was no curve of the
    same kind), ``Z`` goes back to the subpath start. A lone moveto draws nothing and gives no subpath.
    Raises :class:`PathSyntaxError` on bad data.
    """
    tokens = _tokenize(d)
    n = max(1, int(samples_per_curve))
    # The state is plain floats (fast); a subpath is a list of pieces: a point (x, y), the index of a
    # cubic in `cubics` (all evaluated in one go at the end) or an array (an arc).
    subpaths: list[list] = []
    pieces: list = []
    cubics: list[tuple[float, ...]] = []
    cx = cy = sx = sy = 0.0  # current point, subpath start
    qx = qy = 0.0  # last control point, for S / T
    last_kind = ""  # "C" or "Q" or "": the kind of the previous command
    closed = False
    i, cmd, ntok = 0, "", len(tokens)

    def flush() -> None:
        # a lone moveto draws nothing; "M x y Z" is a dot and kept as one point
        if len(pieces) > 1 or closed:
            subpaths.append(list(pieces))
        pieces.clear()

    def num(k: int) -> list[float]:
        nonlocal i
        vals = tokens[i : i + k]
        if len(vals) < k or any(isinstance(v, str) for v in vals):
            raise PathSyntaxError(f"command {cmd!r} needs {k} numbers, got {vals!r}")
        i += k
        return vals  # type: ignore[return-value]

    while i < ntok:
        tok = tokens[i]
        if isinstance(tok, str):
            if i == 0 and tok not in "Mm":
                raise PathSyntaxError(f"path data must start with a moveto, not {tok!r}")
            cmd = tok
            i += 1
        elif not cmd:
            raise PathSyntaxError(
                "numbers after closepath" if subpaths else "path data must start with a moveto"
            )
        elif cmd in "Mm":  # numbers after a moveto are implicit linetos
            cmd = "L" if cmd == "M" else "l"
        upper, rel = cmd.upper(), cmd.islower()
        bx, by = (cx, cy) if rel else (0.0, 0.0)
        kind = ""
        if upper == "M":
            x, y = num(2)
            flush()
            closed = False
            cx, cy = bx + x, by + y
            sx, sy = cx, cy
            pieces.append((cx, cy))
        elif upper == "Z":
            if not pieces:
                pieces.append((cx, cy))
            if (cx, cy) != (sx, sy):
                pieces.append((sx, sy))
            cx, cy = sx, sy
            closed = True
            flush()
            closed = False  # a drawing command after Z starts a new subpath at the same point
            cmd = ""  # only a command may follow
        else:
            if not pieces:
                pieces.append((cx, cy))
            if upper == "L":
                x, y = num(2)
                cx, cy = bx + x, by + y
                pieces.append((cx, cy))
            elif upper == "H":
                (x,) = num(1)
                cx = bx + x
                pieces.append((cx, cy))
            elif upper == "V":
                (y,) = num(1)
                cy = by + y
                pieces.append((cx, cy))
            elif upper in "CS":
                if upper == "C":
                    x1, y1, x2, y2, x, y = num(6)
                    x1, y1 = bx + x1, by + y1
                else:
                    x2, y2, x, y = num(4)
                    x1, y1 = (2 * cx - qx, 2 * cy - qy) if last_kind == "C" else (cx, cy)
                x2, y2, x, y = bx + x2, by + y2, bx + x, by + y
                pieces.append(len(cubics))
                cubics.append((cx, cy, x1, y1, x2, y2, x, y))
                cx, cy, qx, qy, kind = x, y, x2, y2, "C"
            elif upper in "QT":
                if upper == "Q":
                    x1, y1, x, y = num(4)
                    x1, y1 = bx + x1, by + y1
                else:
                    x, y = num(2)
                    x1, y1 = (2 * cx - qx, 2 * cy - qy) if last_kind == "Q" else (cx, cy)
                x, y = bx + x, by + y
                # a quadratic is the cubic with controls 2/3 of the way to its control point (exact)
                pieces.append(len(cubics))
                cubics.append(
                    (
                        cx,
                        cy,
                        cx + 2 / 3 * (x1 - cx),
                        cy + 2 / 3 * (y1 - cy),
                        x + 2 / 3 * (x1 - x),
                        y + 2 / 3 * (y1 - y),
                        x,
                        y,
                    )
                )
                cx, cy, qx, qy, kind = x, y, x1, y1, "Q"
            elif upper == "A":
                rx, ry, rot, large, sweep, x, y = num(7)
                end = (bx + x, by + y)
                pieces.append(_arc((cx, cy), rx, ry, rot, bool(large), bool(sweep), end, n))
                cx, cy = end
            else:  # pragma: no cover - the tokenizer admits no other letter
                raise PathSyntaxError(f"unknown command {cmd!r}")
        last_kind = kind
    flush()

    curves = _cubics(cubics, n) if cubics else None  # (m, n, 2)
    out: Strokes = []
    for sub in subpaths:
        parts, run = [], []  # run: consecutive points, converted together
        for piece in sub:
            if isinstance(piece, tuple):
                run.append(piece)
                continue
            if run:
                parts.append(np.asarray(run, dtype=np.float64))
                run = []
            parts.append(curves[piece] if isinstance(piece, int) else piece)  # type: ignore[index]
        if run:
            parts.append(np.asarray(run, dtype=np.float64))
        out.append(np.concatenate(parts))
    return out


# ---------------------------------------------------------------------------- SVG files


def _walk_paths(el: ET.Element, where: str) -> Iterable[ET.Element]:
    """``<path>`` elements in document order; refuses ``transform`` (it is not applied)."""
    local = el.tag.rsplit("}", 1)[-1] if isinstance(el.tag, str) else ""
    if el.get("transform") is not None and local in ("svg", "g", "path"):
        raise DataError(f"{where}: transform attributes are not supported (<{local} id={el.get('id')!r}>)")
    if local == "path":
        yield el
    for child in el:
        yield from _walk_paths(child, where)


def read_svg_strokes(path: str | Path, samples_per_curve: int = SAMPLES_PER_CURVE) -> Strokes:
    """Strokes of an SVG file: every ``<path>`` in document order (KanjiVG: the stroke order).

    A path with several subpaths gives several strokes (the pen lifts at each moveto). Returns ``[]``
    when the file has no path. Raises :class:`DataError` naming the file for bad XML or path data.
    """
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as e:
        raise DataError(f"{path}: cannot parse SVG: {e}") from None
    strokes: Strokes = []
    for k, el in enumerate(_walk_paths(root, str(path))):
        d = el.get("d")
        if d is None:
            continue
        try:
            strokes.extend(parse_path(d, samples_per_curve))
        except PathSyntaxError as e:
            raise DataError(f"{path}: path {k + 1} ({el.get('id', 'no id')}): {e}") from None
    return strokes


def _candidate_dirs() -> list[Path]:
    dirs = []
    spec = importlib.util.find_spec("kanji")  # the package installs a namespace folder "kanji"
    if spec is not None and spec.submodule_search_locations:
        dirs += [Path(p) for p in spec.submodule_search_locations]
    sites = list(getattr(site, "getsitepackages", list)()) + [site.getusersitepackages()] + sys.path
    dirs += [Path(p) / "kanji" for p in sites if p]
    return dirs


def find_kanjivg(path: str | Path | None = None) -> Path:
    """The folder of KanjiVG SVGs: ``path`` (or its ``kanji/`` subfolder), else the installed package."""
    if path is not None:
        for d in (Path(path), Path(path) / "kanji"):
            if d.is_dir() and any(d.glob("*.svg")):
                return d
        raise DataError(
            f"no KanjiVG SVG files in {path} (data.args.path): point it at the kanji/ folder of "
            "https://github.com/KanjiVG/kanjivg, or leave it unset to use the installed `kanjivg` package"
        )
    for d in _candidate_dirs():
        if (d / "04e00.svg").is_file():
            return d
    raise DataError(
        "KanjiVG was not found: `pip install kanjivg` (it installs kanji/*.svg into site-packages), or "
        "download kanjivg-*-main.zip from https://github.com/KanjiVG/kanjivg/releases and set "
        "data.args.path to its kanji/ folder"
    )


def char_of(file: Path) -> str | None:
    """The character a KanjiVG file name encodes (``04e00-Kaisho.svg`` -> 一), or None."""
    try:
        return chr(int(file.stem.split("-")[0], 16))
    except (ValueError, OverflowError):
        return None


def load_kanjivg(
    chars: str | Iterable[str] | None = None,
    include_variants: bool = False,
    limit: int | None = None,
    path: str | Path | None = None,
    samples_per_curve: int = SAMPLES_PER_CURVE,
    progress: bool = False,
) -> tuple[list[tuple[str, Strokes]], DataReport]:
    """``(list of (char, strokes), report)`` from the KanjiVG SVGs, in file-name order.

    Args:
        chars: only these characters (a string or an iterable of 1-char strings); absent ones are
            counted as ``missing``. None: every file.
        include_variants: also read the variant files (``04e00-Kaisho.svg``...).
        limit: at most this many files (after the filters above).
        path: a folder of KanjiVG SVGs instead of the installed package.
        samples_per_curve: points sampled on each Bezier segment.
    Files without a ``<path>`` are skipped as ``no_paths``, unreadable ones as ``malformed``.
    """
    folder = find_kanjivg(path)
    report = DataReport(source=f"kanjivg ({folder})")
    files = [folder / name for name in sorted(os.listdir(folder)) if name.endswith(".svg")]
    if not include_variants:
        files = [f for f in files if "-" not in f.stem]
    if chars is not None:
        wanted = list(dict.fromkeys(chars))
        by_char: dict[str, list[Path]] = {}
        for f in files:
            by_char.setdefault(char_of(f) or "", []).append(f)
        files = []
        for c in wanted:
            if c in by_char:
                files += by_char[c]
            else:
                report.skip(f"U+{ord(c):04X} {c}" if len(c) == 1 else repr(c), SkipReason.MISSING)
    if limit is not None:
        files = files[: int(limit)]
    items: list[tuple[str, Strokes]] = []
    for f in track(files, desc="kanjivg", quiet=not progress, leave=True):
        c = char_of(f)
        if c is None:
            report.skip(f.name, SkipReason.MALFORMED)
            continue
        try:
            strokes = read_svg_strokes(f, samples_per_curve)
        except DataError:
            report.skip(f.name, SkipReason.MALFORMED)
            continue
        if not strokes:
            report.skip(f.name, SkipReason.NO_PATHS)
            continue
        report.keep()
        items.append((c, strokes))
    return items, report


def kanji_strokes(
    char: str, path: str | Path | None = None, samples_per_curve: int = SAMPLES_PER_CURVE
) -> Strokes:
    """The strokes of one character (its base file, not a variant), in stroke order."""
    if len(char) != 1:
        raise DataError(f"kanji_strokes takes one character, not {char!r}")
    f = find_kanjivg(path) / f"{ord(char):05x}.svg"
    if not f.is_file():
        raise DataError(f"KanjiVG has no file for {char!r} (U+{ord(char):04X}): {f} does not exist")
    strokes = read_svg_strokes(f, samples_per_curve)
    if not strokes:
        raise DataError(f"{f}: no <path> elements")
    return strokes
