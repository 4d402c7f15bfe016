"""The trainable compact layers (runtime/compact*.py, scattered.py, to_compact.py) against the masked dense
layer they stand for: for every layer kind (CompactLinear, CompactConv for Conv1d / Conv2d, CompactGRU, the
scattered fallback), in both kernel modes, the output, the input gradient and the values' gradient equal the
dense layer's, whose weight is zero off the mask, and its dense weight gradient gathered at the kept positions
in the layer's value order. Built directly and through ``to_compact``; then the way back (``to_dense``), the
topology moves (``CompactWeight.reindex`` + ``permute_``), the parameter order and state dict round trips."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from sparsediff.sparse.runtime import kernels
from sparsediff.sparse.runtime.compact import CompactWeight, layout_from_mask, permute_
from sparsediff.sparse.runtime.compact_conv import CompactConv
from sparsediff.sparse.runtime.compact_gru import CompactGRU
from sparsediff.sparse.runtime.compact_linear import CompactLinear
from sparsediff.sparse.runtime.scattered import is_scattered_host, scatter_weight
from sparsediff.sparse.runtime.to_compact import to_compact, to_dense

MODES = ("sparse", "dense")
DENSITIES = [0.0, 0.05, 0.3, 0.7, 1.0]


@pytest.fixture(scope="module", autouse=True)
def built():
    if kernels() is None:
        pytest.fail("the native kernels did not build on this machine (g++ and ninja are installed by make)")


# ---------------------------------------------------------------------------- helpers


def _mask(shape: tuple[int, ...], density: float, seed: int) -> torch.Tensor:
    """A bool mask keeping ``round(density * numel)`` positions (exactly none at 0, all at 1)."""
    numel = math.prod(shape)
    keep = torch.randperm(numel, generator=torch.Generator().manual_seed(seed))[: round(density * numel)]
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[keep] = True
    return mask.view(shape)


def _masked_copy(module: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """A deep copy of ``module`` whose weights ``masks`` names are zero off their masks: the reference."""
    ref = copy.deepcopy(module)
    params = dict(ref.named_parameters())
    with torch.no_grad():
        for name, mask in masks.items():
            params[name].mul_(mask)
    return ref


def _close(got: torch.Tensor, want: torch.Tensor, length: int) -> None:
    """float32 sums of ``length`` products of unit-scale numbers: the tolerance grows with sqrt(length)."""
    torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-5 * max(1.0, math.sqrt(length)))


def _run(module: nn.Module, call: Callable, leaves: list[torch.Tensor], seed: int):
    """Outputs of ``call(module, *leaves)`` (fresh copies of the leaves) and the leaves' gradients of a fixed
    random linear function of them."""
    leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    outs = call(module, *leaves)
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=gen)).sum() for o in outs)
    loss.backward()
    return [o.detach() for o in outs], [t.grad for t in leaves]


def _compare(
    compact: nn.Module,
    reference: nn.Module,
    weights: dict[str, tuple[nn.Module, CompactWeight]],
    call: Callable,
    leaves: list[torch.Tensor],
    length: int,
    modes: tuple[str, ...] = MODES,
    hosts: list[nn.Module] | None = None,
) -> None:
    """Outputs, input gradients, values gradients (the reference's dense gradient gathered at the kept
    positions) and the other parameters' gradients of ``compact`` equal ``reference``'s, in each mode.

    ``weights``: the reference's parameter name -> (host, compact weight) of the compact one;
    ``hosts``: the compact layers whose ``kernel_mode`` is set (default: the hosts of ``weights``).
    """
    reference.zero_grad(set_to_none=True)
    want_out, want_grads = _run(reference, call, leaves, seed=7)
    ref_params = dict(reference.named_parameters())
    compact_values = {id(cw.values(host)) for host, cw in weights.values()}
    others = [(n, p) for n, p in ref_params.items() if n not in weights]
    compact_others = [p for p in compact.parameters() if id(p) not in compact_values]
    assert len(others) == len(compact_others)
    layers = hosts if hosts is not None else list({id(h): h for h, _ in weights.values()}.values())
    for mode in modes:
        for layer in layers:
            layer.kernel_mode = mode
        compact.zero_grad(set_to_none=True)
        got_out, got_grads = _run(compact, call, leaves, seed=7)
        for got, want in zip(got_out, want_out, strict=True):
            assert got.shape == want.shape, mode
            _close(got, want, length)
        for got, want in zip(got_grads, want_grads, strict=True):
            _close(got, want, length)
        for name, (host, cw) in weights.items():
            values = cw.values(host)
            dense_grad = ref_params[name].grad
            assert values.grad is not None or values.numel() == 0, f"{name} in {mode} mode: no gradient"
            got = values.grad if values.grad is not None else torch.zeros(0)
            _close(got, cw.gather(host, dense_grad), length)
        for (name, want_p), got_p in zip(others, compact_others, strict=True):
            assert got_p.shape == want_p.shape, name
            _close(got_p.grad, want_p.grad, length)


def _check_values(host: nn.Module, cw: CompactWeight, dense: torch.Tensor, mask: torch.Tensor) -> None:
    """The compact weight holds the dense weight's entries at the mask's positions, in value order."""
    values = cw.values(host)
    assert values.numel() == int(mask.sum())
    assert torch.equal(cw.mask(host), mask)
    assert torch.equal(values.detach(), cw.gather(host, dense.detach()))
    assert torch.equal(cw.scatter(host).detach(), dense.detach() * mask)
    flat = cw.flat(host)  # panel by panel, row by row, columns ascending
    assert torch.equal(flat, layout_from_mask(mask.reshape(cw.rows, cw.columns), cw.panel)[2])
    assert torch.equal(flat.sort().values, mask.reshape(-1).nonzero().squeeze(1))
    if cw.panel is None or cw.panel >= cw.columns:
        assert torch.equal(flat, flat.sort().values)


class _Holder(nn.Module):
    """A parent for the layer under test, so that ``to_compact`` can replace it."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, *args, **kwargs):
        return self.layer(*args, **kwargs)


def _converted(layer: nn.Module, masks: dict[str, torch.Tensor]):
    """``to_compact`` of ``layer`` inside a holder: (holder, its targets by the layer's parameter names)."""
    holder = _Holder(layer)
    params = {n: p for n, p in layer.named_parameters() if n in masks}
    targets = to_compact(
        holder, {f"layer.{n}": p for n, p in params.items()}, {f"layer.{n}": m for n, m in masks.items()}
    )
    for n, p in params.items():  # the dense weight is freed (a scattered one's Parameter holds the values)
        assert p.numel() in (0, int(masks[n].sum()))
        assert p.numel() == 0 or p is targets[f"layer.{n}"].values
    return holder, {n[len("layer.") :]: (t.host, t.weight) for n, t in targets.items()}


# ---------------------------------------------------------------------------- CompactLinear


@given(
    features=st.tuples(st.integers(1, 300), st.integers(1, 40)),
    batch=st.sampled_from([(1,), (3,), (2, 3)]),
    density=st.sampled_from(DENSITIES),
    bias=st.booleans(),
    layout=st.sampled_from(["contiguous", "transposed", "strided"]),
    convert=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_linear_matches_masked_dense(features, batch, density, bias, layout, convert, seed):
    (k, m) = features
    torch.manual_seed(seed)
    linear = nn.Linear(k, m, bias=bias)
    mask = _mask((m, k), density, seed)
    reference = _masked_copy(linear, {"weight": mask})
    if convert:
        compact, weights = _converted(linear, {"weight": mask})
        assert isinstance(compact.layer, CompactLinear)
    else:
        dense_weight = linear.weight.detach().clone()
        compact = CompactLinear(linear, mask)
        weights = {"weight": (compact, compact.compact_weights["weight"])}
        _check_values(compact, compact.compact_weights["weight"], dense_weight, mask)
    assert compact(torch.randn(*batch, k)).shape == (*batch, m)

    def call(module, x):
        if layout == "transposed":  # the leaf is (k, *batch): the layer reads its transpose, not contiguous
            x = x.movedim(0, -1)
        elif layout == "strided":  # every other row of a doubled batch
            x = x[::2]
        return [module(x)]

    shape = {"contiguous": (*batch, k), "transposed": (k, *batch), "strided": (2 * batch[0], *batch[1:], k)}
    _compare(compact, reference, weights, call, [torch.randn(shape[layout])], max(k, math.prod(batch)))


def test_inputs_the_kernels_do_not_take_compute_in_dense_mode_and_say_so_once(monkeypatch):
    """A float64 input (as a CUDA one would) makes a compact layer compute in dense mode: the masked
    layer's outputs and gradients, and one warning per reason and process, not one per layer or call."""
    from sparsediff.sparse.runtime import choose

    if kernels() is None:
        pytest.skip("native kernels not built: their absence is warned of by the build")
    monkeypatch.setattr(choose, "_told_dense", set())
    torch.manual_seed(0)
    linears = [nn.Linear(16, 8).double() for _ in range(2)]
    masks = [_mask((8, 16), 0.3, s) for s in range(2)]
    with pytest.warns(UserWarning, match="cpu float64 inputs compute in dense mode") as caught:
        compacts = [CompactLinear(lin, m) for lin, m in zip(copy.deepcopy(linears), masks)]
        x = torch.randn(4, 16, dtype=torch.float64)
        outs = [c(x) for c in compacts] + [compacts[0](x)]
    assert sum("dense mode" in str(w.message) for w in caught) == 1
    assert all(c.kernel_mode == "dense" for c in compacts)
    for lin, m, out in zip(linears, masks, outs):
        torch.testing.assert_close(out, nn.functional.linear(x, lin.weight * m, lin.bias))


# ---------------------------------------------------------------------------- CompactConv

# (kernel, dilation, padding): 1x1, 3x3, 1x3 (and 3 for Conv1d), dilation 2, padding 0, 1 and "same"
CONV2D = [
    ((1, 1), (1, 1), (0, 0)),
    ((3, 3), (1, 1), (0, 0)),
    ((3, 3), (1, 1), (1, 1)),
    ((1, 3), (1, 1), (0, 1)),
    ((1, 3), (1, 1), (0, 0)),
    ((3, 3), (2, 2), (2, 2)),
    ((3, 3), (2, 1), (1, 0)),
    ((3, 1), (1, 2), (1, 0)),
    ((2, 2), (1, 1), (1, 1)),  # padding past the kernel's reach on one side
]
CONV1D = [(1, 1, 0), (3, 1, 0), (3, 1, 1), (3, 2, 2), (5, 1, 2), (2, 1, 1)]


@given(
    channels=st.tuples(st.integers(1, 6), st.integers(1, 8)),
    geometry=st.sampled_from(CONV2D),
    size=st.tuples(st.integers(0, 6), st.integers(0, 6)),
    batch=st.sampled_from([None, 1, 2]),  # None: an unbatched (C, H, W) input
    density=st.sampled_from(DENSITIES),
    bias=st.booleans(),
    layout=st.sampled_from(["contiguous", "channels_last", "transposed", "strided"]),
    convert=st.booleans(),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=40)
def test_conv2d_matches_masked_dense(channels, geometry, size, batch, density, bias, layout, convert, seed):
    (c, o), (kernel, dilation, padding) = channels, geometry
    # the input at least as large as the kernel's dilated reach less the padding (an output of >= 1)
    hw = [
        max(1, d * (k - 1) + 1 - 2 * p) + extra
        for k, d, p, extra in zip(kernel, dilation, padding, size, strict=True)
    ]
    torch.manual_seed(seed)
    conv = nn.Conv2d(c, o, kernel, padding=padding, dilation=dilation, bias=bias)
    mask = _mask(tuple(conv.weight.shape), density, seed)
    reference = _masked_copy(conv, {"weight": mask})
    if convert:
        compact, weights = _converted(conv, {"weight": mask})
        assert isinstance(compact.layer, CompactConv)
    else:
        dense_weight = conv.weight.detach().clone()
        compact = CompactConv(conv, mask)
        weights = {"weight": (compact, compact.compact_weights["weight"])}
        _check_values(compact, compact.compact_weights["weight"], dense_weight, mask)
    lead = () if batch is None else (batch,)

    def call(module, x):
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last) if batch is not None else x.permute(2, 0, 1)
        elif layout == "transposed":  # the leaf has H and W swapped
            x = x.transpose(-1, -2)
        elif layout == "strided":
            x = x[..., ::2]
        return [module(x)]

    shape = {
        "contiguous": (*lead, c, *hw),
        "channels_last": (*lead, c, *hw) if batch is not None else (*hw, c),
        "transposed": (*lead, c, hw[1], hw[0]),
        "strided": (*lead, c, hw[0], 2 * hw[1]),
    }
    length = c * kernel[0] * kernel[1] * max(1, batch or 1) * hw[0] * hw[1]
    _compare(compact, reference, weights, call, [torch.randn(shape[layout])], length)


@given(
    channels=st.tuples(st.integers(1, 6), st.integers(1, 8)),
    geometry=st.sampled_from(CONV1D),
    extra=st.integers(0, 7),
    batch=st.sampled_from([None, 1, 3]),
    density=st.sampled_from(DENSITIES),
    bias=st.booleans(),
    layout=st.sampled_from(["contiguous", "transposed", "strided"]),
    convert=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_conv1d_matches_masked_dense(channels, geometry, extra, batch, density, bias, layout, convert, seed):
    (c, o), (kernel, dilation, padding) = channels, geometry
    length_in = max(1, dilation * (kernel - 1) + 1 - 2 * padding) + extra
    torch.manual_seed(seed)
    conv = nn.Conv1d(c, o, kernel, padding=padding, dilation=dilation, bias=bias)
    mask = _mask(tuple(conv.weight.shape), density, seed)
    reference = _masked_copy(conv, {"weight": mask})
    if convert:
        compact, weights = _converted(conv, {"weight": mask})
        assert isinstance(compact.layer, CompactConv)
    else:
        compact = CompactConv(conv, mask)
        weights = {"weight": (compact, compact.compact_weights["weight"])}
    lead = () if batch is None else (batch,)

    def call(module, x):
        if layout == "transposed":  # the leaf is (..., L, C): channels read across the last dimension
            x = x.transpose(-1, -2)
        elif layout == "strided":
            x = x[..., ::2]
        return [module(x)]

    shape = {
        "contiguous": (*lead, c, length_in),
        "transposed": (*lead, length_in, c),
        "strided": (*lead, c, 2 * length_in),
    }
    _compare(compact, reference, weights, call, [torch.randn(shape[layout])], c * kernel * length_in)


# ---------------------------------------------------------------------------- CompactGRU


def _gru_masks(gru: nn.GRU, density: float, seed: int) -> dict[str, torch.Tensor]:
    return {
        n: _mask(tuple(p.shape), density, seed + i)
        for i, (n, p) in enumerate(gru.named_parameters())
        if n.startswith("weight")
    }


@given(
    sizes=st.tuples(st.integers(1, 8), st.integers(1, 10)),
    num_layers=st.integers(1, 2),
    bidirectional=st.booleans(),
    batch_first=st.booleans(),
    form=st.sampled_from(["padded", "packed", "unbatched"]),
    steps=st.integers(1, 5),
    batch=st.integers(1, 3),
    with_h0=st.booleans(),
    density=st.sampled_from(DENSITIES),
    bias=st.booleans(),
    convert=st.booleans(),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=30)
def test_gru_matches_masked_dense(
    sizes, num_layers, bidirectional, batch_first, form, steps, batch, with_h0, density, bias, convert, seed
):
    (i, h) = sizes
    torch.manual_seed(seed)
    gru = nn.GRU(i, h, num_layers, bias=bias, batch_first=batch_first, bidirectional=bidirectional)
    masks = _gru_masks(gru, density, seed)
    reference = _masked_copy(gru, masks)
    if convert:
        compact, weights = _converted(gru, masks)
        assert isinstance(compact.layer, CompactGRU)
        hosts = [compact.layer]
    else:
        dense = {n: p.detach().clone() for n, p in gru.named_parameters()}
        compact = CompactGRU(gru, masks)
        weights = {n: (compact, compact.compact_weights[n]) for n in masks}
        for n, m in masks.items():
            _check_values(compact, compact.compact_weights[n], dense[n], m)
        hosts = [compact]
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, steps + 1, (batch,), generator=gen)
    lengths[0] = steps  # the longest sequence fills the padded input

    def call(module, x, *h0):
        hx = h0[0] if h0 else None
        if form == "packed":
            packed = pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False)
            out, hn = module(packed, hx)
            return [out.data, hn]
        out, hn = module(x, hx)
        return [out, hn]

    directions = 2 if bidirectional else 1
    if form == "unbatched":
        x_shape, h_shape = (steps, i), (num_layers * directions, h)
    else:
        x_shape = (batch, steps, i) if batch_first else (steps, batch, i)
        h_shape = (num_layers * directions, batch, h)
    leaves = [torch.randn(x_shape, generator=gen)]
    if with_h0:
        leaves.append(torch.randn(h_shape, generator=gen))
    _compare(compact, reference, weights, call, leaves, steps * max(i, h), hosts=hosts)


# ---------------------------------------------------------------------------- the scattered fallback


def _fallback(kind: str, channels: int, groups: int):
    """A layer no compact layer computes, its target weight's name, and its input's shape minus batch."""
    if kind == "conv_transpose":
        return nn.ConvTranspose2d(channels, 3, 3, stride=2, padding=1), "weight", (channels, 4, 3)
    if kind == "strided":
        return nn.Conv2d(channels, 5, 3, stride=2, padding=1), "weight", (channels, 5, 6)
    if kind == "grouped":
        return nn.Conv2d(2 * channels, 4, 3, groups=2, padding=1), "weight", (2 * channels, 4, 4)
    if kind == "padding_mode":
        return nn.Conv2d(channels, 3, 3, padding=1, padding_mode="reflect"), "weight", (channels, 4, 4)
    attention = nn.MultiheadAttention(2 * channels, 2, batch_first=groups == 1)
    return attention, "in_proj_weight", (3, 2 * channels)


@given(
    kind=st.sampled_from(["conv_transpose", "strided", "grouped", "padding_mode", "attention"]),
    channels=st.integers(1, 4),
    batch=st.sampled_from([1, 2]),
    density=st.sampled_from(DENSITIES),
    layout=st.sampled_from(["contiguous", "channels_last"]),
    convert=st.booleans(),
    flag=st.integers(0, 1),
    seed=st.integers(0, 2**16),
)
def test_scattered_fallback_matches_masked_dense(kind, channels, batch, density, layout, convert, flag, seed):
    torch.manual_seed(seed)
    layer, name, shape = _fallback(kind, channels, flag)
    masks = {name: _mask(tuple(getattr(layer, name).shape), density, seed)}
    if kind == "attention" and convert:  # the output projection too: a CompactLinear read by .weight
        masks["out_proj.weight"] = _mask(tuple(layer.out_proj.weight.shape), density, seed + 1)
    reference = _masked_copy(layer, masks)
    if convert:
        compact, weights = _converted(layer, masks)
        hosts = [host for host, _ in weights.values()]
        if kind == "attention":
            assert isinstance(compact.layer.out_proj, CompactLinear)
    else:
        dense = getattr(layer, name).detach().clone()
        host = scatter_weight(layer, name, masks[name])
        compact, hosts = layer, [host]
        weights = {name: (host, host.compact_weights[name])}
        _check_values(host, host.compact_weights[name], dense, masks[name])
    assert is_scattered_host(weights[name][0]) and weights[name][0].kernel_mode == "dense"

    def call(module, x):
        if kind == "attention":
            if flag == 0:  # batch second
                x = x.transpose(0, 1)
            out, attn = module(x, x, x, need_weights=True)
            return [out, attn]
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        return [module(x)]

    # a scattered host computes through torch's op whatever its mode; the compact linear beside it both ways
    modes = MODES if kind == "attention" and convert else ("dense",)
    hosts = [h for h in hosts if not is_scattered_host(h)] if len(modes) == 2 else hosts
    _compare(compact, reference, weights, call, [torch.randn(batch, *shape)], 9 * 2 * channels, modes, hosts)


# ---------------------------------------------------------------------------- to_dense, reindex, order, state


class _Mixed(nn.Module):
    """Every layer kind in one model (each fed its own input)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(140, 9)
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.conv1d = nn.Conv1d(4, 6, 3, dilation=2, padding=2, bias=False)
        self.gru = nn.GRU(5, 7, num_layers=2, bidirectional=True)
        self.up = nn.ConvTranspose2d(5, 2, 3, stride=2)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        a, b, c, d, e = xs
        conv = self.conv(b)
        out, hn = self.gru(d)
        attn, _ = self.attn(e, e, e, need_weights=False)
        return [self.linear(a), conv, self.up(conv), self.conv1d(c), out, hn, attn]

    @staticmethod
    def inputs(seed: int) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        shapes = [(3, 140), (2, 3, 5, 5), (2, 4, 9), (4, 2, 5), (2, 3, 8)]
        return [torch.randn(s, generator=g) for s in shapes]


def _targets(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.dim() > 1}


def _mixed(seed: int, density: float = 0.4):
    torch.manual_seed(0)
    model = _Mixed()
    masks = {n: _mask(tuple(p.shape), density, seed + i) for i, (n, p) in enumerate(_targets(model).items())}
    return model, masks


def test_to_dense_of_to_compact_is_the_masked_dense_model():
    model, masks = _mixed(1)
    model.gru.eval()  # the training mode of each layer is kept both ways
    reference = _masked_copy(model, masks)
    targets = to_compact(model, _targets(model), masks)
    assert isinstance(model.linear, CompactLinear) and isinstance(model.gru, CompactGRU)
    assert isinstance(model.conv, CompactConv) and isinstance(model.conv1d, CompactConv)
    assert is_scattered_host(targets["up.weight"].host)
    assert is_scattered_host(targets["attn.in_proj_weight"].host)
    assert isinstance(model.attn.out_proj, CompactLinear) and not model.gru.training
    to_dense(model)
    kinds = [(type(m), type(r)) for m, r in zip(model.modules(), reference.modules(), strict=True)]
    # the layer classes come back (attention's out_proj, a NonDynamicallyQuantizableLinear, as its base)
    assert all(issubclass(want, got) for got, want in kinds) and (nn.Linear, nn.Linear) in kinds
    assert sum(got is not want for got, want in kinds) == 1
    assert not model.gru.training and model.linear.training
    got, want = dict(model.named_parameters()), dict(reference.named_parameters())
    # the same names (a scattered weight comes back after its module's bias: parametrize removed it from
    # its place, so the order of names within those modules differs)
    assert sorted(got) == sorted(want)
    scattered = ("up.", "attn.in_proj")
    assert [n for n in got if not n.startswith(scattered)] == [n for n in want if not n.startswith(scattered)]
    for name, p in want.items():
        assert torch.equal(got[name], p), name  # exactly: the kept values at their places, 0 elsewhere
        assert isinstance(got[name], nn.Parameter) and got[name].requires_grad
    assert sorted(model.state_dict()) == sorted(reference.state_dict())
    xs = _Mixed.inputs(0)
    for a, b in zip(model(xs), reference(xs), strict=True):
        assert torch.equal(a, b)


def test_parameter_order_matches_the_dense_model():
    # Linear, Conv and GRU keep their dense layer's parameter order (weights in place, biases the same
    # Parameters): an optimiser's groups, an EMA built on model.parameters() line up one for one
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(300, 12),
        nn.Conv2d(3, 4, 3),
        nn.Conv1d(2, 3, 1),
        nn.GRU(6, 5, num_layers=2, bidirectional=True, batch_first=True),
        nn.Linear(5, 2, bias=False),
    )
    before = list(model.named_parameters())
    params = _targets(model)
    masks = {n: _mask(tuple(p.shape), 0.3, i) for i, (n, p) in enumerate(params.items())}
    targets = to_compact(model, params, masks)
    values = {id(t.values): n for n, t in targets.items()}
    after = list(model.parameters())
    assert len(after) == len(before)
    for (name, dense), p in zip(before, after, strict=True):
        if name in targets:
            assert values.get(id(p)) == name
        else:
            assert p is dense  # a bias: the dense layer's own Parameter
    assert isinstance(model[3], CompactGRU)
    assert [n for n, _ in model[3].named_parameters()] == [
        n.replace("weight", "values") for n, _ in nn.GRU(6, 5, 2, bidirectional=True).named_parameters()
    ]


@given(
    shape=st.tuples(st.integers(1, 12), st.integers(1, 300)),
    panel=st.booleans(),
    density=st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_reindex_and_permute_keep_every_value_that_stays(shape, panel, density, seed):
    rows, columns = shape
    host = nn.Module()
    weight = torch.randn(rows, columns, generator=torch.Generator().manual_seed(seed))
    old = _mask(shape, density, seed)
    width = min(columns, 128) if panel else None
    cw = CompactWeight.create(host, "weight", weight, old, rows, width)
    new = _mask(shape, density, seed + 1)
    before = cw.scatter(host).detach().clone()
    state = cw.values(host).detach() * 3.0 + 1.0  # an optimiser state, say: never 0 before the move
    state_before = cw.scatter(host, state).clone()
    old_index, new_index = cw.reindex(host, new)
    permute_(cw.values(host).data, old_index, new_index)
    permute_(state, old_index, new_index)
    stays, grown = old & new, new & ~old
    assert old_index.numel() == int(stays.sum())
    assert torch.equal(cw.mask(host), new)
    row_ptr, cols, flat = layout_from_mask(new, width)
    assert torch.equal(cw.row_ptr(host), row_ptr) and torch.equal(cw.cols(host), cols)
    assert torch.equal(cw.flat(host), flat)
    after, state_after = cw.scatter(host).detach(), cw.scatter(host, state)
    assert torch.equal(after[stays], before[stays]) and torch.equal(state_after[stays], state_before[stays])
    assert torch.all(after[grown] == 0) and torch.all(state_after[grown] == 0)
    assert torch.all(after[~new] == 0)
    if int(new.sum()) < new.numel():  # another count of kept positions is refused
        with pytest.raises(ValueError, match="keeps"):
            cw.reindex(host, new | ~new)


def _set_mode(model: nn.Module, mode: str) -> None:
    for host in model.modules():
        if getattr(host, "compact_weights", None) is not None and not is_scattered_host(host):
            host.kernel_mode = mode


def _outputs_and_grads(model: nn.Module, seed: int) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    outs = model(_Mixed.inputs(seed))
    sum((o * o).sum() for o in outs).backward()
    return [o.detach() for o in outs] + [p.grad for p in model.parameters()]


def test_state_dict_round_trip_into_another_layout():
    model, masks_a = _mixed(1)
    _, masks_b = _mixed(2)
    to_compact(model, _targets(model), masks_a)
    fresh, _ = _mixed(3)
    fresh_targets = to_compact(fresh, _targets(fresh), masks_b)
    for mode in MODES:  # the fresh model's derived structures (flat positions, transposes, offsets) exist
        _set_mode(fresh, mode)
        _outputs_and_grads(fresh, 0)
    assert all(not torch.equal(t.weight.mask(t.host), masks_a[n]) for n, t in fresh_targets.items())
    fresh.load_state_dict(model.state_dict())
    for name, t in fresh_targets.items():  # the loaded layout is the one used
        assert torch.equal(t.weight.mask(t.host), masks_a[name]), name
    got, want = fresh.state_dict(), model.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    twin = copy.deepcopy(fresh)  # a deep copy (an EMA's) computes alike too
    for mode in MODES:  # the same forward and backward, bit for bit
        for m in (model, fresh, twin):
            _set_mode(m, mode)
        want = _outputs_and_grads(model, 1)
        for m in (fresh, twin):
            for a, b in zip(want, _outputs_and_grads(m, 1), strict=True):
                assert torch.equal(a, b), mode
    to_dense(model)
    to_dense(fresh)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), fresh.parameters(), strict=True))
