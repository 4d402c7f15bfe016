"""The codec of sparse tensors in safetensors files: each one stored as its mask and the values inside it,
every part checked on reading.

``encoder.py`` describes the format and writes it (:func:`save_compressed`, :func:`encode`);
``decoder.py`` reads it back exactly (:func:`load_compressed`, :func:`load_with_supports`, :func:`decode`)
and refuses a damaged file with an error naming the file and the tensor. A file written without
compression is an ordinary safetensors file and loads as it is.

Checkpoints, engine state files and the ``--format sparse`` export (``sparsediff.export.sparse_file``)
are written with it; the codec knows nothing of runs or models.
"""

from .decoder import decode, load_compressed, load_metadata, load_with_supports, shared_mask_checksums
from .encoder import (
    COMPRESSED_FORMAT,
    METADATA_KEY,
    PART,
    Support,
    crc32_of,
    encode,
    int_view,
    is_compressed,
    mask_checksum,
    pack_bits,
    save_compressed,
    serialized_nbytes,
    unpack_bits,
)

__all__ = [
    "COMPRESSED_FORMAT",
    "METADATA_KEY",
    "PART",
    "Support",
    "crc32_of",
    "decode",
    "encode",
    "int_view",
    "is_compressed",
    "load_compressed",
    "load_metadata",
    "load_with_supports",
    "mask_checksum",
    "pack_bits",
    "save_compressed",
    "serialized_nbytes",
    "shared_mask_checksums",
    "unpack_bits",
]
