"""Save admission: a ``max_pending`` slot, the snapshot, the hand-over to the writer, and rollback.

A save takes a slot (waiting while ``max_pending`` saves are in flight), copies the state into an
arena, registers its job and hands it to the writer. Until the writer has the job, an exception
anywhere (an interrupt included) gives back everything taken on the way: the slot, the arena, the
handle's place among the pending saves, the job's place among the saves in flight, and an overlap
copy's place among the copies awaiting their verdict. The failures of saves the writer finished are
collected here too, to be raised by the next ``save``/``wait``/``close``.
"""

from __future__ import annotations

import json
import threading
import time
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch

from asyncckpt import _phases
from asyncckpt.engine.handle import SaveHandle
from asyncckpt.engine.overlap import Fences, LazyCopy
from asyncckpt.engine.pipeline import AbandonedPart, Pipeline, RankSave, SaveJob
from asyncckpt.engine.staging import Arena, ArenaPool, CopyEngine, Layout, plan_layout
from asyncckpt.engine.tags import Tags
from asyncckpt.errors import CheckpointError, SaveFailedError
from asyncckpt.format import check_tags
from asyncckpt.metrics import SaveRecord, SaveStats
from asyncckpt.policy import SavePolicy
from asyncckpt.state.tree import FlatState, NodeCache, flatten


def check_json(value: Any, what: str) -> dict:
    """A snapshot of ``value`` as plain JSON values.

    The caller may change its own nested lists and dicts after ``save`` returns, and the checkpoint
    must keep what they held at the call.

    Args:
        value: A dict with str keys, or None (an empty dict).
        what: The argument's name, for the error.

    Returns:
        A deep copy made of JSON values.

    Raises:
        TypeError: Not a dict with str keys, or not JSON-serialisable.
    """
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise TypeError(f"{what} must be a dict with str keys, got {type(value).__name__}")
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{what} must be JSON-serialisable: {exc}") from None
    except RecursionError:
        raise TypeError(f"{what} is nested too deeply to be JSON") from None


def _plain_metrics(metrics: dict | None) -> dict:
    """Accept 0-dim tensors and numpy scalars as metric values (a loss is usually a tensor)."""
    if not metrics:
        return {}
    out = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor) or (
            hasattr(value, "item") and callable(value.item) and not isinstance(value, (int, float))
        ):
            try:
                value = value.item()
            except (ValueError, RuntimeError) as exc:  # several values, or none: no metric
                kind = type(value).__name__
                raise TypeError(f"metrics[{key!r}] must be a single number, not a {kind} ({exc})") from None
        out[key] = value
    return check_json(out, "metrics")


class SavePlanner:
    """How a save's state becomes what it stages: one process flattens it (this class); the ranks
    of a multi-rank job also agree on the save (``manager``'s subclass).

    Every ``save`` call of an open manager takes exactly one turn in the ranks' agreement (a
    :meth:`plan` or a :meth:`refuse`), whatever it raises: the ranks pair their agreements by
    order, so a call that skipped its turn would pair every later save with another step's."""

    turns = 0  # agreements taken part in (a multi-rank planner counts them)

    def __init__(self) -> None:
        self.nodes = NodeCache()  # each save's skeleton takes the last one's nodes where they hold the same

    def flatten(self, state: Any) -> FlatState:
        """The state's skeleton and the tensors this process writes."""
        return flatten(state, self.nodes)

    def plan(self, state: Any, step: int) -> tuple[FlatState, RankSave | None]:
        """:meth:`flatten`, plus this rank's part of a multi-rank save (None: one process)."""
        return self.flatten(state), None

    def refuse(self, step: int) -> None:
        """This save call fails before :meth:`plan` (its step, metrics, metadata or tags, a fence):
        it takes its turn refused, so the other ranks' save fails at once (one process: nothing)."""


class _Slot:
    """One save's reserved ``max_pending`` slot, held in ``Admission._reservations`` until its
    handle is pending. A set member, not a counter plus a flag: taking and giving it back are single
    idempotent operations, so an interrupt between two statements can neither leak a slot nor give
    one back twice."""


class Admission:
    """The save path of one manager, from the slot to the writer, and the saves in flight.

    Args:
        root: The checkpoint root (for messages).
        max_pending: How many saves may be in flight at once.
        snapshot: ``"blocking"`` or ``"overlap"``.
        arenas: The host arenas saves copy into.
        copier: The engine that copies into them.
        fences: Overlap mode's fences.
        pipeline: The background writer.
        tags: The saves in flight by step, and their tags.
        stats: Where each save's record goes.
    """

    def __init__(
        self,
        root: Path | str,
        max_pending: int,
        snapshot: str,
        arenas: ArenaPool,
        copier: CopyEngine,
        fences: Fences,
        pipeline: Pipeline,
        tags: Tags,
        stats: SaveStats,
        plan: SavePlanner | None = None,
    ) -> None:
        self._plan = plan or SavePlanner()
        self._root = root
        self._max_pending = max_pending
        self._snapshot = snapshot
        self.arenas = arenas
        self._copier = copier
        self._fences = fences
        self._pipeline = pipeline
        self._tags = tags
        self._stats = stats
        self._cond = threading.Condition()
        self._pending: list[SaveHandle] = []
        self._reservations: set[_Slot] = set()  # slots of saves still snapshotting (under _cond, with _pending)
        self._failed: list[SaveHandle] = []
        self._prepared: Future | None = None
        self._layout: Layout | None = None  # the last save's, reused while the state's tensors fit it
        self._warned_behind = False
        self.closed = False  # set under _cond: a save waiting for a slot sees it and gives up

    def prepare(self, state: Any) -> Future:
        """Allocate the host arena for ``state`` on a background thread, ahead of the first save.

        Args:
            state: The state the next saves will hold.

        Returns:
            A Future that resolves (to the arena's size) once the arena is ready; the next save
            waits for it if needed.
        """
        nbytes = plan_layout(self._plan.flatten(state).tensors).total
        future: Future = Future()
        # A new thread starts on CUDA device 0: pinning from there would open a context on GPU 0
        # in every process of a one-GPU-per-process job. Pin from the caller's device instead.
        device = torch.cuda.current_device() if self.arenas.pinned and torch.cuda.is_initialized() else None

        def allocate() -> None:
            try:
                if device is not None:
                    torch.cuda.set_device(device)
                self.arenas.release(self.arenas.acquire(nbytes))
                future.set_result(nbytes)
            except BaseException as exc:  # noqa: BLE001
                future.set_exception(exc)

        threading.Thread(target=allocate, name="asyncckpt-prepare", daemon=True).start()
        self._prepared = future
        return future

    def save(
        self,
        step: int,
        began: float,
        state: Any,
        metrics: dict | None,
        metadata: dict | None,
        tags: list[str] | tuple[str, ...],
        policy: SavePolicy | None,
    ) -> SaveHandle:
        """One save, from the warning about an older step to the hand-over (``admit``).

        Args:
            step: The step, already checked.
            began: ``time.perf_counter()`` when ``save`` was called.
            state: The state to snapshot.
            metrics: As for ``admit``.
            metadata: As for ``admit``.
            tags: As for ``admit``.
            policy: The save policy to tell of the save at its start, and of its failure if it fails
                before it reaches the writer (so it never waits for a commit that cannot come); None
                for a save the policy did not ask for.

        Returns:
            The save's handle, pending.

        Raises:
            BaseException: What ``admit`` raises.
        """
        record = SaveRecord(step=step, started=time.time())
        turns = self._plan.turns
        try:
            self._warn_if_behind(step)
            if policy is not None:  # the interval restarts at the save's start; if this raises, nothing is taken yet
                policy.saved(step)
            try:
                return self.admit(record, began, state, metrics, metadata, tags)
            except BaseException:
                if policy is not None:
                    record.ok = False
                    policy.committed(record)
                raise
        except BaseException:
            if self._plan.turns == turns:  # failed before its turn in the agreement: take it, refused
                self.refuse(step)
            raise

    def refuse(self, step: int) -> None:
        """This save call fails before it could plan (a step out of range, a fence that raised):
        its turn in the ranks' agreement, refused. Nothing for a closed manager, which takes part
        in no agreement any more."""
        if not self.closed:
            self._plan.refuse(step)

    def _warn_if_behind(self, step: int) -> None:
        """Saving below the newest committed step starts a second timeline that "newest" ignores."""
        if self._warned_behind:
            return
        newest = self._tags.newest_step()
        if step < newest:
            self._warned_behind = True
            warnings.warn(
                f"asyncckpt: saving step {step} in {self._root}, which already holds step {newest}. restore() "
                f"and load() pick the highest step, so after a crash training would resume from step {newest}, "
                "and keep_last keeps the highest steps, so the checkpoints of this run get deleted as newer "
                f"ones commit. After rolling back, delete the later steps: mgr.discard_after({step}) (it keeps "
                "this save, and any below it), or asyncckpt prune ROOT --after S (S the newest step this run "
                "saved) once this job stopped; or save into a new root.",
                stacklevel=4,
            )

    def admit(
        self,
        record: SaveRecord,
        began: float,
        state: Any,
        metrics: dict | None,
        metadata: dict | None,
        tags: list[str] | tuple[str, ...],
    ) -> SaveHandle:
        """Take a slot, snapshot ``state`` and hand the save to the writer.

        Args:
            record: The save's record (``record.step`` is the step).
            began: ``time.perf_counter()`` when ``save`` was called.
            state: The state to snapshot.
            metrics: Metric values for the manifest (tensors and numpy scalars accepted).
            metadata: JSON metadata for the manifest.
            tags: Tags for the manifest.

        Returns:
            The save's handle, pending.

        Raises:
            CheckpointError: The manager was closed while this save waited for a slot.
            TypeError: Metrics, metadata or tags that cannot be saved.
            BaseException: Anything else the snapshot raised (an interrupt included), everything
                taken given back.
        """
        self._fences.fence(in_save=True)  # an earlier overlap copy must finish before this one reads
        slot = _Slot()
        try:
            with self._cond:  # reserved here, so threads saving at once never exceed max_pending
                while len(self._pending) + len(self._reservations) >= self._max_pending:
                    self._cond.wait()
                if self.closed:  # closed while this save waited: its writer is stopping
                    raise CheckpointError(f"CheckpointManager({self._root}) is closed")
                self._reservations.add(slot)
            return self._take_and_submit(state, record, began, metrics, metadata, tags, slot)
        finally:
            with self._cond:
                if slot in self._reservations:
                    self._reservations.discard(slot)
                    self._cond.notify_all()

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
        """The snapshot and the hand-over to the writer, in the slot ``admit`` reserved (its owner
        from the moment the handle is pending); until the writer has the job, all is rolled back."""
        step = record.step
        waited = time.perf_counter()
        try:
            job_metrics = _plain_metrics(metrics)
            job_metadata = check_json(metadata, "metadata")
            if isinstance(tags, (str, bytes)):  # list("best") would make four tags no untag removes
                raise TypeError(f"tags must be a list of strings, not one string: tags=[{tags!r}]")
            job_tags = check_tags(list(tags), "tags")
        except BaseException:
            self._plan.refuse(step)
            raise
        flat, ranks = self._plan.plan(state, step)
        try:
            layout = self._layout = plan_layout(flat.tensors, like=self._layout)
            if self._prepared is not None:
                prepared, self._prepared = self._prepared, None
                prepared.result()
            planned = time.perf_counter()
            arena = self.arenas.acquire(layout.total)
        except BaseException as exc:
            if ranks is not None:
                self._pipeline.abandon(AbandonedPart(step, ranks, f"{type(exc).__name__}: {exc}"))
            raise
        lazy: LazyCopy | None = None
        handle: SaveHandle | None = None
        job: SaveJob | None = None
        submitted = False
        failure: BaseException | None = None
        try:
            _phases.pause("snapshot")
            if self._snapshot == "overlap":
                lazy = self._fences.start(self._copier, state, flat.tensors, flat.paths, layout, arena)
            else:
                self._copier.copy(flat.tensors, layout, arena)
            copied = time.perf_counter()
            handle = SaveHandle(step)
            handle.add_done_callback(self._settled)  # fires only once the writer has resolved it
            job = SaveJob(
                step,
                flat.skeleton,
                layout,
                arena,
                handle,
                record,
                job_metrics,
                job_metadata,
                job_tags,
                lazy,
                ranks=ranks,
            )
            if lazy is not None:
                self._fences.track(lazy, handle)
            ended = time.perf_counter()
            record.wait_prev_s = waited - began
            record.snapshot_s = copied - planned
            record.bookkeeping_s = (planned - waited) + (ended - copied)
            record.stall_s = ended - began
            job.enqueued = ended
            self._tags.begin(job)
            with self._cond:
                self._pending.append(handle)
                self._reservations.discard(slot)
                self._cond.notify_all()
            self._pipeline.submit(job)
            submitted = True
        except BaseException as exc:
            failure = exc
            raise
        finally:
            # An interrupt inside or just after ``submit`` leaves it unknown whether the job was
            # queued: the writer's claim decides, so a job it already has is never undone.
            if not submitted and (job is None or self._pipeline.withdraw(job)):
                self._roll_back(arena, lazy, handle, job)
                if ranks is not None:  # the other ranks learn of it from this rank's writer
                    reason = f"{type(failure).__name__}: {failure}" if failure is not None else "interrupted"
                    self._pipeline.abandon(AbandonedPart(step, ranks, reason))
        self._stats.add(record)
        return handle

    def _roll_back(
        self,
        arena: Arena,
        lazy: LazyCopy | None,
        handle: SaveHandle | None,
        job: SaveJob | None,
    ) -> None:
        """Undo a save that never reached the writer: no pending handle, no unjudged copy, the arena
        back in the pool once the copy thread is done with it."""
        if job is not None:
            self._tags.withdraw(job)
        if handle is not None:
            with self._cond:
                if handle in self._pending:
                    self._pending.remove(handle)
                    self._cond.notify_all()
        if lazy is not None:
            self._fences.forget(lazy)
        else:  # interrupted before the pending copy came back: none of its copies may still write
            self._copier.quiesce()
        self.arenas.release(arena)

    def finished(self, job: SaveJob) -> None:
        """Writer thread, before the handle resolves: the arena back, a failure recorded, so that once
        ``handle.done()`` is true the next ``save``/``wait``/``close`` is sure to raise it.

        Args:
            job: The job the writer finished.
        """
        self.arenas.release(job.arena)
        if job.handle.error() is not None:
            with self._cond:
                self._failed.append(job.handle)

    def _settled(self, handle: SaveHandle) -> None:
        with self._cond:
            self._pending.remove(handle)
            self._cond.notify_all()

    def take_errors(self) -> SaveFailedError | None:
        """The failures no caller has seen yet, as one error to raise (marked seen).

        Returns:
            An error of the first failure's type naming how many more failed, or None.
        """
        with self._cond:
            failed = [h for h in self._failed if not h.reported]
            self._failed.clear()
        if not failed:
            return None
        for handle in failed:
            handle._mark_reported()
        first = failed[0].error()
        assert first is not None
        more = f" (and {len(failed) - 1} more failed saves)" if len(failed) > 1 else ""
        error = type(first)(f"{first}{more}")
        error.__cause__ = first
        return error

    def wait_pending(self) -> None:
        """Block until every save handed to the writer has committed or failed."""
        with self._cond:
            while self._pending:
                self._cond.wait()

    def close(self) -> None:
        """Refuse new saves; a save waiting for a slot sees it under the same lock and gives up."""
        with self._cond:
            self.closed = True

    def wait_handed_over(self) -> None:
        """Block until the saves past the closed check (snapshotting on other threads) are handed
        to the writer or rolled back."""
        with self._cond:
            while self._reservations:
                self._cond.wait()
