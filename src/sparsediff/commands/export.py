"""``sparsediff export``: a run's sparse denoiser as a file to deploy (see :mod:`sparsediff.export`).

Everything a format brings (its function, help, what ``--out`` is, its summary line) comes from the
format table :data:`sparsediff.export.FORMATS`; this module only turns the table into options.
"""

from __future__ import annotations

import argparse

from ..export import DTYPES, FORMATS
from .common import add_json_option, add_run_option, call, emit

NAME = "export"
HELP = "export a run's sparse denoiser: masked dense, sparse, a diffusers folder, or 2:4 semi-structured"
DESCRIPTION = " ".join(f"{f.name}: {f.help}." for f in FORMATS.values())


def _per_format(field: str) -> str:
    """``"a, b: text; c: other"``: the formats grouped by their ``field`` (in table order)."""
    groups: dict[str, list[str]] = {}
    for f in FORMATS.values():
        groups.setdefault(getattr(f, field), []).append(f.name)
    return "; ".join(f"{', '.join(names)}: {text}" for text, names in groups.items())


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_option(p)
    p.add_argument("--format", required=True, choices=list(FORMATS))
    p.add_argument("--dtype", choices=list(DTYPES), help=_per_format("dtype"))
    p.add_argument("--out", required=True, help=_per_format("out"))
    p.add_argument(
        "--no-ema", dest="use_ema", action="store_false", help="export the raw weights instead of the EMA"
    )
    p.add_argument("--batch-size", type=int, default=2, help="semi-structured: inputs of the output check")
    p.add_argument("--tolerance", type=float, help="semi-structured: allowed relative L2 difference")
    add_json_option(p, "print the report as JSON")


def run(args: argparse.Namespace) -> int:
    fmt = FORMATS[args.format]
    info = call(fmt.export, args, dtype=args.dtype or fmt.default_dtype)
    emit(args, info, fmt.summary(info))
    return 0
