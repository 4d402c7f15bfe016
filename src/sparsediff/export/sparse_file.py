"""``--format sparse``: a run's sparse denoiser as one small file.

The file is safetensors written with the sparse tensor codec (``sparse/codec/``): each masked weight is
stored as its mask (a bitmask, deflated when that is smaller, or indices) and the values inside it in the
export dtype (their exponent byte deflated); every other tensor dense. Its metadata holds the run's
config (``config``, YAML) and what was exported (``sparsediff_export``, JSON: run, checkpoint, dtype, the
number of masked layers, parameter counts) under the format marker ``sparsediff.sparse-export/1``.
Files written before that marker existed carry ``sparsediff.sparse/1`` (which is also the engine state's
marker) and load the same.

At 90 % sparsity a float32 export is about 0.13x of the dense weights (benchmarks/README.md, "Bytes on
disk"); ``--dtype float16`` or ``bfloat16`` halves the values again.

:func:`load_sparse_export` rebuilds the masked dense model and its masks from the file alone: sample
with the model as it is, or hand both to :func:`sparsediff.sparse.runtime.to_sparse_inference` to run on
compressed weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..checkpoint import load_state_checked, model_tensors
from ..errors import ConfigError, StateError
from ..run import load_model_and_masks
from .common import CONFIG_KEY, INFO_KEY, counts, dtype_name, metadata, parse_dtype, read_metadata

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..config import RunConfig

SPARSE_EXPORT_FORMAT = "sparsediff.sparse-export/1"
# The marker sparse exports carried before they had their own; such a file is told apart from an engine
# state file (same marker) by its export metadata.
LEGACY_SPARSE_EXPORT_FORMAT = "sparsediff.sparse/1"
SPARSE_EXPORT_FORMATS = (SPARSE_EXPORT_FORMAT, LEGACY_SPARSE_EXPORT_FORMAT)


def is_sparse_export(meta: dict[str, str]) -> bool:
    """Whether safetensors metadata ``meta`` is a sparse export's (either marker)."""
    return meta.get("format") in SPARSE_EXPORT_FORMATS and CONFIG_KEY in meta and INFO_KEY in meta


def _prepare(
    run_dir: str | Path, dtype: str | None, use_ema: bool, loaded: tuple | None = None
) -> tuple[RunConfig, nn.Module, dict[str, torch.Tensor], dict[str, Any]]:
    """The run's masked model in the export dtype, its masks, and what the export says about itself.

    ``loaded``: what :func:`~sparsediff.run.load_model_and_masks` returned for this run, to reuse it.
    """
    dt = parse_dtype(dtype or "float32")
    cfg, model, masks, info = loaded if loaded is not None else load_model_and_masks(run_dir, use_ema)
    info = dict(info)
    model.to(dt)
    info.update(
        {
            "format": SPARSE_EXPORT_FORMAT,
            "method": cfg.sparse.method,
            "dtype": dtype_name(dt),
            "masked_layers": len(masks),
            **counts(model, masks),
        }
    )
    return cfg, model, masks, info


def sparse_export_payload(
    cfg: RunConfig, model: nn.Module, masks: dict[str, torch.Tensor], info: dict[str, Any]
) -> dict[str, Any]:
    """The arguments of :func:`sparsediff.sparse.codec.save_compressed` (or ``serialized_nbytes``)
    that write ``model`` with its ``masks`` as a sparse export."""
    from ..sparse.codec import Support

    tensors = model_tensors(model)
    supports = {n: Support(m, required=True) for n, m in masks.items() if n in tensors}
    meta = {**metadata(cfg, info), "format": SPARSE_EXPORT_FORMAT}  # whatever info says (inspect's sizes)
    return {"tensors": tensors, "metadata": meta, "supports": supports, "deflate_exponents": True}


def export_sparse(
    run_dir: str | Path, out: str | Path, dtype: str | None = None, use_ema: bool = True
) -> dict[str, Any]:
    """Write the run's masked (EMA) weights, masks and config to the compressed safetensors file ``out``.

    Args:
        dtype: ``float32`` (default), ``float16`` or ``bfloat16`` (``fp32``/``fp16``/``bf16`` too).

    Returns:
        What was exported (also in the file's metadata), with ``out`` and ``bytes`` (its size) added.
    """
    from ..sparse.codec import save_compressed

    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"--out {out} is a directory; the sparse export is one .safetensors file")
    cfg, model, masks, info = _prepare(run_dir, dtype, use_ema)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    save_compressed(tmp, **sparse_export_payload(cfg, model, masks, info))
    tmp.replace(out)  # a reader never sees half a file
    return {**info, "out": str(out), "bytes": out.stat().st_size}


def sparse_export_nbytes(
    run_dir: str | Path, dtype: str | None = None, use_ema: bool = True, loaded: tuple | None = None
) -> int:
    """The exact size in bytes of the file ``export_sparse(run_dir, ..., dtype, use_ema)`` would write.

    ``loaded``: the run's ``load_model_and_masks(run_dir, use_ema)``, when the caller has it already (the
    model is cast to ``dtype`` in place).
    """
    from ..sparse.codec import serialized_nbytes

    return serialized_nbytes(**sparse_export_payload(*_prepare(run_dir, dtype, use_ema, loaded)))


def load_sparse_export(
    path: str | Path, device: str | None = None
) -> tuple[RunConfig, nn.Module, dict[str, torch.Tensor]]:
    """``(cfg, model, masks)`` from a file written by :func:`export_sparse` (either format marker).

    ``model`` is the masked dense denoiser in the export dtype, in eval mode, on ``device`` (default: the
    CPU); ``masks``: parameter name -> bool mask (True = kept), on the CPU, exactly the masks exported
    (a kept weight that is exactly zero stays in its mask).

    Raises:
        StateError: the file is not a sparse export, is truncated or corrupted, or its tensors do not
            fit the model its config describes (the message names the file and the tensor).
    """
    return _load(Path(path), device)[:3]


def load_sparse_file(path: str | Path) -> tuple[RunConfig, nn.Module, dict[str, Any]]:
    """``(cfg, model, info)`` from a sparse export: the model as :func:`load_sparse_export` gives it (on
    the CPU) and what the file says was exported."""
    cfg, model, _, info = _load(Path(path), None)
    return cfg, model, info


def _load(
    path: Path, device: str | None
) -> tuple[RunConfig, nn.Module, dict[str, torch.Tensor], dict[str, Any]]:
    import torch

    from ..models import build_model
    from ..sparse.codec import load_with_supports

    if path.is_dir():
        raise StateError(f"{path} is a directory; a sparse export is one .safetensors file")
    tensors, supports, meta = load_with_supports(path)
    if not is_sparse_export(meta):
        raise StateError(
            f"{path} is not a sparse export (metadata 'format' is {meta.get('format')!r}, expected "
            f"{SPARSE_EXPORT_FORMAT!r}); write one with sparsediff export --format sparse"
        )
    cfg, info = read_metadata(meta, path)
    try:
        dtype = parse_dtype(info["dtype"])
        layers = int(info["masked_layers"])
    except (ConfigError, KeyError, TypeError, ValueError) as e:
        raise StateError(f"{path}: its export metadata is damaged ({type(e).__name__}: {e})") from None
    if len(supports) != layers:
        raise StateError(f"{path}: {layers} masked layers exported but {len(supports)} masks stored")
    model = build_model(cfg.model).to(dtype)
    load_state_checked(model, tensors, path)
    masks = {n: m.clone() for n, m in supports.items()}
    model.to(torch.device(device or "cpu")).eval()
    return cfg, model, masks, info


def summary(info: dict[str, Any]) -> str:
    """The line ``sparsediff export --format sparse`` prints."""
    return (
        f"sparse weights ({info['dtype']}, {info['masked_layers']} masked layers, "
        f"{info['params_nonzero']:,} of {info['params_total']:,} non-zero) written to {info['out']} "
        f"({info['bytes']:,} bytes)"
    )
