"""Trainable compact weights: a sparse weight held as its non-zeros only, for sparse training.

``sparsify(..., backend="sparse")`` replaces each sparsified layer by a compact one (``compact_linear.py``,
``compact_conv.py``, ``compact_gru.py``, or the generic ``scattered.py``). There a sparse weight is

- ``values``: an ``nn.Parameter`` of exactly the layer's budget of entries, which the optimiser trains.
  Its size never changes (a topology update moves as many weights in as out), so the state of any
  ``torch.optim`` optimiser stays valid across updates;
- ``row_ptr`` / ``cols``: where the values sit, as compressed sparse rows (buffers, in the state dict);

and the dense weight is gone. A weight is seen as a 2-D matrix (a linear's ``(out, in)``, a convolution's
``(out, in * kh * kw)``, a GRU's ``(3 hidden, in)``), optionally cut into column panels (a linear's
input features, so that a panel of the packed input stays in the L1 cache): panel after panel, row by row
within a panel, columns ascending. That *value order* is the kernels' traversal order, and the same as
the inference layers' (:class:`~sparsediff.sparse.runtime.matrix.CompressedMatrix`).

:class:`CompactWeight` knows one such weight on its module (the names of its parameter and buffers); it
builds the layout from a mask, gives the flat positions of the values, scatters them into a dense weight
(the dense path and readers of ``.weight``), and moves the topology (:meth:`CompactWeight.reindex`).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .linear import panel_width
from .matrix import CompressedMatrix

__all__ = [
    "CompactLayer",
    "CompactWeight",
    "flat_positions",
    "hand_to_capture",
    "layout_from_mask",
    "panel_width",
    "permute_",
]


def layout_from_mask(
    mask: torch.Tensor, panel: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(row_ptr, cols, flat)`` of the kept positions of a 2-D bool ``mask``, in value order.

    ``row_ptr`` is ``(rows + 1,)`` without panels, ``(panels, rows + 1)`` with them (continuing from panel
    to panel); ``cols`` (int32) are relative to their panel; ``flat`` (int64) are the positions in the
    flattened dense weight.
    """
    rows, columns = mask.shape
    mask = mask.to(device="cpu", dtype=torch.bool)
    if panel is None:
        nz = mask.nonzero()
        row_ptr = torch.zeros(rows + 1, dtype=torch.int64)
        row_ptr[1:] = torch.cumsum(mask.sum(1), 0)
        return row_ptr, nz[:, 1].to(torch.int32), nz[:, 0] * columns + nz[:, 1]
    panels = max(1, -(-columns // panel))
    ptrs, cols, flats, base = [], [], [], 0
    for p in range(panels):
        part = mask[:, p * panel : (p + 1) * panel]
        nz = part.nonzero()
        ptr = torch.full((rows + 1,), base, dtype=torch.int64)
        ptr[1:] += torch.cumsum(part.sum(1), 0)
        base = int(ptr[-1])
        ptrs.append(ptr)
        cols.append(nz[:, 1].to(torch.int32))
        flats.append(nz[:, 0] * columns + p * panel + nz[:, 1])
    return torch.stack(ptrs), torch.cat(cols), torch.cat(flats)


def flat_positions(
    row_ptr: torch.Tensor, cols: torch.Tensor, columns: int, panel: int | None
) -> torch.Tensor:
    """The flat dense positions (int64) of a layout's values, in value order (the inverse of
    :func:`layout_from_mask`)."""
    ptrs = row_ptr.reshape(-1, row_ptr.shape[-1])
    rows = ptrs.shape[1] - 1
    out = []
    for p, ptr in enumerate(ptrs):
        counts = ptr[1:] - ptr[:-1]
        row_of = torch.repeat_interleave(torch.arange(rows), counts)
        start, stop = int(ptr[0]), int(ptr[-1])
        offset = 0 if panel is None else p * panel
        out.append(row_of * columns + offset + cols[start:stop].long())
    return torch.cat(out) if out else torch.empty(0, dtype=torch.int64)


def _keeps_flat(module: nn.Module) -> bool:
    """Whether ``module`` keeps its weights' flat positions: in the dense mode (every call scatters), and
    while the engine works on its topology (``pin_positions``: a RigL capture, an update)."""
    return getattr(module, "kernel_mode", None) != "sparse" or module.__dict__.get("_pinned", False)


def pin_positions(module: nn.Module, pinned: bool) -> None:
    """Keep (or stop keeping) ``module``'s flat positions between calls; unpinning a layer on the sparse
    kernels drops them."""
    module.__dict__["_pinned"] = pinned
    if not pinned and getattr(module, "kernel_mode", None) == "sparse":
        for cw in getattr(module, "compact_weights", {}).values():
            cw.drop_flat(module)


def _compact_index(index: torch.Tensor, numel: int) -> torch.Tensor:
    return index.to(torch.int32) if numel < 2**31 else index.to(torch.int64)


@dataclass
class CompactWeight:
    """One compact weight of a module: its names there and its dense geometry.

    The module registers ``values`` (the Parameter) and ``row_ptr`` / ``cols`` (buffers) under
    :attr:`values_name`, :attr:`row_ptr_name`, :attr:`cols_name`; :attr:`name` is the dense parameter the
    weight stands for (``"weight"``, ``"weight_hh_l0"``), the name the engine and the masks use.
    """

    name: str
    values_name: str
    row_ptr_name: str
    cols_name: str
    shape: tuple[int, ...]  # the dense weight's shape
    rows: int
    columns: int
    panel: int | None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    # ------------------------------------------------------------------ building

    @classmethod
    def create(
        cls,
        module: nn.Module,
        name: str,
        weight: torch.Tensor,
        mask: torch.Tensor,
        rows: int,
        panel: int | None,
        suffix: str = "",
    ) -> CompactWeight:
        """Register on ``module`` the compact form of ``weight`` (its dense values at ``mask``'s kept
        positions, the parameter ``values{suffix}``, buffers ``row_ptr{suffix}``, ``cols{suffix}``)."""
        shape = tuple(weight.shape)
        columns = math.prod(shape) // max(rows, 1)
        cw = cls(name, f"values{suffix}", f"row_ptr{suffix}", f"cols{suffix}", shape, rows, columns, panel)
        row_ptr, cols, flat = layout_from_mask(mask.reshape(rows, columns), panel)
        values = weight.detach().reshape(-1)[flat.to(weight.device)].clone()
        param = nn.Parameter(values, requires_grad=weight.requires_grad)
        module.register_parameter(cw.values_name, param)
        module.register_buffer(cw.row_ptr_name, row_ptr.to(weight.device))
        module.register_buffer(cw.cols_name, cols.to(weight.device))
        cw.remember(module, flat)
        return cw

    # ------------------------------------------------------------------ reading

    def values(self, module: nn.Module) -> nn.Parameter:
        return module._parameters[self.values_name]

    def row_ptr(self, module: nn.Module) -> torch.Tensor:
        return module._buffers[self.row_ptr_name]

    def cols(self, module: nn.Module) -> torch.Tensor:
        return module._buffers[self.cols_name]

    def matrix(self, module: nn.Module, values: torch.Tensor | None = None) -> CompressedMatrix:
        """The weight as the kernels' compressed matrix (with ``values``, by default the Parameter)."""
        v = self.values(module) if values is None else values
        return CompressedMatrix(self.row_ptr(module), self.cols(module), v, self.columns, self.panel)

    def _cache(self, module: nn.Module) -> dict[str, Any]:
        cache = module.__dict__.get("_compact_cache")
        if cache is None:
            cache = module.__dict__["_compact_cache"] = {}
        return cache.setdefault(self.name, {})

    def remember(self, module: nn.Module, flat: torch.Tensor) -> None:
        """Forget what was derived from the old layout and keep the new one's flat positions (int32 where
        they fit: 4 bytes per value; not kept by a layer on the sparse kernels, see :meth:`flat`)."""
        cache = self._cache(module)
        cache.clear()
        if _keeps_flat(module):
            cache["flat"] = _compact_index(flat, self.numel)

    def derived(self, module: nn.Module, key: str, build) -> Any:
        """A structure derived from the layout (the transposed CSR of the backward, a convolution's
        offsets...), built once by ``build()`` and kept until the layout changes."""
        cache = self._cache(module)
        if key not in cache:
            cache[key] = build()
        return cache[key]

    def flat(self, module: nn.Module) -> torch.Tensor:
        """The flat dense positions of the values (int32, or int64 past 2**31 entries; on the values'
        device), in value order."""

        def build():
            rp, cols = self.row_ptr(module).cpu(), self.cols(module).cpu()
            return _compact_index(flat_positions(rp, cols, self.columns, self.panel), self.numel)

        cache = self._cache(module)
        flat = cache.get("flat")
        if flat is None:
            flat = build()
            # kept where every call scatters (the dense mode); a layer on the sparse kernels needs the
            # positions only on update steps, and saves their 4 bytes per value meanwhile
            if _keeps_flat(module):
                cache["flat"] = flat
        device = self.values(module).device
        if flat.device != device:
            flat = flat.to(device)
            if "flat" in cache:
                cache["flat"] = flat
        return flat

    def drop_flat(self, module: nn.Module) -> None:
        """Forget the cached flat positions and dense weight (a layer on the sparse kernels keeps neither;
        rebuilt when next needed)."""
        cache = self._cache(module)
        cache.pop("flat", None)
        cache.pop("dense", None)

    def mask(self, module: nn.Module) -> torch.Tensor:
        """The bool mask of the kept positions, in the dense weight's shape (built on demand)."""
        flat = self.flat(module)
        mask = torch.zeros(self.numel, dtype=torch.bool, device=flat.device)
        mask[flat] = True
        return mask.view(self.shape)

    def scatter(self, module: nn.Module, values: torch.Tensor | None = None) -> torch.Tensor:
        """The dense weight (zeros off the kept positions); differentiable in ``values``."""
        v = self.values(module) if values is None else values
        flat = self.flat(module)
        dense = torch.zeros(self.numel, dtype=v.dtype, device=v.device)
        return dense.index_put((flat,), v).view(self.shape)

    @torch.no_grad()
    def dense_of(self, module: nn.Module, values: torch.Tensor) -> torch.Tensor:
        """The dense weight of ``values`` (not differentiable), kept until the values change: the dense mode
        scatters once per optimiser step rather than at every forward and backward. Its 4 bytes per
        weight are what the dense mode costs in memory."""
        cache = self._cache(module)
        key = (values.data_ptr(), values._version)
        hit = cache.get("dense")
        if hit is not None and hit[0] == key:
            return hit[1]
        dense = (
            hit[1]
            if hit is not None and hit[1].dtype == values.dtype and hit[1].device == values.device
            else None
        )
        if dense is None:
            dense = torch.empty(self.shape, dtype=values.dtype, device=values.device)
        # refilled in place: the same storage every step, as a dense layer's weight (torch's CPU
        # convolutions run markedly slower on a weight in new memory at every call)
        flat_dense = dense.view(-1)
        flat_dense.zero_()
        flat_dense.index_copy_(0, self.flat(module).long(), values)  # ~3x faster than an indexed assignment
        cache["dense"] = (key, dense)
        return dense

    def gather(self, module: nn.Module, dense: torch.Tensor) -> torch.Tensor:
        """The entries of a dense tensor of the weight's shape at the kept positions, in value order."""
        return dense.reshape(-1).index_select(0, self.flat(module))  # ~5x faster than advanced indexing

    def forget(self, module: nn.Module) -> None:
        """Drop the derived structures (the layout's buffers were replaced: a state dict was loaded)."""
        self._cache(module).clear()

    # ------------------------------------------------------------------ moving the topology

    @torch.no_grad()
    def reindex(self, module: nn.Module, new_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Lay the weight out for ``new_mask`` (as many kept positions as before); returns
        ``(old_index, new_index)``: the value at ``old_index[i]`` before is the one at ``new_index[i]`` now
        (the positions kept by both masks). The values themselves are left to the caller (the engine moves
        them with their optimiser state and EMA copies, and starts the new ones at 0)."""
        old_flat = self.flat(module)
        row_ptr, cols, flat = layout_from_mask(new_mask.reshape(self.rows, self.columns), self.panel)
        if flat.numel() != old_flat.numel():
            raise ValueError(
                f"{self.name}: a new mask keeps {flat.numel()} positions, the old {old_flat.numel()}"
            )
        device = old_flat.device
        flat = flat.to(device)
        index_type = torch.int32 if self.numel < 2**31 else torch.int64
        where = torch.full((self.numel,), -1, dtype=index_type, device=device)
        where[flat] = torch.arange(
            flat.numel(), device=device, dtype=index_type
        )  # each kept position's new index
        moved = where[old_flat]
        kept = moved >= 0
        self.row_ptr(module).copy_(row_ptr)
        self.cols(module).copy_(cols)
        self.remember(module, flat)
        del where
        old_index = kept.nonzero().squeeze(1)
        return old_index, moved[old_index].long()

    def follow(self, module: nn.Module, source: nn.Module, source_weight: CompactWeight) -> None:
        """Take the layout of the same weight of another module (an EMA copy follows the model)."""
        self.row_ptr(module).copy_(source_weight.row_ptr(source))
        self.cols(module).copy_(source_weight.cols(source))
        self.remember(module, source_weight.flat(source).to(self.values(module).device))


@torch.no_grad()
def permute_(tensor: torch.Tensor, old_index: torch.Tensor, new_index: torch.Tensor) -> None:
    """Move ``tensor`` (a values-shaped tensor: the values, an optimiser state, an EMA copy) to a new
    layout, in place: entry ``old_index[i]`` goes to ``new_index[i]``, every other entry becomes 0."""
    moved = torch.zeros_like(tensor)
    moved.index_copy_(0, new_index.to(tensor.device), tensor.index_select(0, old_index.to(tensor.device)))
    tensor.copy_(moved)


class CompactLayer(nn.Module):
    """A module holding one or more :class:`CompactWeight` (``compact_weights``): what the engine needs of
    every compact layer. Subclasses compute the forward.

    Attributes set by the engine:
        kernel_mode: ``"sparse"`` (native kernels) or ``"dense"`` (the values scattered into a dense weight and
            torch's kernels), or None until the first call decides (:mod:`~sparsediff.sparse.runtime.
            choose`).
        capture: per weight name, what a RigL update step needs from the dense gradient (None on other
            steps): the backward hands each weight's dense gradient to ``capture[name].add``.
    """

    kind: str = ""  # "linear", "conv", "gru" (the kernel families), "scattered" (torch's own op)

    def __init__(self) -> None:
        nn.Module.__init__(
            self
        )  # not super(): a compact GRU is also an nn.GRU, whose __init__ builds weights
        self.compact_weights: dict[str, CompactWeight] = {}
        self.kernel_mode: str | None = None
        self.capture: dict[str, Any] | None = None

    def compact(self, name: str) -> CompactWeight:
        return self.compact_weights[name]

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        for cw in self.compact_weights.values():
            cw.forget(self)

    def captures(self, name: str, dense_grad) -> None:
        if self.capture is not None:  # tested here, so that a compiled backward only breaks on update steps
            hand_to_capture(self, name, dense_grad)


class _DenseWeight(torch.autograd.Function):
    """The dense weight of a compact one, for torch's own operations (the dense mode): a view of the
    weight's dense buffer (refilled once per optimiser step, :meth:`CompactWeight.dense_of`) whose gradient
    is gathered back at the kept positions. The operation's own backward (a convolution's, a matmul's)
    stays torch's, in C++: the Python around a dense-mode layer is this one gather."""

    @staticmethod
    def forward(ctx, values, host, name):
        ctx.host, ctx.name = host, name
        dense = host.compact_weights[name].dense_of(host, values)
        return dense.view_as(dense)  # a view: its graph never sticks to the kept buffer

    @staticmethod
    def backward(ctx, grad):
        host, name = ctx.host, ctx.name
        if host.capture is not None:
            hand_to_capture(host, name, grad)
        return host.compact_weights[name].gather(host, grad), None, None


def dense_weight(host: nn.Module, name: str) -> torch.Tensor:
    """``host``'s compact weight ``name`` as a dense tensor, differentiable in its values (see
    :class:`_DenseWeight`)."""
    cw = host.compact_weights[name]
    return _DenseWeight.apply(cw.values(host), host, name)


def hand_to_capture(host: nn.Module, name: str, dense_grad) -> None:
    """Hand the dense gradient of ``host``'s compact weight ``name`` to the RigL capture of this step, if
    there is one (``dense_grad``: the tensor, or a function computing it, so that other steps pay
    nothing).

    This is Python bookkeeping of RigL's update steps: inside a compiled backward it runs eagerly
    (``torch.compiler.disable``). The disabled version is made at the first call once torch's compiler is
    loaded: nothing can compile before that, and importing it at import time would cost every process
    that imports sparsediff about 1.7 s.
    """
    global _EAGER_HAND_TO_CAPTURE
    if "torch._dynamo" not in sys.modules:
        return _hand_to_capture(host, name, dense_grad)
    if _EAGER_HAND_TO_CAPTURE is None:
        _EAGER_HAND_TO_CAPTURE = torch.compiler.disable(_hand_to_capture)
    return _EAGER_HAND_TO_CAPTURE(host, name, dense_grad)


_EAGER_HAND_TO_CAPTURE = None


def _hand_to_capture(host: nn.Module, name: str, dense_grad) -> None:
    capture = host.capture
    if capture is None or name not in capture:
        return
    grad = dense_grad() if callable(dense_grad) else dense_grad
    capture[name].add(grad.reshape(-1), host.compact_weights[name].flat(host))
