"""``sparsediff export``: a run's sparse denoiser as a file to deploy (see :mod:`sparsediff.export`)."""

from __future__ import annotations

import argparse

from ..compressed import export_sparse
from ..export import DTYPES, EXPORT_FORMATS, export_masked_dense, export_semi_structured
from ..export_diffusers import export_diffusers
from ..run import RunDir
from .common import add_json_option, add_run_option, call, emit

NAME = "export"
HELP = "export a run's sparse denoiser: masked dense, sparse, a diffusers folder, or 2:4 semi-structured"
DESCRIPTION = (
    "masked-dense: the run's weights with the final masks folded in, one safetensors file (CPU). "
    "sparse: the masks and the weights inside them only (compressed, one safetensors file; loads with "
    "sparsediff.compressed.load_sparse_export). "
    "diffusers: a UNet run as a diffusers UNet2DModel folder (save_pretrained; loads with "
    "UNet2DModel.from_pretrained, no sparsediff needed), with sparsediff.json and the masks beside it. "
    "semi-structured: 2:4 Linear layers converted to torch's semi-structured sparse tensors on a "
    "CUDA GPU, checked against the masked dense model; writes a directory (model.safetensors, "
    f"plan.json, verification.json, {RunDir.CONFIG})."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_option(p)
    p.add_argument("--format", required=True, choices=EXPORT_FORMATS)
    p.add_argument(
        "--dtype",
        choices=list(DTYPES),
        help="masked-dense, sparse: weights dtype (default float32); semi-structured: fp16 (default) or bf16",
    )
    p.add_argument(
        "--out",
        required=True,
        help="masked-dense, sparse: a .safetensors file; semi-structured, diffusers: a directory",
    )
    p.add_argument(
        "--no-ema", dest="use_ema", action="store_false", help="export the raw weights instead of the EMA"
    )
    p.add_argument("--batch-size", type=int, default=2, help="semi-structured: inputs of the output check")
    p.add_argument("--tolerance", type=float, help="semi-structured: allowed relative L2 difference")
    add_json_option(p, "print the report as JSON")


def run(args: argparse.Namespace) -> int:
    if args.format == "masked-dense":
        info = call(export_masked_dense, args)
        line = (
            f"masked dense weights ({info['dtype']}, {info['params_nonzero']:,} of {info['params_total']:,} "
            f"non-zero) written to {info['out']}"
        )
    elif args.format == "sparse":
        info = call(export_sparse, args)
        line = (
            f"sparse weights ({info['dtype']}, {info['masked_layers']} masked layers, "
            f"{info['params_nonzero']:,} of {info['params_total']:,} non-zero) written to {info['out']} "
            f"({info['bytes']:,} bytes)"
        )
    elif args.format == "diffusers":
        info = call(export_diffusers, args)
        line = (
            f"diffusers {info['class']} folder ({info['dtype']}, {info['params_nonzero']:,} of "
            f"{info['params_total']:,} non-zero) written to {info['out']}; load it with "
            f"diffusers.{info['class']}.from_pretrained"
        )
    else:
        info = call(export_semi_structured, args, dtype=args.dtype or "fp16")
        v = info["verification"]
        line = (
            f"{v['converted_layers']} Linear layers converted to 2:4 ({v['backend']}, {v['dtype']}; "
            f"{100 * v['flops_share_converted']:.1f} % of the forward FLOPs), outputs within "
            f"{v['semi_structured_vs_masked_dense']['rel_l2']:.2g} relative L2 of the masked dense model; "
            f"written to {info['out']}"
        )
    emit(args, info, line)
    return 0
