"""Image datasets: Fashion-MNIST in memory, folders of image files (CelebA-HQ, LSUN-Bedrooms, any folder)
and Imagenette's train/val layout.

Every dataset returns float images ``(C, H, W)`` in ``[-1, 1]`` and carries a ``report`` dict (what was
found, skipped and used) so that a run can record exactly which data it trained on.

Folder datasets are split reproducibly: the sorted list of image files is shuffled with
``torch.Generator().manual_seed(data.split_seed)``; the first ``val_size`` readable files are the validation
split and the next ``train_size`` the train split (validation first, so the held-out set that FID uses
does not change when ``train_size`` does). Files are checked (decoded) in that shuffled order
and only as far as needed, so pointing ``data.root`` at a folder of 300k LSUN images costs a directory
listing plus ~13k decodes, not 300k. Corrupt files are skipped and listed in the report.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..config import DataSpec
from ..errors import ConfigError, DataError
from ..progress import progress_bar, track
from .fashion_mnist import load_fashion_mnist

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
FOLDER_DATASETS = ("celebahq", "lsun-bedrooms", "image-folder")
KNOWN_DATASETS = ("fashion-mnist", *FOLDER_DATASETS, "imagenette")
MAX_REPORTED_SKIPS = 20  # "skipped_files" lists at most this many (path, reason) pairs

# What to download for each folder dataset, shown when data.root is missing.
_DOWNLOAD_HINTS = {
    "celebahq": "CelebA-HQ 256x256 images (e.g. the 30,000 files of 'celeba_hq_256'; the paper uses "
    "12,500 train / 500 val of them)",
    "lsun-bedrooms": "LSUN-Bedrooms as image files (export the bedroom_train_lmdb database to JPEG/WebP "
    "files, or use a published image subset; the paper uses 10,598 train / 2,500 val)",
    "image-folder": "a folder of image files (jpg, png, webp, bmp, gif, tiff; searched recursively)",
    "imagenette": "Imagenette (https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-320.tgz, unpacked: "
    "it holds train/<class>/*.JPEG and val/<class>/*.JPEG)",
}


def _to_unit_range(x_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1] (0 -> -1 exactly, 255 -> 1 exactly)."""
    return x_uint8.float() / 127.5 - 1.0


def _empty_report(dataset: str, n: int, root: str | None = None, split: str | None = None) -> dict:
    return {
        "dataset": dataset,
        "split": split,
        "root": root,
        "found": n,
        "skipped": 0,
        "skipped_files": [],
        "used": n,
    }


# ---------------------------------------------------------------------------- in-memory tensors


class ImageTensorDataset(torch.utils.data.Dataset):
    """uint8 images ``(N, C, H, W)`` held in memory -> float ``(C, H, W)`` in ``[-1, 1]``; optional labels.

    ``__getitem__`` returns the image only (training is unconditional); the labels, when given, are kept
    as ``.labels`` (int64 ``(N,)``) for class-aware analyses.

    Args:
        images_uint8: uint8 tensor ``(N, C, H, W)``.
        labels: optional tensor ``(N,)``.
    """

    def __init__(self, images_uint8: torch.Tensor, labels: torch.Tensor | None = None):
        if not isinstance(images_uint8, torch.Tensor) or images_uint8.dtype != torch.uint8:
            raise DataError(
                f"images must be a uint8 tensor, got {getattr(images_uint8, 'dtype', type(images_uint8))}"
            )
        if images_uint8.dim() != 4:
            raise DataError(f"images must have shape (N, C, H, W), got {tuple(images_uint8.shape)}")
        if labels is not None and (labels.dim() != 1 or len(labels) != len(images_uint8)):
            raise DataError(f"labels of shape {tuple(labels.shape)} do not match {len(images_uint8)} images")
        self.images = images_uint8  # (N, C, H, W) uint8
        self.labels = labels  # (N,) or None
        self.report: dict = _empty_report("tensor", len(images_uint8))

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return _to_unit_range(self.images[index])  # (C, H, W) in [-1, 1]


# ---------------------------------------------------------------------------- Fashion-MNIST


def _fit_28(x: torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 (N, 1, 28, 28) -> uint8 (N, 1, S, S): symmetric black padding when it is exact, else resize."""
    if image_size == 28:
        return x
    if image_size > 28 and (image_size - 28) % 2 == 0:
        p = (image_size - 28) // 2
        return F.pad(x, (p, p, p, p), value=0)  # the Fashion-MNIST background is 0 (black)
    out = torch.empty(x.shape[0], 1, image_size, image_size, dtype=torch.uint8)
    for i in range(0, x.shape[0], 8192):  # chunks bound the float copy's memory
        y = F.interpolate(
            x[i : i + 8192].float(), size=(image_size, image_size), mode="bilinear", antialias=True
        )
        out[i : i + 8192] = y.round().clamp_(0, 255).to(torch.uint8)
    return out


def _seeded_subset(n_total: int, size: int | None, seed: int, what: str) -> torch.Tensor | None:
    """Indices of a seeded random subset of ``size`` out of ``n_total`` (None: keep everything)."""
    if size is None:
        return None
    if size < 1:
        raise ConfigError(f"{what}: subset size must be at least 1, got {size}")
    if size > n_total:
        raise DataError(f"{what}: asked for {size} images but only {n_total} are available")
    return torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))[:size]


def fashion_mnist_dataset(
    split: str = "train",
    image_size: int = 32,
    root: str | Path | None = None,
    size: int | None = None,
    seed: int = 0,
) -> ImageTensorDataset:
    """Fashion-MNIST as a 1-channel :class:`ImageTensorDataset` at ``image_size``.

    Args:
        split: ``"train"`` (the 60k train file) or ``"val"`` / ``"test"`` (the 10k test file).
        image_size: output side. 28x28 is zero-padded symmetrically when ``image_size >= 28`` and the
            difference is even (32 -> 2 pixels each side, black like the background); otherwise resized
            with antialiased bilinear interpolation.
        root: directory with the IDX files (default: the system / user data directories, see
            :func:`sparsediff.data.find_fashion_mnist`).
        size: keep a seeded random subset of this many images (None: all of them).
        seed: seed of that subset.
    """
    if split not in ("train", "val", "test"):
        raise ConfigError(f"Fashion-MNIST split must be 'train', 'val' or 'test', not {split!r}")
    if image_size < 1:
        raise ConfigError(f"data.image_size must be positive, got {image_size}")
    raw, labels = load_fashion_mnist("train" if split == "train" else "test", root)  # (N, 28, 28), (N,)
    found = len(raw)
    idx = _seeded_subset(found, size, seed, f"Fashion-MNIST {split}")
    if idx is not None:  # subset first: only the kept images are resized
        raw, labels = raw[idx], labels[idx]
    ds = ImageTensorDataset(_fit_28(raw.unsqueeze(1), image_size), labels)
    ds.report = _empty_report("fashion-mnist", len(ds), str(root) if root else None, split)
    ds.report.update(found=found, image_size=image_size, seed=seed)
    return ds


# ---------------------------------------------------------------------------- scanning folders


@dataclass
class ScanResult:
    """Outcome of :func:`scan_images`."""

    files: list[Path] = field(default_factory=list)  # readable images, sorted (deterministic order)
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (path, reason) of unreadable files


# (path, size, mtime_ns) -> None if readable else the reason. The train and val splits of one run scan
# the same folder; this keeps the second scan from decoding every file again. Bounded to stay small.
_CHECK_CACHE: dict[tuple[str, int, int], str | None] = {}
_CHECK_CACHE_MAX = 2_000_000


def _check_image(path: Path) -> str | None:
    """None when ``path`` decodes as an image, else why not.

    ``Image.verify`` catches non-images and broken PNG chunks but not a truncated JPEG, so the file is
    also decoded; ``draft`` lets JPEGs decode at 1/8 scale, which still reads the whole stream.
    """
    try:
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
    except OSError as e:
        return f"{type(e).__name__}: {e}"
    if key in _CHECK_CACHE:
        return _CHECK_CACHE[key]
    try:
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:  # verify() leaves the image unusable: open again to decode
            img.draft(img.mode, (max(1, img.width // 8), max(1, img.height // 8)))
            img.load()
        reason = None
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, struct.error...)
        reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    if len(_CHECK_CACHE) >= _CHECK_CACHE_MAX:
        _CHECK_CACHE.clear()
    _CHECK_CACHE[key] = reason
    return reason


def _list_images(root: str | Path, recursive: bool = True) -> list[Path]:
    """Files under ``root`` with an image extension, sorted by their path relative to ``root``."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"image folder {root} does not exist")
    if not root.is_dir():
        raise DataError(f"{root} is not a folder of images")
    found: list[Path] = []
    # os.walk follows symlinked sub-folders (datasets are often linked in), Path.rglob does not.
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        if not recursive:
            dirnames.clear()
        found += [Path(dirpath) / f for f in filenames if Path(f).suffix.lower() in IMAGE_EXTENSIONS]
    found.sort(key=lambda p: p.relative_to(root).as_posix())
    if not found:
        where = "under" if recursive else "directly in"
        raise DataError(
            f"no image files ({', '.join(sorted(e[1:] for e in IMAGE_EXTENSIONS))}) {where} {root}"
        )
    return found


def _take_readable(
    candidates: list[Path], k: int | None, progress: bool, desc: str
) -> tuple[list[Path], list[tuple[Path, str]], int]:
    """Check ``candidates`` in order until ``k`` readable ones are found (None: check them all).

    Returns (readable files, skipped (path, reason) pairs, number of files checked).
    """
    good: list[Path] = []
    bad: list[tuple[Path, str]] = []
    if k == 0:
        return good, bad, 0
    # the bar counts files checked when all are checked, readable files found when stopping at k
    total = len(candidates) if k is None else min(len(candidates), k)
    with progress_bar(total, desc=desc, unit="img", quiet=not progress, leave=False) as bar:
        for n_checked, path in enumerate(candidates, 1):
            reason = _check_image(path)
            if reason is None:
                good.append(path)
            else:
                bad.append((path, reason))
                bar.set_postfix(skipped=len(bad))
            if k is None or reason is None:
                bar.update(1)
            if k is not None and len(good) >= k:
                return good, bad, n_checked
    return good, bad, len(candidates)


def scan_images(
    root: str | Path, recursive: bool = True, verify: bool = True, progress: bool = True
) -> ScanResult:
    """Find the image files under ``root`` and, with ``verify``, skip and record the unreadable ones.

    Args:
        root: folder to search.
        recursive: also search sub-folders.
        verify: open and decode each file with PIL; corrupt, truncated or mislabelled files go to
            ``skipped`` with the reason instead of failing a training run later.
        progress: report progress while verifying (a bar on a terminal, throttled lines in a log).

    Raises:
        DataError: ``root`` is missing, is not a folder, or holds no image files (or none readable).
    """
    candidates = _list_images(root, recursive)
    if not verify:
        return ScanResult(files=candidates, skipped=[])
    good, bad, _ = _take_readable(candidates, None, progress, f"checking images in {root}")
    if not good:
        raise DataError(
            f"none of the {len(bad)} image files under {root} can be read; first: {_fmt_skips(bad)}"
        )
    return ScanResult(files=good, skipped=bad)


def _fmt_skips(skipped: list[tuple[Path, str]], limit: int = 3) -> str:
    return "; ".join(f"{p} ({r})" for p, r in skipped[:limit])


# ---------------------------------------------------------------------------- folder dataset


def _load_image(path: Path, image_size: int, mode: str) -> torch.Tensor:
    """Decode ``path`` -> uint8 (C, S, S): convert, resize the shorter side to S (bicubic), centre-crop."""
    try:
        with Image.open(path) as img:
            if img.mode == "P":  # palette images may carry transparency: go through RGBA to avoid warnings
                img = img.convert("RGBA")
            img = img.convert(mode)
            w, h = img.size
            scale = image_size / min(w, h)
            # the shorter side becomes exactly image_size; the longer one at least image_size
            nw, nh = max(image_size, round(w * scale)), max(image_size, round(h * scale))
            # PIL widens the bicubic kernel when shrinking, i.e. it is antialiased
            img = img.resize((nw, nh), Image.Resampling.BICUBIC)
            left, top = (nw - image_size) // 2, (nh - image_size) // 2
            img = img.crop((left, top, left + image_size, top + image_size))
            arr = np.asarray(img, dtype=np.uint8)  # (S, S, C) or (S, S)
    except Exception as e:
        raise DataError(f"cannot decode image {path}: {type(e).__name__}: {e}") from None
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()  # (C, S, S)


class ImageFolderDataset(torch.utils.data.Dataset):
    """Image files decoded on access -> float ``(C, H, W)`` in ``[-1, 1]``.

    Each image is converted to RGB (``channels=3``) or grayscale L (``channels=1``), its shorter side
    resized to ``image_size`` (bicubic, antialiased) and centre-cropped to ``image_size x image_size``.
    A file that fails to decode here raises :class:`DataError` naming it; :func:`scan_images` is where
    bad files are skipped and counted beforehand.

    Args:
        files: image paths, in the order the dataset indexes them.
        image_size: output side in pixels.
        channels: 3 (RGB) or 1 (grayscale).
    """

    def __init__(self, files: list[Path], image_size: int, channels: int = 3):
        if channels not in (1, 3):
            raise ConfigError(f"data.channels must be 1 or 3 for image files, got {channels}")
        if image_size < 1:
            raise ConfigError(f"data.image_size must be positive, got {image_size}")
        self.files = [Path(f) for f in files]
        self.image_size = image_size
        self.channels = channels
        self.report: dict = _empty_report("image-folder", len(self.files))

    def __len__(self) -> int:
        return len(self.files)

    def load_uint8(self, index: int) -> torch.Tensor:
        """The ``index``-th image as uint8 ``(C, H, W)`` (what FID compares against)."""
        return _load_image(self.files[index], self.image_size, "RGB" if self.channels == 3 else "L")

    def __getitem__(self, index: int) -> torch.Tensor:
        return _to_unit_range(self.load_uint8(index))  # (C, H, W) in [-1, 1]


# ---------------------------------------------------------------------------- from a DataSpec


def _check_size(value: int | None, field_name: str) -> None:
    if value is not None and value < 0:
        raise ConfigError(f"data.{field_name} must be >= 0, got {value}")


def _folder_report(
    spec: DataSpec, split: str, root: Path, found: int, skipped: list, checked: int, used: int
) -> dict:
    return {
        "dataset": spec.name,
        "split": split,
        "root": str(root),
        "found": found,  # files with an image extension
        "checked": checked,  # of those, how many were decoded to pick this split
        "skipped": len(skipped),
        "skipped_files": [(str(p), r) for p, r in skipped[:MAX_REPORTED_SKIPS]],
        "used": used,
        "image_size": spec.image_size,
        "channels": spec.channels,
        "split_seed": spec.split_seed,
    }


def _require_root(spec: DataSpec) -> Path:
    if not spec.root:
        raise DataError(
            f"data.root is not set for dataset {spec.name!r}. Download {_DOWNLOAD_HINTS[spec.name]}, then "
            f"set data.root in the preset or pass --set data.root=PATH."
        )
    root = Path(spec.root).expanduser()
    if not root.is_dir():
        raise DataError(
            f"data.root {root} is not an existing folder (dataset {spec.name!r} expects "
            f"{_DOWNLOAD_HINTS[spec.name]})"
        )
    return root


def _shuffled(files: list[Path], seed: int) -> list[Path]:
    perm = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed))
    return [files[i] for i in perm.tolist()]


def _folder_split(spec: DataSpec, split: str, verify: bool) -> ImageFolderDataset:
    """One folder of images -> the seeded train / val split (see the module docstring)."""
    root = _require_root(spec)
    candidates = _shuffled(_list_images(root, recursive=True), spec.split_seed)
    train_size, val_size = spec.train_size, spec.val_size
    # Both sizes known: decode only the first train_size + val_size readable files. Otherwise the 10 %
    # default or "all but val" needs the count of readable files, i.e. a full check.
    need = train_size + val_size if train_size is not None and val_size is not None else None
    if verify:
        good, bad, checked = _take_readable(candidates, need, True, f"checking images in {root}")
    else:
        good, bad, checked = candidates, [], 0
    n = len(good)
    if val_size is None:
        val_size = max(1, n // 10)
    if train_size is None:
        train_size = n - val_size
    if train_size < 1 or train_size + val_size > n:
        skipped = f" ({len(bad)} unreadable files skipped)" if bad else ""
        raise DataError(
            f"{root} has {n} readable images{skipped} but dataset {spec.name!r} needs "
            f"data.train_size={train_size} + data.val_size={val_size} = {train_size + val_size}"
        )
    # Validation first: the held-out set (what FID compares against) stays the same whatever train_size is.
    files = good[val_size : val_size + train_size] if split == "train" else good[:val_size]
    ds = ImageFolderDataset(files, spec.image_size, spec.channels)
    ds.report = _folder_report(spec, split, root, len(candidates), bad, checked, len(files))
    ds.report.update(train_size=train_size, val_size=val_size)
    return ds


def _imagenette_split(spec: DataSpec, split: str, verify: bool) -> ImageFolderDataset:
    """Imagenette's own layout: ``root/train/<class>/*.JPEG`` and ``root/val/<class>/*.JPEG``."""
    root = _require_root(spec)
    folder = root / split
    if not folder.is_dir():
        raise DataError(
            f"{folder} does not exist: data.root must point at the unpacked Imagenette folder holding "
            f"train/ and val/ ({_DOWNLOAD_HINTS['imagenette']})"
        )
    size = spec.train_size if split == "train" else spec.val_size
    field_name = "train_size" if split == "train" else "val_size"
    # Shuffled even without a subset: sorted files come class by class, and FID references take the
    # first n images of a split.
    candidates = _shuffled(_list_images(folder, recursive=True), spec.split_seed)
    if verify:
        good, bad, checked = _take_readable(candidates, size, True, f"checking images in {folder}")
    else:
        good, bad, checked = candidates, [], 0
    if size is not None and size > len(good):
        raise DataError(f"{folder} has {len(good)} readable images but data.{field_name} asks for {size}")
    if size is None and not good:
        raise DataError(f"no readable images in {folder}; first failures: {_fmt_skips(bad)}")
    files = good[:size] if size is not None else good
    ds = ImageFolderDataset(files, spec.image_size, spec.channels)
    ds.report = _folder_report(spec, split, folder, len(candidates), bad, checked, len(files))
    ds.report["classes"] = len({p.parent.name for p in files})
    return ds


def build_image_dataset(spec: DataSpec, split: str) -> torch.utils.data.Dataset:
    """The ``split`` (``"train"`` or ``"val"``) of the image dataset that ``spec`` describes.

    ``spec.name`` is one of ``fashion-mnist``, ``celebahq``, ``lsun-bedrooms``, ``image-folder``,
    ``imagenette``. ``train_size`` / ``val_size`` select seeded subsets (``split_seed``); for a single
    folder (CelebA-HQ, LSUN-Bedrooms, any folder) they define the train/val split itself, with
    ``val_size=None`` meaning 10 % (at least one image) and ``train_size=None`` all the rest.
    ``spec.args["verify"] = False`` skips decoding every file up front (faster start, but a corrupt file
    then fails when it is loaded).

    Every dataset returned exposes ``.report``: dataset, split, root, found, skipped, skipped_files (the
    first 20 (path, reason) pairs) and used.

    Raises:
        ConfigError: unknown dataset name or split, or impossible sizes.
        DataError: missing folder or files, or fewer readable images than requested.
    """
    if split not in ("train", "val"):
        raise ConfigError(f"split must be 'train' or 'val', not {split!r}")
    name = spec.name.lower()
    if name not in KNOWN_DATASETS:
        raise ConfigError(
            f"data.name: unknown image dataset {spec.name!r}; known: {', '.join(KNOWN_DATASETS)}"
        )
    _check_size(spec.train_size, "train_size")
    _check_size(spec.val_size, "val_size")
    if name != spec.name:
        spec = replace(spec, name=name)
    verify = bool(spec.args.get("verify", True))

    if name == "fashion-mnist":
        if spec.channels not in (1, 3):
            raise ConfigError(f"data.channels must be 1 or 3 for Fashion-MNIST, got {spec.channels}")
        size = spec.train_size if split == "train" else spec.val_size
        ds = fashion_mnist_dataset(split, spec.image_size, spec.root, size, spec.split_seed)
        if spec.channels == 3:  # gray -> RGB for models (or FID extractors) that want 3 channels
            report = ds.report
            ds = ImageTensorDataset(ds.images.expand(-1, 3, -1, -1).contiguous(), ds.labels)
            ds.report = report
        ds.report["channels"] = spec.channels
        return ds
    if name == "imagenette":
        return _imagenette_split(spec, split, verify)
    return _folder_split(spec, split, verify)


def reference_images_uint8(spec: DataSpec, split: str = "val", n: int | None = None) -> torch.Tensor:
    """uint8 ``(N, C, H, W)`` images of ``split`` at ``spec.image_size``: what FID compares samples with.

    Args:
        spec: the data section of a run config.
        split: ``"train"`` or ``"val"``.
        n: take the first ``n`` images of the split (None: all). Folder splits are in seeded random
            order and the Fashion-MNIST files are already class-mixed, so the first ``n`` are a fair sample.

    Raises:
        DataError: the split has fewer than ``n`` images.
    """
    ds = build_image_dataset(spec, split)
    total = len(ds)
    if n is not None and (n < 0 or n > total):
        raise DataError(f"asked for {n} reference images but the {split} split of {spec.name!r} has {total}")
    n = total if n is None else n
    if isinstance(ds, ImageTensorDataset):
        return ds.images[:n].clone()  # (n, C, H, W)
    assert isinstance(ds, ImageFolderDataset)
    out = torch.empty(n, ds.channels, ds.image_size, ds.image_size, dtype=torch.uint8)
    for i in track(range(n), desc=f"loading {split} reference images", unit="img"):
        out[i] = ds.load_uint8(i)
    return out
