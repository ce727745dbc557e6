"""When to save. A policy answers ``due(step)``; it never saves by itself."""

from __future__ import annotations

import time
from collections.abc import Callable


class SavePolicy:
    def due(self, step: int) -> bool:  # pragma: no cover - interface
        raise NotImplementedError

    def saved(self, step: int) -> None:
        """Told when a save was started, so interval policies restart their count."""


class EverySteps(SavePolicy):
    """Save at every step that is a positive multiple of ``n`` (deterministic across resumes)."""

    def __init__(self, n: int) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"EverySteps needs a positive integer, got {n!r}")
        self.n = n

    def due(self, step: int) -> bool:
        return step > 0 and step % self.n == 0

    def __repr__(self) -> str:
        return f"EverySteps({self.n})"


class EverySeconds(SavePolicy):
    """Save when ``seconds`` of wall clock have passed since the last save started."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        if not seconds > 0:
            raise ValueError(f"EverySeconds needs a positive interval, got {seconds!r}")
        self.seconds = float(seconds)
        self._clock = clock
        self._last: float | None = None

    def due(self, step: int) -> bool:
        now = self._clock()
        if self._last is None:
            self._last = now
            return False
        return now - self._last >= self.seconds

    def saved(self, step: int) -> None:
        self._last = self._clock()

    def __repr__(self) -> str:
        return f"EverySeconds({self.seconds:g})"
