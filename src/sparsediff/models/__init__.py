"""Denoisers and first stages, and the registry that builds them from presets."""

from .registry import build_model, model_kinds, register_model

__all__ = ["build_model", "model_kinds", "register_model"]
