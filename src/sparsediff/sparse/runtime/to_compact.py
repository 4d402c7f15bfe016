"""Turning a model's sparsified layers into compact ones, in place (``sparsify(..., backend="sparse")``).

Each target weight's owner becomes the compact layer of its kind: a plain ``nn.Linear`` a
:class:`CompactLinear`, a stride-1 ``Conv1d`` / ``Conv2d`` a :class:`CompactConv`, an ``nn.GRU`` whose
weight matrices are all targets a :class:`CompactGRU`; any other target weight (strided, grouped or
transposed convolutions, attention's packed projection, ...) is made compact where it is
(:func:`~sparsediff.sparse.runtime.scattered.scatter_weight`). The compact layers keep their dense
layer's biases (the same Parameters) and its training mode. The dense weights are freed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ...errors import ConfigError
from .compact import CompactWeight
from .compact_conv import CompactConv
from .compact_gru import CompactGRU
from .compact_linear import CompactLinear
from .conv import convertible
from .scattered import scatter_weight


@dataclass
class CompactTarget:
    """Where one target weight lives once compact: its host module and its :class:`CompactWeight`."""

    host: nn.Module
    weight: CompactWeight

    @property
    def values(self) -> nn.Parameter:
        return self.weight.values(self.host)


def _is_plain_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


def _owners(model: nn.Module, params: Mapping[str, nn.Parameter]) -> dict[str, tuple[nn.Module, str]]:
    by_id = {id(p): n for n, p in params.items()}
    found: dict[str, list[tuple[nn.Module, str]]] = {n: [] for n in params}
    seen: set[int] = set()
    for _, module in model.named_modules(remove_duplicate=False):
        if id(module) in seen:
            continue
        seen.add(id(module))
        for attr, p in module._parameters.items():
            if p is not None and id(p) in by_id:
                found[by_id[id(p)]].append((module, attr))
    for name, where in found.items():
        if len(where) != 1:
            what = "is tied to other modules" if where else "is registered by no module"
            raise ConfigError(
                f"backend='sparse': weight {name!r} {what}; a compact weight needs one owner (exclude it, or "
                "use backend='dense')"
            )
    return {n: w[0] for n, w in found.items()}


def _parents(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    out: dict[int, list[tuple[nn.Module, str]]] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        for attr, child in module._modules.items():
            if child is not None:
                pairs = out.setdefault(id(child), [])
                if not any(m is module and a == attr for m, a in pairs):
                    pairs.append((module, attr))
    return out


def _free(p: torch.Tensor) -> None:
    """Release a dense weight's memory even where something still refers to it (a user's own handle)."""
    p.data = torch.empty(0, dtype=p.dtype, device=p.device)


def to_compact(
    model: nn.Module, params: Mapping[str, nn.Parameter], masks: Mapping[str, torch.Tensor]
) -> dict[str, CompactTarget]:
    """Make every target weight of ``model`` compact, in place.

    Args:
        model: the model (unwrapped); its target weights must be on a real device (not meta).
        params: target name -> its dense Parameter.
        masks: target name -> bool mask of the kept positions.

    Returns:
        target name -> :class:`CompactTarget`.
    """
    owners = _owners(model, params)
    parents = _parents(model)
    by_module: dict[int, tuple[nn.Module, list[str]]] = {}
    for module, attr in owners.values():
        by_module.setdefault(id(module), (module, []))[1].append(attr)
    names = {(id(owners[n][0]), owners[n][1]): n for n in owners}
    out: dict[str, CompactTarget] = {}
    for key, (module, attrs) in by_module.items():
        mask_of = {a: masks[names[(key, a)]] for a in attrs}
        compact: nn.Module | None = None
        # a layer given as the model itself cannot be replaced in a parent: it is made compact in place
        if module is model:
            pass
        elif _is_plain_linear(module) and attrs == ["weight"]:
            compact = CompactLinear(module, mask_of["weight"])
        elif convertible(module) and attrs == ["weight"]:
            compact = CompactConv(module, mask_of["weight"])
        elif type(module) is nn.GRU and set(attrs) == {
            n for n in module._flat_weights_names if n.startswith("weight")
        }:
            compact = CompactGRU(module, mask_of)
        if compact is not None:
            compact.train(module.training)
            for parent, attr in parents.get(key, []):
                setattr(parent, attr, compact)
            for a in attrs:
                out[names[(key, a)]] = CompactTarget(compact, compact.compact_weights[a])
                _free(getattr(module, a))
        else:
            for a in attrs:  # the parametrization keeps the Parameter, its data now the kept values only
                host = scatter_weight(module, a, mask_of[a])
                out[names[(key, a)]] = CompactTarget(host, host.compact_weights[a])
    return {n: out[n] for n in params}


def _dense_parameter(values: nn.Parameter, dense: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(dense.detach().clone(), requires_grad=values.requires_grad)


@torch.no_grad()
def to_dense(model: nn.Module) -> nn.Module:
    """Turn every compact layer of ``model`` back into its dense layer, in place (weights exactly 0 off
    the kept positions); returns ``model``. For what needs dense weights: ``save_pretrained``, exports,
    a dense optimiser."""
    from .scattered import unscatter_weights

    parents = _parents(model)
    for _, module in list(model.named_modules()):
        unscatter_weights(module)
        if isinstance(module, (CompactLinear, CompactConv)):
            dense = _dense_linear(module) if isinstance(module, CompactLinear) else _dense_conv(module)
        elif isinstance(module, CompactGRU):
            dense = _dense_gru(module)
        else:
            continue
        dense.train(module.training)
        for parent, attr in parents.get(id(module), []):
            setattr(parent, attr, dense)
    return model


def _dense_linear(layer: CompactLinear) -> nn.Linear:
    values = layer.values
    out = nn.Linear(layer.in_features, layer.out_features, bias=False, device="meta")
    out.weight = _dense_parameter(values, layer.compact_weights["weight"].scatter(layer))
    out.bias = layer.bias
    return out


def _dense_conv(layer: CompactConv) -> nn.Module:
    cw = layer.compact_weights["weight"]
    cls = nn.Conv2d if layer.dims == 2 else nn.Conv1d
    kernel = (layer.kh, layer.kw) if layer.dims == 2 else layer.kw
    padding = (layer.ph, layer.pw) if layer.dims == 2 else layer.pw
    dilation = (layer.dh, layer.dw) if layer.dims == 2 else layer.dw
    out = cls(
        layer.in_channels,
        layer.out_channels,
        kernel,
        padding=padding,
        dilation=dilation,
        bias=False,
        device="meta",
    )
    out.weight = _dense_parameter(layer.values, cw.scatter(layer))
    out.bias = layer.bias
    return out


def _dense_gru(layer: CompactGRU) -> nn.GRU:
    out = nn.GRU(
        layer.input_size,
        layer.hidden_size,
        layer.num_layers,
        bias=layer.bias,
        batch_first=layer.batch_first,
        dropout=layer.dropout,
        bidirectional=layer.bidirectional,
        device="meta",
    )
    for name in layer._flat_weights_names:
        cw = layer.compact_weights.get(name)
        if cw is not None:
            setattr(out, name, _dense_parameter(cw.values(layer), cw.scatter(layer)))
        else:
            setattr(out, name, layer._parameters[name])
    out._init_flat_weights()
    return out
