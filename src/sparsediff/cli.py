"""The ``sparsediff`` command line: a thin layer over the library; each command lives in its module."""

from __future__ import annotations

import argparse
import sys

from .errors import SparsediffError


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="per-layer density, non-zeros and FLOPs of a preset's denoiser")
    p.add_argument("--preset", default="unet-tiny", help="preset name or YAML path (see --list)")
    p.add_argument(
        "--sparsity", type=float, default=0.0, help="global sparsity of the target weights, in [0, 1)"
    )
    p.add_argument("--distribution", default="erk", choices=["uniform", "er", "erk"])
    p.add_argument("--include", nargs="*", default=None, help="only sparsify weights matching these patterns")
    p.add_argument("--exclude", nargs="*", default=None, help="keep weights matching these patterns dense")
    p.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a preset field (model.args.x=1)"
    )
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.add_argument("--list", action="store_true", help="list the available presets and exit")
    p.set_defaults(func=lambda a: __import__("sparsediff.inspect_cmd", fromlist=["main"]).main(a))


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="run the main demo on bundled data")
    p.add_argument("--engine", action="store_true", help="engine-only demo on synthetic data")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=lambda a: __import__("sparsediff.demo", fromlist=["main"]).main(a))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparsediff",
        description="Sparse-to-sparse training of diffusion models.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"sparsediff {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_inspect(sub)
    _add_demo(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SparsediffError as e:
        print(f"sparsediff {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sparsediff {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
