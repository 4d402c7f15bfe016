"""Progress reporting: a bar on a terminal, throttled lines in a log, nothing with ``--quiet``.

Every long loop in sparsediff reports through :func:`progress_bar` or :func:`track`::

    with progress_bar(total=steps, desc="train", quiet=quiet) as bar:
        for step in range(steps):
            ...
            bar.update()
            bar.set_postfix(loss=f"{loss:.4f}")

When standard error is a terminal this is a tqdm bar. When it is redirected (a log file, a batch job,
a sweep's child process) a bar redraw per step would flood the log, so a plain line is written at most
every ``SPARSEDIFF_PROGRESS_SECONDS`` seconds (30 by default) and once at the end. ``quiet=True`` prints
nothing at all.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO, TypeVar

T = TypeVar("T")

INTERVAL_ENV = "SPARSEDIFF_PROGRESS_SECONDS"
DEFAULT_INTERVAL = 30.0


def _interval() -> float:
    try:
        return max(0.0, float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL)))
    except ValueError:
        return DEFAULT_INTERVAL


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class _Silent:
    """The progress object of ``quiet=True``: accepts every call, prints nothing."""

    n = 0

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LineProgress(_Silent):
    """Throttled progress lines for logs: ``desc: 120/800 (15%) 3.2 it/s, eta 3m32s, loss=0.12``."""

    def __init__(
        self,
        total: int | None,
        desc: str = "",
        initial: int = 0,
        unit: str = "it",
        interval: float | None = None,
        stream: TextIO | None = None,
    ):
        self.total, self.desc, self.unit = total, desc, unit
        self.n = self._start = initial
        self.interval = _interval() if interval is None else interval
        self.stream = stream if stream is not None else sys.stderr
        self._t0 = self._last = time.monotonic()
        self._postfix = ""
        self._closed = False
        self._printed_at = None

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._emit(now)

    def set_postfix(self, **kwargs: Any) -> None:
        self._postfix = ", ".join(f"{k}={v}" for k, v in kwargs.items())

    def line(self, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        elapsed = max(now - self._t0, 1e-9)
        rate = (self.n - self._start) / elapsed
        parts = [f"{self.desc}: " if self.desc else ""]
        if self.total:
            parts.append(f"{self.n}/{self.total} ({100.0 * self.n / self.total:.0f}%)")
        else:
            parts.append(f"{self.n}")
        parts.append(f" {rate:.3g} {self.unit}/s, {format_seconds(elapsed)} elapsed")
        if self.total and rate > 0 and self.n < self.total:
            parts.append(f", eta {format_seconds((self.total - self.n) / rate)}")
        if self._postfix:
            parts.append(f", {self._postfix}")
        return "".join(parts)

    def _emit(self, now: float) -> None:
        self._last = now
        self._printed_at = self.n
        print(self.line(now), file=self.stream, flush=True)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._printed_at != self.n and self.n > self._start:
            self._emit(time.monotonic())


def format_seconds(s: float | None) -> str:
    """``42s``, ``3m05s``, ``2h07m``: durations as people read them (``-`` for None)."""
    if s is None:
        return "-"
    s = float(s)
    if s < 60:
        return f"{s:.0f}s"
    if s < 3600:
        m, sec = divmod(round(s), 60)
        return f"{m}m{sec:02d}s"
    h, rem = divmod(round(s), 3600)
    return f"{h}h{rem // 60:02d}m"


def progress_bar(
    total: int | None = None,
    *,
    desc: str = "",
    initial: int = 0,
    quiet: bool = False,
    unit: str = "it",
    leave: bool = True,
):
    """A progress object with ``update(n)``, ``set_postfix(**kw)`` and ``close()`` (also a context manager).

    A tqdm bar when standard error is a terminal; throttled lines otherwise; silent when ``quiet``.
    """
    if quiet:
        return _Silent()
    if _is_terminal(sys.stderr):
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=leave, dynamic_ncols=True)
    return LineProgress(total, desc=desc, initial=initial, unit=unit)


def track(
    iterable: Iterable[T],
    *,
    total: int | None = None,
    desc: str = "",
    quiet: bool = False,
    unit: str = "it",
    leave: bool = False,
) -> Iterator[T]:
    """Iterate over ``iterable`` while reporting progress as :func:`progress_bar` does."""
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    with progress_bar(total, desc=desc, quiet=quiet, unit=unit, leave=leave) as bar:
        for item in iterable:
            yield item
            bar.update()
