"""``sparsediff sweep``: train and evaluate a grid of runs, resumable (see :mod:`sparsediff.sweep`)."""

from __future__ import annotations

import argparse

from ..sweep import SWEEP_METHODS, SweepSpec, sweep
from ..watch import TRACKERS
from .common import add_config_options, add_quiet_option, call, floats, ints, names

NAME = "sweep"
HELP = "train + evaluate a grid of methods x sparsities x prune ratios x seeds (resumable)"
DESCRIPTION = (
    "Train and evaluate every point of the grid into OUT/<run>. Run the same command again "
    "after an interruption: finished runs are skipped, interrupted ones resume from their checkpoint."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_options(p)
    p.add_argument(
        "--methods", type=names, default=list(SWEEP_METHODS), help="comma-separated (default all four)"
    )
    p.add_argument("--sparsities", type=floats, default=[0.25, 0.5, 0.75, 0.9], help="e.g. 0.25,0.5,0.75,0.9")
    p.add_argument("--prune-ratios", type=floats, default=[0.05, 0.5], help="rigl/magran only, e.g. 0.05,0.5")
    p.add_argument("--seeds", type=ints, default=[0], help="e.g. 0,1,2")
    p.add_argument("--out", required=True, help="sweep directory (one run directory per grid point)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (subprocesses, threads split)")
    p.add_argument("--steps", type=int, help="optimiser steps per run (train.max_steps)")
    p.add_argument("--eval-samples", type=int, help="generated samples for FID (eval.num_samples)")
    p.add_argument("--first-stage", help="first-stage directory for latent presets (default: trained once)")
    p.add_argument("--fid-weights", help="standard Inception weights file: Inception FID")
    p.add_argument(
        "--report-to",
        choices=TRACKERS,
        help="every run (and its evaluation) logs to TensorBoard / W&B: one tracker run per grid point, "
        "grouped by the sweep (train.report_to)",
    )
    add_quiet_option(p)


def run(args: argparse.Namespace) -> int:
    sweep(call(SweepSpec, args, overrides=args.set), quiet=args.quiet)
    return 0
