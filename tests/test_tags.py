"""Tags on a full disk (a real one: a small tmpfs). Written on the writer thread (given while a save
was in flight), they stay owed, count for retention, and reach the manifest once the disk has room
(after the next save, at close, or with the next tag change), so a tagged checkpoint keeps its
protection after a restart. Given to a committed checkpoint, the failure is the caller's, naming the
manifest, with nothing left behind."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

from _tmpfs import tmpfs
from _waiting import wait_until
from asyncckpt import CheckpointError, CheckpointManager, _phases
from asyncckpt.engine.reader import read_manifest

STATE = {"w": torch.ones(4)}


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs: filled, every write there fails with ENOSPC, as on a real full disk."""
    with tmpfs(tmp_path / "disk", "4m") as mnt:
        yield mnt


def _fill(disk: Path) -> Path:
    filler = disk / "filler"
    with open(filler, "wb") as f:
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        f.write(b"\xff" * free)
    with pytest.raises(OSError, match="No space left"), open(disk / "probe", "wb") as f:  # empty: no room
        f.write(b"x" * 4096)
        f.flush()
        os.fsync(f.fileno())
    return filler


def _tag_late_on_a_full_disk(mgr: CheckpointManager, disk: Path, mark: Path) -> tuple[Path, Path]:
    """Save step 1, tag it "best" between its manifest and its commit, and fill the disk then: the
    commit needs no room, the rewrite of its manifest with the tag does."""
    handle = mgr.save(1, STATE)
    wait_until(lambda: mark.exists() and "rename" in mark.read_text(), timeout=30, what="the rename phase")
    assert not handle.done()
    assert mgr.tag(1, "best") == ["best"]
    filler = _fill(disk)
    with pytest.warns(UserWarning, match=r"the tags \['best'\] of .* could not be written to its manifest yet"):
        path = Path(handle.wait())
    assert read_manifest(path).tags == []
    return path, filler


@pytest.fixture
def late_tags(tmp_path, monkeypatch, small_disk):
    mark = tmp_path / "phases"
    monkeypatch.setattr(_phases, "_MARK", str(mark))
    monkeypatch.setitem(_phases._DELAYS, "rename", 0.5)  # between the manifest and the commit
    return small_disk, mark


def test_late_tags_that_met_a_full_disk_are_written_after_the_next_save_and_survive_a_restart(late_tags):
    disk, mark = late_tags
    root = disk / "root"
    with CheckpointManager(root, keep_last=1) as mgr:
        path, filler = _tag_late_on_a_full_disk(mgr, disk, mark)
        filler.unlink()
        mgr.save(2, STATE).wait()
        assert read_manifest(path).tags == ["best"]
        assert mgr.steps() == [1, 2]
    with CheckpointManager(root, keep_last=1) as mgr:  # a new process reads the tags from the manifests
        mgr.save(3, STATE).wait()
        assert mgr.steps() == [1, 3]


def test_owed_tags_are_written_at_close(late_tags):
    disk, mark = late_tags
    mgr = CheckpointManager(disk / "root", keep_last=1)
    path, filler = _tag_late_on_a_full_disk(mgr, disk, mark)
    filler.unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is said lost
        mgr.close()
    assert read_manifest(path).tags == ["best"]


def test_a_tag_change_on_a_step_owed_tags_applies_to_them(late_tags):
    disk, mark = late_tags
    with CheckpointManager(disk / "root", keep_last=None) as mgr:
        path, filler = _tag_late_on_a_full_disk(mgr, disk, mark)
        filler.unlink()
        assert mgr.tag(1, "release") == ["best", "release"]
        assert read_manifest(path).tags == ["best", "release"]


def test_tags_still_owed_at_close_are_said_lost(late_tags):
    disk, mark = late_tags
    mgr = CheckpointManager(disk / "root", keep_last=None)
    path, _ = _tag_late_on_a_full_disk(mgr, disk, mark)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mgr.close()
    lost = [str(w.message) for w in caught if "tags lost" in str(w.message)]
    assert len(lost) == 1 and str(path) in lost[0] and "['best']" in lost[0] and "No space left" in lost[0], lost
    assert read_manifest(path).tags == []


def test_a_tag_on_a_full_disk_is_an_error_naming_the_manifest_and_leaves_nothing_behind(small_disk):
    root = small_disk / "root"
    with CheckpointManager(root) as mgr:
        path = Path(mgr.save(1, STATE).wait())
        filler = _fill(small_disk)
        with pytest.raises(CheckpointError, match=r"cannot replace .*step-000000000001/manifest.json: .*No space left"):
            mgr.tag(1, "best")
        assert sorted(p.name for p in path.iterdir()) == ["data-00000.bin", "manifest.json"]  # no temp manifest
        assert read_manifest(path).tags == []
        filler.unlink()
        assert mgr.tag(1, "best") == ["best"]
    assert read_manifest(path).tags == ["best"]
