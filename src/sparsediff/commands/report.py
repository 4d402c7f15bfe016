"""``sparsediff report``: the paper-style table, plots and CSV from run directories."""

from __future__ import annotations

import argparse

from ..report import report
from .common import add_json_option, call, emit

NAME = "report"
HELP = "table (report.md), plots and results.csv from run directories"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dirs", nargs="+", metavar="DIR", help="directories holding run directories (searched)")
    p.add_argument("--out", help="output directory (default: the first DIR)")
    add_json_option(p, "print the written paths as JSON")


def run(args: argparse.Namespace) -> int:
    result = call(report, args)
    emit(
        args,
        result,
        f"{result['runs']} runs -> {result['report']}, {result['csv']}, {len(result['plots'])} plot(s)",
    )
    return 0
