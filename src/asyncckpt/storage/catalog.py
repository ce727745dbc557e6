"""The catalog: the one list of a root's committed checkpoints, with the step, metrics and tags of
each, read from its manifest. The manager's retention, steps and tags, and ``asyncckpt prune`` and
``ls`` all read it here, so a rule (tags protect a checkpoint, say) cannot hold for one and not for
the other.

A writer's catalog lists through its commit protocol (what the protocol counts as committed) and
deletes through it; a reader's catalog lists the root as readers do, without a lock.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import cast

from asyncckpt._in_order import in_order
from asyncckpt.engine.reader import read_manifest
from asyncckpt.errors import CheckpointError
from asyncckpt.retention import CheckpointInfo
from asyncckpt.storage.backend import Backend, open_backend
from asyncckpt.storage.commit import CommitProtocol, CommittedCheckpoint, published_checkpoints
from asyncckpt.storage.local import list_checkpoints

# manifests read at once from a remote store; each may fetch its rank tables 16 at once too, so
# at most 64 requests are in flight (within an S3 client's usual connection pool)
_REMOTE_MANIFEST_READS = 4


def _remote(checkpoint: CommittedCheckpoint) -> bool:
    return checkpoint.ref.backend.capabilities.remote


def _to_read(info: CheckpointInfo | None) -> bool:
    """Not known yet, or found unreadable (the store may have failed only for now)."""
    return info is None or info.unreadable is not None


def checkpoint_info(checkpoint: CommittedCheckpoint, *, check_tables: bool = True) -> CheckpointInfo:
    """What retention knows of one checkpoint, read from its manifest.

    Args:
        checkpoint: A committed checkpoint.
        check_tables: Also read and check a multi-rank checkpoint's rank tables. Where retention
            runs, a checkpoint one of whose tables cannot be read (missing, damaged, or written by
            a newer version) must count as unreadable, so that it never costs an older one this
            version can load; elsewhere, reading every rank's table on every rank is waste.

    Returns:
        Its step, metrics and tags. A checkpoint whose manifest cannot be read is marked so, with
        the reason: its tags are unknown, so retention keeps it rather than guess.
    """
    try:
        manifest = read_manifest(checkpoint.ref, rank_tables=check_tables)
    except CheckpointError as exc:
        return CheckpointInfo(checkpoint.step, {}, unreadable=str(exc))
    return CheckpointInfo(checkpoint.step, manifest.metrics, tuple(manifest.tags))


class Catalog:
    """The committed checkpoints of one root and what is known of each.

    What is known is guarded by a lock of its own, never held across I/O (listing, reading a
    manifest, deleting): a save asking for the newest step never waits for retention removing a
    big checkpoint. Callers that need a listing and a deletion to agree serialise them themselves.

    The metrics and tags of a checkpoint are read from its manifest once and kept; the writer tells
    the catalog what it commits or retags (:meth:`record`), so retention never re-reads manifests.
    A checkpoint found unreadable is read again each time: a store that failed for a moment must
    not keep it from retention until the next run.

    Args:
        listing: Lists the committed checkpoints, oldest first.
        deleting: Deletes one (None: a read-only catalog).
    """

    def __init__(
        self,
        listing: Callable[[], list[CommittedCheckpoint]],
        deleting: Callable[[CommittedCheckpoint], None] | None = None,
        *,
        check_tables: bool = True,
    ) -> None:
        self._listing = listing
        self._deleting = deleting
        self._check_tables = check_tables
        self._infos: dict[int, CheckpointInfo] = {}
        self._infos_lock = threading.Lock()

    @classmethod
    def of_writer(cls, protocol: CommitProtocol, *, check_tables: bool = True) -> Catalog:
        """The catalog of a root open for writing, listed and deleted through its commit protocol.

        Args:
            protocol: The root's commit protocol (holding its lock).
            check_tables: As ``checkpoint_info``'s: False on a rank that applies no retention.

        Returns:
            The catalog, with every checkpoint's manifest read.

        Raises:
            CheckpointError: The root cannot be listed.
        """
        catalog = cls(protocol.checkpoints, protocol.delete, check_tables=check_tables)
        catalog.infos()
        return catalog

    @classmethod
    def of_reader(cls, root: str | os.PathLike | Backend) -> Catalog:
        """The catalog of a root as a reader sees it (no lock; nothing can be deleted).

        Args:
            root: The checkpoint root: a local path, a URL, or its Backend.

        Returns:
            The catalog; manifests are read when first asked for.
        """
        if isinstance(root, (str, os.PathLike)) and "://" not in os.fspath(root):
            path = Path(root)
            return cls(lambda: list_checkpoints(path))
        backend = open_backend(root)
        return cls(lambda: published_checkpoints(backend))

    def checkpoints(self) -> list[CommittedCheckpoint]:
        """The committed checkpoints now, oldest first.

        Returns:
            One entry per committed step.

        Raises:
            CheckpointError: The root cannot be listed.
        """
        return self._listing()

    def steps(self) -> list[int]:
        """The committed steps now, oldest first.

        Returns:
            The step numbers.
        """
        return [c.step for c in self.checkpoints()]

    def find(self, step: int) -> CommittedCheckpoint | None:
        """The committed checkpoint of ``step``.

        Args:
            step: A step number.

        Returns:
            The checkpoint, or None when the step is not committed.
        """
        return next((c for c in self.checkpoints() if c.step == step), None)

    def entries(self) -> list[tuple[CommittedCheckpoint, CheckpointInfo]]:
        """Every committed checkpoint with its metrics and tags, oldest first.

        Returns:
            (checkpoint, info) pairs; an info with ``unreadable`` set where the manifest cannot be
            read.
        """
        checkpoints = self.checkpoints()
        with self._infos_lock:
            infos = {c.step: self._infos.get(c.step) for c in checkpoints}
        todo = [c for c in checkpoints if _to_read(infos[c.step])]
        for checkpoint, info in zip(todo, self._read_infos(todo), strict=True):
            with self._infos_lock:
                recorded = self._infos.get(checkpoint.step)
                if _to_read(recorded):  # not what the writer recorded meanwhile
                    self._infos[checkpoint.step] = info
                infos[checkpoint.step] = self._infos[checkpoint.step]
        return [(c, cast(CheckpointInfo, infos[c.step])) for c in checkpoints]

    def _read_infos(self, checkpoints: list[CommittedCheckpoint]) -> list[CheckpointInfo]:
        """Each checkpoint's info, read from its manifest: several at once on a remote store, where
        each manifest is a request with a round trip (listing a bucket of 100 checkpoints one by
        one waits for 100 of them in turn)."""

        def read(checkpoint: CommittedCheckpoint) -> CheckpointInfo:
            return checkpoint_info(checkpoint, check_tables=self._check_tables)

        at_once = _REMOTE_MANIFEST_READS if checkpoints and _remote(checkpoints[0]) else 1
        return in_order(read, checkpoints, at_once, "asyncckpt-catalog")

    def infos(self) -> list[CheckpointInfo]:
        """The metrics and tags of every committed checkpoint, oldest first.

        Returns:
            One CheckpointInfo per committed step.
        """
        return [info for _, info in self.entries()]

    def newest_known(self) -> int | None:
        """The newest step the catalog knows of, without listing the root.

        Returns:
            The step, or None when none is known.
        """
        with self._infos_lock:
            return max(self._infos, default=None)

    def known(self, step: int) -> CheckpointInfo | None:
        """What the catalog holds of ``step``, without listing the root or reading its manifest.

        Returns:
            The info recorded or read last, or None.
        """
        with self._infos_lock:
            return self._infos.get(step)

    def record(self, info: CheckpointInfo) -> None:
        """What a commit or a tag change just wrote into a checkpoint's manifest.

        Args:
            info: The checkpoint's new step, metrics and tags.
        """
        with self._infos_lock:
            self._infos[info.step] = info

    def delete(self, checkpoint: CommittedCheckpoint) -> None:
        """Delete a committed checkpoint through the commit protocol and forget it.

        Args:
            checkpoint: From :meth:`checkpoints`.

        Raises:
            CheckpointError: The catalog is read-only.
            OSError: The protocol could not delete it; it stays committed.
        """
        if self._deleting is None:
            raise CheckpointError("this catalog is read-only: open the root for writing to delete")
        self._deleting(checkpoint)
        with self._infos_lock:
            self._infos.pop(checkpoint.step, None)

    def forget_above(self, step: int) -> None:
        """Forget what is known of the steps above ``step``: another process deleted them (rank 0,
        in a rollback of several ranks), and ``newest_known`` must not name them.

        Args:
            step: The step rolled back to.
        """
        with self._infos_lock:
            for known in [s for s in self._infos if s > step]:
                del self._infos[known]

    def delete_above(self, step: int) -> list[int]:
        """Delete every committed checkpoint above ``step``, newest first (a rollback).

        Args:
            step: The step rolled back to (kept).

        Returns:
            The steps deleted, oldest first.

        Raises:
            CheckpointError: One could not be deleted (naming it, and those deleted before it); it
                and the older ones stay committed.
        """
        deleted: list[int] = []
        for checkpoint in reversed(self.checkpoints()):
            if checkpoint.step <= step:
                break
            try:
                self.delete(checkpoint)
            except (OSError, CheckpointError) as exc:
                done = f"deleted steps {sorted(deleted)}, then " if deleted else ""
                raise CheckpointError(f"{done}failed deleting step {checkpoint.step} ({exc})") from exc
            deleted.append(checkpoint.step)
        return sorted(deleted)
