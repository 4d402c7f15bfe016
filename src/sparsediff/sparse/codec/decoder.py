"""Reading compressed sparse tensors back (the format is described in ``encoder.py``).

Every part is checked against the file's index before it is used: its checksum, its length, the count
of its mask against the values stored, and a shared mask against the checksum it was saved with. A file
that fails any check raises a :class:`~sparsediff.errors.StateError` naming the file and the tensor.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ...errors import StateError
from .encoder import (
    COMPRESSED_FORMAT,
    INT_OF_SIZE,
    MAX_INT32_INDEX,
    METADATA_KEY,
    PART,
    SEGMENTS,
    crc32_of,
    int_view,
    mask_checksum,
    negative_zero_bits,
    parse_dtype,
    unpack_bits,
)

__all__ = ["decode", "load_compressed", "load_metadata", "load_with_supports", "shared_mask_checksums"]


# ---------------------------------------------------------------------------- decoding


class _Decoder:
    """Decodes the tensors of one file's index, checking every part against it."""

    def __init__(
        self,
        stored: Mapping[str, torch.Tensor],
        index: Any,
        source: str,
        resolve: Callable[[str, str], torch.Tensor] | None,
    ):
        self.stored, self.source, self.resolve = stored, source, resolve
        if not isinstance(index, Mapping) or index.get("format") != COMPRESSED_FORMAT:
            found = index.get("format") if isinstance(index, Mapping) else None
            raise StateError(f"{source}: unknown compression format {found!r} (expected {COMPRESSED_FORMAT})")
        entries = index.get("tensors")
        if not isinstance(entries, Mapping) or not all(isinstance(e, Mapping) for e in entries.values()):
            raise StateError(f"{source}: the compression index is malformed")
        self.entries = entries
        self.done: dict[str, torch.Tensor] = {}
        self.supports: dict[str, torch.Tensor] = {}
        self._busy: set[str] = set()
        parts = {name + PART for name, e in entries.items() if "shape" in e}
        extra = [k for k in stored if k not in entries and k not in parts]
        if extra:
            raise StateError(f"{source}: tensor {extra[0]!r} is not in the file's compression index")

    def fail(self, name: str, what: str) -> StateError:
        return StateError(f"{self.source}: tensor {name!r}: {what}")

    def tensor(self, name: str) -> torch.Tensor:
        if name in self.done:
            return self.done[name]
        if name not in self.entries:
            raise StateError(f"{self.source}: no tensor {name!r}")
        if name in self._busy:
            raise self.fail(name, "its shared mask refers back to itself")
        self._busy.add(name)
        e = self.entries[name]
        if "shape" not in e:
            t = self.stored.get(name)
            if t is None:
                raise self.fail(name, "listed in the index but missing from the file")
            if crc32_of(t) != e.get("crc"):
                raise self.fail(name, "checksum mismatch: the file is corrupted")
        else:
            t = self._sparse(name, e)
        self._busy.discard(name)
        self.done[name] = t
        return t

    def segments(self, name: str, e: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The checked part of a compressed tensor, cut into its segments (role -> uint8 bytes)."""
        part = self.stored.get(name + PART)
        if part is None:
            raise self.fail(name, f"its part {name + PART!r} is missing (the file is damaged)")
        if part.dim() != 1 or part.dtype != torch.uint8:
            raise self.fail(name, f"its part {name + PART!r} is not a 1-D uint8 tensor")
        if crc32_of(part) != e.get("crc"):
            raise self.fail(name, f"checksum mismatch in {name + PART!r}: the file is corrupted")
        out, offset = {}, 0
        for role in SEGMENTS:
            desc = e.get(role)
            if not isinstance(desc, Mapping) or desc.get("kind") in ("shared", "fill"):
                continue
            length = desc.get("bytes")
            if not isinstance(length, int) or length < 0:
                raise self.fail(name, f"malformed length of its {role}")
            out[role] = part[offset : offset + length]
            offset += length
        if offset != part.numel():
            raise self.fail(name, f"its part holds {part.numel()} bytes, the index describes {offset}")
        return out

    def positions(
        self, name: str, role: str, desc: Any, data: torch.Tensor | None, numel: int
    ) -> torch.Tensor:
        """The bool ``(numel,)`` set of positions that ``desc`` describes (``data``: its bytes)."""
        if not isinstance(desc, Mapping):
            raise self.fail(name, f"malformed description of its {role}")
        kind = desc.get("kind")
        if kind == "shared":
            return self._shared(name, desc, numel)
        if kind == "indices":
            index_dtype = torch.int32 if numel < MAX_INT32_INDEX else torch.int64
            if data.numel() % index_dtype.itemsize:
                raise self.fail(name, f"its {role} indices are cut short")
            idx = data.clone().view(index_dtype).long()
            bad = idx.numel() and (
                int(idx[0]) < 0 or int(idx[-1]) >= numel or bool((idx[1:] <= idx[:-1]).any())
            )
            if bad:
                raise self.fail(name, f"its {role} indices are not increasing within [0, {numel})")
            out = torch.zeros(numel, dtype=torch.bool)
            out[idx] = True
            return out
        if kind not in ("bits", "deflated"):
            raise self.fail(name, f"unknown form {kind!r} of its {role}")
        expected = math.ceil(numel / 8)
        if kind == "deflated":
            data = self.inflate(name, role, data, expected)
        if data.numel() != expected:
            raise self.fail(name, f"its {role} bitmask has {data.numel()} bytes, {expected} expected")
        full = unpack_bits(data, expected * 8)
        if bool(full[numel:].any()):
            raise self.fail(name, f"its {role} bitmask has bits set past the last entry")
        return full[:numel]

    def _sparse(self, name: str, e: Mapping[str, Any]) -> torch.Tensor:
        dtype, shape, nnz = parse_dtype(e.get("dtype")), e.get("shape"), e.get("nnz")
        if dtype is None or torch.empty(0, dtype=dtype).element_size() not in INT_OF_SIZE:
            raise self.fail(name, f"unknown dtype {e.get('dtype')!r}")
        if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
            raise self.fail(name, f"malformed shape {shape!r}")
        if not isinstance(nnz, int) or nnz < 0:
            raise self.fail(name, f"malformed count {nnz!r}")
        numel = math.prod(shape)
        segs = self.segments(name, e)
        mask = self.positions(name, "support", e.get("support"), segs.get("support"), numel)
        count = int(mask.sum())
        if count != nnz:
            raise self.fail(name, f"its mask has {count} active entries but the index says {nnz}")
        int_dtype = INT_OF_SIZE[torch.empty(0, dtype=dtype).element_size()]
        vals = self.values(name, e.get("values"), segs.get("values"), dtype, nnz)
        flat = torch.zeros(numel, dtype=int_dtype)
        if "negzero" in e:
            bits = negative_zero_bits(dtype)
            negzero = self.positions(name, "negzero", e["negzero"], segs.get("negzero"), numel)
            if (
                bits is None
                or int(negzero.sum()) != e["negzero"].get("count")
                or bool((negzero & mask).any())
            ):
                raise self.fail(name, "its set of negative zeros disagrees with the index or the mask")
            flat[negzero] = bits
        flat[mask] = vals
        if e["support"].get("given") or e["support"].get("kind") == "shared":
            self.supports[name] = mask.view(shape)
        return flat.view(dtype).reshape(shape)

    def values(
        self, name: str, desc: Any, data: torch.Tensor | None, dtype: torch.dtype, nnz: int
    ) -> torch.Tensor:
        """The ``nnz`` active values as their integer view."""
        size = torch.empty(0, dtype=dtype).element_size()
        int_dtype = INT_OF_SIZE[size]
        kind = desc.get("kind") if isinstance(desc, Mapping) else None
        if kind == "fill":
            bits = desc.get("bits")
            if not isinstance(bits, int) or isinstance(bits, bool) or nnz < 2:
                raise self.fail(name, f"malformed fill value {bits!r}")
            try:
                return torch.full((nnz,), bits, dtype=int_dtype)
            except RuntimeError as err:
                raise self.fail(name, f"fill value {bits!r} does not fit {dtype}: {err}") from None
        if kind == "raw":
            if data.numel() != nnz * size:
                raise self.fail(
                    name,
                    f"{data.numel() / size:g} values stored for a mask of {nnz} active entries (count mismatch)",
                )
            return data.clone().view(int_dtype)
        if kind != "planes":
            raise self.fail(name, f"unknown form {kind!r} of its values")
        high_len = desc.get("high")
        if not isinstance(high_len, int) or not 0 < high_len <= data.numel():
            raise self.fail(name, "malformed values segment")
        if data.numel() - high_len != nnz * (size - 1):
            raise self.fail(
                name,
                f"{(data.numel() - high_len) / (size - 1):g} values stored for a mask of {nnz} active "
                "entries (count mismatch)",
            )
        high = self.inflate(name, "values", data[:high_len], nnz)
        planes = torch.empty(nnz, size, dtype=torch.uint8)
        planes[:, :-1] = data[high_len:].view(nnz, size - 1)
        planes[:, -1] = high
        return planes.view(int_dtype).reshape(-1)

    def inflate(self, name: str, role: str, data: torch.Tensor, expected: int) -> torch.Tensor:
        """``data`` (deflated) inflated to exactly ``expected`` bytes."""
        inflater = zlib.decompressobj()
        try:
            raw = inflater.decompress(memoryview(data.contiguous().numpy()), expected + 1)
        except zlib.error as err:
            raise self.fail(name, f"its {role} cannot be inflated ({err})") from None
        if len(raw) != expected or not inflater.eof or inflater.unused_data:
            raise self.fail(name, f"its {role} does not inflate to {expected} bytes")
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else data.new_zeros(0)

    def _shared(self, name: str, ref: Mapping[str, Any], numel: int) -> torch.Tensor:
        holder, file = ref.get("tensor"), ref.get("file")
        if not isinstance(holder, str) or not (file is None or isinstance(file, str)):
            raise self.fail(name, "malformed shared-mask reference")
        where = f"{holder!r} in {file}" if file else f"{holder!r} of this file"
        if file is None:
            source = self.tensor(holder)
        elif self.resolve is None:
            raise self.fail(name, f"its mask is {where}, which cannot be read from here")
        else:
            source = self.resolve(file, holder)
        if source.numel() != numel:
            raise self.fail(name, f"its mask {where} has {source.numel()} entries, the tensor {numel}")
        mask = (int_view(source.contiguous()) != 0).reshape(-1)
        if mask_checksum(mask) != ref.get("crc"):
            raise self.fail(
                name,
                f"its mask {where} is not the one it was saved with (the files come from different "
                "checkpoints or models)",
            )
        return mask


def decode(
    stored: Mapping[str, torch.Tensor],
    index: Any,
    source: str = "tensors",
    resolve: Callable[[str, str], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """The tensors that :func:`encode` stored, exactly.

    Args:
        source: how errors name the file.
        resolve: ``(file, tensor) -> tensor`` for masks kept in another file.

    Raises:
        StateError: a part is missing, damaged, or disagrees with the index or its shared mask.
    """
    dec = _Decoder(stored, index, source, resolve)
    return {name: dec.tensor(name) for name in dec.entries}


# ---------------------------------------------------------------------------- files


def _diagnose(path: Path, error: Exception) -> str:
    """Why a safetensors file cannot be read, naming the tensor cut off when it is truncated."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        return f"cannot read {path}: {e}"
    if len(raw) < 8:
        return f"{path} is truncated ({len(raw)} bytes, not even a header)"
    (n,) = struct.unpack("<Q", raw[:8])
    if 8 + n > len(raw):
        return f"{path} is truncated or not a safetensors file ({len(raw)} bytes; its header claims {n})"
    try:
        header = json.loads(raw[8 : 8 + n])
        spans = {k: v["data_offsets"] for k, v in header.items() if k != "__metadata__"}
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, KeyError, AttributeError):
        return f"{path} has a corrupted header: {error}"
    have = len(raw) - 8 - n
    cut = sorted((k for k, (_, end) in spans.items() if end > have), key=lambda k: spans[k][0])
    if cut:
        more = f" (and {len(cut) - 1} more)" if len(cut) > 1 else ""
        return f"{path} is truncated: tensor {cut[0]!r}{more} ends past the end of the file"
    return f"cannot read {path}: {error}"


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    if not path.exists():
        raise StateError(f"{path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118
    except Exception as e:  # safetensors raises several error types for damaged files
        raise StateError(_diagnose(path, e)) from None


def _index(path: Path, meta: Mapping[str, str]) -> Any:
    try:
        return json.loads(meta[METADATA_KEY])
    except json.JSONDecodeError as e:
        raise StateError(f"{path}: its compression index is corrupted ({e})") from None


def load_with_supports(
    path: str | Path,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, supports, metadata)`` of a safetensors file, compressed or not.

    ``supports``: name -> bool mask, for each tensor stored with a :class:`Support` (exactly the mask
    it was given; tensors stored on their own or dense have none). Masks kept in another file are read
    from the file of that name in the same directory.

    Raises:
        StateError: the file (or a file it takes a mask from) is missing, truncated or corrupted, or
            a mask disagrees with the tensors stored against it; the message names file and tensor.
    """
    path = Path(path)
    stored, meta = _read(path)
    if METADATA_KEY not in meta:
        return stored, {}, meta
    others: dict[str, _Decoder] = {}

    def resolve(file: str, tensor: str) -> torch.Tensor:
        if Path(file).name != file or file in ("", ".", ".."):
            raise StateError(f"{path}: refers to {file!r}, which is not a file name in its directory")
        if file not in others:
            other = path.parent / file
            if not other.exists():
                raise StateError(
                    f"{path} keeps its masks in {file}, which is missing next to it (copy the whole directory)"
                )
            o_stored, o_meta = _read(other)
            if METADATA_KEY in o_meta:
                others[file] = _Decoder(o_stored, _index(other, o_meta), str(other), None)
            else:
                plain = {"format": COMPRESSED_FORMAT, "tensors": {k: {} for k in o_stored}}
                others[file] = _Decoder(o_stored, plain, str(other), None)
                others[file].done.update(o_stored)
        dec = others[file]
        if tensor not in dec.entries:
            raise StateError(f"{path}: the mask {tensor!r} it refers to is not in {path.parent / file}")
        return dec.tensor(tensor)

    dec = _Decoder(stored, _index(path, meta), str(path), resolve)
    tensors = {name: dec.tensor(name) for name in dec.entries}
    return tensors, dec.supports, {k: v for k, v in meta.items() if k != METADATA_KEY}


def load_compressed(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file, compressed (:func:`save_compressed`) or not; see
    :func:`load_with_supports` for the errors."""
    tensors, _, meta = load_with_supports(path)
    return tensors, meta


def _header_metadata(path: Path) -> dict[str, str]:
    """A safetensors file's metadata, read from its header alone."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # safetensors raises several error types for damaged files
        raise StateError(_diagnose(path, e)) from None


def load_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a safetensors file, compressed or not, as :func:`load_compressed` returns it; only
    the file's header is read (the tensors are neither read nor checked).

    Raises:
        StateError: the file is missing or its header is damaged.
    """
    meta = _header_metadata(Path(path))
    return {k: v for k, v in meta.items() if k != METADATA_KEY}


def shared_mask_checksums(path: str | Path) -> dict[tuple[str | None, str], int]:
    """``(file, tensor) -> checksum`` (:func:`~sparsediff.sparse.codec.encoder.mask_checksum`) of every shared
    mask the tensors of ``path`` were stored against; only the file's header is read (empty for a plain
    file). Lets a reader check masks it loads from elsewhere against the file."""
    path = Path(path)
    meta = _header_metadata(path)
    if METADATA_KEY not in meta:
        return {}
    entries = _index(path, meta).get("tensors") or {}
    out = {}
    for e in entries.values():
        ref = e.get("support") if isinstance(e, Mapping) else None
        if isinstance(ref, Mapping) and ref.get("kind") == "shared":
            out[(ref.get("file"), ref.get("tensor"))] = ref.get("crc")
    return out
