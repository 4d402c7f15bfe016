"""A run's final sparse denoiser as a file to deploy (what ``sparsediff export`` runs).

Two formats:

``masked-dense`` (any run, CPU is enough): the weights the run samples with (EMA by default) with the
final masks folded in, as one safetensors file. Its metadata holds the run's config (``config``, YAML)
and what was exported (``sparsediff_export``, JSON); :func:`load_export` rebuilds the model from it.

``semi-structured`` (a 2:4 run, CUDA GPU with 2:4 sparse tensor cores, fp16 or bf16): every 2:4
``nn.Linear`` is converted to PyTorch's ``SparseSemiStructuredTensor`` (``sparse/export.py``); the rest
(convolutions, layers the kernel does not take) stays dense. The outputs of the converted model are
checked against the masked dense model in the same dtype on random inputs before anything is saved.
The output is a directory:

    model.safetensors    the masked dense weights in the export dtype (format "sparsediff.semi-structured/1")
    plan.json            which weights are converted and why the others stay dense
    verification.json    the output check: relative L2 and max differences, tolerance, passed
    RunDir.CONFIG        the run's config

Why not the compressed tensors themselves: a ``SparseSemiStructuredTensor`` is a tensor subclass without
storage of its own (``_make_wrapper_subclass`` around ``packed`` / ``meta`` tensors), so safetensors
cannot hold it, and ``torch.save`` can only pickle it as a Python object, which ``torch.load(...,
weights_only=True)`` refuses (sparsediff never unpickles). The cuSPARSELt ``packed`` layout also comes
from ``torch._cslt_compress`` on the GPU and library version at hand. So the exported file holds the
exact 2:4 values and :func:`load_export` compresses them again on the target GPU (``from_dense``, a
fraction of a second per layer).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checkpoint import MODEL_FILE, load_state_checked, load_tensors, model_tensors, save_tensors
from .compressed import SPARSE_FORMAT, load_sparse_export
from .errors import ConfigError, StateError
from .run import RunDir, load_masked_model

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .config import RunConfig

# sparse: see compressed.py; diffusers: see export_diffusers.py
EXPORT_FORMATS = ("masked-dense", "semi-structured", "sparse", "diffusers")
MASKED_DENSE_FORMAT = "sparsediff.masked-dense/1"
SEMI_STRUCTURED_FORMAT = "sparsediff.semi-structured/1"
DTYPES = {
    "fp32": "float32",
    "fp16": "float16",
    "bf16": "bfloat16",
    "float32": "float32",
    "float16": "float16",
    "bfloat16": "bfloat16",
}
# Relative L2 difference allowed between the semi-structured and the masked dense model in the same
# dtype (or 4 x the dense model's own rounding error against float32, when that is larger).
DEFAULT_TOLERANCE = {"fp16": 1e-2, "bf16": 5e-2, "float16": 1e-2, "bfloat16": 5e-2}


def _dtype(name: str | None) -> torch.dtype | None:
    import torch

    if name is None:
        return None
    if name not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return getattr(torch, DTYPES[name])


# ---------------------------------------------------------------------------- counts


def _counts(cfg: RunConfig, model: nn.Module) -> dict[str, Any]:
    from .sparse import nm_violations, select_targets
    from .sparse.nm import parse_nm

    s = cfg.sparse
    targets = dict(select_targets(model, s.include or None, s.exclude or None))
    total = sum(p.numel() for p in model.parameters())
    zeros = sum(int((p == 0).sum()) for p in targets.values())
    out: dict[str, Any] = {"params_total": total, "params_nonzero": total - zeros}
    pattern = s.final_nm_pattern()
    if pattern is not None:
        nm = parse_nm(pattern)
        bad = nm_violations(model, nm.n, nm.m, s.include or None, s.exclude or None)
        if bad:  # apply_final_masks made every maskable layer N:M: this is a bug, not a user error
            raise RuntimeError(f"masked weights are not {pattern}: {bad}")
        out["pattern"] = pattern
    return out


def _metadata(cfg: RunConfig, info: dict[str, Any]) -> dict[str, str]:
    return {"format": info["format"], "config": cfg.to_yaml(), "sparsediff_export": json.dumps(info)}


# ---------------------------------------------------------------------------- masked dense


def export_masked_dense(
    run_dir: str | Path, out: str | Path, dtype: str | None = None, use_ema: bool = True
) -> dict[str, Any]:
    """Write the run's masked weights (masks folded in) to the safetensors file ``out``.

    Args:
        dtype: ``fp32``, ``fp16`` or ``bf16``; by default the weights' own (float32).
    """
    cfg, model, info = load_masked_model(run_dir, use_ema)
    dt = _dtype(dtype)
    if dt is not None:
        model.to(dt)
    info.update(_counts(cfg, model))
    info.update(
        {
            "format": MASKED_DENSE_FORMAT,
            "method": cfg.sparse.method,
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        }
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_tensors(out, model_tensors(model), _metadata(cfg, info))
    info["out"] = str(out)
    return info


# ---------------------------------------------------------------------------- semi-structured


def _random_inputs(model: nn.Module, batch: int, seed: int) -> tuple:
    """The model's example inputs with every floating tensor replaced by a seeded standard normal draw."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    xs = model.example_inputs(batch)
    return tuple(
        torch.randn(x.shape, generator=gen, dtype=torch.float32) if x.is_floating_point() else x for x in xs
    )


def _to(xs: tuple, device, dtype) -> tuple:
    return tuple(x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device) for x in xs)


def _compare(a, b) -> dict[str, float]:
    import torch

    a, b = a.float(), b.float()
    diff = (a - b).norm().item()
    return {
        "rel_l2": diff / max(b.norm().item(), 1e-30),
        "max_abs": (a - b).abs().max().item(),
        "finite": bool(torch.isfinite(a).all()),
    }


def export_semi_structured(
    run_dir: str | Path,
    out: str | Path,
    dtype: str = "fp16",
    use_ema: bool = True,
    batch_size: int = 2,
    tolerance: float | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Convert the run's 2:4 ``nn.Linear`` layers to semi-structured sparse tensors, check, and save.

    Writes the directory ``out`` (see the module docstring) and returns the verification report.

    Raises:
        ConfigError: the run is not 2:4 (method, pattern, or no Linear the kernel takes), the dtype is
            not fp16/bf16, or there is no CUDA GPU with 2:4 sparse tensor cores.
        StateError: the converted model's outputs differ from the masked dense model's by more than the
            tolerance (``verification.json`` is written, the weights are not).
    """
    import torch

    from .sparse import plan_semi_structured, to_semi_structured

    if dtype not in DEFAULT_TOLERANCE:
        raise ConfigError(f"semi-structured export needs --dtype fp16 or bf16, got {dtype!r}")
    cfg, model, info = load_masked_model(run_dir, use_ema)
    pattern = cfg.sparse.final_nm_pattern()
    if pattern is None:
        raise ConfigError(
            f"{run_dir} is not N:M-sparse (sparse.method={cfg.sparse.method}); semi-structured export needs "
            "a 2:4 run (sparsediff finetune --nm 2:4); --format masked-dense exports any run"
        )
    if pattern != "2:4":
        raise ConfigError(
            f"{run_dir} is {pattern}-sparse; the sparse tensor cores take 2:4 only (--format masked-dense "
            "exports it as it is)"
        )
    dt = _dtype(dtype)
    plan = plan_semi_structured(model, None, dt)
    if not plan.converted:
        reasons = "; ".join(f"{n}: {r}" for n, r in list(plan.kept.items())[:3])
        raise ConfigError(f"{run_dir}: no nn.Linear of the model can be converted ({reasons})")
    if not torch.cuda.is_available():
        raise ConfigError(
            "semi-structured export needs a CUDA GPU (compute capability >= 8.0); none is available here. "
            "--format masked-dense works on the CPU"
        )
    device = torch.device("cuda", torch.cuda.current_device())
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        raise ConfigError(
            "semi-structured export needs a GPU with 2:4 sparse tensor cores (compute capability >= 8.0); "
            f"{torch.cuda.get_device_name(device)} has {major}.{minor}"
        )
    info.update(_counts(cfg, model))
    xs = _random_inputs(model, batch_size, seed)
    ref32 = copy.deepcopy(model).to(device)
    with torch.inference_mode():
        out32 = ref32(*_to(xs, device, torch.float32))
    flops = _converted_flop_share(ref32, _to(tuple(x[:1] for x in xs), device, torch.float32), plan.converted)
    del ref32
    ref = copy.deepcopy(model).to(device=device, dtype=dt)
    with torch.inference_mode():
        out_dense = ref(*_to(xs, device, dt))
    dense_weights = {k: v.detach().cpu() for k, v in model_tensors(ref).items()}
    del ref
    to_semi_structured(model, None, dt)  # in place: on the GPU, in dt, 2:4 Linears converted
    with torch.inference_mode():
        out_sparse = model(*_to(xs, device, dt))
    report = model.semi_structured_report
    vs_dense = _compare(out_sparse, out_dense)
    floor = _compare(out_dense, out32)
    tol = DEFAULT_TOLERANCE[dtype] if tolerance is None else float(tolerance)
    allowed = max(tol, 4.0 * floor["rel_l2"])
    passed = vs_dense["finite"] and vs_dense["rel_l2"] <= allowed
    converted = set(report.converted)
    verification = {
        "passed": passed,
        "dtype": DTYPES[dtype],
        "backend": report.backend,
        "gpu": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "inputs": {"batch_size": batch_size, "seed": seed, "shapes": [list(x.shape) for x in xs]},
        "semi_structured_vs_masked_dense": vs_dense,
        "masked_dense_vs_float32": floor,
        "semi_structured_vs_float32": _compare(out_sparse, out32),
        "tolerance_rel_l2": allowed,
        "converted_layers": len(converted),
        "dense_layers": len(report.kept),
        **flops,
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan.json").write_text(json.dumps(report.to_dict(), indent=2))
    (out / "verification.json").write_text(json.dumps(verification, indent=2))
    if not passed:
        raise StateError(
            f"the semi-structured model's outputs differ from the masked dense model's (relative L2 "
            f"{vs_dense['rel_l2']:.3g} > {allowed:.3g}); nothing but {out / 'verification.json'} and "
            f"{out / 'plan.json'} was written"
        )
    info.update(
        {
            "format": SEMI_STRUCTURED_FORMAT,
            "method": cfg.sparse.method,
            "dtype": DTYPES[dtype],
            "converted": sorted(converted),
        }
    )
    save_tensors(out / MODEL_FILE, dense_weights, _metadata(cfg, info))
    (out / RunDir.CONFIG).write_text(cfg.to_yaml())
    return {**info, "out": str(out), "verification": verification}


def _converted_flop_share(model: nn.Module, inputs: tuple, converted: list[str]) -> dict[str, Any]:
    """Dense forward FLOPs of one sample and the share of them in the ``converted`` Linear layers."""
    from .sparse import count_flops

    report = count_flops(model, inputs)
    in_converted = sum(layer.flops_dense for layer in report.layers if layer.name in set(converted))
    return {
        "flops_forward_per_sample": report.flops_dense,
        "flops_share_converted": in_converted / max(report.flops_dense, 1),
    }


# ---------------------------------------------------------------------------- loading


def load_export(
    path: str | Path, device: str | None = None, convert: bool | None = None
) -> tuple[RunConfig, nn.Module, dict[str, Any]]:
    """``(cfg, model, info)`` from an export (a masked-dense file or a semi-structured directory).

    Args:
        device: where to put the model (default: CUDA when available, else the CPU).
        convert: for a semi-structured export, convert its 2:4 Linears again (needs CUDA); by default
            when the device is a CUDA GPU. Without conversion the model is the masked dense one.
    """
    import torch
    import yaml

    from .config import config_from_dict
    from .models import build_model

    path = Path(path)
    file = path / MODEL_FILE if path.is_dir() else path
    if not file.exists():
        raise StateError(f"{path} is not a sparsediff export (no {file.name})")
    tensors, meta = load_tensors(file)
    if meta.get("format") == SPARSE_FORMAT:  # --format sparse: the masked dense model, masks left out
        cfg, model, _ = load_sparse_export(file, device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return cfg, model, json.loads(meta["sparsediff_export"])
    if meta.get("format") not in (MASKED_DENSE_FORMAT, SEMI_STRUCTURED_FORMAT):
        raise StateError(f"{file} is not a sparsediff export (metadata 'format' is {meta.get('format')!r})")
    cfg = config_from_dict(yaml.safe_load(meta["config"]), source=f"{file} (metadata)")
    info = json.loads(meta["sparsediff_export"])
    model = build_model(cfg.model).to(getattr(torch, info["dtype"]))
    load_state_checked(model, tensors, file)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(dev).eval()
    if convert is None:
        convert = info["format"] == SEMI_STRUCTURED_FORMAT and dev.type == "cuda"
    if convert:
        if info["format"] != SEMI_STRUCTURED_FORMAT:
            raise ConfigError(f"{path} is a masked-dense export; export it with --format semi-structured")
        from .sparse import to_semi_structured

        to_semi_structured(model, None, getattr(torch, info["dtype"]))
    return cfg, model, info
