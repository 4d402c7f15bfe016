"""``sparsediff demo``: the main demo on bundled data, or the engine-only demo (see :mod:`sparsediff.demo`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..demo import engine_demo, run_demo
from .common import add_quiet_option, call

NAME = "demo"
HELP = "run the main demo on bundled data"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", action="store_true", help="engine-only demo on synthetic data")
    p.add_argument("--steps", type=int, default=1500, help="denoiser training steps")
    p.add_argument("--num-samples", type=int, default=500, help="samples per model for FID")
    p.add_argument("--stroke-steps", type=int, default=800, help="ChiroDiff training steps")
    p.add_argument("--stroke-samples", type=int, default=256, help="ChiroDiff samples per model for FID")
    p.add_argument(
        "--no-strokes", dest="strokes", action="store_false", help="skip the ChiroDiff KanjiVG section"
    )
    p.add_argument("--out", default="runs/demo", help="demo directory")
    add_quiet_option(p)


def run(args: argparse.Namespace) -> int:
    if args.engine:
        engine_demo(steps=args.steps or 1500, quiet=args.quiet)
    else:
        call(run_demo, args, out=Path(args.out))
    return 0
