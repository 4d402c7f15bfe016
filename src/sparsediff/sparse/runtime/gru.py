"""Sparse GRUs for inference: one SpMM for the input projections of all steps, the recurrence in native code."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from ..native import native_for
from .linear import SparseLinear
from .matrix import NO_BIAS, Buffers, CompressedLayer, CompressedMatrix, masked_weight, own_bias


def _suffix(layer: int, reverse: bool) -> str:
    """nn.GRU's parameter suffix of a layer and direction: ``_l0``, ``_l0_reverse``, ..."""
    return f"_l{layer}" + ("_reverse" if reverse else "")


class SparseGRU(CompressedLayer):
    """An ``nn.GRU`` (any layers, directions, ``batch_first``) on compressed weights; same inputs and outputs.

    For every layer and direction the input projections of all time steps are one :class:`SparseLinear`
    call, and the recurrence (a sparse matrix-vector product per step and the gates) runs inside one native
    call: a Python call per step would cost more than the step itself. Other dtypes, CUDA inputs, autograd
    or missing kernels run an ``nn.GRU`` with the masked dense weights instead.
    """

    def __init__(self, gru: nn.GRU, masks: dict[str, torch.Tensor] | None = None):
        super().__init__()
        if type(gru) is not nn.GRU:
            raise ValueError(f"SparseGRU converts nn.GRU, got {type(gru).__name__}")
        masks = masks or {}
        self.input_size, self.hidden_size, self.num_layers = gru.input_size, gru.hidden_size, gru.num_layers
        self.batch_first, self.bidirectional, self.has_bias = gru.batch_first, gru.bidirectional, gru.bias
        self.directions = 2 if gru.bidirectional else 1
        self.inputs = nn.ModuleList()
        self._hh_names: list[tuple[Buffers, str]] = []  # per layer and direction: W_hh's buffers, b_hh's
        for layer in range(self.num_layers):
            for d in range(self.directions):
                sfx = _suffix(layer, bool(d))
                w_ih = masked_weight(getattr(gru, f"weight_ih{sfx}"), masks.get(f"weight_ih{sfx}"))
                w_hh = masked_weight(getattr(gru, f"weight_hh{sfx}"), masks.get(f"weight_hh{sfx}"))
                b_ih = getattr(gru, f"bias_ih{sfx}") if gru.bias else None
                b_hh = getattr(gru, f"bias_hh{sfx}") if gru.bias else None
                self.inputs.append(SparseLinear(w_ih, b_ih))
                self._hh_names.append((Buffers.named("hh_", sfx), f"hh_bias{sfx}"))
                CompressedMatrix.from_dense(w_hh).hold(self, self._hh_names[-1][0])
                self.register_buffer(self._hh_names[-1][1], own_bias(b_hh))

    def _hh(self, idx: int) -> tuple[CompressedMatrix, torch.Tensor | None]:
        """The hidden-to-hidden matrix of layer and direction ``idx`` (layer * directions + direction) and
        its bias."""
        names, bias = self._hh_names[idx]
        return CompressedMatrix.held_by(self, names, self.hidden_size), self._buffers[bias]

    def rebuild_dense(self) -> nn.GRU:
        """An ``nn.GRU`` with the masked dense weights (the fallback path)."""
        gru = nn.GRU(
            self.input_size,
            self.hidden_size,
            self.num_layers,
            bias=self.has_bias,
            batch_first=self.batch_first,
            bidirectional=self.bidirectional,
        )
        with torch.no_grad():
            i = 0
            for layer in range(self.num_layers):
                for d in range(self.directions):
                    sfx = _suffix(layer, bool(d))
                    hh, b_hh = self._hh(i)
                    getattr(gru, f"weight_ih{sfx}").copy_(self.inputs[i].dense_weight())
                    getattr(gru, f"weight_hh{sfx}").copy_(hh.to_dense())
                    if self.has_bias:
                        getattr(gru, f"bias_ih{sfx}").copy_(self.inputs[i].bias)
                        getattr(gru, f"bias_hh{sfx}").copy_(b_hh)
                    i += 1
        return gru.eval()

    def dense_gru(self) -> nn.GRU:
        """The ``nn.GRU`` of :meth:`rebuild_dense`, cached."""
        return self.dense()

    def forward(self, x, h0: torch.Tensor | None = None):
        """Same as ``nn.GRU.forward``: ``x`` (batched, unbatched or a ``PackedSequence``) -> ``(output, h_n)``."""
        packed = isinstance(x, PackedSequence)
        data = x.data if packed else x
        mod = native_for(data, h0)
        if mod is None:
            gru = self.dense_gru().to(data.device, data.dtype)
            return gru(x, h0)
        lengths = torch.empty(0, dtype=torch.int64)
        order = None
        if packed:
            seq, lengths = pad_packed_sequence(x)  # (T, B, F) in the caller's batch order
            lengths = lengths.to(torch.int64)
            unbatched = False
            if x.sorted_indices is not None:  # longest first: the running sequences are a prefix
                order = x.sorted_indices.to(seq.device)
                seq, lengths = seq.index_select(1, order), lengths[order.cpu()]
                h0 = None if h0 is None else h0.index_select(1, order)
        else:
            unbatched = x.dim() == 2
            seq = x.unsqueeze(1) if unbatched else (x.transpose(0, 1) if self.batch_first else x)  # (T, B, F)
        steps, batch = seq.shape[0], seq.shape[1]
        if h0 is None:
            h0 = seq.new_zeros(self.num_layers * self.directions, batch, self.hidden_size)
        elif unbatched:
            h0 = h0.unsqueeze(1)
        finals = []
        inp = seq
        buf = self._buffers  # not nn.Module's attribute lookup: about 0.5 us per buffer
        for layer in range(self.num_layers):
            outs = []
            for d in range(self.directions):
                idx = layer * self.directions + d
                # (3H, T, B): the batch last, for the native loop, straight from the SpMM
                gi_t = self.inputs[idx].transposed_rows(inp.reshape(steps * batch, -1)).view(-1, steps, batch)
                hh, bias_name = self._hh_names[idx]
                bias = NO_BIAS if buf[bias_name] is None else buf[bias_name]
                out, last = mod.gru_recurrence(
                    gi_t, buf[hh.row_ptr], buf[hh.cols], buf[hh.values], bias, h0[idx], lengths, bool(d)
                )
                outs.append(out.transpose(1, 2))  # (T, B, H)
                finals.append(last)
            inp = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        return gru_outputs(inp, torch.stack(finals), x, order, unbatched, self.batch_first)


def gru_outputs(
    out: torch.Tensor,
    h_n: torch.Tensor,
    x: Any,
    order: torch.Tensor | None,
    unbatched: bool,
    batch_first: bool,
) -> tuple[Any, torch.Tensor]:
    """A GRU's ``(output, h_n)`` as ``nn.GRU`` returns them for input ``x``, from the last layer's output
    (T, B, H) and the final states, both in the order the recurrence ran (sorted when ``order`` is set)."""
    if isinstance(x, PackedSequence):
        if order is not None:  # back to the caller's order
            back = x.unsorted_indices.to(out.device)
            out, h_n = out.index_select(1, back), h_n.index_select(1, back)
        return repack(out, x), h_n
    if unbatched:
        return out.squeeze(1), h_n.squeeze(1)
    return (out.transpose(0, 1) if batch_first else out), h_n


def repack(padded: torch.Tensor, like: PackedSequence) -> PackedSequence:
    """``padded`` (T, B, H), in the caller's batch order, packed exactly as ``like`` is."""
    order = like.sorted_indices
    rows = padded if order is None else padded.index_select(1, order.to(padded.device))
    sizes = like.batch_sizes.tolist()
    data = torch.cat([rows[t, :n] for t, n in enumerate(sizes)])
    return PackedSequence(data, like.batch_sizes, like.sorted_indices, like.unsorted_indices)
