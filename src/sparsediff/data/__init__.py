"""Datasets: images (Fashion-MNIST, image folders) and pen strokes."""

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
from .strokes import (
    STROKE_DATASETS,
    DataReport,
    SkipReason,
    StrokeDataset,
    build_stroke_dataset,
    collate_strokes,
    from_velocity,
    preprocess,
    split_indices,
    to_points,
    to_velocity,
)
from .vmnist import hershey_digits, load_vmnist

__all__ = [
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
]

__all__ += [
    "STROKE_DATASETS",
    "DataReport",
    "SkipReason",
    "StrokeDataset",
    "build_stroke_dataset",
    "collate_strokes",
    "from_velocity",
    "preprocess",
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
