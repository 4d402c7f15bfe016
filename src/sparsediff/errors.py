"""Exceptions that sparsediff raises for problems a user can cause and fix.

Each carries a message that names the offending value, file, field or layer, so that the command-line
interface can print it without a traceback.
"""

from __future__ import annotations

import errno
import os


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


class DiskFullError(SparsediffError, OSError):
    """The disk (or the user's quota) filled while a run's files were written; the message names the run
    directory, the bytes needed and the bytes free, and nothing half-written is left behind."""


# What writers say when the disk is full: an OSError carries the errno, safetensors only a message
# ("Error while serializing: I/O error: No space left on device (os error 28)").
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_WORDS = tuple(os.strerror(code).lower() for code in DISK_FULL_ERRNOS) + tuple(
    f"os error {code})" for code in DISK_FULL_ERRNOS
)


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` says that the disk or the quota is full: an OSError with errno ENOSPC or EDQUOT,
    or any error whose message says so (safetensors raises its own error type)."""
    if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
        return True
    text = str(error).lower()
    return any(words in text for words in _DISK_FULL_WORDS)
