"""The run directory: every file name in it, reading and writing its files, loading its model.

A run directory holds everything about one run::

    config.yaml         the resolved configuration (written once the run has really started)
    metrics.jsonl       one JSON record per logging interval
    checkpoints/        atomic checkpoints (see ``checkpoint.py``), ``latest`` pointer
    init.safetensors    the weights a fine-tuning run starts from (``sparsediff finetune``)
    summary.json        the typed :class:`RunSummary`, written when training stops
    samples/            ``sparsediff sample`` output; samples/during/ the grids drawn while training
    tensorboard/, wandb/, tracking.json
                        what the trackers write while it trains (``train.report_to``, see ``watch.py``)
    eval/, eval.json    ``sparsediff evaluate`` output

:class:`RunDir` is the only place that spells these names; sampling, evaluation, export, fine-tuning,
sweeps and reports go through it. :func:`load_masked_model` and :func:`load_for_inference` rebuild a
run's denoiser with the weights it samples with: the latest checkpoint's (EMA) weights multiplied by
the run's final masks (an EMA of sparse weights keeps fading traces of dropped weights; they are not
part of the model).
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import (
    ENGINE_FILE,
    MODEL_FILE,
    CheckpointDir,
    disk_full_error,
    load_checkpoint_weights,
    load_state_checked,
    load_tensors,
)
from .config import RunConfig, config_from_dict, flatten
from .errors import ConfigError, StateError, is_disk_full
from .sparse.masks import mask_mismatch

__all__ = [
    "RESUMABLE_CHANGES",
    "RunDir",
    "RunSummary",
    "apply_final_masks",
    "config_differences",
    "load_for_inference",
    "load_init_weights",
    "load_masked_model",
    "load_model_and_masks",
    "load_run_config",
    "load_state_checked",
    "mask_model",
]

# Fields a resumed run may change; anything else must match the run directory's config.
RESUMABLE_CHANGES = {
    "train.max_steps",
    "train.epochs",
    "train.ckpt_every",
    "train.log_every",
    "description",
    # what is watched while it trains changes nothing of the training itself
    "train.sample_every",
    "train.sample_num",
    "train.sample_steps",
    "train.report_to",
    "train.tracker_project",
    "train.tracker_name",
    "train.tracker_group",
}


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a renamed temporary file: a reader never sees half a file, and
    a write that fails leaves no temporary file (a full disk raises :class:`DiskFullError`)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if is_disk_full(e):
            then = (
                f"It was not written (any earlier {path.name} is untouched): free some space and run again."
            )
            raise disk_full_error(
                f"writing {path}", e, len(text.encode()), "the size of its text", path.parent, then
            ) from e
        raise


def _read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``, or None when it is missing, torn or not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


# ---------------------------------------------------------------------------- summary


@dataclass
class RunSummary:
    """What ``summary.json`` says about a run, written by training and by one-shot fine-tuning alike.

    Optional fields left at None are not written: ``pattern``, ``masked_layers`` and ``dense_layers``
    only for one-shot N:M pruning, the cross-rank checks and ``checkpoint_bytes`` (the bytes on disk of
    the last checkpoint directory) only for trained runs. ``extra`` holds keys this version does not
    know (read from a newer file) and writes them back unchanged.
    """

    preset: str
    family: str
    method: str
    sparsity: float
    steps: int
    total_steps: int
    finished: bool
    world_size: int
    batch_size: int
    train_seconds: float
    params_total: int
    params_nonzero: int
    density: float
    target_density: float
    topology_updates: int
    flops_forward_dense: float
    flops_forward_sparse: float
    flops_train_per_step: float
    flops_train_total: float
    flops_train_total_dense: float
    checkpoint: str | None
    init_from: dict[str, Any] | None
    distill_weight: float
    task: dict[str, Any]
    pattern: str | None = None
    masks_identical_across_ranks: bool | None = None
    weights_identical_across_ranks: bool | None = None
    masked_layers: int | None = None
    dense_layers: dict[str, Any] | None = None
    checkpoint_bytes: int | None = None
    # fraction of the sparsified weights ever active, and per layer density / fraction ever active
    topology: dict[str, Any] | None = None
    sample_grids: int | None = None  # grids drawn while training (train.sample_every), and their seconds
    sample_grid_seconds: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    # The order of the keys in summary.json (readers and recorded CSVs see this order).
    KEYS = (
        "preset",
        "family",
        "method",
        "pattern",
        "sparsity",
        "steps",
        "total_steps",
        "finished",
        "world_size",
        "masks_identical_across_ranks",
        "weights_identical_across_ranks",
        "batch_size",
        "train_seconds",
        "params_total",
        "params_nonzero",
        "density",
        "target_density",
        "masked_layers",
        "dense_layers",
        "topology_updates",
        "topology",
        "flops_forward_dense",
        "flops_forward_sparse",
        "flops_train_per_step",
        "flops_train_total",
        "flops_train_total_dense",
        "checkpoint",
        "checkpoint_bytes",
        "sample_grids",
        "sample_grid_seconds",
        "init_from",
        "distill_weight",
        "task",
    )
    _OPTIONAL = frozenset(
        {
            "pattern",
            "masks_identical_across_ranks",
            "weights_identical_across_ranks",
            "masked_layers",
            "dense_layers",
            "checkpoint_bytes",
            "topology",
            "sample_grids",
            "sample_grid_seconds",
        }
    )

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of ``summary.json`` (optional fields left at None are left out)."""
        out = {}
        for key in self.KEYS:
            value = getattr(self, key)
            if value is None and key in self._OPTIONAL:
                continue
            out[key] = value
        out.update(self.extra)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunSummary:
        """A summary from ``summary.json``'s object; unknown keys go to ``extra``."""
        fields = [f for f in dataclasses.fields(cls) if f.name != "extra"]
        names = {f.name for f in fields}
        required = [f.name for f in fields if f.default is dataclasses.MISSING and f.name not in data]
        if required:
            raise StateError(f"a run summary misses {', '.join(required[:3])}")
        known = {k: v for k, v in data.items() if k in names}
        return cls(**known, extra={k: v for k, v in data.items() if k not in names})


# ---------------------------------------------------------------------------- the directory


class RunDir:
    """A run directory and every file in it (see the module docstring)."""

    CONFIG = "config.yaml"
    SUMMARY = "summary.json"
    EVAL = "eval.json"
    METRICS = "metrics.jsonl"
    CHECKPOINTS = "checkpoints"
    SAMPLES = "samples"
    EVAL_DIR = "eval"
    INIT = "init.safetensors"
    DURING = "during"  # under SAMPLES: the grids drawn while training
    TENSORBOARD = "tensorboard"
    TRACKING = "tracking.json"  # the tracker run ids of this run (resume and evaluate log into them)

    def __init__(self, path: str | Path):
        self._path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self._path)!r})"

    def __fspath__(self) -> str:
        return str(self._path)

    # ------------------------------------------------------------------ paths

    @property
    def path(self) -> Path:
        return self._path

    @property
    def config_path(self) -> Path:
        return self._path / self.CONFIG

    @property
    def summary_path(self) -> Path:
        return self._path / self.SUMMARY

    @property
    def eval_path(self) -> Path:
        return self._path / self.EVAL

    @property
    def metrics_path(self) -> Path:
        return self._path / self.METRICS

    @property
    def init_path(self) -> Path:
        return self._path / self.INIT

    @property
    def checkpoints(self) -> CheckpointDir:
        return CheckpointDir(self._path / self.CHECKPOINTS)

    @property
    def samples_dir(self) -> Path:
        return self._path / self.SAMPLES

    @property
    def eval_dir(self) -> Path:
        return self._path / self.EVAL_DIR

    @property
    def during_dir(self) -> Path:
        return self._path / self.SAMPLES / self.DURING

    def during_grid_path(self, step: int) -> Path:
        """The sample grid drawn while training at optimiser step ``step``."""
        return self.during_dir / f"step-{step:08d}.png"

    def during_grids(self) -> list[tuple[int, Path]]:
        """``(step, path)`` of every grid drawn while training, by step."""
        paths = self.during_dir.glob("step-*.png")
        return sorted((int(p.stem[5:]), p) for p in paths if p.stem[5:].isdigit())

    @property
    def tensorboard_dir(self) -> Path:
        return self._path / self.TENSORBOARD

    @property
    def tracking_path(self) -> Path:
        return self._path / self.TRACKING

    # ------------------------------------------------------------------ what it holds

    def exists(self) -> bool:
        """Whether the directory holds a run (a config)."""
        return self.config_path.exists()

    @staticmethod
    def is_run(path: str | Path) -> bool:
        """Whether ``path`` holds a run that has started: a config next to a summary, metrics, an
        evaluation or checkpoints."""
        run = RunDir(path)
        if not run.exists():
            return False
        files = (run.summary_path, run.metrics_path, run.eval_path)
        return any(p.exists() for p in files) or (run.path / RunDir.CHECKPOINTS).is_dir()

    # ------------------------------------------------------------------ config

    def load_config(self) -> RunConfig:
        """The run's resolved config; a clear error when the directory holds no run."""
        import yaml

        if not self.config_path.exists():
            raise StateError(f"{self._path} is not a sparsediff run directory (no {self.CONFIG})")
        return config_from_dict(yaml.safe_load(self.config_path.read_text()), source=str(self.config_path))

    def write_config(self, cfg: RunConfig) -> Path:
        """Write ``cfg`` as the run's config (creating the directory)."""
        self._path.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.config_path, cfg.to_yaml())
        return self.config_path

    def check_start(self, cfg: RunConfig, resume: bool) -> None:
        """Refuse to train ``cfg`` here when the directory holds another run (or this one without
        ``resume``); resuming may change only :data:`RESUMABLE_CHANGES`."""
        if not self.exists():
            return
        if not resume:
            raise ConfigError(
                f"{self._path} already holds a run; pass --resume to continue it or choose another --out"
            )
        saved = self.load_config()
        diffs = [d for d in config_differences(saved, cfg) if d not in RESUMABLE_CHANGES]
        if diffs:
            there, now = flatten(saved.to_dict()), flatten(cfg.to_dict())
            raise ConfigError(
                f"{self._path} was trained with another configuration; it differs in "
                + ", ".join(f"{d} ({there.get(d)!r} there, {now.get(d)!r} now)" for d in diffs[:4])
            )

    # ------------------------------------------------------------------ summary and evaluation

    def read_summary(self) -> dict[str, Any] | None:
        """``summary.json`` as a dict, or None when it is missing or unreadable."""
        return _read_json(self.summary_path)

    def write_summary(self, summary: RunSummary | Mapping[str, Any]) -> dict[str, Any]:
        """Write ``summary.json`` (atomically); returns the dict written."""
        data = summary.to_dict() if isinstance(summary, RunSummary) else dict(summary)
        self._path.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.summary_path, json.dumps(data, indent=2))
        return data

    def read_eval(self) -> dict[str, Any] | None:
        """``eval.json`` as a dict, or None when it is missing or torn (killed while writing)."""
        return _read_json(self.eval_path)

    def write_eval(self, result: Mapping[str, Any]) -> Path:
        """Write ``eval.json`` atomically: a reader never sees half a file."""
        _write_atomic(self.eval_path, json.dumps(dict(result), indent=2))
        return self.eval_path

    # ------------------------------------------------------------------ trackers

    def read_tracking_ids(self) -> dict[str, str]:
        """The tracker run ids the run keeps (``tracking.json``; empty before trackers first started).
        An unreadable file is said once (a new W&B run would start) and read as empty."""
        if not self.tracking_path.exists():
            return {}
        data = _read_json(self.tracking_path)
        if data is None:
            warnings.warn(
                f"{self.tracking_path} cannot be read: the trackers start new runs instead of resuming theirs",
                UserWarning,
                stacklevel=2,
            )
            return {}
        return {str(k): str(v) for k, v in data.items()}

    def write_tracking_ids(self, ids: Mapping[str, str]) -> Path:
        """Write ``tracking.json`` atomically."""
        self._path.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.tracking_path, json.dumps(dict(ids), indent=2))
        return self.tracking_path

    # ------------------------------------------------------------------ checkpoints

    def latest_checkpoint(self) -> Path:
        """The run's latest checkpoint directory; a clear error when it has none yet."""
        ckpt = self.checkpoints.latest()
        if ckpt is None:
            raise StateError(
                f"{self._path} has no checkpoint yet; train it first (sparsediff train ... --out {self._path})"
            )
        return ckpt


def load_run_config(run_dir: str | Path) -> RunConfig:
    """The resolved config of the run in ``run_dir`` (see :meth:`RunDir.load_config`)."""
    return RunDir(run_dir).load_config()


def config_differences(a: RunConfig, b: RunConfig) -> list[str]:
    """Flattened field names (``train.lr``) whose values differ between two configs."""
    fa, fb = flatten(a.to_dict()), flatten(b.to_dict())
    return sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k))


# ---------------------------------------------------------------------------- weights


def load_init_weights(
    init: str | Path | Mapping[str, torch.Tensor] | None, run_dir: str | Path
) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any] | None]:
    """The weights a run starts from (``train.init_from`` or ``train(init_weights=...)``) and what they are.

    A relative path is looked up in the run directory first (``sparsediff finetune`` copies the source
    weights to ``RUN/init.safetensors``, so a run directory stays self-contained and resumable), then in
    the working directory. The file's metadata key ``sparsediff_init`` (JSON) describes the source.
    """
    if init is None:
        return None, None
    if isinstance(init, Mapping):
        return dict(init), {"path": None}
    run_dir = Path(run_dir)
    path = Path(init)
    if not path.is_absolute() and (run_dir / path).exists():
        path = run_dir / path
    if not path.exists():
        raise ConfigError(
            f"train.init_from: {init!s} does not exist (looked in {run_dir} and the working directory)"
        )
    tensors, meta = load_tensors(path)
    info = {"path": str(path)}
    if "sparsediff_init" in meta:
        info.update(json.loads(meta["sparsediff_init"]))
    return tensors, info


@torch.no_grad()
def mask_model(
    model: torch.nn.Module, cfg: RunConfig, ckpt: Path
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Zero the model's weights outside the run's final masks; ``(masks, report)``.

    N:M runs (srste, oneshot) are masked by magnitude to their final pattern; unstructured runs by the
    masks in the checkpoint's engine state. ``masks``: parameter name -> bool mask (True = kept), empty
    for a dense run. Masked entries become exactly +0.0.
    """
    if not cfg.sparse.sparse_method.masked:
        return {}, {"masked_layers": 0}
    if cfg.sparse.structured:
        from .sparse import one_shot_nm
        from .sparse.nm import parse_nm

        pattern = parse_nm(cfg.sparse.final_nm_pattern())
        masks = one_shot_nm(
            model,
            pattern.n,
            pattern.m,
            include=cfg.sparse.include or None,
            exclude=cfg.sparse.exclude or None,
            incompatible=cfg.sparse.nm_incompatible,
        )
        report = {"masked_layers": len(masks), "pattern": f"{pattern.n}:{pattern.m}"}
    else:
        from .sparse.codec import mask_checksum, shared_mask_checksums
        from .sparse.io import MASK_PREFIX, engine_state_from_tensors

        tensors, meta = load_tensors(ckpt / ENGINE_FILE)
        masks = engine_state_from_tensors(tensors, meta)["masks"]
        report = {"masked_layers": len(masks)}
        # the weights were saved against these masks: an engine file from another checkpoint is refused
        saved = shared_mask_checksums(ckpt / MODEL_FILE)
        for name, mask in masks.items():
            crc = saved.get((ENGINE_FILE, MASK_PREFIX + name))
            if crc is not None and crc != mask_checksum(mask.bool()):
                raise StateError(
                    f"{ckpt / ENGINE_FILE}: the mask of {name!r} is not the one {MODEL_FILE} was saved with "
                    "(the files come from different checkpoints)"
                )
    params = dict(model.named_parameters())
    problem = mask_mismatch(masks, params)
    if problem:
        raise StateError(f"{ckpt}: {problem}")
    for name, mask in masks.items():
        params[name].masked_fill_(~mask.to(params[name].device), 0.0)
    return {n: m.detach().bool().cpu() for n, m in masks.items()}, report


def apply_final_masks(model: torch.nn.Module, cfg: RunConfig, ckpt: Path) -> dict[str, Any]:
    """Zero the model's weights outside the run's final masks (:func:`mask_model`); returns a small report."""
    return mask_model(model, cfg, ckpt)[1]


def _restore(
    model: torch.nn.Module, cfg: RunConfig, ckpt: Path, use_ema: bool
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load the checkpoint's (EMA) weights into ``model`` and apply the final masks; ``(masks, report)``.

    A run trained with ``backend: sparse`` saved compact layers (values and their layout): ``model`` is
    given that layout for loading (the masks of the checkpoint's engine state), then made dense again, so
    every reader of a run gets the same dense model whatever backend trained it.
    """
    weights = "ema" if use_ema else "model"
    if cfg.sparse.backend == "sparse":
        _load_compact(model, ckpt, use_ema)
    else:
        load_checkpoint_weights(model, ckpt, use_ema)
    masks, report = mask_model(model, cfg, ckpt)
    return masks, {"checkpoint": str(ckpt), "weights": weights, **report}


def _load_compact(model: torch.nn.Module, ckpt: Path, use_ema: bool) -> None:
    from .sparse.io import engine_state_from_tensors
    from .sparse.runtime.to_compact import to_compact, to_dense

    tensors, meta = load_tensors(ckpt / ENGINE_FILE)
    masks = engine_state_from_tensors(tensors, meta)["masks"]
    params = dict(model.named_parameters())
    problem = mask_mismatch(masks, params)
    if problem:
        raise StateError(f"{ckpt}: {problem}")
    to_compact(model, {n: params[n] for n in masks}, {n: m.bool() for n, m in masks.items()})
    load_checkpoint_weights(model, ckpt, use_ema)
    to_dense(model)


def load_model_and_masks(
    run_dir: str | Path | RunDir, use_ema: bool = True
) -> tuple[RunConfig, torch.nn.Module, dict[str, torch.Tensor], dict[str, Any]]:
    """``(cfg, model, masks, info)``: the run's denoiser on the CPU with its (EMA) weights and final masks
    applied, the masks themselves (parameter name -> bool, empty for a dense run) and what was loaded."""
    from .models import build_model

    run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    cfg = run.load_config()
    ckpt = run.latest_checkpoint()
    model = build_model(cfg.model)
    masks, report = _restore(model, cfg, ckpt, use_ema)
    return cfg, model.eval(), masks, {"run": str(run.path), **report}


def load_masked_model(
    run_dir: str | Path | RunDir, use_ema: bool = True
) -> tuple[RunConfig, torch.nn.Module, dict[str, Any]]:
    """``(cfg, model, info)``: the run's denoiser on the CPU with its (EMA) weights and final masks.

    Like :func:`load_for_inference`, without building the task (no first stage or data needed, e.g. to
    export or fine-tune a model).
    """
    cfg, model, _, info = load_model_and_masks(run_dir, use_ema)
    return cfg, model, info


def load_for_inference(
    run_dir: str | Path | RunDir, use_ema: bool = True, device: str | None = None
) -> tuple[RunConfig, Any, torch.nn.Module, dict[str, Any]]:
    """``(cfg, task, model, info)`` with the latest checkpoint's (EMA) weights and final masks, on
    ``device`` (default: CUDA when available, else the CPU)."""
    from .tasks import make_task

    run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    cfg = run.load_config()
    ckpt = run.latest_checkpoint()
    task = make_task(cfg, run.path)
    model = task.build_model()
    _, info = _restore(model, cfg, ckpt, use_ema)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(dev).eval()
    return cfg, task, model, info
