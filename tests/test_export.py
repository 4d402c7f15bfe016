"""N:M checks and export of 2:4 Linear layers to PyTorch's semi-structured sparse format."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import sparsediff
from sparsediff.errors import ConfigError
from sparsediff.sparse import (
    check_nm,
    nm_mask,
    nm_violations,
    one_shot_nm,
    plan_semi_structured,
    to_semi_structured,
)

HAS_SPARSE_GPU = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)
cuda = pytest.mark.skipif(not HAS_SPARSE_GPU, reason="needs a CUDA GPU with compute capability >= 8.0")


# ---------------------------------------------------------------- N:M checks


def test_check_nm_on_hand_made_weights():
    w = torch.tensor([[1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 3.0]])
    assert check_nm(w, 2, 4)
    assert not check_nm(w, 1, 4)  # the first group has two non-zeros
    assert check_nm(w, 3, 8) and not check_nm(w, 2, 8)
    assert not check_nm(torch.tensor([[1.0, 1.0, 1.0, 0.0]]), 2, 4)
    assert not check_nm(torch.ones(3, 6), 2, 4)  # 6 inputs: no groups of 4
    assert check_nm(w.t(), 2, 4, in_dim=0)
    assert not check_nm(torch.ones(8, 4), 2, 4, in_dim=0)


def test_check_nm_groups_conv_weights_over_input_channels():
    # channels [1,1,0,0] at both kernel positions: 2:4 over channels, but the memory order
    # (1,1 | 1,1 | 0,0 | 0,0) has a group of 4 non-zeros
    w = torch.zeros(1, 4, 1, 2)  # (out, in, kh, kw)
    w[0, :2] = 1.0
    assert check_nm(w, 2, 4)
    assert not check_nm(w.reshape(-1, 4), 2, 4)
    # and the other way round: 3 non-zero channels at kernel position 0, memory groups of 2
    w = torch.zeros(1, 4, 1, 2)
    w[0, :3, 0, 0] = 1.0
    assert not check_nm(w, 2, 4)
    assert check_nm(w.reshape(-1, 4), 2, 4)


@given(
    nm=st.integers(2, 8).flatmap(lambda m: st.tuples(st.integers(1, m - 1), st.just(m))),
    rows=st.integers(1, 5),
    groups=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_check_nm_agrees_with_masks(nm, rows, groups, seed):
    n, m = nm
    w = torch.randn(rows, m * groups, generator=torch.Generator().manual_seed(seed))
    pruned = w * nm_mask(w, n, m)
    assert check_nm(pruned, n, m)
    assert not check_nm(w, n, m)  # no zeros in a Gaussian draw: m > n non-zeros per group
    if n > 1:
        assert not check_nm(pruned, n - 1, m)


def test_check_nm_bad_input():
    with pytest.raises(ConfigError, match=">= 2 dims"):
        check_nm(torch.ones(8), 2, 4)
    with pytest.raises(ConfigError, match="N must be smaller than M"):
        check_nm(torch.ones(2, 8), 4, 4)
    with pytest.raises(ConfigError, match="N must be at least 1"):
        check_nm(torch.ones(2, 8), 0, 4)


def test_nm_violations_counts_groups():
    model = nn.Sequential(nn.Linear(8, 2), nn.Linear(6, 3))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1, 1, 1, 0, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0, 0, 1.0]]))
    assert nm_violations(model, 2, 4) == {"0.weight": 2}
    assert nm_violations(model, 3, 4) == {"0.weight": 1}
    one_shot_nm(model, 2, 4)
    assert nm_violations(model, 2, 4) == {}  # 1.weight (6 inputs) cannot be 2:4 and is not listed


# ---------------------------------------------------------------- planning (CPU)


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.big = nn.Linear(64, 32)
        self.dense = nn.Linear(64, 32)
        self.small = nn.Linear(8, 32)
        self.odd = nn.Linear(6, 32)
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)

    def forward(self, x, x_small, x_odd, img):
        h = self.big(x) + self.dense(x) + self.small(x_small) + self.odd(x_odd)
        h = h + self.conv(img).mean((2, 3)).repeat(1, 4)
        return self.attn(h[:, None], h[:, None], h[:, None])[0][:, 0]

    @staticmethod
    def inputs(dtype=torch.float32, device="cpu"):
        g = torch.Generator().manual_seed(1)
        xs = (torch.randn(3, 64, generator=g), torch.randn(3, 8, generator=g), torch.randn(3, 6, generator=g))
        return tuple(x.to(device=device, dtype=dtype) for x in (*xs, torch.randn(3, 4, 5, 5, generator=g)))


def _pruned_mixed():
    torch.manual_seed(0)
    model = Mixed()
    one_shot_nm(model, 2, 4, exclude=["dense.*"])
    return model


def test_plan_converts_2_4_linears_and_says_why_the_rest_stay_dense():
    model = _pruned_mixed()
    rep = plan_semi_structured(model)
    assert rep.converted == ["big.weight"]
    kept = rep.kept
    assert kept["dense.weight"].startswith("not 2:4: 512 of 512 groups")
    assert "multiples of" in kept["small.weight"] and "(32, 8)" in kept["small.weight"]
    assert "not a multiple of 4" in kept["odd.weight"]
    assert kept["conv.weight"].startswith("convolution")
    assert "MultiheadAttention" in kept["attn.out_proj.weight"]
    assert "nn.Linear weights only" in kept["attn.in_proj_weight"]
    assert rep.backend in ("cusparselt", "cutlass") and rep.dtype == "float16"
    assert "big.weight" in str(rep) and rep.to_dict()["converted"] == ["big.weight"]


def test_plan_applies_masks_without_changing_the_model():
    torch.manual_seed(0)
    model = Mixed()
    before = copy.deepcopy(model.state_dict())
    masks = {"dense.weight": nm_mask(model.dense.weight, 2, 4)}
    rep = plan_semi_structured(model, masks, dtype=torch.bfloat16)
    assert rep.converted == ["dense.weight"] and rep.dtype == "bfloat16"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ConfigError, match="mask for 'nope.weight' matches no parameter"):
        plan_semi_structured(model, {"nope.weight": masks["dense.weight"]})
    with pytest.raises(
        ConfigError, match=r"mask for 'big.weight' has shape \(64, 32\) but the weight has \(32, 64\)"
    ):
        plan_semi_structured(model, {"big.weight": torch.ones(32, 64, dtype=torch.bool).t()})


# ---------------------------------------------------------------- export errors (CPU)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int8, "fp16"])
def test_export_rejects_other_dtypes(dtype):
    with pytest.raises(ConfigError, match="float16 or torch.bfloat16"):
        to_semi_structured(_pruned_mixed(), dtype=dtype)


def test_export_without_a_2_4_layer_says_why():
    torch.manual_seed(0)
    with pytest.raises(ConfigError, match="no nn.Linear with a 2:4 weight.*not 2:4"):
        to_semi_structured(nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 16)))
    with pytest.raises(ConfigError, match="no nn.Linear with a 2:4 weight.*convolution"):
        model = nn.Sequential(nn.Conv2d(4, 8, 3))
        one_shot_nm(model, 2, 4)
        to_semi_structured(model)


def test_export_without_cuda_fails_cleanly_and_leaves_the_model_alone(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = _pruned_mixed()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match="semi-structured export needs a CUDA GPU"):
        to_semi_structured(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())

    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    eng = sparsediff.sparsify(student, None, method="srste", nm="2:4")
    with pytest.raises(ConfigError, match="still carries an N:M engine's hooks"):
        to_semi_structured(student)
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        to_semi_structured(student, eng)
    assert eng.names == ["0.weight", "2.weight"] and len(student[0]._forward_pre_hooks) == 1  # untouched
    eng.remove()


# ---------------------------------------------------------------- export on a GPU


def _masked_reference(model, dtype):
    return copy.deepcopy(model).to(device="cuda", dtype=dtype)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_exported_model_matches_the_masked_dense_model(dtype):
    model = _pruned_mixed().eval()
    ref = _masked_reference(model, dtype)
    out = to_semi_structured(model, dtype=dtype)
    assert out is model
    assert isinstance(model.big.weight, torch.sparse.SparseSemiStructuredTensor)
    assert not model.big.weight.requires_grad
    for name in ("dense", "small", "odd", "conv"):
        assert not isinstance(getattr(model, name).weight, torch.sparse.SparseSemiStructuredTensor)
    assert model.semi_structured_report.converted == ["big.weight"]
    xs = Mixed.inputs(dtype, "cuda")
    with torch.inference_mode():
        torch.testing.assert_close(model(*xs), ref(*xs), rtol=2e-2, atol=2e-2)


@pytest.mark.cuda
@cuda
def test_export_folds_an_srste_engine_and_large_layers_match():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 128)).cuda()
    eng = sparsediff.sparsify(student, None, method="srste", nm="2:4")
    x = torch.randn(64, 256, device="cuda")
    with torch.no_grad():
        ref = student.half()(x.half())
    to_semi_structured(student, eng)
    assert eng._hooks == [] and all(len(m._forward_pre_hooks) == 0 for m in student.modules())
    assert student.semi_structured_report.converted == ["0.weight", "2.weight"]
    with torch.inference_mode():
        torch.testing.assert_close(student(x.half()), ref, rtol=2e-2, atol=2e-2)
