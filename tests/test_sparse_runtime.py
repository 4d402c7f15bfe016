"""The sparse inference runtime: native SpMM against the masked dense computation, and the fallback."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from sparsediff.sparse import native
from sparsediff.sparse.runtime import (
    MAX_DENSITY,
    MEASURE_ROUNDS,
    MEASURED_MARGIN,
    SparseConv,
    SparseGRU,
    SparseLinear,
    kernels,
    sparse_layers,
    to_sparse_inference,
)


@pytest.fixture(scope="module")
def built():
    mod = kernels()
    if mod is None:
        pytest.fail("the native kernels did not build on this machine (g++ and ninja are installed by make)")
    return mod


def _masked_linear(m: int, k: int, density: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, m)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(m, k, generator=g))
        lin.bias.copy_(torch.randn(m, generator=g))
    mask = torch.rand(m, k, generator=g) < density
    if m > 2:
        mask[1] = False  # an empty row
    return lin, mask


@given(
    m=st.integers(1, 200),
    k=st.integers(1, 150),
    n=st.integers(1, 140),
    density=st.sampled_from([0.0, 0.03, 0.1, 0.37, 1.0]),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_spmm_matches_masked_dense(built, m, k, n, density, bias, seed):
    lin, mask = _masked_linear(m, k, density, seed)
    layer = SparseLinear(lin.weight, lin.bias if bias else None, mask)
    x = torch.randn(n, k, generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        got = layer(x)
    want = F.linear(x, lin.weight * mask, lin.bias if bias else None)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(layer.transposed_rows(x), want.t(), rtol=1e-5, atol=1e-4)  # the (M, N) order


def test_leading_dims_non_contiguous_and_batch_one(built):
    lin, mask = _masked_linear(96, 64, 0.1, 0)
    layer = SparseLinear(lin.weight, lin.bias, mask)
    w = lin.weight * mask
    x = torch.randn(3, 64, 5).transpose(1, 2)  # (3, 5, 64), not contiguous
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, w, lin.bias), rtol=1e-5, atol=1e-4)
        one = torch.randn(1, 64)
        torch.testing.assert_close(layer(one), F.linear(one, w, lin.bias), rtol=1e-5, atol=1e-4)


def test_autograd_and_other_dtypes_use_the_dense_weight(built):
    lin, mask = _masked_linear(16, 8, 0.5, 3)
    layer = SparseLinear(lin.weight, lin.bias, mask)
    x = torch.randn(4, 8, requires_grad=True)
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, (lin.weight * mask).sum(0).expand(4, 8))
    xd = torch.randn(4, 8, dtype=torch.float64)
    torch.testing.assert_close(
        layer(xd), F.linear(xd, (lin.weight * mask).double(), lin.bias.double()), rtol=1e-6, atol=1e-6
    )


class _Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        self.head = nn.Linear(32, 8)

    def forward(self, x):
        return self.head(self.body(x))


def test_to_sparse_inference_keeps_forward_and_leaves_dense_layers(built):
    import sparsediff

    torch.manual_seed(0)
    model = _Mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = sparsediff.sparsify(model, opt, method="static", sparsity=0.9, distribution="uniform")
    with torch.no_grad():
        model.head.weight.fill_(1.0)  # a dense layer: stays nn.Linear
    fast = to_sparse_inference(model, {k: v for k, v in engine.masks.items() if not k.startswith("head")})
    assert isinstance(fast.body[0], SparseLinear) and isinstance(fast.body[2], SparseLinear)
    assert type(fast.head) is nn.Linear
    assert type(model.body[0]) is nn.Linear  # the original is untouched
    x = torch.randn(10, 7, 32)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-5)


def test_default_rule_has_a_density_limit_per_layer_kind(built):
    # without example inputs a layer converts up to its kind's measured limit: linears go further than
    # convolutions and GRUs
    assert MAX_DENSITY["linear"] > MAX_DENSITY["conv"] == MAX_DENSITY["gru"]
    between = (MAX_DENSITY["linear"] + MAX_DENSITY["conv"]) / 2
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.Flatten(1), nn.Linear(8 * 5 * 5, 40))
    masks = {
        "0.weight": _same_count_mask((8, 8, 3, 3), round(between * 576), 0),
        "2.weight": _same_count_mask((40, 200), round(between * 8000), 1),
    }
    with torch.no_grad():  # a trained sparse model: zero where masked
        for n, p in model.named_parameters():
            if n in masks:
                p.mul_(masks[n])
    fast = to_sparse_inference(model, masks)
    assert sparse_layers(fast) == ["2"]
    assert sparse_layers(to_sparse_inference(model, masks, max_density=between + 0.01)) == ["0", "2"]
    x = torch.randn(3, 8, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-5)


def test_no_compiler_fallback_warns_once_and_stays_correct(monkeypatch):
    lin, mask = _masked_linear(40, 24, 0.2, 1)
    x = torch.randn(9, 24)
    monkeypatch.setenv(native.DISABLE_ENV, "0")
    native.reset()
    try:
        with pytest.warns(RuntimeWarning, match="native sparse kernels are unavailable"):
            layer = SparseLinear(lin.weight, lin.bias, mask)
            with torch.no_grad():
                got = layer(x)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a second use does not warn again
            with torch.no_grad():
                layer(x)
    finally:
        native.reset()
    torch.testing.assert_close(got, F.linear(x, lin.weight * mask, lin.bias))


@given(
    c_in=st.integers(1, 20),
    c_out=st.integers(1, 20),
    size=st.tuples(st.integers(1, 12), st.integers(1, 12)),
    kernel=st.sampled_from([1, 3, (1, 3), 5]),
    padding=st.sampled_from([0, 1, 2]),
    dilation=st.sampled_from([1, 2]),
    batch=st.integers(1, 3),
    density=st.sampled_from([0.0, 0.1, 0.5, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_sparse_conv2d_matches_masked_dense(
    built, c_in, c_out, size, kernel, padding, dilation, batch, density, seed
):
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(c_in, c_out, kernel, padding=padding, dilation=dilation)
    kh, kw = conv.kernel_size
    if size[0] + 2 * padding < dilation * (kh - 1) + 1 or size[1] + 2 * padding < dilation * (kw - 1) + 1:
        return  # kernel larger than the padded input: not a valid convolution
    mask = torch.rand(conv.weight.shape, generator=g) < density
    layer = SparseConv(conv, mask)
    x = torch.randn(batch, c_in, *size, generator=g)
    with torch.no_grad():
        want = F.conv2d(x, conv.weight * mask, conv.bias, padding=padding, dilation=dilation)
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-4)


def test_sparse_conv_1d_channels_last_and_unbatched(built):
    torch.manual_seed(0)
    c1 = nn.Conv1d(6, 10, 3, padding=1)
    m1 = torch.rand(c1.weight.shape) < 0.3
    s1 = SparseConv(c1, m1)
    x = torch.randn(2, 6, 17)
    c2 = nn.Conv2d(8, 4, 3, padding=1)
    m2 = torch.rand(c2.weight.shape) < 0.3
    s2 = SparseConv(c2, m2)
    img = torch.randn(2, 8, 9, 7).to(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(
            s1(x), F.conv1d(x, c1.weight * m1, c1.bias, padding=1), rtol=1e-5, atol=1e-4
        )
        torch.testing.assert_close(
            s1(x[0]), F.conv1d(x[0], c1.weight * m1, c1.bias, padding=1), rtol=1e-5, atol=1e-4
        )
        torch.testing.assert_close(
            s2(img), F.conv2d(img, c2.weight * m2, c2.bias, padding=1), rtol=1e-5, atol=1e-4
        )
        # the dense fallback (autograd) gives the same
        torch.testing.assert_close(s2._dense_forward(img), s2(img), rtol=1e-5, atol=1e-4)


def test_unsupported_convolutions_stay_dense():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, stride=2), nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 4, 1))
    with torch.no_grad():
        for m in model:
            m.weight.mul_((torch.rand(m.weight.shape) < 0.1).float())
    fast = to_sparse_inference(model)
    assert type(fast[0]) is nn.Conv2d and type(fast[1]) is nn.Conv2d
    assert isinstance(fast[2], SparseConv)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_sparse_gru_matches_masked_dense(built, batch_first, bidirectional):
    torch.manual_seed(0)
    gru = nn.GRU(5, 12, num_layers=2, batch_first=batch_first, bidirectional=bidirectional).eval()
    masks = {}
    with torch.no_grad():
        for n, p in gru.named_parameters():
            if n.startswith("weight_"):
                masks[n] = torch.rand(p.shape) < 0.2
                p.mul_(masks[n])
    fast = SparseGRU(gru, masks)
    x = torch.randn(3, 7, 5)  # (B, T, F) or (T, B, F)
    h0 = torch.randn(2 * (2 if bidirectional else 1), 7 if not batch_first else 3, 12)
    with torch.no_grad():
        for args in ((x,), (x, h0)):
            out, h = fast(*args)
            want_out, want_h = gru(*args)
            torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(h, want_h, rtol=1e-5, atol=1e-5)
        one, h1 = fast(x[0])  # unbatched
        w1, wh1 = gru(x[0])
        torch.testing.assert_close(one, w1, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(h1, wh1, rtol=1e-5, atol=1e-5)
    x.requires_grad_(True)
    torch.testing.assert_close(fast(x)[0], gru(x)[0], rtol=1e-5, atol=1e-5)  # autograd: dense path


def test_to_sparse_inference_converts_a_sparse_gru(built):
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("rnn", nn.GRU(4, 8, batch_first=True))
    with torch.no_grad():
        for n, p in model.rnn.named_parameters():
            if n.startswith("weight_"):
                p.mul_((torch.rand(p.shape) < 0.1).float())
    fast = to_sparse_inference(model)
    assert isinstance(fast.rnn, SparseGRU)
    x = torch.randn(2, 6, 4)
    with torch.no_grad():
        torch.testing.assert_close(fast.rnn(x)[0], model.rnn(x)[0], rtol=1e-5, atol=1e-5)


def _sparse_gru(gru: nn.GRU, density: float) -> SparseGRU:
    """Zero all but about ``density`` of ``gru``'s weights (in place, at random) and convert it."""
    with torch.no_grad():
        for n, p in gru.named_parameters():
            if n.startswith("weight_"):
                p.mul_((torch.rand(p.shape) < density).float())
    return SparseGRU(gru)


def test_sparse_gru_on_packed_sequences(built):
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    torch.manual_seed(1)
    gru = nn.GRU(3, 10, num_layers=2, batch_first=True, bidirectional=True).eval()
    fast = _sparse_gru(gru, 0.15)
    x = torch.randn(4, 9, 3)
    lengths = torch.tensor([5, 9, 1, 7])
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    with torch.no_grad():
        got, got_h = fast(packed)
        want, want_h = gru(packed)
    torch.testing.assert_close(got.data, want.data, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_h, want_h, rtol=1e-5, atol=1e-5)
    a, _ = pad_packed_sequence(got, batch_first=True)
    b, _ = pad_packed_sequence(want, batch_first=True)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("m,k,n", [(70, 700, 130), (33, 1030, 5), (200, 513, 64)])
def test_spmm_wide_layers_use_column_panels(built, m, k, n):
    lin, mask = _masked_linear(m, k, 0.1, 7)
    layer = SparseLinear(lin.weight, lin.bias, mask)
    assert layer.row_ptr.shape[0] > 1  # several panels
    x = torch.randn(n, k)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, lin.weight * mask, lin.bias), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(layer.dense_weight(), lin.weight.detach() * mask)


def test_sparse_conv_large_images_take_the_wide_tiles(built):
    torch.manual_seed(2)
    conv = nn.Conv2d(5, 7, 3, padding=1)
    mask = torch.rand(conv.weight.shape) < 0.2
    layer = SparseConv(conv, mask)
    x = torch.randn(3, 5, 21, 19)  # 21 x 21 padded positions per image: 64-wide tiles and a ragged last one
    with torch.no_grad():
        want = F.conv2d(x, conv.weight * mask, conv.bias, padding=1)
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-4)


def test_sparse_conv_serves_several_input_sizes(built):
    # offsets into the padded input are cached per input size: each size must get its own
    torch.manual_seed(6)
    conv = nn.Conv2d(6, 5, 3, padding=2, dilation=2)
    mask = torch.rand(conv.weight.shape) < 0.3
    layer = SparseConv(conv, mask)
    with torch.no_grad():
        for size in [(9, 9), (4, 13), (9, 9), (17, 5)]:
            x = torch.randn(2, 6, *size)
            want = F.conv2d(x, conv.weight * mask, conv.bias, padding=2, dilation=2)
            torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-4)
    assert len(layer._offsets) == 3


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("batch,dilation", [(1, 1), (3, 2)])
def test_sparse_conv_many_channels_split_into_position_groups(built, threads, batch, dilation):
    # 300 input channels: the input window of one group of tiles is a few tiles wide, so an image is
    # several groups; with batch 1 the output channels are split between work items as well
    torch.manual_seed(3)
    conv = nn.Conv2d(300, 9, 3, padding=dilation, dilation=dilation)
    mask = torch.rand(conv.weight.shape) < 0.1
    layer = SparseConv(conv, mask)
    x = torch.randn(batch, 300, 23, 29)
    with _threads(threads), torch.no_grad():
        got = layer(x)
        want = F.conv2d(x, conv.weight * mask, conv.bias, padding=dilation, dilation=dilation)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_sparse_gru_vector_gates_with_ragged_batch(built):

    torch.manual_seed(4)
    gru = nn.GRU(6, 16, batch_first=True, bidirectional=True).eval()
    with torch.no_grad():
        for n, p in gru.named_parameters():
            if n.startswith("weight_"):
                p.mul_((torch.rand(p.shape) < 0.2).float())
            else:
                p.mul_(3.0)  # large gate inputs: the vectorised exp's range reduction at work
    fast = SparseGRU(gru)
    x = 3 * torch.randn(19, 11, 6)  # 19 sequences: two vectors of eight and a scalar tail
    lengths = torch.randint(1, 12, (19,))
    lengths[0] = 11
    _assert_gru_matches(fast, gru, x, lengths)


def _assert_gru_matches(fast: SparseGRU, gru: nn.GRU, x: torch.Tensor, lengths: torch.Tensor) -> None:
    """The sparse GRU gives the dense one's outputs and final states on ``x`` (batch first) padded and
    packed with ``lengths``."""
    from torch.nn.utils.rnn import pack_padded_sequence

    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    with torch.no_grad():
        for inp in (x, packed):
            got, got_h = fast(inp)
            want, want_h = gru(inp)
            got = got.data if not torch.is_tensor(got) else got
            want = want.data if not torch.is_tensor(want) else want
            torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)
            torch.testing.assert_close(got_h, want_h, rtol=1e-5, atol=2e-6)


@contextlib.contextmanager
def _threads(count: int):
    """torch's intra-op thread count set to ``count`` inside the block."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("batch", [1, 5, 13, 40])
def test_sparse_gru_small_batches_and_wide_hidden_states(built, threads, batch):
    # hidden 20: gates over units take two vectors of eight and a scalar tail; batch 1 and 5 take that path
    # for every sequence, 13 for five of them, 40 not at all (and with two threads, slices of 24 and 16)
    torch.manual_seed(5)
    gru = nn.GRU(7, 20, num_layers=2, batch_first=True, bidirectional=True).eval()
    fast = _sparse_gru(gru, 0.15)
    x = torch.randn(batch, 9, 7)
    lengths = torch.randint(1, 10, (batch,))
    lengths[0] = 9
    with _threads(threads):
        _assert_gru_matches(fast, gru, x, lengths)


class _TwoPaths(nn.Module):
    def __init__(self):
        super().__init__()
        self.used = nn.Linear(64, 64)
        self.unused = nn.Linear(64, 64)  # never called by forward

    def forward(self, x):
        return self.used(x)


def test_measured_choice_reports_each_layer_and_keeps_unreached_layers_dense(built):
    torch.manual_seed(0)
    model = _TwoPaths()
    with torch.no_grad():
        for p in (model.used.weight, model.unused.weight):
            p.mul_((torch.rand(p.shape) < 0.1).float())
    report: dict = {}
    x = torch.randn(256, 64)
    fast = to_sparse_inference(model, example_inputs=(x,), report=report)
    assert set(report) == {"used", "unused"}
    assert report["used"]["dense_ms"] > 0 and report["used"]["sparse_ms"] > 0
    assert report["used"]["sparse"] == isinstance(fast.used, SparseLinear)
    used = report["used"]
    assert used["sparse"] == (used["sparse_ms"] < MEASURED_MARGIN * used["dense_ms"])
    assert report["unused"] == {"density": pytest.approx(report["unused"]["density"]), "sparse": False}
    assert type(fast.unused) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seconds,rounds", [(0.0, MEASURE_ROUNDS[0]), (1e9, MEASURE_ROUNDS[1])])
def test_measured_choice_takes_more_rounds_until_enough_time_has_passed(built, monkeypatch, seconds, rounds):
    # a slow layer stops after the fewest rounds; a fast one goes on (up to the most) until the time is spent
    from sparsediff.sparse.runtime import planner

    monkeypatch.setattr(planner, "MEASURE_SECONDS", seconds)
    calls = []
    forward = SparseLinear.forward
    monkeypatch.setattr(SparseLinear, "forward", lambda self, x: calls.append(x) or forward(self, x))
    lin, mask = _masked_linear(16, 32, 0.1, 4)
    with torch.no_grad():
        lin.weight.mul_(mask)
    to_sparse_inference(nn.Sequential(lin), example_inputs=(torch.randn(4, 32),))
    assert len(calls) == 1 + rounds  # a warm-up call, then one per round


def _randomised(model: nn.Module) -> nn.Module:
    """Random weights everywhere: a trained model has no zero-initialised layers (DiT's adaLN-Zero)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            scale = 0.5 / max(1, p[0].numel()) ** 0.5 if p.dim() > 1 else 0.1
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


@pytest.mark.parametrize(
    "kind,args,batch",
    [
        (
            "unet2d",
            {
                "sample_size": 8,
                "in_channels": 4,
                "out_channels": 4,
                "block_out_channels": [16, 32],
                "layers_per_block": 1,
                "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
                "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
                "attention_head_dim": 8,
                "norm_num_groups": 8,
            },
            3,
        ),
        ("dit", {"size": "DiT-XS", "input_size": 8, "in_channels": 4, "patch_size": 2, "depth": 2}, 2),
        ("chirodiff-gru", {"hidden": 24, "layers": 2, "time_dim": 8, "num_timesteps": 1000}, 5),
    ],
)
@pytest.mark.parametrize("measured", [False, True])
def test_every_denoiser_family_runs_sparse_with_the_same_outputs(built, kind, args, batch, measured):
    import sparsediff
    from sparsediff.config import ModelSpec
    from sparsediff.models import build_model

    torch.manual_seed(0)
    model = _randomised(build_model(ModelSpec(kind=kind, args=dict(args))))
    engine = sparsediff.sparsify(model, None, method="static", sparsity=0.9, distribution="erk")
    masks = dict(engine.masks)
    engine.remove()
    xs = list(model.example_inputs(batch))
    xs[0] = torch.randn(xs[0].shape, generator=torch.Generator().manual_seed(1))
    if kind == "chirodiff-gru":  # ragged sequences: the packed GRU path
        xs[2] = torch.tensor([64, 5, 33, 1, 64][:batch])
    report: dict = {}
    fast = to_sparse_inference(
        model,
        masks,
        example_inputs=tuple(xs) if measured else None,
        max_density=None if measured else 0.5,
        report=report,
    )
    if not measured:
        assert all(r["sparse"] for r in report.values())  # every candidate converted: all kernels at work
        assert any(isinstance(m, (SparseConv, SparseGRU)) for m in fast.modules()) or kind == "dit"
    with torch.no_grad():
        want = model(*xs)
        got = fast(*xs)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def test_inputs_of_the_wrong_size_are_refused(built):
    # the kernels index the input by the layer's own sizes: a smaller input must be refused, not read past
    lin, mask = _masked_linear(8, 100, 0.3, 3)
    layer = SparseLinear(lin.weight, lin.bias, mask)
    conv = SparseConv(nn.Conv2d(6, 4, 3, padding=1))
    with torch.no_grad():
        for x in (torch.randn(10, 90), torch.randn(2, 5, 90)):  # 10 x 90 would reshape to 9 x 100
            with pytest.raises(RuntimeError, match="expected 100"):
                layer(x)
        with pytest.raises(RuntimeError, match="expected 6"):
            conv(torch.randn(2, 5, 8, 8))


def _same_count_mask(shape: tuple[int, ...], active: int, seed: int) -> torch.Tensor:
    """A random mask of exactly ``active`` non-zeros: compressed layers of two such masks have buffers of
    the same shapes, so one's state dict loads into the other."""
    mask = torch.zeros(shape, dtype=torch.bool)
    mask.view(-1)[torch.randperm(mask.numel(), generator=torch.Generator().manual_seed(seed))[:active]] = True
    return mask


def test_loading_a_state_dict_refreshes_what_the_layers_derived_from_their_weights(built):
    # the dense weights of the fallback path and the convolution's offsets are derived from the compressed
    # weights and cached: loading other weights must not leave them stale
    torch.manual_seed(8)
    lin, conv = nn.Linear(20, 12), nn.Conv2d(4, 6, 3, padding=1)
    gru_a, gru_b = nn.GRU(5, 7), nn.GRU(5, 7)
    x_lin, x_conv, x_gru = torch.randn(3, 20), torch.randn(2, 4, 6, 6), torch.randn(4, 2, 5)
    pairs = [
        [SparseLinear(lin.weight, lin.bias, _same_count_mask((12, 20), 50, s)) for s in (0, 1)],
        [SparseConv(conv, _same_count_mask(conv.weight.shape, 40, s)) for s in (0, 1)],
        [SparseGRU(gru) for gru in (gru_a, gru_b)],
    ]
    with torch.no_grad():
        for (a, b), x in zip(pairs, (x_lin, x_conv, x_gru)):
            want_native, want_dense = b(x), b(x.double())  # float32: kernels; float64: dense fallback
            a(x), a(x.double())  # fill a's caches
            a.load_state_dict(b.state_dict())
            for got, want in ((a(x), want_native), (a(x.double()), want_dense)):
                got, want = (got[0], want[0]) if isinstance(got, tuple) else (got, want)
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


class _EveryKind(nn.Module):
    """A 2-D and a 1-D convolution, a linear on 3-D input and a GRU, with activations between them."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1d = nn.Conv1d(8, 8, 3, padding=2, dilation=2)
        self.lin = nn.Linear(36, 20)
        self.gru = nn.GRU(20, 12, batch_first=True)
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        h = F.silu(self.conv(x)).flatten(2)  # (N, 8, 36)
        h = F.gelu(self.lin(F.silu(self.conv1d(h))))  # (N, 8, 20)
        return self.head(self.gru(h)[0])


def test_a_sparse_model_compiles_into_one_graph(built):
    # under torch.compile the kernels are torch operators (torch.ops.sparsediff), so the compiler sees one
    # graph (fullgraph=True refuses any break) and the outputs stay those of the masked dense model
    torch.manual_seed(9)
    model = _EveryKind().eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "weight" in n:
                p.mul_((torch.rand(p.shape) < 0.2).float())
    fast = to_sparse_inference(model, max_density=1.0)
    assert {"conv", "conv1d", "lin", "gru", "head"} <= set(sparse_layers(fast))
    compiled = torch.compile(fast, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        for batch in (3, 1):
            x = torch.randn(batch, 3, 6, 6)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


def test_a_sparse_gru_refuses_inputs_of_the_wrong_size(built):
    # its input projection goes through SparseLinear.transposed_rows, which checks the feature count
    fast = SparseGRU(nn.GRU(6, 4, batch_first=True))
    with torch.no_grad(), pytest.raises(RuntimeError, match="expected 6"):
        fast(torch.randn(2, 3, 5))
