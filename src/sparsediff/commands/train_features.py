"""``sparsediff train-features``: train the offline FID feature network of a dataset kind.

The shipped networks (``sparsediff/assets/features-<kind>.safetensors``) were made with
``sparsediff train-features fmnist`` and ``sparsediff train-features strokes --kanjivg``; see
:mod:`sparsediff.metrics.features` for what they are and why.
"""

from __future__ import annotations

import argparse

from ..errors import ConfigError
from ..metrics.features import KINDS, kanjivg_feature_data, read_feature_data, train_feature_net
from .common import add_json_option, add_quiet_option, call, emit

NAME = "train-features"
HELP = "train the offline FID feature network (fmnist, strokes) shipped in sparsediff/assets"
DEFAULT_COPIES = 6


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("kind", choices=KINDS)
    p.add_argument(
        "--data",
        help="an .npz with uint8 `images` (N, 32, 32), int `labels` (N,) and optionally int `groups` (N,) "
        "(held out whole); for strokes, or use --kanjivg",
    )
    p.add_argument(
        "--kanjivg",
        action="store_true",
        help="strokes: make the data from the installed KanjiVG (stroke-count classes, augmented copies)",
    )
    p.add_argument(
        "--copies", type=int, default=DEFAULT_COPIES, help="--kanjivg: rasters per character (default 6)"
    )
    p.add_argument("--out", help="weights file to write (default: the package's shipped asset)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    add_json_option(p, "print the weights' metadata as JSON")
    add_quiet_option(p)


def run(args: argparse.Namespace) -> int:
    dataset, data_option, extra_meta = None, None, None
    if args.kanjivg:
        if args.kind != "strokes" or args.data:
            raise ConfigError("--kanjivg makes the data of the strokes network; it goes without --data")
        dataset, extra_meta = kanjivg_feature_data(args.copies, args.seed, progress=not args.quiet)
        data_option = "--kanjivg" + (f" --copies {args.copies}" if args.copies != DEFAULT_COPIES else "")
    elif args.data:
        dataset = read_feature_data(args.data)
    meta = call(
        train_feature_net,
        args,
        progress=not args.quiet,
        dataset=dataset,
        data_option=data_option,
        extra_meta=extra_meta,
    )
    emit(
        args,
        meta,
        f"features-{meta['kind']}: test accuracy {meta['test_accuracy']:.4f} ({meta['test_split']}), "
        f"written to {meta['path']} and {meta['json_path']}",
    )
    return 0
