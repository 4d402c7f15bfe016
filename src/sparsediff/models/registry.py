"""Named model kinds and the builder for each; presets refer to a kind and its arguments.

Builders import their model module lazily, so listing kinds or loading a preset stays fast.
Users can add kinds with :func:`register_model`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from ..config import ModelSpec
from ..errors import ConfigError

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}


def register_model(kind: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: ``@register_model("my-net") def build(**args) -> nn.Module``."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _BUILDERS[kind] = fn
        return fn

    return deco


def model_kinds() -> list[str]:
    return sorted(_BUILDERS)


def build_model(spec: ModelSpec) -> nn.Module:
    """Build the denoiser a preset describes."""
    if spec.kind not in _BUILDERS:
        raise ConfigError(f"unknown model kind {spec.kind!r}; known kinds: {', '.join(sorted(_BUILDERS))}")
    try:
        return _BUILDERS[spec.kind](**dict(spec.args))
    except TypeError as e:
        raise ConfigError(f"model.args for kind {spec.kind!r} are invalid: {e}") from None


@register_model("unet2d")
def _build_unet(**args: Any) -> nn.Module:
    from .unet import UNetDenoiser

    for key in ("block_out_channels", "down_block_types", "up_block_types"):
        if key in args:
            args[key] = tuple(args[key])
    return UNetDenoiser(**args)


@register_model("dit")
def _build_dit(**args: Any) -> nn.Module:
    from .dit import build_dit

    return build_dit(args.pop("size", "DiT-S"), **args)


@register_model("chirodiff-gru")
def _build_chirodiff_gru(**args: Any) -> nn.Module:
    from .chirodiff import ChiroDiffGRU

    return ChiroDiffGRU(**args)


@register_model("chirodiff-transformer")
def _build_chirodiff_transformer(**args: Any) -> nn.Module:
    from .chirodiff import ChiroDiffTransformer

    return ChiroDiffTransformer(**args)
