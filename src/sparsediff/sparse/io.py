"""Saving and loading engine state with safetensors (masks as uint8 tensors, the rest as JSON metadata).

The files are written compressed (``codec/``: each mask as a bitmask, deflated when smaller); both
compressed and plain files load."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..errors import StateError
from .base import Engine
from .codec import load_compressed, save_compressed

# The tensors of an engine state file: MASK_PREFIX + layer name -> uint8 0/1 mask; EVER_ACTIVE_PREFIX +
# layer name -> the positions ever active, packed bits (dynamic methods, sparse/ever_active.py).
MASK_PREFIX = "mask/"
EVER_ACTIVE_PREFIX = "ever_active/"
_PREFIX = MASK_PREFIX


def engine_state_to_tensors(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Split an engine ``state_dict()`` into safetensors tensors (its ``masks``, when it stores any) and
    string metadata (everything else, as JSON)."""
    tensors = {_PREFIX + n: m.to(torch.uint8).contiguous() for n, m in state.get("masks", {}).items()}
    for n, bits in state.get("ever_active", {}).items():
        tensors[EVER_ACTIVE_PREFIX + n] = bits.to(torch.uint8).contiguous()
    meta = {k: v for k, v in state.items() if k not in ("masks", "ever_active")}
    return tensors, {"sparsediff_engine": json.dumps(meta)}


def engine_state_from_tensors(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None
) -> dict[str, Any]:
    """The engine ``state_dict()`` that :func:`engine_state_to_tensors` split."""
    if not metadata or "sparsediff_engine" not in metadata:
        raise StateError(
            "the file holds no sparsediff engine state (metadata key 'sparsediff_engine' missing)"
        )
    state = json.loads(metadata["sparsediff_engine"])
    masks = {k[len(_PREFIX) :]: v.bool() for k, v in tensors.items() if k.startswith(_PREFIX)}
    if masks:  # an N:M engine stores none: its masks follow from the weights
        state["masks"] = masks
    ever = {k[len(EVER_ACTIVE_PREFIX) :]: v for k, v in tensors.items() if k.startswith(EVER_ACTIVE_PREFIX)}
    if ever:
        state["ever_active"] = ever
    return state


def save_engine_state(engine: Engine, path: str | Path) -> None:
    """Write ``engine.state_dict()`` to a safetensors file."""
    tensors, meta = engine_state_to_tensors(engine.state_dict())
    save_compressed(path, tensors, meta)


def load_engine_state(engine: Engine, path: str | Path) -> None:
    """Restore ``engine`` from a file written by :func:`save_engine_state`."""
    tensors, meta = load_compressed(path)  # a StateError naming the file when it cannot be read
    engine.load_state_dict(engine_state_from_tensors(tensors, meta))
