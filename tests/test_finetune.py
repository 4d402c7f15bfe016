"""N:M fine-tuning of pretrained denoisers (SR-STE + distillation), the one-shot baseline, and export."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import TINY_LDM as TINY
from helpers import assert_same_state
from helpers import tiny_ldm as tiny
from sparsediff.checkpoint import CheckpointDir, load_tensors
from sparsediff.cli import main as cli
from sparsediff.config import load_config
from sparsediff.errors import ConfigError
from sparsediff.export import export_masked_dense, export_semi_structured, load_export
from sparsediff.finetune import finetune, sparsedm_schedule
from sparsediff.models import build_model
from sparsediff.run import load_for_inference, load_run_config
from sparsediff.sparse import has_nm_hooks, select_targets
from sparsediff.tasks import make_task
from sparsediff.train import train

HAS_SPARSE_GPU = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)
NM_SPEED = Path(__file__).resolve().parents[1] / "benchmarks" / "nm_speed.py"


# ---------------------------------------------------------------------------- helpers


def nonzeros_per_group(w: torch.Tensor, m: int) -> torch.Tensor:
    """Non-zeros in each group of ``m`` consecutive weights along the input dim (dim 1; channels of a conv)."""
    moved = w.detach().movedim(1, -1)  # conv (out, in, kh, kw) -> (out, kh, kw, in)
    return (moved.reshape(-1, moved.shape[-1] // m, m) != 0).sum(-1)


def assert_nm(model: nn.Module, cfg, n: int, m: int) -> int:
    """Every target weight whose input size is a multiple of ``m`` keeps exactly ``n`` of every ``m``."""
    assert not any(isinstance(mod, nn.modules.conv._ConvTransposeNd) for mod in model.modules())
    checked = 0
    for name, p in select_targets(model, cfg.sparse.include or None, cfg.sparse.exclude or None):
        if p.shape[1] % m:
            continue
        counts = nonzeros_per_group(p, m)
        assert bool((counts == n).all()), f"{name}: groups with {counts.unique().tolist()} non-zeros"
        checked += 1
    assert checked > 0
    return checked


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def dense_run(first_stage, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("dense") / "run"
    train(tiny(first_stage, train={"max_steps": 6}), run, quiet=True)
    return run


@pytest.fixture(scope="module")
def srste_run(dense_run, tmp_path_factory):
    """4 steps of SR-STE 2:4 fine-tuning; records what the training loop passed to the loss."""
    from sparsediff.tasks.latent import LatentDiffusionTask

    run = tmp_path_factory.mktemp("srste") / "run"
    seen = []
    real = LatentDiffusionTask.loss

    def spy(self, model, batch, generator, teacher=None, distill_weight=0.0):
        seen.append(
            {
                "teacher": teacher,
                "weight": distill_weight,
                "teacher_hooked": teacher is not None and any(has_nm_hooks(m) for m in teacher.modules()),
                "teacher_state": None if teacher is None else copy.deepcopy(teacher.state_dict()),
                "teacher_grad": teacher is not None and any(p.requires_grad for p in teacher.parameters()),
                "teacher_training": teacher is not None and teacher.training,
            }
        )
        return real(self, model, batch, generator, teacher=teacher, distill_weight=distill_weight)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(LatentDiffusionTask, "loss", spy)
        summary = finetune(
            dense_run,
            run,
            method="srste",
            nm="2:4",
            steps=4,
            overrides={"train": {"log_every": 1}},
            quiet=True,
        )
    return run, summary, seen


# ---------------------------------------------------------------------------- SR-STE fine-tuning


def test_srste_finetune_gives_an_exactly_2_4_model_and_records_its_source(dense_run, srste_run):
    run, summary, _ = srste_run
    assert summary["finished"] and summary["steps"] == 4 and summary["method"] == "srste"
    cfg = load_run_config(run)
    assert cfg.sparse.method == "srste" and cfg.sparse.nm == "2:4" and cfg.sparse.progressive == []
    assert cfg.sparse.sparsity == 0.5
    # SparseDM's optimiser, warm-up and EMA scaled to 4 steps
    t = cfg.train
    assert (t.lr, t.weight_decay, t.betas, t.distill_weight) == (2e-4, 0.03, [0.99, 0.999], 0.1)
    assert (t.warmup_steps, t.ema_decay) == (1, 0.0) == tuple(sparsedm_schedule(4).values())
    assert sparsedm_schedule(100_000) == {"warmup_steps": 2500, "ema_decay": 0.9999}
    # the source, in the config and the summary; its EMA weights copied into the run
    assert t.init_from == "init.safetensors"
    src = summary["init_from"]
    assert src["kind"] == "run" and src["source"] == str(dense_run.resolve()) and src["weights"] == "ema"
    assert src["checkpoint"].endswith("step-00000006") and src["path"] == str(run / "init.safetensors")
    init = load_tensors(run / "init.safetensors")[0]
    source_ema = load_tensors(CheckpointDir(dense_run / "checkpoints").latest() / "ema.safetensors")[0]
    assert init.keys() == source_ema.keys() and all(torch.equal(init[k], source_ema[k]) for k in init)

    _, _, model, info = load_for_inference(run, device="cpu")
    assert info["pattern"] == "2:4"
    assert assert_nm(model, cfg, 2, 4) == info["masked_layers"]
    trained = load_tensors(CheckpointDir(run / "checkpoints").latest() / "model.safetensors")[0]
    assert any(not torch.equal(trained[k], init[k]) for k in init)  # it did train
    assert [r["pattern"] for r in metrics(run)] == ["2:4"] * 4


def test_the_teacher_is_a_frozen_dense_copy_of_the_source(srste_run):
    run, _, seen = srste_run
    assert len(seen) == 4  # one loss per step, every one with the teacher
    init = load_tensors(run / "init.safetensors")[0]
    first = seen[0]["teacher"]
    for call in seen:
        assert call["teacher"] is first and call["weight"] == 0.1
        assert not call["teacher_hooked"] and not call["teacher_grad"] and not call["teacher_training"]
        # never trained, never masked: the source weights, dense, at every step
        assert all(torch.equal(call["teacher_state"][k], init[k]) for k in init)
    assert all((v != 0).float().mean() > 0.9 for k, v in init.items() if v.dim() == 4)


def test_distillation_with_teacher_equal_to_student_is_the_plain_loss():
    cfg = load_config(TINY)
    task = make_task(cfg)
    torch.manual_seed(0)
    model = build_model(cfg.model)  # (task.build_model would load the first stage to check shapes)
    x0 = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    batch = {"x0": x0}

    def loss(**kw):
        return task.loss(model, batch, torch.Generator().manual_seed(3), **kw)

    plain = loss()
    same = loss(teacher=copy.deepcopy(model), distill_weight=0.1)
    assert torch.equal(plain, same)  # acceptance point: teacher == student adds exactly nothing
    assert torch.equal(plain, loss(teacher=None, distill_weight=0.1))

    # another teacher: plain + w * ||teacher - student||^2 on the same x_t and t (reference by hand)
    teacher = copy.deepcopy(model)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    g = torch.Generator().manual_seed(3)
    t = torch.randint(0, cfg.diffusion.timesteps, (4,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    x_t = task.schedule.add_noise(x0, eps, t)
    with torch.no_grad():
        student, target = model(x_t, t), teacher(x_t, t)
    expected = ((student - eps) ** 2).mean() + 0.5 * ((student - target) ** 2).mean()
    got = loss(teacher=teacher, distill_weight=0.5)
    assert torch.allclose(got, expected, rtol=1e-5) and got > plain


def test_prepared_then_resumed_finetune_equals_the_straight_one(dense_run, srste_run, tmp_path):
    run, _, _ = srste_run
    parts = tmp_path / "parts"
    overrides = {"train": {"log_every": 1}}
    prepared = finetune(dense_run, parts, nm="2:4", steps=4, overrides=overrides, prepare_only=True)
    assert {p.name for p in parts.iterdir()} == {"config.yaml", "init.safetensors"}
    assert prepared["config"] == load_run_config(run).to_dict()
    with pytest.raises(ConfigError, match="already holds a run"):
        train(load_run_config(parts), parts, quiet=True)
    train(load_run_config(parts), parts, resume=True, quiet=True, stop_after=2)
    assert CheckpointDir(parts / "checkpoints").latest().name == "step-00000002"
    summary = train(load_run_config(parts), parts, resume=True, quiet=True)  # the teacher is rebuilt
    assert summary["steps"] == 4 and summary["init_from"]["kind"] == "run"
    assert_same_state(run, parts)
    assert [r["loss"] for r in metrics(parts)] == [r["loss"] for r in metrics(run)]


def test_progressive_schedule_switches_at_the_configured_steps(dense_run, tmp_path):
    run = tmp_path / "prog"
    assert (
        cli(
            [
                "finetune",
                "--from",
                str(dense_run),
                "--method",
                "srste",
                "--progressive",
                "7:8,6:8,4:8,2:4",
                "--steps",
                "8",
                "--set",
                "train.log_every=1",
                "--out",
                str(run),
                "--quiet",
            ]
        )
        == 0
    )
    cfg = load_run_config(run)
    assert cfg.sparse.progressive == ["7:8@0", "6:8@2", "4:8@4", "2:4@6"] and cfg.sparse.nm == "2:4"
    rows = metrics(run)
    # the pattern in force after each step: 7:8 for step 1, then a switch at steps 2, 4 and 6
    assert [r["pattern"] for r in rows] == ["7:8", "6:8", "6:8", "4:8", "4:8", "2:4", "2:4", "2:4"]
    assert [r["topology_updates"] for r in rows] == [0, 1, 1, 2, 2, 3, 3, 3]
    eng = json.loads(
        load_tensors(CheckpointDir(run / "checkpoints").latest() / "engine.safetensors")[1][
            "sparsediff_engine"
        ]
    )
    assert (eng["step"], eng["num_updates"], eng["pattern"]) == (8, 3, "2:4")
    _, _, model, info = load_for_inference(run, device="cpu")
    assert info["pattern"] == "2:4"
    assert_nm(model, cfg, 2, 4)


# ---------------------------------------------------------------------------- one-shot


def test_oneshot_prunes_the_source_by_magnitude_and_evaluates(dense_run, tmp_path):
    from sparsediff.evaluate import evaluate_run

    run = tmp_path / "oneshot"
    summary = finetune(dense_run, run, method="oneshot", nm="2:4", quiet=True)
    assert summary["method"] == "oneshot" and summary["steps"] == 0 and summary["pattern"] == "2:4"
    cfg = load_run_config(run)
    # the config and the summary agree: a one-shot run is masked to sparse.nm, without training
    assert cfg.sparse.method == "oneshot" and cfg.train.max_steps == 0 and "one-shot" in cfg.description
    assert cfg.sparse.nm == "2:4"
    source = load_tensors(CheckpointDir(dense_run / "checkpoints").latest() / "ema.safetensors")[0]
    pruned = load_tensors(CheckpointDir(run / "checkpoints").latest() / "ema.safetensors")[0]
    # an independent reference: per group of 4 input channels, the two largest |w| survive, unchanged
    w = source["unet.mid_block.attentions.0.to_q.weight"]
    keep = w.abs().reshape(-1, 4).argsort(-1, descending=True)[:, :2]
    ref = torch.zeros_like(w.reshape(-1, 4)).scatter(-1, keep, w.reshape(-1, 4).gather(-1, keep))
    assert torch.equal(pruned["unet.mid_block.attentions.0.to_q.weight"], ref.reshape(w.shape))
    assert torch.equal(pruned["unet.conv_norm_out.weight"], source["unet.conv_norm_out.weight"])

    _, _, model, info = load_for_inference(run, device="cpu")
    assert assert_nm(model, cfg, 2, 4) == info["masked_layers"] == summary["masked_layers"]
    result = evaluate_run(run, num_samples=16, num_reference=32, quiet=True)
    assert result["fid"]["value"] > 0 and result["params_nonzero"] == summary["params_nonzero"]
    assert result["flops_per_step_sparse"] < result["flops_per_step_dense"]


# ---------------------------------------------------------------------------- a diffusers source


def _tiny_unet(sample_size: int = 8):
    from diffusers import UNet2DModel

    args = load_config(TINY).model.args
    torch.manual_seed(5)
    return UNet2DModel(
        **{
            **args,
            "sample_size": sample_size,
            "block_out_channels": tuple(args["block_out_channels"]),
            "down_block_types": tuple(args["down_block_types"]),
            "up_block_types": tuple(args["up_block_types"]),
        }
    )


def test_finetune_from_a_diffusers_unet(first_stage, tmp_path, capsys):
    unet = _tiny_unet()
    unet.save_pretrained(tmp_path / "unet")
    out = tmp_path / "run"
    base = ["finetune", "--from", str(tmp_path / "unet"), "--first-stage", str(first_stage), "--quiet"]
    assert cli([*base, "--out", str(out), "--steps", "2"]) == 2
    assert "give --preset too" in capsys.readouterr().err
    assert cli([*base, "--preset", TINY, "--steps", "2", "--out", str(out)]) == 0
    cfg = load_run_config(out)
    assert cfg.model.kind == "unet2d" and cfg.model.args["block_out_channels"] == [16, 32]
    init = load_tensors(out / "init.safetensors")[0]
    own = unet.state_dict()
    assert init.keys() == {f"unet.{k}" for k in own}
    assert all(torch.equal(init[f"unet.{k}"], v) for k, v in own.items())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["init_from"]["kind"] == "diffusers" and summary["steps"] == 2
    _, _, model, _ = load_for_inference(out, device="cpu")
    assert_nm(model, cfg, 2, 4)

    # a UNet for another latent shape, a diffusers model that is no UNet
    _tiny_unet(sample_size=16).save_pretrained(tmp_path / "unet16")
    other = ["--preset", TINY, "--first-stage", str(first_stage), "--out", str(tmp_path / "x"), "--quiet"]
    assert cli(["finetune", "--from", str(tmp_path / "unet16"), *other]) == 2
    assert "takes inputs of shape (4, 16, 16) but the preset's data" in capsys.readouterr().err
    assert cli(["finetune", "--from", str(first_stage), *other]) == 2
    assert "holds a diffusers AutoencoderKL" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_bad_finetune_inputs_name_the_problem(dense_run, tmp_path, capsys):
    out = str(tmp_path / "bad")
    cases = [
        (["--nm", "4:4"], "N must be smaller than M"),
        (["--nm", "5:4"], "N must be smaller than M"),
        (
            ["--nm", "2:8", "--set", "sparse.nm_incompatible=error"],
            "layer 'unet.conv_in.weight' with shape (16, 4, 3, 3)",
        ),
        (["--progressive", "7:8,2:4@3"], "not a mix"),
        (
            ["--progressive", "4:8,2:4", "--nm", "1:4"],
            "differs from the progressive schedule's final pattern 2:4",
        ),
        (["--method", "oneshot", "--progressive", "4:8,2:4"], "--progressive is for --method srste"),
        (["--preset", TINY], "--preset is only for a diffusers source"),
    ]
    for extra, message in cases:
        assert (
            cli(["finetune", "--from", str(dense_run), "--steps", "4", "--out", out, "--quiet", *extra]) == 2
        ), extra
        assert message in capsys.readouterr().err, extra
    for source, message in [
        (tmp_path / "missing", "no such file or directory"),
        (tmp_path, "is neither a sparsediff run directory"),
        (dense_run / "config.yaml", "is a file"),
    ]:
        assert cli(["finetune", "--from", str(source), "--out", out, "--quiet"]) == 2
        assert message in capsys.readouterr().err
    assert not Path(out).exists()  # nothing written by a failed command
    assert cli(["finetune", "--from", str(dense_run), "--out", str(dense_run), "--quiet"]) == 2
    assert "already holds a run" in capsys.readouterr().err


# ---------------------------------------------------------------------------- export


def test_export_masked_dense_round_trip(srste_run, tmp_path):
    run, _, _ = srste_run
    path = tmp_path / "model.safetensors"
    assert cli(["export", "--run", str(run), "--format", "masked-dense", "--out", str(path)]) == 0
    cfg, model, info = load_export(path, device="cpu")
    assert info["format"] == "sparsediff.masked-dense/1" and info["pattern"] == "2:4"
    assert info["dtype"] == "float32" and info["weights"] == "ema"
    _, _, ref, _ = load_for_inference(run, device="cpu")
    ref_state = ref.state_dict()
    assert all(torch.equal(v, ref_state[k]) for k, v in model.state_dict().items())
    assert_nm(model, cfg, 2, 4)
    assert info["params_nonzero"] == sum(int((p != 0).sum()) for p in model.parameters())
    xs = model.example_inputs(2)
    with torch.no_grad():
        assert torch.equal(model(*xs), ref(*xs))

    half = export_masked_dense(run, tmp_path / "half.safetensors", dtype="bf16")
    _, model16, _ = load_export(half["out"], device="cpu")
    assert all(p.dtype == torch.bfloat16 for p in model16.parameters())
    assert all(torch.equal(v, ref_state[k].bfloat16()) for k, v in model16.state_dict().items())


def test_export_semi_structured_errors_cleanly_without_cuda_or_2_4(
    srste_run, dense_run, tmp_path, monkeypatch, capsys
):
    run, _, _ = srste_run
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "ss"
    with pytest.raises(ConfigError, match="semi-structured export needs a CUDA GPU"):
        export_semi_structured(run, out)
    assert cli(["export", "--run", str(dense_run), "--format", "semi-structured", "--out", str(out)]) == 2
    assert "is not N:M-sparse (sparse.method=dense)" in capsys.readouterr().err
    finetune(dense_run, tmp_path / "4-8", method="oneshot", nm="4:8", quiet=True)
    assert (
        cli(["export", "--run", str(tmp_path / "4-8"), "--format", "semi-structured", "--out", str(out)]) == 2
    )
    assert "is 4:8-sparse; the sparse tensor cores take 2:4 only" in capsys.readouterr().err
    assert (
        cli(
            ["export", "--run", str(run), "--format", "semi-structured", "--dtype", "fp32", "--out", str(out)]
        )
        == 2
    )
    assert "needs --dtype fp16 or bf16" in capsys.readouterr().err
    assert not out.exists()


def test_nm_speed_without_cuda_exits_nonzero_and_writes_nothing(tmp_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("nm_speed", NM_SPEED)
    nm_speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(nm_speed)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "nm_speed.json"
    assert nm_speed.main(["--quick", "--out", str(out)]) == 2
    assert "no CUDA GPU is available" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_SPARSE_GPU, reason="needs a CUDA GPU with compute capability >= 8.0")
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_export_semi_structured_matches_the_masked_dense_model(srste_run, tmp_path, dtype):
    run, _, _ = srste_run
    out = tmp_path / f"ss-{dtype}"
    result = export_semi_structured(run, out, dtype)
    v = result["verification"]
    assert v["passed"] and v["converted_layers"] > 0 and 0 < v["flops_share_converted"] < 1
    assert {p.name for p in out.iterdir()} == {
        "model.safetensors",
        "plan.json",
        "verification.json",
        "config.yaml",
    }
    cfg, model, info = load_export(out, device="cuda")
    converted = [
        n for n, p in model.named_parameters() if isinstance(p, torch.sparse.SparseSemiStructuredTensor)
    ]
    assert sorted(converted) == info["converted"]
    _, _, ref, _ = load_for_inference(run, device="cuda")
    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    ref = ref.to(torch_dtype)
    x = torch.randn(2, 4, 8, 8, device="cuda", dtype=torch_dtype)
    t = torch.tensor([10, 900], device="cuda")
    with torch.inference_mode():
        a, b = model(x, t).float(), ref(x, t).float()
    assert ((a - b).norm() / b.norm()).item() < 5e-2
