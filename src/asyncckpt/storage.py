"""The local filesystem: the writer lock, temp dirs, fsync discipline, atomic commit, listing.

Durability order of a commit (what makes a checkpoint survive power loss):
  1. data files written and fsynced, 2. manifest.json written and fsynced,
  3. the temp dir fsynced (its entries are durable), 4. rename temp dir -> step-N,
  5. the root fsynced (the rename is durable). Retention deletes only after step 5.
A directory named step-N therefore always holds a complete checkpoint; anything unfinished is a
``.tmp-*`` directory, which readers never look at and the next writer sweeps away.
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from . import _phases
from .errors import CheckpointError
from .format import MANIFEST_NAME, parse_step_dir, step_dir_name

LOCK_NAME = ".lock"
TEMP_PREFIX = ".tmp-"
REPLACED_PREFIX = ".replaced-"


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
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
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


def _write_new_synced(path: Path, data: bytes) -> None:
    """Create ``path`` (never an existing file), write all of ``data`` and fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalStorage:
    """A checkpoint root owned by this process (the one writer) for as long as it is open."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise CheckpointError(f"checkpoint root {self.root} exists and is not a directory")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CheckpointError(f"cannot create checkpoint root {self.root}: {exc}") from exc
        self._lock_fd = self._acquire_lock()
        self.sweep()

    def _acquire_lock(self) -> int:
        path = self.root / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise CheckpointError(
                f"checkpoint root {self.root} is in use by another writer (pid {holder}); "
                "only one CheckpointManager may write to a root at a time"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        return fd

    def close(self) -> None:
        if self._lock_fd >= 0:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = -1

    def sweep(self) -> list[str]:
        """Remove what dead writers left: temp dirs, and undo a replace cut short by a crash."""
        removed = []
        for entry in os.scandir(self.root):
            if entry.name.startswith(REPLACED_PREFIX):
                original = self.root / entry.name[len(REPLACED_PREFIX) :].rsplit(".", 1)[0]
                if not original.exists():  # crashed between the two renames: put it back
                    os.rename(entry.path, original)
                    fsync_dir(self.root)
                    continue
            if entry.name.startswith((TEMP_PREFIX, REPLACED_PREFIX)):
                shutil.rmtree(entry.path, ignore_errors=True)
                removed.append(entry.name)
        return removed

    def new_temp_dir(self, step: int) -> Path:
        path = self.root / f"{TEMP_PREFIX}{step_dir_name(step)}-{secrets.token_hex(4)}"
        path.mkdir()
        return path

    def write_manifest(self, temp_dir: Path, data: bytes) -> None:
        _write_new_synced(temp_dir / MANIFEST_NAME, data)
        fsync_dir(temp_dir)

    def replace_manifest(self, checkpoint: Path, data: bytes) -> None:
        """Swap a committed checkpoint's manifest atomically (tags change; the data does not)."""
        temp = checkpoint / f"{MANIFEST_NAME}.{TEMP_PREFIX}{secrets.token_hex(4)}"
        _write_new_synced(temp, data)
        os.rename(temp, checkpoint / MANIFEST_NAME)
        fsync_dir(checkpoint)

    def commit(self, temp_dir: Path, step: int) -> Path:
        """Atomically publish ``temp_dir`` as step-N (replacing an older save of the same step)."""
        final = self.root / step_dir_name(step)
        if final.exists():
            parked = self.root / f"{REPLACED_PREFIX}{final.name}.{secrets.token_hex(4)}"
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
            doomed = self.root / f"{TEMP_PREFIX}replaced-{secrets.token_hex(4)}"
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
        doomed = self.root / f"{TEMP_PREFIX}delete-{checkpoint.path.name}-{secrets.token_hex(4)}"
        os.rename(checkpoint.path, doomed)
        fsync_dir(self.root)
        shutil.rmtree(doomed, ignore_errors=True)

    def checkpoints(self) -> list[CommittedCheckpoint]:
        return list_checkpoints(self.root)
