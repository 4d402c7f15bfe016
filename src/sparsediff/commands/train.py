"""``sparsediff train``: train a denoiser, dense or sparse from the first step."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import RunConfig, config_from_dict, deep_update
from ..run import RunDir
from ..train import train
from .common import (
    add_config_options,
    add_quiet_option,
    add_sparse_options,
    add_watch_options,
    call,
    emit,
    load_run_config,
    overrides,
)

NAME = "train"
HELP = "train a denoiser (dense or sparse from the first step)"


def default_run_dir(cfg: RunConfig) -> Path:
    """``runs/<preset>-<method>[-s<sparsity>]-seed<seed>``: where a run goes without ``--out``."""
    s = cfg.sparse
    # a method with a sparsity of its own choosing (dense: none, N:M: its pattern) is named alone
    tag = s.method if not s.sparse_method.masked or s.structured else f"{s.method}-s{s.sparsity:g}"
    return Path("runs") / f"{cfg.name}-{tag}-seed{cfg.train.seed}"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_options(p, required=False)
    add_sparse_options(p)
    p.add_argument("--steps", type=int, help="optimiser steps (train.max_steps)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--first-stage", help="first-stage directory (train-autoencoder output or diffusers)")
    p.add_argument("--out", help="run directory (default runs/<preset>-<method>-s<sparsity>-seed<seed>)")
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its latest checkpoint"
    )
    p.add_argument(
        "--stop-after", type=int, help="stop (with a checkpoint) after this many steps in this call"
    )
    add_watch_options(p)
    add_quiet_option(p)


def run(args: argparse.Namespace) -> int:
    if args.resume and args.out and args.preset is None and RunDir(args.out).exists():
        # the run's own config, with what this call changes (what may change on resume is checked later)
        data = deep_update(RunDir(args.out).load_config().to_dict(), overrides(args))
        cfg = config_from_dict(data, source=str(RunDir(args.out).config_path))
    elif args.preset is None:
        raise SystemExit("sparsediff train: --preset is required (or --resume --out RUN_DIR)")
    else:
        cfg = load_run_config(args)
    out = Path(args.out) if args.out else default_run_dir(cfg)
    summary = call(train, args, cfg=cfg, run_dir=out)
    if summary and not args.quiet:
        emit(
            args,
            summary,
            f"run written to {out}: {summary['steps']} steps, density {summary['density']:.3f}, "
            f"{summary['train_seconds']:.0f}s",
        )
    return 0
