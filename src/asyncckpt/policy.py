"""When to save. A policy answers ``due(step)``; it never saves by itself.

``due`` is the decision of one ``maybe_save`` call and may record that call (Adaptive measures the
iteration time from them, EverySeconds starts its clock at the first); ``peek`` asks the same
question without recording anything, so a loop can ask ahead whether the coming ``maybe_save``
saves (and compute an expensive validation metric only then).
"""

from __future__ import annotations

import collections
import logging
import math
import numbers
import statistics
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from asyncckpt.metrics import fence_cost_s

log = logging.getLogger("asyncckpt")


class SavePolicy:
    """The base of every save policy: subclass it and answer ``due`` to write your own.

    The manager calls ``due`` once per ``maybe_save``, ``peek`` for ``CheckpointManager.due``,
    ``saved`` when a save starts and ``committed`` (on the writer thread) when one ends.

    Several ranks: a policy whose ``due`` answers from the step alone sets ``same_on_every_rank``
    and is asked on every rank. Any other (a clock, a measured cost: the default, to be safe) is
    asked on rank 0 only; the step it finds due is announced to every rank, which all save
    ``policy_lead`` steps later (``asyncckpt.engine.rank_policy``).

    Attributes:
        same_on_every_rank: Whether ``due(step)`` answers alike on every rank of a job.
    """

    same_on_every_rank: bool = False

    def due(self, step: int) -> bool:  # pragma: no cover - interface
        """Whether ``maybe_save(step)``, which calls this once, saves; may record the call.

        Args:
            step: the training step ``maybe_save`` was called with.

        Returns:
            True when this step is to be saved.

        Raises:
            NotImplementedError: always, here; subclasses answer.
        """
        raise NotImplementedError

    def peek(self, step: int) -> bool:
        """What ``due(step)`` would answer now, changing nothing.

        The default asks ``due``: a policy whose ``due`` records anything must override this.

        Args:
            step: the step about to be passed to ``maybe_save``.

        Returns:
            What ``due(step)`` would answer now.
        """
        return self.due(step)

    def saved(self, step: int) -> None:
        """Told when a save was started, so interval policies restart their count.

        Args:
            step: the step being saved.
        """

    def committed(self, record: Any) -> None:
        """Told (on the writer thread) when a save committed or failed.

        Args:
            record: the save's ``SaveRecord`` (``ok``, ``stall_s``, ``persist_s``...).
        """


class EverySteps(SavePolicy):
    """Save at every step that is a positive multiple of ``n`` (deterministic across resumes).

    Args:
        n: the interval in steps.

    Raises:
        ValueError: ``n`` is not a positive integer.
    """

    same_on_every_rank = True  # the step alone decides

    def __init__(self, n: int) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"EverySteps needs a positive integer, got {n!r}")
        self.n = n

    def due(self, step: int) -> bool:
        """Whether ``step`` is a positive multiple of ``n``.

        Args:
            step: the training step.

        Returns:
            True for steps n, 2n, 3n...
        """
        return step > 0 and step % self.n == 0

    def __repr__(self) -> str:
        return f"EverySteps({self.n})"


class EverySeconds(SavePolicy):
    """Save when ``seconds`` of wall clock have passed since the last save started.

    The clock starts at the first ``maybe_save``, which never saves.

    Args:
        seconds: the interval.
        clock: where the time comes from (monotonic seconds); tests pass a fake one.

    Raises:
        ValueError: ``seconds`` is not positive.
    """

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        real: bool = isinstance(seconds, numbers.Real) and not isinstance(seconds, bool)  # numpy's numbers too
        if not real or not 0 < seconds < math.inf:
            raise ValueError(f"EverySeconds needs a positive, finite number of seconds, got {seconds!r}")
        self.seconds = float(seconds)
        self._clock = clock
        self._last: float | None = None

    def due(self, step: int) -> bool:
        """Whether ``seconds`` have passed since the last save began (the first call starts the clock).

        Args:
            step: the training step (unused: the clock decides).

        Returns:
            True once the interval has passed.
        """
        now = self._clock()
        if self._last is None:
            self._last = now
            return False
        return now - self._last >= self.seconds

    def peek(self, step: int) -> bool:
        """What ``due`` would answer, without starting the clock.

        Args:
            step: the training step (unused).

        Returns:
            True once the interval has passed.
        """
        return self._last is not None and self._clock() - self._last >= self.seconds

    def saved(self, step: int) -> None:
        """Restart the interval.

        Args:
            step: the step being saved (unused).
        """
        self._last = self._clock()

    def __repr__(self) -> str:
        return f"EverySeconds({self.seconds:g})"


@dataclass
class AdaptiveDecision:
    """The figures behind Adaptive's current interval, for ``explain()`` and the log.

    Attributes:
        interval_steps: the interval chosen.
        reason: which bound chose it ("overhead bound", "previous save commits first",
            "Young/Daly optimum", "max_interval cap").
        iteration_s: the median time between ``maybe_save`` calls.
        stall_s: the latest save's stall (plus overlap fence waits).
        commit_s: the latest save's time from the save call to its commit.
        k_overhead: the smallest interval within ``max_overhead``.
        k_commit: the smallest interval at which a save commits before the next is due.
        k_young_daly: Young/Daly's optimum, when ``mtbf`` is given.
        k_max_interval: the cap from ``max_interval``, when given.
        deferred: saves put off so far because one was still in flight.
    """

    interval_steps: int
    reason: str
    iteration_s: float
    stall_s: float
    commit_s: float  # from the save call to its commit
    k_overhead: int
    k_commit: int
    k_young_daly: int | None
    k_max_interval: int | None
    deferred: int


class Adaptive(SavePolicy):
    """Pick the checkpoint interval from measured costs, and keep re-picking it.

    The interval k (in steps) is the largest of:
      * the smallest k with stall / (k x iteration) <= max_overhead,
      * the smallest k at which the previous save has committed before the next is due
        (k x iteration >= stall + time to commit),
      * with ``mtbf`` (seconds): Young/Daly's optimum sqrt(2 x stall x mtbf) / iteration,
    capped by ``max_interval`` (seconds of work the user accepts to lose), which wins over the
    overhead bound with a warning. Iteration time is the median of recent gaps between
    ``maybe_save`` calls; stall and commit time are the latest save's, so a slower disk or a
    bigger model moves k in either direction after every commit. A save that falls due while the
    previous one is still in flight is deferred to the next step, never waited for.

    Args:
        max_overhead: the share of training time saves may stall it, in (0, 1).
        max_interval: the most seconds of work between saves (what a crash may lose), or None.
        mtbf: mean time between failures in seconds, for Young/Daly's optimum, or None.
        clock: where the time comes from (monotonic seconds); tests pass a fake one.
        window: how many recent step times the iteration time is the median of.

    Raises:
        ValueError: ``max_overhead`` is not in (0, 1), or ``max_interval`` or ``mtbf`` is not positive.
    """

    def __init__(
        self,
        max_overhead: float = 0.01,
        max_interval: float | None = None,
        mtbf: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        window: int = 32,
    ) -> None:
        if not 0 < max_overhead < 1:
            raise ValueError(f"max_overhead must be in (0, 1), got {max_overhead!r}")
        if max_interval is not None and not max_interval > 0:
            raise ValueError(f"max_interval must be a positive number of seconds, got {max_interval!r}")
        if mtbf is not None and not mtbf > 0:
            raise ValueError(f"mtbf must be a positive number of seconds, got {mtbf!r}")
        self.max_overhead = max_overhead
        self.max_interval = max_interval
        self.mtbf = mtbf
        self._clock = clock
        self._lock = threading.Lock()
        self._gaps: collections.deque[float] = collections.deque(maxlen=window)
        self._last_call: float | None = None
        self._steps_since_save = 0
        self._in_flight = False
        self._stall: float | None = None
        self._commit: float | None = None
        self._interval = 1
        self._warned = False
        self.deferred = 0
        self.decision: AdaptiveDecision | None = None

    def due(self, step: int) -> bool:
        """Record this call's time and say whether the current interval has passed.

        The first calls only measure the iteration time; a save that falls due while another is
        in flight is deferred (counted in ``deferred``).

        Args:
            step: the training step (the count of calls decides, not its value).

        Returns:
            True when a save is due now.
        """
        now = self._clock()
        with self._lock:
            if self._last_call is not None:
                self._gaps.append(now - self._last_call)
            self._last_call = now
            self._steps_since_save += 1
            if len(self._gaps) < 3:
                return False  # no iteration time yet: measure before the first save
            if self._steps_since_save < self._interval:
                return False
            if self._in_flight:
                self.deferred += 1
                return False
            return True

    def peek(self, step: int) -> bool:
        """``due`` as if this step's call were already counted, without counting it.

        Args:
            step: the training step (unused).

        Returns:
            What ``due`` would answer for the next call.
        """
        with self._lock:
            gaps = min(len(self._gaps) + (self._last_call is not None), self._gaps.maxlen or 0)
            return gaps >= 3 and self._steps_since_save + 1 >= self._interval and not self._in_flight

    def saved(self, step: int) -> None:
        """Restart the count and note a save in flight (later due saves are deferred until it ends).

        Args:
            step: the step being saved (unused).
        """
        with self._lock:
            self._steps_since_save = 0
            self._in_flight = True

    def committed(self, record: Any) -> None:
        """Take the save's measured stall and commit time, and choose the interval again.

        Args:
            record: the save's ``SaveRecord``; a failed save only ends the in-flight state.
        """
        with self._lock:
            self._in_flight = False
            if record.ok:
                self._stall = record.stall_s + fence_cost_s(record)  # overlap mode: fence waits too
                self._commit = record.stall_s + record.persist_s
                self._decide()
        if self.decision is not None:
            log.info("asyncckpt Adaptive: %s", self.decision)

    def _decide(self) -> None:
        iteration = statistics.median(self._gaps) if self._gaps else 0.0
        stall, commit = self._stall or 0.0, self._commit or 0.0
        if iteration <= 0:
            return
        k_overhead = max(1, math.ceil(stall / (self.max_overhead * iteration) - 1e-9))
        k_commit = max(1, math.ceil(commit / iteration - 1e-9))
        k_daly = None
        if self.mtbf is not None:
            k_daly = max(1, round(math.sqrt(2 * stall * self.mtbf) / iteration))
        candidates = {"overhead bound": k_overhead, "previous save commits first": k_commit}
        if k_daly is not None:
            candidates["Young/Daly optimum"] = k_daly
        reason, k = max(candidates.items(), key=lambda item: item[1])
        k_cap = None
        if self.max_interval is not None:
            k_cap = max(1, math.floor(self.max_interval / iteration + 1e-9))
            if k > k_cap:
                k, reason = k_cap, "max_interval cap"
                if k_overhead > k_cap and not self._warned:
                    self._warned = True
                    warnings.warn(
                        f"asyncckpt Adaptive: max_interval={self.max_interval:g} s allows at most "
                        f"{k_cap} steps between saves, which puts the stall overhead at "
                        f"{stall / (k_cap * iteration):.1%}, above max_overhead={self.max_overhead:.1%}",
                        stacklevel=2,
                    )
        self._interval = k
        self.decision = AdaptiveDecision(
            k, reason, iteration, stall, commit, k_overhead, k_commit, k_daly, k_cap, self.deferred
        )

    @property
    def interval(self) -> int:
        """The current interval in steps (1 until a save has committed)."""
        return self._interval

    def explain(self) -> dict[str, Any]:
        """The current interval and the measured figures behind it.

        Returns:
            The fields of :class:`AdaptiveDecision` as a dict, or before the first commit
            ``interval_steps``, ``reason`` ("no save committed yet") and ``deferred``.
        """
        with self._lock:
            if self.decision is None:
                return {"interval_steps": self._interval, "reason": "no save committed yet", "deferred": self.deferred}
            out = asdict(self.decision)
            out["deferred"] = self.deferred
            return out

    def __repr__(self) -> str:
        return f"Adaptive(max_overhead={self.max_overhead}, max_interval={self.max_interval}, mtbf={self.mtbf})"
