"""What the verbs of the command line share: option groups, config loading, calling and printing.

Every verb's options are named like the keyword arguments of the library function it runs (``--no-ema``
stores ``use_ema``, ``--run`` stores ``run_dir``), so that :func:`call` hands them over without a
hand-written list per verb; a verb passes explicitly only what it computes itself.
"""

from __future__ import annotations

import argparse
import inspect
import json
from collections.abc import Callable
from typing import Any, TypeVar

from ..config import RunConfig, deep_update, load_config, parse_overrides
from ..diffusion.samplers import SAMPLERS
from ..sparse.distribution import DISTRIBUTIONS
from ..sparse.runtime import BACKENDS
from ..sparse.spec import BACKENDS as SPARSE_BACKENDS
from ..sparse.spec import METHODS
from ..sparse.spec import POLICIES as KERNEL_POLICIES

T = TypeVar("T")

# ---------------------------------------------------------------------------- option groups


def add_preset_option(p: argparse.ArgumentParser, *, required: bool = True, **kwargs: Any) -> None:
    """``--preset NAME_OR_YAML`` (``kwargs`` may replace the default, the help)."""
    kwargs.setdefault("help", "preset name or YAML path (sparsediff inspect --list)")
    p.add_argument("--preset", required=required, **kwargs)


def add_set_option(p: argparse.ArgumentParser) -> None:
    """``--set KEY=VALUE`` (repeatable): overrides of any config field, parsed by :func:`overrides`."""
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        default=[],
        help="override any preset field, e.g. --set train.lr=1e-4 (repeatable)",
    )


def add_config_options(p: argparse.ArgumentParser, *, required: bool = True, **preset: Any) -> None:
    """``--preset`` and ``--set``: the run configuration a verb starts from."""
    add_preset_option(p, required=required, **preset)
    add_set_option(p)


def add_sparse_options(p: argparse.ArgumentParser) -> None:
    """The ``sparse:`` section fields a run is most often started with (any other: ``--set sparse.x=``)."""
    g = p.add_argument_group("sparsity")
    g.add_argument("--method", choices=METHODS, help="sparse method")
    g.add_argument("--sparsity", type=float, help="global sparsity of the sparsified weights, in [0, 1)")
    g.add_argument("--distribution", choices=DISTRIBUTIONS, help="layer-wise densities")
    g.add_argument("--prune-ratio", type=float, help="fraction of active weights moved at the first update")
    g.add_argument("--update-every", type=int, help="optimiser steps between topology updates")
    g.add_argument("--nm", help="N:M pattern for srste, e.g. 2:4")
    g.add_argument(
        "--backend",
        dest="sparse_backend",
        choices=SPARSE_BACKENDS,
        help="how sparse weights train: dense (a masked dense tensor) or sparse (the non-zeros only, on "
        "sparse kernels: faster and smaller; static, rigl, magran)",
    )
    g.add_argument(
        "--kernels",
        choices=KERNEL_POLICIES,
        help="backend sparse: each layer's kernels by a density rule (auto), timed (measure), or all one kind",
    )


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    """How a run's denoiser is sampled: sampler, steps, seed, weights, device."""
    p.add_argument("--sampler", choices=SAMPLERS, help="default: the run's sample.sampler")
    p.add_argument("--steps", type=int, help="sampling steps (default: the run's sample.steps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--no-ema", dest="use_ema", action="store_false", help="use the raw weights instead of the EMA"
    )
    p.add_argument("--device", help="e.g. cuda:1 (default: CUDA when available, else the CPU)")
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default="dense",
        help="dense: masked dense weights; sparse: compressed weights through the native CPU kernels",
    )


def add_watch_options(p: argparse.ArgumentParser) -> None:
    """``--report-to`` and ``--sample-every``: how a run is watched while it trains (``train.report_to``,
    ``train.sample_every``)."""
    from ..watch import TRACKERS

    g = p.add_argument_group("watching the run")
    g.add_argument(
        "--report-to",
        choices=TRACKERS,
        help="log metrics, sample grids and the topology to TensorBoard (RUN/tensorboard), W&B (RUN/wandb; "
        "WANDB_MODE=offline without a network) or both, through accelerate (pip install "
        "'sparsediff[tracking]'); default: the preset's train.report_to (none)",
    )
    g.add_argument(
        "--sample-every",
        type=int,
        metavar="STEPS",
        help="draw a fixed-seed EMA sample grid into RUN/samples/during/ every STEPS steps (0: none; "
        "default: the preset's train.sample_every)",
    )


def add_run_option(p: argparse.ArgumentParser, help: str = "run directory") -> None:
    """``--run RUN``: the run directory a verb reads (stored as ``run_dir``)."""
    p.add_argument("--run", dest="run_dir", metavar="RUN", required=True, help=help)


def add_quiet_option(p: argparse.ArgumentParser) -> None:
    """``--quiet``: no progress bars or progress lines (for scripts)."""
    p.add_argument("--quiet", action="store_true", help="no progress output")


def add_json_option(p: argparse.ArgumentParser, help: str = "print the result as JSON") -> None:
    """``--json``: machine-readable output instead of the one-line summary."""
    p.add_argument("--json", action="store_true", help=help)


# ---------------------------------------------------------------------------- option types


def _comma_list(convert: Callable[[str], T], what: str) -> Callable[[str], list[T]]:
    def parse(text: str) -> list[T]:
        try:
            return [convert(x.strip()) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from None

    return parse


floats = _comma_list(float, "numbers")
"""Option type: ``0.25,0.5`` -> ``[0.25, 0.5]``."""
ints = _comma_list(int, "whole numbers")
"""Option type: ``0,1,2`` -> ``[0, 1, 2]``."""
names = _comma_list(str, "names")
"""Option type: ``dense,rigl`` -> ``["dense", "rigl"]``."""


# ---------------------------------------------------------------------------- configs

# Options that set one config field each: (section, key) -> option name (``args`` attribute).
CONFIG_OPTIONS = {
    ("sparse", "method"): "method",
    ("sparse", "sparsity"): "sparsity",
    ("sparse", "distribution"): "distribution",
    ("sparse", "prune_ratio"): "prune_ratio",
    ("sparse", "update_every"): "update_every",
    ("sparse", "nm"): "nm",
    ("sparse", "backend"): "sparse_backend",
    ("sparse", "kernels"): "kernels",
    ("train", "max_steps"): "steps",
    ("train", "batch_size"): "batch_size",
    ("train", "lr"): "lr",
    ("train", "seed"): "seed",
    ("train", "sample_every"): "sample_every",
    ("train", "report_to"): "report_to",
    ("first_stage", "path"): "first_stage",
}


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The config overrides of a verb's options: ``--set`` items and the options of :data:`CONFIG_OPTIONS`
    the verb has and was given."""
    out = parse_overrides(args.set)
    for (section, key), option in CONFIG_OPTIONS.items():
        value = getattr(args, option, None)
        if value is not None:
            deep_update(out, {section: {key: value}})
    return out


def load_run_config(args: argparse.Namespace) -> RunConfig:
    """The validated config of ``--preset`` with the verb's overrides."""
    return load_config(args.preset, overrides(args))


# ---------------------------------------------------------------------------- calling and printing

# What the parser itself stores in ``args`` (the verb's name and module): never a library argument.
_PARSER_KEYS = ("command", "verb")


def call(func: Callable[..., T], args: argparse.Namespace, **given: Any) -> T:
    """``func(**given)`` plus every option in ``args`` named like one of ``func``'s parameters."""
    params = inspect.signature(func).parameters
    options = {
        k: v for k, v in vars(args).items() if k in params and k not in given and k not in _PARSER_KEYS
    }
    return func(**options, **given)


def emit(args: argparse.Namespace, result: Any, line: str | None) -> None:
    """Print ``result`` as JSON with ``--json``, else ``line`` (nothing when it is None)."""
    if getattr(args, "json", False):
        print(json.dumps(result, indent=2))
    elif line is not None:
        print(line)
