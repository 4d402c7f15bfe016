"""A run's sparse denoiser as one small file: ``sparsediff export --format sparse``.

The file is safetensors (``sparse/compress.py``): each masked weight is stored as its mask (a bitmask,
deflated when that is smaller, or indices) and the values inside it in the export dtype (their exponent
byte deflated); every other tensor dense. Its metadata holds the run's config (``config``, YAML) and what
was exported (``sparsediff_export``, JSON: format ``sparsediff.sparse/1``, run, checkpoint, dtype, the
number of masked layers, parameter counts).
At 90 % sparsity a float32 export is about 0.13x of the dense weights (benchmarks/README.md, "Bytes on
disk"); ``--dtype float16`` or ``bfloat16`` halves the values again.

:func:`load_sparse_export` rebuilds the masked dense model and its masks from the file alone: sample
with the model as it is, or hand both to :func:`sparsediff.sparse.runtime.to_sparse_inference` to run on
compressed weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checkpoint import load_state_checked, model_tensors
from .errors import ConfigError, StateError
from .run import load_model_and_masks

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .config import RunConfig

SPARSE_FORMAT = "sparsediff.sparse/1"
# --dtype names (the long ones; fp32/fp16/bf16 are accepted too)
SPARSE_DTYPES = {
    "float32": "float32",
    "float16": "float16",
    "bfloat16": "bfloat16",
    "fp32": "float32",
    "fp16": "float16",
    "bf16": "bfloat16",
}


def format_bytes(n: float | None) -> str:
    """``512 B``, ``37.8 kB``, ``1.62 MB``, ``3.10 GB`` (decimal units; ``n/a`` for None)."""
    if n is None:
        return "n/a"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.{1 if unit == 'kB' else 2}f} {unit}"
    return f"{n:.0f} B"


def _prepare(
    run_dir: str | Path, dtype: str | None, use_ema: bool, loaded: tuple | None = None
) -> tuple[RunConfig, nn.Module, dict[str, torch.Tensor], dict[str, Any]]:
    """The run's masked model in the export dtype, its masks, and what the export says about itself.

    ``loaded``: what :func:`~sparsediff.run.load_model_and_masks` returned for this run, to reuse it.
    """
    import torch

    name = SPARSE_DTYPES.get(dtype or "float32")
    if name is None:
        raise ConfigError(f"--dtype must be one of float32, float16, bfloat16, got {dtype!r}")
    cfg, model, masks, info = loaded if loaded is not None else load_model_and_masks(run_dir, use_ema)
    info = dict(info)
    model.to(getattr(torch, name))
    params = sum(p.numel() for p in model.parameters())
    masked = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    info.update(
        {
            "format": SPARSE_FORMAT,
            "method": cfg.sparse.method,
            "dtype": name,
            "masked_layers": len(masks),
            "params_total": params,
            "params_nonzero": params - masked + kept,
        }
    )
    return cfg, model, masks, info


def sparse_export_payload(
    cfg: RunConfig, model: nn.Module, masks: dict[str, torch.Tensor], info: dict[str, Any]
) -> dict[str, Any]:
    """The arguments of :func:`sparsediff.sparse.compress.save_compressed` (or ``serialized_nbytes``)
    that write ``model`` with its ``masks`` as a sparse export."""
    from .sparse.compress import Support

    tensors = model_tensors(model)
    supports = {n: Support(m, required=True) for n, m in masks.items() if n in tensors}
    metadata = {"format": SPARSE_FORMAT, "config": cfg.to_yaml(), "sparsediff_export": json.dumps(info)}
    return {"tensors": tensors, "metadata": metadata, "supports": supports, "deflate_exponents": True}


def export_sparse(
    run_dir: str | Path, out: str | Path, dtype: str | None = None, use_ema: bool = True
) -> dict[str, Any]:
    """Write the run's masked (EMA) weights, masks and config to the compressed safetensors file ``out``.

    Args:
        dtype: ``float32`` (default), ``float16`` or ``bfloat16`` (``fp32``/``fp16``/``bf16`` too).

    Returns:
        What was exported (also in the file's metadata), with ``out`` and ``bytes`` (its size) added.
    """
    from .sparse.compress import save_compressed

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
    from .sparse.compress import serialized_nbytes

    return serialized_nbytes(**sparse_export_payload(*_prepare(run_dir, dtype, use_ema, loaded)))


def load_sparse_export(
    path: str | Path, device: str | None = None
) -> tuple[RunConfig, nn.Module, dict[str, torch.Tensor]]:
    """``(cfg, model, masks)`` from a file written by :func:`export_sparse`.

    ``model`` is the masked dense denoiser in the export dtype, in eval mode, on ``device`` (default: the
    CPU); ``masks``: parameter name -> bool mask (True = kept), on the CPU, exactly the masks exported
    (a kept weight that is exactly zero stays in its mask).

    Raises:
        StateError: the file is not a sparse export, is truncated or corrupted, or its tensors do not
            fit the model its config describes (the message names the file and the tensor).
    """
    import torch
    import yaml

    from .config import config_from_dict
    from .models import build_model
    from .sparse.decompress import load_with_supports

    path = Path(path)
    if path.is_dir():
        raise StateError(f"{path} is a directory; a sparse export is one .safetensors file")
    tensors, supports, meta = load_with_supports(path)
    if meta.get("format") != SPARSE_FORMAT or "config" not in meta or "sparsediff_export" not in meta:
        raise StateError(
            f"{path} is not a sparse export (metadata 'format' is {meta.get('format')!r}, expected "
            f"{SPARSE_FORMAT!r}); write one with sparsediff export --format sparse"
        )
    try:
        cfg = config_from_dict(yaml.safe_load(meta["config"]), source=f"{path} (metadata)")
        info = json.loads(meta["sparsediff_export"])
        dtype = getattr(torch, SPARSE_DTYPES[info["dtype"]])
        layers = int(info["masked_layers"])
    except (yaml.YAMLError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise StateError(f"{path}: its export metadata is damaged ({type(e).__name__}: {e})") from None
    if len(supports) != layers:
        raise StateError(f"{path}: {layers} masked layers exported but {len(supports)} masks stored")
    model = build_model(cfg.model).to(dtype)
    load_state_checked(model, tensors, path)
    masks = {n: m.clone() for n, m in supports.items()}
    model.to(torch.device(device or "cpu")).eval()
    return cfg, model, masks
