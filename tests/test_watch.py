"""Watching a run while it trains: sample grids during training (fixed seeds, resumption), TensorBoard and
W&B (offline) through accelerate, read back with their own readers, a missing extra, sweeps as grouped
tracker runs, and the topology picture (engine bits, run summary, report)."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from helpers import TINY_LDM as TINY
from helpers import assert_same_state, mlp_run, wandb_history
from helpers import tiny_ldm as tiny
from sparsediff.cli import main as cli
from sparsediff.errors import ConfigError
from sparsediff.evaluate import evaluate_run
from sparsediff.run import RunDir
from sparsediff.sample import generate, save_grid
from sparsediff.train import train


def watched(first_stage, backend="dense", **train_fields):
    """A tiny RigL run drawing 4-sample grids (DDIM 3 steps) every 4 steps of 10."""
    fields = {"max_steps": 10, "sample_every": 4, "sample_num": 4, "sample_steps": 3, **train_fields}
    sparse = {"method": "rigl", "sparsity": 0.6, "update_every": 3, "backend": backend}
    return tiny(first_stage, sparse=sparse, train=fields)


def grids(run) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(RunDir(run).during_dir.glob("*.png"))}


# ---------------------------------------------------------------------------- sample grids


def test_grids_have_fixed_seeds_and_resumption_neither_repeats_nor_skips_one(first_stage, tmp_path):
    cfg = watched(first_stage)
    a = train(cfg, tmp_path / "a", quiet=True)
    train(cfg, tmp_path / "b", quiet=True)
    straight = grids(tmp_path / "a")
    assert list(straight) == ["step-00000004.png", "step-00000008.png", "step-00000010.png"]  # + the last
    assert straight == grids(tmp_path / "b")  # the same config draws the same grids
    assert len(set(straight.values())) == 3  # ... and they change as the model trains
    assert a["sample_grids"] == 3 and a["sample_grid_seconds"] > 0

    # in two parts: the first stops after a grid step, the second resumes after it
    train(cfg, tmp_path / "parts", quiet=True, stop_after=4)
    assert list(grids(tmp_path / "parts")) == ["step-00000004.png"]
    parts = train(cfg, tmp_path / "parts", resume=True, quiet=True)
    assert grids(tmp_path / "parts") == straight
    assert parts["sample_grids"] == 3

    # the last grid is the EMA model's: what sampling the finished run with the grid's settings gives
    samples, info, _ = generate(
        tmp_path / "a", 4, "ddim", 3, seed=cfg.train.seed, batch_size=4, progress=False, device="cpu"
    )
    assert info["weights"] == "ema"
    again = save_grid(samples.images, tmp_path / "again.png").read_bytes()
    assert again == straight["step-00000010.png"]
    with Image.open(tmp_path / "a" / "samples" / "during" / "step-00000010.png") as img:
        assert img.size == (2 * 32 + 3 * 2, 2 * 32 + 3 * 2)  # 2 x 2 cells of 32 px, 2 px between


@pytest.mark.parametrize("backend", ["dense", "sparse"])
def test_drawing_grids_changes_nothing_of_the_training(first_stage, tmp_path, backend):
    train(watched(first_stage, backend=backend, sample_every=3), tmp_path / "grids", quiet=True)
    train(watched(first_stage, backend=backend, sample_every=0), tmp_path / "none", quiet=True)
    assert len(grids(tmp_path / "grids")) == 4 and not grids(tmp_path / "none")
    assert_same_state(tmp_path / "grids", tmp_path / "none")  # weights, EMA, optimiser, masks: bit for bit


def test_grids_on_compact_layers_come_from_the_ema(first_stage, tmp_path):
    cfg = watched(first_stage, backend="sparse", sample_every=10)
    train(cfg, tmp_path / "run", quiet=True)
    drawn = np.asarray(Image.open(RunDir(tmp_path / "run").during_dir / "step-00000010.png"), dtype=float)
    samples, _, _ = generate(
        tmp_path / "run", 4, "ddim", 3, seed=cfg.train.seed, batch_size=4, progress=False, device="cpu"
    )
    again = np.asarray(Image.open(save_grid(samples.images, tmp_path / "again.png")), dtype=float)
    # the same samples: the compact kernels and the dense reload agree to float32 rounding
    assert drawn.shape == again.shape and np.abs(drawn - again).mean() < 0.5


def test_watch_settings_are_checked_before_anything_is_written(first_stage, tmp_path):
    for fields, message in (
        ({"sample_every": -1}, "train.sample_every must be >= 0"),
        ({"sample_num": 0}, "train.sample_num must be >= 1"),
        ({"sample_steps": 0}, r"train.sample_steps must be in \[1, 1000\]"),
        ({"report_to": "mlflow"}, r"train.report_to \(--report-to\) must be one of none, tensorboard, wandb"),
        ({"report_to": "TensorBoard"}, r"train.report_to \(--report-to\) must be one of"),
    ):
        with pytest.raises(ConfigError, match=message):
            train(watched(first_stage, **fields), tmp_path / "run", quiet=True)
        assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------- trackers


def test_tensorboard_holds_the_metrics_grids_topology_and_evaluation(first_stage, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "tb"
    argv = ["train", "--preset", TINY, "--first-stage", str(first_stage), "--method", "rigl"]
    argv += ["--sparsity", "0.6", "--update-every", "3", "--steps", "10", "--sample-every", "5"]
    argv += ["--set", "train.sample_num=4", "--set", "train.sample_steps=3"]
    assert cli([*argv, "--report-to", "tensorboard", "--out", str(run), "--quiet"]) == 0
    assert cli(["evaluate", "--run", str(run), "--num-samples", "16", "--report-to", "tensorboard"]) == 0
    capsys.readouterr()

    events = EventAccumulator(str(RunDir(run).tensorboard_dir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [r["step"] for r in metrics] == [5, 10]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in metrics], rel=1e-6)
    for key in ("lr", "density", "topology_changes", "step_time", "samples_per_s", "ever_active"):
        assert len(events.Scalars(f"train/{key}")) == 2, key
    samples = events.Images("samples")
    assert [e.step for e in samples] == [5, 10]
    with Image.open(RunDir(run).during_dir / "step-00000005.png") as img:
        assert (samples[0].width, samples[0].height) == img.size
    # the topology at each update (steps 3, 6; the schedule ends at 3/4 of the run)
    assert [e.step for e in events.Scalars("topology/ever_active")] == [3, 6]
    assert [e.step for e in events.Images("topology/layers")] == [3, 6]
    ever = [e.value for e in events.Scalars("topology/ever_active")]
    assert 0.4 < ever[0] <= ever[1] <= 1.0  # at density 0.4, only growing
    # the evaluation, at the run's last step
    ev = json.loads((run / "eval.json").read_text())
    (fid,) = events.Scalars(f"eval/{ev['fid']['metric']}")
    assert fid.step == 10 and fid.value == pytest.approx(ev["fid"]["value"], rel=1e-6)
    assert events.Scalars("eval/generate_seconds")[0].value == pytest.approx(ev["generate_seconds"], rel=1e-6)
    # the run config as hyperparameters
    (hparams,) = RunDir(run).tensorboard_dir.glob("*/hparams.yml")
    logged = yaml.safe_load(hparams.read_text())
    assert logged["sparse.method"] == "rigl" and logged["train.sample_every"] == 5

    # resumed for more steps, it logs on into the same directory
    with pytest.warns(UserWarning, match="saved update schedule is kept"):  # more steps, same schedule
        assert cli(["train", "--resume", "--out", str(run), "--steps", "12", "--quiet"]) == 0
    events = EventAccumulator(str(RunDir(run).tensorboard_dir), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [5, 10, 12]


def test_wandb_offline_run_holds_the_history_and_evaluation(first_stage, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "wb"
    cfg = watched(first_stage, report_to="wandb", sample_every=5, tracker_group="g1")
    train(cfg, run, quiet=True)
    wandb_id = json.loads(RunDir(run).tracking_path.read_text())["wandb_id"]
    (offline,) = (run / "wandb").glob("offline-run-*")
    assert offline.name.endswith(wandb_id)
    history = wandb_history(run)
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    rows = {r["_step"]: r for r in history if "train/loss" in r}
    assert sorted(rows) == [r["step"] for r in metrics] == [5, 10]
    assert [rows[s]["train/loss"] for s in sorted(rows)] == pytest.approx([r["loss"] for r in metrics])
    images = [r["_step"] for r in history if r.get("samples/_type") == "images/separated"]
    assert images == [5, 10]
    assert [r["_step"] for r in history if "topology/ever_active" in r] == [3, 6]

    evaluate_run(run, num_samples=16, quiet=True, report_to="wandb")
    assert len(list((run / "wandb").glob(f"offline-run-*-{wandb_id}"))) == 2  # the same W&B run
    ev = json.loads((run / "eval.json").read_text())
    (row,) = [r for r in wandb_history(run) if f"eval/{ev['fid']['metric']}" in r]
    # on its own x-axis (W&B's step only increases): the training step the evaluation was made at
    assert row["eval/train_step"] == 10
    assert row[f"eval/{ev['fid']['metric']}"] == pytest.approx(ev["fid"]["value"])


def test_a_tracker_that_is_not_installed_is_a_clear_error(first_stage, tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    with pytest.raises(
        ConfigError,
        match=re.escape(
            "needs the 'wandb' package, which is not installed: pip install 'sparsediff[tracking]'"
        ),
    ):
        train(watched(first_stage, report_to="all"), tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()
    argv = ["train", "--preset", TINY, "--first-stage", str(first_stage), "--steps", "2"]
    assert cli([*argv, "--report-to", "wandb", "--out", str(tmp_path / "cli"), "--quiet"]) == 2
    assert "sparsediff[tracking]" in capsys.readouterr().err
    assert not (tmp_path / "cli").exists()


def test_a_tracker_that_cannot_start_leaves_the_run_as_it_was(first_stage, tmp_path, monkeypatch):
    from accelerate.tracking import TensorBoardTracker

    def refuse(self):
        raise RuntimeError("no dashboard today")

    monkeypatch.setattr(TensorBoardTracker, "start", refuse)
    with pytest.raises(RuntimeError, match="no dashboard today"):
        train(watched(first_stage, report_to="tensorboard"), tmp_path / "new", quiet=True)
    assert not (tmp_path / "new").exists()  # a start that fails leaves nothing behind
    cfg = watched(first_stage, max_steps=4)
    train(cfg, tmp_path / "old", quiet=True)
    saved = RunDir(tmp_path / "old").config_path.read_text()
    longer = watched(first_stage, max_steps=6, report_to="tensorboard")
    with pytest.raises(RuntimeError, match="no dashboard today"):
        train(longer, tmp_path / "old", resume=True, quiet=True)
    assert RunDir(tmp_path / "old").config_path.read_text() == saved  # the resumed run's config is kept


def test_sweep_runs_are_named_by_their_point_and_grouped_by_the_sweep(first_stage, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from sparsediff.sweep import sweep

    out = tmp_path / "grid"
    grid = {"methods": ["dense", "rigl"], "sparsities": [0.5], "prune_ratios": [0.3], "seeds": [0]}
    with pytest.raises(ConfigError, match=r"train.sample_steps must be in \[1, 1000\]"):
        sweep(
            preset=TINY, out=out, steps=4, first_stage=first_stage, overrides=["train.sample_steps=0"], **grid
        )
    assert not out.exists()  # refused before anything was made
    result = sweep(
        preset=TINY,
        methods=["dense", "rigl"],
        sparsities=[0.5],
        prune_ratios=[0.3],
        seeds=[0],
        out=out,
        steps=4,
        eval_samples=16,
        first_stage=first_stage,
        overrides=["train.sample_every=0", "train.log_every=2"],
        report_to="tensorboard",
        quiet=True,
    )
    assert not result["failed"]
    for name in ("dense-seed0", "rigl-s0.5-p0.3-seed0"):
        cfg = RunDir(out / name).load_config()
        assert (cfg.train.tracker_name, cfg.train.tracker_group, cfg.train.report_to) == (
            name,
            "grid",
            "tensorboard",
        )
        events = EventAccumulator(str(RunDir(out / name).tensorboard_dir), size_guidance={"scalars": 0})
        events.Reload()
        assert [e.step for e in events.Scalars("train/loss")] == [2, 4]
        assert len(events.Scalars("eval/fid_sparsediff_fmnist")) == 1  # its evaluation, in its own run
    assert "--report-to tensorboard" in json.loads((out / "sweep.json").read_text())["command"]


# ---------------------------------------------------------------------------- the topology picture


def _engine_run(backend: str, steps: int, method: str = "rigl", resume_from=None):
    """A small RigL (or ``method``) run at 90 % to ``steps``: ``(engine, model, optimizer, fraction ever
    active after each step)``; ``resume_from``: ``(model, optimizer, engine state)`` to go on from."""
    return mlp_run(
        steps,
        method=method,
        backend=backend,
        resume_from=resume_from,
        after_step=lambda engine: engine.report().ever_active_fraction,
    )


def test_engines_track_the_weights_ever_active_exactly():
    from sparsediff.sparse.codec import pack_bits
    from sparsediff.sparse.io import engine_state_from_tensors, engine_state_to_tensors

    masked, _, _, history = _engine_run("dense", 24)
    compact, _, _, compact_history = _engine_run("sparse", 24)
    assert history == compact_history  # both engines, the same topology
    compact.state_dict()
    assert compact._bool_cache is None  # reports and states build one layer's mask at a time, keep none
    assert all(a <= b for a, b in zip(history, history[1:])) and history[-1] > history[0]
    report = masked.report()
    for layer, mask in zip(report.layers, masked.masks.values()):
        assert layer.active <= layer.ever_active <= layer.numel
        assert layer.active == int(mask.sum())
    assert report.target_ever_active == sum(layer.ever_active for layer in report.layers)
    assert math.isclose(report.ever_active_fraction, report.target_ever_active / report.target_total)

    # through a state file and back: a resumed run counts what a straight one does
    for backend, engine in (("dense", masked), ("sparse", compact)):
        half, model, opt, _ = _engine_run(backend, 12)
        tensors, meta = engine_state_to_tensors(half.state_dict())
        assert any(k.startswith("ever_active/") for k in tensors)
        state = engine_state_from_tensors(tensors, meta)
        resumed, _, _, rest = _engine_run(backend, 24, resume_from=(model, opt, state))
        assert rest == history[12:]
        assert [x.ever_active for x in resumed.report().layers] == [
            x.ever_active for x in engine.report().layers
        ]
    # a state saved before the bits were kept starts again from its (restored) masks
    for backend, engine in (("dense", masked), ("sparse", compact)):
        state = engine.state_dict()
        state.pop("ever_active")
        fresh, _, _, _ = _engine_run(backend, 0)
        before = {n: m.clone() for n, m in fresh.masks.items()}
        fresh.load_state_dict(state)
        assert any(not torch.equal(before[n], m) for n, m in fresh.masks.items())  # the masks moved
        layers = fresh.report().layers
        assert [x.ever_active for x in layers] == [x.active for x in layers], backend
        bits = fresh.state_dict()["ever_active"]  # exactly the restored masks' positions
        assert all(torch.equal(bits[n], pack_bits(m)) for n, m in fresh.masks.items()), backend


def test_static_masks_are_their_own_ever_active_and_dense_says_nothing():
    static, _, _, history = _engine_run("dense", 8, method="static")
    assert history == [pytest.approx(static.report().target_density)] * 8
    assert "ever_active" not in static.state_dict()
    _, _, _, history = _engine_run("dense", 2, method="dense")
    assert history == [None, None]


def test_summary_and_report_show_the_topology_of_each_run(first_stage, tmp_path):
    from sparsediff.report import report

    cfg = watched(first_stage, sample_every=0)
    summary = train(cfg, tmp_path / "runs" / "rigl", quiet=True)
    topo = summary["topology"]
    assert len(topo["layers"]) > 10
    assert all(0 < x["density"] <= x["ever_active"] <= 1 for x in topo["layers"])
    assert summary["target_density"] < topo["ever_active"] < 1
    metrics = [json.loads(x) for x in (tmp_path / "runs" / "rigl" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["ever_active"] == pytest.approx(topo["ever_active"])
    dense = train(tiny(first_stage, train={"max_steps": 4}), tmp_path / "runs" / "dense", quiet=True)
    assert "topology" not in dense

    out = report([tmp_path / "runs"], tmp_path / "report")
    text = (tmp_path / "report" / "report.md").read_text()
    assert "### Topology" in text and "![topology of rigl](topology-rigl.png)" in text
    assert f"**rigl**: {topo['ever_active']:.1%} of the sparsified weights" in text
    assert str(tmp_path / "report" / "topology-rigl.png") in out["plots"]
    assert "topology of dense" not in text
