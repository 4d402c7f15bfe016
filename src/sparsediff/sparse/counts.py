"""How many parameters a sparse model has, and how many of them count as non-zero: one definition.

``params_total`` is every entry of every parameter of the model. ``params_nonzero`` is the entries the
masks keep in the masked (target) weights plus every entry of the other parameters::

    params_nonzero = params_total - target_total + target_nonzero

A kept position counts whatever its value: a weight RigL has just grown is exactly 0 and is still part
of the model's topology (it trains from there), and a bias that happens to be 0 is still a parameter.
So the count follows from the masks alone; it is what the engine reports during training and what every
export writes into its metadata, for the same run the same number whatever the format or the dtype.
Exact zeros are a measurement of the values, not of the topology: whoever wants them counts them apart.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError

__all__ = ["ParameterCounts", "parameter_counts"]


@dataclass(frozen=True)
class ParameterCounts:
    """The parameter counts of a model under its masks (see the module docstring)."""

    total: int  # every entry of every parameter
    nonzero: int  # kept entries of the masked weights + every entry of the other parameters
    target_total: int  # entries of the masked weights
    target_nonzero: int  # entries the masks keep

    @property
    def density(self) -> float:
        return self.nonzero / max(self.total, 1)

    @property
    def target_density(self) -> float:
        return self.target_nonzero / max(self.target_total, 1)


def parameter_counts(
    params: nn.Module | Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    masks: Mapping[str, torch.Tensor],
) -> ParameterCounts:
    """The counts of ``params`` under ``masks``.

    Args:
        params: a model (its ``named_parameters()``: a shared parameter counts once), or parameter name
            -> tensor.
        masks: parameter name -> mask of that parameter's shape (bool or 0/1; non-zero = kept). Empty
            for a dense model: every entry counts.

    Raises:
        ConfigError: a mask names no parameter, or its shape is not its parameter's.
    """
    if isinstance(params, nn.Module):
        params = params.named_parameters()
    named = dict(params.items() if isinstance(params, Mapping) else params)
    target_total = target_nonzero = 0
    for name, mask in masks.items():
        if name not in named:
            raise ConfigError(f"a mask names {name!r}, which is not a parameter of the model")
        if tuple(mask.shape) != tuple(named[name].shape):
            raise ConfigError(
                f"the mask of {name!r} has shape {tuple(mask.shape)}, the parameter {tuple(named[name].shape)}"
            )
        target_total += mask.numel()
        target_nonzero += int(mask.count_nonzero())
    total = sum(p.numel() for p in named.values())
    return ParameterCounts(
        total=total,
        nonzero=total - target_total + target_nonzero,
        target_total=target_total,
        target_nonzero=target_nonzero,
    )
