"""Saving and loading engine state with safetensors (masks as uint8 tensors, the rest as JSON metadata)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..errors import StateError

_PREFIX = "mask/"


def engine_state_to_tensors(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Split an engine ``state_dict()`` into safetensors tensors and string metadata."""
    tensors = {_PREFIX + n: m.to(torch.uint8).contiguous() for n, m in state["masks"].items()}
    meta = {k: v for k, v in state.items() if k != "masks"}
    return tensors, {"sparsediff_engine": json.dumps(meta)}


def engine_state_from_tensors(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None
) -> dict[str, Any]:
    if not metadata or "sparsediff_engine" not in metadata:
        raise StateError(
            "the file holds no sparsediff engine state (metadata key 'sparsediff_engine' missing)"
        )
    state = json.loads(metadata["sparsediff_engine"])
    state["masks"] = {k[len(_PREFIX) :]: v.bool() for k, v in tensors.items() if k.startswith(_PREFIX)}
    return state


def save_engine_state(engine, path: str | Path) -> None:
    from safetensors.torch import save_file

    tensors, meta = engine_state_to_tensors(engine.state_dict())
    save_file(tensors, str(path), metadata=meta)


def load_engine_state(engine, path: str | Path) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
            meta = f.metadata()
    except (OSError, ValueError) as e:
        raise StateError(f"cannot read engine state from {path}: {e}") from None
    engine.load_state_dict(engine_state_from_tensors(tensors, meta))
