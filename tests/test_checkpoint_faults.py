"""A disk that fills while a run writes its files: a clear error, nothing half-written left, resumable.

The full disk is simulated: the function that writes a checkpoint's tensor files (or a text file) writes
part of its file, as a real writer does before the disk runs out, and then raises the error a full disk
gives (``OSError(ENOSPC)``, ``EDQUOT``, or safetensors' own error that says so only in its message).
"""

from __future__ import annotations

import errno
import re
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

import sparsediff.checkpoint as checkpoint
from helpers import assert_same_checkpoints, train_args
from sparsediff.checkpoint import (
    ENGINE_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
    CheckpointDir,
    directory_nbytes,
)
from sparsediff.cli import main as cli
from sparsediff.errors import DiskFullError, is_disk_full
from sparsediff.run import RunDir

FULL_DISK_ERRORS = {
    "ENOSPC": lambda: OSError(errno.ENOSPC, "No space left on device"),
    "EDQUOT": lambda: OSError(errno.EDQUOT, "Disk quota exceeded"),
    "safetensors": lambda: SafetensorError(
        "Error while serializing: I/O error: No space left on device (os error 28)"
    ),
}
_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bits: equal bits <=> the same tensor (-0.0 and NaN payloads too)."""
    return t if t.dtype == torch.bool else t.contiguous().view(_INT[t.element_size()])


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` (relative name -> bytes)."""
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
    }


def failing_writer(monkeypatch, fail_in: str, fail_on: str, error) -> list[str]:
    """Make ``checkpoint.save_tensors`` write half of file ``fail_on`` of the checkpoint whose temporary
    directory's name contains ``fail_in``, then raise ``error()``; returns the files written, in order."""
    real = checkpoint.save_tensors
    written: list[str] = []

    def writer(path: Path, *args, **kwargs) -> None:
        real(path, *args, **kwargs)
        written.append(f"{path.parent.name}/{path.name}")
        if fail_in in path.parent.name and path.name == fail_on:
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2])  # the disk ran out halfway through this file
            raise error()

    monkeypatch.setattr(checkpoint, "save_tensors", writer)
    return written


def small_files(seed: int) -> dict:
    """A checkpoint's files for :meth:`CheckpointDir.save`: weights under a mask, optimiser state."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(16, 16, generator=gen) < 0.3
    weight = torch.randn(16, 16, generator=gen) * mask
    return {
        MODEL_FILE: ({"layer": weight, "bias": torch.randn(16, generator=gen)}, None),
        OPTIMIZER_FILE: ({"state/0/exp_avg": torch.randn(16, 16, generator=gen) * mask}, {"lr": "0.1"}),
        ENGINE_FILE: ({"mask/layer": mask}, {"step": str(seed)}),
    }


def needed_bytes(message: str) -> int:
    found = re.search(r"it needs ([\d,]+) bytes", message)
    assert found, message
    return int(found.group(1).replace(",", ""))


@pytest.mark.parametrize("kind", sorted(FULL_DISK_ERRORS))
@pytest.mark.parametrize("compress", [True, False])
def test_full_disk_mid_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch, kind, compress):
    run = tmp_path / "run"
    ckpts = CheckpointDir(run / "checkpoints", compress=compress)
    first = ckpts.save(1, small_files(1), {"note": "first"})
    before = snapshot(ckpts.root)

    written = failing_writer(monkeypatch, "step-00000002", OPTIMIZER_FILE, FULL_DISK_ERRORS[kind])
    with pytest.raises(DiskFullError) as caught:
        ckpts.save(2, small_files(2), {"note": "second"})
    message = str(caught.value)
    assert written[-1].endswith(OPTIMIZER_FILE) and len(written) == 2  # it failed midway, after one file
    assert f"run {run}" in message and "checkpoint step-00000002" in message, message
    assert "computed from the tensors being written" in message and " are free in " in message, message
    assert "step-00000001, is untouched" in message and "--resume" in message, message
    assert isinstance(caught.value, OSError) and is_disk_full(caught.value.__cause__)

    # nothing of the unfinished checkpoint is left; the previous one and `latest` are as they were
    assert not list(ckpts.root.glob(".tmp-*")) and not (ckpts.root / "step-00000002").exists()
    assert snapshot(ckpts.root) == before
    assert ckpts.latest() == first and ckpts.list() == [first]

    # space freed: the same checkpoint is written, of exactly the size the message said it needs
    monkeypatch.undo()
    second = ckpts.save(2, small_files(2), {"note": "second"})
    assert ckpts.latest() == second and directory_nbytes(second) == needed_bytes(message)


def test_any_failure_removes_the_unfinished_checkpoint(tmp_path, monkeypatch):
    ckpts = CheckpointDir(tmp_path / "run" / "checkpoints")
    first = ckpts.save(1, small_files(1), {})
    failing_writer(monkeypatch, "step-00000002", MODEL_FILE, lambda: RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="^boom$") as caught:
        ckpts.save(2, small_files(2), {})
    assert not isinstance(caught.value, DiskFullError)  # not a full disk: raised as it was
    assert not list(ckpts.root.glob(".tmp-*")) and ckpts.latest() == first and ckpts.list() == [first]


def test_full_disk_writing_latest_takes_the_new_checkpoint_away(tmp_path, monkeypatch):
    ckpts = CheckpointDir(tmp_path / "run" / "checkpoints")
    first = ckpts.save(1, small_files(1), {})
    real = Path.write_text

    def write_text(self: Path, text: str, *args, **kwargs) -> int:
        if self.name.startswith(".tmp-latest"):
            real(self, text[:2], *args, **kwargs)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    with pytest.raises(DiskFullError, match="checkpoint step-00000002 of run"):
        ckpts.save(2, small_files(2), {})
    monkeypatch.undo()
    assert not list(ckpts.root.glob(".tmp-*")) and not (ckpts.root / "step-00000002").exists()
    assert (ckpts.root / "latest").read_text() == first.name + "\n" and ckpts.list() == [first]


def test_full_disk_writing_the_summary_leaves_no_temporary_file(tmp_path, monkeypatch):
    run = RunDir(tmp_path / "run")
    run.write_summary({"steps": 1})
    real = Path.write_text

    def write_text(self: Path, text: str, *args, **kwargs) -> int:
        if self.name.startswith(".summary.json.tmp"):
            real(self, text[: len(text) // 2], *args, **kwargs)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    with pytest.raises(DiskFullError) as caught:
        run.write_summary({"steps": 2, "padding": "x" * 100})
    monkeypatch.undo()
    message = str(caught.value)
    assert str(run.summary_path) in message and needed_bytes(message) > 100, message
    assert [p.name for p in run.path.iterdir()] == ["summary.json"]
    assert run.read_summary() == {"steps": 1}


def test_train_on_a_full_disk_then_resume_equals_a_straight_run(first_stage, tmp_path, monkeypatch, capsys):
    every = ("--set", "train.ckpt_every=4")
    straight, run = tmp_path / "straight", tmp_path / "full"
    assert cli(train_args(first_stage, straight, "rigl", 8, *every)[2:]) == 0

    # the disk fills during the step-8 checkpoint, after its model and EMA files were written
    written = failing_writer(monkeypatch, "step-00000008", OPTIMIZER_FILE, FULL_DISK_ERRORS["ENOSPC"])
    assert cli(train_args(first_stage, run, "rigl", 8, *every)[2:]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sparsediff train: error: the disk filled") and "\n" not in err, err
    assert f"run {run}" in err and needed_bytes(err) > 0 and "step-00000004, is untouched" in err, err
    assert [w.split("/")[1] for w in written if "step-00000008" in w] == [
        "model.safetensors",
        "ema.safetensors",
        OPTIMIZER_FILE,
    ]
    ckpts = RunDir(run).checkpoints
    assert not list(ckpts.root.glob(".tmp-*"))
    assert [p.name for p in ckpts.list()] == ["step-00000004"] and ckpts.latest().name == "step-00000004"
    assert (ckpts.root / "latest").read_text().strip() == "step-00000004"
    assert not RunDir(run).summary_path.exists()

    # space freed: --resume finishes the run, bit for bit the run that was never interrupted
    monkeypatch.undo()
    assert cli(["train", "--resume", "--out", str(run), "--quiet"]) == 0
    assert RunDir(run).read_summary()["steps"] == 8
    a, b = RunDir(straight).checkpoints.latest(), RunDir(run).checkpoints.latest()
    assert a.name == b.name == "step-00000008"
    assert_same_checkpoints(a, b, key=bits)
