"""Latent diffusion end to end: first stage, training, resumption, faults, sampling and evaluation; and
the command line on compact layers (``--backend sparse``): training, resumption, every reader of the run
(sample, evaluate, export) and the report."""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch

from helpers import TINY_LDM as TINY
from helpers import assert_same_state
from helpers import tiny_ldm as tiny
from sparsediff.checkpoint import CheckpointDir, directory_nbytes, load_tensors
from sparsediff.cli import main as cli
from sparsediff.config import load_config
from sparsediff.errors import ConfigError, DataError, TrainingError
from sparsediff.run import RunDir, RunSummary
from sparsediff.train import train


def test_first_stage_directory(first_stage):
    meta = json.loads((first_stage / "sparsediff_first_stage.json").read_text())
    assert meta["latent_shape"] == [4, 8, 8] and meta["scale"] > 0
    # a second call reuses it
    assert cli(["train-autoencoder", "--preset", TINY, "--out", str(first_stage), "--quiet"]) == 0


def test_train_sample_evaluate(first_stage, tmp_path):
    run = tmp_path / "rigl"
    cfg = tiny(first_stage, sparse={"method": "rigl", "sparsity": 0.5, "update_every": 4})
    summary = train(cfg, run, quiet=True)
    assert summary["finished"] and summary["steps"] == 20 and summary["topology_updates"] >= 3
    assert abs(summary["target_density"] - 0.5) < 1e-3
    assert summary["flops_forward_sparse"] < summary["flops_forward_dense"]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [5, 10, 15, 20]
    assert all(math.isfinite(r["loss"]) and r["density"] == pytest.approx(0.5, abs=1e-3) for r in lines)
    assert sum(r["topology_changes"] for r in lines) > 0

    assert (
        cli(
            [
                "sample",
                "--run",
                str(run),
                "--num",
                "6",
                "--steps",
                "4",
                "--quiet",
                "--out",
                str(tmp_path / "s"),
            ]
        )
        == 0
    )
    pngs = sorted((tmp_path / "s").glob("0*.png"))
    assert len(pngs) == 6 and (tmp_path / "s" / "grid.png").exists()

    assert cli(["evaluate", "--run", str(run), "--num-samples", "32", "--quiet"]) == 0
    ev = json.loads((run / "eval.json").read_text())
    assert ev["fid"]["metric"] == "fid_sparsediff_fmnist" and ev["fid"]["value"] > 0
    assert ev["num_reference"] == 128
    # EMA weights carry the final masks: exactly the run's non-zeros
    assert ev["params_nonzero"] <= summary["params_nonzero"]
    assert ev["flops_per_step_sparse"] < ev["flops_per_step_dense"]
    assert ev["flops_per_sample_sparse"] == ev["flops_per_step_sparse"] * 5 + ev["flops_decode"]
    # bytes on disk: the checkpoint directory sampled from and the sparse export of the model
    assert ev["checkpoint_bytes"] == directory_nbytes(Path(ev["checkpoint"])) == summary["checkpoint_bytes"]
    assert 0 < ev["model_bytes"] < ev["checkpoint_bytes"]


@pytest.mark.parametrize("method", ["rigl", "magran"])
def test_resume_equals_straight_run(first_stage, tmp_path, method):
    cfg = tiny(first_stage, sparse={"method": method, "sparsity": 0.6, "update_every": 3})
    train(cfg, tmp_path / "straight", quiet=True)
    train(cfg, tmp_path / "parts", quiet=True, stop_after=10)
    assert CheckpointDir(tmp_path / "parts" / "checkpoints").latest().name == "step-00000010"
    train(cfg, tmp_path / "parts", resume=True, quiet=True)
    assert_same_state(tmp_path / "straight", tmp_path / "parts")


def test_resume_rejects_another_configuration(first_stage, tmp_path):
    cfg = tiny(first_stage, sparse={"method": "rigl", "sparsity": 0.5}, train={"max_steps": 4})
    train(cfg, tmp_path / "run", quiet=True)
    other = tiny(first_stage, sparse={"method": "rigl", "sparsity": 0.7}, train={"max_steps": 4})
    with pytest.raises(ConfigError, match=r"differs in sparse.sparsity \(0.5 there, 0.7 now\)"):
        train(other, tmp_path / "run", resume=True, quiet=True)
    with pytest.raises(ConfigError, match="already holds a run"):
        train(cfg, tmp_path / "run", quiet=True)
    longer = tiny(first_stage, sparse={"method": "rigl", "sparsity": 0.5}, train={"max_steps": 6})
    with pytest.warns(UserWarning, match="saved update schedule is kept"):  # more steps, same schedule
        assert train(longer, tmp_path / "run", resume=True, quiet=True)["steps"] == 6


def test_nan_loss_stops_and_keeps_last_good_checkpoint(first_stage, tmp_path, monkeypatch):
    from sparsediff.tasks.latent import LatentDiffusionTask

    real = LatentDiffusionTask.loss
    calls = {"n": 0}

    def flaky(self, model, batch, generator):
        calls["n"] += 1
        loss = real(self, model, batch, generator)
        return loss * float("nan") if calls["n"] == 13 else loss

    monkeypatch.setattr(LatentDiffusionTask, "loss", flaky)
    run = tmp_path / "nan"
    with pytest.raises(TrainingError, match="loss became nan at step 13.*step-00000010"):
        train(tiny(first_stage, train={"ckpt_every": 5}), run, quiet=True)
    ckpts = CheckpointDir(run / "checkpoints")
    assert ckpts.latest().name == "step-00000010"
    model = load_tensors(ckpts.latest() / "model.safetensors")[0]
    assert all(torch.isfinite(v).all() for v in model.values())


def test_bad_input_messages(first_stage, tmp_path, capsys):
    assert (
        cli(["train", "--preset", TINY, "--set", "train.nope=1", "--out", str(tmp_path / "x"), "--quiet"])
        == 2
    )
    assert "unknown key 'nope'" in capsys.readouterr().err
    assert cli(["train", "--preset", "no-such-preset", "--quiet"]) == 2
    assert "unknown preset 'no-such-preset'" in capsys.readouterr().err
    assert cli(["train", "--preset", TINY, "--out", str(tmp_path / "y"), "--quiet"]) == 2
    assert "first_stage.path is not set" in capsys.readouterr().err
    assert (
        cli(
            [
                "train",
                "--preset",
                TINY,
                "--method",
                "rigl",
                "--first-stage",
                str(first_stage),
                "--out",
                str(tmp_path / "z"),
                "--quiet",
            ]
        )
        == 2
    )
    assert "needs --sparsity" in capsys.readouterr().err
    cfg = load_config("ldm-celebahq", {"data": {"root": str(tmp_path / "missing")}})
    from sparsediff.data.images import build_image_dataset

    with pytest.raises(DataError, match="missing"):
        build_image_dataset(cfg.data, "train")


def test_failed_start_leaves_nothing_behind(first_stage, tmp_path, capsys):
    run = tmp_path / "r"
    base = ["train", "--preset", TINY, "--steps", "2", "--out", str(run), "--quiet"]
    # no first stage: a clear message, and no run directory that would refuse the corrected command
    assert cli(base) == 2
    assert "first_stage.path is not set" in capsys.readouterr().err
    assert not run.exists()
    assert cli([*base, "--first-stage", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not run.exists()
    # a directory that was there before is kept as it was, without a run in it
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    assert cli(["train", "--preset", TINY, "--out", str(kept), "--quiet"]) == 2
    assert [p.name for p in kept.iterdir()] == ["notes.txt"]
    # the corrected command runs
    assert cli([*base, "--first-stage", str(first_stage)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["finished"] and summary["steps"] == 2
    assert (run / "config.yaml").exists()
    assert RunDir.is_run(run) and not RunDir.is_run(kept)
    assert RunSummary.from_dict(RunDir(run).read_summary()).to_dict() == summary


def test_pretrained_diffusers_first_stages_load(tmp_path):
    from diffusers import AutoencoderKL, VQModel

    from sparsediff.models.autoencoder import FirstStage

    torch.manual_seed(0)
    kl = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        latent_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=4,
        layers_per_block=1,
        scaling_factor=0.5,
    )
    kl.save_pretrained(tmp_path / "kl")
    vq = VQModel(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        latent_channels=3,
        num_vq_embeddings=32,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=4,
        layers_per_block=1,
    )
    vq.save_pretrained(tmp_path / "vq")
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    fs = FirstStage.load(tmp_path / "kl")
    assert fs.kind == "kl" and fs.scale == 0.5 and fs.latent_shape(16) == (3, 8, 8)
    z = fs.encode(x)
    assert z.shape == (2, 3, 8, 8)
    assert torch.allclose(z, kl.encode(x).latent_dist.mode() * 0.5, atol=1e-6)
    assert fs.decode(z).shape == x.shape
    fq = FirstStage.load(tmp_path / "vq")
    assert fq.kind == "vq" and fq.latent_shape(16) == (3, 8, 8)
    scale = fq.estimate_scale(x)
    assert scale == pytest.approx(1 / fq.encode_unscaled(x).std().item())
    assert fq.decode(fq.encode(x)).shape == x.shape
    with pytest.raises(ConfigError, match="no config.json"):
        FirstStage.load(tmp_path)


# ---------------------------------------------------------------------------- --backend sparse


def _train_cli(first_stage: Path, out: Path, *args: str) -> None:
    base = ["train", "--preset", TINY, "--first-stage", str(first_stage), "--steps", "8", "--quiet"]
    assert cli([*base, "--out", str(out), *args]) == 0


RIGL = ("--method", "rigl", "--sparsity", "0.5", "--update-every", "2")
SPARSE_BACKEND = (*RIGL, "--backend", "sparse")


@pytest.fixture(scope="module")
def backend_runs(first_stage, tmp_path_factory) -> dict[str, Path]:
    """Through the command line: RigL 50 % with ``--backend sparse`` for 8 steps (two topology updates),
    straight and stopped after 4 steps then resumed; next to it a dense run (method dense), in the
    folder ``report`` reads."""
    root = tmp_path_factory.mktemp("backend-sparse")
    runs = {"sparse": root / "runs" / "sparse", "dense": root / "runs" / "dense", "parts": root / "parts"}
    _train_cli(first_stage, runs["sparse"], *SPARSE_BACKEND)
    _train_cli(first_stage, runs["parts"], *SPARSE_BACKEND, "--stop-after", "4")
    _train_cli(first_stage, runs["parts"], *SPARSE_BACKEND, "--resume")
    _train_cli(first_stage, runs["dense"], "--method", "dense")
    return runs


def test_backend_sparse_checkpoints_compact_layers_and_resumes_bit_exactly(backend_runs):
    run = RunDir(backend_runs["sparse"])
    assert run.load_config().sparse.backend == "sparse"
    summary = run.read_summary()
    assert summary["finished"] and summary["steps"] == 8 and summary["topology_updates"] == 2
    assert summary["target_density"] == pytest.approx(0.5, abs=1e-3)
    # the checkpoint holds the compact layers: values and their layout, no dense sparsified weight
    model = load_tensors(run.latest_checkpoint() / "model.safetensors")[0]
    assert "unet.conv_in.values" in model and "unet.conv_in.row_ptr" in model and "unet.conv_in.cols" in model
    assert "unet.conv_in.weight" not in model
    # stopped after 4 steps in one process, resumed in the next: the straight run, bit for bit
    parts = CheckpointDir(backend_runs["parts"] / "checkpoints")
    assert [c.name for c in parts.list()] == ["step-00000004", "step-00000008"]
    assert_same_state(backend_runs["sparse"], backend_runs["parts"])


def test_backend_sparse_run_samples_evaluates_and_exports(backend_runs, tmp_path, capsys):
    from sparsediff.export import load_export
    from sparsediff.run import load_model_and_masks

    run = backend_runs["sparse"]
    summary = RunDir(run).read_summary()
    out = tmp_path / "samples"
    assert cli(["sample", "--run", str(run), "--num", "4", "--steps", "3", "--quiet", "--out", str(out)]) == 0
    assert len(list(out.glob("0*.png"))) == 4 and (out / "grid.png").exists()
    assert cli(["evaluate", "--run", str(run), "--num-samples", "32", "--quiet"]) == 0
    ev = json.loads((run / "eval.json").read_text())
    assert ev["fid"]["value"] > 0 and ev["params_nonzero"] <= summary["params_nonzero"]
    capsys.readouterr()

    # the readers get the dense model back: the final masks, zero elsewhere
    _, model, masks, _ = load_model_and_masks(run)
    params = dict(model.named_parameters())
    assert masks and all(not bool(params[n][~m].any()) for n, m in masks.items())
    kept = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    assert kept == pytest.approx(summary["target_density"], abs=1e-6)
    outputs = {"masked-dense": tmp_path / "dense.safetensors", "sparse": tmp_path / "sparse.safetensors"}
    outputs["diffusers"] = tmp_path / "unet"
    for fmt, path in outputs.items():
        argv = ["export", "--run", str(run), "--format", fmt, "--out", str(path), "--json"]
        assert cli(argv) == 0
        info = json.loads(capsys.readouterr().out)
        # the counts the engine reported at the end of training (the EMA is exported: the same masks)
        assert (info["params_total"], info["params_nonzero"]) == (
            summary["params_total"],
            summary["params_nonzero"],
        ), fmt
        _, exported, _ = load_export(path, device="cpu")
        unet = exported.unet if hasattr(exported, "unet") else exported
        assert all(torch.equal(v, model.unet.state_dict()[k]) for k, v in unet.state_dict().items()), fmt


def test_report_shows_a_sparse_backend_run_next_to_a_dense_run(backend_runs, tmp_path):
    out = tmp_path / "report"
    assert cli(["report", str(backend_runs["sparse"].parent), "--out", str(out), "--json"]) == 0
    text = (out / "report.md").read_text()
    rows = {
        line.split("|")[1].strip(): line
        for line in text.splitlines()
        if line.startswith(("| dense", "| rigl"))
    }
    assert rows.keys() == {"dense", "rigl (sparse backend)"}  # the training backend named in the row
    cells = [c.strip() for c in rows["rigl (sparse backend)"].strip("|").split("|")]
    summary = RunDir(backend_runs["sparse"]).read_summary()
    assert cells[6].startswith(f"{summary['params_nonzero'] / 1000:.2f}k")  # non-zero parameters
    assert cells[8].endswith("x") and cells[8] != "1.000x"  # training FLOPs against dense
    assert re.fullmatch(r"[\d.]+ s \([\d.]+x\)", cells[9])  # measured wall-clock, with its ratio to dense
    assert "seed 0 twice" not in text
    with open(out / "results.csv") as f:
        table = {Path(r["run"]).name: r for r in csv.DictReader(f)}
    assert table["sparse"]["config.sparse.backend"] == "sparse"
    assert float(table["sparse"]["summary.train_seconds"]) > 0


def test_report_tells_the_two_backends_of_one_setting_apart(backend_runs, first_stage, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    shutil.copytree(backend_runs["sparse"], runs / "sparse", ignore=shutil.ignore_patterns("checkpoints"))
    _train_cli(first_stage, runs / "masked", *RIGL, "--backend", "dense")
    assert cli(["report", str(runs), "--out", str(tmp_path / "report")]) == 0
    text = (tmp_path / "report" / "report.md").read_text()
    assert len([line for line in text.splitlines() if line.startswith("| rigl")]) == 2
    assert "seed 0 twice" not in text
