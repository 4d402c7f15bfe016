"""A run's UNet as a standard diffusers model folder (``sparsediff export --format diffusers``).

The denoiser of the latent-diffusion presets is a diffusers ``UNet2DModel`` (``models/unet.py``); this
saves it with ``save_pretrained``, the weights the run samples with (EMA by default) with the final
masks folded in, so that anyone loads it with diffusers alone::

    from diffusers import UNet2DModel
    unet = UNet2DModel.from_pretrained("unet-rigl90")      # no sparsediff needed

The folder::

    config.json, diffusion_pytorch_model.safetensors    diffusers' own files (save_pretrained)
    sparsediff.json                 what was exported: the run, checkpoint and weights, the sparse
                                    settings, non-zero counts, the reload check
    sparsediff_masks.safetensors    static / RigL / MagRan runs: the final masks by UNet2DModel
                                    parameter name (uint8; an active weight can be exactly 0)

Before anything is reported, the folder is loaded back with ``UNet2DModel.from_pretrained`` and must give
the exported weights bit for bit and the same outputs as the run's model.

And back into sparse training: ``sparsify(unet, optimizer, method=..., sparsity=..., masks="weights")``
re-derives the masks from the zeros (the settings are in ``sparsediff.json``), ``masks=`` the mapping in
``sparsediff_masks.safetensors`` restores them exactly; ``sparsediff finetune --from DIR --preset P``
takes the folder as a diffusers source.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError, StateError
from .export import DTYPES
from .run import load_model_and_masks

DIFFUSERS_FORMAT = "sparsediff.diffusers/1"
INFO_FILE = "sparsediff.json"
MASKS_FILE = "sparsediff_masks.safetensors"
_PREFIX = "unet."  # UNetDenoiser keeps the UNet2DModel as .unet


def export_diffusers(
    run_dir: str | Path, out: str | Path, dtype: str | None = None, use_ema: bool = True, seed: int = 0
) -> dict[str, Any]:
    """Save the run's denoiser as a diffusers ``UNet2DModel`` folder ``out`` (see the module docstring).

    Args:
        dtype: ``fp32``, ``fp16`` or ``bf16``; by default the weights' own (float32).
        use_ema: export the EMA weights (default) rather than the raw ones.
        seed: seeds the random inputs of the reload check.

    Returns:
        what ``sparsediff.json`` holds, plus ``out``.

    Raises:
        ConfigError: the run's model is not a UNet2DModel (DiT, ChiroDiff: ``--format masked-dense``
            exports those), or ``out`` is a file.
        StateError: the folder does not load back to the same weights and outputs.
    """
    from diffusers import UNet2DModel

    from .models.unet import UNetDenoiser

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; --format diffusers writes a directory")
    cfg, model, masks, info = load_model_and_masks(run_dir, use_ema)
    if not isinstance(model, UNetDenoiser):
        raise ConfigError(
            f"{run_dir}: --format diffusers saves diffusers UNet2DModel denoisers; this run's model is "
            f"{cfg.model.kind!r} ({type(model).__name__}); --format masked-dense exports any run"
        )
    unet = model.unet
    if dtype is not None:
        if dtype not in DTYPES:
            raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        unet.to(getattr(torch, DTYPES[dtype]))
    total = sum(p.numel() for p in unet.parameters())
    zeros = sum(int(p.numel() - p.count_nonzero()) for p in unet.parameters())
    unstructured = cfg.sparse.method != "dense" and not cfg.sparse.structured
    unet_masks = {n.removeprefix(_PREFIX): m for n, m in masks.items()} if unstructured else {}

    out.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(str(out), safe_serialization=True)
    verification = _check_reload(unet, out, UNet2DModel, seed)
    if not verification["passed"]:
        raise StateError(
            f"{out} does not load back as the exported model ({json.dumps(verification)}); do not use it"
        )
    if unet_masks:
        from safetensors.torch import save_file

        tensors = {n: m.to(torch.uint8).contiguous() for n, m in unet_masks.items()}
        save_file(tensors, str(out / MASKS_FILE), metadata={"format": "sparsediff.masks/1"})
    elif (out / MASKS_FILE).exists():
        (out / MASKS_FILE).unlink()  # left by an earlier export into the same folder
    result = {
        "format": DIFFUSERS_FORMAT,
        "class": type(unet).__name__,
        **info,
        "method": cfg.sparse.method,
        "sparse": cfg.sparse.to_dict(),
        "dtype": str(next(unet.parameters()).dtype).replace("torch.", ""),
        "params_total": total,
        "params_nonzero": total - zeros,
        "masks": MASKS_FILE if unet_masks else None,
        "verification": verification,
    }
    (out / INFO_FILE).write_text(json.dumps(result, indent=2) + "\n")
    return {**result, "out": str(out)}


@torch.no_grad()
def _check_reload(unet: torch.nn.Module, out: Path, cls: Any, seed: int) -> dict[str, Any]:
    """Load ``out`` with ``cls.from_pretrained``: same weights bit for bit, same outputs (in float32)."""
    dtype = next(unet.parameters()).dtype
    reloaded = cls.from_pretrained(str(out), local_files_only=True, torch_dtype=dtype).eval()
    mine, theirs = unet.state_dict(), reloaded.state_dict()
    same_weights = mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    a, b = copy.deepcopy(unet).float().eval(), reloaded.float()
    size = a.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, a.config.in_channels, *size, generator=gen)
    t = torch.tensor([10, 500])
    diff = (a(x, t).sample - b(x, t).sample).abs().max().item()
    return {"passed": bool(same_weights and diff == 0.0), "same_weights": same_weights, "max_abs_diff": diff}
