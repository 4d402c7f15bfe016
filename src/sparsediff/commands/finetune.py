"""``sparsediff finetune``: make a pretrained denoiser N:M-sparse into a new run directory."""

from __future__ import annotations

import argparse

from ..config import deep_update, parse_overrides
from ..finetune import FINETUNE_METHODS, finetune
from .common import add_json_option, add_preset_option, add_quiet_option, add_set_option, call, emit

NAME = "finetune"
HELP = "make a pretrained denoiser N:M-sparse: SR-STE fine-tuning with distillation, or one-shot"
DESCRIPTION = (
    "Make a pretrained denoiser N:M-sparse into a new run directory. srste: SR-STE fine-tuning "
    "with distillation from the frozen dense source (SparseDM); oneshot: magnitude N:M pruning, "
    "no training."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--from",
        dest="source",
        required=True,
        metavar="RUN_OR_DIR",
        help="a sparsediff run directory, or a diffusers UNet2DModel directory (with --preset)",
    )
    p.add_argument("--method", choices=FINETUNE_METHODS, default="srste")
    p.add_argument("--nm", help="N:M pattern, e.g. 2:4 (default 2:4, or the progressive schedule's last)")
    p.add_argument(
        "--progressive",
        metavar="PATTERNS",
        help="srste: patterns at equal intervals of training, e.g. 7:8,6:8,5:8,4:8,2:4 (or 7:8@0,2:4@500)",
    )
    p.add_argument("--distill-weight", type=float, help="weight of the teacher term (default 0.1)")
    p.add_argument("--steps", type=int, help="fine-tuning steps (default: the source config's length)")
    add_preset_option(p, required=False, help="preset name or YAML path, for a diffusers source only")
    p.add_argument("--first-stage", help="first-stage directory (sets first_stage.path)")
    add_set_option(p)
    p.add_argument(
        "--no-ema", dest="use_ema", action="store_false", help="start from a run's raw weights, not its EMA"
    )
    p.add_argument(
        "--prepare-only",
        action="store_true",
        help="srste: write the run directory without training; then `sparsediff train --resume --out DIR` "
        "(for several GPUs: under accelerate launch or torchrun)",
    )
    p.add_argument("--out", required=True, help="the new run directory")
    add_json_option(p, "print the summary as JSON")
    add_quiet_option(p)


def run(args: argparse.Namespace) -> int:
    overrides = parse_overrides(args.set)
    if args.first_stage:
        deep_update(overrides, {"first_stage": {"path": args.first_stage}})
    summary = call(finetune, args, overrides=overrides)
    if args.prepare_only:
        if not args.quiet:
            print(f"run prepared in {args.out}; train it with `sparsediff train --resume --out {args.out}`")
        return 0
    line = f"run written to {args.out}: {summary['method']} {summary.get('pattern') or ''}".rstrip()
    emit(
        args,
        summary,
        None if args.quiet else f"{line}, {summary['steps']} steps, density {summary['density']:.3f}",
    )
    return 0
