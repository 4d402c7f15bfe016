"""Run configuration: dataclasses loaded from YAML preset files, overridable from the command line.

A preset is a YAML file in ``sparsediff/configs/`` (``sparsediff inspect --list`` shows them) or any
YAML path. Sections map one-to-one onto the dataclasses below; an unknown key is an error that names the
key and the file. Command-line overrides use dotted keys: ``--set train.lr=1e-4 --set sparse.sparsity=0.5``.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .sparse.spec import SparseSpec  # the `sparse:` section, declared with the engine

PRESET_DIR = Path(__file__).parent / "configs"


@dataclass
class ModelSpec:
    """The denoiser: a registered ``kind`` and the keyword arguments of its builder."""

    kind: str = "unet2d"
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class FirstStageSpec:
    """The frozen first stage that maps data to latents (``none`` trains in data space)."""

    kind: str = "none"  # none | autoencoder-kl | pretrained
    path: str | None = None  # a diffusers from_pretrained directory, or a sparsediff autoencoder run
    args: dict[str, Any] = field(default_factory=dict)
    steps: int = 2000  # training steps of `sparsediff train-autoencoder`
    batch_size: int = 64
    lr: float = 1e-3
    kl_weight: float = 1e-6


@dataclass
class DataSpec:
    name: str = "fashion-mnist"
    root: str | None = None
    image_size: int = 32
    channels: int = 1
    train_size: int | None = None  # None: the whole train split
    val_size: int | None = None
    split_seed: int = 0
    num_workers: int = 0
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class DiffusionSpec:
    schedule: str = "scaled_linear"  # scaled_linear (LDM "linear") | linear | cosine
    beta_start: float = 0.0015
    beta_end: float = 0.0195
    timesteps: int = 1000


@dataclass
class TrainSpec:
    batch_size: int = 64
    lr: float = 2e-4
    weight_decay: float = 1e-2
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    epochs: float | None = None
    max_steps: int | None = None
    grad_accum: int = 1
    mixed_precision: str = "no"  # no | fp16 | bf16
    ema_decay: float = 0.999
    warmup_steps: int = 0
    grad_clip: float | None = 1.0
    ckpt_every: int = 500
    log_every: int = 25
    seed: int = 0
    distill_weight: float = 0.1  # fine-tuning: weight of the teacher term
    # fine-tuning: safetensors weights the denoiser starts from (relative: to the run directory); with
    # distill_weight > 0 they are also the frozen teacher. `sparsediff finetune` sets it.
    init_from: str | None = None
    # watching the run (watch.py): fixed-seed EMA sample grids into samples/during/ every sample_every
    # steps and at the last step (0: none), sample_num samples each, DDIM over sample_steps steps
    sample_every: int = 0
    sample_num: int = 16
    sample_steps: int = 25
    # trackers fed through accelerate: none | tensorboard | wandb | all (pip install 'sparsediff[tracking]')
    report_to: str = "none"
    tracker_project: str = "sparsediff"  # the W&B project (TensorBoard: RUN/tensorboard/)
    tracker_name: str | None = None  # the run's name on a dashboard (default: its directory's name)
    tracker_group: str | None = None  # runs compared side by side (a sweep sets its directory's name)


@dataclass
class SampleSpec:
    sampler: str = "ddim"
    steps: int = 50
    eta: float = 0.0
    num: int = 64
    batch_size: int = 64
    variance_scale: float = 1.0  # ChiroDiff multiplies the DDPM variance (0.75 there)
    # ChiroDiff decoding: a generated point ends a stroke when its pen value exceeds this. The data's pen
    # channel is exactly 0 or 1 (1 on the last point of each stroke; ChiroDiff's own encoding too), so any
    # value in (0, 1) decodes real data; 0.8, the paper's value, lifts the pen only on confident points,
    # which favours fewer, longer strokes over strokes broken by noise.
    pen_threshold: float = 0.8


@dataclass
class EvalSpec:
    num_samples: int = 1000
    batch_size: int = 100
    feature_extractor: str = "auto"  # auto | inception-v3-compat | sparsediff-fmnist | sparsediff-strokes


@dataclass
class RunConfig:
    name: str = "custom"
    family: str = "ldm"  # ldm | chirodiff
    description: str = ""
    model: ModelSpec = field(default_factory=ModelSpec)
    first_stage: FirstStageSpec = field(default_factory=FirstStageSpec)
    data: DataSpec = field(default_factory=DataSpec)
    diffusion: DiffusionSpec = field(default_factory=DiffusionSpec)
    sparse: SparseSpec = field(default_factory=SparseSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    sample: SampleSpec = field(default_factory=SampleSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---------------------------------------------------------------------------- loading


def _check_type(value: Any, tp: Any, where: str) -> Any:
    """Coerce YAML values to a field's annotated type, or raise naming the field."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for opt in options:
            if opt is type(None):
                continue
            try:
                return _check_type(value, opt, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if tp is Any:
        return value
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_check_type(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or (isinstance(value, float) and not value.is_integer())
        ):
            raise ConfigError(f"{where}: expected a whole number, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(names))})")
    kwargs = {}
    for key, value in data.items():
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value or {}, f"{where}.{key}")
        else:
            kwargs[key] = _check_type(value, tp, f"{where}.{key}")
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any], source: str = "config") -> RunConfig:
    """Build a :class:`RunConfig` from nested mappings, checking every value (the error names the field)."""
    cfg = _build(RunConfig, data, source)
    cfg.sparse.validate(f"{source}.sparse")
    return cfg


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def preset_path(name: str) -> Path:
    """Resolve a preset name or a YAML path."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    candidate = PRESET_DIR / f"{name}.yaml"
    if candidate.exists():
        return candidate
    if path.suffix in (".yaml", ".yml"):
        raise ConfigError(f"config file {name!r} does not exist")
    raise ConfigError(f"unknown preset {name!r}; available presets: {', '.join(list_presets())}")


def load_raw(name: str) -> dict[str, Any]:
    path = preset_path(name)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a preset must be a mapping of sections")
    base = data.pop("base", None)
    if base:  # a preset may extend another one
        merged = load_raw(base)
        deep_update(merged, data)
        data = merged
    data.setdefault("name", path.stem)
    return data


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}`` (``args`` mappings stay whole, as in configs)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k != "args":
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def deep_update(target: dict[str, Any], updates: dict[str, Any]) -> dict[str, Any]:
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict) and key != "args":
            deep_update(target[key], value)
        else:
            target[key] = copy.deepcopy(value)
    return target


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["train.lr=1e-4", "sparse.include=a,b"]`` -> nested dict (values parsed as YAML scalars)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def load_config(name: str, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Load a preset (name or path) and apply nested overrides."""
    data = load_raw(name)
    if overrides:
        deep_update(data, overrides)
    return config_from_dict(data, source=str(preset_path(name)))
