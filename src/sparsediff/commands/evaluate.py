"""``sparsediff evaluate``: FID, parameters and FLOPs of a run, written to the run's evaluation file."""

from __future__ import annotations

import argparse

from ..evaluate import evaluate_run
from ..export.common import format_bytes
from ..run import RunDir
from ..watch import TRACKERS
from .common import add_json_option, add_quiet_option, add_run_option, add_sampling_options, call, emit

NAME = "evaluate"
HELP = f"FID, parameters and FLOPs of a run -> {RunDir.EVAL}"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_option(p)
    p.add_argument("--num-samples", type=int, help="generated samples (eval.num_samples)")
    p.add_argument("--num-reference", type=int, help="held-out images (default: the whole split)")
    p.add_argument("--fid-weights", help="standard Inception weights file: gives Inception FID")
    p.add_argument(
        "--feature-extractor",
        dest="extractor",
        metavar="FEATURE_EXTRACTOR",
        help="sparsediff-fmnist | sparsediff-strokes | inception-v3-compat",
    )
    add_sampling_options(p)
    p.add_argument(
        "--report-to",
        choices=TRACKERS,
        help="also log FID, the sampling time and the sample grid into the run's TensorBoard / W&B run",
    )
    add_json_option(p)
    add_quiet_option(p)


def run(args: argparse.Namespace) -> int:
    result = call(evaluate_run, args)
    fid = result["fid"]
    emit(
        args,
        result,
        f"{fid['metric']} = {fid['value']:.3f} ({result['num_samples']} samples vs {result['num_reference']} "
        f"held-out); non-zero params {result['params_nonzero']:,} / {result['params_total']:,}; "
        f"on disk: checkpoint {format_bytes(result['checkpoint_bytes'])}, sparse model "
        f"{format_bytes(result['model_bytes'])}; "
        f"sampling {result['generate_seconds']:.1f} s ({result['backend']} backend); written to {RunDir(args.run_dir).eval_path}",
    )
    return 0
