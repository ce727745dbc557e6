"""Process events a manager answers: a preemption signal (a final checkpoint at the next
``maybe_save``, then the signal acts as it would have) and the interpreter's exit (pending saves
still commit)."""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import signal
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from asyncckpt.engine.handle import SaveHandle
from asyncckpt.errors import CheckpointError, SaveFailedError

# The managers with handlers installed: one closed while another's handler sits over its own hands
# its found handler to that one (the one that found this one's).
_INSTALLED: weakref.WeakSet[Preemption] = weakref.WeakSet()


class Preemption:
    """The signal handlers one manager installed, and the signal received but not yet acted on.

    Attributes:
        signum: The signal received, until the final checkpoint takes it; None otherwise.
    """

    def __init__(self) -> None:
        self._pid = os.getpid()  # a forked child inherits the handlers, not the manager
        self._previous: dict[int, Any] = {}
        self.signum: int | None = None
        self._closed = False  # handlers left installed by a close off the main thread pass signals on

    def install(self, signals: tuple[int, ...]) -> None:
        """Catch ``signals`` (the handlers found are kept, to be put back).

        Args:
            signals: The signal numbers.

        Raises:
            RuntimeError: Not called from the main thread.
        """
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("install_signal_handlers must be called from the main thread")
        for signum in signals:
            if signum in self._previous:
                if signal.getsignal(signum) == self._on_signal:
                    continue  # installed and on top already
                self._take_out(signum)  # under another's handler: out of the chain, then on top
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._on_signal)
            _INSTALLED.add(self)

    def installed(self) -> bool:
        """Whether handlers are installed.

        Returns:
            True until ``restore``.
        """
        return bool(self._previous)

    def _on_signal(self, signum: int, frame: Any) -> None:
        # A forked child inherited the handler, or its manager closed: act as if it never had it.
        # Asked twice (also during the final save): stop waiting. Either way the previous handler
        # takes the signal (handlers run on the main thread, where they can be put back).
        if self._pid != os.getpid() or self.signum is not None or self._closed:
            self.restore()
            signal.raise_signal(signum)
            return
        self.signum = signum

    def close(self) -> int | None:
        """The manager closes: its handlers come off (on the main thread; on another one they can
        not, and pass every signal on from now, putting the found handlers back at the first).

        Returns:
            The signal received and not acted on yet (none came to a ``maybe_save`` since), for
            the caller to raise once it is closed: it is the program's, never dropped.
        """
        self._closed = True
        if threading.current_thread() is threading.main_thread():
            self.restore()
        pending, self.signum = self.signum, None
        return pending

    def restore(self) -> None:
        """Put back the handlers found at ``install`` (main thread).

        Managers may be closed in any order: see :meth:`_take_out`."""
        for signum in list(self._previous):
            self._take_out(signum)
        _INSTALLED.discard(self)

    def _take_out(self, signum: int) -> None:
        """Stop catching ``signum``. Where this handler is the signal's, the one found at install
        goes back; where another manager's handler was installed over it (that manager found this
        one), that manager gets the found handler instead, and puts it back when it closes; where
        something else was (a handler of the program's), it is left as it is. So no closed
        manager's handler is left catching the signal through a manager, and none of the
        program's is dropped."""
        handler = self._previous.pop(signum)
        if signal.getsignal(signum) == self._on_signal:
            signal.signal(signum, handler)
            return
        for other in list(_INSTALLED):
            if other is not self and other._previous.get(signum) == self._on_signal:
                other._previous[signum] = handler
                return

    def final_save_and_reraise(
        self,
        save: Callable[[], tuple[SaveHandle, SaveFailedError | None]],
        take_errors: Callable[[], SaveFailedError | None],
        signum: int | None = None,
        before_signal: Callable[[], None] | None = None,
    ) -> None:
        """The preemption checkpoint: attempted whatever failed before, waited for, then the signal.

        Failures become warnings: the signal is raised again whatever happened.

        Args:
            save: Takes the final save; returns its handle and an earlier failure.
            take_errors: The background failures not yet reported.
            signum: The signal to raise after it (default: the one received). Several ranks: the
                one the rank that received it announced, for every rank (``RankSchedule``).
            before_signal: Called just before the signal is raised, which may end the process
                (several ranks: rank 0 lets the others hear the final save's outcome from the store
                its process may host).
        """
        signum = signum if signum is not None else self.signum
        assert signum is not None
        self.signum = signum  # until it is raised: a second signal meanwhile acts at once
        try:
            try:
                handle, earlier = save()
            except Exception as exc:  # noqa: BLE001 - whatever failed (a state save refuses), the signal acts
                warnings.warn(final_save_failed(signum, exc), stacklevel=3)
            else:
                try:
                    handle.wait()  # this save's own outcome: another save's failure is not its
                except Exception as exc:  # noqa: BLE001 - as above
                    warnings.warn(final_save_failed(signum, exc), stacklevel=3)
                for other in (earlier, take_errors()):
                    if other is not None:
                        warnings.warn(
                            f"asyncckpt: before signal {signum}, an earlier save failed: {other}", stacklevel=3
                        )
        finally:
            self.signum = None
            self.restore()
            if before_signal is not None:
                try:
                    before_signal()
                except Exception as exc:  # noqa: BLE001 - the signal acts whatever happened
                    warnings.warn(f"asyncckpt: before signal {signum}: {exc}", stacklevel=3)
            signal.raise_signal(signum)


@contextlib.contextmanager
def raised_after(pending: int | None) -> Iterator[None]:
    """Raise the signal ``pending`` (None: none) once the block is done: a signal received after
    the last ``maybe_save`` acts when its manager closes. If the block raises, its error is warned
    first: the signal may end the process before the error is seen."""
    try:
        yield
    except BaseException as exc:
        if pending is not None:
            warnings.warn(f"asyncckpt: {exc}", stacklevel=4)
            signal.raise_signal(pending)
        raise
    if pending is not None:
        signal.raise_signal(pending)


def final_save_failed(signum: int, exc: Exception) -> str:
    """The warning of a final checkpoint that failed: a CheckpointError says what it is, anything
    else is named by its type."""
    reason = str(exc) if isinstance(exc, CheckpointError) else f"{type(exc).__name__}: {exc}"
    return f"asyncckpt: the final checkpoint before signal {signum} failed: {reason}"


def _call_if_alive(ref: weakref.WeakMethod) -> None:
    method = ref()
    if method is not None:
        method()


def at_interpreter_exit(close: Callable[[], None]) -> None:
    """Call ``close`` (a bound method, held weakly) at exit *before* thread pools shut down, so
    pending saves still commit.

    ``atexit`` runs too late: by then concurrent.futures has refused new work, and a save still
    in flight would fail. ``threading._register_atexit`` (what concurrent.futures itself uses)
    runs its callbacks newest first, ahead of the pools registered at import.

    Args:
        close: A bound method; its object may be collected before exit (nothing is called then).
    """
    callback = functools.partial(_call_if_alive, weakref.WeakMethod(close))
    register = getattr(threading, "_register_atexit", None)
    try:
        if register is not None:
            register(callback)
            return
    except RuntimeError:  # already shutting down
        pass
    atexit.register(callback)
