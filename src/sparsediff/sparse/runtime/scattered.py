"""The generic compact weight: any other sparsified weight, trained through torch's own operation.

A target weight that no compact layer computes (a strided or grouped convolution, a transposed one,
``nn.MultiheadAttention``'s ``in_proj_weight``, an LSTM's matrices...) is still held compactly: its
non-zeros are the Parameter ``original`` of a ``torch.nn.utils.parametrize`` parametrization whose
forward scatters them into the dense weight each time the module reads it. torch's operation then runs
on that dense weight as always, and autograd gathers its gradient back at the kept positions. No speed
is gained (the layer computes densely), but nothing dense is trained or kept between steps: the
optimiser state, the gradient and the weight itself are the layer's budget of entries.

The parametrization list (``module.parametrizations.<name>``) hosts the :class:`CompactWeight`: the
Parameter ``original`` and the buffers ``row_ptr`` / ``cols``.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from .compact import CompactWeight, hand_to_capture, layout_from_mask


class ScatteredWeight(nn.Module):
    """The parametrization: compact values -> the dense weight (zeros off the kept positions)."""

    def __init__(self, name: str, flat: torch.Tensor):
        super().__init__()
        self.name = name
        self.__dict__["_flat"] = flat  # for right_inverse at registration only

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        host = self.__dict__["_host"]
        dense = host.compact_weights[self.name].scatter(host, values)
        if host.capture is not None and dense.requires_grad:  # a RigL update step: the dense gradient
            dense.register_hook(functools.partial(hand_to_capture, host, self.name))
        return dense

    def right_inverse(self, dense: torch.Tensor) -> torch.Tensor:
        return dense.detach().reshape(-1)[self.__dict__["_flat"].to(dense.device)].clone()


def _forget(host: nn.Module, incompatible) -> None:
    for cw in host.compact_weights.values():
        cw.forget(host)


def scatter_weight(owner: nn.Module, name: str, mask: torch.Tensor) -> nn.Module:
    """Make ``owner.<name>`` compact (its values at ``mask``'s kept positions); returns the host module
    (``owner.parametrizations.<name>``), which carries the engine's attributes like a compact layer."""
    weight = getattr(owner, name)
    shape = tuple(weight.shape)
    rows = shape[0] if len(shape) > 1 else 1
    row_ptr, cols, flat = layout_from_mask(mask.reshape(rows, -1), None)
    p = ScatteredWeight(name, flat)
    parametrize.register_parametrization(owner, name, p, unsafe=True)
    host = owner.parametrizations[name]
    cw = CompactWeight(name, "original", "row_ptr", "cols", shape, rows, math.prod(shape) // rows, None)
    host.register_buffer("row_ptr", row_ptr.to(weight.device))
    host.register_buffer("cols", cols.to(weight.device))
    host.compact_weights = {name: cw}
    host.kind, host.kernel_mode, host.capture = "scattered", "dense", None
    p.__dict__["_host"] = host
    del p.__dict__["_flat"]
    cw.remember(host, flat.to(weight.device))
    host.register_load_state_dict_post_hook(_forget)
    return host


def is_scattered_host(module: nn.Module) -> bool:
    return isinstance(module, parametrize.ParametrizationList) and hasattr(module, "compact_weights")


@torch.no_grad()
def unscatter_weights(module: nn.Module) -> None:
    """Give ``module`` back the dense Parameters of its compact weights (the way back of
    :func:`scatter_weight`).

    Not through ``parametrize.remove_parametrizations``: a deep copy of a parametrized module shares its
    class with the original, and that function deletes the weight's property from the class, which would
    break the original as well. Here the copy alone goes back to its own class.
    """
    hosts = module._modules.get("parametrizations")
    if hosts is None:
        return
    ours = [n for n, host in hosts.items() if is_scattered_host(host)]
    if not ours:
        return
    if len(ours) != len(hosts):
        raise ValueError(f"{type(module).__name__} has parametrizations of its own besides sparsediff's")
    dense = {}
    for name in ours:
        host = hosts[name]
        values = host.original
        dense[name] = nn.Parameter(
            host.compact_weights[name].scatter(host).detach().clone(), values.requires_grad
        )
    del module._modules["parametrizations"]
    module.__class__ = module.__class__.__bases__[0]  # the class before parametrize injected its own
    for name, p in dense.items():
        module.register_parameter(name, p)
