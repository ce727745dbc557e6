"""storage/backend.py: the local backend against the backend protocol, and the root chooser."""

from __future__ import annotations

import dataclasses
import mmap
import os

import pytest

from asyncckpt import CheckpointError, RootInUseError
from asyncckpt.storage.backend import Backend, Capabilities, Entry, ReadHandle, WriteStream, open_backend
from asyncckpt.storage.local import LocalBackend


@pytest.fixture
def backend(tmp_path):
    store = LocalBackend(tmp_path / "root")
    store.lock()
    yield store
    store.close()


def test_the_local_backend_implements_the_protocol(backend):
    assert isinstance(backend, Backend)
    assert backend.capabilities == Capabilities(atomic_rename=True, fsync=True, mmap=True, lock=True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        backend.capabilities.mmap = False  # type: ignore[misc]


def test_a_local_backend_may_declare_it_has_no_atomic_rename(tmp_path):
    assert LocalBackend(tmp_path, atomic_rename=False).capabilities.atomic_rename is False


def test_nothing_is_created_until_lock(tmp_path):
    LocalBackend(tmp_path / "root")
    assert not (tmp_path / "root").exists()


def test_a_stream_appends_in_order_reports_offsets_and_creates_parents(backend):
    stream = backend.open_write("step-000000000001/data-00000.bin")
    assert isinstance(stream, WriteStream)
    assert stream.append(b"abc") == 0
    assert stream.append(memoryview(b"defgh")) == 3
    stream.finish()
    assert (backend.root / "step-000000000001" / "data-00000.bin").read_bytes() == b"abcdefgh"
    with pytest.raises(CheckpointError, match="File exists"):
        backend.open_write("step-000000000001/data-00000.bin")


def test_an_aborted_stream_is_closed_and_left_for_the_commit_protocol(backend):
    stream = backend.open_write("a/data-00000.bin")
    stream.append(b"partial")
    stream.abort()
    stream.abort()  # idempotent
    # left in place, with a prefix of what was appended (a direct writer drops its staged bytes)
    assert b"partial".startswith((backend.root / "a" / "data-00000.bin").read_bytes())


def test_nothing_is_written_through_a_link(tmp_path, backend):
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, backend.root / "step-000000000002")
    with pytest.raises(CheckpointError, match="not a directory asyncckpt can use"):
        backend.open_write("step-000000000002/data-00000.bin")
    os.symlink(outside / "x", backend.root / "manifest.json")
    with pytest.raises(CheckpointError, match="symbolic link"):
        backend.write_small("manifest.json", b"ours")
    assert os.listdir(outside) == []


def test_byte_ranges_are_read_into_the_callers_buffer(backend):
    backend.write_small("d/data-00000.bin", bytes(range(100)))
    handle = backend.open_read("d/data-00000.bin")
    assert isinstance(handle, ReadHandle)
    try:
        assert handle.size == 100
        buffer = bytearray(10)
        assert handle.read_into(memoryview(buffer), 40) == 10
        assert bytes(buffer) == bytes(range(40, 50))
        assert handle.read_into(memoryview(buffer), 95) == 5  # short only at the end
        fd = handle.fileno()
        assert fd is not None
        with mmap.mmap(fd, 100, access=mmap.ACCESS_READ) as mapped:  # the mmap fast path
            assert mapped[7] == 7
    finally:
        handle.close()
        handle.close()


def test_small_objects_are_read_whole_up_to_a_limit(backend):
    backend.write_small("m.json", b"{}")
    assert backend.read_small("m.json", 2) == b"{}"
    with pytest.raises(CheckpointError, match="larger than the 1 limit"):
        backend.read_small("m.json", 1)
    with pytest.raises(CheckpointError, match="cannot open"):
        backend.read_small("missing.json", 10)
    os.mkfifo(backend.root / "fifo")
    with pytest.raises(CheckpointError, match="not a regular file"):
        backend.read_small("fifo", 10)


def test_list_stat_and_identity(backend):
    backend.write_small("step-000000000001/manifest.json", b"{}")
    os.symlink(backend.root / "step-000000000001", backend.root / "link")
    listed = {e.name: e for e in backend.list("")}
    assert listed["step-000000000001"] == Entry("step-000000000001", True)
    assert listed["link"] == Entry("link", False)  # never followed
    assert backend.list("missing") == []
    with pytest.raises(CheckpointError, match="not a directory"):
        backend.list("step-000000000001/manifest.json")
    assert backend.stat("step-000000000001").kind == "dir"
    assert backend.stat("step-000000000001/manifest.json").size == 2
    assert backend.stat("link").kind == "link"
    assert backend.stat("missing") is None
    before = backend.identity("step-000000000001")
    assert before is not None and backend.identity("missing") is None
    backend.write_small("new/manifest.json", b"{}")  # made while the old one exists: another inode
    backend.delete_tree("step-000000000001")
    backend.rename("new", "step-000000000001")
    assert backend.identity("step-000000000001") != before  # a replaced directory is another one


def test_delete_removes_only_regular_files_and_never_a_links_target(tmp_path, backend):
    backend.write_small("d/a.bin", b"x")
    backend.delete("d/a.bin")
    backend.delete("d/a.bin")  # already gone: nothing happens
    assert backend.list("d") == []
    target = tmp_path / "target.bin"
    target.write_bytes(b"theirs")
    os.symlink(target, backend.root / "d" / "b.bin")
    backend.delete("d/b.bin")
    assert target.read_bytes() == b"theirs"
    backend.delete_tree("d")
    assert backend.stat("d") is None
    with pytest.raises(ValueError):
        backend.delete_tree("")


def test_one_writer_holds_the_lock(tmp_path, backend):
    with pytest.raises(RootInUseError):
        LocalBackend(backend.root).lock()
    backend.close()
    again = LocalBackend(backend.root)
    again.lock()
    again.close()


def test_the_backend_is_chosen_from_a_path_or_url(tmp_path):
    assert isinstance(open_backend(tmp_path), LocalBackend)
    assert open_backend(str(tmp_path)).root == tmp_path
    assert open_backend(f"file://{tmp_path}/with%20space").root == tmp_path / "with space"
    assert open_backend(f"file://localhost{tmp_path}").root == tmp_path
    assert open_backend(tmp_path, atomic_rename=False).capabilities.atomic_rename is False
    mine = LocalBackend(tmp_path)
    assert open_backend(mine) is mine


@pytest.mark.parametrize("url", ["nosuch://bucket/ckpts", "hdfs://nn/ckpts"])
def test_a_scheme_without_a_backend_is_a_clear_error(url):
    scheme = url.split(":")[0]
    with pytest.raises(CheckpointError, match=f"no storage backend for scheme '{scheme}'"):
        open_backend(url)


def test_a_file_url_naming_another_host_is_refused():
    with pytest.raises(CheckpointError, match="names the host 'elsewhere'"):
        open_backend("file://elsewhere/ckpts")


def test_a_manager_opens_a_file_url_root(tmp_path):
    import torch

    import asyncckpt

    with asyncckpt.CheckpointManager(f"file://{tmp_path}/ckpts") as mgr:
        mgr.save(1, {"x": torch.ones(4)}).wait()
        assert mgr.root == tmp_path / "ckpts"
    assert asyncckpt.load(tmp_path / "ckpts")["x"].tolist() == [1.0] * 4


@pytest.mark.parametrize("root", ["", b"", "file://"])
def test_an_empty_root_is_refused_never_taken_for_the_working_directory(tmp_path, monkeypatch, root):
    """A root from an unset variable wrote checkpoints (and its lock) into the working directory."""
    import asyncckpt

    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="the checkpoint root is an empty path"):
        open_backend(root)
    with pytest.raises(CheckpointError, match="the checkpoint root is an empty path"):
        asyncckpt.CheckpointManager(root)
    assert list(tmp_path.iterdir()) == []


def test_a_closed_local_backend_refuses_writes_until_it_locks_again(tmp_path):
    """A thread still writing after close gave up on it must not touch the root; the same object
    handed to the next manager locks it again and writes."""
    import torch

    from asyncckpt import CheckpointManager

    backend = LocalBackend(tmp_path / "root", atomic_rename=False)
    with CheckpointManager(backend) as mgr:
        mgr.save(1, {"w": torch.zeros(4)}).wait()
    with pytest.raises(RootInUseError, match="was closed by this writer"):
        backend.check_lock()
    with CheckpointManager(backend) as mgr:
        mgr.save(2, {"w": torch.ones(4)}).wait()
        assert mgr.steps() == [1, 2]
