"""Small offline feature networks for FID when the Inception weights cannot be had.

The standard FID needs the 2015 Inception-v3 weights, which are downloaded from the internet. Where there
is no internet (or for 32x32 grayscale data, on which Inception features say little), sparsediff
measures the Frechet distance in the feature space of :class:`FeatureNet`: a small CNN classifier trained
by a project command on the bundled data and shipped in ``sparsediff/assets``. Its values are **not**
comparable with Inception FID (nor with FIDs under another ``FeatureNet``), which is why the metric has
its own name (``fid_sparsediff_<kind>``, see :mod:`sparsediff.metrics.fid`).

Recreate the shipped weights with::

    sparsediff train-features fmnist                      # Fashion-MNIST, a few minutes on 2 CPU cores
    sparsediff train-features strokes --kanjivg           # KanjiVG rasters, a few minutes on 2 CPU cores
    sparsediff train-features strokes --data rasters.npz  # your own rasters and labels

The stroke network is trained on a proxy task, since KanjiVG has one drawing per character: classify a
rasterised character by its **stroke count** (1, 2, ..., 19, 20 or more: 20 classes), over seeded
augmented copies (small rotation, anisotropic scale and shear, line width, margin) of every character;
accuracy is measured on characters held out as a whole (see :func:`make_stroke_feature_data`). To count
strokes the features must see the structure of a character: how many separate lines, where they cross
and end, which is what distinguishes a good sample from a smudge.

Each weights file ``features-<kind>.safetensors`` comes with ``features-<kind>.json``: kind, input size,
feature dimension, test accuracy, the command that made it, torch version and the file's SHA-256.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, DataError, StateError
from ..progress import progress_bar, track

# The shipped weights live inside the package so that an installed wheel has them (package-data
# "assets/*"); tests point this elsewhere to simulate a missing asset.
ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets"
KINDS = ("fmnist", "strokes")
INPUT_SIZE = 32


def asset_path(kind: str) -> Path:
    """Where the shipped weights of ``kind`` live: ``<package>/assets/features-<kind>.safetensors``."""
    _check_kind(kind)
    return ASSETS_DIR / f"features-{kind}.safetensors"


def train_command(kind: str) -> str:
    """The shell command that (re)creates the shipped weights of ``kind``."""
    _check_kind(kind)
    if kind == "strokes":
        return "sparsediff train-features strokes --kanjivg"
    return f"sparsediff train-features {kind}"


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ConfigError(f"unknown feature network kind {kind!r}; choose one of {', '.join(KINDS)}")


# ----------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------


@dataclass
class FeatureNetConfig:
    """Architecture of :class:`FeatureNet`; stored with the weights so that a file rebuilds its net."""

    channels: tuple[int, ...] = (16, 32, 64, 128)
    feature_dim: int = 128
    num_classes: int = 10


class FeatureNet(nn.Module):
    """A small CNN classifier whose penultimate activations serve as FID features.

    Four conv blocks (conv 3x3, BatchNorm, ReLU, 2x2 max-pool: 32 -> 16 -> 8 -> 4 -> 2 pixels), global
    average pooling, a ``feature_dim`` penultimate layer and a linear class head. About 115k parameters:
    the weights file stays well under 1 MB and an epoch of Fashion-MNIST takes minutes on one CPU core.

    Input: float (N, 1, 32, 32) in [-1, 1]. :meth:`features` gives (N, feature_dim), :meth:`forward` the
    class logits (N, num_classes).
    """

    def __init__(self, config: FeatureNetConfig | None = None) -> None:
        super().__init__()
        self.config = config or FeatureNetConfig()
        blocks: list[nn.Module] = []
        c_in = 1
        for c in self.config.channels:
            blocks += [
                nn.Conv2d(c_in, c, 3, padding=1, bias=False),
                nn.BatchNorm2d(c),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            c_in = c
        self.body = nn.Sequential(*blocks)
        self.fc = nn.Linear(c_in, self.config.feature_dim)
        # A smooth activation on the feature layer: a ReLU unit that is dead on the data would give a
        # feature of constant zero, hence a singular covariance and an ill-conditioned matrix square
        # root in the Frechet distance. GELU keeps every feature varying.
        self.act = nn.GELU()
        self.head = nn.Linear(self.config.feature_dim, self.config.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations (N, feature_dim) of float images (N, 1, 32, 32) in [-1, 1]."""
        h = self.body(x)  # (N, C, 2, 2)
        h = h.mean(dim=(2, 3))  # (N, C)
        return self.act(self.fc(h))  # (N, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (N, num_classes)."""
        return self.head(self.features(x))


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (N, H, W) or (N, C, H, W), C in {1, 3} -> float (N, 1, 32, 32) in [-1, 1].

    RGB becomes luma (ITU-R 601 weights, rounded to the 8-bit grid like PIL's ``convert("L")``), so a
    grayscale image repeated over three channels gives exactly the grayscale input. 28x28 images are
    zero-padded by 2 pixels on each side, as in training (and as sparsediff pads Fashion-MNIST for the
    diffusion models); any other size is resized (bilinear, antialiased) to 32x32.
    """
    if images.dtype != torch.uint8:
        raise DataError(f"expected uint8 images, got {images.dtype}")
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise DataError(
            f"expected images of shape (N, H, W) or (N, C, H, W) with C in {{1, 3}}, got {tuple(images.shape)}"
        )
    x = images.to(torch.float32)  # (N, C, H, W) in [0, 255]
    if x.shape[1] == 3:
        w = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64, device=x.device).view(1, 3, 1, 1)
        x = (images.to(torch.float64) * w).sum(dim=1, keepdim=True).round().to(torch.float32)
    h, w_ = x.shape[-2:]
    if (h, w_) == (28, 28):
        x = F.pad(x, (2, 2, 2, 2), value=0.0)
    elif (h, w_) != (INPUT_SIZE, INPUT_SIZE):
        x = F.interpolate(
            x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False, antialias=True
        )
    return x / 127.5 - 1.0  # (N, 1, 32, 32)


# ----------------------------------------------------------------------------------------------------
# Stroke data: KanjiVG rasters labelled by stroke count
# ----------------------------------------------------------------------------------------------------

STROKE_CLASSES = 20  # stroke-count classes: 1, 2, ..., 19 strokes, and 20 or more
# How pen drawings are rasterised for the stroke network (32 px, white on black). The ChiroDiff task
# rasterises samples and references with these defaults, so that FID reads images like its training ones.
STROKE_LINE_WIDTH = 1.0  # pixels at 32 px
STROKE_PADDING = 0.08  # margin on each side, as a fraction of the size


def stroke_count_class(num_strokes: int) -> int:
    """Class of a drawing with ``num_strokes`` strokes: ``min(num_strokes, 20) - 1``."""
    if num_strokes < 1:
        raise DataError(f"a drawing needs at least one stroke, got {num_strokes}")
    return min(int(num_strokes), STROKE_CLASSES) - 1


def make_stroke_feature_data(
    copies: int = 6,
    seed: int = 0,
    size: int = INPUT_SIZE,
    path: str | Path | None = None,
    limit: int | None = None,
    rotation: float = 6.0,
    scale: tuple[float, float] = (0.9, 1.1),
    shear: float = 0.1,
    line_width: tuple[float, float] = (0.75, 1.5),
    padding: tuple[float, float] = (0.04, 0.12),
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The stroke network's training data: ``(images, labels, groups)`` from KanjiVG.

    Every character (base files of the installed ``kanjivg`` package, or the folder ``path``) gives
    ``copies`` rasters: the first as the ChiroDiff task draws them (``STROKE_LINE_WIDTH``,
    ``STROKE_PADDING``), the others with seeded random augmentations: rotation in +-``rotation`` degrees,
    x and y scales in ``scale``, shear in +-``shear`` (about the centre), a line width in ``line_width``
    pixels and a margin in ``padding``. Labels are :func:`stroke_count_class` of the character's stroke
    count (each ``<path>`` subpath is a stroke, as in the diffusion data); ``groups`` is the character's
    index, so that :func:`train_feature_net` holds out whole characters.

    Returns uint8 images (N, size, size), int64 labels (N,) and int64 groups (N,), N = copies x characters.
    """
    import numpy as np

    from ..data.kanjivg import load_kanjivg
    from ..data.raster import rasterize
    from ..data.strokes import random_affine

    if copies < 1:
        raise ConfigError(f"copies must be >= 1, got {copies}")
    items, report = load_kanjivg(path=path, limit=limit, progress=progress)
    if not items:
        raise DataError(f"no KanjiVG characters to make stroke data from ({report})")
    rng = np.random.default_rng(seed)
    images = np.zeros((len(items) * copies, size, size), dtype=np.uint8)
    labels = np.zeros(len(items) * copies, dtype=np.int64)
    groups = np.repeat(np.arange(len(items), dtype=np.int64), copies)
    k = 0
    for _, strokes in track(items, desc="rasterising KanjiVG", quiet=not progress, leave=True):
        label = stroke_count_class(len(strokes))
        for c in range(copies):
            if c == 0:
                drawn, width, pad = strokes, STROKE_LINE_WIDTH, STROKE_PADDING
            else:
                drawn = random_affine(strokes, rng, rotation, scale, shear)
                width, pad = rng.uniform(*line_width), rng.uniform(*padding)
            images[k] = rasterize(drawn, size=size, line_width=width, padding=pad)
            labels[k] = label
            k += 1
    return torch.from_numpy(images), torch.from_numpy(labels), torch.from_numpy(groups)


# ----------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------


def _load_dataset(
    kind: str, dataset: tuple[torch.Tensor, ...] | None, holdout: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train images, train labels, test images, test labels), images uint8 (N, H, W).

    ``dataset`` is ``(images, labels)`` or ``(images, labels, groups)``; with groups (integers (N,), e.g.
    the source drawing of augmented copies) whole groups are held out, so no copy of a test drawing is
    trained on.
    """
    if dataset is None:
        if kind != "fmnist":
            raise DataError(
                f"train_feature_net({kind!r}) needs its data: pass dataset=(uint8 images (N, 32, 32), "
                "int labels (N,)) (make_stroke_feature_data() makes them from KanjiVG), or run "
                f"`{train_command(kind)}` (or `--data DATA.npz` with arrays `images` and `labels`)"
            )
        from ..data.fashion_mnist import load_fashion_mnist

        x_tr, y_tr = load_fashion_mnist("train")
        x_te, y_te = load_fashion_mnist("test")
        return x_tr, y_tr, x_te, y_te
    if len(dataset) not in (2, 3):
        raise DataError(
            f"dataset must be (images, labels) or (images, labels, groups), got {len(dataset)} items"
        )
    images, labels = torch.as_tensor(dataset[0]), torch.as_tensor(dataset[1])
    groups = torch.as_tensor(dataset[2]) if len(dataset) == 3 else None
    if images.dtype != torch.uint8 or images.dim() != 3:
        raise DataError(f"dataset images must be uint8 (N, H, W), got {images.dtype} {tuple(images.shape)}")
    if labels.dim() != 1 or len(labels) != len(images) or labels.is_floating_point():
        raise DataError(
            f"dataset labels must be integers (N,) with N = {len(images)}, got {tuple(labels.shape)}"
        )
    if not 0.0 < holdout < 1.0:
        raise ConfigError(f"holdout must be in (0, 1), got {holdout}")
    labels = labels.long()
    if int(labels.min()) < 0:
        raise DataError("dataset labels must be >= 0")
    # A seeded random hold-out split: the user's data has no official test split.
    gen = torch.Generator().manual_seed(seed)
    if groups is not None:
        if groups.shape != labels.shape or groups.is_floating_point():
            raise DataError(
                f"dataset groups must be integers (N,) with N = {len(images)}, got {tuple(groups.shape)}"
            )
        ids = torch.unique(groups)
        held = ids[torch.randperm(len(ids), generator=gen)[: max(1, int(round(holdout * len(ids))))]]
        is_test = torch.isin(groups, held)
        te, tr = torch.nonzero(is_test).flatten(), torch.nonzero(~is_test).flatten()
    else:
        perm = torch.randperm(len(images), generator=gen)
        n_test = max(1, int(round(holdout * len(images))))
        te, tr = perm[:n_test], perm[n_test:]
    if len(tr) == 0:
        raise DataError(f"dataset of {len(images)} images is too small to hold out a test split")
    return images[tr], labels[tr], images[te], labels[te]


@torch.no_grad()
def evaluate_accuracy(
    net: FeatureNet, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000
) -> float:
    """Top-1 accuracy of ``net`` on uint8 images (N, H, W) or (N, C, H, W) with labels (N,)."""
    net.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        logits = net(preprocess(images[i : i + batch_size]))
        correct += int((logits.argmax(1) == labels[i : i + batch_size]).sum())
    return correct / max(1, len(images))


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MB chunks (Inception weights are ~100 MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def train_feature_net(
    kind: str = "fmnist",
    out: str | Path | None = None,
    epochs: int = 3,
    seed: int = 0,
    progress: bool = True,
    dataset: tuple[torch.Tensor, ...] | None = None,
    batch_size: int = 256,
    lr: float = 3e-3,
    holdout: float = 0.1,
    data_option: str | None = None,
    extra_meta: dict | None = None,
) -> dict:
    """Train a :class:`FeatureNet` classifier and save it as ``features-<kind>.safetensors`` + ``.json``.

    Args:
        kind: ``"fmnist"`` trains on the Fashion-MNIST train split (28x28 padded to 32x32) and reports
            accuracy on the official test split. ``"strokes"`` (or any kind with ``dataset``) trains on
            ``dataset`` and reports accuracy on a seeded random hold-out of ``holdout`` of it.
        out: weights file to write; default the package's shipped asset :func:`asset_path` (kind). The
            JSON metadata goes next to it with the suffix ``.json``.
        epochs: passes over the training images (AdamW, one-cycle learning rate).
        seed: seeds initialisation, shuffling and the hold-out split; same seed, same weights.
        progress: report progress per epoch (a bar on a terminal, throttled lines in a log).
        dataset: ``(images, labels)``: uint8 (N, H, W) images (32x32 rasters for strokes) and integer
            class labels (N,), optionally with ``groups`` (N,) as a third item: then whole groups are
            held out (augmented copies of one drawing). Required for kinds other than ``"fmnist"``.
        batch_size: training batch size.
        lr: peak learning rate of the one-cycle schedule.
        holdout: fraction of ``dataset`` (of its groups, when given) held out to measure accuracy.
        data_option: how the command line recorded in the JSON names the data (default ``--data ...``);
            e.g. ``--kanjivg`` when :func:`make_stroke_feature_data` made it.
        extra_meta: more entries for the JSON metadata (e.g. how the data was made).

    Returns:
        The metadata written to the JSON file, plus ``path`` and ``json_path``.
    """
    _check_kind(kind)
    if epochs < 1 or batch_size < 1:
        raise ConfigError(f"epochs and batch_size must be >= 1, got epochs={epochs}, batch_size={batch_size}")
    out = Path(out) if out is not None else asset_path(kind)
    x_tr, y_tr, x_te, y_te = _load_dataset(kind, dataset, holdout, seed)
    num_classes = int(max(int(y_tr.max()), int(y_te.max()))) + 1
    torch.manual_seed(seed)
    net = FeatureNet(FeatureNetConfig(num_classes=num_classes))
    # Preprocess once: the whole train split as float32 is 60k x 4 KB = 245 MB for Fashion-MNIST.
    inputs = preprocess(x_tr)  # (N, 1, 32, 32)
    steps_per_epoch = math.ceil(len(inputs) / batch_size)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(seed)

    t0 = time.perf_counter()
    for epoch in range(epochs):
        net.train()
        perm = torch.randperm(len(inputs), generator=gen)
        desc = f"features-{kind} epoch {epoch + 1}/{epochs}"
        with progress_bar(steps_per_epoch, desc=desc, quiet=not progress) as bar:
            for step in range(steps_per_epoch):
                idx = perm[step * batch_size : (step + 1) * batch_size]
                loss = F.cross_entropy(net(inputs[idx]), y_tr[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                if step % 20 == 0:
                    bar.set_postfix(loss=f"{loss.item():.3f}")
                bar.update()
    train_seconds = time.perf_counter() - t0
    net.eval()
    acc = evaluate_accuracy(net, x_te, y_te)

    from safetensors.torch import save_file

    from .. import __version__

    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    config = asdict(net.config)
    save_file(state, str(out), metadata={"kind": kind, "config": json.dumps(config)})
    out.chmod(0o644)  # safetensors writes 0600; a shipped asset must be readable by everyone
    # The command line that reproduces this file: only the options that differ from the defaults.
    command = f"sparsediff train-features {kind}"
    if data_option is not None:
        command += f" {data_option}"
    elif dataset is not None:
        command += " --data DATA.npz" if kind != "strokes" else " --data RASTERS.npz"
    if out.resolve() != asset_path(kind).resolve():
        command += f" --out {out}"
    for flag, value, default in (
        ("--epochs", epochs, 3),
        ("--seed", seed, 0),
        ("--batch-size", batch_size, 256),
        ("--lr", lr, 3e-3),
    ):
        if value != default:
            command += f" {flag} {value}"
    meta = {
        "kind": kind,
        "architecture": "sparsediff.metrics.features.FeatureNet",
        "config": config,
        "input_size": [1, INPUT_SIZE, INPUT_SIZE],
        "input_range": [-1.0, 1.0],
        "feature_dim": net.config.feature_dim,
        "num_classes": num_classes,
        "num_parameters": sum(p.numel() for p in net.parameters()),
        "test_accuracy": round(acc, 4),
        "train_samples": len(x_tr),
        "test_samples": len(x_te),
        "test_split": "official test split"
        if dataset is None
        else f"seeded {holdout:.0%} hold-out" + (" of whole groups" if len(dataset) == 3 else ""),
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "train_seconds": round(train_seconds, 1),
        "torch_num_threads": torch.get_num_threads(),
        "command": command,
        "torch_version": torch.__version__,
        "sparsediff_version": __version__,
        "sha256": sha256_file(out),
        **(extra_meta or {}),
    }
    json_path = out.with_suffix(".json")
    json_path.write_text(json.dumps(meta, indent=2) + "\n")
    return {**meta, "path": str(out), "json_path": str(json_path)}


# ----------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------


def _weights_file(kind: str, path: str | Path | None) -> tuple[Path, str]:
    """(weights file, how to recreate it); DataError naming the command when the file is missing."""
    _check_kind(kind)
    shipped = path is None
    path = asset_path(kind) if shipped else Path(path)
    how = f"create it with `{train_command(kind)}" + ("`" if shipped else f" --out {path}`")
    if kind == "strokes":
        how += " (or `sparsediff train-features strokes --data RASTERS.npz` for your own rasters)"
    if not path.is_file():
        raise DataError(f"feature network weights for {kind!r} not found at {path}; {how}")
    return path, how


def feature_net_file(kind: str, path: str | Path | None = None) -> Path:
    """The weights file that :func:`load_feature_net` would read (``path`` or the shipped asset).

    Raises :class:`DataError` naming the command that creates it when it does not exist.
    """
    return _weights_file(kind, path)[0]


def load_feature_net(kind: str, path: str | Path | None = None) -> FeatureNet:
    """The trained :class:`FeatureNet` of ``kind`` in eval mode, from the shipped asset or from ``path``.

    Raises :class:`DataError` naming the command that (re)creates the file when it is missing, corrupt or
    does not match the SHA-256 in its JSON metadata.
    """
    path, how = _weights_file(kind, path)
    meta_path = path.with_suffix(".json")
    if meta_path.is_file():
        try:
            expected = json.loads(meta_path.read_text()).get("sha256")
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"cannot read {meta_path}: {e}; {how}") from None
        if expected and expected != sha256_file(path):
            raise DataError(f"{path} does not match the SHA-256 in {meta_path} (corrupt or replaced); {how}")
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            file_meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a Mapping)
    except (SafetensorError, OSError) as e:
        raise DataError(f"cannot read {path}: {e}; {how}") from None
    try:
        config = FeatureNetConfig(**json.loads(file_meta.get("config", "{}")))
    except (TypeError, json.JSONDecodeError) as e:
        raise StateError(f"{path}: bad FeatureNet config in the file's metadata: {e}") from None
    config.channels = tuple(config.channels)
    if "head.weight" in state:  # the head's shape is the truth about the number of classes
        config.num_classes = int(state["head.weight"].shape[0])
    net = FeatureNet(config)
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise StateError(f"{path} does not hold FeatureNet weights: {e}") from None
    return net.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------------
# Training data (what ``sparsediff train-features`` feeds train_feature_net)
# ----------------------------------------------------------------------------------------------------


def read_feature_data(path: str | Path) -> tuple[torch.Tensor, ...]:
    """``(images, labels[, groups])`` from an .npz with uint8 ``images`` (N, 32, 32), integer ``labels``
    (N,) and optionally integer ``groups`` (N,) (held out whole); a DataError when it cannot be read."""
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as z:
            dataset = (torch.from_numpy(z["images"]), torch.from_numpy(z["labels"]))
            if "groups" in z.files:
                dataset += (torch.from_numpy(z["groups"]),)
    except (OSError, KeyError, ValueError) as e:
        raise DataError(f"cannot read `images` and `labels` from {path}: {e}") from None
    return dataset


def kanjivg_feature_data(
    copies: int = 6, seed: int = 0, progress: bool = True
) -> tuple[tuple[torch.Tensor, ...], dict]:
    """The strokes network's data made from the installed KanjiVG (:func:`make_stroke_feature_data`)
    and how it was made, for the weights' JSON metadata: ``(dataset, meta)``."""
    t0 = time.perf_counter()
    dataset = make_stroke_feature_data(copies=copies, seed=seed, progress=progress)
    meta = {
        "data": "KanjiVG (installed package, base files), rasterised at 32 px",
        "task": f"stroke count of the character: {STROKE_CLASSES} classes (1 .. {STROKE_CLASSES - 1}, "
        f"{STROKE_CLASSES} or more)",
        "copies_per_character": copies,
        "characters": int(dataset[2].max()) + 1,
        "data_seconds": round(time.perf_counter() - t0, 1),
    }
    return dataset, meta
