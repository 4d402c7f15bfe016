"""Compressed sparse rows: how the runtime stores a weight matrix, and the way back to dense."""

from __future__ import annotations

import torch
from torch import nn

from ..native import kernels

NO_BIAS = torch.empty(0, dtype=torch.float32)  # what the kernels take for "no bias" (never written to)


def to_csr(weight: torch.Tensor, base: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(row_ptr, cols, values)`` of the non-zeros of a 2-D ``weight``, row by row.

    ``row_ptr`` (int64, rows + 1) starts at ``base``, for matrices stored one after another.
    """
    active = weight != 0
    row_ptr = torch.full((weight.shape[0] + 1,), base, dtype=torch.int64)
    row_ptr[1:] += torch.cumsum(active.sum(1), 0)
    return row_ptr, active.nonzero()[:, 1].to(torch.int32), weight[active].contiguous()


def from_csr(row_ptr: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, columns: int) -> torch.Tensor:
    """The dense ``(rows, columns)`` matrix of :func:`to_csr`'s output (``row_ptr`` may start past 0)."""
    start, stop = int(row_ptr[0]), int(row_ptr[-1])
    dense = torch.zeros(row_ptr.numel() - 1, columns, dtype=values.dtype)
    rows = torch.repeat_interleave(torch.arange(row_ptr.numel() - 1), row_ptr[1:] - row_ptr[:-1])
    dense[rows, cols[start:stop].long()] = values[start:stop]
    return dense


class CompressedLayer(nn.Module):
    """A layer that computes on compressed weights and can rebuild its dense (masked) weight on demand."""

    def __init__(self) -> None:
        super().__init__()
        self._dense: torch.Tensor | None = None
        kernels()  # built or loaded now, not on the first forward (where torch.compile could not trace it)

    def rebuild_weight(self) -> torch.Tensor:
        """The dense (masked) weight in the original layer's shape."""
        raise NotImplementedError

    def forget(self) -> None:
        """Drop what was derived from the compressed weights (they were replaced: a state dict was loaded)."""
        self._dense = None

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self.forget()

    def dense_weight(self) -> torch.Tensor:
        """The dense (masked) weight, rebuilt on first use and cached (the fallback path uses it)."""
        if self._dense is None:
            self._dense = self.rebuild_weight()
        return self._dense

    @property
    def weight(self) -> torch.Tensor:
        """The dense (masked) weight, for code that reads a layer's ``weight`` (its dtype, device or
        values). The native forward pass does not use it."""
        return self.dense_weight()
