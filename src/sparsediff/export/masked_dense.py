"""``--format masked-dense``: the run's weights with the final masks folded in, as one safetensors file.

Any run, on the CPU: the weights the run samples with (EMA by default), every weight outside its mask
exactly +0.0, in the export dtype. The file is readable by any safetensors reader; its metadata holds
the run's config and what was exported (``common.py``), from which :func:`load_masked_dense` (or
:func:`sparsediff.export.load_export`) rebuilds the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..checkpoint import load_state_checked, load_tensors, model_tensors, save_tensors
from ..errors import StateError
from ..run import load_model_and_masks
from .common import counts, dtype_name, metadata, parse_dtype, read_metadata

if TYPE_CHECKING:
    from torch import nn

    from ..config import RunConfig

MASKED_DENSE_FORMAT = "sparsediff.masked-dense/1"


def nm_info(cfg: RunConfig, model: nn.Module) -> dict[str, Any]:
    """``{"pattern": "2:4"}`` for an N:M run whose masked weights hold its final pattern, ``{}`` for
    any other run.

    Raises:
        RuntimeError: an N:M run's masked weights break its pattern (the masks made every maskable layer
            N:M: this is a bug, not a user error).
    """
    from ..sparse.nm import nm_violations, parse_nm

    s = cfg.sparse
    pattern = s.final_nm_pattern()
    if pattern is None:
        return {}
    nm = parse_nm(pattern)
    bad = nm_violations(model, nm.n, nm.m, s.include or None, s.exclude or None)
    if bad:
        raise RuntimeError(f"masked weights are not {pattern}: {bad}")
    return {"pattern": pattern}


def export_masked_dense(
    run_dir: str | Path, out: str | Path, dtype: str | None = None, use_ema: bool = True
) -> dict[str, Any]:
    """Write the run's masked weights (masks folded in) to the safetensors file ``out``.

    Args:
        dtype: ``fp32``, ``fp16`` or ``bf16`` (or ``float32``, ``float16``, ``bfloat16``); by default the
            weights' own (float32).

    Returns:
        What was exported (also in the file's metadata), with ``out`` added.
    """
    dt = parse_dtype(dtype)
    cfg, model, masks, info = load_model_and_masks(run_dir, use_ema)
    if dt is not None:
        model.to(dt)
    info.update(counts(model, masks))
    info.update(nm_info(cfg, model))
    info.update(
        {
            "format": MASKED_DENSE_FORMAT,
            "method": cfg.sparse.method,
            "dtype": dtype_name(next(model.parameters()).dtype),
        }
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_tensors(out, model_tensors(model), metadata(cfg, info))
    info["out"] = str(out)
    return info


def load_masked_dense(
    path: str | Path, markers: tuple[str, ...] = (MASKED_DENSE_FORMAT,)
) -> tuple[RunConfig, nn.Module, dict[str, Any]]:
    """``(cfg, model, info)`` from a masked-dense file: the model in the export dtype, on the CPU.

    ``markers``: the formats the file may carry (a semi-structured export's weights file is read so too).

    Raises:
        StateError: the file is not such an export, is damaged, or does not fit its config's model.
    """
    import torch

    from ..models import build_model

    file = Path(path)
    tensors, meta = load_tensors(file)
    if meta.get("format") not in markers:
        raise StateError(f"{file} is not a sparsediff export (metadata 'format' is {meta.get('format')!r})")
    cfg, info = read_metadata(meta, file)
    dtype = getattr(torch, str(info.get("dtype")), None)
    if not isinstance(dtype, torch.dtype):
        raise StateError(f"{file}: its export metadata names no dtype ({info.get('dtype')!r})")
    model = build_model(cfg.model).to(dtype)
    load_state_checked(model, tensors, file)
    return cfg, model, info


def summary(info: dict[str, Any]) -> str:
    """The line ``sparsediff export --format masked-dense`` prints."""
    return (
        f"masked dense weights ({info['dtype']}, {info['params_nonzero']:,} of {info['params_total']:,} "
        f"non-zero) written to {info['out']}"
    )
