"""The ``sparsediff`` command line, kept importable under its first name: see :mod:`sparsediff.commands`."""

from .commands import build_parser, main

__all__ = ["build_parser", "main"]
