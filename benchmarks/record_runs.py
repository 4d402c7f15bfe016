"""Copy the light files of finished run directories into ``benchmarks/results/`` and report on the copies.

Recorded runs are committed without checkpoints, latent caches or individual samples: each run keeps
its config, summary, evaluation, metrics and evaluation sample grid (all that ``sparsediff report``
reads; the names are :class:`sparsediff.run.RunDir`'s), so the committed report can be regenerated from
the committed files::

    .venv/bin/python benchmarks/record_runs.py runs/grid benchmarks/results/ldm-fmnist-grid \
        --command "sparsediff sweep --preset ldm-fmnist ... --out runs/grid"
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from sparsediff.report import find_runs, report
from sparsediff.run import RunDir
from sparsediff.sweep.plan import MANIFEST
from sparsediff.sweep.runner import FIRST_STAGE

LIGHT_FILES = (
    RunDir.CONFIG,
    RunDir.SUMMARY,
    RunDir.EVAL,
    RunDir.METRICS,
    f"{RunDir.EVAL_DIR}/grid.png",
    MANIFEST,
)


def record(src_dirs: list[Path], dest: Path, command: str | None = None) -> dict:
    dest.mkdir(parents=True, exist_ok=True)
    for run in find_runs(src_dirs):
        target = dest / "runs" / run.name
        for name in LIGHT_FILES:
            if (run / name).is_file():
                (target / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(run / name, target / name)
    for src in src_dirs:  # the sweep's own record and the first stage's summary, when present
        for name in (MANIFEST, f"{FIRST_STAGE}/{RunDir.SUMMARY}"):
            if (src / name).is_file():
                out = dest / name.replace("/", "-")
                shutil.copyfile(src / name, out)
    result = report([dest / "runs"], out=dest)
    if command:
        (dest / "COMMAND.md").write_text(f"# Reproduce\n\n```bash\n{command.strip()}\n```\n")
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", nargs="+", type=Path, help="directories holding run directories")
    p.add_argument("dest", type=Path, help="folder under benchmarks/results/")
    p.add_argument("--command", help="the command(s) that produced the runs, written to COMMAND.md")
    args = p.parse_args()
    out = record(args.src, args.dest, args.command)
    print(f"{out['runs']} runs -> {out['report']}")


if __name__ == "__main__":
    main()
