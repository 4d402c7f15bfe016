"""Which weights have ever been active: RigL's in-time over-parameterisation, one bit per position.

A dynamic method (RigL, MagRan) keeps each layer at its budget while the topology moves, so over a run it
explores more of the dense weight than its density: the fraction of positions that were active at any
step is what Liu et al. (ICML 2021) call the in-time over-parameterisation rate, and it rises with every
update that grows weights never seen before. :class:`EverActive` keeps, per layer, the union of every
mask since the start as packed bits (``ceil(numel / 8)`` bytes on the CPU, 1/32 of a float32 dense weight:
what the compact backend's memory budget can afford) and counts its set bits. The unstructured engines
record the initial masks and each layer's mask after every topology update, save the bits with their
state and restore them on resume, so a resumed run reports exactly what a straight one does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from .codec import pack_bits

# set bits of each byte value 0..255
_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


def count_bits(bits: torch.Tensor) -> int:
    """Set bits of a packed uint8 tensor."""
    histogram = torch.bincount(bits.reshape(-1), minlength=256)  # (256,): no temporary of the bits' size
    return int((histogram * _POPCOUNT).sum())


class EverActive:
    """Per layer, the positions active at any recorded moment (see the module docstring)."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]]):
        self._numel = {n: int(torch.Size(s).numel()) for n, s in shapes.items()}
        self._bits: dict[str, torch.Tensor] = {}  # name -> uint8 (ceil(numel / 8),) on the CPU

    def record(self, name: str, mask: torch.Tensor) -> None:
        """Add the active positions of ``mask`` (bool or 0/1, the weight's shape) to layer ``name``."""
        bits = pack_bits(mask.bool())
        if name in self._bits:
            self._bits[name].bitwise_or_(bits)
        else:
            self._bits[name] = bits

    def count(self, name: str) -> int:
        """Positions of layer ``name`` that have ever been active."""
        return count_bits(self._bits[name])

    def counts(self) -> dict[str, int]:
        return {n: self.count(n) for n in self._bits}

    def state(self) -> dict[str, torch.Tensor]:
        """Layer name -> packed bits (copies), as :meth:`load` takes them."""
        return {n: b.clone() for n, b in self._bits.items()}

    def load(self, bits: Mapping[str, torch.Tensor], mask_of: Callable[[str], torch.Tensor]) -> None:
        """Restore saved bits; a layer the state has no bits for (a state saved before they were kept)
        starts again from its current mask, ``mask_of(name)`` (asked for one layer at a time). Bits of
        the wrong size are refused."""
        from ..errors import StateError

        self._bits = {}
        for name, numel in self._numel.items():
            saved = bits.get(name)
            if saved is None:
                self.record(name, mask_of(name))
                continue
            saved = saved.detach().to(device="cpu", dtype=torch.uint8).reshape(-1)
            if saved.numel() != (numel + 7) // 8:
                raise StateError(
                    f"engine state: the ever-active bits of {name!r} hold {saved.numel()} bytes, "
                    f"the layer needs {(numel + 7) // 8}"
                )
            self._bits[name] = saved.clone()
            self.record(name, mask_of(name))  # the current mask is active now, whatever was saved
