"""DiT and ChiroDiff denoisers: shapes, initialisation, parameter counts from the layer sizes, padding,
the sparse engine's invariants on their weights, FLOP attribution, and their presets."""

from __future__ import annotations

import math
import subprocess

import pytest
import torch
from torch import nn

import sparsediff
from helpers import PYTHON, invariant_problems, python_env, state_tensors
from sparsediff.config import ModelSpec, load_config
from sparsediff.errors import ConfigError
from sparsediff.models import build_model, model_kinds
from sparsediff.models.chirodiff import TIME_EMBED_SEED, ChiroDiffGRU, ChiroDiffTransformer
from sparsediff.models.dit import DiT, DiTConfig, build_dit


def tiny_dit(**kw) -> DiT:
    args = {"input_size": 8, "patch_size": 2, "in_channels": 4, "hidden_size": 32, "depth": 2, "num_heads": 2}
    args.update(kw)
    return DiT(DiTConfig(**args))


def randomise_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Overwrite every parameter with noise (undoes the zero initialisation of adaLN and the output)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model


# ---------------------------------------------------------------------------- DiT


@pytest.mark.parametrize(
    "input_size, patch, channels, out_channels",
    [(8, 2, 4, None), (8, 4, 3, None), (16, 2, 1, None), (12, 3, 4, 2), ((8, 12), 2, 4, None)],
)
def test_dit_output_shape(input_size, patch, channels, out_channels):
    model = randomise_(
        tiny_dit(input_size=input_size, patch_size=patch, in_channels=channels, out_channels=out_channels)
    )
    h, w = (input_size, input_size) if isinstance(input_size, int) else input_size
    x = torch.randn(3, channels, h, w)
    out = model(x, torch.tensor([0, 10, 999]))
    assert out.shape == (3, out_channels or channels, h, w)
    assert out.abs().sum() > 0
    assert [tuple(a.shape) for a in model.example_inputs(2)] == [(2, channels, h, w), (2,)]


def test_dit_unpatchify_inverts_patch_layout():
    """Token (i, j) channel block (a, b, c) lands at pixel (i p + a, j p + b) of channel c."""
    model = tiny_dit(input_size=(4, 6), patch_size=2, in_channels=3)
    tokens = torch.arange(1 * 6 * 12, dtype=torch.float32).view(1, 6, 12)  # grid 2x3, p*p*C = 12
    img = model.unpatchify(tokens)
    for i in range(2):
        for j in range(3):
            for a in range(2):
                for b in range(2):
                    for c in range(3):
                        expected = tokens[0, i * 3 + j, (a * 2 + b) * 3 + c]
                        assert img[0, c, i * 2 + a, j * 2 + b] == expected


def test_dit_adaln_zero_initialisation():
    torch.manual_seed(0)
    model = tiny_dit(depth=3)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([3, 700])
    assert torch.equal(model(x, t), torch.zeros_like(x))
    h = torch.randn(2, 16, 32)
    c = model.t_embedder(t)
    assert c.abs().sum() > 0, "the conditioning itself is not zero"
    for block in model.blocks:
        assert torch.equal(block(h, c), h), "every block starts as the identity"
    # the checks above can fail: with non-zero modulation a block is no longer the identity
    nn.init.normal_(model.blocks[0].adaLN_modulation[-1].weight)
    assert not torch.allclose(model.blocks[0](h, c), h)


def test_dit_position_embedding_is_a_fixed_sincos_buffer():
    model = tiny_dit(input_size=(4, 6), hidden_size=16, num_heads=2)
    names = dict(model.named_parameters())
    assert "pos_embed" not in names and "pos_embed" in dict(model.named_buffers())
    pe = model.pos_embed[0]  # (T, D), tokens row-major over a 2x3 grid, D = 16 -> 4 frequencies
    assert pe.shape == (6, 16)
    for token in range(6):
        row, col = divmod(token, 3)
        for k in range(4):
            w = 10000 ** (-k / 4)
            assert pe[token, k] == pytest.approx(math.sin(row * w), abs=1e-6)
            assert pe[token, 4 + k] == pytest.approx(math.cos(row * w), abs=1e-6)
            assert pe[token, 8 + k] == pytest.approx(math.sin(col * w), abs=1e-6)
            assert pe[token, 12 + k] == pytest.approx(math.cos(col * w), abs=1e-6)


def dit_param_count(depth, d, patch, c_in, c_out, num_classes=0, freq=256, mlp_ratio=4):
    """Parameters of a DiT from its layer sizes (weights + biases)."""
    patch_embed = c_in * patch * patch * d + d
    t_embed = (freq * d + d) + (d * d + d)
    y_embed = (num_classes + 1) * d if num_classes else 0
    h = mlp_ratio * d
    block = (d * 3 * d + 3 * d) + (d * d + d) + (d * h + h) + (h * d + d) + (d * 6 * d + 6 * d)
    final = (d * 2 * d + 2 * d) + (d * patch * patch * c_out + patch * patch * c_out)
    return patch_embed + t_embed + y_embed + depth * block + final


@pytest.mark.parametrize("size, depth, hidden", [("DiT-S", 12, 384), ("DiT-B", 12, 768)])
def test_dit_parameter_count_from_layer_sizes(size, depth, hidden):
    with torch.device("meta"):
        model = build_dit(size, input_size=32, in_channels=4, patch_size=2)
    assert sum(p.numel() for p in model.parameters()) == dit_param_count(depth, hidden, 2, 4, 4)


@pytest.mark.parametrize("size, millions", [("DiT-S", 33), ("DiT-B", 130), ("DiT-XL", 675)])
def test_dit_class_conditional_sizes_match_the_dit_paper(size, millions):
    # the DiT paper's models: 1000 classes (+ null), learned sigma (8 output channels), 32x32x4 latents
    with torch.device("meta"):
        model = build_dit(size, input_size=32, in_channels=4, patch_size=2, num_classes=1000, out_channels=8)
    n = sum(p.numel() for p in model.parameters())
    cfg = model.config
    assert n == dit_param_count(cfg.depth, cfg.hidden_size, 2, 4, 8, num_classes=1000)
    assert round(n / 1e6) == millions


def test_dit_class_conditioning_changes_output():
    model = randomise_(tiny_dit(num_classes=5)).eval()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([5, 5])
    a = model(x, t, torch.tensor([0, 0]))
    b = model(x, t, torch.tensor([1, 1]))
    assert not torch.allclose(a, b)
    assert len(model.example_inputs(1)) == 3
    assert model(*model.example_inputs(2)).shape == (2, 4, 8, 8)


def test_dit_sparse_training_keeps_invariants():
    torch.manual_seed(0)
    model = tiny_dit()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    engine = sparsediff.sparsify(model, opt, method="rigl", sparsity=0.5, total_steps=10, update_every=2)
    linear_and_conv = {
        f"{name}.weight" for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))
    }
    assert set(engine.names) == linear_and_conv
    gen = torch.Generator().manual_seed(1)
    for _ in range(6):
        x, eps = torch.randn(4, 4, 8, 8, generator=gen), torch.randn(4, 4, 8, 8, generator=gen)
        loss = (model(x, torch.randint(0, 1000, (4,), generator=gen)) - eps).pow(2).mean()
        loss.backward()
        opt.step()
        engine.step()
        opt.zero_grad(set_to_none=True)
        assert engine.check_invariants() == []
        assert invariant_problems(engine, opt) == []
    assert engine.num_updates == 3


def test_dit_flops_charge_every_linear_and_the_patch_conv():
    model = tiny_dit(depth=2, hidden_size=32, num_heads=2)
    n, d, t_tokens, p, c = 2, 32, 16, 2, 4
    rep = sparsediff.count_flops(model, model.example_inputs(n))
    weights = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    by = {layer.name: layer.flops_dense for layer in rep.layers}
    assert set(by) == weights
    assert all(v > 0 for v in by.values())
    assert by["x_embedder.weight"] == 2 * (c * p * p) * d * n * t_tokens
    assert by["t_embedder.mlp.0.weight"] == 2 * 256 * d * n
    assert by["blocks.1.attn.qkv.weight"] == 2 * d * 3 * d * n * t_tokens
    assert by["blocks.0.mlp.fc2.weight"] == 2 * 4 * d * d * n * t_tokens
    assert by["blocks.0.adaLN_modulation.1.weight"] == 2 * d * 6 * d * n
    assert by["final_layer.linear.weight"] == 2 * d * p * p * c * n * t_tokens
    # QK^T and AV of every block, over all heads: 2 products x 2 FLOPs x N x T x T x D
    assert rep.other_flops == model.config.depth * 2 * 2 * n * t_tokens * t_tokens * d


def test_dit_bad_arguments_name_the_field():
    with pytest.raises(ConfigError, match="patch_size"):
        build_model(ModelSpec("dit", {"size": "DiT-XS", "input_size": 9, "patch_size": 2}))
    with pytest.raises(ConfigError, match="unknown DiT size 'DiT-Q'"):
        build_model(ModelSpec("dit", {"size": "DiT-Q"}))
    with pytest.raises(ConfigError, match="num_heads"):
        build_model(ModelSpec("dit", {"size": "DiT-XS", "num_heads": 5}))
    with pytest.raises(ConfigError, match="unknown DiT argument 'width'"):
        build_model(ModelSpec("dit", {"size": "DiT-XS", "width": 3}))


def test_dit_registry_overrides_size():
    model = build_model(
        ModelSpec("dit", {"size": "DiT-S", "input_size": 8, "in_channels": 4, "patch_size": 4, "depth": 1})
    )
    assert isinstance(model, DiT)
    assert (model.config.depth, model.config.hidden_size, model.config.num_heads) == (1, 384, 6)
    assert {"dit", "chirodiff-gru", "chirodiff-transformer"} <= set(model_kinds())


# ---------------------------------------------------------------------------- ChiroDiff


def gru_params(input_size: int, hidden: int, layers: int) -> int:
    """A bidirectional GRU: per layer and direction 3H(I + H) + 6H (two bias vectors of 3H)."""
    total = 0
    for layer in range(layers):
        i = input_size if layer == 0 else 2 * hidden
        total += 2 * (3 * hidden * (i + hidden) + 6 * hidden)
    return total


def test_chirodiff_gru_paper_scale_parameter_count():
    model = ChiroDiffGRU()  # hidden 96, 3 layers, 8-dim time embedding
    time_dim, hidden = 8, 96
    expected = (
        gru_params(5 + time_dim, hidden, 3)  # positions (2) + velocities (3) + time embedding
        + (2 * hidden * hidden + hidden)  # Linear(192 -> 96)
        + ((hidden + time_dim) * 3 + 3)  # Linear(96 + 8 -> 3)
    )
    assert sum(p.numel() for p in model.parameters()) == expected == 416_859
    assert round(expected / 1e4) == 42  # "about 0.42 M"
    assert model.gru.input_size == 13 and model.gru.bidirectional and model.gru.num_layers == 3
    assert [n for n, _ in model.named_buffers()] == ["time_embed.W"]


def padded_batch(seed: int = 0, lengths=(10, 4, 7), seq_len: int = 12):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lengths), seq_len, 3, generator=gen)
    return x, torch.tensor([5, 500, 990]), torch.tensor(lengths)


@pytest.mark.parametrize("cls", [ChiroDiffGRU, ChiroDiffTransformer])
def test_chirodiff_padding_never_influences_valid_outputs(cls):
    torch.manual_seed(0)
    model = cls().eval()
    x, t, lengths = padded_batch()
    valid = torch.arange(x.shape[1])[None, :] < lengths[:, None]  # (N, L)
    out = model(x, t, lengths)
    assert out.shape == x.shape
    assert torch.equal(out[~valid], torch.zeros_like(out[~valid])), "outputs at padding are exactly 0"
    x2 = x.clone()
    x2[~valid] = 100.0 * torch.randn(int((~valid).sum()), 3)
    torch.testing.assert_close(model(x2, t, lengths)[valid], out[valid], rtol=0, atol=1e-5)
    # the same check fails without lengths: the bidirectional body does read later points
    assert not torch.allclose(model(x2, t)[valid], model(x, t)[valid], atol=1e-3)
    # a sequence's output does not depend on the others in its batch (packing reorders them)
    torch.testing.assert_close(model(x[1:2, :4], t[1:2], lengths[1:2])[0], out[1, :4], rtol=1e-5, atol=1e-6)
    # full lengths == no lengths, and lengths are accepted positionally
    full = torch.full((3,), x.shape[1])
    torch.testing.assert_close(model(x, t, full), model(x, t), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", [ChiroDiffGRU, ChiroDiffTransformer])
def test_chirodiff_example_inputs_and_time_dependence(cls):
    model = cls()
    x, t, lengths = model.example_inputs(2)
    assert (x.shape, t.shape, lengths.shape) == ((2, 64, 3), (2,), (2,))
    assert model(*model.example_inputs(3)).shape == (3, 64, 3)
    x, _, lengths = padded_batch()
    a = model(x, torch.tensor([1, 1, 1]), lengths)
    b = model(x, torch.tensor([900, 900, 900]), lengths)
    assert not torch.allclose(a, b), "the time embedding reaches the output"


def test_chirodiff_bad_lengths_are_clear_errors():
    model = ChiroDiffGRU(hidden=8, layers=1)
    x, t, _ = padded_batch()
    with pytest.raises(ValueError, match=r"lengths must lie in \[1, 12\]"):
        model(x, t, torch.tensor([3, 0, 2]))
    with pytest.raises(ValueError, match=r"lengths must have shape \(3,\)"):
        model(x, t, torch.tensor([3, 2]))
    with pytest.raises(ConfigError, match="head_activation"):
        ChiroDiffGRU(head_activation="relu6")
    with pytest.raises(ConfigError, match="width 30 is not divisible by heads 4"):
        ChiroDiffTransformer(width=30)


def test_fourier_time_embedding_is_fixed_and_matches_formula():
    torch.manual_seed(1)
    a = ChiroDiffGRU(hidden=8, layers=1)
    torch.manual_seed(2)
    b = ChiroDiffTransformer(width=16, layers=1, heads=2)
    expected = torch.randn(4, 1, generator=torch.Generator().manual_seed(TIME_EMBED_SEED))
    assert torch.equal(a.time_embed.W, expected) and torch.equal(b.time_embed.W, expected)
    emb = a.time_embed(torch.tensor([250]))[0]
    arg = 2 * math.pi * 4 * expected[:, 0] * 0.25
    torch.testing.assert_close(emb, torch.cat([torch.sin(arg), torch.cos(arg)]))
    # the same in a fresh process, whatever that process's global seed
    code = (
        "import torch; torch.manual_seed(123); from sparsediff.models.chirodiff import ChiroDiffGRU; "
        "print(repr(ChiroDiffGRU(hidden=4, layers=1).time_embed.W.flatten().tolist()))"
    )
    out = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, env=python_env(), check=True)
    assert eval(out.stdout) == expected.flatten().tolist()


@pytest.mark.parametrize("method", ["rigl", "magran"])
def test_chirodiff_gru_sparse_training_invariants(method):
    torch.manual_seed(0)
    model = ChiroDiffGRU(hidden=16, layers=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-2)
    engine = sparsediff.sparsify(
        model, opt, method=method, sparsity=0.7, update_every=2, total_steps=16, prune_ratio=0.5
    )
    gru_weights = {n for n, _ in model.gru.named_parameters() if n.startswith("weight_")}
    assert {f"gru.{n}" for n in gru_weights} <= set(engine.names)
    assert len(gru_weights) == 8  # ih / hh x 2 layers x 2 directions
    gen = torch.Generator().manual_seed(3)
    new_total = 0
    for _ in range(12):
        x = torch.randn(6, 10, 3, generator=gen)
        lengths = torch.randint(2, 11, (6,), generator=gen)
        t = torch.randint(0, 1000, (6,), generator=gen)
        eps = torch.randn(6, 10, 3, generator=gen)
        mask = (torch.arange(10)[None] < lengths[:, None])[..., None]
        loss = ((model(x, t, lengths) - eps) ** 2 * mask).sum() / mask.sum()
        loss.backward()
        before = {n: m.clone() for n, m in engine.masks.items()}
        opt.step()
        changed = engine.step()
        opt.zero_grad(set_to_none=True)
        assert invariant_problems(engine, opt) == []  # masked weights and their AdamW state are 0
        for name, p in engine.named_parameters():
            assert int(engine.masks[name].sum()) == engine.budgets[name]
            if changed:
                grown = engine.masks[name] & ~before[name]
                new_total += int(grown.sum())
                assert torch.equal(p.detach()[grown], torch.zeros(int(grown.sum())))
                for s in state_tensors(opt, p):
                    assert torch.equal(s[grown], torch.zeros_like(s[grown]))
    assert engine.num_updates >= 5
    assert new_total > 0, "updates grew new connections"


def test_chirodiff_gru_flops_scale_with_packed_lengths():
    model = ChiroDiffGRU(hidden=16, layers=2)
    x, t, _ = model.example_inputs(3, seq_len=20)
    lengths = torch.tensor([20, 9, 3])
    rep = sparsediff.count_flops(model, (x, t, lengths))
    full = sparsediff.count_flops(model, (x, t, torch.full((3,), 20)))
    by = {layer.name: layer.flops_dense for layer in rep.layers}
    by_full = {layer.name: layer.flops_dense for layer in full.layers}
    hidden, steps = 16, int(lengths.sum())
    assert by["gru.weight_ih_l0"] == 2 * 3 * hidden * 13 * steps
    assert by["gru.weight_hh_l0_reverse"] == 2 * 3 * hidden * hidden * steps
    assert by["gru.weight_ih_l1"] == 2 * 3 * hidden * 2 * hidden * steps
    for name in by:
        if name.startswith("gru."):
            assert by[name] * 60 == by_full[name] * steps
    # the head runs on every padded position
    assert by["proj.weight"] == 2 * 2 * hidden * hidden * 60


def test_chirodiff_transformer_structure_and_flops():
    model = ChiroDiffTransformer()  # width 64, 4 layers, 4 heads
    assert len(model.blocks) == 4 and model.blocks[0].heads == 4
    x, t, lengths = model.example_inputs(2)
    rep = sparsediff.count_flops(model, (x, t, lengths))
    linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    by = {layer.name: layer.flops_dense for layer in rep.layers}
    assert set(by) == linears and all(v > 0 for v in by.values())
    assert by["blocks.0.qkv.weight"] == 2 * 64 * 192 * 2 * 64
    # attention scores and values (2 x 2 FLOPs x N x L x L x width per block) plus the tiny (N,1)x(1,4)
    # time projection are the only products that touch no weight
    attention = 4 * 2 * 2 * 2 * 64 * 64 * 64
    assert rep.other_flops == attention + 2 * 2 * 1 * 4
    learned = ChiroDiffTransformer(width=32, layers=1, heads=2, pos_encoding="learned", max_len=16)
    assert "pos_table.weight" not in {
        n for n, _ in sparsediff.sparsify(learned, None, method="static", sparsity=0.5).named_parameters()
    }
    assert learned(*learned.example_inputs(2, seq_len=16)).shape == (2, 16, 3)
    with pytest.raises(ValueError, match="max_len 16"):
        learned(*learned.example_inputs(1, seq_len=17))


# ---------------------------------------------------------------------------- presets

NEW_PRESETS = {
    "dit-s-latent64": ("dit", None),
    "dit-b-latent64": ("dit", None),
    "dit-xs-fmnist": ("dit", None),
    "chirodiff-kanjivg": ("chirodiff-gru", 416_859),
    "chirodiff-quickdraw": ("chirodiff-gru", 416_859),
    "chirodiff-vmnist": ("chirodiff-gru", 416_859),
    "chirodiff-kanjivg-cpu": ("chirodiff-gru", None),
}


@pytest.mark.parametrize("preset", sorted(NEW_PRESETS))
def test_new_presets_load_and_build(preset):
    kind, params = NEW_PRESETS[preset]
    cfg = load_config(preset)
    assert cfg.model.kind == kind
    with torch.device("meta"):
        model = build_model(cfg.model)
    n = sum(p.numel() for p in model.parameters())
    if params is not None:
        assert n == params
    if kind == "dit":
        c = model.config
        assert model.sample_shape == ((4, 8, 8) if preset == "dit-xs-fmnist" else (3, 64, 64))
        assert n == dit_param_count(c.depth, c.hidden_size, c.patch_size, c.in_channels, c.in_channels)
    else:
        assert cfg.family == "chirodiff"
        assert model.config.num_timesteps == cfg.diffusion.timesteps
        assert (cfg.diffusion.schedule, cfg.diffusion.beta_start, cfg.diffusion.beta_end) == (
            "linear",
            1e-4,
            2e-2,
        )
        assert cfg.sample.sampler == "ddpm" and cfg.sample.variance_scale == 0.75
        assert cfg.data.args["representation"] == "velocity"


def test_preset_inheritance():
    kanji, quick, vmnist = (
        load_config(p) for p in ("chirodiff-kanjivg", "chirodiff-quickdraw", "chirodiff-vmnist")
    )
    assert (kanji.data.name, quick.data.name, vmnist.data.name) == ("kanjivg", "quickdraw", "vmnist")
    assert (
        quick.data.args
        == kanji.data.args
        == {
            "representation": "velocity",
            "resample": 0.05,
            "max_len": 300,
            "max_strokes": 25,
        }
    )
    assert (quick.train.batch_size, quick.train.lr, quick.train.epochs) == (128, 1e-3, 600)
    cpu = load_config("chirodiff-kanjivg-cpu")
    assert cpu.train.epochs is None and cpu.train.max_steps is not None
    dit_s, dit_xs = load_config("dit-s-latent64"), load_config("dit-xs-fmnist")
    celeba, fmnist = load_config("ldm-celebahq"), load_config("ldm-fmnist")
    assert dit_s.data == celeba.data and dit_s.first_stage == celeba.first_stage
    assert dit_xs.data == fmnist.data and dit_xs.diffusion == fmnist.diffusion
    assert load_config("dit-b-latent64").model.args["size"] == "DiT-B"
