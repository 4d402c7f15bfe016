"""ChiroDiff denoisers (Das et al., ICLR 2023) for pen-point sequences, as used by the sparse-to-sparse paper.

A drawing is a padded sequence ``x`` (N, L, 3) of points in velocity form ``(dx, dy, pen)`` with
``lengths`` (N,) valid points per sequence. Per point the denoiser sees

- positions (2): the running sum of ``(dx, dy)`` of the *noisy* sequence over its valid points,
- velocities (3): the noisy sequence itself,
- a time embedding (8): random Fourier features of ``t / T`` with a fixed, seeded projection,

and predicts the noise ``eps`` (N, L, 3), zero at padded positions. Two bodies:

- :class:`ChiroDiffGRU`, the paper's: a bidirectional GRU (3 layers, hidden 96) over the *packed*
  sequence, ``Linear(2H -> H)``, the time embedding concatenated again, ``Linear(H + 8 -> 3)``
  (about 0.42 M parameters);
- :class:`ChiroDiffTransformer`: a pre-norm transformer encoder (4 layers, width 64, 4 heads) built from
  explicit ``nn.Linear`` projections and ``scaled_dot_product_attention`` with a key-padding mask.

Every weight matrix is an ``nn.Linear`` or ``nn.GRU`` parameter, so the sparse engine makes all of them
sparse and the FLOP counter charges them; a packed GRU only pays for the valid time steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ..errors import ConfigError

POINT_DIM = 3  # (dx, dy, pen)
FEATURE_DIM = 5  # positions (2) + velocities (3)
TIME_EMBED_SEED = 4242  # fixed: every process (and every run) draws the same Fourier projection


# ---------------------------------------------------------------------------- shared pieces


class FourierTimeEmbedding(nn.Module):
    """Random Fourier features of the normalised step: (N,) integer steps -> (N, dim).

    ``W ~ N(0, 1)`` of shape (dim/2, 1) is drawn once from a generator seeded with ``seed`` and kept as a
    buffer (saved with the model); the features are ``[sin(2 pi s W t), cos(2 pi s W t)]`` with
    ``t = step / num_timesteps`` and ``s = scale`` (4 in ChiroDiff).
    """

    def __init__(
        self, dim: int = 8, num_timesteps: int = 1000, scale: float = 4.0, seed: int = TIME_EMBED_SEED
    ):
        super().__init__()
        if dim < 2 or dim % 2:
            raise ConfigError(f"ChiroDiff time_dim must be an even number >= 2, got {dim!r}")
        if num_timesteps < 1:
            raise ConfigError(f"ChiroDiff num_timesteps must be positive, got {num_timesteps!r}")
        self.num_timesteps = num_timesteps
        self.scale = scale
        # drawn on the CPU in float32 whatever the default device/dtype, so it is bit-identical everywhere,
        # then placed where the weights are being created (the default device, e.g. under `with torch.device`)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        w = torch.randn(dim // 2, 1, generator=gen, dtype=torch.float32, device="cpu")
        self.register_buffer("W", w.to(torch.empty(0).device))

    def forward(self, steps: torch.Tensor) -> torch.Tensor:
        t = steps.to(torch.float32)[:, None] / self.num_timesteps  # (N, 1) in [0, 1)
        proj = 2 * math.pi * self.scale * t @ self.W.float().T  # (N, dim/2)
        return torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)  # (N, dim)


def valid_mask(lengths: torch.Tensor | None, n: int, seq_len: int, device: torch.device) -> torch.Tensor:
    """(N, L) bool, True at the first ``lengths[i]`` points of each sequence (all True without lengths)."""
    if lengths is None:
        return torch.ones(n, seq_len, dtype=torch.bool, device=device)
    return torch.arange(seq_len, device=device)[None, :] < lengths.to(device)[:, None]


def _check_lengths(lengths: torch.Tensor | None, n: int, seq_len: int) -> torch.Tensor | None:
    if lengths is None:
        return None
    lengths = torch.as_tensor(lengths)
    if lengths.shape != (n,):
        raise ValueError(f"lengths must have shape ({n},) to match x, got {tuple(lengths.shape)}")
    lo, hi = int(lengths.min()), int(lengths.max())
    if lo < 1 or hi > seq_len:
        raise ValueError(
            f"lengths must lie in [1, {seq_len}] (the padded length), got values in [{lo}, {hi}]"
        )
    return lengths


def point_features(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-point input features (N, L, 5): positions (cumulative dx, dy over valid points) + velocities.

    Padding is zeroed before the running sum; a prefix sum never reads later points anyway, so valid
    points are unaffected by whatever the padding holds.
    """
    m = mask[..., None].to(x.dtype)  # (N, L, 1)
    vel = x * m  # (N, L, 3)
    pos = torch.cumsum(vel[..., :2], dim=1)  # (N, L, 2)
    return torch.cat([pos, vel], dim=-1)  # (N, L, 5)


class _SequenceDenoiser(nn.Module):
    """Input checks, features and output masking shared by both ChiroDiff bodies."""

    time_embed: FourierTimeEmbedding

    def _prepare(
        self, x: torch.Tensor, t: torch.Tensor, lengths: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if x.dim() != 3 or x.shape[-1] != POINT_DIM:
            raise ValueError(f"ChiroDiff expects x of shape (N, L, 3), got {tuple(x.shape)}")
        n, seq_len, _ = x.shape
        if t.dim() == 0:
            t = t.expand(n)
        lengths = _check_lengths(lengths, n, seq_len)
        mask = valid_mask(lengths, n, seq_len, x.device)  # (N, L)
        temb = self.time_embed(t).to(x.dtype)  # (N, E)
        feats = point_features(x, mask)  # (N, L, 5)
        feats = torch.cat([feats, temb[:, None, :].expand(n, seq_len, -1)], dim=-1)  # (N, L, 5 + E)
        return feats, temb, mask, lengths

    def example_inputs(self, batch_size: int = 1, seq_len: int = 64) -> tuple[torch.Tensor, ...]:
        """(x (B, seq_len, 3), t (B,), lengths (B,)) for FLOP counting, on the model's device and dtype."""
        p = next(self.parameters())
        x = torch.zeros(batch_size, seq_len, POINT_DIM, device=p.device, dtype=p.dtype)
        t = torch.full((batch_size,), 500, device=p.device, dtype=torch.long)
        lengths = torch.full((batch_size,), seq_len, dtype=torch.long, device=p.device)
        return x, t, lengths


# ---------------------------------------------------------------------------- GRU


@dataclass
class ChiroDiffGRUConfig:
    """Architecture of :class:`ChiroDiffGRU` (paper scale by default).

    Attributes:
        hidden: GRU hidden size per direction (96).
        layers: stacked bidirectional GRU layers (3).
        time_dim: width of the Fourier time embedding (8).
        num_timesteps: the diffusion's T; steps are divided by it (must match ``diffusion.timesteps``).
        fourier_scale: the factor s in ``sin(2 pi s W t)`` (4).
        head_activation: non-linearity after ``Linear(2H -> H)``: ``none`` (the paper's description,
            **assumed**), ``silu`` or ``gelu``.
        time_seed: seed of the generator that draws the Fourier projection W.
    """

    hidden: int = 96
    layers: int = 3
    time_dim: int = 8
    num_timesteps: int = 1000
    fourier_scale: float = 4.0
    head_activation: str = "none"
    time_seed: int = TIME_EMBED_SEED


_ACTIVATIONS = {"none": nn.Identity, "silu": nn.SiLU, "gelu": nn.GELU}


def _activation(name: str) -> nn.Module:
    if name not in _ACTIVATIONS:
        raise ConfigError(f"ChiroDiff head_activation must be one of {', '.join(_ACTIVATIONS)}, got {name!r}")
    return _ACTIVATIONS[name]()


class ChiroDiffGRU(_SequenceDenoiser):
    """ChiroDiff's bidirectional-GRU denoiser: ``forward(x_t, t, lengths=None) -> eps`` (N, L, 3).

    Args:
        hidden: GRU hidden size per direction.
        layers: number of stacked bidirectional GRU layers.
        time_dim: width of the Fourier time embedding.
        num_timesteps: diffusion steps T (the time embedding sees ``t / T``).
        fourier_scale: s in ``sin(2 pi s W t)``.
        head_activation: ``none`` | ``silu`` | ``gelu`` between the two head linears.
        time_seed: seed of the Fourier projection.
    """

    def __init__(
        self,
        hidden: int = 96,
        layers: int = 3,
        time_dim: int = 8,
        num_timesteps: int = 1000,
        fourier_scale: float = 4.0,
        head_activation: str = "none",
        time_seed: int = TIME_EMBED_SEED,
    ):
        super().__init__()
        for name, value in (("hidden", hidden), ("layers", layers)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"ChiroDiff {name} must be a positive whole number, got {value!r}")
        self.config = ChiroDiffGRUConfig(
            hidden, layers, time_dim, num_timesteps, fourier_scale, head_activation, time_seed
        )
        self.time_embed = FourierTimeEmbedding(time_dim, num_timesteps, fourier_scale, time_seed)
        self.gru = nn.GRU(
            FEATURE_DIM + time_dim, hidden, num_layers=layers, batch_first=True, bidirectional=True
        )
        self.proj = nn.Linear(2 * hidden, hidden)
        self.act = _activation(head_activation)
        self.out = nn.Linear(hidden + time_dim, POINT_DIM)

    def forward(self, x: torch.Tensor, t: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Predict the noise of ``x`` (N, L, 3) at integer steps ``t`` (N,); ``lengths`` (N,) valid points."""
        feats, temb, mask, lengths = self._prepare(x, t, lengths)  # (N, L, 5+E), (N, E), (N, L)
        n, seq_len, _ = x.shape
        if lengths is None:
            h, _ = self.gru(feats)  # (N, L, 2H)
        else:
            # packed: padding is never read (so it cannot leak into valid outputs) and costs nothing
            packed = pack_padded_sequence(feats, lengths.cpu(), batch_first=True, enforce_sorted=False)
            h, _ = self.gru(packed)
            h, _ = pad_packed_sequence(h, batch_first=True, total_length=seq_len)  # (N, L, 2H)
        h = self.act(self.proj(h))  # (N, L, H)
        h = torch.cat([h, temb[:, None, :].expand(n, seq_len, -1)], dim=-1)  # (N, L, H + E)
        eps = self.out(h)  # (N, L, 3)
        return eps * mask[..., None].to(eps.dtype)  # zero at padding


# ---------------------------------------------------------------------------- transformer


@dataclass
class ChiroDiffTransformerConfig:
    """Architecture of :class:`ChiroDiffTransformer`.

    Attributes:
        width: token width (64).
        layers: encoder blocks (4).
        heads: attention heads (4).
        ffn_dim: feed-forward hidden width (``None``: 4 x width, **assumed**).
        time_dim, num_timesteps, fourier_scale, time_seed: as for :class:`ChiroDiffGRUConfig`.
        pos_encoding: ``sinusoidal`` (fixed, any length) or ``learned`` (an embedding table of ``max_len``).
        max_len: longest sequence a learned positional table covers.
        dropout: dropout on attention outputs and feed-forward outputs during training.
    """

    width: int = 64
    layers: int = 4
    heads: int = 4
    ffn_dim: int | None = None
    time_dim: int = 8
    num_timesteps: int = 1000
    fourier_scale: float = 4.0
    pos_encoding: str = "sinusoidal"
    max_len: int = 512
    dropout: float = 0.0
    time_seed: int = TIME_EMBED_SEED


def sinusoidal_positions(seq_len: int, dim: int, device: torch.device | None = None) -> torch.Tensor:
    """Transformer sin/cos positional encoding (L, dim); dim even."""
    pos = torch.arange(seq_len, dtype=torch.float32, device=device)[:, None]  # (L, 1)
    freqs = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim)
    pe = torch.zeros(seq_len, dim, device=device)
    pe[:, 0::2] = torch.sin(pos * freqs)
    pe[:, 1::2] = torch.cos(pos * freqs)
    return pe


class EncoderBlock(nn.Module):
    """Pre-norm encoder block: SDPA self-attention with a key-padding mask, then a GELU feed-forward."""

    def __init__(self, width: int, heads: int, ffn_dim: int, dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.attn_out = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.ff1 = nn.Linear(width, ffn_dim)
        self.ff2 = nn.Linear(ffn_dim, width)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        n, seq_len, d = x.shape
        qkv = self.qkv(self.norm1(x)).view(n, seq_len, 3, self.heads, d // self.heads)  # (N, L, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (N, H, L, Dh)
        drop = self.dropout if self.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=drop)  # (N, H, L, Dh)
        x = x + F.dropout(self.attn_out(a.transpose(1, 2).reshape(n, seq_len, d)), drop, self.training)
        x = x + F.dropout(self.ff2(F.gelu(self.ff1(self.norm2(x)))), drop, self.training)  # (N, L, D)
        return x


class ChiroDiffTransformer(_SequenceDenoiser):
    """Transformer-encoder variant of the ChiroDiff denoiser: ``forward(x_t, t, lengths=None) -> eps``.

    Same per-point inputs as :class:`ChiroDiffGRU` (positions + velocities + time embedding), a
    ``Linear(5 + E -> width)`` input projection plus positional encoding, ``layers`` pre-norm encoder
    blocks that never attend to padding, a final LayerNorm and ``Linear(width -> 3)``.
    """

    def __init__(
        self,
        width: int = 64,
        layers: int = 4,
        heads: int = 4,
        ffn_dim: int | None = None,
        time_dim: int = 8,
        num_timesteps: int = 1000,
        fourier_scale: float = 4.0,
        pos_encoding: str = "sinusoidal",
        max_len: int = 512,
        dropout: float = 0.0,
        time_seed: int = TIME_EMBED_SEED,
    ):
        super().__init__()
        for name, value in (("width", width), ("layers", layers), ("heads", heads), ("max_len", max_len)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(
                    f"ChiroDiff transformer {name} must be a positive whole number, got {value!r}"
                )
        if width % heads:
            raise ConfigError(f"ChiroDiff transformer width {width} is not divisible by heads {heads}")
        if width % 2:
            raise ConfigError(f"ChiroDiff transformer width must be even, got {width}")
        if pos_encoding not in ("sinusoidal", "learned"):
            raise ConfigError(
                f"ChiroDiff pos_encoding must be 'sinusoidal' or 'learned', got {pos_encoding!r}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"ChiroDiff transformer dropout must be in [0, 1), got {dropout!r}")
        ffn = 4 * width if ffn_dim is None else ffn_dim
        self.config = ChiroDiffTransformerConfig(
            width, layers, heads, ffn_dim, time_dim, num_timesteps, fourier_scale, pos_encoding, max_len, dropout,
            time_seed,
        )  # fmt: skip
        self.time_embed = FourierTimeEmbedding(time_dim, num_timesteps, fourier_scale, time_seed)
        self.inp = nn.Linear(FEATURE_DIM + time_dim, width)
        # an Embedding table (a lookup) rather than a 2-D Parameter, so the engine leaves it dense
        self.pos_table = nn.Embedding(max_len, width) if pos_encoding == "learned" else None
        self.blocks = nn.ModuleList(EncoderBlock(width, heads, ffn, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, POINT_DIM)

    def forward(self, x: torch.Tensor, t: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Predict the noise of ``x`` (N, L, 3) at integer steps ``t`` (N,); ``lengths`` (N,) valid points."""
        feats, _, mask, lengths = self._prepare(x, t, lengths)  # (N, L, 5+E), _, (N, L)
        seq_len = x.shape[1]
        h = self.inp(feats)  # (N, L, D)
        if self.pos_table is not None:
            if seq_len > self.config.max_len:
                raise ValueError(
                    f"sequence length {seq_len} exceeds the learned positional table (max_len {self.config.max_len})"
                )
            h = h + self.pos_table.weight[:seq_len][None]
        else:
            h = h + sinusoidal_positions(seq_len, self.config.width, h.device).to(h.dtype)[None]
        # key-padding mask, broadcast over heads and queries: True = may attend. Padded queries still see
        # the valid keys (never an all-masked row); their outputs are zeroed at the end.
        attn_mask = None if lengths is None else mask[:, None, None, :]  # (N, 1, 1, L)
        for block in self.blocks:
            h = block(h, attn_mask)  # (N, L, D)
        eps = self.head(self.norm(h))  # (N, L, 3)
        return eps * mask[..., None].to(eps.dtype)
