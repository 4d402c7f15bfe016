"""Sweeps and reports: the grid, interruption and resumption, subprocess runs, the report's numbers."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from helpers import TINY_LDM as TINY
from sparsediff.checkpoint import CheckpointDir
from sparsediff.cli import main as cli
from sparsediff.config import load_config
from sparsediff.errors import ConfigError, TrainingError
from sparsediff.report import load_run, mean_std, read_metrics, report
from sparsediff.sweep import GridPoint, SweepSpec, expand_grid, plan_runs, run_status, sweep

# a few steps per run, a checkpoint every 3, few samples for FID
COMMON = dict(steps=6, overrides=["train.ckpt_every=3"], eval_samples=16, quiet=True)
CRASHED = "rigl-s0.5-p0.5-seed0"
NAMES = ["static-s0.5-seed0", "static-s0.75-seed0", CRASHED, "rigl-s0.75-p0.5-seed0"]


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _snapshot(out: Path) -> dict[str, dict]:
    """Per run: latest checkpoint step and mtime, eval.json mtime (None where missing)."""
    snap = {}
    for name in NAMES:
        run = out / name
        ckpt = CheckpointDir(run / "checkpoints").latest()
        ev = run / "eval.json"
        snap[name] = {
            "step": int(ckpt.name.split("-")[1]) if ckpt else None,
            "ckpt_mtime": (ckpt / "trainer.json").stat().st_mtime_ns if ckpt else None,
            "eval_mtime": ev.stat().st_mtime_ns if ev.exists() else None,
            "finished": bool((_read(run / "summary.json") or {}).get("finished")),
        }
    return snap


@pytest.fixture(scope="module")
def swept(first_stage, tmp_path_factory) -> SimpleNamespace:
    """A 2 methods x 2 sparsities sweep whose third run crashes after step 3; then run again (twice),
    then once more after making one evaluation older than its checkpoint."""
    import sparsediff.train as train_module

    out = tmp_path_factory.mktemp("sweep")
    args = dict(
        preset=TINY,
        methods=["static", "rigl"],
        sparsities=[0.5, 0.75],
        prune_ratios=[0.5],
        seeds=[0],
        out=out,
        first_stage=first_stage,
        **COMMON,
    )
    real = train_module.train

    def crashing(cfg, run_dir, resume=False, quiet=False, stop_after=None):
        if Path(run_dir).name == CRASHED:
            real(cfg, run_dir, resume=resume, quiet=quiet, stop_after=3)
            raise RuntimeError("simulated crash after step 3")
        return real(cfg, run_dir, resume=resume, quiet=quiet, stop_after=stop_after)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_module, "train", crashing)
        with pytest.raises(
            TrainingError, match=r"1 of 4 runs failed.*rigl-s0.5-p0.5-seed0.*simulated crash"
        ) as e:
            sweep(**args)
    ns = SimpleNamespace(out=out, args=args, error=str(e.value), crashed=_snapshot(out))
    ns.resumed = sweep(**args)
    ns.after_resume = _snapshot(out)
    ns.again = sweep(**args)
    ns.after_again = _snapshot(out)
    # an evaluation older than the last checkpoint is done again (and only the evaluation)
    ev = out / "static-s0.5-seed0" / "eval.json"
    old = ns.after_again["static-s0.5-seed0"]["ckpt_mtime"] - 10**9
    os.utime(ev, ns=(old, old))
    ns.stale_before = _snapshot(out)
    ns.reevaluated = sweep(**args)
    ns.stale_after = _snapshot(out)
    return ns


# ---------------------------------------------------------------------------- the grid


def test_expand_grid_counts_and_names():
    points = expand_grid(["dense", "static", "rigl", "magran"], [0.5, 0.9, 0.5], [0.05, 0.5], [0, 1])
    # per seed: dense once, static once per sparsity, rigl and magran once per sparsity and prune ratio
    assert len(points) == 2 * (1 + 2 + 2 * 2 * 2)
    names = [p.name for p in points]
    assert len(set(names)) == len(names)
    assert names[:5] == [
        "dense-seed0",
        "static-s0.5-seed0",
        "static-s0.9-seed0",
        "rigl-s0.5-p0.05-seed0",
        "rigl-s0.5-p0.5-seed0",
    ]
    assert "magran-s0.9-p0.05-seed1" in names
    assert [p for p in points if p.method == "dense"] == [
        GridPoint("dense", 0.0, None, 0),
        GridPoint("dense", 0.0, None, 1),
    ]
    assert all(p.prune_ratio is None for p in points if p.method == "static")
    over = GridPoint("rigl", 0.9, 0.05, 3).overrides()
    assert over == {
        "sparse": {"method": "rigl", "sparsity": 0.9, "seed": 3, "prune_ratio": 0.05},
        "train": {"seed": 3},
    }
    # dense alone needs no sparsities
    assert [p.name for p in expand_grid(["dense"], [], None, [2])] == ["dense-seed2"]


@pytest.mark.parametrize(
    "methods, sparsities, prunes, seeds, message",
    [
        (["srste"], [0.5], [0.1], [0], "unknown sweep method 'srste'"),
        (["static"], [1.0], None, [0], "sparsity must be in"),
        (["static"], [], None, [0], "need --sparsities"),
        (["rigl"], [0.5], [], [0], "need --prune-ratios"),
        (["magran"], [0.5], [0.0], [0], "prune ratio must be in"),
        (["dense"], [], None, [-1], "seeds"),
    ],
)
def test_expand_grid_rejects(methods, sparsities, prunes, seeds, message):
    with pytest.raises(ConfigError, match=message):
        expand_grid(methods, sparsities, prunes, seeds)


def test_bad_overrides_fail_before_training(tmp_path, first_stage):
    points = expand_grid(["rigl"], [0.5], [0.1], [0])
    with pytest.raises(ConfigError, match="conflicts with the grid"):
        plan_runs(TINY, points, tmp_path, overrides=["sparse.sparsity=0.3"])
    with pytest.raises(ConfigError, match="unknown key 'nope'"):
        sweep(
            SweepSpec(TINY, ["dense", "rigl"], [0.5], [0.1], [0], tmp_path / "s", overrides=["train.nope=1"]),
            quiet=True,
        )
    assert not (tmp_path / "s").exists()
    with pytest.raises(ConfigError, match="needs a pretrained first stage"):
        sweep(SweepSpec("ldm-celebahq", ["dense"], [], None, [0], tmp_path / "c"), quiet=True)
    planned = plan_runs(TINY, points, tmp_path, steps=7, first_stage=first_stage)
    cfg = planned[0].cfg
    assert planned[0].run_dir == tmp_path.resolve() / "rigl-s0.5-p0.1-seed0"
    assert (cfg.sparse.method, cfg.sparse.sparsity, cfg.sparse.prune_ratio) == ("rigl", 0.5, 0.1)
    assert cfg.train.max_steps == 7 and cfg.first_stage.path == str(first_stage.resolve())


def test_sweep_backend_override_applies_to_sparse_methods(tmp_path, first_stage):
    """--set sparse.backend=sparse trains the sparse runs on compact layers; a dense run of the same sweep
    trains plainly (a dense run has no sparse weights to hold compactly) instead of failing the sweep."""
    points = expand_grid(["dense", "static", "rigl"], [0.5], [0.1], [0])
    planned = plan_runs(TINY, points, tmp_path, overrides=["sparse.backend=sparse"], first_stage=first_stage)
    backends = {p.point.method: p.cfg.sparse.backend for p in planned}
    assert backends == {"dense": "dense", "static": "sparse", "rigl": "sparse"}
    with pytest.raises(ConfigError, match="method 'dense' has none"):  # one dense run is still refused
        load_config(TINY, {"sparse": {"backend": "sparse"}})


def test_first_stage_is_trained_once_and_shared(tmp_path, first_stage):
    from sparsediff.sweep import resolve_first_stage

    path = Path(resolve_first_stage(TINY, None, None, tmp_path, quiet=True))
    assert path == (tmp_path / "first-stage").resolve()
    weights = sorted(path.glob("*.safetensors"))
    assert weights and json.loads((path / "sparsediff_first_stage.json").read_text())["latent_shape"] == [
        4,
        8,
        8,
    ]
    mtimes = [p.stat().st_mtime_ns for p in weights]
    assert resolve_first_stage(TINY, None, None, tmp_path, quiet=True) == str(path)  # reused
    assert [p.stat().st_mtime_ns for p in weights] == mtimes
    # an explicit directory, or the preset's first_stage.path, wins; a missing one is an error
    assert resolve_first_stage(TINY, None, first_stage, tmp_path, quiet=True) == str(first_stage.resolve())
    over = [f"first_stage.path={first_stage}"]
    assert resolve_first_stage(TINY, over, None, tmp_path, quiet=True) == str(first_stage.resolve())
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_first_stage(TINY, None, tmp_path / "nope", tmp_path, quiet=True)


# ---------------------------------------------------------------------------- interruption and resumption


def test_interrupted_sweep_keeps_going_then_resumes(swept):
    crashed = swept.crashed
    # the crash stopped only its own run: the runs before and after it finished and were evaluated
    for name in NAMES:
        if name != CRASHED:
            assert crashed[name]["step"] == 6 and crashed[name]["finished"] and crashed[name]["eval_mtime"]
    assert crashed[CRASHED] == {
        "step": 3,
        "ckpt_mtime": crashed[CRASHED]["ckpt_mtime"],
        "eval_mtime": None,
        "finished": False,
    }
    assert "traceback in" in swept.error and (swept.out / CRASHED / "error.log").exists()
    manifest = json.loads((swept.out / "sweep.json").read_text())
    assert [r["name"] for r in manifest["runs"]] == NAMES
    assert (
        manifest["command"].startswith("sparsediff sweep --preset ")
        and "--set train.ckpt_every=3" in manifest["command"]
    )
    assert len(manifest["history"]) >= 1

    # the second call: finished runs untouched, the crashed one resumed from its checkpoint
    by_name = {r["name"]: r for r in swept.resumed["runs"]}
    assert {n: by_name[n]["status"] for n in NAMES} == {
        "static-s0.5-seed0": "skipped",
        "static-s0.75-seed0": "skipped",
        CRASHED: "done",
        "rigl-s0.75-p0.5-seed0": "skipped",
    }
    assert by_name[CRASHED]["start"] == "partial" and by_name[CRASHED]["from_step"] == 3
    after = swept.after_resume
    for name in NAMES:
        if name != CRASHED:
            assert after[name] == crashed[name], name
    assert after[CRASHED]["step"] == 6 and after[CRASHED]["finished"] and after[CRASHED]["eval_mtime"]
    summary = json.loads((swept.out / CRASHED / "summary.json").read_text())
    assert summary["finished"] and summary["steps"] == 6
    records, bad = read_metrics(swept.out / CRASHED / "metrics.jsonl")
    assert [r["step"] for r in records] == [3, 5, 6] and bad == 0

    # a third call repeats nothing
    assert all(r["status"] == "skipped" for r in swept.again["runs"])
    assert swept.after_again == after


def test_stale_evaluation_is_redone_without_training(swept):
    name = "static-s0.5-seed0"
    assert run_status(swept.out / name).state == "evaluated"
    by_name = {r["name"]: r for r in swept.reevaluated["runs"]}
    assert by_name[name]["status"] == "done" and by_name[name]["start"] == "trained"
    assert sum(r["status"] == "done" for r in swept.reevaluated["runs"]) == 1
    before, after = swept.stale_before[name], swept.stale_after[name]
    assert after["ckpt_mtime"] == before["ckpt_mtime"]  # not trained again
    assert after["eval_mtime"] > before["ckpt_mtime"] > before["eval_mtime"]


def test_cli_sweep_on_a_finished_sweep_repeats_nothing(swept, first_stage, capsys):
    before = _snapshot(swept.out)
    argv = [
        "sweep", "--preset", TINY, "--methods", "static,rigl", "--sparsities", "0.5,0.75",
        "--prune-ratios", "0.5", "--seeds", "0", "--out", str(swept.out), "--steps", "6",
        "--eval-samples", "16", "--first-stage", str(first_stage), "--set", "train.ckpt_every=3",
    ]  # fmt: skip
    assert cli(argv) == 0
    text = capsys.readouterr().out
    assert text.count("skipped (finished and evaluated)") == 4
    assert _snapshot(swept.out) == before
    assert cli(["sweep", "--preset", TINY, "--methods", "dense,srste", "--out", str(swept.out)]) == 2
    assert "unknown sweep method 'srste'" in capsys.readouterr().err


def test_parallel_sweep_resumes_in_subprocesses(first_stage, tmp_path):
    from sparsediff.evaluate import evaluate_run
    from sparsediff.sweep import cpu_count
    from sparsediff.train import train

    args = dict(preset=TINY, methods=["magran"], sparsities=[0.5, 0.75], prune_ratios=[0.5], seeds=[0])
    done, partial = plan_runs(
        TINY, expand_grid(args["methods"], args["sparsities"], args["prune_ratios"], args["seeds"]),
        tmp_path, steps=6, overrides=COMMON["overrides"], first_stage=first_stage,
    )  # fmt: skip
    train(done.cfg, done.run_dir, quiet=True)
    evaluate_run(done.run_dir, num_samples=16, quiet=True)
    train(partial.cfg, partial.run_dir, quiet=True, stop_after=3)
    done_ckpt = CheckpointDir(done.run_dir / "checkpoints").latest() / "trainer.json"
    mtime = done_ckpt.stat().st_mtime_ns

    result = sweep(**args, out=tmp_path, first_stage=first_stage, jobs=2, **COMMON)
    status = {r["name"]: (r["status"], r["start"]) for r in result["runs"]}
    assert status == {done.point.name: ("skipped", "evaluated"), partial.point.name: ("done", "partial")}
    log = (partial.run_dir / "train.log").read_text()
    assert f"OMP_NUM_THREADS={max(1, cpu_count() // 2)} " in log
    assert "from step-00000003 (step 3 of 6)" in log  # the child resumed the checkpoint
    assert "fid_sparsediff_fmnist" in (partial.run_dir / "evaluate.log").read_text()
    assert json.loads((partial.run_dir / "summary.json").read_text())["steps"] == 6
    assert (partial.run_dir / "eval.json").exists()
    assert not (done.run_dir / "train.log").exists() and done_ckpt.stat().st_mtime_ns == mtime


# ---------------------------------------------------------------------------- the report


def _png_ok(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.size[0] > 100 and im.size[1] > 100


def test_report_table_plots_and_csv(swept, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(swept.out, runs, ignore=shutil.ignore_patterns("checkpoints", "first-stage"))
    (runs / "rigl-s0.75-p0.5-seed0" / "eval.json").unlink()  # a run without eval.json
    metrics = runs / "static-s0.75-seed0" / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text(
        "\n".join(lines + lines[-1:]) + '\n{"step": 9, "loss": 0.5, "lr'
    )  # duplicate + torn line
    out = tmp_path / "report"
    assert cli(["report", str(runs), "--out", str(out)]) == 0

    text = (out / "report.md").read_text()
    header = next(x for x in text.splitlines() if x.startswith("| method"))
    assert "`fid_sparsediff_fmnist`" in header and "inception" not in header.lower()
    rows = [x for x in text.splitlines() if x.startswith("| static") or x.startswith("| rigl")]
    assert len(rows) == 4
    assert "not** comparable with published Inception FIDs" in text
    assert "`rigl-s0.75-p0.5-seed0`: no eval.json" in text
    assert "`static-s0.75-seed0`: 1 unreadable line(s)" in text
    for name in ("fid_vs_sparsity.png", "fid_vs_train_flops.png", "samples.png"):
        _png_ok(out / name)
        assert f"]({name})" in text

    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert sorted(r["run"] for r in table) == sorted(NAMES)
    by_run = {r["run"]: r for r in table}
    assert (
        by_run["rigl-s0.75-p0.5-seed0"]["fid"] == ""
        and by_run["rigl-s0.75-p0.5-seed0"]["evaluated"] == "False"
    )
    ev = json.loads((runs / "static-s0.5-seed0" / "eval.json").read_text())
    assert float(by_run["static-s0.5-seed0"]["fid"]) == pytest.approx(ev["fid"]["value"])
    assert by_run["static-s0.5-seed0"]["fid_metric"] == "fid_sparsediff_fmnist"
    assert by_run["static-s0.75-seed0"]["metrics.bad_lines"] == "1"
    assert by_run["static-s0.75-seed0"]["metrics.records"] == str(len(lines))  # the duplicate counted once
    assert by_run["static-s0.5-seed0"]["config.train.max_steps"] == "6"
    assert float(by_run["static-s0.5-seed0"]["summary.params_nonzero"]) > 0


def _hand_run(root: Path, name: str, method: str, sparsity: float, seed: int, fid: float | None, **summary):
    """A run directory written by hand: resolved config, summary.json, eval.json, metrics.jsonl."""
    run = root / name
    run.mkdir(parents=True)
    over = {"sparse": {"method": method, "sparsity": sparsity, "prune_ratio": 0.05}, "train": {"seed": seed}}
    (run / "config.yaml").write_text(load_config(TINY, over).to_yaml())
    base = {
        "finished": True,
        "steps": 100,
        "batch_size": 8,
        "params_total": 1000,
        "flops_forward_dense": 400,
        "flops_train_total_dense": 3000,
    }
    (run / "summary.json").write_text(json.dumps({**base, **summary}))
    if fid is not None:
        ev = {"fid": {"metric": "fid_hand_metric", "value": fid}, "num_samples": 50, "num_reference": 60}
        (run / "eval.json").write_text(json.dumps(ev))
    (run / "metrics.jsonl").write_text('{"step": 50, "loss": 1.0}\n{"step": 100, "loss": 0.5}\n{"step": 1')
    return run


def test_report_mean_and_std_over_seeds(tmp_path):
    root = tmp_path / "hand"
    dense = dict(params_nonzero=1000, flops_forward_sparse=400, flops_train_total=3000, train_seconds=10.0)
    sparse = dict(params_nonzero=250, flops_forward_sparse=100, flops_train_total=750, train_seconds=12.0)
    _hand_run(root, "d0", "dense", 0.0, 0, 20.0, **dense)
    _hand_run(root, "d1", "dense", 0.0, 1, 22.0, **dense)
    _hand_run(root, "r0", "rigl", 0.75, 0, 10.0, **sparse)
    _hand_run(root, "r1", "rigl", 0.75, 1, 13.0, **sparse)
    _hand_run(root, "r2", "rigl", 0.75, 2, None, **sparse)  # no eval.json: counted in seeds, not in FID
    unfinished = _hand_run(root / "more", "m0", "magran", 0.5, 0, 99.0, **{**sparse, "finished": False})
    result = report([root], tmp_path / "out")
    text = Path(result["report"]).read_text()
    assert result["runs"] == 6

    m, s = mean_std([10.0, 13.0])
    assert m == pytest.approx(np.mean([10.0, 13.0])) and s == pytest.approx(np.std([10.0, 13.0], ddof=1))
    assert mean_std([4.0]) == (4.0, None)
    dense_row = next(x for x in text.splitlines() if x.startswith("| dense"))
    rigl_row = next(x for x in text.splitlines() if x.startswith("| rigl"))
    assert "| 2 | 21.00 ± 1.41 |" in dense_row
    assert "| 0.75 | 0.05 | 3 (2 eval) | 11.50 ± 2.12 | -9.50 |" in rigl_row
    assert "250 (0.250x)" in rigl_row  # non-zero parameters, ratio to dense
    cells = [c.strip() for c in rigl_row.strip("|").split("|")]
    assert cells[7:9] == ["0.250x", "0.250x"]  # inference and training FLOPs ratios
    assert cells[9] == "12.0 s (1.200x)"  # wall-clock against dense
    assert "`fid_hand_metric` ↓" in text and "magran" not in rigl_row
    assert "`m0`: not finished" in text
    assert load_run(unfinished).fid == ("fid_hand_metric", 99.0)
    for plot in result["plots"]:
        _png_ok(Path(plot))
    # no sample grids were written by hand: two plots, no samples figure
    assert sorted(Path(p).name for p in result["plots"]) == ["fid_vs_sparsity.png", "fid_vs_train_flops.png"]
    with open(result["csv"]) as f:
        assert len(list(csv.DictReader(f))) == 6


def test_report_errors(tmp_path, capsys):
    assert cli(["report", str(tmp_path)]) == 2
    assert "no run directories" in capsys.readouterr().err
    assert cli(["report", str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_report_separates_oneshot_from_srste_finetuning(tmp_path):
    """A one-shot run recorded before configs named its method says sparse.method srste in its config and
    oneshot in summary.json (benchmarks/results/sparsedm-fmnist); it still reads as oneshot."""
    root = tmp_path / "nm"
    common = dict(params_nonzero=500, flops_forward_sparse=200, flops_train_total=3000)
    _hand_run(root, "dense", "dense", 0.0, 0, 20.0, params_nonzero=1000, flops_forward_sparse=400)
    for name, method, fid in (("one", "oneshot", 90.0), ("ft", "srste", 30.0)):
        run = _hand_run(root, name, "srste", 0.5, 0, fid, **common)
        summary = json.loads((run / "summary.json").read_text())
        (run / "summary.json").write_text(json.dumps({**summary, "method": method}))
        cfg = (run / "config.yaml").read_text().replace("method: srste", "method: srste\n  nm: '2:4'", 1)
        (run / "config.yaml").write_text(cfg)
        rec = load_run(run)
        assert rec.method == method and rec.sparsity == 0.5 and rec.series == f"{method} 2:4"
    text = Path(report([root], tmp_path / "out")["report"]).read_text()
    rows = [x for x in text.splitlines() if x.startswith("| oneshot") or x.startswith("| srste")]
    assert len(rows) == 2 and "90.00" in rows[0] and "30.00" in rows[1]
    assert "seed 0 twice" not in text
    # `finetune --method oneshot` now writes sparse.method oneshot in the config itself
    run = _hand_run(tmp_path / "new", "one", "oneshot", 0.5, 0, 90.0, **common)
    rec = load_run(run)
    assert rec.method == "oneshot" and rec.sparsity == 0.5 and rec.series == "oneshot 2:4"
