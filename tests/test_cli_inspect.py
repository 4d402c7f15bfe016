"""``sparsediff inspect`` through the real entry point."""

from __future__ import annotations

import json

from sparsediff.cli import main


def test_inspect_json_reports_layers_and_totals(capsys):
    assert (
        main(["inspect", "--preset", "unet-tiny", "--sparsity", "0.8", "--distribution", "erk", "--json"])
        == 0
    )
    info = json.loads(capsys.readouterr().out)
    for key in ("params_total", "params_nonzero", "density", "flops_dense", "flops_sparse", "layers"):
        assert key in info
    layers = info["layers"]
    assert layers and {"name", "shape", "density", "nonzero", "flops_dense", "flops_sparse"} <= set(layers[0])
    target = sum(layer["numel"] for layer in layers)
    nonzero = sum(layer["nonzero"] for layer in layers)
    assert nonzero == round(0.2 * target)
    assert info["params_nonzero"] == info["params_total"] - target + nonzero
    assert info["flops_sparse"] < info["flops_dense"]
    assert info["flops_dense"] == info["flops_other"] + sum(layer["flops_dense"] for layer in layers)


def test_inspect_text_and_list(capsys):
    assert main(["inspect", "--preset", "unet-tiny", "--sparsity", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "unet.conv_in.weight" in out and "inference FLOPs" in out
    assert main(["inspect", "--list"]) == 0
    assert "ldm-celebahq" in capsys.readouterr().out


def test_inspect_bad_input_is_a_clear_error(capsys):
    assert main(["inspect", "--preset", "no-such-preset"]) == 2
    assert "unknown preset 'no-such-preset'" in capsys.readouterr().err
    assert main(["inspect", "--preset", "unet-tiny", "--sparsity", "1.2"]) == 2
    assert "sparsity must be in [0, 1), got 1.2" in capsys.readouterr().err
    assert main(["inspect", "--preset", "unet-tiny", "--exclude", "decoder.*"]) == 2
    assert "'decoder.*' matches no parameter" in capsys.readouterr().err
