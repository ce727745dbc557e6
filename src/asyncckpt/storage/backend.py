"""The storage backend protocol: the few operations the writer, the commit protocols and the reader
ask of the place checkpoints are kept, and the capabilities that decide how a step is committed.

Names are relative to the backend's root and ``/``-separated (``step-000000000007/data-00000.bin``);
a backend never resolves ``..`` or follows a link out of its root. A name's parent "directories"
need not exist: writing an object creates them (object stores have none).

The order in which the library calls a backend:

1. Writer (one process holds the root): :meth:`Backend.lock` once, when a manager (or ``prune``)
   opens the root; :meth:`Backend.close` releases it.
2. One save: :meth:`Backend.open_write` for each data object, :meth:`WriteStream.append` for each
   stored chunk in order (each returns the offset the chunk landed at), then
   :meth:`WriteStream.finish` (the bytes are durable when it returns) or, on any failure,
   :meth:`WriteStream.abort`. Then :meth:`Backend.sync` on the step's prefix makes the new names
   durable. The commit protocol (``storage/commit.py``) then publishes the step: by renaming a
   staging directory (``Capabilities.atomic_rename``) or by writing the manifest last with
   :meth:`Backend.write_small`.
3. Reader (any process, no lock): :meth:`Backend.list` to find steps, :meth:`Backend.read_small`
   for a manifest, :meth:`Backend.open_read` for a data object, then
   :meth:`ReadHandle.read_into` for byte ranges (``fileno`` for a memory map, where
   ``Capabilities.mmap``), and :meth:`Backend.identity` to tell an object deleted or replaced
   under the reader from a damaged one.
4. Retention and sweeping: :meth:`Backend.delete` and :meth:`Backend.delete_tree`, in the order the
   commit protocol prescribes.

:func:`open_backend` chooses the backend from a root given as a path or URL: the local filesystem
(``storage/local.py``) or an object store (``storage/objectstore.py``: ``s3://`` through obstore,
any other scheme fsspec knows through fsspec), which implements this same protocol with
``atomic_rename=False`` (it then commits by writing the manifest last).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable
from urllib.parse import unquote, urlparse

from asyncckpt.errors import CheckpointError


def describe_file_kind(mode: int) -> str:
    """What an entry is, for messages.

    Args:
        mode: An ``st_mode``.

    Returns:
        "a FIFO", "a directory", "a symbolic link", "a regular file"... or "not a regular file".
    """
    for test, name in (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do, which decides how a step is committed and read.

    Attributes:
        atomic_rename: A directory can be renamed atomically to a new name in the root (and one
            name swapped for another), so a step can be staged under a temporary name and published
            by one rename. Without it the manifest, written last, is the commit record.
        fsync: Written bytes and new names can be made durable explicitly (``finish``, ``sync``);
            without it durability is whatever the store gives on a completed write.
        mmap: A data object can be memory-mapped (``ReadHandle.fileno`` returns a descriptor).
        lock: The backend can hold an exclusive writer lock on the root (``lock``).
        remote: Each request crosses a network (an object store): readers fetch a chunk with one
            ranged request rather than in pieces, and keep more requests in flight than there
            are cores, since they wait on the network, not the CPU.
    """

    atomic_rename: bool
    fsync: bool
    mmap: bool
    lock: bool
    remote: bool = False


@dataclass(frozen=True)
class Entry:
    """One name directly under a listed prefix.

    Attributes:
        name: The entry's last name component (``step-000000000007``, ``manifest.json``).
        is_dir: It is a directory (a common prefix on an object store), never a link to one.
    """

    name: str
    is_dir: bool


@dataclass(frozen=True)
class ObjectInfo:
    """What a name is, without following a link.

    Attributes:
        kind: "dir" (a directory, or a common prefix on an object store), "file" (a regular file
            or object), "link" (a symbolic link) or "other" (a FIFO, a device...).
        size: Its size in bytes (0 for a directory).
    """

    kind: str
    size: int


@dataclass(frozen=True, eq=False)
class CheckpointRef:
    """One checkpoint of a root: the root's backend and the checkpoint directory's name in it.

    Readers take it where they used to take a local directory path, so a checkpoint in an object
    store is read the same way; it formats as the full location for messages (``str(ref)``,
    ``ref / "manifest.json"``), as a path did.

    Attributes:
        backend: The root's backend.
        name: The checkpoint directory's name (``step-000000000007``).
    """

    backend: Backend
    name: str

    def __str__(self) -> str:
        return self.backend.describe(self.name)

    def __truediv__(self, file: str) -> str:
        return self.backend.describe(f"{self.name}/{file}")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CheckpointRef) and other.backend is self.backend and other.name == self.name

    def __hash__(self) -> int:
        return hash((id(self.backend), self.name))


@runtime_checkable
class WriteStream(Protocol):
    """One new data object, written front to back.

    Calls: ``append`` any number of times, then exactly one of ``finish`` or ``abort``.
    """

    name: str
    size: int

    def append(self, data: bytes | memoryview) -> int:
        """Add ``data`` at the end of the object.

        Args:
            data: The bytes to add (all of them are written).

        Returns:
            The offset in the object at which ``data`` starts.

        Raises:
            OSError: The store failed the write (a full disk, an I/O error).
        """
        ...

    def finish(self) -> None:
        """Make every appended byte durable and close the stream.

        Raises:
            OSError: The store could not make the bytes durable; the stream is closed anyway.
        """
        ...

    def abort(self) -> None:
        """Close the stream without making it durable; the commit protocol removes the object.

        Never raises.
        """
        ...


@runtime_checkable
class ReadHandle(Protocol):
    """An open data object, read by byte ranges."""

    size: int

    def read_into(self, buffer: memoryview, offset: int) -> int:
        """Fill ``buffer`` with the object's bytes from ``offset`` on.

        Args:
            buffer: Where the bytes go (a writable byte view).
            offset: The object offset of the first byte.

        Returns:
            The number of bytes read: fewer than ``len(buffer)`` only at the object's end.

        Raises:
            OSError: The store failed the read.
        """
        ...

    def fileno(self) -> int | None:
        """A descriptor to memory-map the object with, or None when the backend cannot map it.

        Returns:
            A descriptor valid until ``close`` (only where ``Capabilities.mmap``), else None.
        """
        ...

    def close(self) -> None:
        """Release the object. Never raises."""
        ...


@runtime_checkable
class Backend(Protocol):
    """Where checkpoints are kept: objects under a root, named by relative ``/``-separated names.

    Errors other than the OSErrors documented are CheckpointError with the name in the message: a
    link in the root, an entry that is not a regular file, a name that already exists.
    """

    capabilities: Capabilities

    @property
    def location(self) -> str:
        """The root as a user names it: a local path, or a URL (``s3://bucket/prefix``)."""
        ...

    def describe(self, name: str) -> str:
        """The object's full location, for messages (a path, or a URL on an object store).

        Args:
            name: A relative name in the root ("" for the root itself).

        Returns:
            Text naming the object for a user.
        """
        ...

    def lock(self) -> None:
        """Create the root if needed and take its exclusive writer lock (only one writer a root).

        Raises:
            RootInUseError: Another writer holds the root.
            CheckpointError: The root cannot be created or locked.
        """
        ...

    def check_lock(self) -> None:
        """Raises RootInUseError when this writer's lock was lost (an object store's lease taken
        over, deleted or not renewed in time); nothing otherwise. The commit protocol calls it right
        before each write that publishes or deletes a checkpoint, so a writer that lost the root
        never publishes.

        Raises:
            RootInUseError: The lock is no longer this writer's.
            CheckpointError: It cannot be held up now (an object store's lease not renewed in
                time during an outage): this write is refused, the lock is kept.
        """
        ...

    def close(self) -> None:
        """Release the writer lock, if held. Idempotent; never raises."""
        ...

    def open_write(self, name: str, size_hint: int | None = None) -> WriteStream:
        """Create a new object to write (never an existing one).

        Args:
            name: The new object's name; its parent directories are created as needed.
            size_hint: About how many bytes will be written, or None (an object store sizes its
                upload's parts by it).

        Returns:
            The stream to append to.

        Raises:
            CheckpointError: The name exists, or cannot be created.
        """
        ...

    def write_small(self, name: str, data: bytes) -> None:
        """Create a new object holding ``data``, durable when this returns.

        Args:
            name: The new object's name (never an existing one).
            data: All of its bytes.

        Raises:
            CheckpointError: The name exists, or cannot be created.
            OSError: The store failed the write or could not make it durable.
        """
        ...

    def sync(self, prefix: str) -> None:
        """Make the names created directly under ``prefix`` durable (a directory fsync locally).

        Args:
            prefix: A directory name ("" for the root).

        Raises:
            OSError: The store could not make them durable.
        """
        ...

    def open_read(self, name: str) -> ReadHandle:
        """Open an object for ranged reads.

        Args:
            name: The object's name.

        Returns:
            A handle; the caller closes it.

        Raises:
            CheckpointError: The object is missing, a link, or not a regular file.
        """
        ...

    def read_small(self, name: str, limit: int) -> bytes:
        """The whole of a small object (a manifest).

        Args:
            name: The object's name.
            limit: The most bytes accepted.

        Returns:
            Its bytes.

        Raises:
            CheckpointError: It is missing, a link, not a regular file, larger than ``limit``, or
                cannot be read.
        """
        ...

    def list(self, prefix: str = "") -> list[Entry]:
        """The entries directly under ``prefix``, unsorted; empty when there is none.

        Args:
            prefix: A directory name ("" for the root).

        Returns:
            One Entry per name.

        Raises:
            CheckpointError: ``prefix`` exists but cannot be listed (not a directory, no access).
        """
        ...

    def stat(self, name: str) -> ObjectInfo | None:
        """What ``name`` is now, never following a link.

        Args:
            name: A name in the root.

        Returns:
            Its kind and size, or None when nothing is there.
        """
        ...

    def identity(self, name: str) -> Hashable | None:
        """What ``name`` refers to now: equal values mean the same object or directory.

        A reader compares it before and after a failed read to tell a checkpoint deleted or
        replaced under it from a damaged one.

        Args:
            name: A name in the root.

        Returns:
            A comparable value, or None when nothing is there.
        """
        ...

    def delete(self, name: str) -> None:
        """Remove one object; nothing happens when it is already gone.

        Args:
            name: The object's name (a regular file; never a directory or a link's target).

        Raises:
            OSError: The store refused the deletion.
        """
        ...

    def delete_tree(self, prefix: str) -> None:
        """Remove everything under ``prefix`` and ``prefix`` itself; never raises.

        Args:
            prefix: A directory name in the root (never "").
        """
        ...


class RenameBackend(Backend, Protocol):
    """A backend with ``Capabilities.atomic_rename``: what the rename commit protocol also needs."""

    def make_dir(self, name: str) -> None:
        """Create a new, empty directory (never an existing name).

        Args:
            name: The directory's name in the root.

        Raises:
            OSError: It exists or cannot be created.
        """
        ...

    def rename(self, source: str, target: str) -> None:
        """Atomically give ``source`` the name ``target`` (which must not exist).

        Args:
            source: An existing name.
            target: Its new name.

        Raises:
            OSError: The rename failed; nothing changed.
        """
        ...

    def mode(self, name: str) -> int | None:
        """The ``st_mode`` of what ``name`` is (never following a link), or None when missing.

        Args:
            name: A name in the root.

        Returns:
            The mode bits, or None.
        """
        ...

    def replace_small(self, name: str, data: bytes) -> None:
        """Swap the small object ``name`` for one holding ``data``, atomically and durably.

        Args:
            name: An existing object (a committed manifest).
            data: Its new bytes.

        Raises:
            CheckpointError: It cannot be replaced; the old object is then unchanged.
        """
        ...


def is_object_store_url(root: str | os.PathLike) -> bool:
    """Whether ``root`` names an object store (``s3://...``) rather than a local path or ``file://`` URL.

    Args:
        root: A root as a user gives it.

    Returns:
        True for a URL of any scheme but ``file``.
    """
    text = os.fspath(root)
    return isinstance(text, str) and "://" in text and not text.startswith("file://")


def open_backend(
    root: str | os.PathLike | Backend, *, atomic_rename: bool = True, storage_options: dict | None = None
) -> Backend:
    """The backend for a checkpoint root given as a path, a URL or a backend.

    Args:
        root: A local path, a ``file://`` URL, an object-store URL (``s3://bucket/prefix``, or any
            scheme fsspec knows), or a Backend instance (returned as is).
        atomic_rename: For a local root: whether the filesystem's renames are to be used. False
            (a FUSE mount of an object store, say) makes the manifest-written-last commit apply.
        storage_options: For an object-store URL: the client's options (fsspec's names: ``key``,
            ``secret``, ``endpoint_url``, ``region``...; and ``timeout``, ``connect_timeout``,
            ``retries``, ``lease_seconds``). The standard environment works without them.

    Returns:
        The backend; no lock is taken, nothing is created and nothing is requested yet.

    Raises:
        CheckpointError: The root is an empty path, the URL's scheme has no backend (naming the
            package to install), a ``file://`` URL names a remote host, or options are given for
            a local root.
    """
    from asyncckpt.storage.local import LocalBackend  # local imports this module

    if isinstance(root, Backend):
        return root
    if isinstance(root, str) and "://" in root:
        url = urlparse(root)
        if url.scheme != "file":
            try:
                from asyncckpt.storage.objectstore import ObjectStoreBackend
            except ImportError as exc:  # pragma: no cover (the module itself needs nothing optional)
                raise CheckpointError(f'no storage backend for {root!r}: {exc}; pip install "asyncckpt[s3]"') from exc
            return ObjectStoreBackend(root, storage_options)
        if url.netloc not in ("", "localhost"):
            raise CheckpointError(f"file URL {root!r} names the host {url.netloc!r}; only local files can be used")
        root = unquote(url.path)
    if storage_options:
        raise CheckpointError(f"storage_options apply to object-store URLs, not to the local root {root!r}")
    if os.fspath(root) in ("", b""):  # an unset variable, most often: never the working directory by accident
        raise CheckpointError('the checkpoint root is an empty path; give a directory ("." for this one) or a URL')
    return LocalBackend(root, atomic_rename=atomic_rename)
