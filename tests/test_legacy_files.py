"""Files written by an earlier sparsediff still load: exports, and a checkpoint that resumes.

``tests/data/legacy/`` holds a tiny RigL run and its exports as the code before the export package wrote
them (its README.txt says which commit, and how); these tests read them with the current code.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from sparsediff.checkpoint import ENGINE_FILE, load_tensors
from sparsediff.errors import StateError
from sparsediff.export import load_export, load_sparse_export
from sparsediff.run import RunDir, load_model_and_masks, load_run_config
from sparsediff.sparse.io import engine_state_from_tensors
from sparsediff.train import train

LEGACY = Path(__file__).resolve().parent / "data" / "legacy"


@pytest.fixture(scope="module")
def legacy_model():
    """``(cfg, model, masks)`` of the legacy run, loaded by the current run-loading code."""
    cfg, model, masks, info = load_model_and_masks(LEGACY / "run")
    assert info["checkpoint"].endswith("step-00000006") and info["weights"] == "ema"
    return cfg, model, masks


def _same_weights(model: torch.nn.Module, ref: torch.nn.Module) -> None:
    ref_state = ref.state_dict()
    state = model.state_dict()
    assert state.keys() == ref_state.keys()
    for k, v in state.items():
        assert torch.equal(v.view(torch.int32), ref_state[k].view(torch.int32)), k  # bit for bit


def _same_outputs(model: torch.nn.Module, ref: torch.nn.Module) -> None:
    xs = ref.example_inputs(2)
    with torch.no_grad():
        assert torch.equal(model(*xs), ref(*xs))


def test_the_legacy_checkpoint_loads(legacy_model):
    cfg, model, masks = legacy_model
    assert cfg.sparse.method == "rigl" and len(masks) == 51
    params = dict(model.named_parameters())
    assert all(not bool(params[n][~m].any()) for n, m in masks.items())  # the final masks are applied


@pytest.mark.parametrize("name", ["masked-dense.safetensors", "sparse.safetensors", "diffusers"])
def test_legacy_exports_load_with_load_export(legacy_model, name):
    cfg, ref, _ = legacy_model
    got_cfg, model, info = load_export(LEGACY / name, device="cpu")
    assert info["method"] == "rigl" and info["dtype"] == "float32" and info["params_total"] == 11621
    assert got_cfg.sparse == cfg.sparse
    if name != "diffusers":  # that folder's config is rebuilt from it (below)
        assert got_cfg == cfg
    assert not model.training
    _same_weights(model, ref)
    _same_outputs(model, ref)


def test_the_legacy_sparse_export_loads_with_its_loader(legacy_model):
    _, ref, ref_masks = legacy_model
    cfg, model, masks = load_sparse_export(LEGACY / "sparse.safetensors")
    _, _, info = load_export(LEGACY / "sparse.safetensors", device="cpu")
    assert info["format"] == "sparsediff.sparse/1"  # the marker it was written with
    _same_weights(model, ref)
    assert masks.keys() == ref_masks.keys() and all(torch.equal(masks[n], ref_masks[n]) for n in masks)


def test_the_legacy_diffusers_folder_gives_a_rebuilt_config():
    cfg, _, info = load_export(LEGACY / "diffusers", device="cpu")
    assert info.get("config_rebuilt") is True  # written before sparsediff.json held the run's config
    assert cfg.model.kind == "unet2d" and cfg.model.args["block_out_channels"] == [4, 8]


def test_the_engine_state_of_the_legacy_run_is_no_export():
    with pytest.raises(StateError, match="is not a sparsediff export"):
        load_export(LEGACY / "run" / "checkpoints" / "step-00000006" / ENGINE_FILE, device="cpu")


def test_the_legacy_checkpoint_resumes(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(LEGACY / "run", run)
    old = RunDir(run).latest_checkpoint()
    old_masks = engine_state_from_tensors(*load_tensors(old / ENGINE_FILE))["masks"]
    cfg = load_run_config(run)
    cfg.train.max_steps = 8
    summary = train(cfg, run, resume=True, quiet=True)
    assert summary["steps"] == 8 and summary["finished"]
    new = RunDir(run).latest_checkpoint()
    assert new.name == "step-00000008"
    # the topology ended at step 6 (sparse.end_step): the resumed engine kept the saved masks exactly
    masks = engine_state_from_tensors(*load_tensors(new / ENGINE_FILE))["masks"]
    assert masks.keys() == old_masks.keys() and all(torch.equal(masks[n], old_masks[n]) for n in masks)
    before = load_tensors(old / "model.safetensors")[0]
    after = load_tensors(new / "model.safetensors")[0]
    assert any(not torch.equal(before[k], after[k]) for k in before)  # and it trained on
