"""DiT: a diffusion transformer over patches of latents (Peebles & Xie, 2023), epsilon prediction only.

Latents (N, C, H, W) are cut into p x p patches by a strided convolution, given a fixed 2-D sin-cos
position embedding, and run through ``depth`` transformer blocks conditioned on the timestep (and an
optional class label) through **adaLN-Zero**: each block regresses shift / scale / gate vectors for its
attention and MLP branches from the conditioning vector, and the regressing ``Linear`` starts at zero, so
every block starts as the identity and the whole network starts by predicting zero. A final adaLN layer
and a linear map every token back to a p x p x C patch.

Every weight matrix is a plain ``nn.Linear`` or ``nn.Conv2d`` (attention included: separate ``qkv`` and
``proj`` linears around ``scaled_dot_product_attention``), so the sparse engine and the FLOP counter see
all of them. Named sizes follow the DiT paper (``DiT-S``, ``DiT-B``, ``DiT-L``, ``DiT-XL``) plus a
CPU-scale ``DiT-XS``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

# ---------------------------------------------------------------------------- sizes

#: Named sizes: depth (blocks), hidden size (token width), attention heads.
DIT_SIZES: dict[str, dict[str, int]] = {
    "DiT-XS": {"depth": 6, "hidden_size": 192, "num_heads": 3},  # CPU scale (not in the DiT paper)
    "DiT-S": {"depth": 12, "hidden_size": 384, "num_heads": 6},
    "DiT-B": {"depth": 12, "hidden_size": 768, "num_heads": 12},
    "DiT-L": {"depth": 24, "hidden_size": 1024, "num_heads": 16},
    "DiT-XL": {"depth": 28, "hidden_size": 1152, "num_heads": 16},
}


@dataclass
class DiTConfig:
    """Architecture of a :class:`DiT`.

    Attributes:
        input_size: latent height and width (an int for square latents, or ``(H, W)``).
        patch_size: side of the square patches; must divide both sides of ``input_size``.
        in_channels: latent channels C.
        out_channels: predicted channels (``None``: same as ``in_channels``; epsilon prediction).
        hidden_size: token width D; a multiple of 4 (the 2-D sin-cos embedding) and of ``num_heads``.
        depth: number of DiT blocks.
        num_heads: attention heads per block.
        mlp_ratio: MLP hidden width as a multiple of D.
        num_classes: class-conditional when > 0 (one extra "null" class is added for guidance);
            0 is unconditional, the default.
        class_dropout_prob: probability of replacing a label by the null class in training.
        frequency_embedding_size: width of the sinusoidal timestep features fed to the timestep MLP.
    """

    input_size: int | tuple[int, int] = 32
    patch_size: int = 2
    in_channels: int = 4
    out_channels: int | None = None
    hidden_size: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    num_classes: int = 0
    class_dropout_prob: float = 0.1
    frequency_embedding_size: int = 256

    @property
    def grid(self) -> tuple[int, int]:
        """Tokens along height and width."""
        h, w = _pair(self.input_size)
        return h // self.patch_size, w // self.patch_size

    @property
    def channels_out(self) -> int:
        return self.in_channels if self.out_channels is None else self.out_channels

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first impossible field."""
        for name in ("patch_size", "in_channels", "hidden_size", "depth", "num_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"DiT {name} must be a positive whole number, got {value!r}")
        if self.out_channels is not None and self.out_channels < 1:
            raise ConfigError(f"DiT out_channels must be positive, got {self.out_channels!r}")
        for side in _pair(self.input_size):
            if side < 1 or side % self.patch_size:
                raise ConfigError(
                    f"DiT input_size {self.input_size!r} is not divisible by patch_size {self.patch_size}"
                )
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"DiT hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        if self.hidden_size % 4:
            # the 2-D sin-cos embedding gives D/4 frequencies to each of sin/cos x height/width
            raise ConfigError(f"DiT hidden_size must be a multiple of 4, got {self.hidden_size}")
        if self.mlp_ratio <= 0:
            raise ConfigError(f"DiT mlp_ratio must be positive, got {self.mlp_ratio!r}")
        if self.num_classes < 0:
            raise ConfigError(f"DiT num_classes must be >= 0, got {self.num_classes!r}")
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise ConfigError(f"DiT class_dropout_prob must be in [0, 1), got {self.class_dropout_prob!r}")
        if self.frequency_embedding_size < 2 or self.frequency_embedding_size % 2:
            raise ConfigError(
                f"DiT frequency_embedding_size must be an even number >= 2, got {self.frequency_embedding_size!r}"
            )


def _pair(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(size, int) and not isinstance(size, bool):
        return size, size
    if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(s, int) for s in size):
        return int(size[0]), int(size[1])
    raise ConfigError(f"DiT input_size must be an int or a pair of ints, got {size!r}")


# ---------------------------------------------------------------------------- embeddings


def sincos_pos_embed_2d(hidden_size: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding, shape (grid_h * grid_w, hidden_size), row-major tokens.

    Half of the channels encode the row, half the column; each half is ``[sin(pos * w), cos(pos * w)]``
    with ``w_k = 10000^(-k / (D/4))``. Computed in float64 so that it is identical wherever it is built.
    """
    quarter = hidden_size // 4
    cpu = torch.device("cpu")  # whatever the default device (meta included): exact values, computed once
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64, device=cpu) / quarter)  # (D/4,)

    def encode(pos: torch.Tensor) -> torch.Tensor:  # (T,) -> (T, D/2)
        angles = pos[:, None] * omega[None, :]
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)

    rows, cols = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float64, device=cpu),
        torch.arange(grid_w, dtype=torch.float64, device=cpu),
        indexing="ij",
    )
    emb = torch.cat([encode(rows.reshape(-1)), encode(cols.reshape(-1))], dim=1)  # (T, D)
    return emb.float()


def timestep_frequencies(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of (possibly fractional) timesteps: (N,) -> (N, dim), ``[cos, sin]``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None, :]  # (N, dim/2)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, dim)


class TimestepEmbedder(nn.Module):
    """Integer timesteps (N,) -> vectors (N, D): sinusoidal features, then a two-layer SiLU MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = timestep_frequencies(t, self.frequency_embedding_size)  # (N, F)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))  # (N, D)


class LabelEmbedder(nn.Module):
    """Class labels (N,) -> vectors (N, D), with label dropout to a null class for guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        # index num_classes is the "null" label; an Embedding table is a lookup, so the engine leaves it dense
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, y: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        device = self.embedding_table.weight.device
        if y is None:
            y = torch.full((batch_size,), self.num_classes, dtype=torch.long, device=device)
        elif self.training and self.dropout_prob > 0:
            drop = torch.rand(y.shape, device=y.device) < self.dropout_prob
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        return self.embedding_table(y)  # (N, D)


# ---------------------------------------------------------------------------- blocks


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: ``x * (1 + scale) + shift`` with per-sample (N, D) shift and scale over tokens (N, T, D)."""
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


class Attention(nn.Module):
    """Multi-head self-attention with explicit ``nn.Linear`` projections around SDPA."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        n, t, d = x.shape
        qkv = self.qkv(x).view(n, t, 3, self.num_heads, d // self.num_heads)  # (N, T, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (N, H, T, Dh)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (N, H, T, Dh)
        return self.proj(out.transpose(1, 2).reshape(n, t, d))  # (N, T, D)


class Mlp(nn.Module):
    """Two linears with a tanh-approximated GELU between them."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN-Zero conditioning on c (N, D)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        # no affine parameters: scale and shift come from the conditioning
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(
            6, dim=1
        )
        x = x + gate_msa[:, None, :] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))  # (N, T, D)
        x = x + gate_mlp[:, None, :] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (N, T, D)
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated norm and a linear from tokens to patches of p * p * C_out values."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (N, T, p*p*C)


# ---------------------------------------------------------------------------- model


class DiT(nn.Module):
    """Diffusion transformer denoiser: ``forward(x_t, t, y=None) -> eps`` with x_t (N, C, H, W).

    Build it from a :class:`DiTConfig`, or by name with :func:`build_dit` (``build_dit("DiT-S",
    input_size=32, in_channels=4, patch_size=2)``).
    """

    def __init__(self, config: DiTConfig):
        super().__init__()
        config.validate()
        self.config = config
        d, p = config.hidden_size, config.patch_size
        self.x_embedder = nn.Conv2d(config.in_channels, d, kernel_size=p, stride=p)
        self.t_embedder = TimestepEmbedder(d, config.frequency_embedding_size)
        self.y_embedder = (
            LabelEmbedder(config.num_classes, d, config.class_dropout_prob)
            if config.num_classes > 0
            else None
        )
        gh, gw = config.grid
        # fixed, so a buffer: the engine never sees it and it is not trained; rebuilt from the config,
        # so it is not saved in state dicts
        pos_embed = sincos_pos_embed_2d(d, gh, gw)[None].to(self.x_embedder.weight.device)  # (1, T, D)
        self.register_buffer("pos_embed", pos_embed, persistent=False)
        self.blocks = nn.ModuleList(
            DiTBlock(d, config.num_heads, config.mlp_ratio) for _ in range(config.depth)
        )
        self.final_layer = FinalLayer(d, p, config.channels_out)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """DiT's initialisation: Xavier linears, zero biases, and zero adaLN / output layers."""
        if self.x_embedder.weight.is_meta:
            return  # shapes only (``with torch.device("meta")``): no values to set, and normal_ on meta is slow
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        # the patch conv is initialised like a linear over its flattened (C * p * p) inputs
        w = self.x_embedder.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        for layer in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        # adaLN-Zero: all gates (and shifts/scales) start at 0, so each block is the identity at first
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one input latent."""
        h, w = _pair(self.config.input_size)
        return (self.config.in_channels, h, w)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens of patches (N, T, p*p*C) -> images (N, C, H, W)."""
        p, c = self.config.patch_size, self.config.channels_out
        gh, gw = self.config.grid
        x = x.reshape(x.shape[0], gh, gw, p, p, c)  # (N, gh, gw, p, p, C)
        x = torch.einsum("nhwpqc->nchpwq", x)  # (N, C, gh, p, gw, q)
        return x.reshape(x.shape[0], c, gh * p, gw * p)  # (N, C, H, W)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Predict the noise in ``x`` (N, C, H, W) at integer timesteps ``t`` (N,); ``y`` (N,) labels."""
        if tuple(x.shape[1:]) != self.sample_shape:
            raise ValueError(
                f"DiT expects inputs of shape (N, {', '.join(map(str, self.sample_shape))}), got {tuple(x.shape)}"
            )
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        h = self.x_embedder(x).flatten(2).transpose(1, 2)  # (N, T, D)
        h = h + self.pos_embed.to(h.dtype)  # (N, T, D)
        c = self.t_embedder(t)  # (N, D)
        if self.y_embedder is not None:
            c = c + self.y_embedder(y, x.shape[0])  # (N, D)
        for block in self.blocks:
            h = block(h, c)  # (N, T, D)
        h = self.final_layer(h, c)  # (N, T, p*p*C_out)
        return self.unpatchify(h)  # (N, C_out, H, W)

    def example_inputs(self, batch_size: int = 1) -> tuple[torch.Tensor, ...]:
        """Inputs of one forward pass for FLOP counting, on the model's device and dtype."""
        p = next(self.parameters())
        x = torch.zeros(batch_size, *self.sample_shape, device=p.device, dtype=p.dtype)
        t = torch.full((batch_size,), 500, device=p.device, dtype=torch.long)
        if self.y_embedder is None:
            return x, t
        return x, t, torch.zeros(batch_size, device=p.device, dtype=torch.long)


def build_dit(size: str | None = "DiT-S", **overrides: Any) -> DiT:
    """Build a DiT by size name; explicit ``depth`` / ``hidden_size`` / ``num_heads`` override the size.

    Args:
        size: one of :data:`DIT_SIZES` (``DiT-XS``, ``DiT-S``, ``DiT-B``, ``DiT-L``, ``DiT-XL``), or ``None``
            to take every dimension from ``overrides``.
        **overrides: any :class:`DiTConfig` field (``input_size``, ``in_channels``, ``patch_size``...).

    Raises:
        ConfigError: unknown size name or field, or an impossible combination.
    """
    fields = DiTConfig.__dataclass_fields__
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ConfigError(f"unknown DiT argument {unknown[0]!r} (known: size, {', '.join(fields)})")
    if size is None:
        config = DiTConfig()
    elif size in DIT_SIZES:
        config = DiTConfig(**DIT_SIZES[size])
    else:
        raise ConfigError(f"unknown DiT size {size!r}; choose one of {', '.join(DIT_SIZES)}")
    if isinstance(overrides.get("input_size"), list):
        overrides["input_size"] = tuple(overrides["input_size"])
    return DiT(replace(config, **overrides))
