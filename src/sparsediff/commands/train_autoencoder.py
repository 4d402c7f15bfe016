"""``sparsediff train-autoencoder``: train the first stage of a latent-diffusion preset."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..train_autoencoder import train_autoencoder
from .common import add_config_options, add_json_option, add_quiet_option, call, emit, load_run_config

NAME = "train-autoencoder"
HELP = "train the first stage of a latent-diffusion preset"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_options(p)
    p.add_argument("--steps", type=int, help="training steps (first_stage.steps)")
    p.add_argument("--out", help="output directory (default runs/<preset>-autoencoder)")
    p.add_argument("--force", action="store_true", help="retrain even if --out holds a first stage")
    add_json_option(p, "print the first stage's metadata as JSON")
    add_quiet_option(p)


def run(args: argparse.Namespace) -> int:
    cfg = load_run_config(args)
    out = Path(args.out) if args.out else Path("runs") / f"{cfg.name}-autoencoder"
    meta = call(train_autoencoder, args, cfg=cfg, out=out)
    emit(args, meta, None)
    return 0
