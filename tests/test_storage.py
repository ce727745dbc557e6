"""storage.py: the writer lock, sweeping, atomic commit and deletion."""

from __future__ import annotations

import os

import pytest

from asyncckpt import CheckpointError
from asyncckpt import storage as storage_mod
from asyncckpt.storage import CommittedCheckpoint, LocalStorage


@pytest.fixture
def root(tmp_path):
    return tmp_path / "ckpts"


@pytest.fixture
def store(root):
    storage = LocalStorage(root)
    yield storage
    storage.close()


def make_checkpoint(storage: LocalStorage, step: int, content: bytes = b"x"):
    temp = storage.new_temp_dir(step)
    (temp / "data-00000.bin").write_bytes(content)
    return storage.commit(temp, step)


def entries(path):
    return sorted(os.listdir(path))


def test_root_is_created_with_a_lock_file(root):
    storage = LocalStorage(root)
    try:
        assert root.is_dir()
        assert entries(root) == [".lock"]
        assert (root / ".lock").read_text() == str(os.getpid())
    finally:
        storage.close()


def test_second_writer_on_the_same_root_is_refused(store, root):
    with pytest.raises(CheckpointError, match=f"in use by another writer \\(pid {os.getpid()}\\)"):
        LocalStorage(root)
    # the first writer is unaffected
    assert make_checkpoint(store, 1).is_dir()
    assert [c.step for c in store.checkpoints()] == [1]


def test_second_writer_does_not_sweep_the_first_writers_temp_dir(store, root):
    temp = store.new_temp_dir(4)
    with pytest.raises(CheckpointError, match="in use"):
        LocalStorage(root)
    assert temp.is_dir()


def test_lock_is_released_on_close(root):
    first = LocalStorage(root)
    first.close()
    first.close()  # idempotent
    second = LocalStorage(root)
    try:
        with pytest.raises(CheckpointError, match="in use"):
            LocalStorage(root)
    finally:
        second.close()
    LocalStorage(root).close()


def test_sweep_removes_temp_dirs_and_keeps_checkpoints(root):
    first = LocalStorage(root)
    make_checkpoint(first, 3)
    leftover = first.new_temp_dir(5)
    (leftover / "data-00000.bin").write_bytes(b"partial")
    first.close()
    (root / ".tmp-delete-step-000000000001-0badf00d").mkdir()
    (root / ".tmp-delete-step-000000000001-0badf00d" / "manifest.json").write_bytes(b"{}")

    second = LocalStorage(root)  # opening sweeps
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
    parked = root / ".replaced-step-000000000005.abcd"
    parked.mkdir()
    (parked / "manifest.json").write_bytes(b"old")
    (root / ".tmp-step-000000000005-12345678").mkdir()  # the new save that never got renamed
    storage = LocalStorage(root)
    try:
        assert entries(root) == [".lock", "step-000000000005"]
        assert (root / "step-000000000005" / "manifest.json").read_bytes() == b"old"
        assert storage.checkpoints() == [CommittedCheckpoint(5, root / "step-000000000005")]
    finally:
        storage.close()


def test_sweep_drops_a_parked_checkpoint_once_its_replacement_committed(root):
    """Crash after both renames but before the parked copy was removed: the new one stays."""
    root.mkdir()
    (root / "step-000000000005").mkdir()
    (root / "step-000000000005" / "manifest.json").write_bytes(b"new")
    (root / ".replaced-step-000000000005.abcd").mkdir()
    (root / ".replaced-step-000000000005.abcd" / "manifest.json").write_bytes(b"old")
    storage = LocalStorage(root)
    try:
        assert entries(root) == [".lock", "step-000000000005"]
        assert (root / "step-000000000005" / "manifest.json").read_bytes() == b"new"
    finally:
        storage.close()


def test_root_that_is_a_regular_file_is_refused(tmp_path):
    path = tmp_path / "ckpts"
    path.write_bytes(b"not a directory")
    with pytest.raises(CheckpointError, match="exists and is not a directory"):
        LocalStorage(path)
    assert path.read_bytes() == b"not a directory"


def test_root_under_a_regular_file_is_refused(tmp_path):
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(CheckpointError, match="cannot create checkpoint root"):
        LocalStorage(tmp_path / "file" / "ckpts")


def test_new_temp_dirs_are_hidden_and_unique(store, root):
    a, b = store.new_temp_dir(7), store.new_temp_dir(7)
    assert a != b
    for temp in (a, b):
        assert temp.parent == root and temp.is_dir()
        assert temp.name.startswith(".tmp-step-000000000007-")
    assert store.checkpoints() == []


def test_commit_makes_the_step_visible_and_the_temp_dir_gone(store, root):
    temp = store.new_temp_dir(42)
    (temp / "data-00000.bin").write_bytes(b"payload")
    store.write_manifest(temp, b'{"m": 1}')
    final = store.commit(temp, 42)
    assert final == root / "step-000000000042"
    assert not temp.exists()
    assert entries(root) == [".lock", "step-000000000042"]
    assert (final / "data-00000.bin").read_bytes() == b"payload"
    assert (final / "manifest.json").read_bytes() == b'{"m": 1}'
    assert store.checkpoints() == [CommittedCheckpoint(42, final)]


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
    store.delete(CommittedCheckpoint(6, final))
    monkeypatch.undo()

    assert seen["steps"] == [9]  # already invisible when the removal started
    assert seen["path"].parent == root and seen["path"].name.startswith(".tmp-")
    assert not final.exists()
    # the husk is an ordinary temp dir: the next writer sweeps it
    store.close()
    LocalStorage(root).close()
    assert entries(root) == [".lock", "step-000000000009"]


def test_delete_removes_the_checkpoint(store, root):
    final = make_checkpoint(store, 6)
    store.delete(CommittedCheckpoint(6, final))
    assert entries(root) == [".lock"]
    assert store.checkpoints() == []


def test_discard_removes_a_temp_dir(store, root):
    temp = store.new_temp_dir(1)
    (temp / "data-00000.bin").write_bytes(b"x")
    store.discard(temp)
    assert entries(root) == [".lock"]


def test_data_file_writer_reports_offsets(tmp_path):
    writer = storage_mod.DataFileWriter(tmp_path / "data-00000.bin")
    assert writer.append(b"abc") == 0
    assert writer.append(memoryview(b"defgh")) == 3
    assert writer.append(b"") == 8
    writer.sync_and_close()
    writer.close()
    assert (tmp_path / "data-00000.bin").read_bytes() == b"abcdefgh"
    with pytest.raises(FileExistsError):
        storage_mod.DataFileWriter(tmp_path / "data-00000.bin")
