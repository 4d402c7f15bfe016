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

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from ..native import kernels
from . import gru_grad
from .compact import CompactLayer, CompactWeight, dense_weight, panel_width
from .compact_linear import linear_rows
from .gru import gru_outputs
from .matrix import NO_BIAS, CompressedMatrix

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
            return dense_weight(self, name)  # the dense mode: torch's recurrence on the dense matrices
        return super().__getattr__(name)

    def __getstate__(self) -> dict:
        # nn.GRU keeps its weights as read (_flat_weights): here dense matrices scattered from the values,
        # results of autograd, which neither deepcopy nor pickle take. A copy scatters its own again.
        state = super().__getstate__()
        state["_flat_weights"] = [
            None if n in self.compact_weights else w
            for n, w in zip(self._flat_weights_names, self._flat_weights, strict=True)
        ]
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._init_flat_weights()

    def forward(self, input, hx=None):  # noqa: A002 (nn.GRU's own argument names)
        data = input.data if isinstance(input, PackedSequence) else input
        if self.kernel_mode is None:
            from .choose import choose_mode

            choose_mode(self, input, probe=data)
        if (
            self.kernel_mode == "sparse"
            and data.dtype is torch.float32
            and data.is_cpu
            and kernels() is not None
        ):
            return self._sparse_forward(input, hx)
        return nn.GRU.forward(self, input, hx)

    def _sparse_forward(self, x, h0):
        """Every layer and direction on the native kernels: the input projections of all steps as one SpMM
        (written batch-last, as the recurrence reads them), the recurrence and its backward in native code."""
        packed = isinstance(x, PackedSequence)
        lengths, order = None, None
        if packed:
            seq, lengths = pad_packed_sequence(x)  # (T, B, F) in the caller's order
            lengths = lengths.to(torch.int64)
            unbatched = False
            if x.sorted_indices is not None:  # longest first: the running sequences are a prefix
                order = x.sorted_indices.to(seq.device)
                seq, lengths = seq.index_select(1, order), lengths[order.cpu()]
                h0 = None if h0 is None else h0.index_select(1, order)
        else:
            unbatched = x.dim() == 2
            seq = x.unsqueeze(1) if unbatched else (x.transpose(0, 1) if self.batch_first else x)
        steps, batch = seq.shape[0], seq.shape[1]
        directions = 2 if self.bidirectional else 1
        if h0 is None:
            h0 = seq.new_zeros(self.num_layers * directions, batch, self.hidden_size)
        elif unbatched:
            h0 = h0.unsqueeze(1)
        finals, inp = [], seq
        for layer in range(self.num_layers):
            if layer and self.dropout and self.training:
                inp = nn.functional.dropout(inp, self.dropout, training=True)
            rows = inp.reshape(steps * batch, -1).contiguous()
            outs = []
            for d in range(directions):
                sfx = f"_l{layer}" + ("_reverse" if d else "")
                ih, hh = f"weight_ih{sfx}", f"weight_hh{sfx}"
                b_ih = self._parameters.get(f"bias_ih{sfx}") if self.bias else None
                b_hh = self._parameters.get(f"bias_hh{sfx}") if self.bias else None
                v_ih, v_hh = self.compact_weights[ih].values(self), self.compact_weights[hh].values(self)
                gi = linear_rows(rows, v_ih, b_ih, self, ih, True).view(-1, steps, batch)  # (3H, T, B)
                idx = layer * directions + d
                out, last = _Recurrence.apply(
                    gi, v_hh, b_hh, h0[idx].contiguous(), lengths, bool(d), self, hh
                )
                outs.append(out.transpose(1, 2))  # (T, B, H)
                finals.append(last)
            inp = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        return gru_outputs(inp, torch.stack(finals), x, order, unbatched, self.batch_first)


class _Recurrence(torch.autograd.Function):
    """One layer and direction's recurrence over every step, sparse W_hh, with its backward through time."""

    @staticmethod
    def forward(ctx, gi, values, bias, h0, lengths, reverse, layer, name):
        cw = layer.compact_weights[name]
        out, last, gates = gru_grad.train_forward(
            gi, cw.matrix(layer, values), values, bias, h0, lengths, reverse
        )
        ctx.set_materialize_grads(False)
        ctx.layer, ctx.name, ctx.lengths, ctx.reverse, ctx.has_bias = (
            layer,
            name,
            lengths,
            reverse,
            bias is not None,
        )
        ctx.save_for_backward(values, h0, out, gates)
        return out, last

    @staticmethod
    def backward(ctx, dout, dlast):
        values, h0, out, gates = ctx.saved_tensors
        layer, name, lengths, reverse = ctx.layer, ctx.name, ctx.lengths, ctx.reverse
        cw = layer.compact_weights[name]
        t_matrix, perm = cw.derived(layer, "transposed", lambda: _transposed_hh(layer, cw))
        dout = None if dout is None else dout.contiguous()
        dlast = None if dlast is None else dlast.contiguous()
        dgi, dgh, dh0 = gru_grad.backward(
            dout, dlast, gates, out, h0, t_matrix, values, perm, lengths, reverse
        )
        prev = gru_grad.previous_states(out, h0, lengths, reverse)
        matrix = cw.matrix(layer, values)
        dv = gru_grad.hh_values_grad(dgh, prev, matrix) if ctx.needs_input_grad[1] else None
        db = dgh.sum((1, 2)) if ctx.has_bias and ctx.needs_input_grad[2] else None
        layer.captures(name, lambda: gru_grad.hh_dense_grad(dgh, prev))
        return dgi, dv, db, dh0, None, None, None, None


def _transposed_hh(layer: nn.Module, cw: CompactWeight):
    t, perm = gru_grad.transposed(cw.matrix(layer))
    return CompressedMatrix(t.row_ptr, t.cols, NO_BIAS, t.columns, t.panel), perm.to(torch.int32)
