"""Fashion-MNIST from its IDX files (the bundled dataset: Debian's ``dataset-fashion-mnist``).

Search order for the four ``*-idx?-ubyte.gz`` files:

1. the ``root`` argument (or ``data.root`` of a preset);
2. ``/usr/share/datasets/fashion-mnist`` (``apt-get install dataset-fashion-mnist``);
3. ``$SPARSEDIFF_DATA/fashion-mnist``, else ``~/.cache/sparsediff/data/fashion-mnist``;
4. torchvision's downloader into that user directory, where a network allows.

Otherwise a :class:`DataError` says exactly how to get the files.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError

SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


def user_data_dir() -> Path:
    """Where sparsediff keeps downloaded or user-provided data: ``$SPARSEDIFF_DATA`` or ``~/.cache``."""
    env = os.environ.get("SPARSEDIFF_DATA")
    return Path(env) if env else Path.home() / ".cache" / "sparsediff" / "data"


def _has_files(d: Path) -> bool:
    return all((d / f).exists() for pair in FILES.values() for f in pair)


def _try_download(target: Path) -> bool:
    try:
        from torchvision.datasets import FashionMNIST

        tmp = target.parent / "_torchvision"
        FashionMNIST(str(tmp), train=True, download=True)
        FashionMNIST(str(tmp), train=False, download=True)
        raw = tmp / "FashionMNIST" / "raw"
        target.mkdir(parents=True, exist_ok=True)
        for pair in FILES.values():
            for f in pair:
                (target / f).write_bytes((raw / f).read_bytes())
        return _has_files(target)
    except Exception:  # no network, or the mirror is down: fall through to the instructions
        return False


def find_fashion_mnist(root: str | Path | None = None, download: bool = True) -> Path:
    """Directory holding the Fashion-MNIST IDX files (see the module docstring for the search order)."""
    candidates = [Path(root)] if root else []
    candidates += [SYSTEM_DIR, user_data_dir() / "fashion-mnist"]
    for d in candidates:
        if _has_files(d):
            return d
    if root:
        raise DataError(f"no Fashion-MNIST IDX files ({', '.join(FILES['train'])}, ...) in {root}")
    if download and _try_download(user_data_dir() / "fashion-mnist"):
        return user_data_dir() / "fashion-mnist"
    raise DataError(
        "Fashion-MNIST was not found. Install it with `sudo apt-get install dataset-fashion-mnist` "
        f"(files land in {SYSTEM_DIR}), or put train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        f"t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz from "
        f"https://github.com/zalandoresearch/fashion-mnist into {user_data_dir() / 'fashion-mnist'} "
        "(or set SPARSEDIFF_DATA, or data.root in the preset)."
    )


def _read_idx(path: Path, offset: int) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    return np.frombuffer(data, dtype=np.uint8, offset=offset)


def load_fashion_mnist(
    split: str = "train", root: str | Path | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as uint8 (N, 28, 28) and labels as int64 (N,) for ``split`` in {"train", "test"}."""
    if split not in FILES:
        raise DataError(f"Fashion-MNIST has splits 'train' and 'test', not {split!r}")
    d = find_fashion_mnist(root)
    img_file, lbl_file = FILES[split]
    images = _read_idx(d / img_file, 16)
    labels = _read_idx(d / lbl_file, 8)
    if images.size % (28 * 28) or images.size // (28 * 28) != labels.size:
        raise DataError(
            f"{d / img_file}: {images.size} bytes of pixels for {labels.size} labels; file is corrupt"
        )
    x = torch.from_numpy(images.copy()).view(-1, 28, 28)
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y
