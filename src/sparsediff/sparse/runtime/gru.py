"""Sparse GRUs for inference: one SpMM for the input projections of all steps, the recurrence in native code."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from ..native import native_for
from .csr import NO_BIAS, from_csr, to_csr
from .linear import SparseLinear


class SparseGRU(nn.Module):
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
        for layer in range(self.num_layers):
            for d in range(self.directions):
                sfx = f"_l{layer}" + ("_reverse" if d else "")
                w_ih = self._masked(gru, masks, f"weight_ih{sfx}")
                w_hh = self._masked(gru, masks, f"weight_hh{sfx}")
                b_ih = getattr(gru, f"bias_ih{sfx}") if gru.bias else None
                b_hh = getattr(gru, f"bias_hh{sfx}") if gru.bias else None
                self.inputs.append(SparseLinear(w_ih, b_ih))
                row_ptr, cols, values = to_csr(w_hh)
                self.register_buffer(f"hh_row_ptr{sfx}", row_ptr)
                self.register_buffer(f"hh_cols{sfx}", cols)
                self.register_buffer(f"hh_values{sfx}", values)
                self.register_buffer(
                    f"hh_bias{sfx}", None if b_hh is None else b_hh.detach().float().cpu().clone()
                )
        self._dense: nn.GRU | None = None

    @staticmethod
    def _masked(gru: nn.GRU, masks: dict[str, torch.Tensor], name: str) -> torch.Tensor:
        w = getattr(gru, name).detach().float().cpu()
        mask = masks.get(name)
        return w if mask is None else w * mask.to(w.dtype).cpu()

    def _hh(self, sfx: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        return (
            getattr(self, f"hh_row_ptr{sfx}"),
            getattr(self, f"hh_cols{sfx}"),
            getattr(self, f"hh_values{sfx}"),
            getattr(self, f"hh_bias{sfx}"),
        )

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._dense = None  # rebuilt from the loaded weights when next needed

    def dense_gru(self) -> nn.GRU:
        """An ``nn.GRU`` with the masked dense weights (the fallback path; cached)."""
        if self._dense is None:
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
                        sfx = f"_l{layer}" + ("_reverse" if d else "")
                        getattr(gru, f"weight_ih{sfx}").copy_(self.inputs[i].dense_weight())
                        row_ptr, cols, values, b_hh = self._hh(sfx)
                        w_hh = from_csr(row_ptr, cols, values, self.hidden_size)
                        getattr(gru, f"weight_hh{sfx}").copy_(w_hh)
                        if self.has_bias:
                            getattr(gru, f"bias_ih{sfx}").copy_(self.inputs[i].bias)
                            getattr(gru, f"bias_hh{sfx}").copy_(b_hh)
                        i += 1
            self._dense = gru.eval()
        return self._dense

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
        for layer in range(self.num_layers):
            outs = []
            for d in range(self.directions):
                sfx = f"_l{layer}" + ("_reverse" if d else "")
                idx = layer * self.directions + d
                # (3H, T, B): the batch last, for the native loop, straight from the SpMM
                gi_t = self.inputs[idx].transposed_rows(inp.reshape(steps * batch, -1)).view(-1, steps, batch)
                row_ptr, cols, values, b_hh = self._hh(sfx)
                bias = NO_BIAS if b_hh is None else b_hh
                out, last = mod.gru_recurrence(gi_t, row_ptr, cols, values, bias, h0[idx], lengths, bool(d))
                outs.append(out.transpose(1, 2))  # (T, B, H)
                finals.append(last)
            inp = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        h_n = torch.stack(finals)
        if packed:
            if order is not None:  # back to the caller's order
                back = x.unsorted_indices.to(inp.device)
                inp, h_n = inp.index_select(1, back), h_n.index_select(1, back)
            return _repack(inp, x), h_n
        if unbatched:
            return inp.squeeze(1), h_n.squeeze(1)
        return (inp.transpose(0, 1) if self.batch_first else inp), h_n


def _repack(padded: torch.Tensor, like: PackedSequence) -> PackedSequence:
    """``padded`` (T, B, H), in the caller's batch order, packed exactly as ``like`` is."""
    order = like.sorted_indices
    rows = padded if order is None else padded.index_select(1, order.to(padded.device))
    sizes = like.batch_sizes.tolist()
    data = torch.cat([rows[t, :n] for t, n in enumerate(sizes)])
    return PackedSequence(data, like.batch_sizes, like.sorted_indices, like.unsorted_indices)
