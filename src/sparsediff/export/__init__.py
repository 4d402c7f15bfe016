"""A run's final sparse denoiser as files to deploy (what ``sparsediff export`` runs), and back.

One module per format, one table of them (``formats.py``: what ``--format`` chooses between) and what
they share (``common.py``: the dtype names, the parameter counts, the metadata):

``masked-dense`` (``masked_dense.py``): any run, CPU; the weights with the final masks folded in, one
safetensors file any reader loads.

``sparse`` (``sparse_file.py``): the masks and the weights inside them only, one compressed safetensors
file (the sparse tensor codec, ``sparse/codec/``): about 0.13x of the dense weights at 90 % sparsity.

``diffusers`` (``diffusers_folder.py``): a UNet run as a diffusers ``UNet2DModel`` folder that diffusers
alone loads, with the masks and what was exported beside it.

``semi-structured`` (``semi_structured.py``): a 2:4 run with its Linear layers converted to torch's
semi-structured sparse tensors on a CUDA GPU, checked against the masked dense model.

Every format records the same ``params_total`` and ``params_nonzero`` for the same run (the positions
the masks keep plus every entry of the other parameters: :func:`sparsediff.sparse.counts.parameter_counts`,
the engine's own definition). :func:`load_export` reads any export back, also those written by earlier
versions.
"""

from .common import DTYPES, format_bytes, parse_dtype
from .diffusers_folder import DIFFUSERS_FORMAT, export_diffusers, load_diffusers_folder
from .formats import EXPORT_FORMATS, FORMATS, ExportFormat, format_of, load_export
from .masked_dense import MASKED_DENSE_FORMAT, export_masked_dense, load_masked_dense
from .semi_structured import SEMI_STRUCTURED_FORMAT, export_semi_structured
from .sparse_file import (
    SPARSE_EXPORT_FORMAT,
    export_sparse,
    load_sparse_export,
    sparse_export_nbytes,
    sparse_export_payload,
)

__all__ = [
    "DIFFUSERS_FORMAT",
    "DTYPES",
    "EXPORT_FORMATS",
    "FORMATS",
    "MASKED_DENSE_FORMAT",
    "SEMI_STRUCTURED_FORMAT",
    "SPARSE_EXPORT_FORMAT",
    "ExportFormat",
    "export_diffusers",
    "export_masked_dense",
    "export_semi_structured",
    "export_sparse",
    "format_bytes",
    "format_of",
    "load_diffusers_folder",
    "load_export",
    "load_masked_dense",
    "load_sparse_export",
    "parse_dtype",
    "sparse_export_nbytes",
    "sparse_export_payload",
]
