"""The trainable compact GRU: ``nn.GRU`` with every weight matrix held as its non-zeros (see compact.py).

A :class:`CompactGRU` is an ``nn.GRU`` whose ``weight_ih_l*`` / ``weight_hh_l*`` are compact weights
(parameters ``values_ih_l*`` / ``values_hh_l*``, buffers ``row_ptr_*`` / ``cols_*``) and whose biases are
the original GRU's own Parameters, registered in the GRU's order (weights and biases of each layer and
direction), so its parameters line up with the dense GRU's one for one.

In ``"dense"`` mode reading a weight (``gru.weight_hh_l0``) scatters its values into a dense matrix,
differentiably, and ``nn.GRU.forward`` runs on them as on any GRU (packed sequences, ``batch_first``,
unbatched inputs, ``h0``): torch's recurrence, the gradient gathered back at the kept positions. In
``"sparse"`` mode the input projections of all steps are one SpMM per layer and direction, and the
recurrence and its backward through time run natively on the sparse hidden-to-hidden matrices.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from .compact import CompactLayer, CompactWeight, hand_to_capture, panel_width

_GRU_ATTRS = (
    "mode", "input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout", "bidirectional",
    "proj_size", "_flat_weights_names", "_all_weights",
)  # fmt: skip


class CompactGRU(CompactLayer, nn.GRU):
    """An ``nn.GRU`` on compact weights; built from a dense GRU and the masks of its weight matrices
    (``{"weight_ih_l0": mask, ...}``; a matrix without a mask is kept whole, at density 1)."""

    kind = "gru"

    def __init__(self, gru: nn.GRU, masks: dict[str, torch.Tensor]):
        CompactLayer.__init__(self)
        for attr in _GRU_ATTRS:  # nn.GRU's `mode` is its cell type ("GRU"); the kernels' is kernel_mode
            setattr(self, attr, getattr(gru, attr))
        self.training = gru.training
        for name in gru._flat_weights_names:
            p = getattr(gru, name)
            if name.startswith("weight_"):
                rows = p.shape[0]
                panel = panel_width(p.shape[1]) if name.startswith("weight_ih") else None
                mask = masks.get(name)
                if mask is None:
                    mask = torch.ones(p.shape, dtype=torch.bool)
                suffix = name[len("weight") :]  # "_ih_l0", "_hh_l0_reverse"
                self.compact_weights[name] = CompactWeight.create(self, name, p, mask, rows, panel, suffix)
            else:
                self.register_parameter(name, p)
        self._init_flat_weights()

    def __getattr__(self, name: str):
        cws = self.__dict__.get("compact_weights")
        if cws is not None and name in cws:
            dense = cws[name].scatter(self)
            if self.capture is not None and dense.requires_grad:  # a RigL update step: the dense gradient
                dense.register_hook(functools.partial(hand_to_capture, self, name))
            return dense
        return super().__getattr__(name)

    def forward(self, input, hx=None):  # noqa: A002 (nn.GRU's own argument names)
        if self.kernel_mode is None:
            from .choose import choose_mode

            data = getattr(input, "data", input)
            choose_mode(self, data if torch.is_tensor(data) else input)
        return nn.GRU.forward(self, input, hx)
