"""The ``sparsediff`` command line: a thin layer over the library; each command lives in its module."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .errors import SparsediffError

# ---------------------------------------------------------------------------- shared options


def _add_config_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", required=True, help="preset name or YAML path (sparsediff inspect --list)")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        default=[],
        help="override any preset field, e.g. --set train.lr=1e-4 (repeatable)",
    )


def _add_sparse_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sparsity")
    g.add_argument("--method", choices=["dense", "static", "rigl", "magran", "srste"], help="sparse method")
    g.add_argument("--sparsity", type=float, help="global sparsity of the sparsified weights, in [0, 1)")
    g.add_argument("--distribution", choices=["uniform", "er", "erk"])
    g.add_argument("--prune-ratio", type=float, help="fraction of active weights moved at the first update")
    g.add_argument("--update-every", type=int, help="optimiser steps between topology updates")
    g.add_argument("--nm", help="N:M pattern for srste, e.g. 2:4")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    from .config import deep_update, parse_overrides

    out = parse_overrides(args.set)
    direct = {
        ("sparse", "method"): getattr(args, "method", None),
        ("sparse", "sparsity"): getattr(args, "sparsity", None),
        ("sparse", "distribution"): getattr(args, "distribution", None),
        ("sparse", "prune_ratio"): getattr(args, "prune_ratio", None),
        ("sparse", "update_every"): getattr(args, "update_every", None),
        ("sparse", "nm"): getattr(args, "nm", None),
        ("train", "max_steps"): getattr(args, "steps", None),
        ("train", "batch_size"): getattr(args, "batch_size", None),
        ("train", "lr"): getattr(args, "lr", None),
        ("train", "seed"): getattr(args, "seed", None),
        ("first_stage", "path"): getattr(args, "first_stage", None),
    }
    for (section, key), value in direct.items():
        if value is not None:
            deep_update(out, {section: {key: value}})
    return out


def _load(args: argparse.Namespace):
    from .config import load_config

    cfg = load_config(args.preset, _overrides(args))
    if cfg.sparse.method in ("static", "rigl", "magran") and cfg.sparse.sparsity == 0.0:
        from .errors import ConfigError

        raise ConfigError(f"method {cfg.sparse.method} needs --sparsity (the preset has 0.0)")
    return cfg


def default_run_dir(cfg) -> Path:
    s = cfg.sparse
    tag = s.method if s.method in ("dense", "srste") else f"{s.method}-s{s.sparsity:g}"
    return Path("runs") / f"{cfg.name}-{tag}-seed{cfg.train.seed}"


# ---------------------------------------------------------------------------- commands


def cmd_train(args: argparse.Namespace) -> int:
    from .train import load_run_config, train

    if args.resume and args.out and (Path(args.out) / "config.yaml").exists() and args.preset is None:
        cfg = load_run_config(Path(args.out))
    else:
        if args.preset is None:
            raise SystemExit("sparsediff train: --preset is required (or --resume --out RUN_DIR)")
        cfg = _load(args)
    out = Path(args.out) if args.out else default_run_dir(cfg)
    summary = train(cfg, out, resume=args.resume, quiet=args.quiet, stop_after=args.stop_after)
    if summary and not args.quiet:
        print(
            f"run written to {out}: {summary['steps']} steps, density {summary['density']:.3f}, "
            f"{summary['train_seconds']:.0f}s"
        )
    return 0


def cmd_train_autoencoder(args: argparse.Namespace) -> int:
    from .train_autoencoder import train_autoencoder

    cfg = _load(args)
    out = Path(args.out) if args.out else Path("runs") / f"{cfg.name}-autoencoder"
    meta = train_autoencoder(cfg, out, steps=args.steps, force=args.force, quiet=args.quiet)
    if args.json:
        print(json.dumps(meta, indent=2))
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from .sample import sample_run

    info = sample_run(
        args.run,
        num=args.num,
        sampler=args.sampler,
        steps=args.steps,
        eta=args.eta,
        seed=args.seed,
        out=args.out,
        use_ema=not args.no_ema,
        batch_size=args.batch_size,
        device=args.device,
        quiet=args.quiet,
    )
    print(
        json.dumps(info, indent=2)
        if args.json
        else f"{info['files']} samples in {info['out']} (grid {info['grid']})"
    )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_run

    result = evaluate_run(
        args.run,
        num_samples=args.num_samples,
        fid_weights=args.fid_weights,
        extractor=args.feature_extractor,
        sampler=args.sampler,
        steps=args.steps,
        seed=args.seed,
        num_reference=args.num_reference,
        use_ema=not args.no_ema,
        device=args.device,
        quiet=args.quiet,
    )
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        fid = result["fid"]
        print(
            f"{fid['metric']} = {fid['value']:.3f} ({result['num_samples']} samples vs {result['num_reference']} "
            f"held-out); non-zero params {result['params_nonzero']:,} / {result['params_total']:,}; "
            f"written to {Path(args.run) / 'eval.json'}"
        )
    return 0


# ---------------------------------------------------------------------------- parser


def _lazy(module: str, func: str = "main"):
    return lambda a: getattr(__import__(f"sparsediff.{module}", fromlist=[func]), func)(a)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="sparsediff", description="Sparse-to-sparse training of diffusion models."
    )
    parser.add_argument("--version", action="version", version=f"sparsediff {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

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
    p.set_defaults(func=_lazy("inspect_cmd"))

    p = sub.add_parser("train", help="train a denoiser (dense or sparse from the first step)")
    p.add_argument("--preset", help="preset name or YAML path")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", default=[], help="override a preset field")
    _add_sparse_options(p)
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
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("train-autoencoder", help="train the first stage of a latent-diffusion preset")
    _add_config_options(p)
    p.add_argument("--steps", type=int, help="training steps (first_stage.steps)")
    p.add_argument("--out", help="output directory (default runs/<preset>-autoencoder)")
    p.add_argument("--force", action="store_true", help="retrain even if --out holds a first stage")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_train_autoencoder)

    p = sub.add_parser("sample", help="draw samples from a run (PNG files and a grid)")
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--num", type=int, default=64)
    p.add_argument("--sampler", choices=["ddim", "ddpm"])
    p.add_argument("--steps", type=int, help="DDIM steps")
    p.add_argument("--eta", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--out", help="output folder (default RUN/samples/<sampler>-<steps>-seed<seed>)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--device")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("evaluate", help="FID, parameters and FLOPs of a run -> eval.json")
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--num-samples", type=int, help="generated samples (eval.num_samples)")
    p.add_argument("--num-reference", type=int, help="held-out images (default: the whole split)")
    p.add_argument("--fid-weights", help="standard Inception weights file: gives Inception FID")
    p.add_argument("--feature-extractor", help="sparsediff-fmnist | sparsediff-strokes | inception-v3-compat")
    p.add_argument("--sampler", choices=["ddim", "ddpm"])
    p.add_argument("--steps", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ema", action="store_true")
    p.add_argument("--device")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("demo", help="run the main demo on bundled data")
    p.add_argument("--engine", action="store_true", help="engine-only demo on synthetic data")
    p.add_argument("--steps", type=int, default=1500, help="denoiser training steps")
    p.add_argument("--num-samples", type=int, default=500, help="samples per model for FID")
    p.add_argument("--stroke-steps", type=int, default=800, help="ChiroDiff training steps")
    p.add_argument("--stroke-samples", type=int, default=256, help="ChiroDiff samples per model for FID")
    p.add_argument("--no-strokes", action="store_true", help="skip the ChiroDiff KanjiVG section")
    p.add_argument("--out", default="runs/demo", help="demo directory")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_lazy("demo"))

    from . import experiments, export_cmd, finetune

    finetune.add_parser(sub)
    export_cmd.add_parser(sub)
    experiments.add_sweep_parser(sub)
    experiments.add_report_parser(sub)
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
