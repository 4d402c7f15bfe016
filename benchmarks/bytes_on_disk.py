"""Bytes on disk: compressed checkpoints and sparse exports against dense ones (issue 14).

For each preset, trains a dense run and a RigL 90 % run for a few steps (sizes do not depend on how long
a run trained), then measures:

- the whole checkpoint directory (model, EMA, optimiser, engine, trainer.json) of both runs, and the
  RigL checkpoint's tensors written uncompressed (what checkpoints took before compression);
- the exported model: ``export --format sparse`` of the RigL run in float32 and bfloat16 against
  ``export --format masked-dense`` of the dense run (and the dense run's checkpoint ``model.safetensors``).

Usage::

    .venv/bin/python benchmarks/bytes_on_disk.py                  # about 2 minutes on 2 cores
    .venv/bin/python benchmarks/bytes_on_disk.py --work /tmp/bod --steps 3

Writes ``benchmarks/results/bytes_on_disk.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save

from sparsediff.checkpoint import directory_nbytes, load_tensors
from sparsediff.run import RunDir

PRESETS = ("ldm-fmnist", "chirodiff-kanjivg-cpu")
FILES = ("model.safetensors", "ema.safetensors", "optimizer.safetensors", "engine.safetensors")


def cli(*args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    subprocess.run([sys.executable, "-m", "sparsediff", *args], check=True, env=env)


def uncompressed_nbytes(ckpt: Path) -> int:
    """Bytes of the checkpoint's tensor files written as plain safetensors (before compression)."""
    total = (ckpt / "trainer.json").stat().st_size
    for name in FILES:
        tensors, meta = load_tensors(ckpt / name)
        total += len(save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta or None))
    return total


def measure(preset: str, work: Path, steps: int) -> dict:
    extra: list[str] = []
    if preset.startswith("ldm"):
        ae = work / "autoencoder"
        if not ae.exists():
            cli("train-autoencoder", "--preset", preset, "--steps", "20", "--out", str(ae), "--quiet")
        extra = ["--first-stage", str(ae)]
    runs = {}
    for method in ("dense", "rigl"):
        out = work / f"{preset}-{method}"
        if not RunDir(out).summary_path.exists():
            cli(
                "train", "--preset", preset, *extra, "--method", method, "--sparsity", "0.9",
                "--steps", str(steps), "--set", f"train.ckpt_every={steps}", "--out", str(out), "--quiet",
            )  # fmt: skip
        runs[method] = out
    exports = {
        "dense_masked_dense": (runs["dense"], "masked-dense", None),
        "rigl_sparse_float32": (runs["rigl"], "sparse", None),
        "rigl_sparse_bfloat16": (runs["rigl"], "sparse", "bfloat16"),
    }
    files = {}
    for key, (run, fmt, dtype) in exports.items():
        path = work / f"{preset}-{key}.safetensors"
        cli(
            "export",
            "--run",
            str(run),
            "--format",
            fmt,
            "--out",
            str(path),
            *(["--dtype", dtype] if dtype else []),
        )
        files[key] = path.stat().st_size
    dense_ckpt, rigl_ckpt = (RunDir(runs[m]).checkpoints.latest() for m in ("dense", "rigl"))
    result = {
        "preset": preset,
        "steps": steps,
        "params": sum(t.numel() for t in load_tensors(rigl_ckpt / "model.safetensors")[0].values()),
        "checkpoint_dense": directory_nbytes(dense_ckpt),
        "checkpoint_rigl": directory_nbytes(rigl_ckpt),
        "checkpoint_rigl_uncompressed": uncompressed_nbytes(rigl_ckpt),
        "checkpoint_files_rigl": {f: (rigl_ckpt / f).stat().st_size for f in FILES},
        "checkpoint_files_dense": {f: (dense_ckpt / f).stat().st_size for f in FILES},
        "model_file_dense_checkpoint": (dense_ckpt / "model.safetensors").stat().st_size,
        **{f"export_{k}": v for k, v in files.items()},
    }
    result["checkpoint_ratio"] = result["checkpoint_rigl"] / result["checkpoint_dense"]
    result["export_float32_ratio"] = files["rigl_sparse_float32"] / files["dense_masked_dense"]
    result["export_bfloat16_ratio"] = files["rigl_sparse_bfloat16"] / files["dense_masked_dense"]
    return result


def table(results: list[dict]) -> str:
    kb = lambda n: f"{n / 1e3:,.1f} kB"  # noqa: E731
    lines = [
        "| preset | params | dense checkpoint | RigL 90 % checkpoint (uncompressed) | ratio | dense model "
        "(masked-dense export) | RigL 90 % sparse export float32 | ratio | bfloat16 | ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| `{r['preset']}` | {r['params']:,} | {kb(r['checkpoint_dense'])} | {kb(r['checkpoint_rigl'])} "
            f"({kb(r['checkpoint_rigl_uncompressed'])}) | **{r['checkpoint_ratio']:.3f}x** | "
            f"{kb(r['export_dense_masked_dense'])} | {kb(r['export_rigl_sparse_float32'])} | "
            f"**{r['export_float32_ratio']:.3f}x** | {kb(r['export_rigl_sparse_bfloat16'])} | "
            f"{r['export_bfloat16_ratio']:.3f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", help="directory for the runs (default: a temporary one)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--presets", nargs="*", default=list(PRESETS))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bytes_on_disk.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    work = Path(args.work or tempfile.mkdtemp(prefix="bytes-on-disk-"))
    work.mkdir(parents=True, exist_ok=True)
    results = [measure(p, work, args.steps) for p in args.presets]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"torch": torch.__version__, "results": results}, indent=2))
    print(table(results))


if __name__ == "__main__":
    main()
