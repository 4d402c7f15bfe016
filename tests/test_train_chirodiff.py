"""ChiroDiff end to end: padded batches and the masked loss, sampling lengths, decoding, rasterising,
training through the shared loop (RigL), resumption, sampling and FID evaluation through the CLI; the
same on compact layers (``--backend sparse``), with the exports."""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sparsediff.checkpoint import CheckpointDir, checkpoint_name, load_tensors
from sparsediff.cli import main as cli
from sparsediff.config import load_config
from sparsediff.data.strokes import to_points, to_velocity
from sparsediff.errors import ConfigError
from sparsediff.sparse import plan_sparsity
from sparsediff.sparse.io import engine_state_from_tensors
from sparsediff.tasks import make_task
from sparsediff.tasks.strokes import PREVIEW_SIZE, decode_sequence
from sparsediff.train import train

TINY = str(Path(__file__).parent / "configs" / "tiny-chirodiff.yaml")
SVG = "{http://www.w3.org/2000/svg}"
CPU = torch.device("cpu")


def tiny(**sections):
    return load_config(TINY, sections)


@pytest.fixture(scope="module")
def rigl_run(tmp_path_factory) -> Path:
    """A tiny RigL run at 50 % sparsity, trained through the command line."""
    run = tmp_path_factory.mktemp("chirodiff") / "rigl"
    argv = ["train", "--preset", TINY, "--method", "rigl", "--sparsity", "0.5", "--update-every", "4"]
    assert cli([*argv, "--out", str(run), "--quiet"]) == 0
    return run


# ---------------------------------------------------------------------------- batches and the loss


def test_batches_are_padded_to_the_longest_and_masked():
    task = make_task(tiny())
    data = task.train_data(CPU, progress=False)
    lengths = torch.from_numpy(task.train_lengths())
    assert len(data) == len(lengths) and lengths.min() >= 1
    idx = torch.tensor([int(lengths.argmin()), int(lengths.argmax()), 3])
    batch = data.batch(idx, CPU)
    longest = int(lengths[idx].max())
    assert batch["x0"].shape == (3, longest, 3)
    assert torch.equal(batch["lengths"], lengths[idx])
    assert torch.equal(batch["mask"], torch.arange(longest)[None] < lengths[idx][:, None])
    assert (batch["x0"][~batch["mask"]] == 0).all()
    # real data: the pen channel of valid points is exactly 0 or 1, and 1 on the last point
    pen = batch["x0"][..., 2][batch["mask"]]
    assert set(pen.unique().tolist()) <= {0.0, 1.0}
    assert all(batch["x0"][i, int(n) - 1, 2] == 1 for i, n in enumerate(batch["lengths"]))
    # a batch of short sequences is cut to its own longest one
    short = torch.nonzero(lengths < lengths.max()).flatten()[:4]
    assert data.batch(short, CPU)["x0"].shape[1] == int(lengths[short].max())


def test_padding_does_not_contribute_to_the_loss():
    task = make_task(tiny())
    torch.manual_seed(0)
    model = task.build_model()
    data = task.train_data(CPU, progress=False)
    lengths = torch.from_numpy(task.train_lengths())
    idx = torch.tensor([int(lengths.argmin()), int(lengths.argmax()), 5, 6])
    batch = data.batch(idx, CPU)
    assert (~batch["mask"]).any()

    def loss_of(b):
        return task.loss(model, b, torch.Generator().manual_seed(7))

    base = loss_of(batch)
    junk = dict(batch)
    junk["x0"] = batch["x0"].clone()
    junk["x0"][~batch["mask"]] = torch.randn(int((~batch["mask"]).sum()), 3) * 100.0
    assert torch.equal(loss_of(junk), base)  # bit for bit
    moved = dict(batch)
    moved["x0"] = batch["x0"].clone()
    moved["x0"][0, 0] += 1.0  # a valid point does count
    assert not torch.equal(loss_of(moved), base)


def test_loss_is_averaged_per_sequence_over_its_length():
    """With a model that predicts 0, the loss is mean_i( sum_valid eps^2 / (3 L_i) ), eps from the generator."""
    task = make_task(tiny())
    data = task.train_data(CPU, progress=False)
    batch = data.batch(torch.tensor([0, 1, 2, 3, 4]), CPU)

    def zero_model(x, t, lengths):
        return torch.zeros_like(x)

    loss = task.loss(zero_model, batch, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)  # the draws of epsilon_loss: t, then the noise
    torch.randint(0, task.schedule.num_timesteps, (5,), generator=g)
    noise = torch.randn(batch["x0"].shape, generator=g)
    expected = torch.stack(
        [(noise[i, :n] ** 2).sum() / (3 * n) for i, n in enumerate(batch["lengths"].tolist())]
    ).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    padded_mean = ((noise**2) * batch["mask"][..., None]).sum() / (3 * batch["mask"].sum())
    assert batch["lengths"].unique().numel() > 1  # else both means agree
    assert loss.item() != pytest.approx(padded_mean.item(), rel=1e-6)


def test_example_inputs_use_the_median_training_length():
    task = make_task(tiny())
    model = task.build_model()
    x, t, lengths = task.example_inputs(model)
    median = int(round(float(np.median(task.train_lengths()))))
    assert x.shape == (1, median, 3) and lengths.tolist() == [median] and t.shape == (1,)
    assert model(x, t, lengths).shape == x.shape


# ---------------------------------------------------------------------------- decoding and sampling


def test_decode_a_known_velocity_sequence():
    a = np.array([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    b = np.array([[2.0, 1.0], [2.0, 3.0]])
    c = np.array([[5.0, 5.0]])
    points = to_points([a, b, c])  # (6, 3), pen 1 on rows 2, 4, 5
    velocity = to_velocity(points)
    assert velocity[3].tolist() == [0.0, 1.0, 0.0]  # the jump to stroke b
    strokes = decode_sequence(velocity, "velocity", 0.8)
    assert len(strokes) == 3
    for got, want in zip(strokes, [a, b, c]):
        np.testing.assert_allclose(got, want, atol=1e-12)
    assert len(decode_sequence(points, "absolute", 0.8)) == 3
    # generated pen values are not exactly 0 / 1: the threshold decides
    noisy = velocity.copy()
    noisy[:, 2] = [0.1, -0.2, 0.7, 0.3, 0.95, 0.0]
    got = decode_sequence(noisy, "velocity", 0.8)
    assert [len(s) for s in got] == [5, 1]  # a and b joined (0.7 < 0.8); the last point after the lift
    assert [len(s) for s in decode_sequence(noisy, "velocity", 0.5)] == [3, 2, 1]
    # a diverged sample leaves out the non-finite strokes instead of failing
    bad = velocity.copy()
    bad[3, 0] = np.nan  # poisons every later absolute point
    assert len(decode_sequence(bad, "velocity", 0.8)) == 1
    with pytest.raises(ConfigError, match="representation"):
        decode_sequence(velocity, "polar", 0.8)


def test_sampled_lengths_come_from_the_training_lengths():
    task = make_task(tiny())
    torch.manual_seed(0)
    model = task.build_model().eval()
    kw = dict(sampler="ddim", steps=3, eta=0.0, batch_size=8, device=CPU, progress=False)
    s = task.generate(model, 20, torch.Generator().manual_seed(1), **kw)
    lengths = s.extras["lengths"]
    assert set(lengths.tolist()) <= set(task.train_lengths().tolist())
    assert [len(q) for q in s.extras["sequences"]] == lengths.tolist()
    assert s.images.shape == (20, 1, 32, 32) and s.images.dtype == torch.uint8
    assert len(s.extras["strokes"]) == 20 and all(len(d) >= 1 for d in s.extras["strokes"])
    again = task.generate(model, 20, torch.Generator().manual_seed(1), **kw)
    assert torch.equal(again.extras["lengths"], lengths) and torch.equal(again.images, s.images)
    other = task.generate(model, 20, torch.Generator().manual_seed(2), **kw)
    assert not torch.equal(other.extras["lengths"], lengths)
    # only the training lengths are ever drawn, each of them in turn
    task._train_lengths = np.array([4, 11])
    s = task.generate(model, 12, torch.Generator().manual_seed(0), **kw)
    assert set(s.extras["lengths"].tolist()) == {4, 11}
    assert sorted({len(q) for q in s.extras["sequences"]}) == [4, 11]


def test_reference_images_and_raster_options():
    task = make_task(tiny())
    ref = task.reference_images()
    val = 60  # 20 % of the 300 characters
    assert ref.shape == (val, 1, 32, 32) and ref.dtype == torch.uint8
    assert (ref.flatten(1).amax(1) > 128).all()  # every reference has ink
    sub = task.reference_images(10)
    assert sub.shape == (10, 1, 32, 32) and torch.equal(sub, task.reference_images(10))
    assert any(torch.equal(sub[0], r) for r in ref)
    big = make_task(tiny(data={"args": {**tiny().data.args, "raster_size": 24}}))
    assert big.reference_images(3).shape == (3, 1, 24, 24)
    with pytest.raises(ConfigError, match="raster_size"):
        make_task(tiny(data={"args": {**tiny().data.args, "raster_size": 0}}))
    with pytest.raises(ConfigError, match="num_timesteps"):
        make_task(tiny(diffusion={"timesteps": 100})).build_model()


# ---------------------------------------------------------------------------- end to end


def test_train_sample_rasterise_evaluate(rigl_run, tmp_path):
    summary = json.loads((rigl_run / "summary.json").read_text())
    assert summary["finished"] and summary["steps"] == 12 and summary["family"] == "chirodiff"
    assert summary["topology_updates"] >= 2 and summary["target_density"] == pytest.approx(0.5, abs=1e-3)
    assert 0 < summary["flops_forward_sparse"] < summary["flops_forward_dense"]
    assert summary["task"]["length_median"] == int(round(float(np.median(make_task(tiny()).train_lengths()))))
    lines = [json.loads(x) for x in (rigl_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [4, 8, 12] and all(math.isfinite(r["loss"]) for r in lines)
    assert sum(r["topology_changes"] for r in lines) > 0

    out = tmp_path / "ddpm"
    assert cli(["sample", "--run", str(rigl_run), "--num", "6", "--quiet", "--out", str(out)]) == 0
    pngs = sorted(out.glob("0*.png"))
    svgs = sorted(out.glob("0*.svg"))
    assert len(pngs) == 6 and len(svgs) == 6 and (out / "grid.png").exists()
    with Image.open(pngs[0]) as im:
        assert im.size == (PREVIEW_SIZE, PREVIEW_SIZE) and im.mode == "L"
    for svg in svgs:
        root = ET.fromstring(svg.read_text())
        assert root.tag == f"{SVG}svg" and len(root.findall(f".//{SVG}path")) >= 1
    info = json.loads((out / "sample.json").read_text())
    assert info["sampler"] == "ddpm" and info["steps"] == 50 and info["files"] == 6

    ddim = tmp_path / "ddim"
    argv = ["sample", "--run", str(rigl_run), "--num", "4", "--sampler", "ddim", "--steps", "5"]
    assert cli([*argv, "--quiet", "--out", str(ddim)]) == 0
    assert len(list(ddim.glob("0*.svg"))) == 4

    assert cli(["evaluate", "--run", str(rigl_run), "--num-samples", "24", "--quiet"]) == 0
    ev = json.loads((rigl_run / "eval.json").read_text())
    assert ev["fid"]["metric"] == "fid_sparsediff_strokes" and "fid_sparsediff_strokes" in ev
    assert math.isfinite(ev["fid_sparsediff_strokes"]) and ev["fid_sparsediff_strokes"] > 0
    assert ev["fid"]["weights"] == "features-strokes.safetensors"
    assert ev["num_samples"] == 24 and ev["num_reference"] == 60
    assert ev["params_nonzero"] <= summary["params_nonzero"]
    assert ev["flops_per_step_sparse"] < ev["flops_per_step_dense"]
    assert ev["flops_per_sample_sparse"] == ev["flops_per_step_sparse"] * 50  # DDPM over T = 50, no decoder
    assert Path(ev["grid"]).exists()


def test_masks_keep_the_budgets_on_the_gru_weights(rigl_run):
    ckpt = CheckpointDir(rigl_run / "checkpoints").latest()
    tensors, meta = load_tensors(ckpt / "engine.safetensors")
    masks = engine_state_from_tensors(tensors, meta)["masks"]
    weights = load_tensors(ckpt / "model.safetensors")[0]
    model = make_task(tiny()).build_model()
    budgets = plan_sparsity(model, 0.5, "erk")
    gru = {f"gru.weight_{k}_l0{d}" for k in ("ih", "hh") for d in ("", "_reverse")}
    assert gru <= set(masks) and set(masks) == set(budgets)
    for name, mask in masks.items():
        shape, budget = budgets[name]
        assert tuple(mask.shape) == shape and int(mask.sum()) == budget, name
        assert (weights[name][~mask.bool()] == 0).all(), name  # masked weights are exactly zero
    earlier = load_tensors(rigl_run / "checkpoints" / checkpoint_name(6) / "engine.safetensors")
    first = engine_state_from_tensors(*earlier)["masks"]
    moved = sum(int((first[n].bool() != masks[n].bool()).sum()) for n in gru)
    assert moved > 0  # RigL moved connections of the GRU between step 6 and step 12
    nonzero = sum(int((weights[n] != 0).sum()) for n in masks)
    assert nonzero <= sum(b for _, b in budgets.values())


def test_resume_equals_straight_run(tmp_path):
    cfg = tiny(sparse={"method": "rigl", "sparsity": 0.5, "update_every": 3})
    train(cfg, tmp_path / "straight", quiet=True)
    train(cfg, tmp_path / "parts", quiet=True, stop_after=6)
    assert CheckpointDir(tmp_path / "parts" / "checkpoints").latest().name == "step-00000006"
    train(cfg, tmp_path / "parts", resume=True, quiet=True)
    straight = CheckpointDir(tmp_path / "straight" / "checkpoints").latest()
    parts = CheckpointDir(tmp_path / "parts" / "checkpoints").latest()
    for name in ("model", "ema", "optimizer", "engine"):
        a = load_tensors(straight / f"{name}.safetensors")[0]
        b = load_tensors(parts / f"{name}.safetensors")[0]
        assert a.keys() == b.keys(), name
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}:{k}"


def test_stroke_sheet_draws_held_out_characters_and_one_row_per_run(rigl_run, tmp_path):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "stroke_sheet.py"
    spec = importlib.util.spec_from_file_location("stroke_sheet", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows, labels, preset = module.sheet_rows([rigl_run], num=3, size=32)
    assert labels == ["held-out\n(real)", "rigl 0.5\n(ddpm 50)"] and isinstance(preset, str)
    for row in rows:  # three 32-pixel cells and two 2-pixel separators, each cell with ink on black
        assert row.shape == (32, 3 * 32 + 2 * 2)
        for k in range(3):
            cell = row[:, k * 34 : k * 34 + 32]
            assert cell.max() > 128 and np.median(cell) == 0
    out = module.sheet([rigl_run], tmp_path / "sheet.png", num=3, size=32)
    with Image.open(out) as im:
        assert im.size[1] > 2 * 32


# ---------------------------------------------------------------------------- --backend sparse


@pytest.fixture(scope="module")
def backend_runs(tmp_path_factory) -> dict[str, Path]:
    """The tiny RigL run on compact layers (``--backend sparse``: the GRU's recurrence and its backward in
    native code), through the command line: 12 steps straight, and stopped after 6 then resumed."""
    root = tmp_path_factory.mktemp("chirodiff-backend")
    argv = ["train", "--preset", TINY, "--method", "rigl", "--sparsity", "0.5", "--update-every", "4"]
    argv += ["--backend", "sparse", "--quiet"]
    runs = {"straight": root / "straight", "parts": root / "parts"}
    assert cli([*argv, "--out", str(runs["straight"])]) == 0
    assert cli([*argv, "--out", str(runs["parts"]), "--stop-after", "6"]) == 0
    assert cli([*argv, "--out", str(runs["parts"]), "--resume"]) == 0
    return runs


def test_backend_sparse_trains_compact_gru_layers_and_resumes_bit_exactly(backend_runs):
    run = backend_runs["straight"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["finished"] and summary["steps"] == 12 and summary["topology_updates"] >= 2
    ckpt = CheckpointDir(run / "checkpoints").latest()
    weights = load_tensors(ckpt / "model.safetensors")[0]
    assert {"gru.values_hh_l0", "gru.row_ptr_hh_l0", "gru.cols_hh_l0_reverse"} <= set(weights)
    assert "gru.weight_hh_l0" not in weights  # the compact layers only
    masks = engine_state_from_tensors(*load_tensors(ckpt / "engine.safetensors"))["masks"]
    budgets = plan_sparsity(make_task(tiny()).build_model(), 0.5, "erk")
    assert set(masks) == set(budgets)
    for name, mask in masks.items():
        shape, budget = budgets[name]
        assert tuple(mask.shape) == shape and int(mask.sum()) == budget, name
    earlier = load_tensors(run / "checkpoints" / checkpoint_name(6) / "engine.safetensors")
    first = engine_state_from_tensors(*earlier)["masks"]
    assert sum(int((first[n].bool() != masks[n].bool()).sum()) for n in masks if n.startswith("gru.")) > 0
    # stopped after 6 steps in one process, resumed in the next: the straight run, bit for bit
    straight = CheckpointDir(run / "checkpoints").latest()
    parts = CheckpointDir(backend_runs["parts"] / "checkpoints").latest()
    for name in ("model", "ema", "optimizer", "engine"):
        a = load_tensors(straight / f"{name}.safetensors")[0]
        b = load_tensors(parts / f"{name}.safetensors")[0]
        assert a.keys() == b.keys(), name
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}:{k}"


def test_backend_sparse_run_samples_evaluates_and_exports(backend_runs, tmp_path, capsys):
    run = backend_runs["straight"]
    summary = json.loads((run / "summary.json").read_text())
    out = tmp_path / "ddpm"
    assert cli(["sample", "--run", str(run), "--num", "4", "--quiet", "--out", str(out)]) == 0
    assert len(list(out.glob("0*.svg"))) == 4 and (out / "grid.png").exists()
    assert cli(["evaluate", "--run", str(run), "--num-samples", "24", "--quiet"]) == 0
    ev = json.loads((run / "eval.json").read_text())
    assert math.isfinite(ev["fid_sparsediff_strokes"]) and ev["params_nonzero"] <= summary["params_nonzero"]
    capsys.readouterr()
    for fmt in ("masked-dense", "sparse"):
        path = tmp_path / f"{fmt}.safetensors"
        assert cli(["export", "--run", str(run), "--format", fmt, "--out", str(path), "--json"]) == 0
        info = json.loads(capsys.readouterr().out)
        assert (info["params_total"], info["params_nonzero"]) == (
            summary["params_total"],
            summary["params_nonzero"],
        ), fmt
