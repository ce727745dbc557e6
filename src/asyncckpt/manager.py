"""CheckpointManager: the public façade that wires tree, staging, pipeline, storage and retention."""

from __future__ import annotations

import atexit
import functools
import json
import os
import signal
import threading
import time
import warnings
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Literal, overload

import torch

from asyncckpt import _phases
from asyncckpt.codec import CodecConfig
from asyncckpt.engine.pipeline import Pipeline, SaveHandle, SaveJob, _warn_from_writer
from asyncckpt.engine.reader import read_manifest
from asyncckpt.engine.staging import SMALL_COPY_BYTES, ArenaPool, CopyEngine, LazyCopy, plan_layout
from asyncckpt.errors import CheckpointError, CheckpointNotFoundError, SaveFailedError
from asyncckpt.format import MAX_CHUNK_RAW, MAX_STEP, check_tags
from asyncckpt.loading import check_strict, read_newest_valid
from asyncckpt.metrics import METRICS_LOG, SaveRecord, SaveStats
from asyncckpt.policy import EverySteps, SavePolicy
from asyncckpt.retention import (
    CheckpointInfo,
    RetentionPolicy,
    best_metric_missing,
    missing_metric_text,
    steps_to_delete,
)
from asyncckpt.state.tree import RestoreResult, check_compatible, flatten, restore_into
from asyncckpt.storage.catalog import checkpoint_info
from asyncckpt.storage.local import LocalStorage

DEFAULT_CHUNK_SIZE = 4 << 20


def _check_step(step: Any) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= MAX_STEP:
        raise ValueError(f"step must be an integer in [0, {MAX_STEP}], got {step!r}")
    return step


def _check_json(value: Any, what: str) -> dict:
    """A snapshot of ``value`` as plain JSON values: the caller may change its own nested lists and
    dicts after ``save`` returns, and the checkpoint must keep what they held at the call."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise TypeError(f"{what} must be a dict with str keys, got {type(value).__name__}")
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{what} must be JSON-serialisable: {exc}") from None


def _plain_metrics(metrics: dict | None) -> dict:
    """Accept 0-dim tensors and numpy scalars as metric values (a loss is usually a tensor)."""
    if not metrics:
        return {}
    out = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        elif hasattr(value, "item") and callable(value.item) and not isinstance(value, (int, float)):
            value = value.item()
        out[key] = value
    return _check_json(out, "metrics")


def _at_interpreter_exit(callback) -> None:
    """Run ``callback`` at exit *before* thread pools shut down, so pending saves still commit.

    ``atexit`` runs too late: by then concurrent.futures has refused new work, and a save still
    in flight would fail. ``threading._register_atexit`` (what concurrent.futures itself uses)
    runs its callbacks newest first, ahead of the pools registered at import.
    """
    register = getattr(threading, "_register_atexit", None)
    try:
        if register is not None:
            register(callback)
            return
    except RuntimeError:  # already shutting down
        pass
    atexit.register(callback)


SNAPSHOT_MODES = ("blocking", "overlap")


class _Slot:
    """One save's reserved ``max_pending`` slot, held in ``CheckpointManager._reservations`` until
    its handle is pending. A set member, not a counter plus a flag: taking and giving it back are
    single idempotent operations, so an interrupt between two statements can neither leak a slot
    nor give one back twice."""


def _fenceable(state: Any, depth: int = 0) -> tuple[list[torch.optim.Optimizer], list[torch.nn.Module]]:
    """The optimizers and modules held (through dicts, lists, tuples) by a saved state."""
    optimizers: list[torch.optim.Optimizer] = []
    modules: list[torch.nn.Module] = []
    if isinstance(state, torch.optim.Optimizer):
        optimizers.append(state)
    elif isinstance(state, torch.nn.Module):
        modules.append(state)
    elif depth < 16 and isinstance(state, (dict, list, tuple)):
        for child in state.values() if isinstance(state, dict) else state:
            more_optimizers, more_modules = _fenceable(child, depth + 1)
            optimizers += more_optimizers
            modules += more_modules
    return optimizers, modules


def _tensor_key(t: torch.Tensor) -> tuple:
    return (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())


def _optimizer_owned(optimizers: list[torch.optim.Optimizer]) -> set[tuple]:
    """Keys of the tensors only an optimizer step changes: its parameters and its state."""
    keys = set()
    for opt in optimizers:
        for group in opt.param_groups:
            keys.update(_tensor_key(p) for p in group["params"] if isinstance(p, torch.Tensor))
        for per_param in opt.state.values():
            if isinstance(per_param, dict):
                keys.update(_tensor_key(v) for v in per_param.values() if isinstance(v, torch.Tensor))
    return keys


def _fence_hook(ref: weakref.ReferenceType) -> Callable[..., None]:
    def hook(*args: Any, **kwargs: Any) -> None:
        manager = ref()
        if manager is not None and manager._pid == os.getpid():  # inert in a forked child: no copy to wait for
            manager._fence()

    return hook


def _is_compiling() -> bool:
    is_compiling = getattr(torch.compiler, "is_compiling", None)
    return bool(is_compiling is not None and is_compiling())


def _settle_hook(ref: weakref.ReferenceType) -> Callable[..., None]:
    """A forward pre-hook: a settle point, which never waits (the manager has nothing to do unless a
    copy is still unjudged). Traced by torch.compile it does nothing, so compiled graphs stay whole."""

    def hook(*args: Any, **kwargs: Any) -> None:
        if _is_compiling():
            return
        manager = ref()
        if manager is not None and manager._unfenced and manager._pid == os.getpid():
            manager._settle_point()

    return hook


def _close_at_exit(ref: weakref.ReferenceType) -> None:
    manager = ref()
    if manager is not None:
        manager._close_quietly()


class CheckpointManager:
    """Asynchronous checkpoints of a training state into ``root``. See the README for the contract."""

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        keep_last: int | None = 3,
        keep_best: int | None = None,
        best_metric: str | None = None,
        best_mode: str = "min",
        keep_every: int | None = None,
        compression: str | None = "zstd",
        level: int = 1,
        snapshot: str = "blocking",
        policy: SavePolicy | None = None,
        max_pending: int = 1,
        workers: int | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        background_nice: int = 10,
    ) -> None:
        if snapshot not in SNAPSHOT_MODES:
            raise ValueError(f"snapshot must be one of {SNAPSHOT_MODES}, got {snapshot!r}")
        if isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 1:
            raise ValueError(f"max_pending must be a positive integer, got {max_pending!r}")
        if not isinstance(chunk_size, int) or not 4096 <= chunk_size <= MAX_CHUNK_RAW:
            raise ValueError(f"chunk_size must be an integer in [4096, {MAX_CHUNK_RAW}] bytes, got {chunk_size!r}")
        self.retention = RetentionPolicy(keep_last, keep_best, best_metric, best_mode, keep_every)
        self.codec = CodecConfig(compression, level)
        self.policy: SavePolicy = policy if policy is not None else EverySteps(1000)
        self.max_pending = max_pending
        self.workers = workers or max(1, min(8, os.cpu_count() or 1))
        self.snapshot = snapshot
        self._pid = os.getpid()  # a forked child gets a copy of this object, but not its threads or lock
        self._arenas = ArenaPool(pinned=torch.cuda.is_available())
        self._copier = CopyEngine()
        self._cond = threading.Condition()
        self._pending: list[SaveHandle] = []
        self._reservations: set[_Slot] = set()  # slots of saves still snapshotting (under _cond, with _pending)
        # step -> newest save not yet done. Its own lock, taken before _infos_lock: a save registers
        # here and must not wait while the writer applies retention (deletes) under _infos_lock.
        self._in_flight_jobs: dict[int, SaveJob] = {}
        self._jobs_lock = threading.Lock()
        self._due_answer: tuple[int, bool] | None = None  # the last due(step), for maybe_save(step)
        self._failed: list[SaveHandle] = []
        self._prepared: Future | None = None
        self._previous_handlers: dict[int, Any] = {}
        self._infos_lock = threading.Lock()  # retention (writer thread) vs tag/untag (caller)
        self._preempted: int | None = None
        self._warned_behind = False
        self._warned_no_best = False
        self._unfenced: list[LazyCopy] = []  # overlap copies not yet fenced, oldest first
        self._fence_lock = threading.Lock()
        self._hooks: dict[int, tuple[weakref.ReferenceType, list[Any]]] = {}  # id(obj) -> (obj, handles)
        self._storage = LocalStorage(root)  # last before the try: a failure after it must unlock
        try:
            self.root = self._storage.root
            self.stats = SaveStats(self.root / METRICS_LOG)
            self._infos = {c.step: checkpoint_info(c) for c in self._storage.checkpoints()}
            self._pipeline = Pipeline(
                self._storage, self.codec, self.workers, chunk_size, self._on_done, nice=background_nice
            )
        except BaseException:
            self._storage.close()  # a failed constructor must not keep the root locked
            raise
        self._closed = False
        _at_interpreter_exit(functools.partial(_close_at_exit, weakref.ref(self)))

    # ---- saving -------------------------------------------------------------------------------

    def prepare(self, state: Any) -> Future:
        """Allocate the host arena for ``state`` on a background thread, ahead of the first save.

        Pinning host memory is slow (about 1-2 GB/s), so this keeps that cost off the first save.
        Returns a Future that resolves when the arena is ready; ``save`` waits for it if needed.
        """
        self._check_open()
        nbytes = plan_layout(flatten(state).tensors).total
        future: Future = Future()
        # A new thread starts on CUDA device 0: pinning from there would open a context on GPU 0
        # in every process of a one-GPU-per-process job. Pin from the caller's device instead.
        device = torch.cuda.current_device() if self._arenas.pinned and torch.cuda.is_initialized() else None

        def allocate() -> None:
            try:
                if device is not None:
                    torch.cuda.set_device(device)
                self._arenas.release(self._arenas.acquire(nbytes))
                future.set_result(nbytes)
            except BaseException as exc:  # noqa: BLE001
                future.set_exception(exc)

        threading.Thread(target=allocate, name="asyncckpt-prepare", daemon=True).start()
        self._prepared = future
        return future

    def install_signal_handlers(
        self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
    ) -> None:
        """Opt in to a final checkpoint on preemption.

        On one of ``signals``, the next ``maybe_save`` saves that step whatever the policy says,
        waits for the commit, puts the previous handlers back and re-raises the signal, so it then
        acts as it would have (SIGINT raises KeyboardInterrupt, SIGTERM ends the process...). A
        second such signal before that happens acts at once. Call from the main thread.
        """
        self._check_owner()
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("install_signal_handlers must be called from the main thread")
        for signum in signals:
            self._previous_handlers.setdefault(signum, signal.getsignal(signum))
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._pid != os.getpid():  # a forked child inherited the handler: act as if it never had it
            self._restore_signal_handlers()
            signal.raise_signal(signum)
            return
        if self._preempted is not None:  # asked twice: stop waiting for the next step
            self._restore_signal_handlers()
            signal.raise_signal(signum)
            return
        self._preempted = signum

    def _restore_signal_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers.clear()

    def _final_save_and_reraise(
        self, step: int, state: Any, metrics: dict | None, metadata: dict | None, tags: list[str] | tuple[str, ...]
    ) -> None:
        """The preemption checkpoint: attempted whatever failed before, waited for, then the signal."""
        signum, self._preempted = self._preempted, None
        try:
            try:
                handle, earlier = self._save(step, state, metrics, metadata, tags)
            except CheckpointError as exc:
                warnings.warn(f"asyncckpt: the final checkpoint before signal {signum} failed: {exc}", stacklevel=3)
            else:
                try:
                    handle.wait()  # this save's own outcome: another save's failure is not its
                except CheckpointError as exc:
                    warnings.warn(f"asyncckpt: the final checkpoint before signal {signum} failed: {exc}", stacklevel=3)
                for other in (earlier, self._take_background_errors()):
                    if other is not None:
                        warnings.warn(
                            f"asyncckpt: before signal {signum}, an earlier save failed: {other}", stacklevel=3
                        )
        finally:
            self._restore_signal_handlers()
            signal.raise_signal(signum)

    def maybe_save(
        self,
        step: int,
        state: Any,
        metrics: dict | None = None,
        metadata: dict | None = None,
        tags: list[str] | tuple[str, ...] = (),
    ) -> SaveHandle | None:
        """Save if the policy says this step is due; otherwise return None at once.

        An earlier background failure never costs this step its checkpoint: the due save is made
        first, then that failure is raised (as by ``save``).
        """
        self._check_owner()
        self.stats.step_seen(time.perf_counter())
        if self._preempted is not None:
            self._final_save_and_reraise(step, state, metrics, metadata, tags)
            return None
        asked, self._due_answer = self._due_answer, None
        deferred = getattr(self.policy, "deferred", 0)
        is_due = self.policy.due(step)  # always: the policy counts every call
        if asked is not None and asked[0] == step:
            is_due = asked[1]  # what due(step) told the caller, who may have computed metrics for it
        self.stats.deferred_saves += getattr(self.policy, "deferred", 0) - deferred
        if not is_due:
            return None
        handle, earlier = self._save(step, state, metrics, metadata, tags, tell_policy=True)
        if earlier is not None:
            raise earlier
        return handle

    def due(self, step: int) -> bool:
        """Whether ``maybe_save(step)`` would save now, without changing the policy's state.

        For a loop that computes an expensive metric only for the checkpoints it goes into: the
        next ``maybe_save`` of the same step follows this answer. True after a preemption signal.
        """
        self._check_owner()
        _check_step(step)
        answer = self._preempted is not None or self.policy.peek(step)
        self._due_answer = (step, answer)
        return answer

    def save(
        self,
        step: int,
        state: Any,
        *,
        metrics: dict | None = None,
        metadata: dict | None = None,
        tags: list[str] | tuple[str, ...] = (),
    ) -> SaveHandle:
        """Snapshot ``state`` into host memory and persist it in the background.

        Returns once the snapshot is copied: later in-place changes to the live tensors, metrics
        and metadata never reach this checkpoint. If an earlier save failed in the background, this
        save is still made (and commits or fails on its own), then that earlier failure is raised
        as SaveFailedError naming its step.
        """
        handle, earlier = self._save(step, state, metrics, metadata, tags)
        if earlier is not None:
            raise earlier
        return handle

    def _save(
        self,
        step: int,
        state: Any,
        metrics: dict | None,
        metadata: dict | None,
        tags: list[str] | tuple[str, ...],
        tell_policy: bool = False,
    ) -> tuple[SaveHandle, SaveFailedError | None]:
        """Take and submit one save; return its handle and the earlier background failure to raise.

        Errors of this save itself (a state that cannot be saved, a closed manager) are raised. With
        ``tell_policy`` the policy learns of the save at its start, and of its failure if it fails
        before it reaches the writer. Everything taken on the way (the slot, the arena, the handle's
        place among the pending saves) is given back on any exception, an interrupt included.
        """
        began = time.perf_counter()
        record = SaveRecord(step=_check_step(step), started=time.time())
        self._check_open()
        self._warn_if_behind(step)
        if tell_policy:  # the interval restarts at the save's start; if this raises, nothing is taken yet
            self.policy.saved(step)
        try:
            self._fence(in_save=True)  # an earlier overlap copy must finish before this one reads
            slot = _Slot()
            try:
                with self._cond:  # reserved here, so threads saving at once never exceed max_pending
                    while len(self._pending) + len(self._reservations) >= self.max_pending:
                        self._cond.wait()
                    if self._closed:  # closed while this save waited: its writer is stopping
                        raise CheckpointError(f"CheckpointManager({self.root}) is closed")
                    self._reservations.add(slot)
                handle = self._take_and_submit(state, record, began, metrics, metadata, tags, slot)
            finally:
                with self._cond:
                    if slot in self._reservations:
                        self._reservations.discard(slot)
                        self._cond.notify_all()
        except BaseException:
            if tell_policy:  # so the policy never waits for a commit that cannot come
                record.ok = False
                self.policy.committed(record)
            raise
        return handle, self._take_background_errors()

    def _take_and_submit(
        self,
        state: Any,
        record: SaveRecord,
        began: float,
        metrics: dict | None,
        metadata: dict | None,
        tags: list[str] | tuple[str, ...],
        slot: _Slot,
    ) -> SaveHandle:
        """The snapshot and the hand-over to the writer, in the slot ``_save`` reserved (its owner
        from the moment the handle is pending); until the writer has the job, all is rolled back."""
        step = record.step
        waited = time.perf_counter()
        flat = flatten(state)
        layout = plan_layout(flat.tensors)
        job_metrics = _plain_metrics(metrics)
        job_metadata = _check_json(metadata, "metadata")
        job_tags = check_tags(list(tags), "tags")
        if self._prepared is not None:
            prepared, self._prepared = self._prepared, None
            prepared.result()
        planned = time.perf_counter()
        arena = self._arenas.acquire(layout.total)
        lazy: LazyCopy | None = None
        handle: SaveHandle | None = None
        job: SaveJob | None = None
        replaced: SaveJob | None = None
        submitted = False
        try:
            _phases.pause("snapshot")
            if self.snapshot == "overlap":
                lazy = self._start_overlap(state, flat.tensors, flat.paths, layout, arena)
            else:
                self._copier.copy(flat.tensors, layout, arena)
            copied = time.perf_counter()
            handle = SaveHandle(step)
            handle.add_done_callback(self._settled)  # fires only once the writer has resolved it
            job = SaveJob(step, flat.skeleton, layout, arena, handle, record, job_metrics, job_metadata, job_tags, lazy)
            if lazy is not None and not lazy.fenced():
                handle._before_wait = self._fence  # a handle waited on directly must not wait for a step
                with self._fence_lock:
                    self._unfenced.append(lazy)
            ended = time.perf_counter()
            record.wait_prev_s = waited - began
            record.snapshot_s = copied - planned
            record.bookkeeping_s = (planned - waited) + (ended - copied)
            record.stall_s = ended - began
            job.enqueued = ended
            with self._jobs_lock:
                replaced = self._in_flight_jobs.get(step)
                self._in_flight_jobs[step] = job
            with self._cond:
                self._pending.append(handle)
                self._reservations.discard(slot)
                self._cond.notify_all()
            self._pipeline.submit(job)
            submitted = True
        finally:
            # An interrupt inside or just after ``submit`` leaves it unknown whether the job was
            # queued: the writer's claim decides, so a job it already has is never undone.
            if not submitted and (job is None or self._pipeline.withdraw(job)):
                self._roll_back(step, arena, lazy, handle, job, replaced)
        self.stats.add(record)
        return handle

    def _roll_back(
        self,
        step: int,
        arena: Any,
        lazy: LazyCopy | None,
        handle: SaveHandle | None,
        job: SaveJob | None,
        replaced: SaveJob | None,
    ) -> None:
        """Undo a save that never reached the writer: no pending handle, no unjudged copy, the arena
        back in the pool once the copy thread is done with it."""
        if job is not None:
            with self._jobs_lock:
                if self._in_flight_jobs.get(step) is job:
                    if replaced is not None and not replaced.handle.done():
                        self._in_flight_jobs[step] = replaced
                    else:
                        del self._in_flight_jobs[step]
        if handle is not None:
            with self._cond:
                if handle in self._pending:
                    self._pending.remove(handle)
                    self._cond.notify_all()
        if lazy is not None:
            with self._fence_lock:
                if lazy in self._unfenced:
                    self._unfenced.remove(lazy)
            lazy.abandon()
            try:
                lazy.wait_copied()  # the copy thread must be done with the arena before reuse
            except BaseException:  # noqa: BLE001 - the save's own failure is the error to report
                pass
        self._arenas.release(arena)

    def _warn_if_behind(self, step: int) -> None:
        """Saving below the newest committed step starts a second timeline that "newest" ignores."""
        if self._warned_behind:
            return
        with self._infos_lock:
            newest = max(self._infos, default=-1)
        if step < newest:
            self._warned_behind = True
            warnings.warn(
                f"asyncckpt: saving step {step} in {self.root}, which already holds step {newest}. restore() "
                f"and load() pick the highest step, so after a crash training would resume from step {newest}, "
                "and keep_last keeps the highest steps, so the checkpoints of this run get deleted as newer "
                f"ones commit. After rolling back, remove the later steps (asyncckpt prune, or delete "
                f"step-* above {step}) or save into a new root.",
                stacklevel=3,
            )

    def _start_overlap(
        self, state: Any, tensors: list[torch.Tensor], names: list[str], layout: Any, arena: Any
    ) -> LazyCopy:
        """Copy lazily what only a fenced optimizer step changes; everything else now."""
        optimizers, modules = _fenceable(state)
        for obj in (*optimizers, *modules):
            self._install_fence(obj)
        owned = _optimizer_owned(optimizers)
        lazy = [t.numel() * t.element_size() >= SMALL_COPY_BYTES and _tensor_key(t) in owned for t in tensors]
        return self._copier.start(tensors, names, lazy, layout, arena)

    def _install_fence(self, obj: torch.optim.Optimizer | torch.nn.Module) -> None:
        """Hook the fence into ``obj``'s step / load_state_dict, and a settle point into a module's
        forward, once per object."""
        known = self._hooks.get(id(obj))
        if known is not None and known[0]() is obj:
            return
        hook = _fence_hook(weakref.ref(self))
        if isinstance(obj, torch.optim.Optimizer):
            handles = [obj.register_step_pre_hook(hook), obj.register_load_state_dict_pre_hook(hook)]
        else:
            # Every submodule: a load into one layer (or into the module a wrapper such as
            # torch.compile or DDP holds) writes into lazily copied parameters too.
            handles = []
            for module in obj.modules():
                register = getattr(module, "register_load_state_dict_pre_hook", None)
                if register is None:  # torch < 2.5
                    register = module._register_load_state_dict_pre_hook
                handles.append(register(hook))
            # The saved module only (not every submodule): one cheap check per forward call.
            try:
                handles.append(obj.register_forward_pre_hook(_settle_hook(weakref.ref(self))))
            except Exception:  # noqa: BLE001 - a module that takes no hooks (scripted): fences only
                pass
        self._hooks[id(obj)] = (weakref.ref(obj), handles)

    def _settle_point(self) -> None:
        """A forward of a saved module: judge the copies already finished, oldest first; never
        wait (a thread fencing right now is left to it)."""
        if not self._fence_lock.acquire(blocking=False):
            return
        try:
            while self._unfenced and self._unfenced[0].try_settle():
                self._unfenced.pop(0)
        finally:
            self._fence_lock.release()

    def _abandon_fences(self) -> None:
        with self._fence_lock:
            for lazy in self._unfenced:
                lazy.abandon()
            self._unfenced.clear()

    def _remove_fences(self) -> None:
        for _, handles in self._hooks.values():
            for handle in handles:
                handle.remove()
        self._hooks.clear()

    def _fence(self, in_save: bool = False, timeout: float | None = None) -> None:
        """Overlap mode: make everything from here on wait for the pending copies, run the guard.

        Called from the optimizers' step and load_state_dict pre-hooks, and by save, wait, restore
        and close. Time waited here counts as the earlier save's ``fence_wait_s`` (inside ``save``
        it already shows in that save's ``wait_prev_s``, so it is not counted twice).
        """
        if not self._unfenced:
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        # A second thread fencing meanwhile waits here for the same copies.
        if not self._fence_lock.acquire(timeout=-1 if timeout is None else max(0.0, timeout)):
            raise TimeoutError(f"overlap fence: another thread held it past the {timeout} s timeout")
        try:
            while self._unfenced:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                # may raise (an interrupt, the timeout): the entry stays for the next fence
                self._unfenced[0].fence(count_wait=not in_save, timeout=left)
                self._unfenced.pop(0)  # only once fenced: nobody may skip a fence still under way
        finally:
            self._fence_lock.release()

    def _on_done(self, job: SaveJob, path: Path | None) -> None:
        """Writer thread, before the handle resolves: free the arena, apply retention, log.

        A failure is recorded here, before the handle resolves, so once ``handle.done()`` is true
        the next ``save``/``wait``/``close`` is sure to raise it.
        """
        self._arenas.release(job.arena)
        if job.handle.error() is not None:
            with self._cond:
                self._failed.append(job.handle)
        try:
            with self._jobs_lock:
                if self._in_flight_jobs.get(job.step) is job:
                    del self._in_flight_jobs[job.step]  # from here on, tag() goes to the committed manifest
                if path is not None:
                    if job.retagged_late:
                        self._write_late_tags(path, job.tags)
                    with self._infos_lock:
                        self._infos[job.step] = CheckpointInfo(job.step, job.metrics, tuple(job.tags))
                elif job.changes:
                    self._retag_after_failure(job)
            if path is not None:
                with self._infos_lock:
                    self._apply_retention(protect=job.step)
        finally:
            self.stats.finished(job.record)
            self.policy.committed(job.record)

    def _retag_after_failure(self, job: SaveJob) -> None:
        """A re-save of a committed step failed: the tag changes given while it was in flight still
        reach the checkpoint it would have replaced (``_retag`` wrote them, unless that raced)."""
        with self._infos_lock:
            checkpoint = next((c for c in self._storage.checkpoints() if c.step == job.step), None)
            if checkpoint is None:
                return
            try:
                self._retag_committed(
                    checkpoint.path,
                    job.step,
                    lambda have: functools.reduce(lambda tags, change: change(tags), job.changes, have),
                )
            except Exception as exc:  # noqa: BLE001 - bookkeeping: warn, never stop the writer
                _warn_from_writer(
                    f"asyncckpt: the tag changes given while {checkpoint.path} was re-saved were lost: {exc}"
                )

    def _write_late_tags(self, path: Path, tags: list[str]) -> None:
        """Tags changed while the save's manifest was already written: rewrite it, now committed."""
        try:
            manifest = read_manifest(path)
            manifest.tags = list(tags)
            self._storage.replace_manifest(path, manifest.to_json())
        except Exception as exc:  # noqa: BLE001 - the checkpoint is committed: never report it failed
            _warn_from_writer(f"asyncckpt: the tags {tags} given while {path} was being saved were not written: {exc}")

    def _apply_retention(self, protect: int) -> None:
        committed = {c.step: c for c in self._storage.checkpoints()}
        infos = [self._infos.get(s) or CheckpointInfo(s, {}) for s in committed]
        if not self._warned_no_best and best_metric_missing(infos, self.retention):
            self._warned_no_best = True
            _warn_from_writer(
                f"asyncckpt: keep_best: no committed checkpoint in {self.root} "
                f"{missing_metric_text(infos, self.retention)}; retention deletes nothing until one does "
                "(pass it to save(metrics=...))"
            )
        for step in steps_to_delete(infos, self.retention):
            if step != protect:
                _phases.pause("retention")
                self._storage.delete(committed[step])
                self._infos.pop(step, None)

    def _settled(self, handle: SaveHandle) -> None:
        with self._cond:
            self._pending.remove(handle)
            self._cond.notify_all()

    def _take_background_errors(self) -> SaveFailedError | None:
        """The failures no caller has seen yet, as one error to raise (marked seen)."""
        with self._cond:
            failed = [h for h in self._failed if not h.reported]
            self._failed.clear()
        if not failed:
            return None
        for handle in failed:
            handle.reported = True
        first = failed[0].error()
        assert first is not None
        more = f" (and {len(failed) - 1} more failed saves)" if len(failed) > 1 else ""
        error = type(first)(f"{first}{more}")
        error.__cause__ = first
        return error

    def _raise_background_errors(self) -> None:
        error = self._take_background_errors()
        if error is not None:
            raise error

    def wait(self) -> None:
        """Block until every pending save has committed or failed; raise if one failed."""
        self._check_owner()
        self._fence()
        self._wait_pending()
        self._raise_background_errors()

    def _wait_pending(self) -> None:
        with self._cond:
            while self._pending:
                self._cond.wait()

    # ---- reading ------------------------------------------------------------------------------

    def steps(self) -> list[int]:
        """Committed steps, oldest first."""
        self._check_owner()
        return [c.step for c in self._storage.checkpoints()]

    @overload
    def restore(self, state: Any, step: int | None = None, *, strict: Literal[True] = True) -> int | None: ...
    @overload
    def restore(self, state: Any, step: int | None = None, *, strict: Literal[False]) -> RestoreResult: ...
    @overload
    def restore(self, state: Any, step: int | None = None, *, strict: bool) -> int | RestoreResult | None: ...
    def restore(self, state: Any, step: int | None = None, *, strict: bool = True) -> int | RestoreResult | None:
        """Load the newest valid checkpoint (or ``step``) into ``state`` in place.

        Returns the restored step, or None when the root holds no checkpoint. Damaged checkpoints
        are skipped with a warning; the state is only touched once a checkpoint fully verified and
        the whole live state was checked against it: key sets of every dict, module and optimizer,
        shapes, and that every live tensor can be written in place (not a meta tensor, an
        ``expand()`` view or an inference tensor). By default any mismatch raises
        StateMismatchError listing it, and nothing changes.

        ``strict=False`` restores the matching part, leaves the rest as it is (keys found only in
        the checkpoint are inserted into plain dicts, see RestoreResult), and returns a
        RestoreResult (step, missing_keys, unexpected_keys, skipped) instead of the step: a
        different type, so the common strict call stays ``int | None`` and a caller who opts in
        cannot overlook the lists (the overloads tell type checkers which one they get). Shape
        mismatches and optimizers with other param groups stay errors, as in torch.
        """
        self._check_open()
        check_strict(strict)
        if not isinstance(state, (dict, list)):
            raise TypeError(f"restore needs the state as a dict or list to update in place, got {type(state).__name__}")
        if step is not None:
            _check_step(step)
        self._fence()
        self._wait_pending()
        loaded = read_newest_valid(self.root, step, self.workers)
        if loaded is None:
            return None if strict else RestoreResult(None)
        tree = loaded.manifest.tree
        where = f"checkpoint step {loaded.manifest.step} ({loaded.path})"
        plan = check_compatible(state, tree, loaded.tensors, strict=strict, where=where)
        if restore_into(state, tree, loaded.tensors, plan) is not state:
            raise CheckpointError("unreachable: the root was checked to be updatable in place")
        return loaded.manifest.step if strict else plan.result(loaded.manifest.step)

    def tag(self, step: int, *tags: str) -> list[str]:
        """Add tags to a committed checkpoint, or to a save of ``step`` still in flight (they are in
        its checkpoint when it commits); tagged checkpoints are kept by retention."""
        return self._retag(step, lambda have: have + [t for t in check_tags(list(tags), "tags") if t not in have])

    def untag(self, step: int, *tags: str) -> list[str]:
        """Remove tags (all of them when none are named), also from a save still in flight; the
        checkpoint is then subject to retention again, from the next commit on."""
        return self._retag(step, lambda have: [t for t in have if tags and t not in tags])

    def _retag(self, step: int, change: Callable[[list[str]], list[str]]) -> list[str]:
        self._check_open()
        _check_step(step)
        with self._jobs_lock:  # not while the writer finishes a save of this step
            job = self._in_flight_jobs.get(step)
            with self._infos_lock:  # not while the writer applies retention to this very checkpoint
                checkpoint = next((c for c in self._storage.checkpoints() if c.step == step), None)
                if checkpoint is None and job is None:
                    raise CheckpointNotFoundError(
                        f"no committed checkpoint and no save in flight for step {step} in {self.root}"
                    )
                if checkpoint is not None:
                    # Also when a re-save of the step is in flight: it may fail, and this one stays.
                    try:
                        tags = self._retag_committed(checkpoint.path, step, change)
                    except (CheckpointError, OSError):
                        if job is None:
                            raise
                        # Replaced by that save meanwhile (it carries the change), or it is retried
                        # on the committed checkpoint if that save fails.
            if job is not None:
                return job.retag(change)
        return tags

    def _retag_committed(self, path: Path, step: int, change: Callable[[list[str]], list[str]]) -> list[str]:
        """Swap a committed checkpoint's manifest for one with changed tags (under ``_infos_lock``)."""
        manifest = read_manifest(path)
        manifest.tags = change(list(manifest.tags))
        self._storage.replace_manifest(path, manifest.to_json())
        self._infos[step] = CheckpointInfo(step, manifest.metrics, tuple(manifest.tags))
        return manifest.tags

    # ---- lifetime -----------------------------------------------------------------------------

    def _check_owner(self) -> None:
        """In a forked child this object is a copy without the writer threads or the lock: inert."""
        if self._pid != os.getpid():
            raise CheckpointError(
                f"this CheckpointManager belongs to pid {self._pid}; a forked child cannot use it "
                f"(this is pid {os.getpid()}). Open a manager in the child itself, on a root of its own"
            )

    def _check_open(self) -> None:
        self._check_owner()
        if self._closed:
            raise CheckpointError(f"CheckpointManager({self.root}) is closed")

    def close(self) -> None:
        """Finish pending saves, stop the background threads, release the root's lock.

        In a forked child it does nothing: the saves, threads and lock are the parent's."""
        if self._closed or self._pid != os.getpid():
            return
        with self._cond:  # a save waiting for a slot sees this under the same lock, and gives up
            self._closed = True
        if self._previous_handlers and threading.current_thread() is threading.main_thread():
            self._restore_signal_handlers()
        try:
            with self._cond:  # saves past that check (snapshotting on other threads) are handed over first
                while self._reservations:
                    self._cond.wait()
            self._fence()
            self._wait_pending()
        finally:
            self._abandon_fences()  # only if a fence was interrupted: the writer must not wait forever
            self._remove_fences()
            self._pipeline.close()
            self._copier.close()
            self._storage.close()
            self._arenas.clear()
        self._raise_background_errors()

    def _close_quietly(self) -> None:
        try:
            self.close()
        except CheckpointError as exc:
            warnings.warn(f"asyncckpt: {exc}", stacklevel=2)

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._close_quietly()  # never hide the user's exception behind ours

    def __repr__(self) -> str:
        return f"CheckpointManager({str(self.root)!r}, policy={self.policy!r})"
