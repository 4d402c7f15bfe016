"""Drawing strokes: rasterise to images (for FID and previews), export SVG, tile image grids.

Convention: **white ink (255) on a black background (0)**, like MNIST and Fashion-MNIST, so that
rasterised sketches and the project's image data share one convention (FID uses these images).
Coordinates are image coordinates (y grows downwards), as in every stroke source here. The drawing is
fit into the canvas keeping its aspect ratio, centred, with ``padding`` (a fraction of the size) on
each side.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from xml.sax.saxutils import quoteattr

import numpy as np
from PIL import Image, ImageDraw

from .strokes import Strokes

SUPERSAMPLE = 4  # draw at 4x and downsample: anti-aliased lines


def points_to_strokes(points: np.ndarray, pen_threshold: float = 0.5) -> Strokes:
    """Absolute (L, 3) (x, y, pen) sequence to strokes: a stroke ends where pen > ``pen_threshold``.

    Points after the last pen lift form a final stroke. ChiroDiff decodes samples with 0.8.
    """
    p = np.asarray(points, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != 3:
        raise ValueError(f"points must be (L, 3) of (x, y, pen), got shape {p.shape}")
    ends = np.flatnonzero(p[:, 2] > pen_threshold) + 1
    return [s for s in np.split(p[:, :2], ends) if len(s)]


def _as_strokes(drawing: Strokes | np.ndarray, pen_threshold: float) -> Strokes:
    if hasattr(drawing, "detach"):  # a torch tensor
        drawing = drawing.detach().cpu().numpy()
    if isinstance(drawing, np.ndarray):
        if drawing.ndim == 2 and drawing.shape[1] == 3:
            return points_to_strokes(drawing, pen_threshold)
        if drawing.ndim == 2 and drawing.shape[1] == 2:
            return [drawing.astype(np.float64)]
        raise ValueError(f"expected (L, 3) points or (K, 2) one stroke, got shape {drawing.shape}")
    strokes = [np.asarray(s, dtype=np.float64).reshape(-1, 2) for s in drawing]
    return [s for s in strokes if len(s)]


def _fit(strokes: Strokes, size: float, padding: float) -> tuple[float, np.ndarray]:
    """Scale and offset that map the drawing's bounding box into the centre of a ``size`` canvas."""
    pts = np.concatenate(strokes)
    lo, hi = pts.min(0), pts.max(0)
    extent = float((hi - lo).max())
    inner = size * (1.0 - 2.0 * padding)
    scale = inner / extent if extent > 0 else 1.0
    offset = size / 2.0 - (lo + hi) / 2.0 * scale  # centre of the box -> centre of the canvas
    return scale, offset


def rasterize(
    drawing: Strokes | np.ndarray,
    size: int = 64,
    line_width: float = 2.0,
    padding: float = 0.1,
    pen_threshold: float = 0.5,
    antialias: bool = True,
) -> np.ndarray:
    """uint8 (size, size) image of a drawing: white strokes (255) on black (0).

    Args:
        drawing: strokes (list of (K, 2) arrays), an absolute (L, 3) (x, y, pen) sequence (split into
            strokes where pen > ``pen_threshold``), or one (K, 2) stroke. Numpy or torch.
        size: image side in pixels.
        line_width: stroke width in pixels of the output image.
        padding: empty margin on each side, as a fraction of ``size``.
        antialias: draw at 4x and downsample (smooth edges); False gives hard 0/255 pixels.
    A single point draws a dot of ``line_width``; an empty drawing gives a black image.
    """
    ss = SUPERSAMPLE if antialias else 1
    big = size * ss
    img = Image.new("L", (big, big), 0)
    strokes = _as_strokes(drawing, pen_threshold)
    strokes = [s for s in strokes if np.isfinite(s).all()]
    if strokes:
        draw = ImageDraw.Draw(img)
        scale, offset = _fit(strokes, big, padding)
        width = max(1, int(round(line_width * ss)))
        r = width / 2.0
        for s in strokes:
            xy = s * scale + offset  # (K, 2) pixels
            pts = [tuple(p) for p in xy.tolist()]
            if len(pts) > 1:
                draw.line(pts, fill=255, width=width, joint="curve")
            # round caps at both ends (and a dot for a one-point stroke)
            for x, y in (pts[0], pts[-1]):
                if width > 2:
                    draw.ellipse([x - r, y - r, x + r, y + r], fill=255)
                elif len(pts) == 1:
                    draw.point((x, y), fill=255)
    if ss > 1:
        img = img.resize((size, size), Image.Resampling.BOX)
    return np.asarray(img, dtype=np.uint8).copy()


def to_svg(
    drawing: Strokes | np.ndarray,
    size: int = 256,
    line_width: float = 2.0,
    padding: float = 0.1,
    pen_threshold: float = 0.5,
) -> str:
    """An SVG document (str) of the drawing: one ``<path>`` per stroke, black on white, fit like
    :func:`rasterize`. One-point strokes become zero-length paths (dots, by the round line caps)."""
    strokes = _as_strokes(drawing, pen_threshold)
    paths = []
    if strokes:
        scale, offset = _fit(strokes, size, padding)
        for s in strokes:
            xy = s * scale + offset
            d = f"M{xy[0, 0]:.2f} {xy[0, 1]:.2f}"
            d += "".join(f" L{x:.2f} {y:.2f}" for x, y in xy[1:]) if len(xy) > 1 else " l0 0"
            paths.append(f"  <path d={quoteattr(d)}/>")
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{size}" height="{size}" viewBox="0 0 {size} {size}">\n'
        f'  <rect width="{size}" height="{size}" fill="white"/>\n'
        f'  <g fill="none" stroke="black" stroke-width="{line_width:g}" stroke-linecap="round" '
        'stroke-linejoin="round">\n' + "\n".join(paths) + ("\n" if paths else "") + "  </g>\n</svg>\n"
    )


def make_grid(
    images: Sequence[np.ndarray] | np.ndarray, ncol: int = 8, pad: int = 2, pad_value: int = 128
) -> np.ndarray:
    """Tile (H, W) or (H, W, C) uint8 images row by row into one uint8 image, ``pad`` pixels apart."""
    imgs = [np.asarray(im) for im in images]
    if not imgs:
        raise ValueError("make_grid needs at least one image")
    h, w = imgs[0].shape[:2]
    extra = imgs[0].shape[2:]
    if any(im.shape != imgs[0].shape for im in imgs):
        raise ValueError("make_grid needs images of one shape")
    ncol = max(1, min(int(ncol), len(imgs)))
    nrow = math.ceil(len(imgs) / ncol)
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, *extra), pad_value, dtype=np.uint8)
    for i, im in enumerate(imgs):
        r, c = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        grid[y : y + h, x : x + w] = im
    return grid


def save_grid(
    images: Sequence[np.ndarray] | np.ndarray,
    path: str | Path,
    ncol: int = 8,
    pad: int = 2,
    pad_value: int = 128,
) -> Path:
    """Save a PNG grid of uint8 images (see :func:`make_grid`); creates the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(make_grid(images, ncol, pad, pad_value)).save(path)
    return path
