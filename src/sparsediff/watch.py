"""Watching a run while it trains: sample grids, dashboards (TensorBoard, W&B) and the topology picture.

- **Sample grids** (``train.sample_every``): every that many optimiser steps, and at the run's last step,
  the EMA weights draw ``train.sample_num`` samples with DDIM over ``train.sample_steps`` steps from the
  same fixed noise (seed ``train.seed``), written to ``samples/during/step-XXXXXXXX.png``. Fixed noise
  makes the grids of one run comparable with each other (the same samples sharpen) and the grids of two
  runs of one config identical. A grid is drawn on the main process only and its time is kept out of the
  step times (it is recorded in the run summary as ``sample_grid_seconds``).
- **Trackers** (``train.report_to``: ``none``, ``tensorboard``, ``wandb`` or ``all``): accelerate's own
  trackers, started with ``accelerator.init_trackers`` and fed with ``accelerator.log``: every record of
  ``metrics.jsonl`` (as ``train/<key>``), each sample grid (``samples``), the run config as
  hyperparameters, and at each topology update the fraction of weights ever active
  (``topology/ever_active``) with a per-layer picture (``topology/layers``). TensorBoard writes to
  ``RUN/tensorboard/``, W&B to ``RUN/wandb/`` (``WANDB_MODE=offline`` works without a network; ``wandb
  sync`` uploads later). Both come with ``pip install 'sparsediff[tracking]'``.
- A run is named on a dashboard by ``train.tracker_name`` (default: its directory's name) and grouped by
  ``train.tracker_group`` (a sweep sets its own directory's name); a resumed run, and ``sparsediff
  evaluate --report-to``, log into the same tracker run (the W&B run id is kept in ``RUN/tracking.json``;
  W&B plots evaluations against ``eval/train_step``, its own step only increasing).
- Only the main process starts trackers and draws grids; a failure there is raised on every process
  (:func:`raise_on_every_rank`), so the others never wait for it forever.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import RunConfig, flatten
from .errors import ConfigError, TrainingError
from .run import RunDir

TRACKERS = ("none", "tensorboard", "wandb", "all")
EVAL_STEP = "eval/train_step"  # the x-axis of evaluations on W&B
EXTRA = "pip install 'sparsediff[tracking]'"
_MODULE_OF = {"tensorboard": "tensorboard", "wandb": "wandb"}  # the package each tracker imports


# ---------------------------------------------------------------------------- which trackers


def tracker_names(report_to: str | None) -> list[str]:
    """The trackers ``report_to`` asks for (``none`` -> ``[]``, ``all`` -> both), each installed.

    Raises:
        ConfigError: an unknown name, or a tracker whose package is missing (naming the extra to install).
    """
    value = "none" if report_to is None else report_to
    if value not in TRACKERS:
        raise ConfigError(
            f"train.report_to (--report-to) must be one of {', '.join(TRACKERS)}, got {report_to!r}"
        )
    names = {"none": [], "all": ["tensorboard", "wandb"]}.get(value, [value])
    for name in names:
        if importlib.util.find_spec(_MODULE_OF[name]) is None:
            raise ConfigError(
                f"train.report_to={value} (--report-to {value}) needs the {_MODULE_OF[name]!r} package, "
                f"which is not installed: {EXTRA}"
            )
    if names:
        from accelerate.tracking import GeneralTracker

        if not hasattr(GeneralTracker, "start"):  # older releases start a tracker when it is built
            raise ConfigError(
                "train.report_to needs an accelerate release whose trackers start in init_trackers "
                "(pip install -U accelerate)"
            )
    return names


def check_watch_settings(cfg: RunConfig) -> list[str]:
    """The trackers of ``cfg`` (see :func:`tracker_names`), after checking the sample-grid fields."""
    t = cfg.train
    if t.sample_every < 0:
        raise ConfigError(f"train.sample_every must be >= 0 (0: no grids), got {t.sample_every}")
    if t.sample_num < 1:
        raise ConfigError(f"train.sample_num must be >= 1, got {t.sample_num}")
    if not 1 <= t.sample_steps <= cfg.diffusion.timesteps:
        raise ConfigError(
            f"train.sample_steps must be in [1, {cfg.diffusion.timesteps}], got {t.sample_steps}"
        )
    return tracker_names(t.report_to)


def make_trackers(
    names: list[str], cfg: RunConfig, run: RunDir, job: str = "train", quiet: bool = False
) -> list[Any]:
    """accelerate tracker objects for ``names``, writing into ``run`` (pass them as ``log_with``);
    ``quiet`` silences W&B's own printing.

    A W&B run id is made the first time and written by :func:`keep_tracking_ids` once the run has
    started, so that a resumed run and its evaluation log into the same W&B run.
    """
    from accelerate.tracking import TensorBoardTracker, WandBTracker

    t = cfg.train
    out: list[Any] = []
    if "tensorboard" in names:
        out.append(TensorBoardTracker(run_name=RunDir.TENSORBOARD, logging_dir=str(run.path)))
    if "wandb" in names:
        ids = run.read_tracking_ids()
        out.append(
            WandBTracker(
                run_name=t.tracker_project,
                name=t.tracker_name or run.path.name,
                group=t.tracker_group,
                id=ids.get("wandb_id") or uuid.uuid4().hex[:12],  # W&B ids: letters and digits
                resume="allow",
                dir=str(run.path),
                job_type=job,
                # the run's output stays the run's; a W&B run left open in this process is finished
                settings={"silent": quiet, "console": "off", "reinit": "finish_previous"},
            )
        )
    return out


def keep_tracking_ids(run: RunDir, trackers: list[Any]) -> None:
    """Write the W&B run id of ``trackers`` into ``RUN/tracking.json`` (main process, after the start)."""
    ids = run.read_tracking_ids()
    for tracker in trackers:
        if tracker.name == "wandb":
            ids["wandb_id"] = tracker.init_kwargs["id"]
    if ids:
        run.write_tracking_ids(ids)


def hyperparameters(cfg: RunConfig) -> dict[str, Any]:
    """The config as flat scalar hyperparameters (``train.lr``: 0.001; lists and mappings as JSON text)."""
    out: dict[str, Any] = {}
    for key, value in flatten(cfg.to_dict()).items():
        if value is None:
            out[key] = "none"
        elif isinstance(value, (bool, int, float, str)):
            out[key] = value
        else:
            out[key] = json.dumps(value, sort_keys=True)
    return out


def start_trackers(accelerator: Any, cfg: RunConfig, run: RunDir) -> None:
    """``accelerator.init_trackers`` with the run config as hyperparameters (no-op without trackers), on
    every process: the main one starts them, and a failure there is raised on all
    (:func:`raise_on_every_rank`)."""
    if not accelerator.log_with:
        return
    error = None
    if accelerator.is_main_process:
        try:
            run.path.mkdir(parents=True, exist_ok=True)
            accelerator.init_trackers(cfg.train.tracker_project, config=hyperparameters(cfg))
            keep_tracking_ids(run, accelerator.trackers)
        except Exception as e:  # noqa: BLE001 (raised below, on every process)
            error = e
    raise_on_every_rank(accelerator, error, "starting the trackers")


def finish_trackers(accelerator: Any) -> None:
    """Close the started trackers (what ``accelerator.end_training`` does, without ending the process
    group: ``train()`` is a library call, the caller's distributed job may go on). Every tracker is
    closed even when one fails to; the first failure is raised after."""
    trackers, accelerator.trackers = list(accelerator.trackers), []
    failure = None
    for tracker in trackers:
        try:
            tracker.finish()
        except Exception as e:  # noqa: BLE001 (the others must still be closed)
            failure = failure or e
    if failure is not None:
        raise failure


def raise_on_every_rank(accelerator: Any, error: BaseException | None, what: str) -> None:
    """Raise ``error`` (from the main process) on every process: work only the main process does (starting
    the trackers, drawing a grid) must not leave the others waiting for it forever when it fails."""
    flag = torch.tensor([0.0 if error is None else 1.0], device=accelerator.device)
    if accelerator.num_processes > 1:
        flag = accelerator.reduce(flag, reduction="sum")
    if float(flag.sum()) > 0:
        if error is not None:
            raise error
        raise TrainingError(f"{what} failed on the main process (its error is in its output); stopped")


def log_image(accelerator: Any, key: str, image: np.ndarray, step: int) -> None:
    """Log one uint8 image (H, W, 3) to every started tracker, through accelerate's ``log_images``."""
    for tracker in accelerator.trackers:
        _log_image_to(tracker, key, image, step)


def _log_image_to(tracker: Any, key: str, image: np.ndarray, step: int | None) -> None:
    """One uint8 image (H, W, 3) to one tracker, in the form its ``log_images`` takes (``step`` None:
    the tracker's own next step)."""
    if tracker.name == "tensorboard":
        tracker.log_images({key: image[None]}, step=step, dataformats="NHWC")
    elif hasattr(tracker, "log_images"):
        tracker.log_images({key: [image]}, step=step)


def read_image(path: Path) -> np.ndarray:
    """A PNG as uint8 (H, W, 3)."""
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def log_evaluation(
    run: RunDir, cfg: RunConfig, result: Mapping[str, Any], report_to: str, quiet: bool
) -> None:
    """Log an evaluation (``sparsediff evaluate --report-to``) into the run's tracker runs, at its last
    training step: FID, the measured sampling time, non-zeros and FLOPs per sample, and the sample grid."""
    from accelerate import Accelerator

    names = tracker_names(report_to)
    if not names:
        return
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(), log_with=make_trackers(names, cfg, run, "evaluate", quiet)
    )
    step = int(result.get("train_steps") or 0)
    fid = result["fid"]
    keys = ("generate_seconds", "sample_seconds", "params_nonzero", "density", "flops_per_sample_sparse")
    values = {f"eval/{fid['metric']}": float(fid["value"])}
    values.update({f"eval/{k}": result[k] for k in keys if isinstance(result.get(k), (int, float))})
    grid = read_image(Path(result["grid"])) if result.get("grid") else None
    try:
        accelerator.init_trackers(cfg.train.tracker_project)
        keep_tracking_ids(run, accelerator.trackers)
        for tracker in accelerator.trackers:
            if tracker.name == "wandb":
                # W&B's own step only increases and a resumed W&B run starts after its last one: the
                # evaluation gets its own x-axis, the training step it was made at
                tracker.run.define_metric("eval/*", step_metric=EVAL_STEP)
                tracker.log({**values, EVAL_STEP: step})
            else:
                tracker.log(values, step=step)
            if grid is not None:
                _log_image_to(tracker, "eval/samples", grid, None if tracker.name == "wandb" else step)
    finally:
        finish_trackers(accelerator)


# ---------------------------------------------------------------------------- sample grids


def grid_due(cfg: RunConfig, step: int, total: int) -> bool:
    """Whether step ``step`` (of ``total``) draws a grid: every ``sample_every`` steps and at the end."""
    every = cfg.train.sample_every
    return every > 0 and (step % every == 0 or step == total)


@contextlib.contextmanager
def ema_weights(model: torch.nn.Module, ema: Any) -> Iterator[torch.nn.Module]:
    """``model`` in eval mode with the EMA's weights inside the block, its own weights and mode after.

    The weights are copied in place (``copy_`` under ``no_grad``), so that every cache keyed on a
    tensor's version (a compact layer's dense copy) sees the change.
    """
    params = list(model.parameters())
    shadows = list(ema.shadow_params)
    if len(params) != len(shadows) or any(p.shape != s.shape for p, s in zip(params, shadows)):
        raise RuntimeError(
            f"the EMA ({len(shadows)} tensors) does not line up with the model's {len(params)} parameters"
        )
    was_training = model.training
    with torch.no_grad():
        saved = [p.detach().clone() for p in params]
        for p, s in zip(params, shadows):
            p.copy_(s.to(device=p.device, dtype=p.dtype))
    model.eval()
    try:
        yield model
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
        model.train(was_training)


def draw_grid(task: Any, model: torch.nn.Module, cfg: RunConfig, device: torch.device, path: Path) -> Path:
    """The fixed-seed grid of ``model`` (see the module docstring) written to ``path``."""
    from .sample import save_grid

    t = cfg.train
    samples = task.generate(
        model,
        t.sample_num,
        torch.Generator().manual_seed(t.seed),
        sampler="ddim",
        steps=t.sample_steps,
        eta=cfg.sample.eta,
        batch_size=min(t.sample_num, cfg.sample.batch_size),
        device=device,
        progress=False,
    )
    return save_grid(task.preview_images(samples), path)


# ---------------------------------------------------------------------------- the topology picture


def topology_layers(report: Any) -> list[dict[str, Any]]:
    """Per layer ``{"name", "numel", "density", "ever_active"}`` (fractions) from an engine report."""
    return [
        {
            "name": layer.name,
            "numel": layer.numel,
            "density": layer.density,
            "ever_active": None if layer.ever_active is None else layer.ever_active / max(layer.numel, 1),
        }
        for layer in report.layers
    ]


def topology_bars(layers: list[dict[str, Any]], title: str, width: int = 560, row: int = 11) -> np.ndarray:
    """The per-layer picture of the dashboard: one row per layer (model order), its name, a light bar to
    the fraction of its weights ever active and a dark one to its density; uint8 (H, W, 3).

    Drawn with PIL rather than matplotlib (milliseconds instead of about half a second a picture: it is
    drawn at every topology update). ``sparsediff report`` draws the full figure (report/plots.py).
    """
    from PIL import Image, ImageDraw

    label, pad = int(width * 0.55), 4
    bar = width - label - 2 * pad
    img = Image.new("RGB", (width, row * (len(layers) + 2) + pad), "white")
    draw = ImageDraw.Draw(img)
    draw.text((pad, 1), title, fill="black")
    chars = max(8, label // 6)  # the default bitmap font: about 6 px a character
    for i, layer in enumerate(layers):
        y = row * (i + 1) + pad
        name = layer["name"] if len(layer["name"]) <= chars else "..." + layer["name"][-(chars - 3) :]
        draw.text((pad, y - 1), name, fill="black")
        x0 = label + pad
        ever = layer["ever_active"] if layer.get("ever_active") is not None else layer["density"]
        draw.rectangle([x0, y + 1, x0 + round(bar * ever), y + row - 2], fill=(158, 202, 225))
        draw.rectangle([x0, y + 3, x0 + round(bar * layer["density"]), y + row - 4], fill=(8, 81, 156))
        draw.line([x0 + bar, y, x0 + bar, y + row - 1], fill=(190, 190, 190))  # the whole layer
    return np.asarray(img)


class Watch:
    """What the training loop calls to be watched (see the module docstring); inert when nothing is on."""

    def __init__(self, tr: Any, grids: int = 0, grid_seconds: float = 0.0):
        self.tr = tr
        self.grids, self.grid_seconds = grids, grid_seconds  # of the whole run (a resumed one: so far)
        self.updates_seen = tr.engine.num_updates

    @property
    def tracking(self) -> bool:
        return bool(self.tr.accelerator.trackers)

    def log_record(self, record: Mapping[str, Any]) -> None:
        """A ``metrics.jsonl`` record to the trackers, as ``train/<key>`` scalars."""
        if not self.tracking:
            return
        values = {
            f"train/{k}": v
            for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        self.tr.accelerator.log(values, step=int(record["step"]))

    def after_step(self, step: int) -> None:
        """The topology picture after an update, the sample grid when one is due (main process draws)."""
        tr = self.tr
        if tr.engine.num_updates != self.updates_seen:
            self.updates_seen = tr.engine.num_updates
            if self.tracking and tr.is_main:
                self._log_topology(step)
        if grid_due(tr.cfg, step, tr.steps):
            error = None
            if tr.is_main:
                try:
                    self._draw(step)
                except Exception as e:  # noqa: BLE001 (raised below, on every process)
                    error = e
            raise_on_every_rank(tr.accelerator, error, f"drawing the sample grid of step {step}")

    def _draw(self, step: int) -> None:
        tr = self.tr
        t0 = time.perf_counter()
        with ema_weights(tr.raw_model, tr.ema) as model:
            path = draw_grid(tr.task, model, tr.cfg, tr.accelerator.device, tr.run.during_grid_path(step))
        self.grid_seconds += time.perf_counter() - t0
        self.grids += 1
        if self.tracking:
            log_image(tr.accelerator, "samples", read_image(path), step)

    def _log_topology(self, step: int) -> None:
        report = self.tr.engine.report()
        if report.ever_active_fraction is None:
            return
        self.tr.accelerator.log({"topology/ever_active": report.ever_active_fraction}, step=step)
        title = f"step {step}: {report.ever_active_fraction:.1%} ever active at density {report.target_density:.1%}"
        log_image(self.tr.accelerator, "topology/layers", topology_bars(topology_layers(report), title), step)
