"""Commit protocols: how a step's durable data becomes a committed checkpoint, and back.

The writer (``engine/pipeline.py``) asks the protocol for a staging place (:meth:`CommitProtocol.begin`),
writes the step's data objects there through the backend and makes them durable, builds the
manifest and hands it to :meth:`CommitProtocol.stage_manifest`, then (after the point where
overlap mode's verdict stands) to :meth:`CommitProtocol.publish`. Any failure before the publish
returns ends in :meth:`CommitProtocol.abort`. Retention deletes with
:meth:`CommitProtocol.delete`, tags change with :meth:`CommitProtocol.replace_manifest`, and a writer
opening a root first runs :meth:`CommitProtocol.recover` (the sweep of what a crash left).

Two protocols, chosen by the backend's capabilities (:func:`open_storage`):

* :class:`RenameCommit` (``atomic_rename``): the step is staged in ``.tmp-step-N-<token>/``; the
  publish writes ``manifest.json`` there, fsyncs the directory and renames it to ``step-N`` (a
  replaced step is parked as ``.replaced-step-N.<token>`` for the moment between the two renames).
  A directory named ``step-N`` therefore always holds a complete checkpoint.
* :class:`ManifestLastCommit` (no rename): data objects go straight into ``step-N/`` under names
  unique to the attempt (``data-NNNNN-<16 hex>.bin``); the sealed manifest, written last as
  ``manifest-<generation>.json``, is the commit record. A step exists exactly when one of its
  manifests exists and verifies; the newest such generation is the step. Re-saving a step writes
  a new generation beside the old one and only then removes the old manifest, then its data.

Durability order of a rename commit (what makes a checkpoint survive power loss):
  1. data files written and fsynced, 2. manifest.json written and fsynced,
  3. the temp dir fsynced (its entries are durable), 4. rename temp dir -> step-N,
  5. the root fsynced (the rename is durable). Retention deletes only after step 5.

Sweeps remove only the exact names the protocol makes, so other tools' files are safe.
"""

from __future__ import annotations

import dataclasses
import os
import re
import secrets
import stat
import threading
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, cast, runtime_checkable

from asyncckpt import _phases
from asyncckpt._in_order import in_order
from asyncckpt.errors import CheckpointError
from asyncckpt.format import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    Manifest,
    check_manifest_seal,
    data_file_name,
    ends_with_seal,
    is_data_file_name,
    is_rank_file_name,
    manifest_generation_name,
    parse_manifest,
    parse_manifest_generation,
    parse_step_dir,
    step_dir_name,
)
from asyncckpt.storage.backend import Backend, CheckpointRef, RenameBackend, describe_file_kind, open_backend

TEMP_PREFIX = ".tmp-"
REPLACED_PREFIX = ".replaced-"

# Every name the rename commit creates in a root (or a checkpoint dir), and nothing else, is swept.
_HEX = "[0-9a-f]{8}"
_SWEPT = re.compile(rf"\.tmp-step-[0-9]{{12}}-{_HEX}|\.tmp-delete-step-[0-9]{{12}}-{_HEX}|\.tmp-replaced-{_HEX}")
_PARKED = re.compile(rf"\.replaced-(step-[0-9]{{12}})\.{_HEX}")
_MANIFEST_TEMP = re.compile(rf"{re.escape(MANIFEST_NAME)}\.\.tmp-{_HEX}")
# The per-attempt data names of the manifest-last commit (the only data names it ever removes
# besides those of a version it superseded).
_ATTEMPT_DATA = re.compile(r"(?:data-[0-9]{5}-([0-9a-f]{16})\.bin|rank-[0-9]{5}-([0-9a-f]{16})\.json)")
_MAX_GENERATION = 10**12 - 1  # manifest-<12 digits>.json


def _attempt_of(name: str) -> str | None:
    """The attempt a per-attempt data file or rank table belongs to, or None for any other name."""
    match = _ATTEMPT_DATA.fullmatch(name)
    return None if match is None else match.group(1) or match.group(2)


def _token() -> str:
    return secrets.token_hex(4)


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


@dataclass(frozen=True)
class CommittedCheckpoint:
    """A committed step as its root lists it.

    Attributes:
        step: The step number.
        ref: Its root's backend and its directory's name (``step-<12 digits>``).
    """

    step: int
    ref: CheckpointRef

    @property
    def path(self) -> Path:
        """Its directory, for a root on the local filesystem.

        Raises:
            CheckpointError: The root is not a local directory (an object store).
        """
        return local_path(self.ref)


def user_location(ref: CheckpointRef) -> Path | str:
    """How a committed checkpoint is shown to a user: its directory for a local root, else its URL.

    Args:
        ref: The checkpoint.

    Returns:
        A Path, or the URL as text.
    """
    root = getattr(ref.backend, "root", None)
    return root / ref.name if isinstance(root, Path) else str(ref)


def local_path(ref: CheckpointRef) -> Path:
    """The local directory of a checkpoint whose root is a local directory.

    Args:
        ref: The checkpoint.

    Returns:
        ``root / name``.

    Raises:
        CheckpointError: The root is not a local directory (an object store).
    """
    root = getattr(ref.backend, "root", None)
    if not isinstance(root, Path):
        raise CheckpointError(f"{ref} is not on the local filesystem")
    return root / ref.name


@dataclass(frozen=True)
class Staging:
    """Where one save attempt of a step writes its data objects, until it is published or aborted.

    Attributes:
        step: The step being saved.
        prefix: The backend name of the directory the attempt writes into.
        attempt: A token unique to this attempt.
        unique_names: Data file names carry the attempt (``data-NNNNN-<attempt>.bin``), because
            they share the directory with a committed version of the step.
    """

    step: int
    prefix: str
    attempt: str
    unique_names: bool = False

    def data_name(self, rank: int) -> str:
        """The data file name recorded in the manifest's chunk table.

        Args:
            rank: The data file's number.

        Returns:
            Its name in the step directory.
        """
        return data_file_name(rank, self.attempt if self.unique_names else None)

    def object_name(self, file: str) -> str:
        """The backend name of the file ``file`` of this attempt.

        Args:
            file: A name from :meth:`data_name`.

        Returns:
            ``prefix/file``.
        """
        return f"{self.prefix}/{file}"


@runtime_checkable
class _ListsNamed(Protocol):
    """A backend that lists every object under a name prefix, at every depth, with its ETag, in one
    (paginated) listing, and reads a small object with the ETag of the version read (an object
    store: :class:`~asyncckpt.storage.objectstore.ObjectStoreBackend`). Listing a root then costs
    one request per page, not a listing per step."""

    def list_named(self, start: str) -> list[tuple[str, str | None]]: ...

    def read_versioned(self, name: str, limit: int) -> tuple[bytes, str | None]: ...


@dataclass
class _StepObjects:
    """What one listing of every object under the steps says of one step directory.

    Attributes:
        names: The names directly under it (objects, and the first part of deeper names).
        manifests: Its manifest names (objects directly under it) and their ETags.
    """

    names: set[str]
    manifests: dict[str, str | None]


def _listed_steps(backend: _ListsNamed, start: str = "step-") -> dict[str, _StepObjects]:
    """The step directories with at least one object under them, from one listing of the names
    beginning with ``start`` (every step, or ``step-N/`` for one)."""
    out: dict[str, _StepObjects] = {}
    for name, etag in backend.list_named(start):
        step_name, sep, rest = name.partition("/")
        if not sep or not rest or parse_step_dir(step_name) is None:
            continue  # an object named like a step is no step directory
        objects = out.setdefault(step_name, _StepObjects(set(), {}))
        child, deeper, _ = rest.partition("/")
        objects.names.add(child)
        if not deeper and parse_manifest_generation(child) is not None:
            objects.manifests[child] = etag
    return out


def _newest_first(names: Iterable[str]) -> list[str]:
    """Manifest names, newest generation first (``manifest.json`` last)."""
    return sorted(names, key=lambda n: (parse_manifest_generation(n) or 0, n), reverse=True)


def newest_manifest(backend: Backend, step_name: str, versions: list[str] | None = None) -> tuple[str, bytes] | None:
    """The committed version of a step written by :class:`ManifestLastCommit`: its newest
    ``manifest-<generation>.json`` (or ``manifest.json``) whose seal verifies.

    Args:
        backend: The root's backend.
        step_name: The step directory's name.
        versions: The step's manifest names, newest first, when a listing just said them (None:
            the step is listed for them).

    Returns:
        The manifest's file name and bytes, or None when no manifest of the step verifies.
    """
    return _scan_manifests(backend, step_name, versions)[0]


def _untagged(manifest: Manifest) -> bytes:
    """A manifest's JSON without its tags: what a tag change leaves as it was (its creation time
    included, which tells two saves of the same tensors apart)."""
    return dataclasses.replace(manifest, tags=[]).to_json()


def _scan_manifests(
    backend: Backend, step_name: str, versions: list[str] | None = None
) -> tuple[tuple[str, bytes] | None, list[str]]:
    """:func:`newest_manifest`, and the newer generations that could not be read at all.

    A writer deletes on what it finds here: the versions a newer one supersedes, an attempt's data
    no manifest names. A generation that verifies no seal can only be a publish cut short (or
    damage); but one that could not be *read* (a store that failed a request for a moment, an I/O
    error) may be the step's committed version. Then nothing of the step may be deleted on the
    strength of an older one: that would remove the newest version's data, or take its manifest
    for cut short.

    Args:
        versions: As :func:`newest_manifest`'s.

    Returns:
        The newest manifest that verifies (name and bytes, or None), and the names of the newer
        generations that exist as regular files of a manifest's size but could not be read.
    """
    unread: list[str] = []
    for name in manifest_versions(backend, step_name) if versions is None else versions:
        where = f"{step_name}/{name}"
        try:
            raw = backend.read_small(where, MAX_MANIFEST_BYTES)
        except CheckpointError:
            if _may_be_committed(backend, where):
                unread.append(name)
            continue
        try:
            check_manifest_seal(raw, backend.describe(where))
        except CheckpointError:
            continue
        return (name, raw), unread
    return None, unread


def manifest_to_read(backend: Backend, step_name: str, versions: list[str] | None = None) -> str | None:
    """Which manifest of a step written by :class:`ManifestLastCommit` a reader reads: the newest
    that verifies, unless a newer one could not be read (a store that failed a request for a
    moment); that one may be the committed version, so it is named instead, and reading it either
    succeeds now or fails as damage (never an older version read in its place without a word).

    Args:
        versions: The step's manifest names, newest first (:func:`manifest_versions`), if the
            caller listed them; else they are listed here.

    Returns:
        The manifest's file name, or None when no manifest of the step verifies.
    """
    newest, unread = _scan_manifests(backend, step_name, versions)
    if unread:
        return unread[0]  # the newest of them
    return None if newest is None else newest[0]


def _may_be_committed(backend: Backend, name: str) -> bool:
    """Whether a manifest that could not be read may still be a committed one: it is there, a
    regular file no larger than a manifest may be (or even that cannot be told now). Gone, a
    link, a FIFO or too large is no manifest a publish writes."""
    try:
        info = backend.stat(name)
    except (CheckpointError, OSError):
        return True
    return info is not None and info.kind == "file" and info.size <= MAX_MANIFEST_BYTES


def _written_by_manifest_last(names: Iterable[str]) -> bool:
    """Whether a step directory's names show the manifest-last commit at work: manifest
    generations, or per-attempt data files."""
    return any(parse_manifest_generation(n) is not None or _ATTEMPT_DATA.fullmatch(n) for n in names)


def _published_listed(backend: Backend, step_name: str, objects: _StepObjects) -> bool:
    """:func:`is_published` of a step with objects under it, from what one listing said of it."""
    if MANIFEST_NAME in objects.names:
        return True
    if not _written_by_manifest_last(objects.names):
        return True  # objects, none of them this protocol's: a damaged checkpoint, reported as such
    return newest_manifest(backend, step_name, _newest_first(objects.manifests)) is not None


def is_published(backend: Backend, step_name: str) -> bool:
    """Whether a ``step-N`` directory counts as a committed checkpoint for a reader listing a root.

    A directory with ``manifest.json`` does (a renamed checkpoint; if it is damaged, reading it
    says so). One with manifest generations or per-attempt data files was written by the
    manifest-last commit, and counts only once one of its manifests verifies: before that it is a
    save under way or cut short, never a damaged checkpoint. A step prefix of an object store with
    no object under it is nothing (stores with directories behind their S3 face, SeaweedFS, keep
    and list an emptied prefix: a delete cut short, a user's ``rm --recursive``). Any other
    directory counts, so a checkpoint that lost its manifest is reported as damaged, as it always
    was.

    The step is listed once: the listing says whether ``manifest.json`` is there and which
    generations to verify (an object store lists every object under the step in that one request).

    Args:
        backend: The root's backend.
        step_name: The step directory's name.

    Returns:
        True when readers should list it.
    """
    if isinstance(backend, _ListsNamed):
        objects = _listed_steps(backend, f"{step_name}/").get(step_name)
        return objects is not None and _published_listed(backend, step_name, objects)
    try:
        entries = backend.list(step_name)
    except CheckpointError:
        return True
    names = [e.name for e in entries]
    if MANIFEST_NAME in names:
        return True
    if not _written_by_manifest_last(names):
        # a local directory always has an identity; an object-store prefix has none when empty
        return backend.identity(step_name) is not None
    versions = [e.name for e in entries if not e.is_dir and parse_manifest_generation(e.name) is not None]
    return newest_manifest(backend, step_name, _newest_first(versions)) is not None


def published_checkpoints(backend: Backend) -> list[CommittedCheckpoint]:
    """The committed checkpoints of a root, oldest first, as a reader (no lock) sees them.

    Entries that are not directories (links among them) are ignored, and so is a step a
    manifest-last save is still writing or was cut short writing (:func:`is_published`). An object
    store is listed once for every step's objects (not once per step), then each step written by
    the manifest-last commit costs one GET, of its newest manifest.

    Args:
        backend: The root's backend.

    Returns:
        The committed checkpoints.

    Raises:
        CheckpointError: The root cannot be listed.
    """
    # A listing is a snapshot: a live writer commits step N+1 and then deletes step N, so a step
    # that vanished while the listing was checked may have a successor the snapshot missed. Then
    # the root is listed again, until no listed step vanishes (an emptied prefix that a store
    # keeps listing vanishes the same way each time: that is no reason to list again).
    vanished_before: set[str] | None = None
    for _ in range(_RELISTS):
        out: list[CommittedCheckpoint] = []
        vanished: set[str] = set()
        for step, step_name, published in _step_dirs(backend):
            if published:
                out.append(CommittedCheckpoint(step, CheckpointRef(backend, step_name)))
            elif backend.identity(step_name) is None:
                vanished.add(step_name)
        if not vanished or (vanished_before is not None and vanished <= vanished_before):
            break
        vanished_before = vanished
    return sorted(out, key=lambda c: c.step)


def _step_dirs(backend: Backend) -> list[tuple[int, str, bool]]:
    """Each step directory one listing of the root shows: its step, its name, and whether it counts
    as committed (:func:`is_published`). An object store is listed once for every step's objects."""
    if isinstance(backend, _ListsNamed):
        listed = list(_listed_steps(backend).items())

        def published(item: tuple[str, _StepObjects]) -> bool:
            return _published_listed(backend, *item)

        answers = in_order(published, listed, _LISTING_READS, "asyncckpt-listing")  # a GET a step: at once
        return [(_step_of(name), name, ok) for (name, _), ok in zip(listed, answers, strict=True)]
    return [
        (_step_of(entry.name), entry.name, is_published(backend, entry.name))
        for entry in backend.list("")
        if entry.is_dir and parse_step_dir(entry.name) is not None
    ]


def _step_of(step_name: str) -> int:
    step = parse_step_dir(step_name)
    assert step is not None, step_name
    return step


_RELISTS = 8
_LISTING_READS = 8  # manifests a reader's listing of an object store verifies at once


def manifest_versions(backend: Backend, step_name: str) -> list[str]:
    """The step's manifest names, newest generation first (``manifest.json`` last): one listing.

    Raises:
        CheckpointError: The step could not be listed.
    """
    return _newest_first(
        entry.name
        for entry in backend.list(step_name)
        if not entry.is_dir and parse_manifest_generation(entry.name) is not None
    )


class CommitProtocol:
    """The interface both protocols implement (see the module docstring for the call order).

    Args:
        backend: The locked backend of the root.
    """

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        # Held by a publish and by a manifest replacement: a tag change (on the caller's thread)
        # then never lands between a re-save's publish and its own check of what it replaces.
        self._publishing = threading.Lock()

    def _check_same_data(self, current: bytes, manifest: bytes, where: str) -> None:
        """Refuse a manifest replacement that changes more than the tags: the step was re-saved
        since the caller read it. Its chunk table may then name data now removed, or be the same
        (the same tensors saved again) while the values, metrics or metadata beside it are not."""
        if _untagged(parse_manifest(current, where)) != _untagged(parse_manifest(manifest, where)):
            raise CheckpointError(f"{where} was replaced by a new save of its step since it was read")

    @property
    def location(self) -> str:
        """The root as the user named it (a path or a URL)."""
        return self.backend.location

    def ref(self, step_name: str) -> CheckpointRef:
        """The checkpoint ``step_name`` of this root."""
        return CheckpointRef(self.backend, step_name)

    def begin(self, step: int, attempt: str | None = None) -> Staging:
        """A staging place for one save attempt of ``step``.

        Args:
            step: The step being saved.
            attempt: 16 hex digits every rank of a multi-rank save agreed on, so that all of them
                write into the same staging place (each creates it as it writes: whichever comes
                first); None for a save of one process, whose attempt is made here.

        Returns:
            Where to write the attempt's data objects.

        Raises:
            CheckpointError, OSError: The staging place cannot be made.
        """
        raise NotImplementedError

    def stage_manifest(self, staging: Staging, manifest: bytes) -> None:
        """Keep the sealed manifest with the attempt's data, not yet visible (called once, after the
        data is durable and before :meth:`publish`). A protocol whose manifest is the commit record
        writes nothing here.

        Args:
            staging: From :meth:`begin`, with every data object finished.
            manifest: The sealed manifest bytes.

        Raises:
            CheckpointError, OSError: It could not be written; the caller then calls :meth:`abort`.
        """
        raise NotImplementedError

    def publish(self, staging: Staging, manifest: bytes) -> CommittedCheckpoint:
        """Commit the attempt: its data objects are durable, ``manifest`` is their sealed manifest
        (the bytes given to :meth:`stage_manifest`).

        Args:
            staging: From :meth:`begin`, with every data object finished.
            manifest: The sealed manifest bytes.

        Returns:
            The committed checkpoint.

        Raises:
            CheckpointError, OSError: Not published; the caller then calls :meth:`abort`, and an
                older version of the step, if any, is still the committed one.
        """
        raise NotImplementedError

    def abort(self, staging: Staging) -> None:
        """Remove what the attempt wrote (after a failure). Never raises.

        Args:
            staging: From :meth:`begin`.
        """
        raise NotImplementedError

    def delete(self, checkpoint: CommittedCheckpoint) -> None:
        """Delete a committed checkpoint so that a crash midway never leaves a partial one visible.

        Args:
            checkpoint: From :meth:`checkpoints`.

        Raises:
            OSError: It could not be hidden; it is still committed.
        """
        raise NotImplementedError

    def replace_manifest(self, checkpoint: Path | CheckpointRef, manifest: bytes) -> None:
        """Swap a committed checkpoint's manifest atomically (tags change; the data does not).

        Args:
            checkpoint: The checkpoint (its directory's name in this root is what counts).
            manifest: The new sealed manifest, with the same chunk table.

        Raises:
            CheckpointError: Not replaced; the old manifest stands (also when the step was saved
                again since ``manifest`` was read: its chunk table is not the committed one's).
        """
        raise NotImplementedError

    def checkpoints(self) -> list[CommittedCheckpoint]:
        """The committed checkpoints, oldest first.

        Returns:
            One entry per committed step.

        Raises:
            CheckpointError: The root cannot be listed.
        """
        raise NotImplementedError

    def recover(self) -> list[str]:
        """Sweep what dead writers left and repair a publish cut short (called when a writer opens).

        Returns:
            The names removed, relative to the root.

        Raises:
            CheckpointError: The root cannot be listed, or a repair failed.
        """
        raise NotImplementedError

    def sweep(self) -> list[str]:
        """Same as :meth:`recover` (the name the root's writers use).

        Returns:
            The names removed, relative to the root.
        """
        return self.recover()

    def close(self) -> None:
        """Release the root's writer lock. Idempotent."""
        self.backend.close()


class RenameCommit(CommitProtocol):
    """Commit by renaming a complete staging directory to ``step-N`` (today's on-disk behaviour).

    Args:
        backend: A locked backend with ``Capabilities.atomic_rename``.
    """

    def __init__(self, backend: Backend) -> None:
        super().__init__(backend)
        self._fs = cast(RenameBackend, backend)

    def begin(self, step: int, attempt: str | None = None) -> Staging:
        """See :meth:`CommitProtocol.begin`: a new ``.tmp-step-N-<token>/`` directory."""
        token = _token() if attempt is None else attempt[:8]
        name = f"{TEMP_PREFIX}{step_dir_name(step)}-{token}"
        if attempt is None:
            self._fs.make_dir(name)
        return Staging(step, name, token)

    def stage_manifest(self, staging: Staging, manifest: bytes) -> None:
        """See :meth:`CommitProtocol.stage_manifest`: ``manifest.json`` in the staging directory,
        fsynced, then the directory fsynced (its entries are durable)."""
        _phases.pause("manifest")
        self._fs.write_small(staging.object_name(MANIFEST_NAME), manifest)
        self._fs.sync(staging.prefix)

    def publish(self, staging: Staging, manifest: bytes) -> CommittedCheckpoint:
        """See :meth:`CommitProtocol.publish`: the rename (the manifest is already staged)."""
        _phases.pause("rename")
        with self._publishing:
            return CommittedCheckpoint(staging.step, self.ref(self._rename_into_place(staging.prefix, staging.step)))

    def _rename_into_place(self, temp: str, step: int) -> str:
        """Atomically publish ``temp`` as step-N (replacing an older save of the same step)."""
        fs = self._fs
        final = step_dir_name(step)
        existing = fs.mode(final)
        if existing is not None and not stat.S_ISDIR(existing):
            raise CheckpointError(
                f"{fs.describe(final)} exists and is {describe_file_kind(existing)}, not a checkpoint; "
                "asyncckpt neither follows nor replaces it"
            )
        if existing is not None:
            parked = f"{REPLACED_PREFIX}{final}.{_token()}"
            fs.rename(final, parked)
            _phases.pause("replace")  # the window a crash-consistent sweep must repair
            try:
                fs.rename(temp, final)
            except BaseException:
                fs.rename(parked, final)  # the failed save must not hide the checkpoint it replaced
                raise
            fs.sync("")
            # Renamed to a temp name before removal: a leftover can then only ever be swept, never
            # mistaken for a replace cut short and put back over a newer checkpoint.
            doomed = f"{TEMP_PREFIX}replaced-{_token()}"
            fs.rename(parked, doomed)
            fs.delete_tree(doomed)
        else:
            fs.rename(temp, final)
            fs.sync("")
        return final

    def abort(self, staging: Staging) -> None:
        """See :meth:`CommitProtocol.abort`: the staging directory is removed."""
        self._fs.delete_tree(staging.prefix)

    def delete(self, checkpoint: CommittedCheckpoint) -> None:
        """See :meth:`CommitProtocol.delete`: hidden with one rename first, so a crash mid-delete
        never leaves a husk."""
        name = checkpoint.ref.name
        doomed = f"{TEMP_PREFIX}delete-{name}-{_token()}"
        self._fs.rename(name, doomed)
        self._fs.sync("")
        self._fs.delete_tree(doomed)

    def replace_manifest(self, checkpoint: Path | CheckpointRef, manifest: bytes) -> None:
        """See :meth:`CommitProtocol.replace_manifest`: a temp file renamed over ``manifest.json``."""
        name = f"{checkpoint.name}/{MANIFEST_NAME}"
        with self._publishing:
            mode = self._fs.mode(checkpoint.name)
            if mode is not None and stat.S_ISDIR(mode):  # a link: replace_small refuses it, unread
                current = self._fs.read_small(name, MAX_MANIFEST_BYTES)
                self._check_same_data(current, manifest, self._fs.describe(name))
            self._fs.replace_small(name, manifest)

    def checkpoints(self) -> list[CommittedCheckpoint]:
        """See :meth:`CommitProtocol.checkpoints`: the ``step-N`` directories (never links)."""
        out = []
        for entry in self._fs.list(""):
            step = parse_step_dir(entry.name)
            if step is not None and entry.is_dir:
                out.append(CommittedCheckpoint(step, self.ref(entry.name)))
        return sorted(out, key=lambda c: c.step)

    def recover(self) -> list[str]:
        """See :meth:`CommitProtocol.recover`: remove what dead writers left, and undo a replace cut
        short by a crash. Only real directories (and manifest temp files) with the exact names this
        protocol makes are touched, never through a link: a user's ``.tmp-cache/`` is not ours."""
        fs = self._fs
        removed: list[str] = []
        for entry in fs.list(""):
            if not entry.is_dir:
                continue
            parked = _PARKED.fullmatch(entry.name)
            if parked is not None and fs.mode(parked.group(1)) is None:
                # crashed between the two renames of a replace: put the old checkpoint back
                try:
                    fs.rename(entry.name, parked.group(1))
                except OSError as exc:
                    raise CheckpointError(f"cannot put back {fs.describe(entry.name)}: {_reason(exc)}") from exc
                fs.sync("")
            elif parked is not None or _SWEPT.fullmatch(entry.name):
                fs.delete_tree(entry.name)
                removed.append(entry.name)
            elif parse_step_dir(entry.name) is not None:
                removed += self._sweep_manifest_temps(entry.name)
        return removed

    def _sweep_manifest_temps(self, step_name: str) -> list[str]:
        """The manifest temp file a tag rewrite cut short by a crash left in a committed checkpoint."""
        try:
            entries = self._fs.list(step_name)
        except CheckpointError:
            return []
        removed = []
        for entry in entries:
            name = f"{step_name}/{entry.name}"
            if entry.is_dir or not _MANIFEST_TEMP.fullmatch(entry.name):
                continue
            try:
                mode = self._fs.mode(name)
                if mode is not None and stat.S_ISREG(mode):
                    self._fs.delete(name)
                    removed.append(name)
            except OSError:
                pass
        return removed


class ManifestLastCommit(CommitProtocol):
    """Commit by writing the sealed manifest last, for stores without an atomic rename.

    Data objects are written under names unique to the save attempt, straight into ``step-N/``; the
    manifest ``manifest-<generation>.json`` written after them is the commit record. A step exists
    exactly when one of its manifests exists and verifies (its CRC32 seal), the newest such
    generation being the step. A manifest that does not verify is a publish cut short: the sweep
    removes it with the data no verified manifest references, except in a step none of whose
    manifests verifies where one of them was written whole (it ends with its seal) or is
    ``manifest.json``: that step was committed and then damaged, and is left as it is.

    On an object store (a backend that lists every object of the steps in one listing, with
    ETags) :meth:`checkpoints` lists the root once and reads only the manifests it has not verified
    before: the protocol remembers, per step, the manifest name and ETag whose bytes it read and
    verified. An ETag names one version's bytes, so a remembered pair is a fact about bytes that
    never goes stale; whether a step exists is always the listing's answer (a step whose objects
    are gone is gone; a manifest written or replaced behind the writer's back has a name or an ETag
    not remembered, and is read and verified before it counts).

    Args:
        backend: A locked backend (any capabilities).
    """

    def __init__(self, backend: Backend) -> None:
        super().__init__(backend)
        # step name -> (manifest name, ETag) whose bytes were read and verified; only a hint that
        # spares a GET, never a claim that the step exists
        self._verified: dict[str, tuple[str, str]] = {}

    def _versions(self, step_name: str) -> list[str]:
        return manifest_versions(self.backend, step_name)

    def _newest(self, step_name: str) -> tuple[str, bytes] | None:
        return newest_manifest(self.backend, step_name)

    def _next_generation(self, step_name: str) -> str:
        """The name of the step's next manifest, one generation above every manifest name there.

        Raises:
            CheckpointError: A manifest name there holds the highest generation 12 digits can
                write (not one this writer made): a higher one would be no manifest name, and
                publishing it would leave the step without a version.
        """
        versions = self._versions(step_name)
        newest = (parse_manifest_generation(versions[0]) or 0) if versions else 0
        if newest >= _MAX_GENERATION:
            raise CheckpointError(
                f"{self.backend.describe(f'{step_name}/{versions[0]}')} holds the highest manifest generation; "
                "remove it to save or tag this step again"
            )
        return manifest_generation_name(newest + 1)

    def begin(self, step: int, attempt: str | None = None) -> Staging:
        """See :meth:`CommitProtocol.begin`: ``step-N/`` itself, with names unique to the attempt."""
        return Staging(step, step_dir_name(step), attempt or secrets.token_hex(8), unique_names=True)

    def stage_manifest(self, staging: Staging, manifest: bytes) -> None:
        """See :meth:`CommitProtocol.stage_manifest`: nothing (the manifest is the commit record)."""

    def publish(self, staging: Staging, manifest: bytes) -> CommittedCheckpoint:
        """See :meth:`CommitProtocol.publish`: the manifest is written last, then the version it
        supersedes is removed (its manifest first, then its data)."""
        step_name = staging.prefix
        self.backend.sync(step_name)  # the data files' names, then the step directory's
        self.backend.sync("")
        with self._publishing:
            return self._publish_locked(staging, manifest)

    def _publish_locked(self, staging: Staging, manifest: bytes) -> CommittedCheckpoint:
        step_name = staging.prefix
        name = self._next_generation(step_name)
        _phases.pause("manifest")
        self.backend.check_lock()  # a writer that lost the root (an expired lease) never publishes
        try:
            self.backend.write_small(f"{step_name}/{name}", manifest)
        except CheckpointError:
            # The name exists (a tag took it meanwhile), cannot be created, or the store failed the
            # request. An object store may have stored the put all the same (an answer timed out):
            # if our manifest is there, the step is committed and readers may already see it.
            if not self._landed(f"{step_name}/{name}", manifest):
                raise
        except BaseException:
            self._take_back(f"{step_name}/{name}")
            raise
        try:
            self.backend.sync(step_name)
        except BaseException:
            self._take_back(f"{step_name}/{name}")
            raise
        older = [v for v in self._versions(step_name) if v != name]
        if older:
            _phases.pause("replace")  # committed; the superseded version is still there
            try:
                self._remove(step_name, older, keep_attempt=staging.attempt)
            except (CheckpointError, OSError):
                pass  # committed all the same: the next writer's sweep removes what is left
        return CommittedCheckpoint(staging.step, self.ref(step_name))

    def _landed(self, name: str, manifest: bytes) -> bool:
        """Whether ``name`` holds exactly ``manifest`` now (a put whose request failed after the
        store kept it)."""
        try:
            return self.backend.read_small(name, MAX_MANIFEST_BYTES) == manifest
        except (CheckpointError, OSError):
            return False

    def _take_back(self, name: str) -> None:
        """Remove the manifest a failed publish wrote (or began to), before ``abort`` removes the
        data it references; if it cannot be removed, ``abort`` keeps the data it references."""
        try:
            self.backend.delete(name)
        except OSError:
            pass

    def _remove(self, step_name: str, manifests: list[str], keep_attempt: str | None) -> None:
        """Remove ``manifests`` (made durable first), then every data file of other attempts (and
        of the old unique-free layout) that the kept manifest does not reference."""
        for name in manifests:
            self.backend.delete(f"{step_name}/{name}")
        self.backend.sync(step_name)
        for entry in self.backend.list(step_name):
            if entry.is_dir or not (is_data_file_name(entry.name) or is_rank_file_name(entry.name)):
                continue
            if _attempt_of(entry.name) != keep_attempt or keep_attempt is None:
                self.backend.delete(f"{step_name}/{entry.name}")

    def abort(self, staging: Staging) -> None:
        """See :meth:`CommitProtocol.abort`: this attempt's data files are removed, unless a
        manifest that verifies references them (a publish whose manifest could not be taken back)."""
        try:
            if self._referenced_attempt(staging):
                return
            for entry in self.backend.list(staging.prefix):
                if _attempt_of(entry.name) == staging.attempt:
                    self.backend.delete(staging.object_name(entry.name))
            if not self.backend.list(staging.prefix):
                self.backend.delete_tree(staging.prefix)
        except (CheckpointError, OSError):
            pass  # the next writer's sweep removes what is left

    def _referenced_attempt(self, staging: Staging) -> bool:
        """Whether the step's version (its newest manifest that verifies) references a data file of
        the attempt ``staging``; also true when a newer manifest could not be read, since it may be
        this attempt's own (a put the store kept though its request failed)."""
        newest, unread = _scan_manifests(self.backend, staging.prefix)
        if unread:
            return True
        if newest is None:
            return False
        where = self.backend.describe(f"{staging.prefix}/{newest[0]}")
        try:
            files = parse_manifest(newest[1], where).data_files()
        except CheckpointError:
            return False
        return any(_attempt_of(f) == staging.attempt for f in files)

    def delete(self, checkpoint: CommittedCheckpoint) -> None:
        """See :meth:`CommitProtocol.delete`: every manifest first (durably), then the data."""
        step_name = checkpoint.ref.name
        self.backend.check_lock()  # retention of a writer that lost the root deletes nothing
        self._verified.pop(step_name, None)
        for name in self._versions(step_name):
            self.backend.delete(f"{step_name}/{name}")
        self.backend.sync(step_name)
        self.backend.delete_tree(step_name)

    def replace_manifest(self, checkpoint: Path | CheckpointRef, manifest: bytes) -> None:
        """See :meth:`CommitProtocol.replace_manifest`: a new generation, then the old ones go."""
        with self._publishing:
            self._replace_locked(checkpoint, manifest)

    def _replace_locked(self, checkpoint: Path | CheckpointRef, manifest: bytes) -> None:
        step_name = checkpoint.name
        newest, unread = _scan_manifests(self.backend, step_name)
        if unread:  # it may be a re-save's committed version: replacing would undo that save
            raise CheckpointError(
                f"{self.backend.describe(f'{step_name}/{unread[0]}')} could not be read, so the manifest of "
                f"{self.backend.describe(step_name)} is not replaced; try again"
            )
        if newest is None:
            raise CheckpointError(
                f"{self.backend.describe(step_name)} has no manifest that verifies: nothing to replace"
            )
        self._check_same_data(newest[1], manifest, self.backend.describe(f"{step_name}/{newest[0]}"))
        older = self._versions(step_name)
        name = self._next_generation(step_name)
        self.backend.check_lock()
        try:
            self.backend.write_small(f"{step_name}/{name}", manifest)
            self.backend.sync(step_name)
        except OSError as exc:
            try:
                self.backend.check_lock()
            except (CheckpointError, OSError):
                pass  # no longer this writer's root: the next writer may have written this very name
            else:
                self.backend.delete(f"{step_name}/{name}")
            raise CheckpointError(
                f"cannot replace the manifest of {self.backend.describe(step_name)}: {_reason(exc)}"
            ) from exc
        for old in older:
            self.backend.delete(f"{step_name}/{old}")
        self.backend.sync(step_name)

    def checkpoints(self) -> list[CommittedCheckpoint]:
        """See :meth:`CommitProtocol.checkpoints`: the step directories with a verified manifest."""
        if isinstance(self.backend, _ListsNamed):
            return self._checkpoints_listed(self.backend)
        out = []
        for entry in self.backend.list(""):
            step = parse_step_dir(entry.name)
            if step is not None and entry.is_dir and self._newest(entry.name) is not None:
                out.append(CommittedCheckpoint(step, self.ref(entry.name)))
        return sorted(out, key=lambda c: c.step)

    def _checkpoints_listed(self, backend: _ListsNamed) -> list[CommittedCheckpoint]:
        """:meth:`checkpoints` from one listing of every object of the steps: each step's newest
        manifest that verifies, read only when its name and ETag are not ones already verified."""
        listed = _listed_steps(backend)
        steps = [(name, objects) for name, objects in listed.items() if parse_step_dir(name) is not None]

        def published(item: tuple[str, _StepObjects]) -> bool:
            return self._newest_listed(backend, item[0], item[1].manifests)

        # at open every step's manifest is read (later, only a new one): several at once
        answers = in_order(published, steps, _LISTING_READS, "asyncckpt-listing")
        verified = zip(steps, answers, strict=True)
        out = [CommittedCheckpoint(_step_of(name), self.ref(name)) for (name, _), ok in verified if ok]
        for step_name in [s for s in self._verified if s not in listed]:
            self._verified.pop(step_name, None)  # gone from the root: nothing to remember
        return sorted(out, key=lambda c: c.step)

    def _newest_listed(self, backend: _ListsNamed, step_name: str, manifests: dict[str, str | None]) -> bool:
        """Whether one of the listed manifests of the step verifies (the newest first, as
        :func:`newest_manifest` tries them), reading only those not verified before."""
        for name in _newest_first(manifests):
            etag = manifests[name]
            if etag is not None and self._verified.get(step_name) == (name, etag):
                return True
            try:
                raw, read_etag = backend.read_versioned(f"{step_name}/{name}", MAX_MANIFEST_BYTES)
                check_manifest_seal(raw, self.backend.describe(f"{step_name}/{name}"))
            except CheckpointError:
                continue
            if read_etag is not None:
                self._verified[step_name] = (name, read_etag)
            return True
        self._verified.pop(step_name, None)
        return False

    def recover(self) -> list[str]:
        """See :meth:`CommitProtocol.recover`: in every step directory, manifests other than the
        newest that verifies go, then data files no kept manifest references; a step left with
        nothing goes too."""
        removed: list[str] = []
        for entry in self.backend.list(""):
            if entry.is_dir and parse_step_dir(entry.name) is not None:
                removed += self._sweep_step(entry.name)
        return removed

    def _cut_short(self, step_name: str, name: str) -> bool:
        """Whether the manifest ``name`` that does not verify can only be a publish cut short: a
        generation (``manifest.json`` is never written by this protocol) in a regular file that
        does not end with its seal. One that does was written whole: it was committed, then damaged.
        """
        if name == MANIFEST_NAME:
            return False
        try:
            raw = self.backend.read_small(f"{step_name}/{name}", MAX_MANIFEST_BYTES)
        except CheckpointError:
            return False  # a link, a FIFO, too large: not what a publish writes
        return not ends_with_seal(raw)

    def _sweep_step(self, step_name: str) -> list[str]:
        newest, unread = _scan_manifests(self.backend, step_name)
        if unread:  # a newer version that could not be read may be the committed one: left for the next sweep
            warnings.warn(
                f"asyncckpt: {self.backend.describe(f'{step_name}/{unread[0]}')} could not be read, so nothing "
                f"of {self.backend.describe(step_name)} was swept (it may hold the step's newest version)",
                stacklevel=2,
            )
            return []
        referenced: set[str] = set()
        if newest is None and not all(self._cut_short(step_name, name) for name in self._versions(step_name)):
            return []  # a committed checkpoint that lost its manifest's integrity: kept, for a person to judge
        if newest is not None:
            try:
                manifest = parse_manifest(newest[1], self.backend.describe(f"{step_name}/{newest[0]}"))
            except CheckpointError:
                return []  # sealed but invalid: damage, for a reader to report; nothing is touched
            referenced = manifest.data_files()
        removed = []
        for name in self._versions(step_name):
            if newest is None or name != newest[0]:
                self.backend.delete(f"{step_name}/{name}")
                removed.append(f"{step_name}/{name}")
        if removed:
            self.backend.sync(step_name)
        for entry in self.backend.list(step_name):
            if not entry.is_dir and _ATTEMPT_DATA.fullmatch(entry.name) and entry.name not in referenced:
                self.backend.delete(f"{step_name}/{entry.name}")
                removed.append(f"{step_name}/{entry.name}")
        if newest is None and not self.backend.list(step_name):
            self.backend.delete_tree(step_name)
            removed.append(step_name)
        return removed


def choose_protocol(backend: Backend) -> CommitProtocol:
    """The commit protocol a backend's capabilities call for.

    Args:
        backend: The root's backend.

    Returns:
        :class:`RenameCommit` where ``atomic_rename``, else :class:`ManifestLastCommit`.
    """
    if backend.capabilities.atomic_rename:
        return RenameCommit(backend)
    return ManifestLastCommit(backend)


def _refuse_one_checkpoint(backend: Backend) -> None:
    """A committed checkpoint's own directory is no root (as when its path is passed to resume
    from it): a writer there would put its lock and new steps inside that checkpoint, a restore
    would find no step and start afresh, and the real root's retention would delete them all
    with the checkpoint. Checked before the lock is taken, so nothing is written into it.

    Raises:
        CheckpointError: The root holds a manifest of its own.
    """
    try:
        names = [entry.name for entry in backend.list("") if not entry.is_dir]
    except CheckpointError:
        return  # taking the lock says what is wrong with the root
    if any(parse_manifest_generation(name) is not None for name in names):
        raise CheckpointError(
            f"{backend.location} is one checkpoint, not a checkpoint root: pass the root that holds it "
            "(to resume from this step, restore(state, step=N) on a manager of that root)"
        )


def open_storage(root: str | os.PathLike | Backend, storage_options: dict | None = None) -> CommitProtocol:
    """Open a root for writing: choose its backend and protocol, lock it, recover it.

    Args:
        root: A local path, a ``file://`` URL, an object-store URL, or a Backend.
        storage_options: An object store's client options (see :func:`open_backend`).

    Returns:
        The root's commit protocol, holding the writer lock (``close`` releases it).

    Raises:
        RootInUseError: Another writer holds the root.
        CheckpointError: No backend for the root's scheme, the root is one checkpoint's directory,
            or the root cannot be created, locked or swept.
    """
    backend = open_backend(root, storage_options=storage_options)
    _refuse_one_checkpoint(backend)
    backend.lock()
    try:
        protocol = choose_protocol(backend)
        protocol.recover()
    except BaseException:
        backend.close()
        raise
    return protocol
