"""``sparsediff sample``: draw samples from a run (PNG files and a grid)."""

from __future__ import annotations

import argparse

from ..sample import sample_run
from .common import add_json_option, add_quiet_option, add_run_option, add_sampling_options, call, emit

NAME = "sample"
HELP = "draw samples from a run (PNG files and a grid)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_option(p)
    p.add_argument("--num", type=int, default=64, help="number of samples")
    add_sampling_options(p)
    p.add_argument("--eta", type=float, help="DDIM eta (default: the run's sample.eta)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--out", help="output folder (default RUN/samples/<sampler>-<steps>-seed<seed>)")
    add_json_option(p)
    add_quiet_option(p)


def run(args: argparse.Namespace) -> int:
    info = call(sample_run, args)
    emit(args, info, f"{info['files']} samples in {info['out']} (grid {info['grid']})")
    return 0
