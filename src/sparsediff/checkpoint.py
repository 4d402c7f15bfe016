"""Atomic checkpoints of a training run, in safetensors.

A checkpoint is a directory ``checkpoints/step-00001000/`` holding

    model.safetensors       the denoiser's state dict (names as in the unwrapped model)
    ema.safetensors         EMA weights by parameter name (+ the EMA's counters as metadata)
    optimizer.safetensors   the optimiser state, flattened (``state/<i>/<key>``; param groups as JSON)
    engine.safetensors      the sparse engine's masks and counters
    trainer.json            step, learning-rate scheduler, anything else the trainer needs

It is written into ``checkpoints/.tmp-step-.../``, every file flushed to disk, and only then renamed to
its final name (a rename is atomic on POSIX file systems); ``checkpoints/latest`` is replaced the same
way. A process killed at any moment, even halfway through writing, leaves either the previous
checkpoint or the new one, never a torn one; leftover temporary directories are removed on the next
start. Nothing here unpickles anything.

Also here: a model's weights and EMA as safetensors tensors, and loading them back with errors that name
the file and the entries that do not fit.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import StateError

LATEST = "latest"
# The files of one checkpoint directory.
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
ENGINE_FILE = "engine.safetensors"
TRAINER_FILE = "trainer.json"
_REQUIRED = (MODEL_FILE, TRAINER_FILE)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def save_tensors(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path), metadata=metadata)


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118
    except Exception as e:  # safetensors raises several error types for damaged files
        raise StateError(f"cannot read {path}: {e}") from None


# ---------------------------------------------------------------------------- model and EMA weights


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict, tensors only."""
    return {k: v for k, v in model.state_dict().items() if torch.is_tensor(v)}


def load_state_checked(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor], path: Any) -> None:
    """``model.load_state_dict(tensors, strict=True)`` with an error naming ``path`` and the first
    missing, unexpected or mis-shaped entries."""
    own = model.state_dict()
    missing = [k for k in own if k not in tensors]
    unexpected = [k for k in tensors if k not in own]
    wrong = [k for k in own if k in tensors and tuple(own[k].shape) != tuple(tensors[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:3])}")
        if wrong:
            k = wrong[0]
            parts.append(
                f"{k} has shape {tuple(tensors[k].shape)} in the file, {tuple(own[k].shape)} in the model"
            )
        raise StateError(f"{path} does not fit this model: " + "; ".join(parts))
    model.load_state_dict(dict(tensors), strict=True)


def load_model_weights(model: torch.nn.Module, path: Path) -> None:
    """Load a safetensors state dict file into ``model`` (see :func:`load_state_checked`)."""
    tensors, _ = load_tensors(path)
    load_state_checked(model, tensors, path)


def ema_tensors(ema: Any, model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A diffusers ``EMAModel``'s shadow weights by parameter name, and its counters as metadata."""
    names = [n for n, _ in model.named_parameters()]
    tensors = dict(zip(names, ema.shadow_params))
    meta = {"optimization_step": str(ema.optimization_step), "decay": str(ema.decay)}
    return tensors, meta


def load_ema(ema: Any, model: torch.nn.Module, path: Path) -> None:
    """Load EMA weights written by :func:`ema_tensors` into ``ema`` (the EMA of ``model``)."""
    tensors, meta = load_tensors(path)
    names = [n for n, _ in model.named_parameters()]
    missing = [n for n in names if n not in tensors]
    if missing:
        raise StateError(f"{path}: EMA weights miss parameter(s) {', '.join(missing[:3])}")
    for shadow, n in zip(ema.shadow_params, names):
        shadow.copy_(tensors[n])
    ema.optimization_step = int(meta.get("optimization_step", 0))


# ---------------------------------------------------------------------------- optimiser state


def optimizer_to_tensors(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Flatten ``optimizer.state_dict()`` (tensors -> safetensors, everything else -> JSON)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in state["state"].items():
        for key, value in st.items():
            if torch.is_tensor(value):
                tensors[f"state/{pid}/{key}"] = value
            else:
                scalars.setdefault(str(pid), {})[key] = value
    meta = {"param_groups": json.dumps(state["param_groups"]), "scalars": json.dumps(scalars)}
    return tensors, meta


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, pid, key = name.split("/", 2)
        state.setdefault(int(pid), {})[key] = value
    for pid, values in json.loads(meta.get("scalars", "{}")).items():
        state.setdefault(int(pid), {}).update(values)
    return {"state": state, "param_groups": json.loads(meta["param_groups"])}


# ---------------------------------------------------------------------------- directories


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


class CheckpointDir:
    """The ``checkpoints/`` folder of a run: atomic save, ``latest`` pointer, retention."""

    def __init__(self, root: str | Path, keep: int = 2):
        self.root = Path(root)
        self.keep = keep

    def clean_temporary(self) -> None:
        if self.root.exists():
            for tmp in self.root.glob(".tmp-*"):
                if tmp.is_dir():
                    shutil.rmtree(tmp, ignore_errors=True)
                else:
                    tmp.unlink(missing_ok=True)

    def save(
        self,
        step: int,
        files: dict[str, tuple[dict[str, torch.Tensor], dict[str, str] | None]],
        trainer_state: dict[str, Any],
    ) -> Path:
        """Write ``files`` (name -> (tensors, metadata)) and ``trainer.json`` as checkpoint ``step``."""
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / checkpoint_name(step)
        tmp = self.root / f".tmp-{checkpoint_name(step)}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        for name, (tensors, meta) in files.items():
            save_tensors(tmp / name, tensors, meta)
            _fsync_file(tmp / name)
        manifest = {"step": step, "files": sorted(files), **trainer_state}
        (tmp / TRAINER_FILE).write_text(json.dumps(manifest, indent=2))
        _fsync_file(tmp / TRAINER_FILE)
        _fsync_dir(tmp)
        if final.exists():  # a checkpoint of the same step (a resumed run reaching it again)
            shutil.rmtree(final)
        os.rename(tmp, final)
        self._write_latest(final.name)
        _fsync_dir(self.root)
        self._prune()
        return final

    def _write_latest(self, name: str) -> None:
        tmp = self.root / f".tmp-latest-{os.getpid()}"
        tmp.write_text(name + "\n")
        _fsync_file(tmp)
        os.replace(tmp, self.root / LATEST)

    def _prune(self) -> None:
        done = self.list()
        for old in done[: max(0, len(done) - self.keep)]:
            # Rename first (atomic), then delete: a process killed halfway through the deletion leaves a
            # .tmp-* directory (cleaned at the next start), never a half-deleted step-* one.
            doomed = self.root / f".tmp-delete-{old.name}-{os.getpid()}"
            os.rename(old, doomed)
            shutil.rmtree(doomed, ignore_errors=True)

    @staticmethod
    def is_complete(path: Path) -> bool:
        """A checkpoint directory whose manifest and every file it lists are present."""
        try:
            manifest = json.loads((path / TRAINER_FILE).read_text())
        except (OSError, json.JSONDecodeError):
            return False
        return all((path / f).exists() for f in manifest.get("files", _REQUIRED))

    def list(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.exists():
            return []
        out = [p for p in self.root.glob("step-*") if p.is_dir() and self.is_complete(p)]
        return sorted(out, key=lambda p: p.name)

    def latest(self) -> Path | None:
        """The checkpoint ``latest`` names, or the newest complete one if the pointer is missing."""
        pointer = self.root / LATEST
        try:
            candidate = self.root / pointer.read_text().strip()
        except OSError:
            candidate = None
        if candidate is not None and candidate.is_dir() and self.is_complete(candidate):
            return candidate
        done = self.list()
        return done[-1] if done else None


def read_trainer_state(ckpt: Path) -> dict[str, Any]:
    """The checkpoint's ``trainer.json`` (step, scheduler, ...); a clear error when it is unreadable."""
    try:
        return json.loads((ckpt / TRAINER_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise StateError(f"cannot read {ckpt / TRAINER_FILE}: {e}") from None
