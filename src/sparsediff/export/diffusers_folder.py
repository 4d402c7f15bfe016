"""``--format diffusers``: a run's UNet as a standard diffusers model folder.

The denoiser of the latent-diffusion presets is a diffusers ``UNet2DModel`` (``models/unet.py``); this
saves it with ``save_pretrained``, the weights the run samples with (EMA by default) with the final
masks folded in, so that anyone loads it with diffusers alone::

    from diffusers import UNet2DModel
    unet = UNet2DModel.from_pretrained("unet-rigl90")      # no sparsediff needed

The folder::

    config.json, diffusion_pytorch_model.safetensors    diffusers' own files (save_pretrained)
    sparsediff.json                 what was exported: the run, checkpoint and weights, the sparse
                                    settings, parameter counts, the reload check, and the run's config
    sparsediff_masks.safetensors    static / RigL / MagRan runs: the final masks by UNet2DModel
                                    parameter name (uint8; an active weight can be exactly 0)

Before anything is reported, the folder is loaded back with ``UNet2DModel.from_pretrained`` and must give
the exported weights bit for bit and the same outputs as the run's model.

And back into sparse training: ``sparsify(unet, optimizer, method=..., sparsity=..., masks="weights")``
re-derives the masks from the zeros (the settings are in ``sparsediff.json``), ``masks=`` the mapping in
``sparsediff_masks.safetensors`` restores them exactly; ``sparsediff finetune --from DIR --preset P``
takes the folder as a diffusers source. :func:`load_diffusers_folder` (or
:func:`sparsediff.export.load_export`) reads it back as a sparsediff denoiser.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ConfigError, StateError
from ..run import load_model_and_masks
from .common import CONFIG_KEY, counts, dtype_name, parse_dtype

if TYPE_CHECKING:
    from ..config import RunConfig

DIFFUSERS_FORMAT = "sparsediff.diffusers/1"
INFO_FILE = "sparsediff.json"
MASKS_FILE = "sparsediff_masks.safetensors"
_PREFIX = "unet."  # UNetDenoiser keeps the UNet2DModel as .unet


def export_diffusers(
    run_dir: str | Path, out: str | Path, dtype: str | None = None, use_ema: bool = True, seed: int = 0
) -> dict[str, Any]:
    """Save the run's denoiser as a diffusers ``UNet2DModel`` folder ``out`` (see the module docstring).

    Args:
        dtype: ``fp32``, ``fp16`` or ``bf16`` (or ``float32``, ``float16``, ``bfloat16``); by default the
            weights' own (float32).
        use_ema: export the EMA weights (default) rather than the raw ones.
        seed: seeds the random inputs of the reload check.

    Returns:
        what ``sparsediff.json`` holds but the run's config, plus ``out``.

    Raises:
        ConfigError: the run's model is not a UNet2DModel (DiT, ChiroDiff: ``--format masked-dense``
            exports those), or ``out`` is a file.
        StateError: the folder does not load back to the same weights and outputs.
    """
    from diffusers import UNet2DModel

    from ..models.unet import UNetDenoiser

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; --format diffusers writes a directory")
    dt = parse_dtype(dtype)
    cfg, model, masks, info = load_model_and_masks(run_dir, use_ema)
    if not isinstance(model, UNetDenoiser):
        raise ConfigError(
            f"{run_dir}: --format diffusers saves diffusers UNet2DModel denoisers; this run's model is "
            f"{cfg.model.kind!r} ({type(model).__name__}); --format masked-dense exports any run"
        )
    unet = model.unet
    if dt is not None:
        unet.to(dt)
    # N:M masks follow from the weights; the masks of unstructured runs are saved beside them
    unet_masks = {} if cfg.sparse.structured else {n.removeprefix(_PREFIX): m for n, m in masks.items()}

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
        "dtype": dtype_name(next(unet.parameters()).dtype),
        **counts(model, masks),
        "masks": MASKS_FILE if unet_masks else None,
        "verification": verification,
    }
    stored = {**result, CONFIG_KEY: cfg.to_dict()}  # the run's config: load_diffusers_folder rebuilds it
    (out / INFO_FILE).write_text(json.dumps(stored, indent=2) + "\n")
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


def is_diffusers_folder(path: Path) -> bool:
    """Whether directory ``path`` holds a ``--format diffusers`` export."""
    return (path / INFO_FILE).is_file()


def load_diffusers_folder(path: str | Path) -> tuple[RunConfig, torch.nn.Module, dict[str, Any]]:
    """``(cfg, model, info)`` from a folder written by :func:`export_diffusers`: the sparsediff denoiser
    around the folder's ``UNet2DModel`` (in the export dtype, on the CPU) and what ``sparsediff.json``
    says was exported (without the config).

    A folder written before ``sparsediff.json`` held the run's config gives a config rebuilt from the
    folder alone: the model section from the UNet's ``config.json``, the sparse section from
    ``sparsediff.json``, every other section at its defaults (the run's diffusion schedule and sampler
    are not in such a folder); ``info["config_rebuilt"]`` is then True.

    Raises:
        StateError: ``sparsediff.json`` is missing or damaged, or the UNet does not load.
    """
    from diffusers import UNet2DModel

    from ..config import config_from_dict
    from ..models.unet import UNetDenoiser

    path = Path(path)
    try:
        info = json.loads((path / INFO_FILE).read_text())
        dtype = parse_dtype(info["dtype"])
    except (OSError, json.JSONDecodeError, ConfigError, KeyError, TypeError) as e:
        raise StateError(
            f"{path / INFO_FILE}: not a readable diffusers export ({type(e).__name__}: {e})"
        ) from None
    if not isinstance(info, dict) or info.get("format") != DIFFUSERS_FORMAT:
        raise StateError(
            f"{path} is not a sparsediff diffusers export ({INFO_FILE} format is not {DIFFUSERS_FORMAT!r})"
        )
    try:
        unet = UNet2DModel.from_pretrained(str(path), local_files_only=True, torch_dtype=dtype)
    except (OSError, ValueError, RuntimeError) as e:
        raise StateError(f"{path}: the UNet does not load ({type(e).__name__}: {e})") from None
    config = info.pop(CONFIG_KEY, None)
    if config is None:  # written before the folder kept the run's config
        args = json.loads(json.dumps({k: v for k, v in unet.config.items() if not k.startswith("_")}))
        config = {"model": {"kind": "unet2d", "args": args}, "sparse": info.get("sparse") or {}}
        info["config_rebuilt"] = True
    cfg = config_from_dict(config, source=f"{path / INFO_FILE}")
    return cfg, UNetDenoiser.from_unet(unet).eval(), info


def summary(info: dict[str, Any]) -> str:
    """The line ``sparsediff export --format diffusers`` prints."""
    return (
        f"diffusers {info['class']} folder ({info['dtype']}, {info['params_nonzero']:,} of "
        f"{info['params_total']:,} non-zero) written to {info['out']}; load it with "
        f"diffusers.{info['class']}.from_pretrained"
    )
