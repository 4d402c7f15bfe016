"""Compressed sparse tensors in safetensors files: which entries are active, and their values.

A tensor whose entries are mostly zero is stored as its *support* (the set of active entries) and its
active values in memory order, as one uint8 tensor ``NAME#sparse`` of up to three segments:

    support   the active entries (a bitmask, the same bitmask deflated, or increasing flat indices)
    negzero   (float tensors) where the inactive entries are -0.0, when any are
    values    the active values' bytes: as they are, or with their high byte (sign and exponent) deflated

A set of positions is stored in whichever of three forms is smallest: a bitmask (uint8, bit ``i`` of
byte ``j`` is entry ``8 j + i``; 1 bit per entry), the bitmask deflated with zlib (about 0.56 bit per
entry at 10 % density, close to its entropy of 0.47), or int32 indices (32 bits per active entry, int64
from 2**31 entries; these win below a density of about 1/60). The support may also be a mask given by
the caller (:class:`Support`): kept in the tensor's own entry, or kept once as the non-zero entries of
another tensor of the same file or of a file next to it (e.g. the sparse engine's mask of that layer,
which the weights, their EMA copy and every optimiser state tensor of the weight's shape share). Inside
such a mask every entry is a stored value, an exact zero included; a tensor with a non-zero entry
outside the mask is never stored against it (it gets its own support, or stays dense). On its own, a
tensor's support is its entries that are neither +0 nor -0; NaN payloads are values like any other.
When every active value has the same bits (a 0/1 mask), that value is kept in the index instead. With
``deflate_exponents`` (exports) the high byte plane of float values is deflated when that is smaller:
about 13 % off float32 weights, whose exponents are few; the other bytes stay as they are.

Values move as raw bits through an integer view of the tensor, never through arithmetic, so loading
restores every tensor exactly: dtype, shape, signs of zeros, NaN payloads.

Dense tensors are stored as they are under their own name, readable by any safetensors reader. The
metadata key ``sparsediff_compressed`` (JSON) holds the format marker and, per tensor, a CRC-32 of every
stored part (and for compressed ones shape, dtype, count and how the support is stored): a corrupted or
truncated file, a mask whose count disagrees with the values, or a shared mask from another file is
refused with an error naming the file and the tensor, never loaded as a wrong tensor. A file without
that key (an ordinary safetensors file) loads as it is. Reading is in ``decoder.py``.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "COMPRESSED_FORMAT",
    "METADATA_KEY",
    "Support",
    "encode",
    "is_compressed",
    "mask_checksum",
    "pack_bits",
    "save_compressed",
    "serialized_nbytes",
    "unpack_bits",
]

COMPRESSED_FORMAT = "sparsediff.compressed/1"
METADATA_KEY = "sparsediff_compressed"
PART = "#sparse"  # the stored uint8 tensor of a compressed tensor
SEGMENTS = ("support", "negzero", "values")
# Header bytes a compressed entry adds (its index entry and the extra safetensors header lines): a tensor
# is compressed only when that saves more than this.
ENTRY_OVERHEAD = 256
INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
MAX_INT32_INDEX = 2**31
_DEFLATE_LEVEL = 6


@dataclass(frozen=True)
class Support:
    """The active entries to store a tensor with, instead of its non-zero entries.

    Attributes:
        mask: bool tensor of the tensor's shape (True = active: stored as a value, whatever it is).
        tensor: None: the mask is stored in the tensor's own entry. Else the mask is the non-zero
            entries of this stored tensor (e.g. an engine's 0/1 mask), kept once for every tensor
            that shares it.
        file: with ``tensor``: the name of the file in the same directory that holds it; None: this file.
        required: store the tensor with this mask even when that is larger than dense, so that the mask
            can be read back (``decoder.load_with_supports``); the tensor must be zero outside it.
    """

    mask: torch.Tensor
    tensor: str | None = None
    file: str | None = None
    required: bool = False


# ---------------------------------------------------------------------------- bits and bytes


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor (any shape, memory order) as a packed bitmask: uint8 ``(ceil(numel / 8),)``, entry
    ``8 j + i`` in bit ``i`` of byte ``j``; the unused bits of the last byte are 0."""
    flat = mask.detach().reshape(-1).to(device="cpu", dtype=torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    shifts = torch.arange(8, dtype=torch.uint8)
    return (flat.view(-1, 8) << shifts).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """The bool ``(numel,)`` tensor that :func:`pack_bits` packed."""
    shifts = torch.arange(8, dtype=torch.uint8)
    bits = (packed.reshape(-1, 1) >> shifts) & 1
    return bits.reshape(-1)[:numel].bool()


def mask_checksum(mask: torch.Tensor) -> int:
    """CRC-32 of a bool mask's packed bits (what a shared-mask reference records)."""
    return zlib.crc32(memoryview(pack_bits(mask).numpy()))


def int_view(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bits as an integer tensor of the same element size (the tensor itself for int types)."""
    if t.dtype in (torch.uint8, torch.int16, torch.int32, torch.int64):
        return t
    return t.view(INT_OF_SIZE[t.element_size()])


def crc32_of(t: torch.Tensor) -> int:
    """CRC-32 of a CPU tensor's bytes."""
    arr = (int_view(t) if t.element_size() in INT_OF_SIZE else t).contiguous().numpy().reshape(-1)
    return zlib.crc32(memoryview(arr))


def negative_zero_bits(dtype: torch.dtype) -> int | None:
    """The bits of -0.0 in ``dtype`` as its integer view's value; None when it has no -0.0."""
    if not dtype.is_floating_point:
        return None
    bits = int(int_view(torch.tensor(-0.0, dtype=dtype).reshape(1))[0])
    return bits or None  # formats without a negative zero (float8 *fnuz) turn -0.0 into +0.0


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: Any) -> torch.dtype | None:
    dt = getattr(torch, name, None) if isinstance(name, str) else None
    return dt if isinstance(dt, torch.dtype) else None


def is_compressed(metadata: Mapping[str, str] | None) -> bool:
    """Whether a safetensors file's metadata says it was written by :func:`save_compressed`."""
    return bool(metadata) and METADATA_KEY in metadata


# ---------------------------------------------------------------------------- encoding


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """A CPU tensor's bytes as a flat uint8 tensor (host order: little-endian, as safetensors)."""
    return int_view(t.contiguous()).view(torch.uint8).reshape(-1)


def _positions(active: torch.Tensor, count: int) -> tuple[dict[str, Any], torch.Tensor]:
    """The smallest stored form of a set of positions (bool ``(n,)``, ``count`` of them True):
    ``(description, bytes)``."""
    n = active.numel()
    index_dtype = torch.int32 if n < MAX_INT32_INDEX else torch.int64
    if count * index_dtype.itemsize < math.ceil(n / 8):
        data, kind = _bytes(active.nonzero().squeeze(1).to(index_dtype)), "indices"
    else:
        data, kind = pack_bits(active), "bits"
        if data.numel() >= 64:
            deflated = zlib.compress(memoryview(data.numpy()), _DEFLATE_LEVEL)
            if len(deflated) < 0.95 * data.numel():
                data, kind = torch.frombuffer(bytearray(deflated), dtype=torch.uint8), "deflated"
    return {"kind": kind, "bytes": data.numel()}, data


def _put(out: dict[str, torch.Tensor], key: str, t: torch.Tensor) -> None:
    if key in out:
        raise ValueError(f"two stored tensors would be named {key!r}; rename the tensor")
    out[key] = t


def _dense(name: str, t: torch.Tensor, out: dict[str, torch.Tensor]) -> dict[str, Any]:
    _put(out, name, t)
    return {"crc": crc32_of(t)}


def _values(vals: torch.Tensor, dtype: torch.dtype, deflate_exponents: bool) -> tuple[dict, torch.Tensor]:
    """The stored form of the active values (given as their integer view): their bytes, or for floats
    (with ``deflate_exponents``) their high byte plane (sign and exponent) deflated followed by the other
    byte planes, when that is smaller."""
    size, n = vals.element_size(), vals.numel()
    if deflate_exponents and dtype.is_floating_point and size >= 2 and n >= 64:
        planes = vals.view(torch.uint8).view(n, size)  # little-endian: the last byte holds sign and exponent
        deflated = zlib.compress(memoryview(planes[:, -1].contiguous().numpy()), _DEFLATE_LEVEL)
        if len(deflated) < 0.9 * n:
            high = torch.frombuffer(bytearray(deflated), dtype=torch.uint8)
            data = torch.cat([high, planes[:, :-1].reshape(-1)])
            return {"kind": "planes", "bytes": data.numel(), "high": high.numel()}, data
    return {"kind": "raw", "bytes": n * size}, _bytes(vals)


def _encode_one(
    name: str,
    t: torch.Tensor,
    support: Support | None,
    out: dict[str, torch.Tensor],
    deflate_exponents: bool = False,
) -> dict[str, Any]:
    """Add what stores ``t`` (on the CPU, contiguous) to ``out``; returns its index entry."""
    numel, size = t.numel(), t.element_size()
    dense_bytes = numel * size
    required = support is not None and support.required
    if size not in INT_OF_SIZE or (dense_bytes <= ENTRY_OVERHEAD and not required):
        if required:
            raise ValueError(f"{name!r}: a {t.dtype} tensor cannot be stored with a mask")
        return _dense(name, t, out)
    iv = int_view(t).reshape(-1)
    negzero_bits = negative_zero_bits(t.dtype)
    is_negzero = (iv == negzero_bits) if negzero_bits is not None else None
    zero = iv == 0 if is_negzero is None else (iv == 0) | is_negzero  # +0 or -0
    entry: dict[str, Any] = {"shape": list(t.shape), "dtype": _dtype_name(t.dtype)}
    segments: list[torch.Tensor] = []

    mask = None
    if required and tuple(support.mask.shape) != tuple(t.shape):
        raise ValueError(f"{name!r} has shape {tuple(t.shape)}, its mask {tuple(support.mask.shape)}")
    if support is not None and tuple(support.mask.shape) == tuple(t.shape):
        mask = support.mask.detach().reshape(-1).to(device="cpu", dtype=torch.bool)
        if bool((~zero & ~mask).any()):  # a value outside the mask: not stored against it
            if required:
                raise ValueError(f"{name!r} has non-zero entries outside the mask it must be stored with")
            mask = None
    if mask is not None:
        nnz = int(mask.sum())
        if support.tensor is None:
            entry["support"], data = _positions(mask, nnz)
            entry["support"]["given"] = True  # a caller's mask (load_with_supports returns it)
            segments.append(data)
        else:
            ref = {"kind": "shared", "tensor": support.tensor}
            if support.file is not None:
                ref["file"] = support.file
            ref["crc"] = mask_checksum(mask)
            entry["support"] = ref
        outside = ~mask
    else:
        mask = ~zero
        nnz = numel - int(zero.sum())
        if nnz * size + ENTRY_OVERHEAD >= dense_bytes:  # the values alone are as large as the tensor...
            active = iv if nnz == numel else iv[mask]
            if nnz < 2 or not bool((active == active[0]).all()):  # ... unless they are all the same
                return _dense(name, t, out)
        entry["support"], data = _positions(mask, nnz)
        segments.append(data)
        outside = zero
    entry["nnz"] = nnz
    if is_negzero is not None:
        negzero = is_negzero & outside
        count = int(negzero.sum())
        if count:
            entry["negzero"], data = _positions(negzero, count)
            entry["negzero"]["count"] = count
            segments.append(data)
    vals = iv[mask]
    if vals.numel() > 1 and bool((vals == vals[0]).all()):
        entry["values"] = {"kind": "fill", "bits": int(vals[0])}
    else:
        entry["values"], data = _values(vals, t.dtype, deflate_exponents)
        segments.append(data)
    stored = sum(d.numel() for d in segments)
    if stored + ENTRY_OVERHEAD >= dense_bytes and not required:
        if support is not None:  # the mask does not pay off: try the tensor's own support
            return _encode_one(name, t, None, out, deflate_exponents)
        return _dense(name, t, out)
    part = torch.cat(segments) if segments else torch.zeros(0, dtype=torch.uint8)
    entry["crc"] = crc32_of(part)
    _put(out, name + PART, part)
    return entry


def encode(
    tensors: Mapping[str, torch.Tensor],
    supports: Mapping[str, Support] | None = None,
    deflate_exponents: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(stored tensors, index)``: what a compressed file holds for ``tensors``.

    Args:
        tensors: name -> tensor (any device, any dtype safetensors stores).
        supports: name -> the :class:`Support` to store that tensor with (used when the tensor is zero
            outside the mask and it saves bytes; otherwise the tensor gets its own support or stays
            dense). A mask kept in this file must be the non-zero entries of a tensor in ``tensors``.
        deflate_exponents: store the high byte (sign and exponent) of float values deflated when that is
            smaller: about 13 % off float32 values, at the cost of a deflate per tensor (exports use it).
    """
    supports = dict(supports or {})
    out: dict[str, torch.Tensor] = {}
    entries: dict[str, Any] = {}
    for name, t in tensors.items():
        if not torch.is_tensor(t):
            raise TypeError(f"{name!r} is not a tensor")
        sup = supports.get(name)
        if sup is not None and sup.tensor is not None and sup.file is None:
            holder = tensors.get(sup.tensor)
            if (
                holder is None
                or holder.shape != sup.mask.shape
                or not torch.equal(
                    int_view(holder.detach().cpu().contiguous()) != 0, sup.mask.detach().cpu().bool()
                )
            ):
                raise ValueError(f"the mask of {name!r}: {sup.tensor!r} is not that mask in this file")
        entries[name] = _encode_one(name, t.detach().to("cpu").contiguous(), sup, out, deflate_exponents)
    return out, {"format": COMPRESSED_FORMAT, "tensors": entries}


def index_json(index: dict[str, Any]) -> str:
    return json.dumps(index, separators=(",", ":"))


def save_compressed(
    path: str | Path,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    supports: Mapping[str, Support] | None = None,
    deflate_exponents: bool = False,
) -> None:
    """Write ``tensors`` to the safetensors file ``path``, sparse ones compressed (see :func:`encode`);
    ``metadata`` is kept as it is next to the compression index."""
    from safetensors.torch import save_file

    stored, index = encode(tensors, supports, deflate_exponents)
    meta = dict(metadata or {})
    if METADATA_KEY in meta:
        raise ValueError(f"metadata key {METADATA_KEY!r} is reserved")
    meta[METADATA_KEY] = index_json(index)
    save_file(stored, str(path), metadata=meta)


def serialized_nbytes(
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    supports: Mapping[str, Support] | None = None,
    deflate_exponents: bool = False,
) -> int:
    """The exact size in bytes of the file :func:`save_compressed` would write (nothing is written)."""
    from safetensors.torch import save

    stored, index = encode(tensors, supports, deflate_exponents)
    return len(save(stored, metadata={**dict(metadata or {}), METADATA_KEY: index_json(index)}))
