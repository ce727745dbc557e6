"""The local filesystem: the writer lock, temp dirs, fsync discipline, atomic commit, listing.

Durability order of a commit (what makes a checkpoint survive power loss):
  1. data files written and fsynced, 2. manifest.json written and fsynced,
  3. the temp dir fsynced (its entries are durable), 4. rename temp dir -> step-N,
  5. the root fsynced (the rename is durable). Retention deletes only after step 5.
A directory named step-N therefore always holds a complete checkpoint; anything unfinished is a
``.tmp-*`` directory, which readers never look at and the next writer sweeps away.

Inside the root the writer never follows a symbolic link and never opens anything but a regular
file: a link planted at ``.lock`` or at a checkpoint's name must not make us write elsewhere. The
sweep removes only the exact names this module makes, so other tools' dot-files are safe.

The writer lock is ``flock`` on ``ROOT/.lock``: it belongs to the open file description, so
closing some other descriptor of the file (a backup of the root taken by the training process)
leaves it alone, and it dies when the last descriptor of that description closes. A forked child
shares the description, so an at-fork hook closes the child's copy at once, without unlocking
(only ``LOCK_UN`` or the last close releases a flock): the child neither releases the lock nor
keeps the root locked after its parent died. The descriptor is close-on-exec, so an exec'd
subprocess never holds it. A second writer in the same process is refused from an in-process
registry, with a message that says so.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import secrets
import shutil
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

from asyncckpt import _phases
from asyncckpt.errors import CheckpointError, RootInUseError
from asyncckpt.format import MANIFEST_NAME, parse_step_dir, step_dir_name

LOCK_NAME = ".lock"
TEMP_PREFIX = ".tmp-"
REPLACED_PREFIX = ".replaced-"

# Every name the writer creates in a root (or a checkpoint dir), and nothing else, is swept.
_HEX = "[0-9a-f]{8}"
_SWEPT = re.compile(rf"\.tmp-step-[0-9]{{12}}-{_HEX}|\.tmp-delete-step-[0-9]{{12}}-{_HEX}|\.tmp-replaced-{_HEX}")
_PARKED = re.compile(rf"\.replaced-(step-[0-9]{{12}})\.{_HEX}")
_MANIFEST_TEMP = re.compile(rf"{re.escape(MANIFEST_NAME)}\.\.tmp-{_HEX}")


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


def describe_file_kind(mode: int) -> str:
    """ "a FIFO", "a directory"...: what an entry that is not a regular file is, for messages."""
    for test, name in (
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


@dataclass(frozen=True)
class CommittedCheckpoint:
    step: int
    path: Path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(root: Path) -> list[CommittedCheckpoint]:
    """Committed checkpoints under ``root``, oldest first. Symlinked entries are ignored."""
    out = []
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return []
    except NotADirectoryError:
        raise CheckpointError(f"checkpoint root {root} is not a directory") from None
    for entry in entries:
        step = parse_step_dir(entry.name)
        if step is not None and entry.is_dir(follow_symlinks=False):
            out.append(CommittedCheckpoint(step, Path(entry.path)))
    return sorted(out, key=lambda c: c.step)


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


class DataFileWriter:
    """Appends stored chunks to one data file and reports where each landed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = open_regular_no_follow(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        self.size = 0

    def append(self, data: bytes | memoryview) -> int:
        offset = self.size
        view = memoryview(data)
        while view:
            written = os.write(self.fd, view)
            view = view[written:]
        self.size += len(data)
        return offset

    def sync_and_close(self) -> None:
        try:
            os.fsync(self.fd)
        finally:
            self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


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


class LocalStorage:
    """A checkpoint root owned by this process (the one writer) for as long as it is open."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self._pid = os.getpid()
        try:
            _create_root(self.root)
        except OSError as exc:
            raise CheckpointError(f"cannot create checkpoint root {self.root}: {_reason(exc)}") from exc
        self._lock_fd = self._acquire_lock()
        try:
            self.sweep()
        except BaseException:
            self.close()
            raise

    def _acquire_lock(self) -> int:
        path = self.root / LOCK_NAME
        try:
            st = os.stat(self.root)
        except OSError as exc:
            raise CheckpointError(f"cannot use checkpoint root {self.root}: {_reason(exc)}") from exc
        self._key = (st.st_dev, st.st_ino)
        in_use = "only one CheckpointManager (or prune) may write to a root at a time"
        with _held_guard:
            if self._key in _held:
                raise RootInUseError(
                    f"checkpoint root {self.root} is in use: it is already open in this process by another "
                    "CheckpointManager or prune; close it first"
                )
            try:
                fd = open_regular_no_follow(path, os.O_RDWR | os.O_CREAT)
            except CheckpointError as exc:
                cause = exc.__cause__
                if isinstance(cause, OSError) and cause.errno == errno.EROFS:
                    raise CheckpointError(
                        f"checkpoint root {self.root} is on a read-only filesystem: a writer cannot open its lock "
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
                    f"checkpoint root {self.root} is in use by another writer (pid {holder}); {in_use}"
                ) from None
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, str(os.getpid()).encode(), 0)
            except OSError as exc:
                os.close(fd)  # releases the lock just taken
                raise CheckpointError(f"cannot write {path}: {_reason(exc)}") from exc
            _held[self._key] = fd
        return fd

    def close(self) -> None:
        if self._lock_fd < 0:
            return
        if os.getpid() != self._pid:  # a forked child: the lock is its parent's, the fd closed at the fork
            self._lock_fd = -1
            return
        with _held_guard:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            except OSError:
                pass  # closing releases it anyway
            os.close(self._lock_fd)
            _held.pop(self._key, None)
        self._lock_fd = -1

    def sweep(self) -> list[str]:
        """Remove what dead writers left, and undo a replace cut short by a crash.

        Only the exact names this module makes are touched, only real directories (and manifest
        temp files), never through a link: a user's ``.tmp-cache/`` in the root is not ours.
        """
        removed: list[str] = []
        try:
            entries = list(os.scandir(self.root))
        except OSError as exc:
            raise CheckpointError(f"cannot list checkpoint root {self.root}: {_reason(exc)}") from exc
        for entry in entries:
            try:
                if not entry.is_dir(follow_symlinks=False):
                    continue
            except OSError:
                continue
            parked = _PARKED.fullmatch(entry.name)
            if parked is not None and not os.path.lexists(self.root / parked.group(1)):
                # crashed between the two renames of a replace: put the old checkpoint back
                try:
                    os.rename(entry.path, self.root / parked.group(1))
                except OSError as exc:
                    raise CheckpointError(f"cannot put back {entry.path}: {_reason(exc)}") from exc
                fsync_dir(self.root)
            elif parked is not None or _SWEPT.fullmatch(entry.name):
                shutil.rmtree(entry.path, ignore_errors=True)
                removed.append(entry.name)
            elif parse_step_dir(entry.name) is not None:
                removed += _sweep_manifest_temps(Path(entry.path))
        return removed

    def new_temp_dir(self, step: int) -> Path:
        path = self.root / f"{TEMP_PREFIX}{step_dir_name(step)}-{_token()}"
        path.mkdir()  # never an existing name, never through a link
        return path

    def write_manifest(self, temp_dir: Path, data: bytes) -> None:
        _write_new_synced(temp_dir / MANIFEST_NAME, data)
        fsync_dir(temp_dir)

    def replace_manifest(self, checkpoint: Path, data: bytes) -> None:
        """Swap a committed checkpoint's manifest atomically (tags change; the data does not).

        Every step goes through one descriptor of the checkpoint dir, opened without following a
        link, so a checkpoint swapped for a link meanwhile cannot redirect the write."""
        dir_fd = _dir_fd_no_follow(checkpoint)
        try:
            temp = f"{MANIFEST_NAME}.{TEMP_PREFIX}{_token()}"
            _write_new_synced(checkpoint / temp, data, dir_fd=dir_fd)
            try:
                os.rename(temp, MANIFEST_NAME, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
                os.fsync(dir_fd)
            except OSError as exc:
                try:
                    os.unlink(temp, dir_fd=dir_fd)
                except OSError:
                    pass
                raise CheckpointError(f"cannot replace {checkpoint / MANIFEST_NAME}: {_reason(exc)}") from exc
        finally:
            os.close(dir_fd)

    def commit(self, temp_dir: Path, step: int) -> Path:
        """Atomically publish ``temp_dir`` as step-N (replacing an older save of the same step)."""
        final = self.root / step_dir_name(step)
        try:
            existing = os.lstat(final).st_mode
        except FileNotFoundError:
            existing = None
        if existing is not None and not stat.S_ISDIR(existing):
            raise CheckpointError(
                f"{final} exists and is {describe_file_kind(existing)}, not a checkpoint; "
                "asyncckpt neither follows nor replaces it"
            )
        if existing is not None:
            parked = self.root / f"{REPLACED_PREFIX}{final.name}.{_token()}"
            os.rename(final, parked)
            _phases.pause("replace")  # the window a crash-consistent sweep must repair
            try:
                os.rename(temp_dir, final)
            except BaseException:
                os.rename(parked, final)  # the failed save must not hide the checkpoint it replaced
                raise
            fsync_dir(self.root)
            # Renamed to a temp name before removal: a leftover can then only ever be swept, never
            # mistaken for a replace cut short and put back over a newer checkpoint.
            doomed = self.root / f"{TEMP_PREFIX}replaced-{_token()}"
            os.rename(parked, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
        else:
            os.rename(temp_dir, final)
            fsync_dir(self.root)
        return final

    def discard(self, path: Path) -> None:
        shutil.rmtree(path, ignore_errors=True)

    def delete(self, checkpoint: CommittedCheckpoint) -> None:
        """Hide a checkpoint with one rename first, so a crash mid-delete never leaves a husk."""
        doomed = self.root / f"{TEMP_PREFIX}delete-{checkpoint.path.name}-{_token()}"
        os.rename(checkpoint.path, doomed)
        fsync_dir(self.root)
        shutil.rmtree(doomed, ignore_errors=True)

    def checkpoints(self) -> list[CommittedCheckpoint]:
        return list_checkpoints(self.root)


def _sweep_manifest_temps(checkpoint: Path) -> list[str]:
    """The manifest temp file a tag rewrite cut short by a crash left in a committed checkpoint."""
    try:
        dir_fd = _dir_fd_no_follow(checkpoint)
    except CheckpointError:
        return []
    removed = []
    try:
        for name in os.listdir(dir_fd):
            if not _MANIFEST_TEMP.fullmatch(name):
                continue
            try:
                if stat.S_ISREG(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
                    os.unlink(name, dir_fd=dir_fd)
                    removed.append(f"{checkpoint.name}/{name}")
            except OSError:
                pass
    finally:
        os.close(dir_fd)
    return removed
