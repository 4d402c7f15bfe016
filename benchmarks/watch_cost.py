"""What watching a run costs: the during-training sample grid and the dashboard's topology picture.

For each CPU preset (``ldm-fmnist``, ``chirodiff-kanjivg-cpu``), dense and RigL 90 % on the sparse
backend: a run of ``--steps`` steps with a grid every ``--grid-every`` steps (3 grids by default), through
``sparsediff.train``. The cost of the presets' own setting (a grid every ``train.sample_every`` steps) is
the time of one grid over that many step times: ``grid seconds / (sample_every x seconds per step)``, both
measured in the same run. Step times are the trainer's own (grids are kept out of them).

The dashboard picture (``watch.topology_bars``) is timed on the RigL run's summary, median of 20.

    .venv/bin/python benchmarks/watch_cost.py --first-stage runs/demo/autoencoder    # about 4 minutes

Run it alone on the machine: the numbers are worthless while anything else uses the cores.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from sparsediff.config import load_config
from sparsediff.train import train
from sparsediff.watch import topology_bars

RESULTS = Path(__file__).parent / "results" / "watch_cost.json"
SETTINGS = (("dense", 0.0, "dense"), ("rigl", 0.9, "sparse"))


def measure(preset: str, overrides: dict, steps: int, every: int, out: Path) -> dict:
    cfg = load_config(preset, overrides)
    summary = train(cfg, out, quiet=True)
    step_seconds = summary["train_seconds"] / summary["steps"]
    grid_seconds = summary["sample_grid_seconds"] / summary["sample_grids"]
    default_every = load_config(preset).train.sample_every
    return {
        "steps": summary["steps"],
        "seconds_per_step": step_seconds,
        "grids": summary["sample_grids"],
        "seconds_per_grid": grid_seconds,
        "preset_sample_every": default_every,
        "cost_at_preset_default": grid_seconds / (default_every * step_seconds),
        "topology": summary.get("topology"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--first-stage", required=True, help="an ldm-fmnist first stage (make demo trains one)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--grid-every", type=int, default=100)
    args = p.parse_args()
    results: dict = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "threads": torch.get_num_threads(),
        },
        "torch": torch.__version__,
        "settings": {"steps": args.steps, "grid_every": args.grid_every},
        "runs": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for preset, extra in (
            ("ldm-fmnist", {"first_stage": {"path": args.first_stage}, "data": {"train_size": 20000}}),
            ("chirodiff-kanjivg-cpu", {}),
        ):
            for method, sparsity, backend in SETTINGS:
                overrides = {
                    **extra,
                    "sparse": {"method": method, "sparsity": sparsity, "backend": backend},
                    "train": {"max_steps": args.steps, "sample_every": args.grid_every},
                }
                name = f"{preset}/{method}-{backend}"
                out = Path(tmp) / name.replace("/", "-")
                results["runs"][name] = r = measure(preset, overrides, args.steps, args.grid_every, out)
                print(
                    f"{name}: {r['seconds_per_step'] * 1e3:.1f} ms/step, {r['seconds_per_grid']:.2f} s/grid, "
                    f"a grid every {r['preset_sample_every']} steps costs {r['cost_at_preset_default']:.2%}"
                )
    rigl = results["runs"]["ldm-fmnist/rigl-sparse"]["topology"]["layers"]
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        topology_bars(rigl, "step 0")
        times.append(time.perf_counter() - t0)
    results["topology_bars"] = {"layers": len(rigl), "median_seconds": statistics.median(times)}
    print(
        f"dashboard topology picture, {len(rigl)} layers: {statistics.median(times) * 1e3:.1f} ms (median of 20)"
    )
    for r in results["runs"].values():
        r.pop("topology")
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
