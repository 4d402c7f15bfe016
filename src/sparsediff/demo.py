"""``sparsediff demo``: the main job on bundled data, end to end, in about a quarter of an hour on 2 cores.

Fashion-MNIST latent diffusion: train (or reuse) the first stage, train a dense denoiser and RigL 50 %
and 90 % ones from the same seed (the sparse ones truly sparse: ``backend: sparse``, compact layers on
sparse kernels), sample and evaluate them; then dense and RigL 50 % for ChiroDiff on KanjiVG strokes;
write ``runs/demo/report.md`` with a table per model family (FID in the shipped feature spaces, non-zero
parameters, FLOPs, training and sampling time against dense) and sample grids.
Finished steps are reused: running it again only redoes what is missing.

``--engine`` runs the engine-only demo instead: a small network trained dense and 90 %-sparse with RigL
on a synthetic regression task, printing losses and the density report.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .run import RunDir
from .sparse import count_flops, sparsify
from .sparse.methods import is_dense

DEMO_DIR = Path("runs/demo")
# (method, sparsity, backend) of the latent-diffusion runs and of the stroke runs
METHODS = (("dense", 0.0, "dense"), ("rigl", 0.5, "sparse"), ("rigl", 0.9, "sparse"))
STROKE_METHODS = (("dense", 0.0, "dense"), ("rigl", 0.5, "sparse"))


# ---------------------------------------------------------------------------- the main demo


def _fmt_flops(x: float | None) -> str:
    from .sparse.flops import format_flops

    return "-" if x is None else format_flops(x)


def _train_and_evaluate(
    preset: str,
    overrides: dict[str, Any],
    run_dir: Path,
    num_samples: int,
    quiet: bool,
    say,
    sampler: str | None = None,
    sampler_steps: int | None = None,
) -> dict[str, Any]:
    """Train one demo run (reused when finished, resumed when interrupted), then evaluate it."""
    from .config import load_config
    from .evaluate import evaluate_run
    from .train import train

    run = RunDir(run_dir)
    if (run.read_summary() or {}).get("finished"):
        say(f"[demo]     reusing the finished run {run_dir}")
    else:
        say(f"[demo]     training -> {run_dir}")
        train(load_config(preset, overrides), run_dir, resume=run.exists(), quiet=quiet)
    say(f"[demo]     evaluating {run_dir} on {num_samples} samples")
    result = evaluate_run(run_dir, num_samples=num_samples, sampler=sampler, steps=sampler_steps, quiet=quiet)
    say(f"[demo]     timing sampling with the dense and the sparse backend ({TIMING_SAMPLES} samples each)")
    result["sampling_time"] = time_backends(run_dir, TIMING_SAMPLES, sampler, sampler_steps)
    return result


TIMING_SAMPLES = 64


def time_backends(
    run_dir: Path, num: int, sampler: str | None = None, steps: int | None = None
) -> dict[str, float]:
    """Seconds to generate ``num`` samples on the CPU with each backend (same seed): the best of two runs
    each, in the order dense, sparse, sparse, dense, so that neither backend gets the warmer machine."""
    from .sample import generate

    times: dict[str, list[float]] = {"dense": [], "sparse": []}
    for backend in ("dense", "sparse", "sparse", "dense"):
        _, info, _ = generate(
            run_dir, num, sampler, steps, seed=0, device="cpu", progress=False, backend=backend
        )
        times[backend].append(info["generate_seconds"])
    out = {b: min(t) for b, t in times.items()}
    out["speedup"] = out["dense"] / max(out["sparse"], 1e-9)
    return out


def _run_name(method: str, sparsity: float, backend: str = "dense") -> str:
    if is_dense(method):
        return method
    return f"{method}-{round(sparsity * 100)}" + ("-sparse" if backend == "sparse" else "")


def run_demo(
    out: Path = DEMO_DIR,
    steps: int | None = None,
    num_samples: int = 500,
    quiet: bool = False,
    methods: tuple[tuple[str, float, str], ...] = METHODS,
    strokes: bool = True,
    stroke_methods: tuple[tuple[str, float, str], ...] = STROKE_METHODS,
    stroke_steps: int | None = None,
    stroke_samples: int = 256,
    stroke_sampler: str = "ddim",
    stroke_sampler_steps: int = 100,
) -> Path:
    """The whole demo into ``out``; returns the path of ``report.md``.

    Section 1, latent diffusion on Fashion-MNIST (preset ``ldm-fmnist``): first stage, then ``methods``
    for ``steps`` denoiser steps each. Section 2 (``strokes``), ChiroDiff on KanjiVG (preset
    ``chirodiff-kanjivg-cpu``): the same methods for ``stroke_steps`` steps each, evaluated with
    ``stroke_sampler`` over ``stroke_sampler_steps`` steps (DDIM 100: ten times cheaper than the preset's
    1000-step DDPM, which takes minutes per 256 samples on 2 cores).
    """
    from .config import load_config
    from .train_autoencoder import train_autoencoder

    t_start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    say = (lambda *a: None) if quiet else print
    n_parts = 1 + len(methods) + (len(stroke_methods) if strokes else 0)
    part = 1
    say(f"[demo] {part}/{n_parts} first stage (autoencoder) -> {out / 'autoencoder'}")
    base_overrides: dict[str, Any] = {"data": {"train_size": 20000}}
    ae = train_autoencoder(load_config("ldm-fmnist", base_overrides), out / "autoencoder", quiet=quiet)
    sections = []
    rows = []
    for method, sparsity, backend in methods:
        part += 1
        say(f"[demo] {part}/{n_parts} latent diffusion, {method} (sparsity {sparsity:g}, {backend} backend)")
        overrides = {
            **base_overrides,
            "first_stage": {"path": str(out / "autoencoder")},
            "sparse": {"method": method, "sparsity": sparsity, "backend": backend},
        }
        if steps:
            overrides["train"] = {"max_steps": steps}
        run_dir = out / _run_name(method, sparsity, backend)
        rows.append(
            (
                method,
                sparsity,
                backend,
                run_dir,
                _train_and_evaluate("ldm-fmnist", overrides, run_dir, num_samples, quiet, say),
            )
        )
    sections.append(("ldm", rows))
    if strokes:
        rows = []
        for method, sparsity, backend in stroke_methods:
            part += 1
            say(
                f"[demo] {part}/{n_parts} ChiroDiff on KanjiVG, {method} (sparsity {sparsity:g}, {backend} backend)"
            )
            overrides = {"sparse": {"method": method, "sparsity": sparsity, "backend": backend}}
            if stroke_steps:
                overrides["train"] = {"max_steps": stroke_steps}
            run_dir = out / "kanjivg" / _run_name(method, sparsity, backend)
            result = _train_and_evaluate(
                "chirodiff-kanjivg-cpu",
                overrides,
                run_dir,
                stroke_samples,
                quiet,
                say,
                sampler=stroke_sampler,
                sampler_steps=stroke_sampler_steps,
            )
            rows.append((method, sparsity, backend, run_dir, result))
        sections.append(("chirodiff", rows))
    report = write_report(out, sections, ae, time.perf_counter() - t_start)
    say(
        f"[demo] done in {(time.perf_counter() - t_start) / 60:.1f} min: report written to {report.resolve()}"
    )
    return report


def _table(rows: list, metric: str) -> list[str]:
    dense = next((r for r in rows if is_dense(r[0])), None)
    lines = [
        f"| method | sparsity | training backend | {metric} | non-zero params | FLOPs / sample (sparse) "
        "| FLOPs / sample (dense) | training FLOPs (vs dense) | train time (dense / this) "
        "| sampling time, dense / sparse backend |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    dense_r = dense[4] if dense else {}
    for method, sparsity, backend, _run_dir, r in rows:
        ratio = ""
        if dense and r.get("flops_train_total") and dense_r.get("flops_train_total"):
            ratio = f" ({r['flops_train_total'] / dense_r['flops_train_total']:.2f}x)"
        seconds = r.get("train_seconds") or 0.0
        speed = ""
        if dense and not is_dense(method) and seconds and dense_r.get("train_seconds"):
            speed = f" ({dense_r['train_seconds'] / seconds:.2f}x)"
        lines.append(
            f"| {method} | {sparsity:.0%} | {backend} | {r['fid']['value']:.2f} "
            f"| {r['params_nonzero']:,} / {r['params_total']:,} "
            f"| {_fmt_flops(r['flops_per_sample_sparse'])} | {_fmt_flops(r['flops_per_sample_dense'])} "
            f"| {_fmt_flops(r.get('flops_train_total'))}{ratio} | {seconds:.0f} s{speed} "
            f"| {_fmt_backends(r.get('sampling_time'))} |"
        )
    return lines


def _fmt_backends(t: dict[str, float] | None) -> str:
    if not t:
        return "-"
    return f"{t['dense']:.1f} s / {t['sparse']:.1f} s ({t['speedup']:.2f}x)"


def _grids(out: Path, rows: list, prefix: str) -> list[str]:
    grids = out / "grids"
    grids.mkdir(exist_ok=True)
    lines = []
    for method, sparsity, _backend, run_dir, r in rows:
        name = f"{prefix}{run_dir.name}.png"
        shutil.copyfile(r["grid"], grids / name)
        lines += [f"**{method} {sparsity:.0%}**", "", f"![{method}](grids/{name})", ""]
    return lines


def _during(out: Path, rows: list, prefix: str) -> list[str]:
    """The grids the sparsest run of a section drew while it trained (``train.sample_every``), in a row,
    with what drawing them cost against its training time."""
    row = max(rows, key=lambda r: r[1])  # the sparsest run: the one whose progress is most in question
    method, sparsity, _backend, run_dir, _r = row
    run = RunDir(run_dir)
    found = run.during_grids()
    if not found:
        return []
    grids = out / "grids"
    grids.mkdir(exist_ok=True)
    steps, paths = [s for s, _ in found], [p for _, p in found]
    names = [f"{prefix}during-{run_dir.name}-{step}.png" for step in steps]
    for path, name in zip(paths, names):
        shutil.copyfile(path, grids / name)
    summary = run.read_summary() or {}
    steps_text = f" (DDIM, {run.load_config().train.sample_steps} steps)" if run.exists() else ""
    cost = ""
    if summary.get("sample_grid_seconds") and summary.get("train_seconds"):
        cost = (
            f" Drawing the {len(paths)} grids took {summary['sample_grid_seconds']:.1f} s, "
            f"{summary['sample_grid_seconds'] / summary['train_seconds']:.1%} of the "
            f"{summary['train_seconds']:.0f} s of training."
        )
    return [
        f"### While it trained: {method} {sparsity:.0%}",
        "",
        "`train.sample_every` drew these grids from the EMA weights while the run trained, from the same "
        f"fixed noise each time{steps_text}, into `{run.during_dir}`.{cost}",
        "",
        "| " + " | ".join(f"step {s}" for s in steps) + " |",
        "|" + "---|" * len(steps),
        "| " + " | ".join(f"![step {s}](grids/{n})" for s, n in zip(steps, names)) + " |",
        "",
    ]


def write_report(out: Path, sections: list, ae: dict[str, Any], seconds: float) -> Path:
    """``out/report.md`` from ``sections``: a list of ``(family, rows)``, rows ``(method, sparsity, backend,
    dir, eval)``."""
    lines = ["# sparsediff demo: sparse-to-sparse training, dense vs RigL", ""]
    for family, rows in sections:
        r0 = rows[0][4]
        metric = r0["fid"]["metric"]
        sampler = r0["sampler"]
        if family == "ldm":
            lines += [
                "## Latent diffusion on Fashion-MNIST",
                "",
                f"First stage: KL autoencoder, latents {tuple(ae.get('latent_shape', []))}, held-out "
                f"reconstruction MSE {ae.get('val_mse', float('nan')):.4f} "
                f"({ae.get('val_psnr_db', float('nan')):.1f} dB PSNR). Denoiser: preset `ldm-fmnist` (diffusers "
                f"UNet2DModel). Sampling: {sampler.get('sampler', 'ddim').upper()}, {sampler['steps']} steps, EMA "
                "weights with the final masks.",
                "",
                f"`{metric}` is FID in the feature space of sparsediff's own Fashion-MNIST network (shipped in "
                "the package), computed with torch-fidelity against the held-out test split; compare it "
                "between these runs, not with Inception FIDs.",
                "",
            ]
            prefix = ""
        else:
            lines += [
                "## ChiroDiff on KanjiVG",
                "",
                "Denoiser: preset `chirodiff-kanjivg-cpu` (bidirectional GRU over pen-point sequences; the "
                f"engine sparsifies the GRU matrices). Sampling: {sampler.get('sampler', 'ddpm').upper()}, "
                f"{sampler['steps']} steps, sequence lengths drawn from the training split.",
                "",
                f"`{metric}` is FID of rasterised samples against the rasterised held-out characters, in "
                "the feature space of sparsediff's own stroke network (shipped in the package); not an "
                "Inception FID.",
                "",
            ]
            prefix = "kanjivg-"
        lines += _table(rows, metric)
        lines += ["", "### Samples", ""]
        lines += _grids(out, rows, prefix)
        lines += _during(out, rows, prefix)
    lines += [
        "## Reproduce",
        "",
        "```bash",
        "make demo          # or: .venv/bin/sparsediff demo",
        "```",
        "",
        f"Whole demo: {seconds / 60:.1f} minutes on this machine ({torch.get_num_threads()} threads). "
        "FLOPs count matrix products and convolutions (2 per multiply-accumulate); attention score "
        "products stay dense; per sample = denoiser steps x per-step FLOPs (+ the first-stage decoder for "
        "latent diffusion). Sampling time: measured wall-clock of generating "
        f"{TIMING_SAMPLES} samples on the CPU (best of two, interleaved) with the masked dense model and with "
        "`--backend sparse` "
        "(compressed weights through sparsediff's native kernels; layers too dense to gain stay dense, "
        "so at 50 % sparsity most layers run dense).",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------------------- engine-only demo


def _teacher_task(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    teacher = nn.Sequential(nn.Linear(32, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 8))
    for p in teacher.parameters():
        p.requires_grad_(False)
        p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)

    def batch(gen: torch.Generator, n: int = 128):
        x = torch.randn(n, 32, generator=gen)
        return x, teacher(x)

    return batch


def engine_demo(steps: int = 1500, sparsity: float = 0.9, quiet: bool = False) -> dict:
    batch = _teacher_task()
    results = {}
    for method in ("dense", "rigl"):
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Linear(32, 512), nn.GELU(), nn.Linear(512, 512), nn.GELU(), nn.Linear(512, 8)
        )
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-2)
        engine = sparsify(
            model,
            opt,
            method=method,
            sparsity=sparsity,
            distribution="erk",
            update_every=100,
            total_steps=steps,
            prune_ratio=0.3,
        )
        gen = torch.Generator().manual_seed(1)
        t0, losses = time.perf_counter(), []
        for step in range(1, steps + 1):
            x, y = batch(gen)
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            engine.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if not quiet and step % 500 == 0:
                print(f"  {method:<5} step {step:>5}  loss {sum(losses[-100:]) / 100:.5f}")
        elapsed = time.perf_counter() - t0
        x, y = batch(torch.Generator().manual_seed(99), 4096)
        with torch.no_grad():
            test = nn.functional.mse_loss(model(x), y).item()
        flops = count_flops(model, (x[:1],), engine)
        results[method] = {
            "test_mse": test,
            "seconds": elapsed,
            "updates": engine.num_updates,
            "report": engine.report(),
            "flops_dense": flops.flops_dense,
            "flops_sparse": flops.flops_sparse,
        }
        if not quiet:
            print(f"\n{method}: density report\n{engine.report()}\n")
    if not quiet:
        print(
            f"{'method':<8} {'test MSE':>10} {'density':>8} {'FLOPs/sample':>13} {'updates':>8} {'time':>7}"
        )
        for m, r in results.items():
            print(
                f"{m:<8} {r['test_mse']:>10.5f} {r['report'].density:>8.3f} {r['flops_sparse']:>13,} "
                f"{r['updates']:>8} {r['seconds']:>6.1f}s"
            )
    return results
