"""What every export format shares: the dtype names, the counts written into metadata, the metadata itself.

Dtypes: ``--dtype`` takes the short names ``fp32``, ``fp16``, ``bf16`` and torch's own ``float32``,
``float16``, ``bfloat16`` for every format; an export records torch's name (``"float16"``).

Counts: every format writes ``params_total`` and ``params_nonzero`` as
:func:`sparsediff.sparse.counts.parameter_counts` defines them (the positions the masks keep plus every
entry of the other parameters), so that the same run reports the same numbers whatever the format.

Metadata: the safetensors formats keep the run's config (``config``, YAML) and what was exported
(``sparsediff_export``, JSON) next to a ``format`` marker; :func:`read_metadata` reads them back.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, StateError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..config import RunConfig

# --dtype name -> torch's name of that dtype
DTYPES = {
    "fp32": "float32",
    "fp16": "float16",
    "bf16": "bfloat16",
    "float32": "float32",
    "float16": "float16",
    "bfloat16": "bfloat16",
}
CONFIG_KEY = "config"  # metadata: the run's config, YAML
INFO_KEY = "sparsediff_export"  # metadata: what was exported, JSON


def parse_dtype(
    name: str | None, allowed: Collection[str] | None = None, who: str = ""
) -> torch.dtype | None:
    """The torch dtype ``name`` stands for (any spelling of :data:`DTYPES`); None for None.

    Args:
        allowed: torch names (``"float16"``) the caller takes; by default every dtype of :data:`DTYPES`.
        who: what takes only ``allowed`` (``"semi-structured export"``), for the error.

    Raises:
        ConfigError: ``name`` is not one of the dtypes taken.
    """
    import torch

    if name is None and allowed is None:
        return None
    canonical = DTYPES.get(name) if isinstance(name, str) else None
    if allowed is not None and canonical not in allowed:
        short = [k for k, v in DTYPES.items() if v in allowed and not k.startswith(("float", "bfloat"))]
        raise ConfigError(f"{who} needs --dtype {' or '.join(short)}, got {name!r}")
    if canonical is None:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return getattr(torch, canonical)


def dtype_name(dtype: torch.dtype) -> str:
    """torch's name of ``dtype`` without the module: ``"float32"``."""
    return str(dtype).removeprefix("torch.")


def counts(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """``params_total`` and ``params_nonzero`` of ``model`` under ``masks``, as every export writes them."""
    from ..sparse.counts import parameter_counts

    c = parameter_counts(model, masks)
    return {"params_total": c.total, "params_nonzero": c.nonzero}


def metadata(cfg: RunConfig, info: Mapping[str, Any]) -> dict[str, str]:
    """The safetensors metadata of an export: its format marker, the run's config, what was exported."""
    return {"format": info["format"], CONFIG_KEY: cfg.to_yaml(), INFO_KEY: json.dumps(dict(info))}


def read_metadata(meta: Mapping[str, str], source: str | Path) -> tuple[RunConfig, dict[str, Any]]:
    """``(cfg, info)`` from an export's metadata (see :func:`metadata`).

    Raises:
        StateError: a key is missing or does not parse (the message names ``source``).
    """
    import yaml

    from ..config import config_from_dict

    try:
        cfg = config_from_dict(yaml.safe_load(meta[CONFIG_KEY]), source=f"{source} (metadata)")
        info = json.loads(meta[INFO_KEY])
    except (yaml.YAMLError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise StateError(f"{source}: its export metadata is damaged ({type(e).__name__}: {e})") from None
    if not isinstance(info, dict):
        raise StateError(f"{source}: its export metadata is damaged ({INFO_KEY} is not a JSON object)")
    return cfg, info


def default_device(device: str | None) -> str:
    """``device``, or CUDA when it is available, else the CPU."""
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def format_bytes(n: float | None) -> str:
    """``512 B``, ``37.8 kB``, ``1.62 MB``, ``3.10 GB`` (decimal units; ``n/a`` for None)."""
    if n is None:
        return "n/a"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.{1 if unit == 'kB' else 2}f} {unit}"
    return f"{n:.0f} B"
