"""The background writer: chunking, parallel encoding, ordered writes, fsync, then the commit.

The writer produces durable data and its chunk table (:class:`WrittenData`) through the storage
backend, builds the manifest, and hands it to the commit protocol (``storage/commit.py``), which
publishes the step: the writer does no path arithmetic and knows nothing of renames.

One writer thread takes save jobs in order; a pool of encoder threads compresses chunks (zstd and
CRC32 release the GIL, so threads scale across cores). At most ``2 x workers`` chunks are encoded
ahead of the writer, which bounds the memory a save needs beyond its arena.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from asyncckpt import _phases, codec
from asyncckpt.engine import overlap
from asyncckpt.engine.chunking import ChunkPlan, piece_cuts, plan_chunks
from asyncckpt.engine.handle import SaveHandle
from asyncckpt.engine.overlap import LazyCopy
from asyncckpt.engine.ranks import Agreement, RankGroup, Vote
from asyncckpt.engine.staging import Arena, Layout
from asyncckpt.errors import CheckpointError, OverlapGuardError, SaveFailedError
from asyncckpt.format import (
    ChunkEntry,
    GlobalEntry,
    Manifest,
    MultiRankManifest,
    PieceEntry,
    RankEntry,
    RankTable,
    rank_file_name,
    seal_of,
    step_dir_name,
)
from asyncckpt.metrics import SaveRecord
from asyncckpt.storage.backend import CheckpointRef, WriteStream
from asyncckpt.storage.commit import CommitProtocol, Staging, user_location

_log = logging.getLogger("asyncckpt")


def _warn_from_writer(message: str) -> None:
    """Warn without ever raising. Under ``-W error`` a warning is an exception, and raised on the
    writer thread it would report a committed checkpoint as failed, or stop the writer with saves
    still waiting on it; the message then goes to the "asyncckpt" logger instead."""
    try:
        warnings.warn(message, stacklevel=1)
    except Exception:  # noqa: BLE001
        _log.warning("%s", message)


@dataclass(frozen=True)
class WrittenData:
    """What the writer hands on once a step's data is durable: the chunk table of its data objects.

    Attributes:
        chunks: Every stored chunk, in logical order, with the data file it sits in.
        stored_bytes: Their stored size in all.
        fsync_began: ``perf_counter`` when making them durable began (``fsync_s`` runs from there
            through the staged manifest).
    """

    chunks: list[ChunkEntry]
    stored_bytes: int
    fsync_began: float


def _table_fields(job: SaveJob, written: WrittenData) -> dict[str, Any]:
    """What a manifest and a rank table both record of a save: the step, the tree, where each
    staged tensor lies in the arena, and the chunks written."""
    return {
        "step": job.step,
        "created": job.record.started,
        "tree": job.tree,
        "tensors": job.layout.entries,
        "chunks": written.chunks,
        "raw_bytes": job.layout.total,
        "stored_bytes": written.stored_bytes,
    }


@dataclass(frozen=True)
class RankSave:
    """One rank's part in a multi-rank save: the group, the agreement every rank takes part in, the
    global tensor table, this rank's pieces, and by piece in how many parts the job splits its
    global tensor's rows (what its chunks are cut for)."""

    group: RankGroup
    agreement: Agreement
    globals: list[GlobalEntry]
    pieces: list[PieceEntry]
    rows_parts: list[int]  # by piece: in how many parts the job splits its global tensor's rows

    @property
    def attempt(self) -> str:
        """The attempt every rank agreed on (the writer waits for the agreement here)."""
        return self.agreement.attempt()


@dataclass(frozen=True)
class AbandonedPart:
    """This rank's part of a multi-rank save that failed on the calling thread after the ranks'
    agreement was issued (a snapshot that raised, an interrupt): the writer still takes its turn
    in the commit and reports the failure, so the other ranks' save fails at once, and in order
    with their other saves, instead of after ``rank_timeout``."""

    step: int
    ranks: RankSave
    reason: str


@dataclass
class SaveJob:
    step: int
    tree: dict
    layout: Layout
    arena: Arena
    handle: SaveHandle
    record: SaveRecord
    metrics: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)
    lazy: LazyCopy | None = None  # overlap mode: copies still running when save() returned
    enqueued: float = 0.0  # perf_counter when save() returned
    tags_written: bool = False  # the manifest was built with the tags as they were then
    # Who owns the job once it may be in the queue: the writer (``taken``) or a rollback
    # (``cancelled``); decided once, under ``Pipeline._accepting_lock`` (``Pipeline.withdraw``).
    taken: bool = False
    cancelled: bool = False
    ranks: RankSave | None = None  # a save of several ranks: this rank's part and the attempt they share
    published: bool = False  # rank 0 of several: published; the others wait to hear its bookkeeping is done
    retagged_late: bool = False  # tags changed after that: the manager rewrites them at the commit
    changes: list[Callable[[list[str]], list[str]]] = field(default_factory=list)  # tag/untag calls, in order
    _tags_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def retag(self, change: Callable[[list[str]], list[str]]) -> list[str]:
        """Change the tags of a save still in flight (the caller, under the manager's lock). The
        change is kept, to apply to a committed checkpoint of the step if this save fails."""
        with self._tags_lock:
            self.changes.append(change)
            self.tags = change(list(self.tags))
            self.retagged_late = self.retagged_late or self.tags_written
            return list(self.tags)

    def tags_for_manifest(self) -> list[str]:
        """The tags the manifest is written with (writer thread); later changes are late ones."""
        with self._tags_lock:
            self.tags_written = True
            return list(self.tags)


class Pipeline:
    def __init__(
        self,
        storage: CommitProtocol,
        config: codec.CodecConfig,
        workers: int,
        chunk_size: int,
        on_done: Callable[[SaveJob, CheckpointRef | None], None],
        nice: int = 0,
    ) -> None:
        self._storage = storage
        self._config = config
        self._chunk_size = chunk_size
        self._workers = workers
        self._on_done = on_done
        self._nice = nice
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="asyncckpt-encode", initializer=self._init_worker)
        self._jobs: queue.Queue[SaveJob | AbandonedPart | None] = queue.Queue()
        self._accepting = True
        self._accepting_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="asyncckpt-writer", daemon=True)
        self._thread.start()

    def submit(self, job: SaveJob) -> None:
        with self._accepting_lock:  # never a job behind the stop sentinel: nobody would take it
            if not self._accepting or not self._thread.is_alive():
                raise CheckpointError("the background writer has stopped (manager closed?)")
            self._jobs.put(job)

    def abandon(self, part: AbandonedPart) -> None:
        """Hand the writer a rank's part that will never come (see :class:`AbandonedPart`); a
        stopped writer takes nothing (the other ranks then fail after ``rank_timeout``)."""
        with self._accepting_lock:
            if self._accepting and self._thread.is_alive():
                self._jobs.put(part)

    def withdraw(self, job: SaveJob) -> bool:
        """Take back a job whose ``submit`` may or may not have queued it (an interrupt can land
        either side of the queue's append). True: the writer will never persist it, so its arena
        and handle can be given back. False: the writer already has it, and it must run its course.
        """
        with self._accepting_lock:
            if job.taken:
                return False
            job.cancelled = True
            return True

    def close(self) -> None:
        with self._accepting_lock:
            self._accepting = False
            self._jobs.put(None)
        self._thread.join()
        self._pool.shutdown(wait=True)

    def _init_worker(self) -> None:
        """Encoder threads yield the CPU to training (Linux: nice applies per thread), and each
        starts an OpenMP team of its own, idle from then on.

        The encoders run no torch kernel on floats (their planes are split in C), so without that
        team they would start none, and libgomp would let training's idle OpenMP threads spin,
        at full priority, on the cores the niced encoders need: libgomp shortens that spin only
        while a process has more OpenMP threads than cores (bench/encoder_threads.py measured a
        single-threaded worker pool persisting 2.6x slower under training for that reason).
        """
        if self._nice > 0 and hasattr(os, "setpriority"):
            try:
                current = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), min(19, current + self._nice))
            except OSError:
                pass
        if torch.get_num_threads() > 1:
            torch.ones(1 << 17).add_(1)  # one parallel region: this thread's team, then idle

    def _run(self) -> None:
        # The writer keeps normal priority: it mostly waits on the disk, and starving it would
        # stretch persist time past the save interval and turn into stall via max_pending.
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if isinstance(job, AbandonedPart):
                self._abandon(job)
                continue
            with self._accepting_lock:
                if job.cancelled:  # withdrawn by a save interrupted after handing it over
                    continue
                job.taken = True
            path: CheckpointRef | None = None
            error: SaveFailedError | None = None
            try:
                path = self._persist(job)
                job.record.ok = True
            except BaseException as exc:  # noqa: BLE001 - every failure must reach the handle
                job.record.ok = False
                job.record.error = f"{type(exc).__name__}: {exc}"
                kind = OverlapGuardError if isinstance(exc, OverlapGuardError) else SaveFailedError
                error = kind(f"save of step {job.step} failed: {type(exc).__name__}: {exc}")
                error.__cause__ = exc
                job.handle._record_failure(error)  # seen by the bookkeeping, before the handle resolves
            try:
                self._on_done(job, path)  # retention and bookkeeping before the handle resolves
            except Exception as exc:  # noqa: BLE001 - bookkeeping must not kill the writer
                _warn_from_writer(f"asyncckpt: bookkeeping after step {job.step} failed: {exc!r}")
            if job.published and job.ranks is not None:
                self._announce_settled(job, job.ranks)
            if error is None:
                job.handle._resolve(user_location(path))  # type: ignore[arg-type]
            else:
                job.handle._fail(error)

    def _encode(self, job: SaveJob, plan: ChunkPlan) -> tuple[codec.EncodedChunk, float, float]:
        """The chunk encoded, with the wall and this thread's CPU seconds it took."""
        _phases.pause("compress")
        began, began_cpu = time.perf_counter(), time.thread_time()
        encoded = codec.encode(job.arena.raw(plan.start, plan.end), plan.group, self._config)
        return encoded, time.perf_counter() - began, time.thread_time() - began_cpu

    @staticmethod
    def _check_guard(job: SaveJob) -> None:
        """Overlap mode, right before the commit: commit only on the training thread's verdict."""
        assert job.lazy is not None
        overlap.check_verdict(job.lazy, job.record)

    @staticmethod
    def _read_gpu_fence_wait(job: SaveJob) -> None:
        """Overlap mode, after the commit: how long training's GPU stream waited at the fence."""
        assert job.lazy is not None
        overlap.read_gpu_fence_wait(job.lazy, job.record, _warn_from_writer)

    def _persist(self, job: SaveJob) -> CheckpointRef:
        record = job.record
        if job.lazy is not None:  # before anything can fail: the arena is not ours until then
            job.lazy.wait_copied()
            record.lazy_copy_s = job.lazy.copy_s
        if job.ranks is not None:
            return self._persist_rank(job, job.ranks)
        staging = self._storage.begin(job.step)
        try:
            written = self._write_data(job, staging)
            manifest = Manifest(
                **_table_fields(job, written),
                metrics=job.metrics,
                metadata=job.metadata,
                tags=job.tags_for_manifest(),
            )
            sealed = manifest.to_json()
            self._storage.stage_manifest(staging, sealed)
            record.fsync_s = time.perf_counter() - written.fsync_began
            began = time.perf_counter()
            self._data_durable_not_published(job)
            checkpoint = self._storage.publish(staging, sealed)
            record.commit_s = time.perf_counter() - began
        except BaseException:
            self._storage.abort(staging)
            raise
        record.persist_s = time.perf_counter() - job.enqueued
        record.raw_bytes = manifest.raw_bytes
        record.stored_bytes = manifest.stored_bytes
        if job.lazy is not None:
            self._read_gpu_fence_wait(job)
        return checkpoint.ref

    def _persist_rank(self, job: SaveJob, ranks: RankSave) -> CheckpointRef:
        """One rank's part of a multi-rank save: its data and rank table made durable in the
        attempt's staging, its vote; then rank 0 publishes when every rank voted for it, and the
        others wait for the outcome (the two-phase commit of ``engine/ranks.py``)."""
        record, group = job.record, ranks.group
        staging = self._storage.begin(job.step, attempt=ranks.attempt)
        try:
            vote = self._write_rank_part(job, ranks, staging)
        except BaseException as exc:
            reason = f"{type(exc).__name__}: {exc}"
            self._report_failure(job.step, ranks, staging, reason)
            raise
        group.vote(ranks.attempt, vote)
        began = time.perf_counter()
        if group.rank != 0:
            outcome = group.outcome(ranks.attempt, job.step)
            if outcome != "committed":
                raise CheckpointError(outcome)
            # its record holds its own part's sizes; rank 0's the whole checkpoint's
            ref = CheckpointRef(self._storage.backend, step_dir_name(job.step))
            raw_bytes, stored_bytes = vote.raw_bytes, vote.stored_bytes
        else:
            ref, raw_bytes, stored_bytes = self._publish_ranks(job, ranks, staging)
        record.commit_s = time.perf_counter() - began
        record.persist_s = time.perf_counter() - job.enqueued
        record.raw_bytes, record.stored_bytes = raw_bytes, stored_bytes
        if job.lazy is not None and group.rank == 0:
            self._read_gpu_fence_wait(job)
        unheard = group.heard_settled(ranks.attempt) if group.rank != 0 else None
        if unheard is not None:
            _warn_from_writer(
                f"asyncckpt: step {job.step} is committed, but rank 0 did not say its retention was done "
                f"({unheard}): steps() on rank {group.rank} may still list checkpoints it deletes"
            )
        return ref

    def _write_rank_part(self, job: SaveJob, ranks: RankSave, staging: Staging) -> Vote:
        """This rank's data and sealed rank table, durable in the staging; overlap mode's verdict
        taken; the vote that says so."""
        record, group = job.record, ranks.group
        written = self._write_data(job, staging, group.rank)
        table = RankTable(
            **_table_fields(job, written),
            rank=group.rank,
            world_size=group.world_size,
            pieces=ranks.pieces,
        )
        sealed = table.to_json()
        name = rank_file_name(group.rank, staging.attempt if staging.unique_names else None)
        _phases.pause("manifest")
        self._storage.backend.write_small(staging.object_name(name), sealed)
        record.fsync_s = time.perf_counter() - written.fsync_began
        self._data_durable_not_published(job)
        _phases.pause("vote")
        return Vote(
            group.rank,
            True,
            table=name,
            data=staging.data_name(group.rank),
            crc32=seal_of(sealed),
            stored_bytes=written.stored_bytes,
            raw_bytes=job.layout.total,
            stall_s=record.stall_s,
        )

    def _votes_not_in_staging(self, step: int, votes: list[Vote], staging: Staging) -> str:
        """Why the ranks' files are not all where rank 0 publishes (one listing of its staging), or
        "". Ranks whose roots are different directories (a node-local path, an NFS mount missing on
        some node) each vote for files rank 0 cannot see: published, such a step could never be
        read, yet would count as the newest and have retention delete the good ones."""
        try:
            present = {entry.name for entry in self._storage.backend.list(staging.prefix)}
        except (CheckpointError, OSError) as exc:
            return f"step {step} was not committed: rank 0 could not list its staging: {exc}"
        for vote in votes:
            missing = [name for name in (vote.table, vote.data) if name not in present]
            if missing:
                return (
                    f"step {step} was not committed: rank {vote.rank}'s {missing[0]} is not in rank 0's "
                    f"{self._storage.backend.describe(staging.prefix)}: every rank must save to the same root "
                    "(a shared filesystem or the same object-store URL), not a directory of its own"
                )
        return ""

    def _publish_ranks(self, job: SaveJob, ranks: RankSave, staging: Staging) -> tuple[CheckpointRef, int, int]:
        """Rank 0: every rank's vote, then the manifest published (or the attempt aborted and every
        rank told why); the checkpoint and its raw and stored sizes."""
        group = ranks.group
        votes = group.collect(ranks.attempt, job.step)
        failed = [v for v in votes if not v.ok]
        reason = ""
        if failed:
            reason = f"step {job.step} was not committed: rank {failed[0].rank} failed: {failed[0].error}"
        else:
            reason = self._votes_not_in_staging(job.step, votes, staging)
        if reason:
            group.announce(ranks.attempt, reason)
            self._storage.abort(staging)
            raise CheckpointError(reason)
        manifest = MultiRankManifest(
            step=job.step,
            created=job.record.started,
            tree={},
            tensors=[],
            chunks=[],
            raw_bytes=sum(v.raw_bytes for v in votes),
            stored_bytes=sum(v.stored_bytes for v in votes),
            metrics=job.metrics,
            metadata=job.metadata,
            tags=job.tags_for_manifest(),
            world_size=group.world_size,
            globals=ranks.globals,
            ranks=[RankEntry(v.table, v.data, v.crc32, v.stored_bytes) for v in votes],
        )
        try:
            sealed = manifest.to_json()
            self._storage.stage_manifest(staging, sealed)
            checkpoint = self._storage.publish(staging, sealed)
        except BaseException as exc:
            group.announce(ranks.attempt, f"step {job.step} was not committed: rank 0 failed to publish: {exc}")
            self._storage.abort(staging)
            raise
        job.published = True  # committed whatever follows: the others are told, then told it settled
        try:
            group.announce(ranks.attempt, "committed")
        except Exception as exc:  # noqa: BLE001 - a lost store connection: the commit stands
            _warn_from_writer(
                f"asyncckpt: step {job.step} is committed, but the other ranks could not be told "
                f"({type(exc).__name__}: {exc}); their saves of it fail after rank_timeout"
            )
        job.record.max_rank_stall_s = max(v.stall_s for v in votes)
        return checkpoint.ref, manifest.raw_bytes, manifest.stored_bytes

    @staticmethod
    def _announce_settled(job: SaveJob, ranks: RankSave) -> None:
        """Rank 0, after its bookkeeping of a committed step (tags, retention, the log): the other
        ranks' saves of it resolve now, so a rank that lists the root after its ``wait`` sees
        what rank 0 left there, never a step its retention is about to delete."""
        try:
            ranks.group.announce_settled(ranks.attempt)
        except Exception as exc:  # noqa: BLE001 - a lost store connection: the commit stands
            _warn_from_writer(
                f"asyncckpt: step {job.step} is committed, but the other ranks could not be told that "
                f"retention is done ({type(exc).__name__}: {exc}); they resolve after their timeout"
            )

    def _report_failure(self, step: int, ranks: RankSave, staging: Staging, reason: str) -> None:
        """This rank's part of the attempt failed (``reason``): its failed vote; rank 0 then waits
        for the others' votes, tells them, and removes the attempt."""
        ranks.group.vote(ranks.attempt, Vote(ranks.group.rank, False, reason))
        if ranks.group.rank == 0:
            self._fail_attempt(step, ranks, staging, reason)

    def _fail_attempt(self, step: int, ranks: RankSave, staging: Staging, reason: str) -> None:
        """Rank 0 failed its own part (``reason``): wait for the others to finish writing (their
        votes), tell them the save failed and why, then remove the attempt."""
        try:
            ranks.group.collect(ranks.attempt, step)
            ranks.group.announce(ranks.attempt, f"step {step} was not committed: rank 0 failed: {reason}")
        finally:
            self._storage.abort(staging)

    def _abandon(self, part: AbandonedPart) -> None:
        """The writer's turn for a part the calling thread could not make: its failed vote (rank 0:
        the others' votes awaited, the failure announced, the attempt removed). Nothing is raised:
        the caller of ``save`` already has the error."""
        ranks = part.ranks
        try:
            attempt = ranks.attempt
        except CheckpointError:
            return  # the ranks did not agree: every rank's save fails without a vote
        try:
            self._report_failure(part.step, ranks, self._storage.begin(part.step, attempt=attempt), part.reason)
        except Exception as exc:  # noqa: BLE001 - the writer must go on
            _warn_from_writer(
                f"asyncckpt: reporting the failed save of step {part.step} to the other ranks failed: {exc!r}"
            )

    def _data_durable_not_published(self, job: SaveJob) -> None:
        """The point between the durable data and the commit: nothing of the step is visible yet, and
        a failure here leaves no trace. Overlap mode's verdict stands here."""
        if job.lazy is not None:
            self._check_guard(job)

    def _write_data(self, job: SaveJob, staging: Staging, rank: int = 0) -> WrittenData:
        """Encode the arena's chunks in parallel and write them in order into one data object of
        ``staging``; return once they are durable. Any failure leaves the encoders stopped (the
        arena is not read any more) and the stream aborted; the caller aborts the staging."""
        record = job.record
        pending: collections.deque[tuple[ChunkPlan, Future]] = collections.deque()
        stream: WriteStream | None = None
        try:
            file = staging.data_name(rank)
            # the raw size bounds the stored one but for codec framing (an object store sizes its parts by it)
            stream = self._storage.backend.open_write(staging.object_name(file), size_hint=job.layout.total)
            ranks = job.ranks
            cuts = None
            if ranks is not None:
                cuts = piece_cuts(job.layout.slots, ranks.pieces, ranks.globals, ranks.rows_parts)
            plans = plan_chunks(job.layout, self._chunk_size, cuts)
            chunks: list[ChunkEntry] = []
            upcoming = iter(plans)
            window = 2 * self._workers
            for plan in upcoming:
                pending.append((plan, self._pool.submit(self._encode, job, plan)))
                if len(pending) >= window:
                    break
            while pending:
                plan, future = pending.popleft()
                encoded, encode_s, encode_cpu_s = future.result()
                record.compress_s += encode_s
                record.compress_cpu_s += encode_cpu_s
                nxt = next(upcoming, None)
                if nxt is not None:
                    pending.append((nxt, self._pool.submit(self._encode, job, nxt)))
                _phases.pause("write")
                began = time.perf_counter()
                offset = stream.append(encoded.data)
                record.write_s += time.perf_counter() - began
                chunks.append(
                    ChunkEntry(
                        file=file,
                        offset=offset,
                        length=len(encoded.data),
                        raw_offset=plan.start,
                        raw_length=plan.end - plan.start,
                        codecs=encoded.codecs,
                        crc32=encoded.crc32,
                    )
                )
            began = time.perf_counter()
            _phases.pause("fsync")
            stream.finish()
            return WrittenData(chunks, sum(c.length for c in chunks), began)
        except BaseException:
            for _, future in pending:  # the arena must not be reused while encoders read it
                future.cancel()
                try:
                    future.result()
                except BaseException:  # noqa: BLE001
                    pass
            if stream is not None:
                stream.abort()
            raise
