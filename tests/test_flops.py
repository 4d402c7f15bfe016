"""Sparse-aware FLOP counting against hand computations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sparsediff
from helpers import tiny_unet
from sparsediff.sparse import count_flops, training_flops_per_step, training_flops_total


def test_linear_and_conv_flops_and_density_scaling():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))
    x = torch.randn(2, 3, 6, 6)
    eng = sparsediff.sparsify(model, None, method="static", sparsity=0.5, distribution="uniform")
    rep = count_flops(model, (x,), eng)
    conv, fc = rep.layers
    assert conv.flops_dense == 2 * (3 * 3 * 3) * (2 * 8 * 6 * 6)
    assert fc.flops_dense == 2 * 288 * 5 * 2
    for layer in rep.layers:
        expected_density = eng.budgets[layer.name] / torch.Size(layer.shape).numel()
        assert layer.density == pytest.approx(expected_density)
        assert layer.flops_sparse == round(expected_density * layer.flops_dense)
    assert rep.other_flops == 0
    assert rep.flops_dense == conv.flops_dense + fc.flops_dense
    # measured from the zeroed weights gives the same densities
    measured = count_flops(model, (x,), None)
    assert [layer.density for layer in measured.layers] == pytest.approx(
        [layer.density for layer in rep.layers]
    )


def test_gru_flops_per_time_step_and_direction():
    gru = nn.GRU(5, 16, num_layers=2, bidirectional=True, batch_first=True)
    B, T = 3, 7
    rep = count_flops(gru, (torch.randn(B, T, 5),), None)
    by = {layer.name: layer.flops_dense for layer in rep.layers}
    assert by["weight_ih_l0"] == 2 * 48 * 5 * B * T
    assert by["weight_hh_l0"] == 2 * 48 * 16 * B * T
    assert by["weight_ih_l1_reverse"] == 2 * 48 * 32 * B * T
    # packed sequences only pay for the real time steps
    lengths = [7, 4, 2]
    packed = nn.utils.rnn.pack_padded_sequence(torch.randn(B, T, 5), lengths, batch_first=True)
    rep = count_flops(gru, (packed,), None)
    by = {layer.name: layer.flops_dense for layer in rep.layers}
    assert by["weight_ih_l0"] == 2 * 48 * 5 * sum(lengths)


def test_attention_matmuls_stay_dense():
    mha = nn.MultiheadAttention(16, 4, batch_first=True)
    x = torch.randn(2, 10, 16)
    eng = sparsediff.sparsify(mha, None, method="static", sparsity=0.75, distribution="uniform")
    rep = count_flops(mha, (x, x, x), eng)
    names = {layer.name for layer in rep.layers}
    assert names == {"in_proj_weight", "out_proj.weight"}
    by = {layer.name: layer for layer in rep.layers}
    assert by["in_proj_weight"].flops_dense == 2 * 16 * 48 * 20
    # scores QK^T and AV: 2 * (B*H) * L * L * d each, with d = 4
    assert rep.other_flops == 2 * 2 * (2 * 4) * 10 * 10 * 4
    assert rep.flops_sparse == rep.other_flops + sum(layer.flops_sparse for layer in rep.layers)


def test_unet_attention_counted_dense():
    unet = tiny_unet()
    eng = sparsediff.sparsify(unet, None, method="static", sparsity=0.9)
    rep = count_flops(unet, (torch.randn(1, 4, 8, 8), torch.tensor([3])), eng)
    assert all(layer.flops_dense > 0 for layer in rep.layers), "every sparsified weight is used"
    assert rep.other_flops > 0  # attention scores
    assert rep.flops_sparse < 0.2 * rep.flops_dense


def test_training_flops_rules():
    fd, fs = 100.0, 10.0
    assert training_flops_per_step("dense", fd, fs) == 300
    assert training_flops_per_step("static", fd, fs) == 30
    assert training_flops_per_step("magran", fd, fs) == 30
    assert training_flops_per_step("rigl", fd, fs, update_every=100) == pytest.approx(
        (3 * 10 * 100 + 20 + 100) / 101
    )
    total = training_flops_total("rigl", fd, fs, total_steps=1000, update_every=100, end_step=750)
    assert total == pytest.approx(750 * (3020 + 100) / 101 + 250 * 30)
