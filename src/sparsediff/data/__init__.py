"""Datasets: images (Fashion-MNIST, image folders) and pen strokes.

- images: :mod:`.fashion_mnist` (the bundled data), :mod:`.images` (folders, ImageNette, the dataset of a
  config: :func:`build_image_dataset`);
- strokes: :mod:`.strokes` (representation, preprocessing, the dataset), the loaders :mod:`.kanjivg`,
  :mod:`.quickdraw`, :mod:`.vmnist`, the registry of sources :mod:`.stroke_sources` (the dataset of a
  config: :func:`build_stroke_dataset`) and :mod:`.raster` (drawing strokes as images and SVG).
"""

from .fashion_mnist import find_fashion_mnist, load_fashion_mnist, user_data_dir
from .images import (
    ImageFolderDataset,
    ImageTensorDataset,
    ScanResult,
    build_image_dataset,
    fashion_mnist_dataset,
    reference_images_uint8,
    scan_images,
)
from .kanjivg import kanji_strokes, load_kanjivg, parse_path, read_svg_strokes
from .quickdraw import load_quickdraw, read_ndjson, read_npz, write_ndjson, write_npz
from .raster import make_grid, points_to_strokes, rasterize, save_grid, to_svg
from .stroke_sources import STROKE_DATASETS, STROKE_SOURCES, StrokeSource, build_stroke_dataset
from .strokes import (
    DataReport,
    SkipReason,
    StrokeDataset,
    collate_strokes,
    from_velocity,
    preprocess,
    random_affine,
    split_indices,
    to_points,
    to_velocity,
)
from .vmnist import hershey_digits, load_vmnist

__all__ = [
    # images
    "find_fashion_mnist",
    "load_fashion_mnist",
    "user_data_dir",
    "ImageFolderDataset",
    "ImageTensorDataset",
    "ScanResult",
    "build_image_dataset",
    "fashion_mnist_dataset",
    "reference_images_uint8",
    "scan_images",
    # strokes
    "STROKE_DATASETS",
    "STROKE_SOURCES",
    "StrokeSource",
    "build_stroke_dataset",
    "DataReport",
    "SkipReason",
    "StrokeDataset",
    "collate_strokes",
    "from_velocity",
    "preprocess",
    "random_affine",
    "split_indices",
    "to_points",
    "to_velocity",
    "kanji_strokes",
    "load_kanjivg",
    "parse_path",
    "read_svg_strokes",
    "load_quickdraw",
    "read_ndjson",
    "read_npz",
    "write_ndjson",
    "write_npz",
    "hershey_digits",
    "load_vmnist",
    "make_grid",
    "points_to_strokes",
    "rasterize",
    "save_grid",
    "to_svg",
]
