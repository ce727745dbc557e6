"""SaveHandle: the future of one save, resolved by the writer, waited on by the caller.

The writer resolves it through ``_resolve``/``_fail``, overlap mode sets its fence through
``_set_fence``, and the manager and the asyncio façade read it through ``_fence`` and
``_mark_reported``: nobody outside this module writes its fields.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

from asyncckpt.errors import CheckpointError, SaveFailedError

# Set on the thread running a done-callback (the writer's, usually): a wait there for a save not
# yet done is the writer waiting for itself, refused instead of hanging.
_CALLBACK = threading.local()


def refuse_in_done_callback(what: str) -> None:
    """A call that waits for the writer, made from a done-callback on the writer's thread, would
    wait forever: an error instead, naming ``what``.

    Raises:
        CheckpointError: Called in a done-callback.
    """
    if getattr(_CALLBACK, "depth", 0) > 0:
        raise CheckpointError(
            f"{what} was called in a save's done-callback, which runs on the writer thread: it would wait for "
            "itself forever. Wait after the callback returns (on your own thread) instead"
        )


class SaveHandle:
    """The future of one save: ``wait()`` returns the committed path or raises.

    Returned by ``CheckpointManager.save`` and ``maybe_save``; never built by users.

    Args:
        step: The step being saved.

    Attributes:
        step: The step being saved.
        reported: True once the failure was raised to the user (``wait`` or the manager), who then
            does not see it raised again by the next ``save``/``wait``/``close``.
    """

    def __init__(self, step: int) -> None:
        self.step = step
        self._future: Future[Path | str] = Future()
        self.reported = False  # an error seen by the user is not raised again by the manager
        self._error: SaveFailedError | None = None  # set before the future resolves
        self._before_wait: Callable[..., None] | None = None  # overlap mode: the manager's fence
        self._pid = os.getpid()  # only this process's writer resolves it; a forked child would wait forever

    def done(self) -> bool:
        """Whether the save committed or failed.

        Returns:
            True once the writer resolved it.
        """
        return self._future.done()

    def wait(self, timeout: float | None = None) -> Path | str:
        """Wait for the commit. In overlap mode this is a fence first: it waits for the save's copy,
        then for the commit.

        Args:
            timeout: Seconds at most, fence included; None waits as long as it takes.

        Returns:
            The committed checkpoint's directory (its URL on an object store).

        Raises:
            SaveFailedError: The save failed (OverlapGuardError when overlap mode's guard refused
                the snapshot).
            CheckpointError: Called in a forked child, which no writer would ever answer.
            TimeoutError: Not done within ``timeout`` seconds.
        """
        if os.getpid() != self._pid:
            raise CheckpointError(
                f"this save handle belongs to pid {self._pid}; a forked child cannot wait for it "
                f"(this is pid {os.getpid()})"
            )
        if not self.done():
            refuse_in_done_callback(f"wait() of the save of step {self.step}")
        if self._before_wait is not None:
            began = time.monotonic()
            self._before_wait(timeout=timeout)
            if timeout is not None:
                timeout = max(0.0, timeout - (time.monotonic() - began))
        try:
            return self._future.result(timeout)
        except CheckpointError:
            self.reported = True
            raise

    def error(self) -> SaveFailedError | None:
        """The save's failure, known before ``done()`` turns true.

        Returns:
            The error ``wait`` raises, or None (committed, or still in flight).
        """
        return self._error

    def add_done_callback(self, fn: Callable[[SaveHandle], None]) -> None:
        """Call ``fn(handle)`` once the save committed or failed (at once if it already has).

        Args:
            fn: Called on the writer thread, or on this one if the save is already done. It must not
                wait for a save still in flight, nor close the manager (a CheckpointError then).
        """

        if self._future.done():  # on this thread, now: it may wait as it likes
            self._future.add_done_callback(lambda _: fn(self))
            return

        def call(_: Future) -> None:
            _CALLBACK.depth = getattr(_CALLBACK, "depth", 0) + 1
            try:
                fn(self)
            except Exception:
                raise  # logged by the future, as any callback's
            except BaseException as exc:
                # sys.exit() in a callback would end the writer thread, and every save after this
                # one would wait forever: logged like an Exception instead
                raise RuntimeError(f"a done-callback of the save of step {self.step} raised {exc!r}") from exc
            finally:
                _CALLBACK.depth -= 1

        self._future.add_done_callback(call)

    # ---- the package's side --------------------------------------------------------------------

    def _set_fence(self, fence: Callable[..., None]) -> None:
        """Overlap mode: ``fence(timeout=...)`` runs first in ``wait`` (and in the asyncio façade)."""
        self._before_wait = fence

    def _fence(self) -> Callable[..., None] | None:
        """The fence waiting on this handle runs first, or None."""
        return self._before_wait

    def _mark_reported(self) -> None:
        """The failure reached the user: the manager does not raise it again."""
        self.reported = True

    def _resolve(self, path: Path | str) -> None:
        """Writer thread: the save committed at ``path``."""
        self._future.set_result(path)

    def _fail(self, error: SaveFailedError) -> None:
        """Writer thread: the save failed. Call ``_record_failure`` first if bookkeeping must see it
        before the handle resolves."""
        self._error = error
        self._future.set_exception(error)

    def _record_failure(self, error: SaveFailedError) -> None:
        """Writer thread: make ``error()`` return ``error`` ahead of ``_fail``."""
        self._error = error

    def _outcome(self) -> tuple[Path | str | None, SaveFailedError | None]:
        """Once done: (the committed path, None) or (None, the failure)."""
        error = self._future.exception()
        return (None, error) if error is not None else (self._future.result(), None)  # type: ignore[return-value]

    def __repr__(self) -> str:
        state = "pending" if not self.done() else ("failed" if self._error else "committed")
        return f"SaveHandle(step={self.step}, {state})"
