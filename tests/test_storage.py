"""The local backend under the rename commit: the writer lock, sweeping, atomic commit and deletion."""

from __future__ import annotations

import array
import errno
import fcntl
import os
import random
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest
import torch

import asyncckpt
from _tmpfs import tmpfs
from _trees import assert_same_tree
from _waiting import run_with_timeout
from asyncckpt import CheckpointError, CheckpointManager, RootInUseError
from asyncckpt.storage import local as storage_mod
from asyncckpt.storage.backend import CheckpointRef
from asyncckpt.storage.commit import CommitProtocol, CommittedCheckpoint, Staging, open_storage


@pytest.fixture
def root(tmp_path):
    return tmp_path / "ckpts"


@pytest.fixture
def store(root):
    storage = open_storage(root)
    yield storage
    storage.close()


def make_checkpoint(storage: CommitProtocol, step: int, content: bytes = b"x"):
    staging = storage.begin(step)
    (Path(storage.location) / staging.prefix / "data-00000.bin").write_bytes(content)
    storage.stage_manifest(staging, b"{}")
    return storage.publish(staging, b"{}").path


def temp_of(storage: CommitProtocol, staging: Staging) -> Path:
    return Path(storage.location) / staging.prefix


def entries(path):
    return sorted(os.listdir(path))


def test_root_is_created_with_a_lock_file(root):
    storage = open_storage(root)
    try:
        assert root.is_dir()
        assert entries(root) == [".lock"]
        assert (root / ".lock").read_text() == str(os.getpid())
    finally:
        storage.close()


def test_second_writer_on_the_same_root_is_refused(store, root):
    with pytest.raises(
        CheckpointError,
        match="is in use: it is already open in this process by another CheckpointManager or prune; close it first",
    ):
        open_storage(root)
    # the first writer is unaffected
    assert make_checkpoint(store, 1).is_dir()
    assert [c.step for c in store.checkpoints()] == [1]


def test_second_writer_does_not_sweep_the_first_writers_temp_dir(store, root):
    temp = temp_of(store, store.begin(4))
    with pytest.raises(CheckpointError, match="in use"):
        open_storage(root)
    assert temp.is_dir()


def test_lock_is_released_on_close(root):
    first = open_storage(root)
    first.close()
    first.close()  # idempotent
    second = open_storage(root)
    try:
        with pytest.raises(CheckpointError, match="in use"):
            open_storage(root)
    finally:
        second.close()
    open_storage(root).close()


def test_sweep_removes_temp_dirs_and_keeps_checkpoints(root):
    first = open_storage(root)
    make_checkpoint(first, 3)
    leftover = temp_of(first, first.begin(5))
    (leftover / "data-00000.bin").write_bytes(b"partial")
    first.close()
    (root / ".tmp-delete-step-000000000001-0badf00d").mkdir()
    (root / ".tmp-delete-step-000000000001-0badf00d" / "manifest.json").write_bytes(b"{}")

    second = open_storage(root)  # opening sweeps
    try:
        assert entries(root) == [".lock", "step-000000000003"]
        assert (root / "step-000000000003" / "data-00000.bin").read_bytes() == b"x"
        assert second.sweep() == []
    finally:
        second.close()


def test_sweep_reports_what_it_removed(store, root):
    (root / ".tmp-step-000000000009-abcd1234").mkdir()
    assert store.sweep() == [".tmp-step-000000000009-abcd1234"]
    assert entries(root) == [".lock"]


def test_sweep_puts_back_a_checkpoint_parked_by_a_crashed_replace(root):
    """Crash between ``rename(final, parked)`` and ``rename(temp, final)``: the old one comes back."""
    root.mkdir()
    parked = root / ".replaced-step-000000000005.0000abcd"
    parked.mkdir()
    (parked / "manifest.json").write_bytes(b"old")
    (root / ".tmp-step-000000000005-12345678").mkdir()  # the new save that never got renamed
    storage = open_storage(root)
    try:
        assert entries(root) == [".lock", "step-000000000005"]
        assert (root / "step-000000000005" / "manifest.json").read_bytes() == b"old"
        assert [(c.step, c.path) for c in storage.checkpoints()] == [(5, root / "step-000000000005")]
    finally:
        storage.close()


def test_sweep_drops_a_parked_checkpoint_once_its_replacement_committed(root):
    """Crash after both renames but before the parked copy was removed: the new one stays."""
    root.mkdir()
    (root / "step-000000000005").mkdir()
    (root / "step-000000000005" / "manifest.json").write_bytes(b"new")
    (root / ".replaced-step-000000000005.0000abcd").mkdir()
    (root / ".replaced-step-000000000005.0000abcd" / "manifest.json").write_bytes(b"old")
    storage = open_storage(root)
    try:
        assert entries(root) == [".lock", "step-000000000005"]
        assert (root / "step-000000000005" / "manifest.json").read_bytes() == b"new"
    finally:
        storage.close()


def test_root_that_is_a_regular_file_is_refused(tmp_path):
    path = tmp_path / "ckpts"
    path.write_bytes(b"not a directory")
    with pytest.raises(CheckpointError, match="exists and is not a directory"):
        open_storage(path)
    assert path.read_bytes() == b"not a directory"


def test_root_under_a_regular_file_is_refused(tmp_path):
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(CheckpointError, match="cannot create checkpoint root"):
        open_storage(tmp_path / "file" / "ckpts")


def test_new_temp_dirs_are_hidden_and_unique(store, root):
    a, b = temp_of(store, store.begin(7)), temp_of(store, store.begin(7))
    assert a != b
    for temp in (a, b):
        assert temp.parent == root and temp.is_dir()
        assert temp.name.startswith(".tmp-step-000000000007-")
    assert store.checkpoints() == []


def test_commit_makes_the_step_visible_and_the_temp_dir_gone(store, root):
    staging = store.begin(42)
    temp = temp_of(store, staging)
    (temp / "data-00000.bin").write_bytes(b"payload")
    store.stage_manifest(staging, b'{"m": 1}')
    final = store.publish(staging, b'{"m": 1}').path
    assert final == root / "step-000000000042"
    assert not temp.exists()
    assert entries(root) == [".lock", "step-000000000042"]
    assert (final / "data-00000.bin").read_bytes() == b"payload"
    assert (final / "manifest.json").read_bytes() == b'{"m": 1}'
    assert [(c.step, c.path) for c in store.checkpoints()] == [(42, final)]


def test_commit_replaces_an_existing_step_without_leftovers(store, root):
    make_checkpoint(store, 8, b"old")
    final = make_checkpoint(store, 8, b"new")
    assert (final / "data-00000.bin").read_bytes() == b"new"
    assert entries(root) == [".lock", "step-000000000008"]


def test_checkpoints_are_listed_oldest_first_ignoring_other_entries(store, root):
    for step in (30, 2, 100):
        make_checkpoint(store, step)
    (root / "step-000000000007").write_bytes(b"a file, not a checkpoint")
    (root / "step-12").mkdir()
    (root / "notes").mkdir()
    os.symlink(root / "step-000000000030", root / "step-000000000031")
    assert [c.step for c in store.checkpoints()] == [2, 30, 100]


def test_delete_hides_the_checkpoint_before_removing_it(store, root, monkeypatch):
    final = make_checkpoint(store, 6)
    make_checkpoint(store, 9)
    seen = {}

    def interrupted_rmtree(path, ignore_errors=False):  # a crash right before the removal
        seen["path"] = path
        seen["steps"] = [c.step for c in store.checkpoints()]

    monkeypatch.setattr(storage_mod.shutil, "rmtree", interrupted_rmtree)
    store.delete(CommittedCheckpoint(6, CheckpointRef(store.backend, final.name)))
    monkeypatch.undo()

    assert seen["steps"] == [9]  # already invisible when the removal started
    assert seen["path"].parent == root and seen["path"].name.startswith(".tmp-")
    assert not final.exists()
    # the husk is an ordinary temp dir: the next writer sweeps it
    store.close()
    open_storage(root).close()
    assert entries(root) == [".lock", "step-000000000009"]


def test_delete_removes_the_checkpoint(store, root):
    final = make_checkpoint(store, 6)
    store.delete(CommittedCheckpoint(6, CheckpointRef(store.backend, final.name)))
    assert entries(root) == [".lock"]
    assert store.checkpoints() == []


def test_abort_removes_a_temp_dir(store, root):
    staging = store.begin(1)
    (temp_of(store, staging) / "data-00000.bin").write_bytes(b"x")
    store.abort(staging)
    assert entries(root) == [".lock"]


def test_data_file_writer_reports_offsets(tmp_path):
    writer = storage_mod.DataFileWriter(tmp_path / "data-00000.bin")
    assert writer.append(b"abc") == 0
    assert writer.append(memoryview(b"defgh")) == 3
    assert writer.append(b"") == 8
    writer.finish()
    writer.abort()
    assert (tmp_path / "data-00000.bin").read_bytes() == b"abcdefgh"
    with pytest.raises(CheckpointError, match="data-00000.bin: File exists"):
        storage_mod.DataFileWriter(tmp_path / "data-00000.bin")


# ---- nothing outside the root is touched: links and non-regular files are refused -------------------


def test_a_lock_that_is_a_symlink_is_refused_and_its_target_left_alone(tmp_path, root):
    root.mkdir()
    outside = tmp_path / "precious.txt"
    outside.write_bytes(b"do not truncate me\n")
    os.symlink(outside, root / ".lock")
    with pytest.raises(CheckpointError, match=r"\.lock is a symbolic link") as excinfo:
        open_storage(root)
    assert str(root / ".lock") in str(excinfo.value)
    assert outside.read_bytes() == b"do not truncate me\n"
    assert os.path.islink(root / ".lock")


def test_a_dangling_lock_symlink_is_refused_and_nothing_is_created(tmp_path, root):
    root.mkdir()
    os.symlink(tmp_path / "would-be-created", root / ".lock")
    with pytest.raises(CheckpointError, match="symbolic link"):
        open_storage(root)
    assert not (tmp_path / "would-be-created").exists()


def test_a_lock_that_is_a_fifo_is_refused_without_hanging(root):
    root.mkdir()
    os.mkfifo(root / ".lock")
    with pytest.raises(CheckpointError, match=r"\.lock is not a regular file \(a FIFO\)"):
        run_with_timeout(lambda: open_storage(root), timeout=30)


def test_a_lock_that_is_a_directory_is_refused(root):
    (root / ".lock").mkdir(parents=True)
    with pytest.raises(CheckpointError, match=r"\.lock is a directory"):
        open_storage(root)


def test_a_second_writer_in_the_same_process_gets_root_in_use_error(store, root):
    with pytest.raises(
        RootInUseError,
        match="is in use: it is already open in this process by another CheckpointManager or prune; close it first",
    ):
        open_storage(root)
    assert issubclass(RootInUseError, CheckpointError)


@pytest.fixture
def ro_mount(tmp_path):
    """A small tmpfs, filled while writable, then remounted read-only (chmod does not stop root)."""
    with tmpfs(tmp_path / "mnt", "1m") as mnt:

        def make_read_only() -> None:
            subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True, capture_output=True)

        yield mnt, make_read_only


def test_a_read_only_root_is_a_checkpoint_error_that_says_so(ro_mount):
    mnt, make_read_only = ro_mount
    (mnt / "ckpts").mkdir()
    make_read_only()
    with pytest.raises(CheckpointError, match="read-only") as excinfo:
        open_storage(mnt / "ckpts")
    assert str(mnt / "ckpts") in str(excinfo.value)


def test_a_read_only_root_with_a_lock_file_is_a_checkpoint_error_that_says_so(ro_mount):
    mnt, make_read_only = ro_mount
    open_storage(mnt / "ckpts").close()
    make_read_only()
    with pytest.raises(CheckpointError, match="read-only"):
        open_storage(mnt / "ckpts")


def test_a_root_that_cannot_be_created_on_a_read_only_filesystem(ro_mount):
    mnt, make_read_only = ro_mount
    make_read_only()
    with pytest.raises(CheckpointError, match="cannot create checkpoint root .*read-only"):
        open_storage(mnt / "a" / "ckpts")


def test_the_parents_of_a_new_root_are_fsynced(tmp_path, monkeypatch):
    """A fresh root's entry in its parent must be durable before its first checkpoint counts."""
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    open_storage(tmp_path / "a" / "b" / "ckpts").close()
    assert str(tmp_path) in synced  # holds the new entry "a"
    assert str(tmp_path / "a") in synced
    assert str(tmp_path / "a" / "b") in synced
    synced.clear()
    open_storage(tmp_path / "a" / "b" / "ckpts").close()  # an existing root: nothing new to make durable
    assert str(tmp_path / "a" / "b") not in synced


def test_commit_refuses_a_step_name_that_is_a_symlink(tmp_path, store, root):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "keep.txt").write_bytes(b"mine")
    os.symlink(outside, root / "step-000000000004")
    staging = store.begin(4)
    with pytest.raises(CheckpointError, match="step-000000000004 .*symbolic link"):
        store.publish(staging, b"{}")
    assert os.path.islink(root / "step-000000000004")
    assert entries(outside) == ["keep.txt"] and (outside / "keep.txt").read_bytes() == b"mine"


def test_replace_manifest_refuses_a_checkpoint_dir_that_is_a_symlink(tmp_path, store, root):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "manifest.json").write_bytes(b"theirs")
    os.symlink(outside, root / "step-000000000004")
    with pytest.raises(CheckpointError, match="symbolic link"):
        store.replace_manifest(root / "step-000000000004", b"ours")
    assert entries(outside) == ["manifest.json"] and (outside / "manifest.json").read_bytes() == b"theirs"


def test_data_files_and_manifests_are_never_written_through_a_link(tmp_path, store):
    staging = store.begin(3)
    temp = temp_of(store, staging)
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"theirs")
    os.symlink(outside, temp / "data-00000.bin")
    os.symlink(outside, temp / "manifest.json")
    with pytest.raises(CheckpointError, match="data-00000.bin"):
        storage_mod.DataFileWriter(temp / "data-00000.bin")
    with pytest.raises(CheckpointError, match="manifest.json"):
        store.stage_manifest(staging, b"ours")
    assert outside.read_bytes() == b"theirs"


# ---- the sweep touches only the names this library makes -----------------------------------------


def test_the_sweep_leaves_other_tools_files_alone(root):
    root.mkdir()
    theirs = {
        ".tmp-dataset-cache": "dir",
        ".tmp-step-12-abc": "dir",
        ".tmp-step-000000000010-1A2B3C4D": "dir",  # not a name we make (we write lowercase hex)
        ".tmp-step-000000000010-1a2b3c4d.bak": "dir",
        ".tmp-delete-my-things": "dir",
        ".tmp-replaced-stuff": "dir",
        ".replaced-config.yaml.bak": "file",
        ".replaced-step-000000000005.bak": "dir",
        ".tmpfile": "file",
    }
    for name, kind in theirs.items():
        if kind == "dir":
            (root / name).mkdir()
            (root / name / "inside.txt").write_bytes(b"user data")
        else:
            (root / name).write_bytes(b"user data")
    ours = [
        ".tmp-step-000000000010-1a2b3c4d",
        ".tmp-delete-step-000000000002-0badf00d",
        ".tmp-replaced-deadbeef",
        ".replaced-step-000000000007.cafe0123",  # its step-7 exists: the parked copy is dropped
    ]
    for name in ours:
        (root / name).mkdir()
    (root / "step-000000000007").mkdir()
    storage = open_storage(root)
    try:
        assert entries(root) == sorted([*theirs, ".lock", "step-000000000007"])
        for name, kind in theirs.items():
            path = root / name / "inside.txt" if kind == "dir" else root / name
            assert path.read_bytes() == b"user data", name
    finally:
        storage.close()


def test_the_sweep_never_follows_or_renames_links(tmp_path, root):
    root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_bytes(b"mine")
    os.symlink(outside, root / ".tmp-step-000000000010-1a2b3c4d")
    os.symlink(outside, root / ".replaced-step-000000000005.1a2b3c4d")  # step-5 absent: not "put back"
    open_storage(root).close()
    assert entries(outside) == ["keep.txt"] and (outside / "keep.txt").read_bytes() == b"mine"
    assert "step-000000000005" not in entries(root)


def test_the_sweep_removes_a_manifest_temp_left_by_a_crashed_tag_rewrite(root):
    root.mkdir()
    step = root / "step-000000000003"
    step.mkdir()
    (step / "manifest.json").write_bytes(b"{}")
    (step / "manifest.json..tmp-0badf00d").write_bytes(b"half")
    (step / "manifest.json.orig").write_bytes(b"a user's copy")
    open_storage(root).close()
    assert entries(step) == ["manifest.json", "manifest.json.orig"]


def test_prune_refuses_a_lock_that_is_a_symlink_and_leaves_its_target_alone(tmp_path, root, capsys):
    from asyncckpt.cli.commands import main

    storage = open_storage(root)
    for step in (1, 2, 3):
        make_checkpoint(storage, step)
    storage.close()
    outside = tmp_path / "precious.txt"
    outside.write_bytes(b"do not truncate me\n")
    os.unlink(root / ".lock")
    os.symlink(outside, root / ".lock")
    assert main(["prune", str(root), "--keep-last", "1"]) == 2
    assert f"{root / '.lock'} is a symbolic link" in capsys.readouterr().err
    assert outside.read_bytes() == b"do not truncate me\n"
    assert [c.step for c in storage_mod.list_checkpoints(root)] == [1, 2, 3]


@pytest.fixture
def drop_box():
    """A directory anyone may write into but not list (mode 1733, like a scratch drop box)."""
    base = tempfile.mkdtemp(prefix="asyncckpt-drop-")  # under /tmp: the user below can reach it
    os.chmod(base, 0o1733)
    yield Path(base)
    shutil.rmtree(base)


def as_user_nobody(fn) -> str:
    """Run ``fn`` in a forked child turned into the unprivileged user nobody; its outcome, as text."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(read_end)
            os.setgid(65534)
            os.setuid(65534)
            try:
                outcome = f"ok {fn()}"
            except BaseException as exc:  # noqa: BLE001
                outcome = f"{type(exc).__name__}: {exc}"
            os.write(write_end, outcome.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        outcome = run_with_timeout(pipe.read, timeout=60).decode()
    os.waitpid(pid, 0)
    return outcome


def test_a_root_is_created_in_a_parent_the_user_can_write_but_not_read(drop_box):
    def create() -> str:
        storage = open_storage(drop_box / "ckpts")
        storage.close()
        return str(os.stat(drop_box / "ckpts").st_uid)

    assert as_user_nobody(create) == "ok 65534"
    assert entries(drop_box / "ckpts") == [".lock"]


# ---- data files: O_DIRECT from a staging buffer, buffered where the filesystem refuses it ---------

KiB = 1024
MiB = 1024 * KiB
STAGE = storage_mod.STAGING_BYTES

# Append patterns, each a list of sizes: empty, sizes that are not multiples of 4096, exact
# blocks, appends bigger than the staging buffer, one byte at a time, and a mix around its edges.
APPEND_PATTERNS = {
    "empty": [],
    "one-empty-append": [0],
    "one-byte": [1],
    "under-a-block": [4095],
    "a-block": [4096],
    "over-a-block": [4097],
    "bytes-one-at-a-time": [1] * 5000,
    "odd-sizes": [3, 4093, 0, 12_345, 1, 65_537, 777],
    "the-buffer-exactly": [STAGE],
    "the-buffer-and-a-byte": [STAGE + 1],
    "bigger-than-the-buffer": [3 * STAGE + 12_345],
    "filling-the-buffer-across-appends": [STAGE - 1, 1, 1, STAGE - 2, 5],
    "mixed": [1 * MiB + 7, 3 * MiB, 2 * MiB + 4090, 9, 0, 6 * MiB + 1],
}


def _pattern_chunks(sizes: list[int], seed: int = 0) -> list[bytes]:
    data = random.Random(seed).randbytes(sum(sizes))
    out, at = [], 0
    for n in sizes:
        out.append(data[at : at + n])
        at += n
    return out


def _write_with(path: Path, chunks: list[bytes], direct: bool | None) -> storage_mod.DataFileWriter:
    writer = storage_mod.DataFileWriter(path, direct=direct)
    expected_offset = 0
    for chunk in chunks:
        assert writer.append(chunk) == expected_offset
        expected_offset += len(chunk)
    assert writer.size == expected_offset
    writer.finish()
    return writer


def _direct_flag(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)


needs_o_direct = pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this platform")


@needs_o_direct
def test_a_data_file_on_disk_is_written_around_the_page_cache(tmp_path):
    writer = storage_mod.DataFileWriter(tmp_path / "data-00000.bin")
    try:
        assert writer.direct and _direct_flag(writer.fd)
    finally:
        writer.abort()


@needs_o_direct
@pytest.mark.parametrize("sizes", list(APPEND_PATTERNS.values()), ids=list(APPEND_PATTERNS))
def test_direct_writes_give_the_bytes_and_size_buffered_writes_give(tmp_path, sizes):
    chunks = _pattern_chunks(sizes)
    direct = _write_with(tmp_path / "direct.bin", chunks, direct=True)
    assert direct.direct  # never fell back on this disk
    _write_with(tmp_path / "buffered.bin", chunks, direct=False)
    expected = b"".join(chunks)
    assert os.path.getsize(tmp_path / "direct.bin") == len(expected)
    assert (tmp_path / "direct.bin").read_bytes() == expected
    assert (tmp_path / "buffered.bin").read_bytes() == expected


def test_appends_of_other_buffer_formats_count_bytes(tmp_path):
    """A typed memoryview (a tensor's bytes seen as floats) is appended as its bytes."""
    floats = memoryview(array.array("f", [1.5, -0.0, 3.25]))
    writer = storage_mod.DataFileWriter(tmp_path / "data.bin")
    assert writer.append(floats) == 0
    assert writer.append(b"x") == 12
    writer.finish()
    assert (tmp_path / "data.bin").read_bytes() == floats.tobytes() + b"x"


def test_asyncckpt_direct_io_0_keeps_data_files_buffered(tmp_path, monkeypatch):
    monkeypatch.setenv(storage_mod.DIRECT_IO_ENV, "0")
    writer = storage_mod.DataFileWriter(tmp_path / "data.bin")
    try:
        assert not writer.direct and not _direct_flag(writer.fd)
    finally:
        writer.abort()


@pytest.fixture(params=["tmpfs", "ramfs"])
def memory_fs(request, tmp_path):
    """A memory filesystem mounted for the test: ramfs refuses O_DIRECT; tmpfs refused it before
    Linux 6.6 and takes it since (pages stay in memory either way)."""
    mnt = tmp_path / request.param
    mnt.mkdir()
    options = ["-o", "size=64m"] if request.param == "tmpfs" else []
    try:
        subprocess.run(
            ["mount", "-t", request.param, *options, request.param, str(mnt)], check=True, capture_output=True
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot mount a {request.param} here: {exc}")
    yield request.param, mnt
    subprocess.run(["umount", str(mnt)], check=True, capture_output=True)


@pytest.mark.parametrize("pattern", ["empty", "odd-sizes", "bigger-than-the-buffer", "bytes-one-at-a-time"])
def test_a_filesystem_that_refuses_o_direct_gets_the_same_bytes_buffered(memory_fs, pattern):
    kind, mnt = memory_fs
    chunks = _pattern_chunks(APPEND_PATTERNS[pattern])
    writer = _write_with(mnt / "data.bin", chunks, direct=True)
    if kind == "ramfs":
        assert not writer.direct
    assert (mnt / "data.bin").read_bytes() == b"".join(chunks)


@pytest.fixture
def loop_ext4(tmp_path):
    """An ext4 filesystem on a loop device of 4096-byte sectors (16 MiB), mounted for the test:
    a real block device that takes direct writes only in whole 4096-byte blocks, and a small
    disk to fill."""
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(16 * MiB)
    mnt = tmp_path / "ext4"
    mnt.mkdir()
    try:
        device = subprocess.run(
            ["losetup", "--sector-size", "4096", "-f", "--show", str(image)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot set up a loop device here: {exc}")
    try:
        subprocess.run(["mkfs.ext4", "-q", "-F", device], check=True, capture_output=True)
        subprocess.run(["mount", device, str(mnt)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        subprocess.run(["losetup", "-d", device], capture_output=True)
        pytest.skip(f"cannot make an ext4 on a loop device here: {exc}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
        subprocess.run(["losetup", "-d", device], capture_output=True)


@needs_o_direct
@pytest.mark.parametrize("size", [10_000, STAGE + 10_000])
def test_a_direct_write_refused_with_einval_goes_again_buffered(loop_ext4, monkeypatch, size):
    """The writer believes 512-byte blocks (as on most disks); this device takes 4096: the padded
    tail (a multiple of 512, not of 4096) is refused with EINVAL by the kernel, after the full
    staging buffers went direct. The file turns buffered and has exactly the bytes appended."""
    monkeypatch.setattr(storage_mod, "_alignment", lambda fd: 512)
    chunks = _pattern_chunks([size // 3, size - size // 3])
    writer = storage_mod.DataFileWriter(loop_ext4 / "data.bin")
    assert writer.direct
    for chunk in chunks:
        writer.append(chunk)
    writer.finish()
    assert not writer.direct
    assert (loop_ext4 / "data.bin").read_bytes() == b"".join(chunks)


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@needs_o_direct
def test_a_full_disk_under_direct_writes_raises_oserror_and_leaks_no_descriptor(loop_ext4):
    before = _open_fds()
    writer = storage_mod.DataFileWriter(loop_ext4 / "data.bin")
    assert writer.direct
    chunk = random.Random(1).randbytes(1 * MiB + 1)
    with pytest.raises(OSError) as excinfo:
        try:
            for _ in range(64):  # 64 MiB on a 16 MiB disk: an append fails, or else finish
                writer.append(chunk)
            writer.finish()
        except OSError:
            writer.abort()
            raise
    assert excinfo.value.errno == errno.ENOSPC
    writer.abort()  # again: never raises
    assert writer.fd == -1
    assert _open_fds() == before


@needs_o_direct
def test_a_full_disk_leaves_no_committed_checkpoint_and_the_next_save_commits(loop_ext4):
    """Through the manager: the failed save's files are removed, the earlier checkpoint stays."""
    written: list[bool] = []
    real_finish = storage_mod.DataFileWriter.finish

    def recording_finish(self):
        written.append(self.direct)
        real_finish(self)

    root = loop_ext4 / "ckpts"
    g = torch.Generator().manual_seed(3)
    small = {"noise": torch.randint(0, 256, (1 * MiB,), dtype=torch.uint8, generator=g)}
    big = {"noise": torch.randint(0, 256, (24 * MiB,), dtype=torch.uint8, generator=g)}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(storage_mod.DataFileWriter, "finish", recording_finish)
        mgr = CheckpointManager(root, keep_last=3, compression="zstd", workers=2)
        try:
            mgr.save(1, small).wait()
            mgr.save(2, big)
            with pytest.raises(CheckpointError, match="No space left"):
                run_with_timeout(mgr.wait)
            assert sorted(p.name for p in root.iterdir() if p.name.startswith("step-")) == ["step-000000000001"]
            assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")]
            assert_same_tree(small, asyncckpt.load(root))
            run_with_timeout(lambda: mgr.save(3, small).wait())
            assert 3 in mgr.steps()
        finally:
            mgr._close_quietly()
    assert written and all(written)  # the data files that were finished went direct


@needs_o_direct
def test_many_writers_at_once_each_get_their_own_bytes(tmp_path):
    """Writers in several threads share the staging pool: no buffer is used by two at once."""
    patterns = [[STAGE + i, 4097 * i, 1] for i in range(1, 7)]

    def write(i: int) -> None:
        _write_with(tmp_path / f"data-{i}.bin", _pattern_chunks(patterns[i], seed=i), direct=True)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(len(patterns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, sizes in enumerate(patterns):
        assert (tmp_path / f"data-{i}.bin").read_bytes() == b"".join(_pattern_chunks(sizes, seed=i))


@pytest.mark.parametrize("compression", ["zstd", None])
def test_a_save_restores_bit_exact_and_its_data_files_match_buffered_ones(tmp_path, monkeypatch, compression):
    g = torch.Generator().manual_seed(11)
    state = {
        "w": torch.randn(1_234_567, generator=g),
        "b": torch.randint(0, 256, (5 * MiB + 3,), dtype=torch.uint8, generator=g),
        "h": torch.randn(17, 3, generator=g).to(torch.bfloat16),
        "step": 7,
    }
    roots = {}
    for mode in ("1", "0"):
        monkeypatch.setenv(storage_mod.DIRECT_IO_ENV, mode)
        roots[mode] = tmp_path / f"direct-io-{mode}"
        mgr = CheckpointManager(roots[mode], keep_last=None, compression=compression, workers=2)
        try:
            run_with_timeout(mgr.save(7, state).wait)
        finally:
            mgr.close()
        assert_same_tree(state, asyncckpt.load(roots[mode]))

    def data_files(root: Path) -> list[bytes]:
        return [p.read_bytes() for p in sorted((root / "step-000000000007").glob("data-*"))]

    assert data_files(roots["1"]) == data_files(roots["0"])
    assert data_files(roots["1"])
