"""A dependency-free progress bar for long CLI commands (``verify``, ``export``).

It only ever writes to its stream (stderr by default), redraws in place with ``\\r`` at most
every ``min_interval`` seconds, and ends its line on ``close()``. ``progress_bar`` returns a
no-op stand-in when the bar is disabled, so callers never test whether one is shown.
Not thread-safe: advance it from one thread.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

BAR_WIDTH = 20


def format_bytes(n: float) -> str:
    """Decimal units, like the rest of the CLI (1 MB = 10**6 bytes)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _clock_text(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """``label [#####-----]  42%  1.2 MB/2.9 MB  85.3 MB/s  ETA 0:02`` on one self-redrawing line."""

    def __init__(
        self,
        total: int,
        label: str = "",
        stream: TextIO | None = None,
        min_interval: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = max(0, int(total))
        self.done = 0
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.min_interval = min_interval
        self._clock = clock
        self._start = clock()
        self._last_draw: float | None = self._start  # first drawn after min_interval: a rate to show by then
        self._width = 0  # characters of the line now on screen (0: none)
        self._closed = False

    def advance(self, nbytes: int) -> None:
        self.done += nbytes
        now = self._clock()
        if self._last_draw is None or now - self._last_draw >= self.min_interval:
            self._draw(now)

    def line(self, now: float | None = None) -> str:
        now = self._clock() if now is None else now
        elapsed = max(0.0, now - self._start)
        total = self.total
        fraction = min(1.0, self.done / total) if total else 1.0
        filled = int(fraction * BAR_WIDTH)
        percent = int(fraction * 100)  # floored: 100% only when everything is done
        bar = "#" * filled + "-" * (BAR_WIDTH - filled)
        rate = self.done / elapsed if elapsed > 0 else None
        rate_text = f"{rate / 1e6:.1f} MB/s" if rate is not None else "- MB/s"
        if self._closed:
            tail = f"in {_clock_text(elapsed)}"
        elif rate and total > self.done:
            tail = f"ETA {_clock_text((total - self.done) / rate)}"
        else:
            tail = "ETA -"
        prefix = f"{self.label} " if self.label else ""
        return f"{prefix}[{bar}] {percent:3d}%  {format_bytes(self.done)}/{format_bytes(total)}  {rate_text}  {tail}"

    def _draw(self, now: float) -> None:
        text = self.line(now)
        pad = " " * max(0, self._width - len(text))  # wipe what a longer previous line left
        self.stream.write(f"\r{text}{pad}")
        self.stream.flush()
        self._width = len(text)
        self._last_draw = now

    def clear(self) -> None:
        """Erase the bar's line, so that other output can be printed; the next advance redraws it."""
        if self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0
            self._last_draw = None

    def close(self) -> None:
        """Draw the final state and end the line (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._draw(self._clock())
        self.stream.write("\n")
        self.stream.flush()
        self._width = 0

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class NullProgress:
    """What ``progress_bar`` returns when no bar is shown: every method does nothing."""

    total = 0
    done = 0

    def advance(self, nbytes: int) -> None:
        pass

    def clear(self) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> NullProgress:
        return self

    def __exit__(self, *exc) -> None:
        pass


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress_bar(
    total: int, label: str = "", enabled: bool | None = None, stream: TextIO | None = None
) -> Progress | NullProgress:
    """A bar on ``stream`` (stderr): shown when ``enabled``, or when None, when the stream is a terminal."""
    stream = stream if stream is not None else sys.stderr
    if enabled is None:
        enabled = _is_tty(stream)
    return Progress(total, label, stream) if enabled else NullProgress()
