"""The local filesystem backend: plain files under a root directory, the writer lock, fsync.

:class:`LocalBackend` implements :mod:`asyncckpt.storage.backend`'s protocol (and the rename
extension the rename commit needs). How a step is published, swept and deleted is the commit
protocol's business (``storage/commit.py``); this module only keeps the filesystem's promises:

Inside the root the writer never follows a symbolic link and never opens anything but a regular
file: a link planted at ``.lock`` or at a checkpoint's name must not make us write elsewhere.
Written files are fsynced before they count as written, and new names by an fsync of their
directory (``sync``).

The writer lock is ``flock`` on ``ROOT/.lock``: it belongs to the open file description, so
closing some other descriptor of the file (a backup of the root taken by the training process)
leaves it alone, and it dies when the last descriptor of that description closes. A forked child
shares the description, so an at-fork hook closes the child's copy at once, without unlocking
(only ``LOCK_UN`` or the last close releases a flock): the child neither releases the lock nor
keeps the root locked after its parent died. The descriptor is close-on-exec, so an exec'd
subprocess never holds it. A second writer in the same process is refused from an in-process
registry, with a message that says so.

Data files are written with ``O_DIRECT`` where the filesystem takes it (:class:`DataFileWriter`):
the kernel's buffered path costs CPU (a copy into the page cache, then writeback) and gives the
first writes of a file latency spikes; a direct write goes from an aligned staging buffer to the
device. ``ASYNCCKPT_DIRECT_IO=0`` turns it off. Small files (manifests, rank tables, the lock)
stay buffered: they are a few KiB, and direct writes would only add padding.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import re
import secrets
import shutil
import stat
import threading
from pathlib import Path

from asyncckpt.errors import CheckpointError, RootInUseError
from asyncckpt.storage.backend import Capabilities, Entry, ObjectInfo, describe_file_kind
from asyncckpt.storage.commit import CommittedCheckpoint, published_checkpoints

LOCK_NAME = ".lock"
TEMP_PREFIX = ".tmp-"


def _token() -> str:
    return secrets.token_hex(4)


# Roots locked by this process: (st_dev, st_ino) of the root -> the lock's descriptor.
_held: dict[tuple[int, int], int] = {}
_held_guard = threading.Lock()


def _forget_locks_in_child() -> None:
    """Close a forked child's copies of the lock descriptors, never with LOCK_UN: the parent's
    descriptor stays open, so its flock holds, and it still dies with the parent."""
    global _held_guard
    _held_guard = threading.Lock()  # another thread may have held it at the fork
    for fd in _held.values():
        try:
            os.close(fd)
        except OSError:
            pass
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_locks_in_child)


def _reason(exc: OSError) -> str:
    if exc.errno == errno.EROFS:
        return "the filesystem is read-only"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    return exc.strerror or str(exc)


def open_regular_no_follow(path: Path, flags: int, mode: int = 0o644, dir_fd: int | None = None) -> int:
    """Open ``path`` for the writer: never through a symbolic link, never blocking on a FIFO, and
    only a regular file. Anything else is a CheckpointError naming the path (the OSError chained)."""
    name = path.name if dir_fd is not None else path
    try:
        fd = os.open(name, flags | os.O_NOFOLLOW | os.O_NONBLOCK, mode, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise CheckpointError(f"{path} is a symbolic link; asyncckpt never follows links in a root") from exc
        if exc.errno == errno.EISDIR:
            raise CheckpointError(f"{path} is a directory, not a file asyncckpt can use") from exc
        if exc.errno == errno.EEXIST and os.path.islink(path):
            raise CheckpointError(f"{path} is a symbolic link; asyncckpt never follows links in a root") from exc
        raise CheckpointError(f"cannot open {path}: {_reason(exc)}") from exc
    try:
        mode_now = os.fstat(fd).st_mode
    except OSError:
        os.close(fd)
        raise
    if not stat.S_ISREG(mode_now):
        os.close(fd)
        raise CheckpointError(
            f"{path} is not a regular file ({describe_file_kind(mode_now)}); asyncckpt will not use it"
        )
    os.set_blocking(fd, True)
    return fd


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(root: Path) -> list[CommittedCheckpoint]:
    """Committed checkpoints under the local directory ``root``, oldest first, as a reader (no lock)
    sees them (see :func:`asyncckpt.storage.commit.published_checkpoints`).

    Args:
        root: The checkpoint root.

    Returns:
        The committed checkpoints.

    Raises:
        CheckpointError: ``root`` is not a directory.
    """
    if Path(root).exists() and not Path(root).is_dir():
        raise CheckpointError(f"checkpoint root {root} is not a directory")
    return published_checkpoints(LocalBackend(root))


def read_file_no_follow(path: Path, limit: int) -> bytes:
    """Read a small file, refusing symlinks and anything larger than ``limit``."""
    fd = _open_no_follow(path)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise CheckpointError(f"{path} is {size} bytes, larger than the {limit} limit")
        try:
            return os.pread(fd, size, 0)
        except OSError as exc:
            raise CheckpointError(f"cannot read {path}: {exc.strerror}") from exc
    finally:
        os.close(fd)


def _open_no_follow(path: Path) -> int:
    """Open a checkpoint file for reading: never through a link, never blocking on a FIFO."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise CheckpointError(f"{path} is a symbolic link; checkpoints never follow links") from None
        raise CheckpointError(f"cannot open {path}: {exc.strerror}") from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CheckpointError(f"{path} is not a regular file")
    return fd


def open_data_file(path: Path) -> int:
    return _open_no_follow(path)


DIRECT_IO_ENV = "ASYNCCKPT_DIRECT_IO"
# The staging buffer of a direct writer: one write per this many bytes. Large enough that the
# per-call cost (a synchronous request to the device) is small against the copy, small enough to
# keep a few around.
STAGING_BYTES = 4 * 1024 * 1024
# Direct I/O needs the file offset, the length and the memory address aligned to the device's
# logical block size (512 or 4096 nearly everywhere): 4096 is a multiple of both.
MIN_ALIGNMENT = 4096
_POOL_KEEP = 2  # idle staging buffers kept: one per concurrent writer is the common case

_O_DIRECT: int = getattr(os, "O_DIRECT", 0)


def direct_io_enabled() -> bool:
    """Whether data files may be written with ``O_DIRECT``: unless ``ASYNCCKPT_DIRECT_IO`` is
    ``0`` (or ``false``, ``no``, ``off``), read at every file opened so a test or a user can switch
    it without restarting."""
    return os.environ.get(DIRECT_IO_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


class _StagingPool:
    """Page-aligned staging buffers (anonymous maps), reused across files: a new map costs a page
    fault per 4 KiB page on its first fill, and a save opens a data file per rank and step."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._idle: list[mmap.mmap] = []

    def take(self) -> mmap.mmap:
        with self._guard:
            if self._idle:
                return self._idle.pop()
        return mmap.mmap(-1, STAGING_BYTES)

    def give_back(self, buffer: mmap.mmap) -> None:
        with self._guard:
            if len(self._idle) < _POOL_KEEP:
                self._idle.append(buffer)
                return
        try:
            buffer.close()
        except BufferError:  # a view of it is still alive somewhere: the collector closes it
            pass

    def after_fork(self) -> None:
        """A forked child's lock may have been held by another thread at the fork; its buffers
        are private copies, fine to reuse."""
        self._guard = threading.Lock()


_staging_pool = _StagingPool()

if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_staging_pool.after_fork)


def _alignment(fd: int) -> int:
    """The block size direct writes to ``fd`` are aligned to: the filesystem's preferred block
    size where it is a power of two that fits the staging buffer, never less than MIN_ALIGNMENT."""
    try:
        bsize = os.fstatvfs(fd).f_bsize
    except OSError:
        return MIN_ALIGNMENT
    if bsize <= MIN_ALIGNMENT or bsize > STAGING_BYTES or bsize & (bsize - 1):
        return MIN_ALIGNMENT
    return bsize


class DataFileWriter:
    """Appends stored chunks to one new data file and reports where each landed: the local
    backend's :class:`~asyncckpt.storage.backend.WriteStream`.

    Where the filesystem takes ``O_DIRECT``, appended bytes are copied into a page-aligned staging
    buffer and written a full buffer at a time, bypassing the page cache; ``finish`` writes the
    tail padded up to the block size, truncates the file to its real size and fsyncs. The file's
    bytes and size are those buffered writes would give. A filesystem that refuses the flag (ramfs,
    some FUSE mounts), or refuses a direct write with EINVAL, gets buffered writes for the rest of
    the file, starting with the bytes it refused, so nothing is lost or written twice.

    Args:
        path: The file to create (never an existing one, never through a link).
        direct: Whether to try ``O_DIRECT``; None: unless ``ASYNCCKPT_DIRECT_IO=0``.

    Attributes:
        direct: Whether writes go around the page cache now (False after a fallback).

    Raises:
        CheckpointError: The file exists or cannot be created.
    """

    def __init__(self, path: Path, *, direct: bool | None = None) -> None:
        self.path = path
        self.name = path.name
        self.fd = open_regular_no_follow(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        self.size = 0
        self.direct = False
        self._staging: mmap.mmap | None = None
        self._view: memoryview | None = None
        self._filled = 0  # bytes waiting in the staging buffer
        self._align = MIN_ALIGNMENT
        if _O_DIRECT and (direct_io_enabled() if direct is None else direct):
            try:
                self._start_direct()
            except BaseException:
                self.abort()
                raise

    def _start_direct(self) -> None:
        """Set ``O_DIRECT`` on the open file (the file is created first: an ``open`` with the flag
        on a filesystem that refuses it creates the file, then fails, so a retry would find it
        existing) and take a staging buffer. Any refusal leaves the file buffered."""
        try:
            flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
            fcntl.fcntl(self.fd, fcntl.F_SETFL, flags | _O_DIRECT)
        except OSError:
            return
        try:
            self._staging = _staging_pool.take()
        except OSError:  # no memory for the buffer: buffered writes need none
            self._set_direct(False)
            return
        self._view = memoryview(self._staging)
        self._align = _alignment(self.fd)
        self.direct = True

    def _set_direct(self, on: bool) -> None:
        flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
        fcntl.fcntl(self.fd, fcntl.F_SETFL, (flags | _O_DIRECT) if on else (flags & ~_O_DIRECT))

    def append(self, data: bytes | memoryview) -> int:
        """See :meth:`asyncckpt.storage.backend.WriteStream.append`. With direct writes the bytes
        may wait in the staging buffer until it is full or ``finish``: a full disk can then show
        up at a later append, or at ``finish``."""
        offset = self.size
        view = memoryview(data)
        if view.ndim != 1 or view.format != "B":  # the staging copy needs the same format
            view = view.cast("B")
        length = len(view)
        staging = self._view
        if staging is None:
            self._write_all(view)
        else:
            capacity = len(staging)
            while view:
                n = min(len(view), capacity - self._filled)
                staging[self._filled : self._filled + n] = view[:n]
                self._filled += n
                view = view[n:]
                if self._filled == capacity:
                    self._write_all(staging)
                    self._filled = 0
        self.size += length
        return offset

    def _write_all(self, view: memoryview) -> None:
        """Write all of ``view`` at the file's position. A direct write refused with EINVAL (the
        filesystem wants another alignment, or none of it) wrote nothing: the file turns buffered
        and the same bytes go again."""
        while view:
            try:
                written = os.write(self.fd, view)
            except OSError as exc:
                if exc.errno != errno.EINVAL or not self.direct:
                    raise
                self._set_direct(False)
                self.direct = False
                continue
            view = view[written:]

    def finish(self) -> None:
        """See :meth:`asyncckpt.storage.backend.WriteStream.finish`: the staged tail, then fsync,
        then close. A direct tail is written padded to the block size (direct writes cannot end
        mid-block) and the file truncated back to the bytes appended, before the fsync."""
        try:
            staging = self._view
            if staging is not None and self._filled:
                if self.direct:
                    end = -(-self._filled // self._align) * self._align
                    staging[self._filled : end] = bytes(end - self._filled)
                    self._write_all(staging[:end])
                    os.ftruncate(self.fd, self.size)
                else:
                    self._write_all(staging[: self._filled])
                self._filled = 0
            os.fsync(self.fd)
        finally:
            self.abort()

    def abort(self) -> None:
        """See :meth:`asyncckpt.storage.backend.WriteStream.abort`: staged bytes are dropped (the
        commit protocol removes the file), the staging buffer goes back to the pool. Never raises."""
        if self._view is not None:
            try:
                self._view.release()
            except BufferError:  # something still reads through it: the collector releases it
                pass
            self._view = None
        if self._staging is not None:
            _staging_pool.give_back(self._staging)
            self._staging = None
        self._filled = 0
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            try:
                os.close(fd)
            except OSError:
                pass


def _write_new_synced(path: Path, data: bytes, dir_fd: int | None = None) -> None:
    """Create ``path`` (never an existing file, never through a link), write all of ``data`` and
    fsync it. With ``dir_fd``, ``path``'s name is created in that directory."""
    fd = open_regular_no_follow(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, dir_fd=dir_fd)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _dir_fd_no_follow(path: Path) -> int:
    """A directory inside the root, opened without following a link."""
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as exc:
        if os.path.islink(path):
            raise CheckpointError(f"{path} is a symbolic link; asyncckpt never follows links in a root") from exc
        raise CheckpointError(f"cannot open {path}: {_reason(exc)}") from exc


def _create_root(root: Path) -> None:
    """``mkdir -p`` that fsyncs the parent of every directory it creates: a new root's entry (and
    those of new directories above it) must be durable, or a power cut could take the root, and its
    first checkpoint with it, away. The root itself, or a directory above it, may be a link.

    A parent the user may write into but not read (a mode 1733 drop box) cannot be opened to be
    fsynced: the new entry there is then left to the filesystem, as ``mkdir -p`` leaves it."""
    missing = []
    path = root
    while not path.is_dir():
        if os.path.lexists(path):
            what = "a symbolic link to a missing directory" if path.is_symlink() else "not a directory"
            if path == root:
                raise CheckpointError(f"checkpoint root {root} exists and is {what}")
            raise CheckpointError(f"cannot create checkpoint root {root}: {path} exists and is {what}")
        missing.append(path)
        if path.parent == path:
            break
        path = path.parent
    for path in reversed(missing):
        try:
            os.mkdir(path)
        except FileExistsError:
            if not path.is_dir():
                raise CheckpointError(f"cannot create checkpoint root {root}: {path} is not a directory") from None
        try:
            fsync_dir(path.parent)
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EPERM):
                raise


def _holder(fd: int) -> str:
    """The pid the lock's holder wrote, or "unknown" (the file is not trusted to hold just a pid)."""
    try:
        raw = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return "unknown"
    return raw if re.fullmatch("[0-9]{1,10}", raw) else "unknown"


class _LocalReadHandle:
    """A data file opened for ranged reads (never through a link, only a regular file)."""

    def __init__(self, fd: int, describe: str) -> None:
        self._fd = fd
        self._describe = describe
        self.size = os.fstat(fd).st_size

    def read_into(self, buffer: memoryview, offset: int) -> int:
        """See :meth:`asyncckpt.storage.backend.ReadHandle.read_into`."""
        return os.preadv(self._fd, [buffer], offset)

    def fileno(self) -> int | None:
        """See :meth:`asyncckpt.storage.backend.ReadHandle.fileno`."""
        return self._fd

    def close(self) -> None:
        """See :meth:`asyncckpt.storage.backend.ReadHandle.close`."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class LocalBackend:
    """A checkpoint root on the local filesystem: the :class:`~asyncckpt.storage.backend.Backend`
    (and ``RenameBackend``) protocol over plain files and directories.

    Nothing is created or locked until :meth:`lock` (a writer); readers use it as is. Inside the
    root nothing is opened through a symbolic link and only regular files are read or written.

    Args:
        root: The root directory (created by ``lock``).
        atomic_rename: Whether commits may rename directories. False declares a filesystem whose
            renames are not atomic (a FUSE mount of an object store): the manifest-written-last
            commit then applies.
    """

    def __init__(self, root: str | os.PathLike[str], *, atomic_rename: bool = True) -> None:
        # absolute now: a process that changes its working directory later (a launcher, hydra)
        # must go on writing to, and deleting from, the root it locked, not a namesake elsewhere
        self._root = Path(os.path.abspath(root))
        self.capabilities = Capabilities(atomic_rename=atomic_rename, fsync=True, mmap=True, lock=True)
        self._pid = os.getpid()
        self._lock_fd = -1
        self._released = False
        self._key: tuple[int, int] | None = None

    @property
    def root(self) -> Path:
        """The root directory, made absolute against the working directory of when it was given."""
        return self._root

    @property
    def location(self) -> str:
        """See :meth:`asyncckpt.storage.backend.Backend.location`: the root's path."""
        return str(self._root)

    def path(self, name: str) -> Path:
        """The local path of ``name`` (the root itself for "").

        Args:
            name: A relative name in the root.

        Returns:
            The path.
        """
        return self._root / name if name else self._root

    def describe(self, name: str) -> str:
        """See :meth:`asyncckpt.storage.backend.Backend.describe`."""
        return str(self.path(name))

    # ---- the writer lock ----------------------------------------------------------------------

    def lock(self) -> None:
        """See :meth:`asyncckpt.storage.backend.Backend.lock`: ``flock`` on ``ROOT/.lock``."""
        if self._lock_fd >= 0:
            return
        try:
            _create_root(self._root)
        except OSError as exc:
            raise CheckpointError(f"cannot create checkpoint root {self._root}: {_reason(exc)}") from exc
        self._lock_fd = self._acquire_lock()
        self._released = False  # this object may lock the root again after a close

    def _acquire_lock(self) -> int:
        path = self._root / LOCK_NAME
        try:
            st = os.stat(self._root)
        except OSError as exc:
            raise CheckpointError(f"cannot use checkpoint root {self._root}: {_reason(exc)}") from exc
        key = (st.st_dev, st.st_ino)
        in_use = "only one CheckpointManager (or prune) may write to a root at a time"
        with _held_guard:
            if key in _held:
                raise RootInUseError(
                    f"checkpoint root {self._root} is in use: it is already open in this process by another "
                    "CheckpointManager or prune; close it first"
                )
            try:
                fd = open_regular_no_follow(path, os.O_RDWR | os.O_CREAT)
            except CheckpointError as exc:
                cause = exc.__cause__
                if isinstance(cause, OSError) and cause.errno == errno.EROFS:
                    raise CheckpointError(
                        f"checkpoint root {self._root} is on a read-only filesystem: a writer cannot open its lock "
                        f"{path} (reading checkpoints needs no lock)"
                    ) from cause
                raise
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = _holder(fd) if exc.errno in (errno.EACCES, errno.EAGAIN) else None
                os.close(fd)
                if holder is None:
                    raise CheckpointError(f"cannot lock {path}: {_reason(exc)}") from exc
                raise RootInUseError(
                    f"checkpoint root {self._root} is in use by another writer (pid {holder}); {in_use}"
                ) from None
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, str(os.getpid()).encode(), 0)
            except OSError as exc:
                os.close(fd)  # releases the lock just taken
                raise CheckpointError(f"cannot write {path}: {_reason(exc)}") from exc
            _held[key] = fd
            self._key = key
        return fd

    def check_lock(self) -> None:
        """See :meth:`asyncckpt.storage.backend.Backend.check_lock`: a flock is held until this
        process releases it or dies, so only a release is checked: a thread still writing after
        ``close`` gave up on it (a store that answered late) must not touch what the next writer
        wrote."""
        if self._released:
            raise RootInUseError(f"checkpoint root {self.location} was closed by this writer; its lock is released")

    def close(self) -> None:
        """See :meth:`asyncckpt.storage.backend.Backend.close`."""
        if self._lock_fd < 0:
            return
        if os.getpid() != self._pid:  # a forked child: the lock is its parent's, the fd closed at the fork
            self._lock_fd = -1
            return
        self._released = True
        with _held_guard:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            except OSError:
                pass  # closing releases it anyway
            os.close(self._lock_fd)
            if self._key is not None:
                _held.pop(self._key, None)
        self._lock_fd = -1

    # ---- writing ------------------------------------------------------------------------------

    def _make_parents(self, name: str) -> None:
        """Create the missing directories above ``name`` (never through a link)."""
        parts = name.split("/")[:-1]
        for i in range(len(parts)):
            path = self.path("/".join(parts[: i + 1]))
            try:
                os.mkdir(path)
            except FileExistsError:
                if not stat.S_ISDIR(os.lstat(path).st_mode):
                    what = describe_file_kind(os.lstat(path).st_mode)
                    raise CheckpointError(f"{path} is {what}, not a directory asyncckpt can use") from None
            except OSError as exc:
                raise CheckpointError(f"cannot create {path}: {_reason(exc)}") from exc

    def open_write(self, name: str, size_hint: int | None = None) -> DataFileWriter:
        """See :meth:`asyncckpt.storage.backend.Backend.open_write` (``size_hint`` is not needed)."""
        self._make_parents(name)
        return DataFileWriter(self.path(name))

    def write_small(self, name: str, data: bytes) -> None:
        """See :meth:`asyncckpt.storage.backend.Backend.write_small`."""
        self._make_parents(name)
        _write_new_synced(self.path(name), data)

    def sync(self, prefix: str) -> None:
        """See :meth:`asyncckpt.storage.backend.Backend.sync`: an fsync of the directory."""
        fsync_dir(self.path(prefix))

    def make_dir(self, name: str) -> None:
        """See :meth:`asyncckpt.storage.backend.RenameBackend.make_dir`."""
        os.mkdir(self.path(name))  # never an existing name, never through a link

    def rename(self, source: str, target: str) -> None:
        """See :meth:`asyncckpt.storage.backend.RenameBackend.rename`."""
        os.rename(self.path(source), self.path(target))

    def mode(self, name: str) -> int | None:
        """See :meth:`asyncckpt.storage.backend.RenameBackend.mode`."""
        try:
            return os.lstat(self.path(name)).st_mode
        except (FileNotFoundError, NotADirectoryError):
            return None

    def replace_small(self, name: str, data: bytes) -> None:
        """See :meth:`asyncckpt.storage.backend.RenameBackend.replace_small`.

        Every step goes through one descriptor of the object's directory, opened without following
        a link, so a directory swapped for a link meanwhile cannot redirect the write."""
        path = self.path(name)
        dir_fd = _dir_fd_no_follow(path.parent)
        try:
            temp = f"{path.name}.{TEMP_PREFIX}{_token()}"
            try:
                _write_new_synced(path.parent / temp, data, dir_fd=dir_fd)
                os.rename(temp, path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
                os.fsync(dir_fd)
            except OSError as exc:  # a full disk while writing, or the rename: no temp left behind
                try:
                    os.unlink(temp, dir_fd=dir_fd)
                except OSError:
                    pass
                raise CheckpointError(f"cannot replace {path}: {_reason(exc)}") from exc
        finally:
            os.close(dir_fd)

    # ---- reading ------------------------------------------------------------------------------

    def open_read(self, name: str) -> _LocalReadHandle:
        """See :meth:`asyncckpt.storage.backend.Backend.open_read`."""
        path = self.path(name)
        return _LocalReadHandle(open_data_file(path), str(path))

    def read_small(self, name: str, limit: int) -> bytes:
        """See :meth:`asyncckpt.storage.backend.Backend.read_small`."""
        return read_file_no_follow(self.path(name), limit)

    def list(self, prefix: str = "") -> list[Entry]:
        """See :meth:`asyncckpt.storage.backend.Backend.list`."""
        path = self.path(prefix)
        try:
            with os.scandir(path) as entries:
                out = []
                for entry in entries:
                    try:
                        is_dir = entry.is_dir(follow_symlinks=False)
                    except OSError:
                        is_dir = False
                    out.append(Entry(entry.name, is_dir))
                return out
        except FileNotFoundError:
            return []
        except NotADirectoryError:
            raise CheckpointError(f"{path} is not a directory") from None
        except OSError as exc:
            raise CheckpointError(f"cannot list {path}: {_reason(exc)}") from exc

    def stat(self, name: str) -> ObjectInfo | None:
        """See :meth:`asyncckpt.storage.backend.Backend.stat`."""
        try:
            st = os.lstat(self.path(name))
        except (FileNotFoundError, NotADirectoryError):
            return None
        for test, kind in ((stat.S_ISDIR, "dir"), (stat.S_ISREG, "file"), (stat.S_ISLNK, "link")):
            if test(st.st_mode):
                return ObjectInfo(kind, 0 if kind == "dir" else st.st_size)
        return ObjectInfo("other", 0)

    def identity(self, name: str) -> tuple[int, int] | None:
        """See :meth:`asyncckpt.storage.backend.Backend.identity`: ``(st_dev, st_ino)``."""
        try:
            st = os.lstat(self.path(name))
        except (FileNotFoundError, NotADirectoryError):
            return None
        return st.st_dev, st.st_ino

    # ---- deleting -----------------------------------------------------------------------------

    def delete(self, name: str) -> None:
        """See :meth:`asyncckpt.storage.backend.Backend.delete`: only a regular file is unlinked,
        through a descriptor of its directory opened without following a link."""
        path = self.path(name)
        try:
            dir_fd = _dir_fd_no_follow(path.parent)
        except CheckpointError:
            return  # its directory is gone (or is not ours to enter): nothing of ours to delete
        try:
            try:
                mode = os.stat(path.name, dir_fd=dir_fd, follow_symlinks=False).st_mode
            except FileNotFoundError:
                return
            if stat.S_ISREG(mode):
                os.unlink(path.name, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)

    def delete_tree(self, prefix: str) -> None:
        """See :meth:`asyncckpt.storage.backend.Backend.delete_tree`."""
        if not prefix:
            raise ValueError("delete_tree never removes the root")
        shutil.rmtree(self.path(prefix), ignore_errors=True)
