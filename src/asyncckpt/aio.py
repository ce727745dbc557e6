"""asyncio façade over CheckpointManager: the same manager and pipeline, awaited instead of blocked on.

Every blocking call of the wrapped :class:`~asyncckpt.CheckpointManager` (the snapshot copy in
``save``, the reads and decompression in ``restore``, ``wait`` and ``close``) runs in the event
loop's default executor via ``loop.run_in_executor``; the background pipeline (encoders, writer,
fsync, commit) is the manager's own, unchanged. ``await mgr.save(...)`` returns once the snapshot
is taken and gives an :class:`AsyncSaveHandle`; ``await handle`` resolves to the committed path.

Why the executor and not ``aiofiles`` for reads: a restore is ``os.pread`` of large chunks
interleaved with zstd decompression and CRC checks, already spread over a thread pool (both
release the GIL). ``aiofiles`` has no non-blocking file I/O of its own: it runs each read in a
thread pool too, so it would add a layer around the reads while leaving the decompression, the
larger cost, on the event loop or back in an executor anyway. ``bench/aio_read.py`` measures both.

Cancellation: a call, once made, runs to completion in its thread. Cancelling the task that
awaits ``save`` (the snapshot) or an :class:`AsyncSaveHandle` (the commit) only stops that task
waiting: the save still commits, or fails and is reported by the next ``save``/``wait``/``close``
as with the blocking manager. Cancelling an awaited ``restore`` does not stop the read either; it
may still apply to the state afterwards. ``await mgr.wait()`` also waits for such orphaned calls,
so do not touch the state after a cancelled ``save``/``restore`` until ``wait`` returns.

CUDA: each executor call runs under the calling thread's current CUDA stream (of the current
device), so a save orders its copies after training's queued work and the overlap fence orders
training after the copies, as when the blocking manager is called on the training thread. The
stream is read when the coroutine starts running: ``await mgr.save(...)`` inside the
``torch.cuda.stream(s)`` block that training uses, rather than a task created there and left to
run after the block has exited.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import threading
import warnings
import weakref
from collections.abc import Callable, Generator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Literal, TypeVar, overload

import torch

from asyncckpt.engine.handle import SaveHandle
from asyncckpt.engine.overlap import training_thread
from asyncckpt.engine.rank_policy import MissedFinalError
from asyncckpt.engine.signals import final_save_failed, raised_after
from asyncckpt.engine.staging import on_stream
from asyncckpt.errors import CheckpointError
from asyncckpt.manager import CheckpointManager
from asyncckpt.state.tree import RestoreResult

T = TypeVar("T")

# Façades whose signal handlers are installed. ``loop.add_signal_handler`` points the process's
# signal wakeup fd at the loop's socket: a forked child that kept it would pass its own signals to
# the parent's loop (a SIGTERM meant for a worker would preempt the trainer, and the worker would
# live on). Signals are blocked across fork() so none lands in the child before its handlers are back.
_with_handlers: weakref.WeakSet[AsyncCheckpointManager] = weakref.WeakSet()


def _handler_to_put_back(signum: int, found: Any) -> Any:
    """The handler a façade puts back for ``signum`` when its own come off: the one ``found`` at
    install (ignored, the user's own), except asyncio's own (a loop's wakeup handler,
    ``asyncio.run``'s SIGINT handler: a partial over its runner), which belong to a loop or a
    runner that may be finished by then: Python's default for those (SIG_DFL for none found)."""
    if found is None:  # a handler not set from Python
        return signal.SIG_DFL
    function = getattr(found, "func", found)  # a functools.partial's function
    if str(getattr(function, "__module__", "")).split(".")[0] == "asyncio":
        return signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
    return found


def _installed_signals() -> set[int]:
    return {signum for facade in list(_with_handlers) for signum in list(facade._previous_handlers)}


def _block_signals_before_fork() -> None:
    signals = _installed_signals()
    _fork_mask.saved = signal.pthread_sigmask(signal.SIG_BLOCK, signals) if signals else None


def _unblock_signals_after_fork() -> None:
    saved, _fork_mask.saved = getattr(_fork_mask, "saved", None), None
    if saved is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, saved)


def _step_aside_in_child() -> None:
    for facade in list(_with_handlers):
        facade._step_aside()
    _with_handlers.clear()
    _unblock_signals_after_fork()


_fork_mask = threading.local()  # the forking thread's signal mask, put back after the fork
if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_block_signals_before_fork,
        after_in_parent=_unblock_signals_after_fork,
        after_in_child=_step_aside_in_child,
    )


def _in_callers_cuda_stream(fn: Callable[[], T]) -> Callable[[], T]:
    """``fn``, to run on an executor thread under the calling thread's current CUDA stream.

    PyTorch's current stream is per thread, and executor threads start on the default stream. A
    save or fence made there would order the snapshot against the wrong stream when training runs
    under ``torch.cuda.stream(s)``: the copy could miss work still queued on ``s``, and ``s`` would
    not wait for the copy. Called on the loop's thread; carries the current device's stream.
    """
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return fn
    stream = torch.cuda.current_stream()

    def in_stream() -> T:
        with on_stream(stream):  # on the stream's own device: a fresh thread would bind GPU 0
            return fn()

    return in_stream


class AsyncSaveHandle:
    """An awaitable over one :class:`SaveHandle`: ``await handle`` gives the committed path.

    Awaiting it raises :class:`CheckpointError` if the save failed. Awaiting it again, or
    cancelling one waiter, is safe: the save itself is never cancelled. Made by
    :meth:`AsyncCheckpointManager.save` and ``maybe_save``, not by users.

    Args:
        handle: the blocking manager's handle of the save.
        loop: the event loop the handle is awaited on (the commit is announced there).

    Attributes:
        handle: the wrapped :class:`SaveHandle`.
        step: the step being saved.
    """

    def __init__(self, handle: SaveHandle, loop: asyncio.AbstractEventLoop) -> None:
        self.handle = handle
        self.step = handle.step
        self._loop = loop
        self._pid = os.getpid()
        self._future: asyncio.Future[Path] = loop.create_future()
        handle.add_done_callback(self._resolved)  # may run now, on this thread, if already done

    def _resolved(self, handle: SaveHandle) -> None:  # writer thread (or the loop, if done already)
        try:
            self._loop.call_soon_threadsafe(self._transfer)
        except RuntimeError:  # the loop is closed: nobody can await this handle any more
            pass

    def _transfer(self) -> None:
        if self._future.done():
            return
        path, exc = self.handle._outcome()
        if exc is None:
            self._future.set_result(path)  # type: ignore[arg-type]
        else:
            self._future.set_exception(exc)
            self._future.exception()  # an un-awaited failure is reported by the manager, not logged

    def done(self) -> bool:
        """Whether the save has ended, without waiting.

        Returns:
            True once the save committed or failed (the thread-side state, never stale).
        """
        return self.handle.done()

    def error(self) -> CheckpointError | None:
        """The save's failure, without waiting or raising it.

        Returns:
            The SaveFailedError (OverlapGuardError in overlap mode) once the save failed; None
            while it is pending or after it committed.
        """
        return self.handle.error()

    async def _wait(self) -> Path:
        if os.getpid() != self._pid:  # the commit would be announced to the parent's loop, never here
            raise CheckpointError(
                f"this save handle belongs to pid {self._pid}; a forked child cannot wait for it "
                f"(this is pid {os.getpid()})"
            )
        fence = self.handle._fence()
        if fence is not None and not self._future.done():
            # Overlap mode: awaiting the commit is a fence, as SaveHandle.wait is (off the loop).
            await asyncio.shield(self._loop.run_in_executor(None, _in_callers_cuda_stream(fence)))
        try:
            return await asyncio.shield(self._future)
        except CheckpointError:
            self.handle._mark_reported()  # as SaveHandle.wait: seen by the user, not raised again
            raise

    def __await__(self) -> Generator[Any, None, Path]:
        """``await handle``: wait for the commit without blocking the loop.

        In overlap mode this is a fence first: it waits (in the executor) for the save's copy.

        Returns:
            The committed checkpoint's path.

        Raises:
            SaveFailedError: the save failed (OverlapGuardError: overlap mode's guard refused it).
            CheckpointError: awaited in a process forked from the one that saved.
        """
        return self._wait().__await__()

    def __repr__(self) -> str:
        return f"Async{self.handle!r}"


class AsyncCheckpointManager:
    """Asyncio façade over one :class:`CheckpointManager` (see the module docstring).

    ``AsyncCheckpointManager(root, **options)`` takes the CheckpointManager options and builds one
    (the constructor blocks briefly: it takes the lock and lists the root; ``await
    AsyncCheckpointManager.open(root, **options)`` does that in the executor);
    ``AsyncCheckpointManager(manager)`` wraps an existing one. ``.manager`` is the wrapped manager
    (``stats``, ``policy``, ``root``...). Calls into the manager are serialised, so concurrent tasks
    may share one façade. ``install_signal_handlers()`` gives the same preemption handling as the
    blocking manager's, through the loop's own signal handling.

    Every method mirrors the :class:`CheckpointManager` method of the same name, with the same
    parameters (a test holds them together); those that block are coroutines here.

    Args:
        root: the checkpoint root (a path), or a :class:`CheckpointManager` to wrap.
        **options: the :class:`CheckpointManager` options, when ``root`` is a path.

    Raises:
        TypeError: ``options`` given together with a manager to wrap.
        CheckpointError: the manager cannot be built (as :class:`CheckpointManager` raises it).

    Attributes:
        manager: the wrapped :class:`CheckpointManager`.
    """

    def __init__(self, root: str | os.PathLike | CheckpointManager, **options: Any) -> None:
        if isinstance(root, CheckpointManager):
            if options:
                raise TypeError("options cannot be given when wrapping an existing CheckpointManager")
            self.manager = root
        else:
            self.manager = CheckpointManager(root, **options)
        self._calls = threading.Lock()  # held in the executor thread, so a cancelled waiter can't skip it
        self._previous_handlers: dict[int, Any] = {}  # before install_signal_handlers, for a forked child
        self._inflight: set[asyncio.Future] = set()
        self._signal_loop: asyncio.AbstractEventLoop | None = None
        self._signals: list[int] = []
        self._preempted: int | None = None

    @classmethod
    async def open(cls, root: str | os.PathLike, **options: Any) -> AsyncCheckpointManager:
        """Build the manager (lock, sweep, listing) in the executor rather than on the loop.

        Args:
            root: the checkpoint root.
            **options: the :class:`CheckpointManager` options.

        Returns:
            A façade over the new manager.

        Raises:
            CheckpointError: the root cannot be used (RootInUseError: another writer holds it).
        """
        loop = asyncio.get_running_loop()
        manager = await loop.run_in_executor(None, functools.partial(CheckpointManager, root, **options))
        return cls(manager)

    @property
    def root(self) -> Path | str:
        """The checkpoint root, as the manager holds it (a Path, or the URL of an object store)."""
        return self.manager.root

    def _check_owner(self) -> None:
        """A forked child's copy holds the parent's in-flight calls and lock: refuse before waiting."""
        self.manager._check_owner()

    async def _run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` in the default executor under the call lock; cancelling the waiter doesn't stop it.

        In a forked child it raises before waiting on anything (the lock and the in-flight calls are
        the parent's), so every method that goes through here is refused there."""
        self._check_owner()
        trainer = threading.get_ident()  # the loop's thread runs training: its ops give the overlap verdict

        def locked() -> T:
            with self._calls, training_thread(trainer):
                return fn(*args, **kwargs)

        inner = asyncio.get_running_loop().run_in_executor(None, _in_callers_cuda_stream(locked))
        self._inflight.add(inner)
        inner.add_done_callback(self._inflight.discard)
        try:
            return await asyncio.shield(inner)
        except asyncio.CancelledError:
            inner.add_done_callback(functools.partial(_orphan_done, getattr(fn, "__name__", "call")))
            raise

    async def prepare(self, state: Any) -> int:
        """Allocate the host arena for ``state`` ahead of the first save, off the loop.

        Unlike the blocking manager's (which returns a Future at once), this awaits the allocation.

        Args:
            state: the training state that will be saved (only its tensors' sizes are used).

        Returns:
            The arena's size in bytes.

        Raises:
            CheckpointError: the manager is closed, or used in a forked child.
        """
        future: Future = await self._run(self.manager.prepare, state)  # allocation runs on its own thread
        return await asyncio.shield(asyncio.wrap_future(future))

    async def save(
        self,
        step: int,
        state: Any,
        *,
        metrics: dict | None = None,
        metadata: dict | None = None,
        tags: list[str] | tuple[str, ...] = (),
    ) -> AsyncSaveHandle:
        """Snapshot ``state`` (in the executor) and return once copied; ``await`` the handle for the commit.

        Args:
            step: the training step; a checkpoint of step N holds the state after step N.
            state: the training state (dicts, lists, tensors, objects with ``state_dict``...).
            metrics: JSON numbers and strings stored with the checkpoint (retention's ``keep_best``).
            metadata: any JSON object stored with the checkpoint.
            tags: tags that keep the checkpoint from retention until removed.

        Returns:
            The save's handle: ``await handle`` for the committed path.

        Raises:
            SaveFailedError: an earlier save failed (raised after this one was submitted, as by
                ``CheckpointManager.save``).
            TypeError: the state holds something that cannot be saved (its path is named).
            CheckpointError: the manager is closed, or used in a forked child.
        """
        handle = await self._run(self.manager.save, step, state, metrics=metrics, metadata=metadata, tags=tags)
        return AsyncSaveHandle(handle, asyncio.get_running_loop())

    def due(self, step: int) -> bool:
        """Whether ``maybe_save(step)`` would save now, changing nothing (no I/O: not a coroutine).

        As ``CheckpointManager.due``: the next ``maybe_save`` of the same step follows this answer.

        Args:
            step: the step about to be passed to ``maybe_save``.

        Returns:
            True when that call will save (always, after a preemption signal).

        Raises:
            CheckpointError: used in a forked child.
        """
        self._check_owner()
        if self._preempted is not None and self.manager._schedule is None:
            return True
        return self.manager.due(step)

    async def tag(self, step: int, *tags: str) -> list[str]:
        """Add tags to a committed checkpoint or a save still in flight (off the loop: it rewrites a manifest).

        Args:
            step: the checkpoint's step.
            *tags: printable strings of 1-128 characters.

        Returns:
            The step's tags afterwards.

        Raises:
            CheckpointNotFoundError: no committed checkpoint and no save in flight for ``step``.
            ValueError: a tag is not a printable string of 1-128 characters, or ``step`` is not a step.
        """
        return await self._run(self.manager.tag, step, *tags)

    async def untag(self, step: int, *tags: str) -> list[str]:
        """Remove tags (all when none are named) from a committed checkpoint or a save still in flight.

        Args:
            step: the checkpoint's step.
            *tags: the tags to remove; none: all of them.

        Returns:
            The step's tags afterwards.

        Raises:
            CheckpointNotFoundError: no committed checkpoint and no save in flight for ``step``.
            ValueError: ``step`` is not a step (an integer in [0, 10**12)).
        """
        return await self._run(self.manager.untag, step, *tags)

    async def discard_after(self, step: int, *, include_tagged: bool = False) -> list[int]:
        """Delete every committed checkpoint above ``step``, in the root and its mirror: a rollback
        (off the loop: see :meth:`CheckpointManager.discard_after`).

        Args:
            step: The step rolled back to; it stays.
            include_tagged: Also delete tagged checkpoints above ``step``.

        Returns:
            The steps deleted, oldest first.

        Raises:
            CheckpointNotFoundError: ``step`` is committed in neither tier (nothing deleted).
            CheckpointError: Tagged checkpoints above ``step`` (nothing deleted), or a deletion failed.
            ValueError: ``step`` is not a step.
        """
        self._check_owner()
        while self._inflight:  # a cancelled save still running: it is waited for, as by wait()
            await asyncio.wait(list(self._inflight))
        return await self._run(self.manager.discard_after, step, include_tagged=include_tagged)

    def install_signal_handlers(
        self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
    ) -> None:
        """Opt in to a final checkpoint on preemption (call from the running loop, main thread, Unix).

        As ``CheckpointManager.install_signal_handlers``, through ``loop.add_signal_handler`` (the
        blocking manager's handlers would run outside the loop): on one of ``signals`` the next
        ``maybe_save`` saves that step, awaits the commit, puts back the handlers found at install
        (asyncio's own, as ``asyncio.run``'s for SIGINT, become Python's defaults) and re-raises the
        signal, so it then acts as it would have (SIGINT raises KeyboardInterrupt, SIGTERM ends the
        process, an ignored signal stays ignored). A second such signal before that acts at once.
        A handler the loop had for one of ``signals`` (``loop.add_signal_handler``) is replaced,
        and not put back.
        In a process forked from this one, the handlers and the loop's signal wakeup are taken down,
        so a signal sent to the child acts there as it would have and never reaches this loop.

        Args:
            signals: the signals that ask for a final checkpoint.

        Raises:
            RuntimeError: no running event loop (call it from a coroutine).
            CheckpointError: used in a forked child.
        """
        self._check_owner()
        loop = asyncio.get_running_loop()
        for signum in signals:
            self._previous_handlers.setdefault(signum, signal.getsignal(signum))
            loop.add_signal_handler(signum, self._on_signal, signum)
            self._signals.append(signum)
        self._signal_loop = loop
        _with_handlers.add(self)

    def _on_signal(self, signum: int) -> None:
        if os.getpid() != self.manager._pid:  # never the owner's loop: the child's signal is not ours
            return
        if self._preempted is not None:  # asked twice: stop waiting for the next step
            self._remove_signal_handlers()
            signal.raise_signal(signum)
            return
        self._preempted = signum

    def _remove_signal_handlers(self) -> None:
        if os.getpid() != self.manager._pid:
            self._step_aside()
            return
        if self._signal_loop is not None and not self._signal_loop.is_closed():
            for signum in self._signals:
                self._signal_loop.remove_signal_handler(signum)  # puts Python's default handler back
                try:  # then the one found at install: the signal acts as before
                    signal.signal(signum, _handler_to_put_back(signum, self._previous_handlers.get(signum)))
                except (OSError, ValueError):  # not the main thread: the default one stays
                    pass
        self._signals.clear()
        self._signal_loop = None
        self._previous_handlers.clear()
        _with_handlers.discard(self)

    def _step_aside(self) -> None:
        """In a forked child: the handlers that were there before, and no wakeup fd into the parent's
        loop (its socket is shared with the parent). The parent's loop object is left alone."""
        if self._previous_handlers:
            for signum, handler in self._previous_handlers.items():
                try:
                    signal.signal(signum, _handler_to_put_back(signum, handler))
                except (OSError, ValueError):  # not the main thread: nothing more can be done here
                    pass
            try:
                signal.set_wakeup_fd(-1)
            except ValueError:
                pass
        self._previous_handlers.clear()
        self._signals.clear()
        self._signal_loop = None

    async def maybe_save(
        self,
        step: int,
        state: Any,
        metrics: dict | None = None,
        metadata: dict | None = None,
        tags: list[str] | tuple[str, ...] = (),
    ) -> AsyncSaveHandle | None:
        """``save`` if the manager's policy says the step is due, else None.

        As with the blocking manager, an earlier failure is raised only after the due save was
        submitted; after a preemption signal this saves, awaits the commit and re-raises the signal.

        Args:
            step: the training step (call once per step: policies count the calls).
            state: the training state.
            metrics: as for :meth:`save`.
            metadata: as for :meth:`save`.
            tags: as for :meth:`save`.

        Returns:
            The save's handle, or None when no save was due.

        Raises:
            SaveFailedError: an earlier save failed.
            CheckpointError: the manager is closed, or used in a forked child.
        """
        self._check_owner()
        if self.manager._schedule is not None:
            return await self._maybe_save_ranks(step, state, metrics, metadata, tags)
        if self._preempted is not None:
            signum = self._preempted  # kept until raised: a second signal meanwhile acts at once
            try:
                await self._final_save(signum, step, state, metrics, metadata, tags)
            finally:
                self._preempted = None
                self._remove_signal_handlers()
                signal.raise_signal(signum)
            return None
        handle = await self._run(self.manager.maybe_save, step, state, metrics, metadata, tags)
        return None if handle is None else AsyncSaveHandle(handle, asyncio.get_running_loop())

    async def _maybe_save_ranks(
        self, step: int, state: Any, metrics: dict | None, metadata: dict | None, tags: Any
    ) -> AsyncSaveHandle | None:
        """``maybe_save`` with several ranks: the ranks' schedule decides, told of this loop's
        signal, so every rank makes the final checkpoint at the step the ranks agree on (as the
        blocking manager's ``maybe_save``), then raises the signal."""
        manager = self.manager
        missed: MissedFinalError | None = None
        try:
            is_due, final = await self._run(manager._decide, step, self._preempted)
        except MissedFinalError as exc:  # no final checkpoint anywhere; the signal acts all the same
            is_due, final, missed = False, exc.signum, exc
        if final is not None:
            try:
                if missed is not None:
                    warnings.warn(final_save_failed(final, missed), stacklevel=2)
                else:
                    await self._final_save(final, step, state, metrics, metadata, tags)
                await self._run(manager._let_others_finish)
            finally:
                self._preempted = None
                self._remove_signal_handlers()
                signal.raise_signal(final)
            return None
        if not is_due:
            return None
        handle, earlier = await self._run(manager._save, step, state, metrics, metadata, tags, tell_policy=True)
        if earlier is not None:
            raise earlier
        return AsyncSaveHandle(handle, asyncio.get_running_loop())

    async def _final_save(
        self, signum: int, step: int, state: Any, metrics: dict | None, metadata: dict | None, tags: Any
    ) -> None:
        """The preemption checkpoint, attempted whatever failed before; failures are warnings."""
        manager = self.manager
        try:
            handle, earlier = await self._run(manager._save, step, state, metrics, metadata, tags)
        except Exception as exc:  # noqa: BLE001 - whatever failed (a state save refuses), the signal acts
            warnings.warn(final_save_failed(signum, exc), stacklevel=3)
            return
        try:
            await AsyncSaveHandle(handle, asyncio.get_running_loop())  # this save's own outcome
        except Exception as exc:  # noqa: BLE001 - as above
            warnings.warn(final_save_failed(signum, exc), stacklevel=3)
        for other in (earlier, await self._run(manager._take_background_errors)):
            if other is not None:
                warnings.warn(f"asyncckpt: before signal {signum}, an earlier save failed: {other}", stacklevel=3)

    async def wait(self, *, mirror: bool = False) -> None:
        """Wait for every pending save (and any cancelled call still running).

        Args:
            mirror: also wait for the mirror's uploads (see ``CheckpointManager.wait``).

        Raises:
            SaveFailedError: a save failed in the background (each failure is raised once).
            CheckpointError: used in a forked child; an upload to the mirror failed.
        """
        self._check_owner()
        while self._inflight:
            await asyncio.wait(list(self._inflight))
        wait = functools.partial(self.manager.wait, mirror=mirror)
        await asyncio.get_running_loop().run_in_executor(None, _in_callers_cuda_stream(wait))

    @overload
    async def restore(self, state: Any, step: int | None = None, *, strict: Literal[True] = True) -> int | None: ...
    @overload
    async def restore(self, state: Any, step: int | None = None, *, strict: Literal[False]) -> RestoreResult: ...
    @overload
    async def restore(self, state: Any, step: int | None = None, *, strict: bool) -> int | RestoreResult | None: ...
    async def restore(self, state: Any, step: int | None = None, *, strict: bool = True) -> int | RestoreResult | None:
        """Load the newest valid checkpoint (or ``step``) into ``state`` in place, off the event loop.

        Args:
            state: the live state (a dict, a list, or a model, optimizer or tensor saved on its own), updated
                in place.
            step: the step to restore; None: the newest checkpoint that verifies.
            strict: as in ``CheckpointManager.restore``: False restores the matching part.

        Returns:
            The restored step (None: the root holds no checkpoint); with ``strict=False`` a
            RestoreResult instead.

        Raises:
            StateMismatchError: the state does not fit the checkpoint (nothing was changed).
            CheckpointNotFoundError: ``step`` is not in the root.
            CheckpointDamagedError: ``step`` is damaged (without ``step``, damaged ones are skipped).
            TypeError: ``state`` cannot be updated in place.
            ValueError: ``step`` is not a step (an integer in [0, 10**12)).
        """
        return await self._run(self.manager.restore, state, step, strict=strict)

    async def steps(self) -> list[int]:
        """The committed steps.

        Returns:
            Committed steps, oldest first.

        Raises:
            CheckpointError: used in a forked child.
        """
        self._check_owner()
        return await asyncio.get_running_loop().run_in_executor(None, self.manager.steps)

    async def close(self) -> None:
        """Finish pending saves, stop the background threads, release the root's lock.

        In a forked child it returns at once: the calls, saves and lock are the parent's.

        Raises:
            SaveFailedError: a save failed in the background (the manager is closed all the same).
        """
        self._remove_signal_handlers()
        if os.getpid() != self.manager._pid:
            return
        pending, self._preempted = self._preempted, None
        with raised_after(pending):  # a signal no maybe_save took
            while self._inflight:
                await asyncio.wait(list(self._inflight))
            await self._run(self.manager.close)

    async def _close_quietly(self) -> None:
        try:
            await self.close()
        except CheckpointError as exc:
            warnings.warn(f"asyncckpt: {exc}", stacklevel=2)

    async def __aenter__(self) -> AsyncCheckpointManager:
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            await self.close()
        else:
            await self._close_quietly()  # never hide the user's exception behind ours

    def __repr__(self) -> str:
        return f"AsyncCheckpointManager({self.manager!r})"


def _orphan_done(what: str, inner: asyncio.Future) -> None:
    """A call whose waiter was cancelled: its error would otherwise vanish."""
    if not inner.cancelled() and inner.exception() is not None:
        warnings.warn(f"asyncckpt: {what} (its awaiting task was cancelled) failed: {inner.exception()}", stacklevel=1)
