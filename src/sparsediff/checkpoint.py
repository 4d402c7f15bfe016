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
start. A write that fails (the disk or the quota full, say) removes the unfinished checkpoint at once, so
its space is free again, and leaves the previous checkpoint and ``latest`` as they were; a full disk is
reported as a :class:`~sparsediff.errors.DiskFullError` naming the run directory, the bytes the
checkpoint needs and the bytes free. Nothing here unpickles anything.

The files are written compressed (``sparse/codec/``): the engine's masks as bitmasks (deflated when
smaller), and every tensor that is zero outside its layer's mask (the weights, their EMA copy, each
optimiser state tensor of the weight's shape) as the values inside the mask only, referring to the mask
in ``engine.safetensors``; any other tensor that is mostly zero with its own support, the rest dense. A
90 %-sparse run's checkpoint is about 0.15x of a dense one's (benchmarks/README.md, "Bytes on disk").
Loading restores every tensor bit for bit; checkpoints written before compression load as they are.
:func:`load_tensors` reads either kind (a compressed file needs the files it refers to next to it).

Also here: a model's weights and EMA as safetensors tensors, and loading them back with errors that name
the file and the entries that do not fit.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save, save_file

from .errors import DiskFullError, StateError, is_disk_full
from .sparse.codec import Support, load_compressed, save_compressed, serialized_nbytes
from .sparse.io import MASK_PREFIX

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
    path: Path,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    compress: bool = False,
    supports: Mapping[str, Support] | None = None,
) -> None:
    """Write ``tensors`` to the safetensors file ``path``; with ``compress``, sparse tensors compressed
    (against ``supports`` where given, see :func:`sparsediff.sparse.codec.encode`)."""
    if compress:
        save_compressed(path, tensors, metadata, supports)
    else:
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        save_file(tensors, str(path), metadata=dict(metadata) if metadata is not None else None)


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file, compressed or not, exactly as saved.

    Raises:
        StateError: the file is missing, truncated or corrupted (the message names it and the tensor).
    """
    return load_compressed(path)


def directory_nbytes(path: Path) -> int:
    """Bytes of the files in the directory ``path`` and below (0 when it does not exist)."""
    path = Path(path)
    if not path.is_dir():
        return 0
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def tensors_nbytes(
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    compress: bool = False,
    supports: Mapping[str, Support] | None = None,
) -> int:
    """The size in bytes of the file :func:`save_tensors` would write with these arguments (nothing is
    written; the file's bytes are built in memory)."""
    if compress:
        return serialized_nbytes(tensors, metadata, supports)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return len(save(tensors, metadata=dict(metadata) if metadata is not None else None))


# ---------------------------------------------------------------------------- a full disk


def _nbytes_text(n: int) -> str:
    """``"12,345,678 bytes (11.8 MiB)"``."""
    unit = next(((u, 2**e) for u, e in (("GiB", 30), ("MiB", 20)) if n >= 2**e), None)
    return f"{n:,} bytes" + (f" ({n / unit[1]:.1f} {unit[0]})" if unit else "")


def disk_full_error(
    doing: str, error: BaseException, needed: int | None, counted: str, where: Path, then: str
) -> DiskFullError:
    """The error to raise when ``doing`` (``"writing PATH"``) failed with ``error``, a full disk.

    The message says what was written, why it failed, the bytes it needs (``needed``, ``counted`` saying
    how they were counted), the bytes free on the file system of ``where`` (when they can be read), and
    ``then``: what was left on disk and what to do.
    """
    reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
    need = (
        f"it needs {_nbytes_text(needed)} ({counted})"
        if needed is not None
        else "the bytes it needs are unknown"
    )
    try:
        free = f"{_nbytes_text(shutil.disk_usage(where).free)} are free in {where}"
    except OSError:
        free = f"the free space of {where} cannot be read"
    return DiskFullError(f"the disk filled while {doing} ({reason}): {need}, and {free}. {then}")


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


def load_checkpoint_weights(model: torch.nn.Module, ckpt: Path, use_ema: bool = True) -> Path:
    """Load a checkpoint's EMA (or raw) weights into ``model``; returns the file read.

    The EMA file holds parameters only: the model's buffers come from the model file, and a buffer
    neither file holds (one the task does not persist, e.g. a fixed random projection drawn from the
    config's seed) keeps the value the model was built with.
    """
    path = ckpt / (EMA_FILE if use_ema else MODEL_FILE)
    tensors, _ = load_tensors(path)
    if use_ema:
        buffers = {n for n, _ in model.named_buffers()}
        missing = [k for k in model.state_dict() if k not in tensors and k in buffers]
        if missing:
            saved, _ = load_tensors(ckpt / MODEL_FILE)
            own = model.state_dict()
            tensors.update({k: saved[k] if k in saved else own[k] for k in missing})
    load_state_checked(model, tensors, path)
    return path


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


def optimizer_param_names(optimizer: Any, model: torch.nn.Module) -> list[str | None]:
    """The parameter name of each index of ``optimizer.state_dict()`` (None for one ``model`` lacks)."""
    opt = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the optimiser
    names = {id(p): n for n, p in model.named_parameters()}
    return [names.get(id(p)) for group in opt.param_groups for p in group["params"]]


def optimizer_to_tensors(
    state: dict[str, Any], names: list[str | None] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Flatten ``optimizer.state_dict()`` (tensors -> safetensors, everything else -> JSON).

    ``names`` (:func:`optimizer_param_names`) are kept as metadata ``param_names``: checkpoints store each
    state tensor against its parameter's mask, and loading checks the state belongs to this model."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in state["state"].items():
        for key, value in st.items():
            if torch.is_tensor(value):
                tensors[f"state/{pid}/{key}"] = value
            else:
                scalars.setdefault(str(pid), {})[key] = value
    meta = {"param_groups": json.dumps(state["param_groups"]), "scalars": json.dumps(scalars)}
    if names is not None:
        meta["param_names"] = json.dumps(names)
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


def shared_masks(
    files: Mapping[str, tuple[Mapping[str, torch.Tensor], Mapping[str, str] | None]],
) -> dict[str, dict[str, Support]]:
    """For each file of a checkpoint, the tensors to store against the engine's masks.

    The engine file holds one mask per layer (``mask/<layer>``); a tensor named after the layer (model
    and EMA weights) or an optimiser state tensor of that layer's parameter (``state/<i>/<key>``, with
    ``param_names`` in the file's metadata), of the mask's shape, refers to it. Compression checks that
    the tensor is zero outside the mask (else it is stored on its own), so any tensor may be offered.
    """
    engine = files.get(ENGINE_FILE)
    if engine is None:
        return {}
    masks = {k[len(MASK_PREFIX) :]: v for k, v in engine[0].items() if k.startswith(MASK_PREFIX)}
    if not masks:
        return {}
    bool_masks: dict[str, torch.Tensor] = {}
    out: dict[str, dict[str, Support]] = {}
    for fname, (tensors, meta) in files.items():
        if fname == ENGINE_FILE:
            continue
        names = json.loads(meta["param_names"]) if meta and "param_names" in meta else None
        per: dict[str, Support] = {}
        for key, t in tensors.items():
            layer: str | None = key
            if names is not None and key.startswith("state/"):
                pid = key.split("/")[1]
                layer = names[int(pid)] if pid.isdigit() and int(pid) < len(names) else None
            if layer in masks and tuple(t.shape) == tuple(masks[layer].shape):
                if layer not in bool_masks:
                    bool_masks[layer] = masks[layer].detach().cpu().bool()
                per[key] = Support(bool_masks[layer], MASK_PREFIX + layer, ENGINE_FILE)
        out[fname] = per
    return out


class CheckpointDir:
    """The ``checkpoints/`` folder of a run: atomic save, ``latest`` pointer, retention."""

    def __init__(self, root: str | Path, keep: int = 2, compress: bool = True):
        self.root = Path(root)
        self.keep = keep
        self.compress = compress

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
        """Write ``files`` (name -> (tensors, metadata)) and ``trainer.json`` as checkpoint ``step``
        (compressed unless ``compress`` is False: see the module docstring).

        Whatever stops the writing, the unfinished checkpoint is removed at once (its space is free
        again) and the previous checkpoint and ``latest`` stay as they were.

        Raises:
            DiskFullError: the disk or the quota filled (the message names the run directory, the bytes
                the checkpoint needs and the bytes free).
        """
        final = self.root / checkpoint_name(step)
        tmp = self.root / f".tmp-{checkpoint_name(step)}-{os.getpid()}"
        manifest = json.dumps({"step": step, "files": sorted(files), **trainer_state}, indent=2)
        with self._undo_on_failure(
            lambda: shutil.rmtree(tmp, ignore_errors=True), final.name, files, manifest
        ):
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
            supports = shared_masks(files) if self.compress else {}
            for name, (tensors, meta) in files.items():
                save_tensors(tmp / name, tensors, meta, compress=self.compress, supports=supports.get(name))
                _fsync_file(tmp / name)
            (tmp / TRAINER_FILE).write_text(manifest)
            _fsync_file(tmp / TRAINER_FILE)
            _fsync_dir(tmp)
            if final.exists():  # a checkpoint of the same step (a resumed run reaching it again)
                shutil.rmtree(final)
            os.rename(tmp, final)
        # Until ``latest`` names it the new checkpoint is not part of the run: one whose pointer could not
        # be written is taken away again, and ``latest`` still names the previous one.
        with self._undo_on_failure(lambda: self._delete(final), final.name, files, manifest):
            self._write_latest(final.name)
        _fsync_dir(self.root)
        self._prune()
        return final

    @contextlib.contextmanager
    def _undo_on_failure(
        self, undo: Callable[[], None], name: str, files: Mapping[str, tuple[Any, Any]], manifest: str
    ) -> Iterator[None]:
        """Run the block; on any error ``undo()`` it, and turn a full disk into a :class:`DiskFullError`."""
        try:
            yield
        except BaseException as e:
            undo()
            if is_disk_full(e):
                raise self._disk_full(e, name, files, manifest) from e
            raise

    def _disk_full(
        self, error: BaseException, name: str, files: Mapping[str, tuple[Any, Any]], manifest: str
    ) -> DiskFullError:
        """The :class:`DiskFullError` of checkpoint ``name`` (its unfinished files already removed)."""
        run, last = self.root.parent, self.latest()
        try:  # the exact size of what was being written (built again in memory, not written)
            supports = shared_masks(files) if self.compress else {}
            needed: int | None = len(manifest.encode()) + sum(
                tensors_nbytes(tensors, meta, self.compress, supports.get(f))
                for f, (tensors, meta) in files.items()
            )
            counted = "the size of its files, computed from the tensors being written"
        except Exception:  # the error to report is the full disk, not this one
            needed = directory_nbytes(last) if last is not None else None
            counted = "the size of the previous checkpoint"
        then = "The unfinished checkpoint was removed; " + (
            f"the last complete one, {last.name}, is untouched and `{LATEST}` names it: free some space, "
            f"then resume from it (sparsediff train --resume --out {run})."
            if last is not None
            else "no complete checkpoint was written before it."
        )
        where = self.root if self.root.exists() else run
        return disk_full_error(f"writing checkpoint {name} of run {run}", error, needed, counted, where, then)

    def _write_latest(self, name: str) -> None:
        tmp = self.root / f".tmp-latest-{os.getpid()}"
        try:
            tmp.write_text(name + "\n")
            _fsync_file(tmp)
            os.replace(tmp, self.root / LATEST)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _delete(self, path: Path) -> None:
        """Remove checkpoint directory ``path``: renamed first (atomic), then deleted, so that a process
        killed halfway through leaves a ``.tmp-*`` directory (cleaned at the next start), never a
        half-deleted ``step-*`` one."""
        if not path.exists():
            return
        doomed = self.root / f".tmp-delete-{path.name}-{os.getpid()}"
        os.rename(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)

    def _prune(self) -> None:
        done = self.list()
        for old in done[: max(0, len(done) - self.keep)]:
            self._delete(old)

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
