"""The mirrored local tier: each checkpoint committed to the local root is copied, in the
background, to a second root (an object store, typically), verified there, and kept there by a
retention of its own.

Why a second tier and not an object-store root: a local commit is as fast as the disk, so the
save's stall and time to durable stay those of a local root; the upload (slow, and at the mercy of
a network) happens behind it, and the node's loss costs at most the checkpoints not yet uploaded.

The mirror (``_Mirror``) holds the remote root open for writing (its writer lock: a lease on an
object store) for the manager's lifetime and runs one thread. The manager hands it each step it
commits; the thread copies that step:

1. the local committed manifest is read and validated;
2. each data object it references is streamed from the local backend into a new object of the
   remote protocol's staging (``begin``), in pieces of ``_PIECE`` bytes: never the whole
   checkpoint in memory;
3. the manifest, its chunk table renamed to the staging's data names and sealed again, is
   published last through the remote commit protocol (manifest-last on an object store: the step
   exists there exactly when its manifest does and verifies);
4. the remote copy is verified: every chunk read back from the remote root and its CRC32 checked;
5. the mirror's retention deletes what it no longer keeps (never the step just uploaded).

A copy carries the tags the local root holds for the step; a tag changed after it was copied is
written into the mirror's manifest by the same thread, between copies (``retag``), so the mirror's
retention keeps what the user tagged.

Bounded lag: the steps committed but not yet in the mirror (the one uploading and those waiting)
are kept at or under ``max_behind`` by dropping the oldest waiting step when a newer one comes: the
one uploading is never abandoned and the newest always waits its turn. A drop warns once per
episode (until the mirror has caught up) and is counted (``status()``, in the manager's
``stats.summary()``). Local retention never deletes a step waiting or uploading (``pinned``).

Errors are never lost: a failed copy or verification is kept (the first one until taken, with
those failing after it) and the manager raises it at its next ``save``, ``wait`` or ``close``,
naming the step, the object and the cause, and those of the later failures. The local checkpoint
stays; the next commit is mirrored as usual.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlsplit, urlunsplit

from asyncckpt.engine.pipeline import _warn_from_writer
from asyncckpt.engine.reader import read_manifest, verify_checkpoint
from asyncckpt.errors import CheckpointDamagedError, CheckpointError, RootInUseError
from asyncckpt.format import Manifest, data_file_rank, step_dir_name
from asyncckpt.retention import CheckpointInfo, RetentionPolicy, steps_to_delete
from asyncckpt.storage.backend import Backend, CheckpointRef, open_backend
from asyncckpt.storage.catalog import Catalog
from asyncckpt.storage.commit import CommitProtocol, CommittedCheckpoint, open_storage
from asyncckpt.storage.local import LocalBackend, read_file_no_follow

# Bytes copied at a time: a few multipart parts' worth, so memory stays small whatever the size.
_PIECE = 8 << 20

MIRROR_FILE = ".asyncckpt-mirror.json"

# Later failures whose messages are told with the first one (beyond: counted).
_TOLD = 3


class Late(NamedTuple):
    """What a wait for the mirror left undone when its time ran out."""

    step: int
    tags_only: bool  # only a tag rewrite of ``step`` (and maybe others) was left


class _Cancelled(Exception):
    """The mirror is closing and its time is up: the upload under way stops."""


def safe_location(location: str) -> str:
    """A mirror location fit to be written down or shown: a URL loses its user, password, query
    and fragment (where credentials may sit); a path is returned as is.

    Args:
        location: A path or URL.

    Returns:
        The location without credentials.
    """
    if "://" not in location:
        return location
    parts = urlsplit(location)
    host = parts.netloc.rpartition("@")[2]  # as written: a bucket's case, an IPv6 host's brackets
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _is_the_local_root(target: str | os.PathLike | Backend, local: Backend, options: dict | None) -> bool:
    """Whether a mirror's target is the root it mirrors (the same directory under another name
    included), so that its lock being taken is told as that mistake, not as another writer."""
    try:
        mirror = open_backend(target, storage_options=options)
    except CheckpointError:
        return False
    if isinstance(mirror, LocalBackend) and isinstance(local, LocalBackend):
        try:
            return os.path.samefile(mirror.root, local.root)
        except OSError:
            return False
    return mirror.location.rstrip("/") == local.location.rstrip("/")


def write_mirror_file(root: Path, location: str) -> None:
    """Record in the local root where its mirror is (``MIRROR_FILE``), so ``asyncckpt ls`` can show
    where each checkpoint lives. Only the location, never credentials (see :func:`safe_location`).
    Best effort: a root where it cannot be written works all the same (``ls --mirror`` then).

    Args:
        root: The local root.
        location: The mirror's location, already free of credentials.
    """
    path = root / MIRROR_FILE
    temp = root / f"{MIRROR_FILE}.{os.getpid()}.tmp"
    try:
        if path.is_symlink():
            return  # never written through a link
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()  # whatever sits at the name (a FIFO would block the open): ours is made anew
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "w") as file:
            file.write(json.dumps({"mirror": location}) + "\n")
        os.replace(temp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            temp.unlink()
        _warn_from_writer(f"asyncckpt: cannot record the mirror in {path}: {exc}")


def read_mirror_file(root: Path) -> str | None:
    """The mirror location a manager recorded in ``root`` (see :func:`write_mirror_file`).

    Args:
        root: A local root.

    Returns:
        The location, or None when none is recorded (or the record cannot be read).
    """
    try:  # a small regular file, never through a link; a FIFO there is refused, not waited on
        value = json.loads(read_file_no_follow(root / MIRROR_FILE, 64 << 10)).get("mirror")
    except (CheckpointError, OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) and value else None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _named(what: str, cause: str) -> str:
    """``what: cause``, unless the cause begins with ``what`` already."""
    return cause if cause.startswith(f"{what}:") else f"{what}: {cause}"


class _Mirror:
    """The remote tier of one manager: the remote root held open for writing, a queue of steps to
    copy and the thread copying them (see the module docstring).

    Args:
        target: The mirror root: a path, a URL or a Backend.
        local: The local root's backend (the copies are read through it).
        retention: What the mirror keeps.
        max_behind: Committed steps allowed not yet in the mirror (>= 1).
        tags_of: The tags the local root holds for a step (None: it holds no such step); a copy
            carries these, not its local manifest's (a tag rewrite there may still be owed).
        storage_options: Options for the remote backend (None: none).

    Raises:
        RootInUseError: Another writer holds the mirror root.
        CheckpointError: The mirror root cannot be opened (no backend for its scheme, bad
            credentials, a missing bucket, an endpoint that does not answer).
    """

    def __init__(
        self,
        target: str | os.PathLike | Backend,
        local: Backend,
        retention: RetentionPolicy,
        max_behind: int,
        tags_of: Callable[[int], tuple[str, ...] | None],
        storage_options: dict | None = None,
    ) -> None:
        self._local = local
        self._tags_of = tags_of
        self._retention = retention
        self._max_behind = max_behind
        try:
            self._storage: CommitProtocol = open_storage(target, storage_options=storage_options)
        except RootInUseError:
            if _is_the_local_root(target, local, storage_options):
                raise ValueError(
                    f"mirror={os.fspath(target) if not isinstance(target, Backend) else target.location!r} is the "
                    f"checkpoint root itself ({local.location}); a mirror is a second place (another disk, an "
                    "object store) that every committed checkpoint is copied to"
                ) from None
            raise
        try:
            self.location = safe_location(self._storage.backend.location)
            self._catalog = Catalog.of_writer(self._storage)
        except BaseException:
            self._storage.close()
            raise
        self._cond = threading.Condition()
        self._waiting: collections.deque[int] = collections.deque()
        self._uploading: int | None = None
        # steps whose tags changed locally, with those tags: rewritten in the mirror's manifests
        self._retags: dict[int, tuple[str, ...]] = {}
        self._retagging: int | None = None
        self._held_back: set[int] = set()  # steps a rollback under way kept from being copied
        self._resubmitted = False  # the step uploading was committed again meanwhile
        # failures not yet raised, with their steps: the first, then the first few after it
        self._errors: list[tuple[int, CheckpointError]] = []
        self._more: list[int] = []  # and the steps of those beyond them
        self._skipped = 0
        self._uploaded = 0
        self._lagging = False  # an episode of skips is under way (warned once)
        self._stopping = False
        self._paused = False  # a rollback deletes in the mirror: no copy starts
        self._floor: int | None = None  # a rollback to this step is under way (``holding``)
        self._cancel = False
        self._queue_differing_tags()
        self._thread = threading.Thread(target=self._run, name="asyncckpt-mirror", daemon=True)
        self._thread.start()

    def _queue_differing_tags(self) -> None:
        """At open: a step whose tags differ between the tiers (a rewrite an earlier manager could
        not finish before it closed) is rewritten in the mirror first."""
        try:
            infos = self._catalog.infos()
        except (CheckpointError, OSError):
            return  # listed again at the first copy; its errors are said then
        for info in infos:
            local = self._tags_of(info.step)
            if local is not None and info.unreadable is None and tuple(info.tags) != local:
                self._retags[info.step] = local

    # ---- the manager's side ---------------------------------------------------------------

    def submit(self, step: int) -> None:
        """A step was committed locally: copy it (after those waiting, which may be skipped).

        Args:
            step: The committed step.
        """
        with self._cond:
            if self._floor is not None and step > self._floor:
                self._held_back.add(step)  # a rollback under way deletes it, or hands it back
                return
            if self._stopping:
                return
            if step in self._waiting:
                self._waiting.remove(step)
            if step == self._uploading:
                self._resubmitted = True
            self._waiting.append(step)
            dropped = []
            while len(self._waiting) > 1 and self._behind() > self._max_behind:
                dropped.append(self._waiting.popleft())
            self._skipped += len(dropped)
            warn = bool(dropped) and not self._lagging
            self._lagging = self._lagging or bool(dropped)
            self._cond.notify_all()
        if warn:
            _warn_from_writer(
                f"asyncckpt: the mirror {self.location} fell {self._max_behind} checkpoints behind the local "
                f"root (uploads are slower than saves): step{'s' if len(dropped) > 1 else ''} "
                f"{', '.join(map(str, dropped))} will not be mirrored, the newest is uploaded next. Skips are "
                "counted in stats.summary()['mirror_skipped']; this warns again only after the mirror caught up"
            )

    def retag(self, step: int, tags: tuple[str, ...]) -> None:
        """The tags of a step changed in the local root: the mirror's copy gets them too, once
        copied (before the next copy starts), so the mirror's retention keeps what the user tagged.
        Until then that retention keeps the step.

        Args:
            step: The step.
            tags: Its tags now (written if the local root no longer knows the step by then).
        """
        with self._cond:
            if not self._stopping:
                self._retags[step] = tags
                self._cond.notify_all()

    def _behind(self) -> int:
        return len(self._waiting) + (self._uploading is not None)

    def _busy(self) -> bool:
        return bool(self._behind() or self._retags or self._retagging is not None)

    def pinned(self) -> set[int]:
        """The steps local retention must keep: waiting to be copied, being copied, or held back by
        a rollback under way (copied after all if it is refused).

        Returns:
            The step numbers.
        """
        with self._cond:
            uploading = {self._uploading} if self._uploading is not None else set()
            return set(self._waiting) | uploading | self._held_back  # held back: copied if a rollback is refused

    def status(self) -> dict[str, int]:
        """How far behind the mirror is, for the stats line.

        Returns:
            ``mirror_behind`` (committed steps not yet in the mirror), ``mirror_skipped`` (steps
            never mirrored because newer ones came), ``mirror_uploaded``.
        """
        with self._cond:
            return {"mirror_behind": self._behind(), "mirror_skipped": self._skipped, "mirror_uploaded": self._uploaded}

    def take_error(self) -> CheckpointError | None:
        """The failure to raise, once: the first copy or verification that failed since last taken,
        its message followed by those of any that failed after it (none is left untold).

        Returns:
            The error, or None.
        """
        with self._cond:
            errors, self._errors = [e for _, e in self._errors], []
            more, self._more = len(self._more), []
        if not errors:
            return None
        error, later = errors[0], errors[1:]
        if not later:
            return error
        told = "".join(f"\nand then: {e}" for e in later)
        if more:
            told += f"\nand {more} more uploads failed"
        combined = CheckpointError(f"{error}{told}")
        combined.__cause__ = error.__cause__
        return combined

    def wait(self, timeout: float | None) -> Late | None:
        """Block until every committed step handed over is in the mirror (or failed), and every
        tag change is written there.

        Args:
            timeout: The most seconds to wait (None: no limit).

        Returns:
            None when done, else what was still under way or waiting when the time ran out.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._busy():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    if self._uploading is not None or self._waiting:
                        return Late(self._uploading if self._uploading is not None else self._waiting[0], False)
                    return Late(self._retagging if self._retagging is not None else min(self._retags), True)
                self._cond.wait(left)
            return None

    def close(self, timeout: float | None) -> CheckpointError | None:
        """Finish the copies (for at most ``timeout`` seconds), stop the thread, release the remote
        root's lock.

        Args:
            timeout: The most seconds the copies still to do may take.

        Returns:
            The error to raise: a copy that failed, or the copy cut short when time ran out.
        """
        late = self.wait(timeout)
        with self._cond:
            self._stopping = True
            if late is not None:
                self._cancel = True
                self._waiting.clear()
                self._retags.clear()
            self._cond.notify_all()
        self._thread.join(None if late is None else 5.0)  # a store that hangs: the lease goes anyway
        self._storage.close()
        error = self.take_error()
        if late is not None:
            where = self._storage.backend.describe(step_dir_name(late.step))
            if late.tags_only:
                text = (
                    f"the tags of step {late.step} were not written to {where} within mirror_timeout={timeout} s "
                    "at close; the next manager on this root writes them if the step is still in the root"
                )
            else:
                text = (
                    f"step {late.step} was not mirrored to {where} within mirror_timeout={timeout} s at close; "
                    "the local checkpoint stays"
                )
            return error or CheckpointError(f"asyncckpt mirror: {text}")
        return error

    def infos(self) -> list[CheckpointInfo]:
        """The metrics and tags of the mirror's committed steps, oldest first.

        Returns:
            One CheckpointInfo per step.

        Raises:
            CheckpointError: The mirror cannot be listed.
        """
        return self._catalog.infos()

    @contextlib.contextmanager
    def holding(self, step: int) -> Iterator[None]:
        """A rollback to ``step`` is under way: no step above it is copied (those waiting are
        dropped, a copy under way is stopped before it publishes, one handed over later is
        ignored) and the mirror's retention deletes nothing at or below it, since the saves the
        rollback waits for would otherwise count steps it deletes.

        Args:
            step: The step rolled back to.
        """
        with self._cond:
            self._floor = step
            self._held_back |= {s for s in self._waiting if s > step}
            self._waiting = collections.deque(s for s in self._waiting if s <= step)
        try:
            yield
        finally:
            with self._cond:
                self._floor = None
                held, self._held_back = sorted(self._held_back), set()
                self._cond.notify_all()
            # a rollback refused or failed deletes nothing: the steps it kept back are copied after all
            for kept in held:
                if self._known_locally(kept):
                    self.submit(kept)

    def _known_locally(self, step: int) -> bool:
        return self._tags_of(step) is not None

    def discard_above(self, step: int, timeout: float | None) -> list[int]:
        """Within :meth:`holding`: the copies pause (the one under way ends first, for at most
        ``timeout`` seconds), the mirror's checkpoints above ``step`` are deleted, newest first,
        and failures of copies above it, not raised yet, are dropped with them.

        Args:
            step: The step rolled back to (kept).
            timeout: The most seconds to wait for the copy or tag rewrite under way.

        Returns:
            The steps deleted, oldest first.

        Raises:
            CheckpointError: The work under way outlasted ``timeout`` (nothing deleted), or a
                checkpoint could not be deleted (see ``Catalog.delete_above``).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self._paused = True
            try:
                while self._uploading is not None or self._retagging is not None:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        busy = self._uploading if self._uploading is not None else self._retagging
                        raise CheckpointError(
                            f"asyncckpt mirror: step {busy} was still being written to {self.location} "
                            f"after {timeout} s; nothing above step {step} deleted there"
                        )
                    self._cond.wait(left)
                self._errors = [(s, e) for s, e in self._errors if s <= step]
                self._more = [s for s in self._more if s <= step]
                self._retags = {s: tags for s, tags in self._retags.items() if s <= step}
            except BaseException:
                self._paused = False
                self._cond.notify_all()
                raise
        try:
            return self._catalog.delete_above(step)
        finally:
            with self._cond:
                self._paused = False
                self._cond.notify_all()

    def checkpoints(self) -> list[CommittedCheckpoint]:
        """The mirror's committed checkpoints, listed now, oldest first.

        Raises:
            CheckpointError: The mirror cannot be listed.
        """
        return self._catalog.checkpoints()

    def newest_step(self) -> int | None:
        """The mirror's newest committed step, listed now (None when it has none or cannot be listed).

        Returns:
            The step, or None.
        """
        try:
            steps = self._catalog.steps()
        except (CheckpointError, OSError):
            return None
        return steps[-1] if steps else None

    def steps(self) -> list[int]:
        """The mirror's committed steps now, oldest first.

        Returns:
            The steps.

        Raises:
            CheckpointError: The mirror cannot be listed.
        """
        return self._catalog.steps()

    @property
    def root(self) -> Backend:
        """The mirror root's backend, for the reader."""
        return self._storage.backend

    # ---- the thread -----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while (not (self._waiting or self._retags) or self._paused) and not self._stopping:
                    self._cond.wait()
                if self._retags and not self._stopping:
                    self._retagging = step = min(self._retags)
                    queued = self._retags.pop(step)
                else:
                    if not self._waiting:
                        return
                    step = self._uploading = self._waiting.popleft()
                    self._resubmitted = False
            if self._retagging is not None:
                self._run_retag(step, queued)
                continue
            error: CheckpointError | None = None
            cancelled = False
            try:
                self._upload(step)
            except _Cancelled:
                cancelled = True
            except CheckpointError as exc:
                error = exc
            except Exception as exc:  # noqa: BLE001 - any failure is reported at the next call, never lost
                error = CheckpointError(f"asyncckpt mirror: step {step} was not mirrored: {_reason(exc)}")
                error.__cause__ = exc
            with self._cond:
                if cancelled and not self._cancel:  # stopped by a rollback: it deletes or hands back the step
                    if self._floor is not None:
                        self._held_back.add(step)
                    elif step not in self._waiting and self._known_locally(step):
                        self._waiting.append(step)  # the rollback was refused while this copy stopped
                elif error is None:
                    self._uploaded += 1
                elif self._resubmitted:
                    pass  # a step committed again meanwhile is copied again: no error
                else:
                    self._keep_error(step, error)
                self._uploading = None
                if not self._waiting:
                    self._lagging = False  # caught up: the next skip warns again
                self._cond.notify_all()

    def _run_retag(self, step: int, queued: tuple[str, ...]) -> None:
        error: CheckpointError | None = None
        try:
            self._retag(step, queued)
        except Exception as exc:  # noqa: BLE001 - reported at the next call, as a failed copy
            error = CheckpointError(
                f"asyncckpt mirror: the tags of step {step} did not reach its copy in {self.location}: {_reason(exc)}"
            )
            error.__cause__ = exc
        with self._cond:
            self._retagging = None
            if error is not None:
                self._keep_error(step, error)
            self._cond.notify_all()

    def _retag(self, step: int, queued: tuple[str, ...]) -> None:
        """Rewrite the mirror's manifest of ``step`` with the tags the local root holds now (those
        ``queued`` with the change when the local root no longer has the step)."""
        local = self._tags_of(step)
        tags = queued if local is None else local
        committed = self._catalog.find(step)
        if committed is None:
            return  # not (or no longer) in the mirror: a copy made later takes the tags then
        manifest = read_manifest(committed.ref)
        if tuple(manifest.tags) != tags:
            manifest.tags = list(tags)
            self._storage.replace_manifest(committed.ref, manifest.to_json())
        self._catalog.record(CheckpointInfo(step, manifest.metrics, tags))

    def _keep_error(self, step: int, error: CheckpointError) -> None:
        """Under ``_cond``: keep a failure to raise (the first, then a few of those after it)."""
        if len(self._errors) <= _TOLD:
            self._errors.append((step, error))
        else:
            self._more.append(step)

    @contextlib.contextmanager
    def _about(self, step: int, what: str) -> Iterator[None]:
        """Any failure inside is a CheckpointError naming the step, ``what`` and the cause (``what``
        once: a backend's error names its object already)."""
        try:
            yield
        except (_Cancelled, CheckpointError) as exc:
            if isinstance(exc, _Cancelled) or "asyncckpt mirror:" in str(exc):
                raise
            raise CheckpointError(f"asyncckpt mirror: step {step} was not mirrored: {_named(what, str(exc))}") from exc
        except Exception as exc:
            raise CheckpointError(
                f"asyncckpt mirror: step {step} was not mirrored: {_named(what, _reason(exc))}"
            ) from exc

    def _upload(self, step: int) -> None:
        name = step_dir_name(step)
        local_where = self._local.describe(name)
        remote = self._storage
        with self._about(step, f"reading {local_where}"):
            manifest = read_manifest(CheckpointRef(self._local, name))
        staging = remote.begin(step)
        try:
            renamed = {}
            for file in sorted({c.file for c in manifest.chunks}):
                target = staging.object_name(staging.data_name(data_file_rank(file)))
                renamed[file] = target.rsplit("/", 1)[-1]
                self._copy(step, f"{name}/{file}", target)
            tags = self._tags_of(step)
            copy = dataclasses.replace(
                manifest,
                chunks=[dataclasses.replace(c, file=renamed[c.file]) for c in manifest.chunks],
                tags=list(manifest.tags if tags is None else tags),
            )
            sealed = copy.to_json()
            with self._about(step, remote.backend.describe(staging.prefix)):
                remote.backend.sync(staging.prefix)
                remote.stage_manifest(staging, sealed)
                self._check_cancel()
                remote.publish(staging, sealed)
        except BaseException:
            remote.abort(staging)
            raise
        self._verify(step, copy)
        self._apply_retention(step, copy)

    def _with_local_tags(self, info: CheckpointInfo) -> CheckpointInfo:
        """``info`` with the tags the local root holds for its step, when it holds it: a tag given
        there counts for the mirror's retention before its rewrite there is done."""
        local = self._tags_of(info.step) if info.unreadable is None else None
        return info if local is None else dataclasses.replace(info, tags=local)

    def _check_cancel(self) -> None:
        """Stop a copy at close when time ran out, or one of a step a rollback is discarding."""
        floor, uploading = self._floor, self._uploading
        if self._cancel or (floor is not None and uploading is not None and uploading > floor):
            raise _Cancelled

    def _copy(self, step: int, source: str, target: str) -> None:
        """Stream one data object from the local root into a new remote object, piece by piece."""
        with self._about(step, self._local.describe(source)):
            handle = self._local.open_read(source)
        try:
            with self._about(step, self._storage.backend.describe(target)):
                stream = self._storage.backend.open_write(target, size_hint=handle.size)
            try:
                buffer = memoryview(bytearray(min(_PIECE, max(handle.size, 1))))
                offset = 0
                while offset < handle.size:
                    self._check_cancel()
                    want = min(len(buffer), handle.size - offset)
                    with self._about(step, self._local.describe(source)):
                        got = handle.read_into(buffer[:want], offset)
                        if got <= 0:
                            raise CheckpointDamagedError(f"ends at byte {offset}, {handle.size} expected")
                    with self._about(step, self._storage.backend.describe(target)):
                        stream.append(bytes(buffer[:got]))  # a copy: a backend may keep it past append
                    offset += got
                with self._about(step, self._storage.backend.describe(target)):
                    stream.finish()
            except BaseException:
                stream.abort()
                raise
        finally:
            handle.close()

    def _verify(self, step: int, manifest: Manifest) -> None:
        """Read every chunk of the remote copy back and check it; a copy that fails is removed."""
        name = step_dir_name(step)
        where = self._storage.backend.describe(name)
        try:
            with self._about(step, f"verifying {where}"):
                verify_checkpoint(CheckpointRef(self._storage.backend, name))
        except CheckpointError:
            committed = self._catalog.find(step)
            if committed is not None:
                try:
                    self._catalog.delete(committed)
                except (CheckpointError, OSError):
                    pass  # unreachable, say: the copy stays, and readers skip it as damaged
            raise
        self._catalog.record(CheckpointInfo(step, manifest.metrics, tuple(manifest.tags)))

    def _apply_retention(self, step: int, manifest: Manifest) -> None:
        """The mirror's own retention, after a verified upload (never the step just uploaded)."""
        try:
            entries = self._catalog.entries()
            committed = {c.step: c for c, _ in entries}
            with self._cond:
                floor, rewriting = self._floor, set(self._retags)
            infos = [self._with_local_tags(info) for _, info in entries]
            for doomed in steps_to_delete(infos, self._retention):
                # never: the step just copied, steps at or below a rollback under way, and steps whose
                # tags are still to be rewritten (they may be tagged)
                if doomed != step and (floor is None or doomed > floor) and doomed not in rewriting:
                    self._catalog.delete(committed[doomed])
        except (CheckpointError, OSError) as exc:
            _warn_from_writer(f"asyncckpt: retention in the mirror {self.location} after step {step} failed: {exc}")
