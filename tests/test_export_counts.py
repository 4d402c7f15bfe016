"""One definition of the parameter counts, the format table and the dtype names every export shares."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

import sparsediff
from helpers import LayerBank, train_steps
from sparsediff.checkpoint import ENGINE_FILE
from sparsediff.cli import main as cli
from sparsediff.errors import ConfigError, StateError
from sparsediff.export import DTYPES, FORMATS, export_semi_structured, load_export, parse_dtype
from sparsediff.run import RunDir, load_model_and_masks
from sparsediff.sparse.counts import parameter_counts
from sparsediff.sparse.engine import SparseEngine

# A RigL run written by the code before the export package (tests/data/legacy/README.txt): its last
# topology update grew weights that are still exactly 0, and some of its other parameters are exactly 0.
LEGACY_RUN = Path(__file__).resolve().parent / "data" / "legacy" / "run"


@pytest.fixture
def rigl_run(tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(LEGACY_RUN, run)
    return run


# ---------------------------------------------------------------------------- parameter_counts


def test_parameter_counts_count_kept_positions_and_every_other_entry():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight.zero_()  # kept positions that are exactly 0 still count
        model[1].bias.zero_()  # and so does a parameter that is not masked, whatever its values
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[0, :3] = True
    c = parameter_counts(model, {"0.weight": mask})
    assert (c.total, c.target_total, c.target_nonzero) == (4 * 3 + 3 + 3 * 2 + 2, 12, 3)
    assert c.nonzero == c.total - 12 + 3 == 14
    assert c.density == pytest.approx(14 / 23) and c.target_density == pytest.approx(3 / 12)
    assert parameter_counts(dict(model.named_parameters()), {"0.weight": mask.float()}) == c  # 0/1 masks too
    assert parameter_counts(model.named_parameters(), {}).nonzero == 23  # dense: every entry


def test_parameter_counts_refuse_masks_that_do_not_fit():
    model = nn.Linear(4, 3)
    with pytest.raises(ConfigError, match="'1.weight', which is not a parameter"):
        parameter_counts(model, {"1.weight": torch.ones(3, 4)})
    with pytest.raises(ConfigError, match=r"the mask of 'weight' has shape \(4, 3\)"):
        parameter_counts(model, {"weight": torch.ones(4, 3)})


def test_parameter_counts_agree_with_the_engine_report():
    """The counts are the engine's own definition, also after RigL grew weights that are exactly 0."""
    torch.manual_seed(0)
    model = LayerBank([("linear", 12, 10), ("conv", 3, 5, 3), ("linear", 10, 6)])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = sparsediff.sparsify(model, opt, method="rigl", sparsity=0.8, update_every=1, total_steps=4)
    assert isinstance(engine, SparseEngine)
    train_steps(model, opt, engine, 1)  # one update: the grown weights are exactly 0
    kept_zeros = sum(
        int((p[engine.masks[n]] == 0).sum()) for n, p in model.named_parameters() if n in engine.masks
    )
    assert kept_zeros > 0
    report = engine.report()
    c = parameter_counts(model, engine.masks)
    assert (c.total, c.nonzero, c.target_total, c.target_nonzero) == (
        report.params_total,
        report.params_nonzero,
        report.target_total,
        report.target_nonzero,
    )


# ---------------------------------------------------------------------------- the same run, every format


def _export_json(capsys, run: Path, fmt: str, out: Path, *extra: str) -> dict:
    assert cli(["export", "--run", str(run), "--format", fmt, "--out", str(out), "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_every_format_reports_the_same_counts_for_the_same_run(rigl_run, tmp_path, capsys):
    cfg, model, masks, _ = load_model_and_masks(rigl_run)
    params = dict(model.named_parameters())
    # the run is one where the old definitions disagreed: kept weights that are exactly 0 ...
    kept_zeros = sum(int((params[n][m] == 0).sum()) for n, m in masks.items())
    # ... and exact zeros among the parameters no mask covers
    other_zeros = sum(int((p == 0).sum()) for n, p in params.items() if n not in masks)
    assert kept_zeros > 0 and other_zeros > 0
    expected = parameter_counts(model, masks)
    summary = RunDir(rigl_run).read_summary()  # what the engine reported when training stopped
    assert (summary["params_total"], summary["params_nonzero"]) == (expected.total, expected.nonzero)

    reported = {
        "masked-dense": _export_json(capsys, rigl_run, "masked-dense", tmp_path / "dense.safetensors"),
        "sparse": _export_json(capsys, rigl_run, "sparse", tmp_path / "sparse.safetensors"),
        "diffusers": _export_json(capsys, rigl_run, "diffusers", tmp_path / "unet"),
        "sparse-bf16": _export_json(
            capsys, rigl_run, "sparse", tmp_path / "s16.safetensors", "--dtype", "bf16"
        ),
    }
    for name, info in reported.items():
        assert (info["params_total"], info["params_nonzero"]) == (expected.total, expected.nonzero), name
    # and what each export records about itself says the same
    for path in (tmp_path / "dense.safetensors", tmp_path / "sparse.safetensors", tmp_path / "unet"):
        _, _, info = load_export(path, device="cpu")
        assert (info["params_total"], info["params_nonzero"]) == (expected.total, expected.nonzero), path


# ---------------------------------------------------------------------------- formats and markers


def test_the_command_offers_every_format_of_the_table():
    import argparse

    from sparsediff.commands import export as command

    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    options = {a.dest: a for a in parser._actions}
    assert (
        options["format"].choices
        == list(FORMATS)
        == ["masked-dense", "semi-structured", "sparse", "diffusers"]
    )
    assert options["dtype"].choices == list(DTYPES)
    assert (
        options["out"].help
        == "masked-dense, sparse: a .safetensors file; semi-structured, diffusers: a directory"
    )
    for name, fmt in FORMATS.items():
        assert name in options["dtype"].help and f"{name}: {fmt.help}." in command.DESCRIPTION


def test_sparse_exports_and_engine_state_carry_different_markers(rigl_run, tmp_path):
    info = sparsediff.export.export_sparse(rigl_run, tmp_path / "model.safetensors")
    assert info["format"] == "sparsediff.sparse-export/1" != SparseEngine.STATE_FORMAT
    engine_file = RunDir(rigl_run).latest_checkpoint() / ENGINE_FILE
    with pytest.raises(StateError, match="is not a sparsediff export"):
        load_export(engine_file, device="cpu")
    with pytest.raises(
        StateError, match=r"model.safetensors is not a sparsediff export \(metadata 'format' is None"
    ):
        load_export(engine_file.parent, device="cpu")  # a checkpoint directory
    (tmp_path / "empty").mkdir()
    with pytest.raises(StateError, match="is not a sparsediff export"):
        load_export(tmp_path / "empty", device="cpu")


def test_a_semi_structured_directory_loads_without_conversion_on_the_cpu(rigl_run, tmp_path):
    """The directory layout and marker of a semi-structured export (written here without a GPU: the
    masked-dense file under the semi-structured marker, as the export writes it after its check)."""
    from safetensors.torch import save_file

    from sparsediff.checkpoint import load_tensors
    from sparsediff.export import SEMI_STRUCTURED_FORMAT, export_masked_dense, format_of

    dense = export_masked_dense(rigl_run, tmp_path / "dense.safetensors", dtype="fp16")
    tensors, meta = load_tensors(tmp_path / "dense.safetensors")
    info = {**json.loads(meta["sparsediff_export"]), "format": SEMI_STRUCTURED_FORMAT, "converted": []}
    (tmp_path / "ss").mkdir()
    meta = {**meta, "format": SEMI_STRUCTURED_FORMAT, "sparsediff_export": json.dumps(info)}
    save_file(tensors, str(tmp_path / "ss" / "model.safetensors"), meta)
    assert format_of(tmp_path / "ss") is FORMATS["semi-structured"]
    cfg, model, got = load_export(tmp_path / "ss", device="cpu")  # on the CPU: not converted
    assert got["format"] == SEMI_STRUCTURED_FORMAT and got["params_nonzero"] == dense["params_nonzero"]
    _, ref, _ = load_export(tmp_path / "dense.safetensors", device="cpu")
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in model.state_dict().items())
    assert all(p.dtype == torch.float16 for p in model.parameters())
    with pytest.raises(
        ConfigError, match="is a masked-dense export; export it with --format semi-structured"
    ):
        load_export(tmp_path / "dense.safetensors", device="cpu", convert=True)


# ---------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("name", list(DTYPES))
def test_every_dtype_name_is_taken(name):
    assert parse_dtype(name) == getattr(torch, DTYPES[name])


def test_dtype_names_are_checked():
    assert parse_dtype(None) is None
    assert DTYPES.keys() == {"fp32", "fp16", "bf16", "float32", "float16", "bfloat16"}
    with pytest.raises(ConfigError, match="--dtype must be one of fp32, fp16, bf16, float32"):
        parse_dtype("int8")
    half = ("float16", "bfloat16")
    assert parse_dtype("float16", half, "semi-structured export") == torch.float16
    with pytest.raises(ConfigError, match="semi-structured export needs --dtype fp16 or bf16, got 'fp32'"):
        parse_dtype("fp32", half, "semi-structured export")
    with pytest.raises(ConfigError, match="needs --dtype fp16 or bf16, got None"):
        parse_dtype(None, half, "semi-structured export")


@pytest.mark.parametrize("fmt", ["masked-dense", "sparse", "diffusers"])
def test_every_format_takes_both_spellings_of_a_dtype(rigl_run, tmp_path, capsys, fmt):
    out = tmp_path / ("unet" if fmt == "diffusers" else "model.safetensors")
    for name in ("fp16", "bfloat16"):
        info = _export_json(capsys, rigl_run, fmt, out, "--dtype", name)
        assert info["dtype"] == DTYPES[name]


def test_semi_structured_takes_both_spellings_of_half_precision(rigl_run, tmp_path):
    for name in ("float16", "bf16"):  # accepted: the next check (a 2:4 run) is the one that fails
        with pytest.raises(ConfigError, match="is not N:M-sparse"):
            export_semi_structured(rigl_run, tmp_path / "ss", dtype=name)
    with pytest.raises(ConfigError, match="needs --dtype fp16 or bf16"):
        export_semi_structured(rigl_run, tmp_path / "ss", dtype="float32")
