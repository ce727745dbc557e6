"""CheckpointManager: the public façade that wires admission, the writer, overlap fences, tags,
retention and preemption signals (asyncckpt.engine) to one root's storage."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Literal, overload

import torch

from asyncckpt.codec import CodecConfig
from asyncckpt.engine.admission import Admission
from asyncckpt.engine.handle import SaveHandle, refuse_in_done_callback
from asyncckpt.engine.mirror import _Mirror, write_mirror_file
from asyncckpt.engine.overlap import Fences
from asyncckpt.engine.pipeline import Pipeline, SaveJob
from asyncckpt.engine.rank_plan import RankPlanner, join_ranks, open_rank_storage
from asyncckpt.engine.rank_policy import DEFAULT_LEAD, MissedFinalError, RankSchedule
from asyncckpt.engine.rank_restore import check_per_rank, restore_ranks
from asyncckpt.engine.reader import why_no_tier_verifies
from asyncckpt.engine.retain import Retainer
from asyncckpt.engine.signals import Preemption, at_interpreter_exit, raised_after
from asyncckpt.engine.staging import ArenaPool, CopyEngine
from asyncckpt.engine.tags import Tags
from asyncckpt.errors import CheckpointDamagedError, CheckpointError, CheckpointNotFoundError, SaveFailedError
from asyncckpt.format import MAX_CHUNK_RAW, MAX_STEP, check_tags
from asyncckpt.loading import check_strict, read_newest_valid, read_newest_valid_of_tiers
from asyncckpt.metrics import METRICS_LOG, SaveStats
from asyncckpt.policy import EverySteps, SavePolicy
from asyncckpt.retention import CheckpointInfo, RetentionPolicy, tagged_above
from asyncckpt.state.tree import RestoreResult, check_compatible, is_stateful, restore_into
from asyncckpt.storage.backend import Backend, CheckpointRef
from asyncckpt.storage.catalog import Catalog
from asyncckpt.storage.local import LocalBackend

DEFAULT_CHUNK_SIZE = 4 << 20


def _raising(error: Exception) -> Callable[[], Any]:
    """A save that fails with ``error`` (the final checkpoint no rank makes)."""

    def save() -> Any:
        raise error

    return save


def _check_step(step: Any) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= MAX_STEP:
        raise ValueError(f"step must be an integer in [0, {MAX_STEP}], got {step!r}")
    return step


SNAPSHOT_MODES = ("blocking", "overlap")

_NO_STEP = -(2**62)  # a rank's part in a MAX over steps when it has no step to give


def _mirror_policy(given: dict | RetentionPolicy | None, local: RetentionPolicy) -> RetentionPolicy:
    """The mirror's retention: the local one unless given (a dict of the retention options)."""
    if given is None:
        return local
    if isinstance(given, RetentionPolicy):
        return given
    if isinstance(given, dict):
        unknown = set(given) - {f.name for f in dataclasses.fields(RetentionPolicy)}
        if unknown:
            raise ValueError(f"mirror_retention: unknown options {sorted(unknown)}")
        return RetentionPolicy(**given)
    raise TypeError(f"mirror_retention must be a dict of retention options or a RetentionPolicy, got {given!r}")


def _default_workers() -> int:
    """Encoder (and restore's decoder) threads per process, at most 8: the cores it may run on (its
    affinity, not the machine's count). A process free to run on every core shares them with the
    ranks torchrun started on this host (``LOCAL_WORLD_SIZE``): eight ranks each taking every core
    would run eight times as many busy threads as cores while training's data loaders need them.
    One a launcher pinned to some cores already has its share."""
    machine = os.cpu_count() or 1
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = machine
    try:
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local = 1
    share = cores // local if cores >= machine else cores
    return max(1, min(8, share))


class CheckpointManager:
    """Asynchronous checkpoints of a training state into ``root``. See the README for the contract.

    A façade over the parts in ``asyncckpt.engine``: admission (slots, snapshot, hand-over),
    the writer, overlap mode's fences, tags, retention and preemption signals.

    Args:
        root: The checkpoint directory (created if missing), locked for this manager's lifetime,
            or an object-store URL (``s3://bucket/prefix``; the lock is then a lease object).
        keep_last: Keep the newest N checkpoints (None: all).
        keep_best: Also keep the N best by ``best_metric``.
        best_metric: The metric ``keep_best`` ranks by.
        best_mode: ``"min"`` or ``"max"``.
        keep_every: Also keep every checkpoint whose step is a multiple of this.
        compression: ``"zstd"`` or None.
        level: The zstd level.
        snapshot: ``"blocking"`` (copy everything before ``save`` returns) or ``"overlap"``.
        policy: When ``maybe_save`` saves (default: every 1000 steps).
        max_pending: Saves in flight at once before ``save`` waits.
        workers: Encoder threads, also restore's decoder threads (default: the cores this process
            may run on, shared by the ranks on this host as torchrun's ``LOCAL_WORLD_SIZE`` says
            unless a launcher pinned the process to some cores, 1 to 8).
        chunk_size: Bytes per stored chunk, in [4096, MAX_CHUNK_RAW].
        background_nice: How much lower the encoder threads' priority is (Linux).
        mirror: A second root (an ``s3://`` URL, a path or a Backend) each committed checkpoint is
            copied to in the background and verified there (see the README, "A local tier mirrored
            to object storage"); None: no mirror.
        mirror_retention: What the mirror keeps: a dict of the retention options above
            (``{"keep_last": 10}``) or a RetentionPolicy (default: the local root's).
        mirror_max_behind: Committed checkpoints the mirror may lag behind before the oldest one
            waiting is skipped (with a warning; the newest is always uploaded).
        mirror_timeout: Seconds ``close`` (and ``wait(mirror=True)``) waits for uploads.
        mirror_options: Options for the mirror's storage backend (``storage_options``).
        storage_options: Options for an object-store root's client, by fsspec's names (``key``,
            ``secret``, ``endpoint_url``, ``region``...) plus ``timeout``, ``connect_timeout``,
            ``retries``, ``lease_seconds``, ``part_size``, ``upload_concurrency`` (see the README);
            None: credentials and endpoint come from the environment.
        process_group: The ranks saving together, each with a manager on the same root (see the
            README, "Many ranks"). None: the default group when torch.distributed is initialized,
            else this process alone. Constructing, ``save`` and ``restore`` are then collective.
        rank_timeout: Seconds a rank waits for the others' part of a save (or rank 0's commit)
            before the save fails, naming the rank that did not answer; also the longest creating
            the manager waits to connect to the job's store (then for the other ranks).
        replicated: Top-level keys of the state whose tensors are the same on every rank (stored
            once, spread over the ranks); DDP models, FSDP2 modules and their optimizers need no
            mention.
        per_rank: Whose per-rank state ``restore`` gives each rank at another world size:
            ``"error"`` (the default: a CheckpointError naming it), ``"same"`` or ``"rank0"``.
        policy_lead: Several ranks: how many steps after rank 0's time-based policy (or a rank's
            preemption signal) finds a step due every rank saves, the step being announced to all
            through the c10d store meanwhile (see ``asyncckpt.engine.rank_policy``). At least 1.

    Raises:
        ValueError: An option out of range, or ``mirror`` is ``root`` itself.
        TypeError: ``policy`` is not a ``SavePolicy``.
        RootInUseError: Another manager holds ``root``.
        CheckpointError: ``root`` cannot be used.
    """

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
        mirror: str | os.PathLike | Backend | None = None,
        mirror_retention: dict | RetentionPolicy | None = None,
        mirror_max_behind: int = 2,
        mirror_timeout: float = 300.0,
        mirror_options: dict | None = None,
        storage_options: dict | None = None,
        process_group: Any = None,
        rank_timeout: float = 300.0,
        replicated: tuple[str, ...] | list[str] = (),
        per_rank: str = "error",
        policy_lead: int = DEFAULT_LEAD,
    ) -> None:
        if snapshot not in SNAPSHOT_MODES:
            raise ValueError(f"snapshot must be one of {SNAPSHOT_MODES}, got {snapshot!r}")
        if isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 1:
            raise ValueError(f"max_pending must be a positive integer, got {max_pending!r}")
        if not isinstance(chunk_size, int) or not 4096 <= chunk_size <= MAX_CHUNK_RAW:
            raise ValueError(f"chunk_size must be an integer in [4096, {MAX_CHUNK_RAW}] bytes, got {chunk_size!r}")
        # Read-only after this (properties below): the parts built from them keep their own copies.
        self._retention = RetentionPolicy(keep_last, keep_best, best_metric, best_mode, keep_every)
        mirror_policy = _mirror_policy(mirror_retention, self._retention)
        if isinstance(mirror_max_behind, bool) or not isinstance(mirror_max_behind, int) or mirror_max_behind < 1:
            raise ValueError(f"mirror_max_behind must be a positive integer, got {mirror_max_behind!r}")
        if isinstance(mirror_timeout, bool) or not isinstance(mirror_timeout, (int, float)) or not mirror_timeout > 0:
            raise ValueError(f"mirror_timeout must be a positive number of seconds, got {mirror_timeout!r}")
        self._mirror_timeout = float(mirror_timeout)
        self._mirror: _Mirror | None = None
        self._codec = CodecConfig(compression, level)
        if policy is not None and not isinstance(policy, SavePolicy):
            raise TypeError(
                f"policy must be a SavePolicy (EverySteps(n), EverySeconds(s), Adaptive(...) or a subclass), "
                f"got {type(policy).__name__} {policy!r}"
            )
        self.policy: SavePolicy = policy if policy is not None else EverySteps(1000)
        self._max_pending = max_pending
        self._workers = workers or _default_workers()
        self._snapshot = snapshot
        self._pid = os.getpid()  # a forked child gets a copy of this object, but not its threads or lock
        self._due_answer: tuple[int, bool] | None = None  # the last due(step), for maybe_save(step)
        self._fences = Fences()  # overlap mode: the hooks and the copies not yet judged
        self._preemption = Preemption()
        if isinstance(rank_timeout, bool) or not isinstance(rank_timeout, (int, float)) or not rank_timeout > 0:
            raise ValueError(f"rank_timeout must be a positive number of seconds, got {rank_timeout!r}")
        self._per_rank = check_per_rank(per_rank)
        self._replicated = tuple(replicated)
        if not all(isinstance(key, str) for key in self._replicated):
            raise TypeError(f"replicated must name top-level keys of the state (strings), got {replicated!r}")
        self._ranks = join_ranks(process_group, float(rank_timeout))
        # rank 0 (or a process on its own) keeps the root: retention, tag rewrites, the metrics log
        self._owns_root = self._ranks is None or self._ranks.rank == 0
        self._schedule: RankSchedule | None = None  # several ranks: the steps they all save
        if self._ranks is not None and mirror is not None:
            self._ranks.close()
            raise ValueError("mirror= is not supported by a manager of several ranks yet")
        arenas = ArenaPool(pinned=torch.cuda.is_available())
        self._copier = CopyEngine()
        # last before the try: a failure after it must unlock
        self._storage = open_rank_storage(root, storage_options, self._ranks)
        try:
            backend = self._storage.backend
            # A local root is a Path (as it always was); an object store's is its URL.
            self.root: Path | str = backend.root if isinstance(backend, LocalBackend) else backend.location
            self.stats = SaveStats(self.root / METRICS_LOG if isinstance(self.root, Path) and self._owns_root else None)
            catalog = Catalog.of_writer(self._storage, check_tables=self._owns_root)  # retention is the owner's
            self._tags = Tags(self._storage, catalog, writes=self._owns_root)
            if mirror is not None:
                self._mirror = _Mirror(
                    mirror, self._storage.backend, mirror_policy, mirror_max_behind, self._tags.tags_of, mirror_options
                )
                self.stats.mirror_status = self._mirror.status
            pinned = self._mirror.pinned if self._mirror is not None else None
            self._retainer = Retainer(self._tags, self._retention, self.root, pinned=pinned)
            self._pipeline = Pipeline(
                self._storage, self._codec, self._workers, chunk_size, self._on_done, nice=background_nice
            )
            parts = (arenas, self._copier, self._fences, self._pipeline, self._tags, self.stats)
            planner = RankPlanner(self._ranks, self._replicated) if self._ranks is not None else None
            self._admission = Admission(self.root, max_pending, snapshot, *parts, plan=planner)
            if self._ranks is not None:
                self._schedule = RankSchedule(self._ranks, self.policy, policy_lead, take_turn=self._admission.refuse)
        except BaseException:
            if self._mirror is not None:
                self._mirror.close(0.0)
            self._storage.close()  # a failed constructor must not keep the root locked
            raise
        if self._mirror is not None:
            self._start_mirror()
        at_interpreter_exit(self._close_quietly)

    def _start_mirror(self) -> None:
        """Record the mirror in the local root (``ls`` shows where each checkpoint lives), and
        hand it the newest local checkpoint when the mirror has nothing as new (a run that stopped
        before its last upload, or a mirror added to an existing root)."""
        assert self._mirror is not None
        if isinstance(self.root, Path):  # a local tier (the usual case) records its mirror
            write_mirror_file(self.root, self._mirror.location)
        local = self._tags.catalog.newest_known()
        remote = self._mirror.newest_step()
        if local is not None and (remote is None or remote < local):
            self._mirror.submit(local)

    @property
    def retention(self) -> RetentionPolicy:
        """The retention rules given to the constructor (read-only)."""
        return self._retention

    @property
    def codec(self) -> CodecConfig:
        """The compression given to the constructor (read-only)."""
        return self._codec

    @property
    def max_pending(self) -> int:
        """Saves that may be in flight at once (read-only)."""
        return self._max_pending

    @property
    def workers(self) -> int:
        """Encoder threads (read-only)."""
        return self._workers

    @property
    def snapshot(self) -> str:
        """ "blocking" or "overlap" (read-only)."""
        return self._snapshot

    # ---- saving -------------------------------------------------------------------------------

    def prepare(self, state: Any) -> Future:
        """Allocate the host arena for ``state`` on a background thread, ahead of the first save.

        Pinning host memory is slow (about 1-2 GB/s), so this keeps that cost off the first save.

        Args:
            state: The state the next saves will hold.

        Returns:
            A Future that resolves when the arena is ready; ``save`` waits for it if needed.

        Raises:
            CheckpointError: The manager is closed, or used from a forked child.
        """
        self._check_open()
        return self._admission.prepare(state)

    def install_signal_handlers(
        self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
    ) -> None:
        """Opt in to a final checkpoint on preemption.

        On one of ``signals``, the next ``maybe_save`` saves that step whatever the policy says,
        waits for the commit, puts the previous handlers back and re-raises the signal, so it then
        acts as it would have (SIGINT raises KeyboardInterrupt, SIGTERM ends the process...). A
        second such signal before that happens acts at once.

        Several ranks: the rank that gets the signal announces a final step ``policy_lead`` steps
        ahead (the first rank to announce wins); every rank saves that step, waits for the commit
        and raises that signal, whether it received it or not.

        Args:
            signals: The signals that mean preemption.

        Raises:
            RuntimeError: Not called from the main thread.
            CheckpointError: Used from a forked child.
        """
        self._check_owner()
        self._check_open()  # a closed manager's handlers would take a signal nothing acts on
        self._preemption.install(signals)

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
        first, then that failure is raised (as by ``save``). After a preemption signal the step is
        saved and waited for, then the signal acts (see ``install_signal_handlers``).

        Several ranks: every rank saves the same steps. A policy that reads a clock is asked on
        rank 0 only, and every rank saves ``policy_lead`` steps after the step it found due (see
        ``asyncckpt.engine.rank_policy``); call this on every step, on every rank.

        Args:
            step: The training step (an int in [0, MAX_STEP]).
            state: The state to save, as for ``save``.
            metrics: As for ``save``.
            metadata: As for ``save``.
            tags: As for ``save``.

        Returns:
            The save's handle, or None when the step is not due.

        Raises:
            SaveFailedError: An earlier save failed in the background (this one was still made).
            CheckpointError: The manager is closed, or used from a forked child; several ranks: this
                rank heard of a step all ranks save only after it had passed it.
            ValueError: ``step`` out of range.
            TypeError: A state, metrics, metadata or tags that cannot be saved.
        """
        self._check_owner()
        refuse_in_done_callback("CheckpointManager.maybe_save()")  # as save, whether or not the step is due
        try:
            is_due, final = self._decide(step, self._preemption.signum)
        except MissedFinalError as missed:  # no final checkpoint anywhere; the signal acts all the same
            self._preemption.final_save_and_reraise(
                _raising(missed), self._take_background_errors, missed.signum, self._let_others_finish
            )
            return None
        if final is not None:
            self._preemption.final_save_and_reraise(
                lambda: self._save(step, state, metrics, metadata, tags),
                self._take_background_errors,
                final,
                self._let_others_finish,
            )
            return None
        if not is_due:
            return None
        handle, earlier = self._save(step, state, metrics, metadata, tags, tell_policy=True)
        if earlier is not None:
            raise earlier
        self._raise_mirror_error()
        return handle

    def _let_others_finish(self) -> None:
        """Several ranks: rank 0 waits for the others to read the store before its process may end."""
        if self._ranks is not None:
            self._ranks.let_others_finish()

    def _decide(self, step: int, signum: int | None) -> tuple[bool, int | None]:
        """What ``maybe_save(step)`` does, the step counted: whether the policy (or, with several
        ranks, the agreed schedule) says the step is due, and the preemption signal to raise after
        a final save. ``signum``: the preemption signal received and not yet acted on (the async
        manager's handlers are its loop's, so it passes its own)."""
        self.stats.step_seen(time.perf_counter())
        if self._schedule is None and signum is not None:
            return True, signum  # the final save; the policy is not asked
        asked, self._due_answer = self._due_answer, None
        deferred = getattr(self.policy, "deferred", 0)
        if self._schedule is not None:  # several ranks: the final checkpoint waits for the agreed step
            _check_step(step)
            is_due, final = self._schedule.decide(step, signum, asked)
        else:
            is_due, final = self.policy.due(step), None  # always: the policy counts every call
            if asked is not None and asked[0] == step:
                is_due = asked[1]  # what due(step) told the caller, who may have computed metrics for it
        self.stats.deferred_saves += getattr(self.policy, "deferred", 0) - deferred
        return is_due, final

    def due(self, step: int) -> bool:
        """Whether ``maybe_save(step)`` would save now, without changing the policy's state.

        For a loop that computes an expensive metric only for the checkpoints it goes into: the
        next ``maybe_save`` of the same step follows this answer.

        Args:
            step: The training step.

        Returns:
            The policy's answer; True after a preemption signal. Several ranks: whether an
            announced step is reached (the announcements heard so far; one heard later for this
            very step still makes ``maybe_save(step)`` save, so that every rank does).

        Raises:
            ValueError: ``step`` out of range.
            CheckpointError: Used from a forked child.
        """
        self._check_owner()
        _check_step(step)
        if self._schedule is not None:
            answer = self._schedule.peek(step)
        else:
            answer = self._preemption.signum is not None or self.policy.peek(step)
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
        and metadata never reach this checkpoint.

        Args:
            step: The training step (an int in [0, MAX_STEP]); a committed step is replaced.
            state: Tensors, modules, optimizers, stateful objects, in dicts, lists and tuples.
            metrics: Values retention and ``ls`` read (0-dim tensors accepted).
            metadata: JSON values kept in the manifest.
            tags: Tags; tagged checkpoints are kept by retention.

        Returns:
            The save's handle.

        Raises:
            SaveFailedError: An earlier save failed in the background, naming its step (this save
                was still made, and commits or fails on its own).
            CheckpointError: The manager is closed, or used from a forked child.
            ValueError: ``step`` out of range.
            TypeError: A state, metrics, metadata or tags that cannot be saved.
        """
        handle, earlier = self._save(step, state, metrics, metadata, tags)
        if earlier is not None:
            raise earlier
        self._raise_mirror_error()
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
        before it reaches the writer.
        """
        began = time.perf_counter()
        self._check_open()
        try:
            # on the writer thread, a save could wait for a free slot behind the saves it holds up
            refuse_in_done_callback("CheckpointManager.save()")
            _check_step(step)
        except (ValueError, CheckpointError):
            self._admission.refuse(0)  # its turn in a multi-rank agreement, refused (0: any int)
            raise
        handle = self._admission.save(step, began, state, metrics, metadata, tags, self.policy if tell_policy else None)
        return handle, self._take_background_errors()

    def _on_done(self, job: SaveJob, path: CheckpointRef | None) -> None:
        """Writer thread, before the handle resolves: free the arena, record the tags, apply
        retention, log."""
        self._admission.finished(job)
        try:
            self._tags.finished(job, path)
            if path is not None and self._owns_root:
                if self._mirror is not None:
                    self._mirror.submit(job.step)  # before retention: a step to upload is pinned
                self._retainer.apply(protect=job.step)
        finally:
            self.stats.finished(job.record)
            self.policy.committed(job.record)

    def _take_background_errors(self) -> SaveFailedError | None:
        return self._admission.take_errors()

    def wait(self, *, mirror: bool = False) -> None:
        """Block until every pending save has committed or failed.

        Args:
            mirror: Also wait (at most ``mirror_timeout`` seconds) until every committed checkpoint
                handed to the mirror is uploaded and verified there, or failed.

        Raises:
            SaveFailedError: A save failed that no caller has seen fail yet.
            CheckpointError: Used from a forked child or a save's done-callback; an upload to the
                mirror failed (naming the step, the object and the cause), or ``mirror`` and the
                uploads outlasted the timeout.
        """
        self._check_owner()
        refuse_in_done_callback("CheckpointManager.wait()")
        self._fences.fence()
        self._admission.wait_pending()
        self._raise_background_errors()
        late = self._mirror.wait(self._mirror_timeout) if mirror and self._mirror is not None else None
        self._raise_mirror_error()
        if late is not None:
            assert self._mirror is not None
            what = f"the tags of step {late.step} are" if late.tags_only else f"step {late.step} is"
            still = "being written" if late.tags_only else "uploading"
            raise CheckpointError(
                f"asyncckpt mirror: {what} not in the mirror {self._mirror.location} after "
                f"mirror_timeout={self._mirror_timeout} s (still {still})"
            )

    def _raise_mirror_error(self) -> None:
        error = self._mirror.take_error() if self._mirror is not None else None
        if error is not None:
            raise error

    def _raise_background_errors(self) -> None:
        error = self._take_background_errors()
        if error is not None:
            raise error

    # ---- reading ------------------------------------------------------------------------------

    def steps(self) -> list[int]:
        """The committed steps.

        Returns:
            The steps, oldest first.

        Raises:
            CheckpointError: Used from a forked child.
        """
        self._check_owner()
        if not self._owns_root:  # rank 0 applies retention: list the root
            return [c.step for c in self._storage.checkpoints()]
        return self._tags.catalog.steps()

    @overload
    def restore(self, state: Any, step: int | None = None, *, strict: Literal[True] = True) -> int | None: ...
    @overload
    def restore(self, state: Any, step: int | None = None, *, strict: Literal[False]) -> RestoreResult: ...
    @overload
    def restore(self, state: Any, step: int | None = None, *, strict: bool) -> int | RestoreResult | None: ...
    def restore(self, state: Any, step: int | None = None, *, strict: bool = True) -> int | RestoreResult | None:
        """Load the newest valid checkpoint (or ``step``) into ``state`` in place.

        Damaged checkpoints are skipped with a warning; the state is only touched once a checkpoint
        fully verified and the whole live state was checked against it: key sets of every dict,
        module and optimizer, shapes, and that every live tensor can be written in place (not a
        meta tensor, an ``expand()`` view or an inference tensor). Pending saves are waited for first.
        With a mirror, the newest step that verifies in either tier is read, each step from the
        local root first: an empty, deleted or damaged local root restores from the mirror (with a
        warning).

        Args:
            state: The live state to update in place: a dict, a list, or a model, optimizer or tensor
                saved on its own.
            step: The step to restore (default: the newest valid one).
            strict: False restores the matching part, leaves the rest as it is (keys found only in
                the checkpoint are inserted into plain dicts), as ``load_state_dict(strict=False)``.

        Returns:
            With ``strict=True``: the restored step, or None when the root holds no checkpoint.
            With ``strict=False``: a RestoreResult (step, missing_keys, unexpected_keys, skipped), a
            different type, so a caller who opts in cannot overlook the lists.

        Raises:
            StateMismatchError: The state does not fit the checkpoint (strict), or shapes or an
                optimizer's param groups differ (either mode); nothing changed.
            CheckpointNotFoundError: No checkpoint for ``step``.
            CheckpointDamagedError: No checkpoint of the root verifies.
            CheckpointError: The manager is closed, or used from a forked child.
            TypeError: ``state`` cannot be updated in place (not a dict, list, stateful object or
                tensor), or ``strict`` not a bool.
        """
        self._check_open()
        refuse_in_done_callback("CheckpointManager.restore()")  # it waits for the pending saves
        check_strict(strict)
        if not isinstance(state, (dict, list, torch.Tensor)) and not is_stateful(state):
            raise TypeError(
                "restore updates the state in place: a dict, a list, a module, an optimizer (an object with "
                f"state_dict/load_state_dict) or a tensor, not {type(state).__name__!r}; asyncckpt.load reads any "
                "checkpoint"
            )
        if step is not None:
            _check_step(step)
        self._fences.fence()
        self._admission.wait_pending()
        if self._ranks is not None:
            restored = restore_ranks(
                state,
                self._storage.backend,
                self._ranks,
                step,
                strict=strict,
                per_rank=self._per_rank,
                replicated=self._replicated,
                workers=self._workers,
            )
            at = restored.step if isinstance(restored, RestoreResult) else restored
            if self._schedule is not None and at is not None:
                self._schedule.reset()  # every rank restored (maybe an earlier step): a new timeline
            return restored
        if self._mirror is not None:
            loaded = read_newest_valid_of_tiers(
                self._storage.backend, self._mirror.root, step, self._workers, self._mirror.location
            )
        else:
            loaded = read_newest_valid(self._storage.backend, step, self._workers)
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
        its checkpoint when it commits); tagged checkpoints are kept by retention.

        Args:
            step: The step.
            *tags: The tags to add.

        Returns:
            The step's tags afterwards.

        Raises:
            CheckpointNotFoundError: No committed checkpoint and no save in flight for ``step``.
            CheckpointError: The manager is closed, or the manifest could not be rewritten.
            ValueError: A bad step or tag.
        """
        self._check_open()
        _check_step(step)
        now = self._tags.retag(
            step, lambda have: have + [t for t in check_tags(list(tags), "tags") if t not in have], self.root
        )
        if self._mirror is not None:
            self._mirror.retag(step, tuple(now))
        return now

    def untag(self, step: int, *tags: str) -> list[str]:
        """Remove tags (all of them when none are named), also from a save still in flight; the
        checkpoint is then subject to retention again, from the next commit on.

        Args:
            step: The step.
            *tags: The tags to remove; none removes all.

        Returns:
            The step's tags afterwards.

        Raises:
            CheckpointNotFoundError: No committed checkpoint and no save in flight for ``step``.
            CheckpointError: The manager is closed, or the manifest could not be rewritten.
            ValueError: A bad step.
        """
        self._check_open()
        _check_step(step)
        now = self._tags.retag(step, lambda have: [t for t in have if tags and t not in tags], self.root)
        if self._mirror is not None:
            self._mirror.retag(step, tuple(now))
        return now

    def discard_after(self, step: int, *, include_tagged: bool = False) -> list[int]:
        """Delete every committed checkpoint above ``step``, in the root and in its mirror: a rollback.

        ``restore`` resumes from the highest step, so after training was rolled back to ``step``
        (``restore(state, step=step)``) the abandoned run's later checkpoints are what the next crash
        would resume, and ``keep_last`` deletes the new run's checkpoints as they commit. Pending
        saves finish first (one above ``step`` is deleted too), their retention deleting nothing at
        or below ``step`` meanwhile; the mirror's copies of steps above ``step`` are dropped, or
        stopped before they publish, and handed back if nothing is deleted. With several ranks,
        call it on every rank with the same step: rank 0 deletes.

        Args:
            step: The step rolled back to; it stays.
            include_tagged: Also delete the checkpoints above ``step`` that are tagged, or whose
                manifest cannot be read (their tags are unknown); else they are refused.

        Returns:
            The steps above ``step``, deleted from either tier, oldest first.

        Raises:
            CheckpointNotFoundError: ``step`` is not a readable checkpoint of the root or the
                mirror (nothing deleted: a mistyped step would take every checkpoint above it).
            CheckpointDamagedError: ``step`` verifies in neither (nothing deleted: a rollback to
                it would leave no checkpoint that restores).
            CheckpointError: Checkpoints above ``step`` are (or may be) tagged and not
                ``include_tagged``, or the ranks passed different steps (nothing deleted); one
                could not be deleted (naming it; call it again to finish); the manager is closed,
                or used from a forked child or a done-callback.
            ValueError: ``step`` out of range.
        """
        self._check_open()
        refuse_in_done_callback("CheckpointManager.discard_after()")
        try:
            _check_step(step)
        except ValueError:
            if self._ranks is not None:  # the others must not wait for this rank's vote
                self._agree_on_discard(None, True)
            raise
        with contextlib.ExitStack() as held:
            held.enter_context(self._retainer.holding(step))  # the saves waited for must not prune at or below
            if self._mirror is not None:
                held.enter_context(self._mirror.holding(step))
            self._admission.wait_handed_over()  # saves other threads are snapshotting
            self._fences.fence()
            self._admission.wait_pending()
            refusal: Exception | None
            try:
                tiers = {"root": self._tags.catalog.infos()}  # on every rank, before rank 0 deletes
                if self._mirror is not None:
                    tiers["mirror"] = self._mirror.infos()
                refusal = self._discard_refusal(step, tiers, include_tagged)
            except Exception as exc:  # noqa: BLE001 - raised below, after the others heard of it
                refusal = exc
            if self._ranks is not None:
                self._agree_on_discard(step, refusal is not None)
            if refusal is not None:
                raise refusal
            failure = self._delete_above(step) if self._owns_root else None
            if self._ranks is not None:
                deleted = self._ranks.all_ok(failure is None, f"discard the checkpoints after step {step}")
                if not deleted and failure is None:
                    failure = CheckpointError(
                        f"discard_after({step}): rank 0 could not delete every checkpoint above it in {self.root} "
                        "(its error names the step); call it again to finish"
                    )
                if not self._owns_root:
                    self._tags.catalog.forget_above(step)  # rank 0 deleted them
        if failure is not None:
            raise failure
        return sorted({info.step for infos in tiers.values() for info in infos if info.step > step})

    def _delete_above(self, step: int) -> CheckpointError | None:
        """Rank 0's part of ``discard_after``: the mirror first, then the root; the failure, if any."""
        went: list[int] = []
        for tier in ("mirror", "root"):  # as asyncckpt prune --after
            try:
                if tier == "mirror" and self._mirror is not None:
                    went = self._mirror.discard_above(step, self._mirror_timeout)
                elif tier == "root":
                    with self._tags.lock:  # not while retention deletes
                        self._tags.catalog.delete_above(step)
            except CheckpointError as exc:
                before = f"deleted steps {went} from the mirror, then " if went else ""
                failure = CheckpointError(f"discard_after({step}): {before}in the {tier} of {self.root}: {exc}")
                failure.__cause__ = exc
                return failure
        return None

    def _discard_refusal(
        self, step: int, tiers: dict[str, list[CheckpointInfo]], include_tagged: bool
    ) -> CheckpointError | None:
        """Why ``discard_after(step)`` must delete nothing, or None."""
        found = [info for infos in tiers.values() for info in infos if info.step == step]
        if not any(info.unreadable is None for info in found):
            where = " or in its mirror" if self._mirror is not None else ""
            why = f"its manifest cannot be read ({found[0].unreadable})" if found else "it is not committed"
            return CheckpointNotFoundError(
                f"discard_after({step}): step {step} cannot be rolled back to in {self.root}{where}: {why}; "
                "nothing deleted"
            )
        tagged = tagged_above(tiers, step) if self._owns_root else []  # the tags are rank 0's
        if tagged and not include_tagged:
            return CheckpointError(
                f"discard_after({step}): tagged checkpoints above it: {tagged}; nothing deleted. Pass "
                "include_tagged=True to delete them too"
            )
        return self._unverified(step) if self._owns_root else None  # rank 0 deletes: it checks

    def _unverified(self, step: int) -> CheckpointError | None:
        """Why ``step`` verifies in neither tier, or None: a rollback to a damaged checkpoint would
        delete every good one above it and leave nothing that restores."""
        tiers = {"root": self._tags.catalog.checkpoints()}
        if self._mirror is not None:
            tiers["mirror"] = self._mirror.checkpoints()
        reasons = why_no_tier_verifies(step, tiers)
        if reasons is None:
            return None
        return CheckpointDamagedError(
            f"discard_after({step}): step {step} cannot be rolled back to in {self.root}: it does not verify "
            f"({'; '.join(reasons) or 'it is gone'}); nothing deleted"
        )

    def _agree_on_discard(self, step: int | None, refused: bool) -> None:
        """Every rank asks for the same step, and none refused it, before rank 0 deletes a thing.

        A rank whose step is not one (``None``) still takes its turn, refusing: the others then fail
        at once, naming a refusal, instead of waiting ``rank_timeout`` for a vote that never comes."""
        assert self._ranks is not None
        mine = [step, -step] if step is not None else [_NO_STEP, _NO_STEP]  # no part in the max
        highest, lowest, refusals = self._ranks.all_max_each(
            [*mine, int(refused)], "discard the checkpoints after a step together"
        )
        if step is None:
            return
        if highest != -lowest:
            raise CheckpointError(
                f"discard_after: the ranks passed different steps (from {-lowest} to {highest}); nothing deleted"
            )
        if refusals and not refused:
            raise CheckpointError(
                f"discard_after({step}): another rank refused it (its error says why); nothing deleted"
            )

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
        if self._admission.closed:
            raise CheckpointError(f"CheckpointManager({self.root}) is closed")

    def close(self) -> None:
        """Finish pending saves, stop the background threads, release the root's lock.

        Idempotent. In a forked child it does nothing: the saves, threads and lock are the parent's.

        Raises:
            SaveFailedError: A save failed that no caller has seen fail yet (all is closed anyway).
        """
        if self._admission.closed or self._pid != os.getpid():
            return
        refuse_in_done_callback("CheckpointManager.close()")
        self._admission.close()
        with raised_after(self._preemption.close()):  # a signal no maybe_save took
            self._close_all()

    def _close_all(self) -> None:
        """``close``'s work once admission is closed and the signal handlers are off."""
        if self._schedule is not None:
            self._schedule.close()
        try:
            self._admission.wait_handed_over()
            self._fences.fence()
            self._admission.wait_pending()
        finally:
            self._fences.close()  # abandons copies only if a fence was interrupted: the writer must not wait forever
            self._pipeline.close()
            self._copier.close()
            self._admission.arenas.clear()
            for owed in self._tags.write_owed():  # the writer is stopped: nothing else writes them now
                warnings.warn(f"asyncckpt: tags lost (closed unable to write them): {owed}", stacklevel=3)
            try:
                # before the local root's lock goes: the uploads still read its checkpoints
                mirror_error = self._mirror.close(self._mirror_timeout) if self._mirror is not None else None
            finally:
                self._storage.close()
                if self._ranks is not None:
                    self._ranks.close()
        earlier = self._take_background_errors()
        if earlier is not None:
            if mirror_error is not None:  # never lost: said, while the save's failure is raised
                warnings.warn(str(mirror_error), stacklevel=3)
            raise earlier
        if mirror_error is not None:
            raise mirror_error

    def _close_quietly(self) -> None:
        try:
            self.close()
        except CheckpointError as exc:
            warnings.warn(f"asyncckpt: {exc}", stacklevel=2)

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self._close_quietly()  # never hide the user's exception behind ours

    def __repr__(self) -> str:
        return f"CheckpointManager({str(self.root)!r}, policy={self.policy!r})"
