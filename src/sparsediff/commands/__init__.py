"""The ``sparsediff`` command line: one module per verb, registered one way.

Each verb module defines ``NAME`` (the verb), ``HELP`` (one line for ``sparsediff --help``), optionally
``DESCRIPTION`` (for ``sparsediff VERB --help``), ``add_arguments(parser)`` and ``run(args) -> int``.
:data:`VERBS` lists them in the order ``sparsediff --help`` shows; :func:`build_parser` turns the list
into the parser and :func:`main` runs the chosen verb. The verbs only parse options and print: what they
run lives in the library modules (``sparsediff.train``, ``sparsediff.sample``, ...), and the options
shared between verbs are declared once in :mod:`.common`.
"""

from __future__ import annotations

import argparse
import sys
from types import ModuleType

from .. import __version__
from ..errors import SparsediffError
from . import (
    demo,
    evaluate,
    export,
    finetune,
    inspect,
    report,
    sample,
    sweep,
    train,
    train_autoencoder,
    train_features,
)

__all__ = ["VERBS", "build_parser", "main"]

VERBS: tuple[ModuleType, ...] = (
    inspect,
    train,
    train_autoencoder,
    sample,
    evaluate,
    demo,
    finetune,
    export,
    sweep,
    report,
    train_features,
)


def build_parser() -> argparse.ArgumentParser:
    """The ``sparsediff`` parser: one sub-command per module of :data:`VERBS`."""
    parser = argparse.ArgumentParser(
        prog="sparsediff", description="Sparse-to-sparse training of diffusion models."
    )
    parser.add_argument("--version", action="version", version=f"sparsediff {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for verb in VERBS:
        p = sub.add_parser(verb.NAME, help=verb.HELP, description=getattr(verb, "DESCRIPTION", verb.HELP))
        verb.add_arguments(p)
        p.set_defaults(verb=verb)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``sparsediff ARGV``: 0 on success, 2 with a one-line message on an error a user can cause."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.verb.run(args) or 0)
    except SparsediffError as e:
        print(f"sparsediff {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sparsediff {args.command}: interrupted", file=sys.stderr)
        return 130
