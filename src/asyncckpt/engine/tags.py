"""Tags of committed checkpoints and of saves still in flight, and what the manager knows of each
committed step (its metrics and tags, which retention decides on).

A tag given while a save of that step is in flight goes into its manifest if the writer has not
written it yet, or is rewritten into the manifest once committed (a "late" tag). A tag given
during a re-save of a committed step also reaches the committed checkpoint, which stays if the
re-save fails. Such a rewrite happens on the writer thread, where no caller sees it fail: when it
does (a full disk, a throttled store), the tags stay owed, kept in the catalog (retention honours
them) and written again after each later save and at close, so a tagged checkpoint does not lose
its protection at the next start.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from pathlib import Path

from asyncckpt.engine.pipeline import SaveJob, _warn_from_writer
from asyncckpt.engine.reader import read_manifest
from asyncckpt.errors import CheckpointError, CheckpointNotFoundError
from asyncckpt.retention import CheckpointInfo
from asyncckpt.storage.backend import CheckpointRef
from asyncckpt.storage.catalog import Catalog
from asyncckpt.storage.commit import CommitProtocol

Change = Callable[[list[str]], list[str]]


class Tags:
    """The metrics and tags of a root's committed steps, and the newest save of each step in flight.

    Two locks, always taken in this order: ``_jobs_lock`` (a save registers its job; the writer
    finishes one) and ``lock`` (``catalog`` and deletions: retention on the writer thread, tag and
    untag on the caller's). A save registers under the first only, so it never waits while the
    writer deletes under the second.

    Args:
        storage: The root's commit protocol (tags are rewritten through it).
        catalog: The root's committed checkpoints with their metrics and tags.

    Attributes:
        catalog: The committed steps, their metrics and tags (read and written under ``lock``).
        lock: Held by whoever reads ``catalog`` or deletes a committed checkpoint.
    """

    def __init__(self, storage: CommitProtocol, catalog: Catalog, writes: bool = True) -> None:
        # False on the ranks other than 0 of a multi-rank job: rank 0 writes the manifests (every
        # rank calling tag() with the same tags is the usual way), the others only answer
        self._writes = writes
        self._storage = storage
        self.catalog = catalog
        self.lock = threading.Lock()
        self._in_flight: dict[int, SaveJob] = {}  # step -> newest save not yet done
        # step -> (its newest registered save, the save that one replaced): kept here, not returned
        # to the caller, so an interrupt right after ``begin`` cannot lose what ``withdraw`` restores
        self._replaced: dict[int, tuple[SaveJob, SaveJob | None]] = {}
        self._jobs_lock = threading.Lock()
        # step -> its committed checkpoint, whose manifest lacks the tags the catalog holds (a
        # rewrite on the writer thread failed); written again by ``write_owed`` (under ``lock``)
        self._owed: dict[int, CheckpointRef] = {}

    def newest_step(self) -> int:
        """The highest committed step.

        Returns:
            The step, or -1 when none is committed.
        """
        newest = self.catalog.newest_known()  # never behind ``lock``: retention holds it while deleting
        return -1 if newest is None else newest

    def tags_of(self, step: int) -> tuple[str, ...] | None:
        """The tags of ``step``'s committed checkpoint as the catalog holds them (those still owed
        to its manifest included), without listing the root: what a mirror's copy must carry.

        Returns:
            The tags, or None when the step is not known committed (or its manifest is unreadable).
        """
        info = self.catalog.known(step)
        return None if info is None or info.unreadable is not None else info.tags

    def begin(self, job: SaveJob) -> None:
        """Register a save about to be handed to the writer: from now on ``retag`` reaches it.

        Args:
            job: The save's job.
        """
        with self._jobs_lock:
            self._replaced[job.step] = (job, self._in_flight.get(job.step))
            self._in_flight[job.step] = job

    def withdraw(self, job: SaveJob) -> None:
        """Undo ``begin`` for a save rolled back before the writer got it: the save of the same step
        it replaced, if still in flight, is the newest again.

        Args:
            job: The rolled-back save's job.
        """
        with self._jobs_lock:
            if self._in_flight.get(job.step) is job:
                newest, replaced = self._replaced.pop(job.step, (job, None))
                if newest is job and replaced is not None and not replaced.handle.done():
                    self._in_flight[job.step] = replaced
                else:
                    del self._in_flight[job.step]

    def finished(self, job: SaveJob, path: CheckpointRef | None) -> None:
        """Writer thread, before the handle resolves: the save is no longer in flight.

        Committed: late tags are written and its metrics and tags recorded. Failed: the tag changes
        given meanwhile are applied to the committed checkpoint of the step, if there is one.

        Args:
            job: The finished save.
            path: Its committed directory, or None if it failed.
        """
        with self._jobs_lock:
            if self._in_flight.get(job.step) is job:
                del self._in_flight[job.step]  # from here on, retag() goes to the committed manifest
                self._replaced.pop(job.step, None)
            if path is not None:
                with self.lock:
                    self._owed.pop(job.step, None)  # its manifest now is this save's
                    self.catalog.record(CheckpointInfo(job.step, job.metrics, tuple(job.tags)))
                    if job.retagged_late:
                        self._write_late_tags(job.step, path, job.tags)
            elif job.changes:
                self._retag_after_failure(job)
            self.write_owed()

    def write_owed(self) -> list[str]:
        """Write the tags still owed to committed manifests (see the module's docstring): after
        each save, and at close.

        Returns:
            One line per checkpoint still owed its tags (none when all were written).
        """
        if not self._owed:
            return []
        left = []
        with self.lock:
            for step, path in list(self._owed.items()):
                info = self.catalog.known(step)
                if info is None or info.unreadable is not None:  # deleted meanwhile
                    del self._owed[step]
                    continue
                try:
                    self._write_tags(path, list(info.tags))
                except Exception as exc:  # noqa: BLE001 - still owed; said at close
                    left.append(f"{path}: tags {list(info.tags)} ({type(exc).__name__}: {exc})")
                else:
                    del self._owed[step]
        return left

    def retag(self, step: int, change: Change, root: Path | str) -> list[str]:
        """Change the tags of ``step``'s committed checkpoint and of a save of it in flight.

        Args:
            step: The step.
            change: The new tag list, given the old one.
            root: The root (for the message).

        Returns:
            The tags after the change (the in-flight save's, if there is one).

        Raises:
            CheckpointNotFoundError: No committed checkpoint and no save in flight for ``step``.
            CheckpointError: The committed manifest could not be rewritten (no save in flight).
            OSError: As CheckpointError.
        """
        with self._jobs_lock:  # not while the writer finishes a save of this step
            job = self._in_flight.get(step)
            with self.lock:  # not while the writer applies retention to this very checkpoint
                checkpoint = self.catalog.find(step)
                if checkpoint is None and job is None:
                    raise CheckpointNotFoundError(
                        f"no committed checkpoint and no save in flight for step {step} in {root}"
                    )
                if checkpoint is not None:
                    # Also when a re-save of the step is in flight: it may fail, and this one stays.
                    try:
                        tags = self._retag_committed(checkpoint.ref, step, change)
                    except (CheckpointError, OSError):
                        if job is None:
                            raise
                        # Replaced by that save meanwhile (it carries the change), or it is retried
                        # on the committed checkpoint if that save fails.
            if job is not None:
                return job.retag(change)
        return tags

    def _retag_committed(self, path: CheckpointRef, step: int, change: Change) -> list[str]:
        """Swap a committed checkpoint's manifest for one with changed tags (under ``lock``); the
        change applies to the tags it is owed, if it is (see the module's docstring)."""
        manifest = read_manifest(path)
        owed = self.catalog.known(step) if step in self._owed else None
        manifest.tags = change(list(manifest.tags if owed is None else owed.tags))
        if self._writes:
            self._storage.replace_manifest(path, manifest.to_json())
        self._owed.pop(step, None)
        self.catalog.record(CheckpointInfo(step, manifest.metrics, tuple(manifest.tags)))
        return manifest.tags

    def _write_tags(self, path: CheckpointRef, tags: list[str]) -> None:
        if self._writes:
            manifest = read_manifest(path)
            manifest.tags = tags
            self._storage.replace_manifest(path, manifest.to_json())

    def _retag_after_failure(self, job: SaveJob) -> None:
        """A re-save of a committed step failed: the tag changes given while it was in flight still
        reach the checkpoint it would have replaced (``retag`` wrote them, unless that raced)."""
        with self.lock:
            checkpoint = self.catalog.find(job.step)
            if checkpoint is None:
                return

            def changed(have: list[str]) -> list[str]:
                return functools.reduce(lambda tags, change: change(tags), job.changes, have)

            try:
                self._retag_committed(checkpoint.ref, job.step, changed)
            except Exception as exc:  # noqa: BLE001 - bookkeeping: warn, never stop the writer
                known = self.catalog.known(job.step)
                if known is None or known.unreadable is not None:
                    _warn_from_writer(
                        f"asyncckpt: the tag changes given while {checkpoint.ref} was re-saved were lost: {exc}"
                    )
                    return
                tags = changed(list(known.tags))
                self.catalog.record(CheckpointInfo(job.step, known.metrics, tuple(tags)))
                self._owe(job.step, checkpoint.ref, tags, exc)

    def _write_late_tags(self, step: int, path: CheckpointRef, tags: list[str]) -> None:
        """Tags changed while the save's manifest was already written: rewrite it, now committed
        (under ``lock``, with the catalog holding ``tags``)."""
        try:
            self._write_tags(path, list(tags))
        except Exception as exc:  # noqa: BLE001 - the checkpoint is committed: never report it failed
            self._owe(step, path, tags, exc)

    def _owe(self, step: int, path: CheckpointRef, tags: list[str], exc: Exception) -> None:
        self._owed[step] = path
        _warn_from_writer(
            f"asyncckpt: the tags {list(tags)} of {path} could not be written to its manifest yet "
            f"({type(exc).__name__}: {exc}); they count for retention here and are written again after "
            "the next save and at close"
        )
