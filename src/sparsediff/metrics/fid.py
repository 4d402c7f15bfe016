"""FID through torch-fidelity, in Inception-v3 space or in an offline sparsediff feature space.

Every value goes through :func:`torch_fidelity.calculate_metrics` (``fid=True``), as in Paper A; only
the feature extractor changes:

- ``inception-v3-compat`` -> ``fid_inception_v3``: the standard FID, 2048-d pool3 features of the 2015
  Inception-v3 weights, read from ``weights_path``;
- ``sparsediff-fmnist`` -> ``fid_sparsediff_fmnist``: 128-d features of
  :class:`~sparsediff.metrics.features.FeatureNet` trained on Fashion-MNIST, shipped with the package;
- ``sparsediff-strokes`` -> ``fid_sparsediff_strokes``: the same network trained on rasterised pen
  drawings.

The sparsediff values are distances in a different feature space: they are not comparable with
Inception FIDs from papers, which is why they never carry the name "fid_inception".

The Inception weights are not downloaded here (machines running sparsediff are often offline). Get the
standard file once, e.g. ``pt_inception-2015-12-05-6726825d.pth`` from pytorch-fid's releases or
torch-fidelity's own ``weights-inception-2015-12-05-6726825d.pth`` (both hold the same 566 keys and
shapes, which torch-fidelity's architecture loads strictly), and pass its path.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch_fidelity
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from ..errors import ConfigError, DataError, StateError
from . import features

PYTORCH_FID_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
INCEPTION_HELP = (
    "pass weights_path= pointing to the standard FID Inception-v3 weights, "
    f"e.g. pt_inception-2015-12-05-6726825d.pth from {PYTORCH_FID_URL} or torch-fidelity's copy "
    f"{URL_INCEPTION_V3}; sparsediff does not download them"
)


@dataclass(frozen=True)
class ExtractorInfo:
    """What a feature extractor name means to sparsediff."""

    metric: str  # name of the metric in results and reports
    kind: str | None  # FeatureNet kind, None for torch-fidelity's own Inception
    description: str


FEATURE_EXTRACTORS: dict[str, ExtractorInfo] = {
    "sparsediff-fmnist": ExtractorInfo(
        "fid_sparsediff_fmnist",
        "fmnist",
        "128-d features of sparsediff's FeatureNet trained on Fashion-MNIST",
    ),
    "sparsediff-strokes": ExtractorInfo(
        "fid_sparsediff_strokes",
        "strokes",
        "128-d features of sparsediff's FeatureNet trained on pen drawings",
    ),
    "inception-v3-compat": ExtractorInfo(
        "fid_inception_v3", None, "standard FID: 2048-d Inception-v3 pool3 features (torch-fidelity)"
    ),
}


def _info(extractor: str) -> ExtractorInfo:
    if extractor not in FEATURE_EXTRACTORS:
        raise ConfigError(
            f"unknown FID feature extractor {extractor!r}; choose one of {', '.join(FEATURE_EXTRACTORS)}"
        )
    return FEATURE_EXTRACTORS[extractor]


def metric_name(extractor: str) -> str:
    """Name of the FID measured with ``extractor``: ``fid_inception_v3`` or ``fid_sparsediff_<kind>``."""
    return _info(extractor).metric


# ----------------------------------------------------------------------------------------------------
# torch-fidelity plumbing: a feature extractor and a dataset
# ----------------------------------------------------------------------------------------------------


class SparsediffFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity feature extractor wrapping a trained :class:`FeatureNet`.

    torch-fidelity constructs it as ``cls(name, features_list, **kwargs)`` with the registered ``name``
    (``sparsediff-<kind>``) and feeds it uint8 batches (N, C, H, W); ``feature_extractor_weights_path``
    replaces the shipped weights when given.
    """

    _sparsediff = True  # marks the class as ours when the registry is checked after a module reload

    def __init__(
        self, name: str, features_list: list[str], feature_extractor_weights_path: str | None = None, **kwargs
    ) -> None:
        super().__init__(name, features_list)
        kind = _info(name).kind
        if kind is None:
            raise ConfigError(f"{name!r} is not a sparsediff feature extractor")
        self.net = features.load_feature_net(kind, feature_extractor_weights_path)

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return ("penultimate", "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return {"isc": "logits", "fid": "penultimate", "kid": "penultimate", "prc": "penultimate"}[metric]

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> torch.Tensor:
        return torch.zeros(1, 1, 32, 32, dtype=torch.uint8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # x: uint8 (N, C, H, W), C in {1, 3} -> grayscale 32x32 in [-1, 1] -> (N, 128) features
        feats = self.net.features(features.preprocess(x))
        out = {"penultimate": feats}
        if "logits" in self.features_list:
            out["logits"] = self.net.head(feats)
        return tuple(out[name].to(torch.float32) for name in self.features_list)


def register_extractors() -> None:
    """Register the sparsediff feature extractors with torch-fidelity; safe to call any number of times.

    After this, ``torch_fidelity.calculate_metrics(feature_extractor="sparsediff-fmnist", ...)`` works
    directly. Importing this module calls it once.
    """
    for name, info in FEATURE_EXTRACTORS.items():
        if info.kind is None:  # torch-fidelity's own Inception, registered by torch-fidelity
            continue
        existing = FEATURE_EXTRACTORS_REGISTRY.get(name)
        if existing is SparsediffFeatureExtractor:
            continue
        if existing is not None:
            if not getattr(existing, "_sparsediff", False):
                raise ConfigError(
                    f"torch-fidelity already has a feature extractor named {name!r} that is not sparsediff's"
                )
            # A class from an earlier import of this module (importlib.reload): replace it.
            del FEATURE_EXTRACTORS_REGISTRY[name]
        register_feature_extractor(name, SparsediffFeatureExtractor)


register_extractors()


class FidInputDataset(Dataset):
    """uint8 images (N, C, H, W) as the dataset torch-fidelity expects: item i is a uint8 (C, H, W) tensor.

    ``channels=3`` repeats grayscale to RGB (Inception takes 3 channels); ``None`` keeps them as given.
    """

    def __init__(self, images: torch.Tensor, channels: int | None = None) -> None:
        self.images = images
        self.channels = channels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        x = self.images[i]  # (C, H, W)
        if self.channels == 3 and x.shape[0] == 1:
            x = x.expand(3, -1, -1)
        return x


# ----------------------------------------------------------------------------------------------------
# Checks on user input
# ----------------------------------------------------------------------------------------------------


def _check_images(x: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise DataError(f"{what} images must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != torch.uint8:
        raise DataError(
            f"{what} images must be uint8 in [0, 255], got {x.dtype}; from [-1, 1] floats use "
            "((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)"
        )
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise DataError(
            f"{what} images must have shape (N, C, H, W) with C in {{1, 3}}, got {tuple(x.shape)}"
        )
    if len(x) < 2:
        raise DataError(f"{what} images: FID needs at least 2 images (a covariance), got {len(x)}")
    return x.detach().cpu().contiguous()


def _check_inception_weights(path: Path) -> None:
    """Refuse anything but a plain state dict of the FID Inception, before torch-fidelity reads it.

    torch-fidelity loads the file with ``torch.load(weights_only=False)``, which would run arbitrary
    pickled code; loading it first with ``weights_only=True`` stops such a file here.
    """
    if not path.is_file():
        raise DataError(f"Inception weights file {path} not found; {INCEPTION_HELP}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any failure means "not a plain tensor state dict"; say why and stop
        raise DataError(
            f"{path} is not a plain PyTorch state dict (read with weights_only=True): {type(e).__name__}: {e}"
        ) from None
    expect = {"Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3), "fc.weight": (1008, 2048)}
    if not isinstance(state, Mapping) or any(
        not isinstance(state.get(k), torch.Tensor) or tuple(state[k].shape) != s for k, s in expect.items()
    ):
        raise StateError(
            f"{path} is not the FID Inception-v3 state dict (expected tensors "
            + ", ".join(f"{k} {s}" for k, s in expect.items())
            + f"); {INCEPTION_HELP}"
        )


def _cuda_index(device: str | torch.device) -> int | None:
    """None for the CPU, else the CUDA device index torch-fidelity should use."""
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"bad device {device!r}: {e}") from None
    if d.type == "cpu":
        return None
    if d.type != "cuda":
        raise ConfigError(f"torch-fidelity computes FID on 'cpu' or 'cuda' devices, not {d}")
    if not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but CUDA is not available")
    return d.index if d.index is not None else torch.cuda.current_device()


def _tensor_digest(x: torch.Tensor) -> str:
    h = hashlib.sha256(str(tuple(x.shape)).encode())
    h.update(x.numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------
# The one entry point
# ----------------------------------------------------------------------------------------------------


def compute_fid(
    generated: torch.Tensor,
    reference: torch.Tensor,
    extractor: str = "sparsediff-fmnist",
    weights_path: str | Path | None = None,
    batch_size: int = 200,
    device: str | torch.device = "cpu",
    cache_dir: str | Path | None = None,
    verbose: bool = False,
) -> dict:
    """Frechet distance between two image sets in the feature space of ``extractor``, via torch-fidelity.

    Args:
        generated: uint8 images (N, C, H, W), C in {1, 3}, values in [0, 255].
        reference: uint8 images (M, C', H', W'), same conventions; sizes and channels may differ from
            ``generated`` (each extractor resizes: FeatureNet to 32x32 gray, Inception to 299x299 RGB).
        extractor: a key of :data:`FEATURE_EXTRACTORS`.
        weights_path: for ``inception-v3-compat``, the standard Inception weights file (required; no
            download is attempted). For a sparsediff extractor, a FeatureNet ``.safetensors`` file that
            replaces the shipped asset (e.g. one made with ``train_feature_net(..., out=...)``).
        batch_size: images per forward pass.
        device: ``"cpu"`` or a CUDA device.
        cache_dir: when given, torch-fidelity caches the reference statistics there, keyed by the
            reference images' content and the weights' SHA-256 (the generated set is never cached).
        verbose: let torch-fidelity print its progress and logs (to stderr).

    Returns:
        ``{"metric", "value", "extractor", "num_generated", "num_reference", "weights", "weights_sha256"}``;
        ``weights`` is the asset name for shipped weights, else the path given. FID is biased upwards for
        small sets: compare values only at equal set sizes, and prefer thousands of images.
    """
    info = _info(extractor)
    gen = _check_images(generated, "generated")
    ref = _check_images(reference, "reference")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    cuda_index = _cuda_index(device)
    register_extractors()  # idempotent; covers a registry cleared or replaced since import

    if info.kind is None:  # Inception
        if weights_path is None:
            raise ConfigError(f"FID with {extractor!r} needs its weights: {INCEPTION_HELP}")
        weights = Path(weights_path)
        _check_inception_weights(weights)
        weights_label = str(weights)
        channels = 3
    else:
        weights = features.feature_net_file(info.kind, weights_path)  # DataError with the command if missing
        weights_label = weights.name if weights_path is None else str(weights)
        channels = None  # FeatureNet reads 1 or 3 channels itself
    weights_sha = features.sha256_file(weights)

    kwargs = dict(
        input1=FidInputDataset(gen, channels),
        input2=FidInputDataset(ref, channels),
        fid=True,
        feature_extractor=extractor,
        feature_extractor_weights_path=str(weights),
        batch_size=batch_size,
        cuda=cuda_index is not None,
        verbose=verbose,
        save_cpu_ram=True,  # DataLoader without worker processes: the images are already in memory
        cache=cache_dir is not None,
    )
    if cache_dir is not None:
        # torch-fidelity names cache files after the input and the extractor name only, so the name must
        # also carry the content of the reference set and of the weights to never serve stale statistics.
        kwargs["cache_root"] = str(cache_dir)
        kwargs["input2_cache_name"] = f"sparsediff-v1-ref{_tensor_digest(ref)[:16]}-w{weights_sha[:16]}"

    ctx = torch.cuda.device(cuda_index) if cuda_index is not None else contextlib.nullcontext()
    try:
        with ctx:
            metrics = torch_fidelity.calculate_metrics(**kwargs)
    except RuntimeError as e:
        if "Error(s) in loading state_dict" in str(e):  # strict load of a file with the wrong keys
            raise StateError(f"{weights} does not fit torch-fidelity's {extractor!r}: {e}") from None
        raise
    return {
        "metric": info.metric,
        "value": float(metrics[torch_fidelity.KEY_METRIC_FID]),
        "extractor": extractor,
        "num_generated": len(gen),
        "num_reference": len(ref),
        "weights": weights_label,
        "weights_sha256": weights_sha,
    }
