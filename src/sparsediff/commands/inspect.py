"""``sparsediff inspect``: per-layer density, non-zeros and FLOPs of a preset's denoiser."""

from __future__ import annotations

import argparse

from ..config import list_presets, load_raw, parse_overrides
from ..inspection import format_report, inspect_preset
from ..sparse.distribution import DISTRIBUTIONS
from .common import add_json_option, call, emit

NAME = "inspect"
HELP = "per-layer density, non-zeros and FLOPs of a preset's denoiser"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="unet-tiny", help="preset name or YAML path (see --list)")
    p.add_argument(
        "--sparsity", type=float, default=0.0, help="global sparsity of the target weights, in [0, 1)"
    )
    p.add_argument("--distribution", default="erk", choices=DISTRIBUTIONS)
    p.add_argument("--include", nargs="*", default=None, help="only sparsify weights matching these patterns")
    p.add_argument("--exclude", nargs="*", default=None, help="keep weights matching these patterns dense")
    p.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a preset field (model.args.x=1)"
    )
    add_json_option(p, "print machine-readable JSON")
    p.add_argument("--list", action="store_true", help="list the available presets and exit")


def run(args: argparse.Namespace) -> int:
    if args.list:
        for name in list_presets():
            print(f"{name:<24} {load_raw(name).get('description', '')}")
        return 0
    info = call(inspect_preset, args, overrides=parse_overrides(args.set))
    emit(args, info, format_report(info))
    return 0
