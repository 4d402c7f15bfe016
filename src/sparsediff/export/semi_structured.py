"""``--format semi-structured``: a 2:4 run for the sparse tensor cores (CUDA GPU, fp16 or bf16).

Every 2:4 ``nn.Linear`` is converted to PyTorch's ``SparseSemiStructuredTensor``
(:mod:`sparsediff.sparse.semi_structured`); the rest (convolutions, layers the kernel does not take) stays
dense. The outputs of the converted model are checked against the masked dense model in the same dtype on
random inputs before anything is saved. The output is a directory:

    model.safetensors    the masked dense weights in the export dtype (format "sparsediff.semi-structured/1")
    plan.json            which weights are converted and why the others stay dense
    verification.json    the output check: relative L2 and max differences, tolerance, passed
    RunDir.CONFIG        the run's config

Why not the compressed tensors themselves: a ``SparseSemiStructuredTensor`` is a tensor subclass without
storage of its own (``_make_wrapper_subclass`` around ``packed`` / ``meta`` tensors), so safetensors
cannot hold it, and ``torch.save`` can only pickle it as a Python object, which ``torch.load(...,
weights_only=True)`` refuses (sparsediff never unpickles). The cuSPARSELt ``packed`` layout also comes
from ``torch._cslt_compress`` on the GPU and library version at hand. So the exported file holds the
exact 2:4 values and :func:`convert` compresses them again on the target GPU (``from_dense``, a
fraction of a second per layer) when :func:`sparsediff.export.load_export` reads the directory.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..checkpoint import MODEL_FILE, model_tensors, save_tensors
from ..errors import ConfigError, StateError
from ..run import RunDir, load_model_and_masks
from .common import DTYPES, counts, metadata, parse_dtype
from .masked_dense import load_masked_dense, nm_info

if TYPE_CHECKING:
    from torch import nn

    from ..config import RunConfig

SEMI_STRUCTURED_FORMAT = "sparsediff.semi-structured/1"
# Relative L2 difference allowed between the semi-structured and the masked dense model in the same
# dtype (or 4 x the dense model's own rounding error against float32, when that is larger).
DEFAULT_TOLERANCE = {"float16": 1e-2, "bfloat16": 5e-2}


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

    Args:
        dtype: ``fp16`` (default) or ``bf16`` (or ``float16``, ``bfloat16``).

    Raises:
        ConfigError: the run is not 2:4 (method, pattern, or no Linear the kernel takes), the dtype is
            not fp16/bf16, or there is no CUDA GPU with 2:4 sparse tensor cores.
        StateError: the converted model's outputs differ from the masked dense model's by more than the
            tolerance (``verification.json`` is written, the weights are not).
    """
    import torch

    from ..sparse import plan_semi_structured, to_semi_structured

    dt = parse_dtype(dtype, allowed=DEFAULT_TOLERANCE, who="semi-structured export")
    dt_name = DTYPES[dtype]
    cfg, model, masks, info = load_model_and_masks(run_dir, use_ema)
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
    info.update(counts(model, masks))
    info.update(nm_info(cfg, model))
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
    tol = DEFAULT_TOLERANCE[dt_name] if tolerance is None else float(tolerance)
    allowed = max(tol, 4.0 * floor["rel_l2"])
    passed = vs_dense["finite"] and vs_dense["rel_l2"] <= allowed
    converted = set(report.converted)
    verification = {
        "passed": passed,
        "dtype": dt_name,
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
            "dtype": dt_name,
            "converted": sorted(converted),
        }
    )
    save_tensors(out / MODEL_FILE, dense_weights, metadata(cfg, info))
    (out / RunDir.CONFIG).write_text(cfg.to_yaml())
    return {**info, "out": str(out), "verification": verification}


def _converted_flop_share(model: nn.Module, inputs: tuple, converted: list[str]) -> dict[str, Any]:
    """Dense forward FLOPs of one sample and the share of them in the ``converted`` Linear layers."""
    from ..sparse import count_flops

    report = count_flops(model, inputs)
    in_converted = sum(layer.flops_dense for layer in report.layers if layer.name in set(converted))
    return {
        "flops_forward_per_sample": report.flops_dense,
        "flops_share_converted": in_converted / max(report.flops_dense, 1),
    }


def load_semi_structured(path: str | Path) -> tuple[RunConfig, nn.Module, dict[str, Any]]:
    """``(cfg, model, info)`` from a semi-structured export directory (or its weights file): the masked
    dense model in the export dtype, on the CPU, not converted (:func:`convert` does that on a CUDA GPU)."""
    path = Path(path)
    return load_masked_dense(path / MODEL_FILE if path.is_dir() else path, (SEMI_STRUCTURED_FORMAT,))


def convert(model: nn.Module, info: dict[str, Any]) -> nn.Module:
    """A loaded semi-structured export's model with its 2:4 Linears converted again, in place (on a
    CUDA GPU, in the export dtype ``info["dtype"]``)."""
    from ..sparse import to_semi_structured

    return to_semi_structured(model, None, parse_dtype(info["dtype"]))


def summary(info: dict[str, Any]) -> str:
    """The line ``sparsediff export --format semi-structured`` prints."""
    v = info["verification"]
    return (
        f"{v['converted_layers']} Linear layers converted to 2:4 ({v['backend']}, {v['dtype']}; "
        f"{100 * v['flops_share_converted']:.1f} % of the forward FLOPs), outputs within "
        f"{v['semi_structured_vs_masked_dense']['rel_l2']:.2g} relative L2 of the masked dense model; "
        f"written to {info['out']}"
    )
