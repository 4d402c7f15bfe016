"""The export formats as one table, and :func:`load_export`, which reads any of them back.

``sparsediff export --format NAME`` looks ``NAME`` up in :data:`FORMATS` and runs what it finds: the
export function, the help text, what ``--out`` is and the summary line all come from the entry, so that
a new format is one module and one entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..checkpoint import MODEL_FILE
from ..errors import ConfigError, StateError
from ..run import RunDir
from . import diffusers_folder, masked_dense, semi_structured, sparse_file
from .common import default_device

if TYPE_CHECKING:
    from torch import nn

    from ..config import RunConfig

FILE = "a .safetensors file"
DIRECTORY = "a directory"
WEIGHTS_DTYPE = "weights dtype (default float32)"


@dataclass(frozen=True)
class ExportFormat:
    """One ``--format``: how it is written, described, summarised and read back."""

    name: str  # the --format value
    export: Callable[..., dict[str, Any]]  # (run_dir, out, [dtype, use_ema, ...]) -> what was exported
    help: str  # what it writes (sparsediff export --help)
    out: str  # what --out is: FILE or DIRECTORY
    dtype: str  # what --dtype means for it
    summary: Callable[[dict[str, Any]], str]  # the line printed without --json
    markers: tuple[str, ...]  # the format markers its files carry (any version)
    load: Callable[[Path], tuple[RunConfig, nn.Module, dict[str, Any]]]  # -> (cfg, CPU model, info)
    default_dtype: str | None = None  # --dtype when none is given (None: the weights' own)


FORMATS: dict[str, ExportFormat] = {
    f.name: f
    for f in (
        ExportFormat(
            name="masked-dense",
            export=masked_dense.export_masked_dense,
            help="the run's weights with the final masks folded in, one safetensors file (CPU)",
            out=FILE,
            dtype=WEIGHTS_DTYPE,
            summary=masked_dense.summary,
            markers=(masked_dense.MASKED_DENSE_FORMAT,),
            load=masked_dense.load_masked_dense,
        ),
        ExportFormat(
            name="semi-structured",
            export=semi_structured.export_semi_structured,
            help=(
                "2:4 Linear layers converted to torch's semi-structured sparse tensors on a CUDA GPU, checked "
                f"against the masked dense model; writes a directory ({MODEL_FILE}, plan.json, "
                f"verification.json, {RunDir.CONFIG})"
            ),
            out=DIRECTORY,
            dtype="fp16 (default) or bf16",
            summary=semi_structured.summary,
            markers=(semi_structured.SEMI_STRUCTURED_FORMAT,),
            load=semi_structured.load_semi_structured,
            default_dtype="fp16",
        ),
        ExportFormat(
            name="sparse",
            export=sparse_file.export_sparse,
            help=(
                "the masks and the weights inside them only (compressed, one safetensors file; loads with "
                "sparsediff.export.load_sparse_export)"
            ),
            out=FILE,
            dtype=WEIGHTS_DTYPE,
            summary=sparse_file.summary,
            markers=sparse_file.SPARSE_EXPORT_FORMATS,
            load=sparse_file.load_sparse_file,
        ),
        ExportFormat(
            name="diffusers",
            export=diffusers_folder.export_diffusers,
            help=(
                "a UNet run as a diffusers UNet2DModel folder (save_pretrained; loads with "
                "UNet2DModel.from_pretrained, no sparsediff needed), with sparsediff.json and the masks "
                "beside it"
            ),
            out=DIRECTORY,
            dtype=WEIGHTS_DTYPE,
            summary=diffusers_folder.summary,
            markers=(diffusers_folder.DIFFUSERS_FORMAT,),
            load=diffusers_folder.load_diffusers_folder,
        ),
    )
}
EXPORT_FORMATS = tuple(FORMATS)


def format_of(path: str | Path) -> ExportFormat:
    """The format of the export at ``path`` (a file or a directory), from its marker; only headers and
    ``sparsediff.json`` are read.

    Raises:
        StateError: ``path`` is no sparsediff export.
    """
    return _locate(Path(path))[0]


def _locate(path: Path) -> tuple[ExportFormat, Path]:
    """The format of the export at ``path`` and the path its loader reads (a directory's weights file)."""
    from ..sparse.codec import load_metadata

    if path.is_dir():
        if (path / MODEL_FILE).is_file():  # a semi-structured export
            path = path / MODEL_FILE
        elif diffusers_folder.is_diffusers_folder(path):
            return FORMATS["diffusers"], path
        else:
            raise StateError(
                f"{path} is not a sparsediff export (no {MODEL_FILE} or {diffusers_folder.INFO_FILE})"
            )
    elif not path.exists():
        raise StateError(f"{path} is not a sparsediff export (no such file or directory)")
    meta = load_metadata(path)
    marker = meta.get("format")
    if marker == sparse_file.LEGACY_SPARSE_EXPORT_FORMAT and not sparse_file.is_sparse_export(meta):
        marker = None  # the engine state's marker, without an export's metadata
    found = next((f for f in FORMATS.values() if marker in f.markers), None)
    if found is None:
        raise StateError(f"{path} is not a sparsediff export (metadata 'format' is {marker!r})")
    return found, path


def load_export(
    path: str | Path, device: str | None = None, convert: bool | None = None
) -> tuple[RunConfig, nn.Module, dict[str, Any]]:
    """``(cfg, model, info)`` from any export: a masked-dense or sparse file, a semi-structured or
    diffusers directory, as written by this version or an earlier one.

    ``model`` is the masked dense denoiser in the export dtype, in eval mode; ``info`` what the export
    says was exported (its metadata, or ``sparsediff.json``).

    Args:
        device: where to put the model (default: CUDA when available, else the CPU).
        convert: for a semi-structured export, convert its 2:4 Linears again (needs CUDA); by default
            when the device is a CUDA GPU. Without conversion the model is the masked dense one.

    Raises:
        StateError: ``path`` is no export, or is damaged.
        ConfigError: ``convert`` for an export that is not semi-structured.
    """
    import torch

    fmt, where = _locate(Path(path))
    cfg, model, info = fmt.load(where)
    dev = torch.device(default_device(device))
    model.to(dev).eval()
    if convert is None:
        convert = fmt is FORMATS["semi-structured"] and dev.type == "cuda"
    if convert:
        if fmt is not FORMATS["semi-structured"]:
            raise ConfigError(f"{path} is a {fmt.name} export; export it with --format semi-structured")
        semi_structured.convert(model, info)
    return cfg, model, info
