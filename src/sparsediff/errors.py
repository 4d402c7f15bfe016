"""Exceptions that sparsediff raises for problems a user can cause and fix.

Each carries a message that names the offending value, file, field or layer, so that the command-line
interface can print it without a traceback.
"""

from __future__ import annotations


class SparsediffError(Exception):
    """Base class of every error sparsediff raises on purpose."""


class ConfigError(SparsediffError, ValueError):
    """An impossible or inconsistent setting (sparsity, prune ratio, preset, option...)."""


class DataError(SparsediffError):
    """A dataset that is missing, unreadable or malformed."""


class StateError(SparsediffError, ValueError):
    """A checkpoint or state dict that does not belong to the model or run it is loaded into."""


class TrainingError(SparsediffError, RuntimeError):
    """Training cannot go on (for example the loss became NaN)."""
