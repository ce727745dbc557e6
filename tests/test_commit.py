"""storage/commit.py: the rename and manifest-written-last commit protocols on a real local root.

The manifest-last protocol runs on a LocalBackend that declares ``atomic_rename=False`` (what a
FUSE mount of an object store is): data goes straight into ``step-N/`` under per-attempt names and
the sealed manifest, written last, is the commit record.
"""

from __future__ import annotations

import os
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import asyncckpt
from _kill import kill_when
from asyncckpt.engine.reader import read_manifest
from asyncckpt.errors import CheckpointError
from asyncckpt.format import ChunkEntry, Manifest, TensorEntry, parse_manifest
from asyncckpt.storage.backend import CheckpointRef, Entry, open_backend
from asyncckpt.storage.commit import (
    CommitProtocol,
    ManifestLastCommit,
    RenameCommit,
    choose_protocol,
    open_storage,
    published_checkpoints,
)
from asyncckpt.storage.local import LocalBackend, list_checkpoints

PROTOCOLS = {"rename": True, "manifest-last": False}


def sealed(step: int, file: str, size: int, tags: list[str] | None = None) -> bytes:
    """A valid manifest of one raw data file holding one uint8 tensor of ``size`` bytes."""
    tensors = [TensorEntry("uint8", (size,), 0, size)]
    chunks = [ChunkEntry(file, 0, size, 0, size, [], 0)]
    return Manifest(step, 0.0, {"d": []}, tensors, chunks, size, size, tags=list(tags or [])).to_json()


@pytest.fixture(params=sorted(PROTOCOLS))
def protocol(request, tmp_path):
    store = open_storage(LocalBackend(tmp_path / "root", atomic_rename=PROTOCOLS[request.param]))
    yield store
    store.close()


def write_step(store: CommitProtocol, step: int, payload: bytes = b"x" * 10, tags=None):
    staging = store.begin(step)
    file = staging.data_name(0)
    stream = store.backend.open_write(staging.object_name(file))
    stream.append(payload)
    stream.finish()
    manifest = sealed(step, file, len(payload), tags)
    store.stage_manifest(staging, manifest)
    return store.publish(staging, manifest)


def names(path: Path) -> list[str]:
    return sorted(os.listdir(path))


def test_the_protocol_follows_the_backends_capabilities(tmp_path):
    assert isinstance(choose_protocol(LocalBackend(tmp_path)), RenameCommit)
    assert isinstance(choose_protocol(LocalBackend(tmp_path, atomic_rename=False)), ManifestLastCommit)


def test_publish_makes_exactly_the_step_visible(protocol):
    checkpoint = write_step(protocol, 5)
    assert checkpoint.path == Path(protocol.location) / "step-000000000005"
    assert [c.step for c in protocol.checkpoints()] == [5]
    assert [c.step for c in list_checkpoints(Path(protocol.location))] == [5]
    assert names(Path(protocol.location)) == [".lock", "step-000000000005"]
    assert read_manifest(checkpoint.path).step == 5


def test_abort_leaves_nothing(protocol):
    staging = protocol.begin(3)
    stream = protocol.backend.open_write(staging.object_name(staging.data_name(0)))
    stream.append(b"partial")
    stream.abort()
    protocol.abort(staging)
    assert names(Path(protocol.location)) == [".lock"]
    assert protocol.checkpoints() == []


def test_an_abort_of_a_resave_keeps_the_committed_version(protocol):
    checkpoint = write_step(protocol, 3, b"old")
    staging = protocol.begin(3)
    stream = protocol.backend.open_write(staging.object_name(staging.data_name(0)))
    stream.append(b"new")
    stream.abort()
    protocol.abort(staging)
    assert [c.step for c in protocol.checkpoints()] == [3]
    assert read_manifest(checkpoint.path).chunks[0].length == 3
    assert protocol.recover() == []


def test_a_resave_replaces_the_step_and_leaves_one_version(protocol):
    write_step(protocol, 8, b"old-data")
    checkpoint = write_step(protocol, 8, b"new")
    manifest = read_manifest(checkpoint.path)
    assert manifest.chunks[0].length == 3
    files = names(checkpoint.path)
    assert len(files) == 2, files  # one manifest, one data file
    assert manifest.chunks[0].file in files
    assert names(Path(protocol.location)) == [".lock", "step-000000000008"]


def test_replace_manifest_changes_tags_and_keeps_the_data(protocol):
    checkpoint = write_step(protocol, 2)
    before = read_manifest(checkpoint.path)
    chunk = before.chunks[0]
    protocol.replace_manifest(checkpoint.path, sealed(2, chunk.file, chunk.length, ["best"]))
    after = read_manifest(checkpoint.path)
    assert after.tags == ["best"] and after.chunks == before.chunks
    assert len(names(checkpoint.path)) == 2
    assert protocol.recover() == []


def test_delete_removes_the_step(protocol):
    write_step(protocol, 1)
    checkpoint = write_step(protocol, 2)
    protocol.delete(checkpoint)
    assert [c.step for c in protocol.checkpoints()] == [1]
    assert names(Path(protocol.location)) == [".lock", "step-000000000001"]


# ---- manifest written last ---------------------------------------------------------------------


@pytest.fixture
def last(tmp_path):
    store = open_storage(LocalBackend(tmp_path / "root", atomic_rename=False))
    yield store
    store.close()


def test_data_names_are_unique_per_attempt_and_the_manifest_is_generational(last):
    first = write_step(last, 4)
    (old_data,) = [n for n in names(first.path) if n.startswith("data-")]
    assert old_data.startswith("data-00000-") and len(old_data) == len("data-00000-") + 16 + len(".bin")
    assert "manifest-000000000001.json" in names(first.path)
    write_step(last, 4)
    now = names(first.path)
    assert "manifest-000000000002.json" in now and "manifest-000000000001.json" not in now
    assert old_data not in now


def test_a_manifest_that_does_not_verify_is_not_a_version(last):
    checkpoint = write_step(last, 6, b"old")
    good = read_manifest(checkpoint.path)
    newer = sealed(6, "data-00000-00000000000000ff.bin", 3)
    (checkpoint.path / "data-00000-00000000000000ff.bin").write_bytes(b"new")
    (checkpoint.path / "manifest-000000000002.json").write_bytes(newer[: len(newer) // 2])  # torn
    assert read_manifest(checkpoint.path) == good  # the older version is the step
    assert [c.step for c in last.checkpoints()] == [6]
    removed = last.recover()
    assert sorted(removed) == [
        "step-000000000006/data-00000-00000000000000ff.bin",
        "step-000000000006/manifest-000000000002.json",
    ]
    assert read_manifest(checkpoint.path) == good


def test_a_step_whose_only_manifest_is_torn_does_not_exist_and_is_swept(last):
    checkpoint = write_step(last, 7)
    (manifest,) = [n for n in names(checkpoint.path) if n.startswith("manifest")]
    raw = (checkpoint.path / manifest).read_bytes()
    (checkpoint.path / manifest).write_bytes(raw[:-5])
    assert last.checkpoints() == []
    assert list_checkpoints(Path(last.location)) == []  # readers do not see it either
    last.recover()
    assert names(Path(last.location)) == [".lock"]


def test_a_step_still_being_written_is_invisible_to_readers(last):
    write_step(last, 1)
    staging = last.begin(2)
    stream = last.backend.open_write(staging.object_name(staging.data_name(0)))
    stream.append(b"half")
    assert [c.step for c in list_checkpoints(Path(last.location))] == [1]
    assert [c.step for c in last.checkpoints()] == [1]
    stream.abort()
    last.abort(staging)


def test_the_sweep_touches_only_the_names_it_makes(last):
    checkpoint = write_step(last, 3)
    (checkpoint.path / "notes.txt").write_bytes(b"mine")
    (checkpoint.path / "data-00000.bin.bak").write_bytes(b"mine")
    (Path(last.location) / "step-000000000009").mkdir()
    (Path(last.location) / "step-000000000009" / "readme").write_bytes(b"mine")
    assert last.recover() == []
    assert (checkpoint.path / "notes.txt").read_bytes() == b"mine"
    assert (Path(last.location) / "step-000000000009" / "readme").read_bytes() == b"mine"


def test_delete_removes_every_manifest_before_any_data(last, monkeypatch):
    checkpoint = write_step(last, 5)
    seen = {}
    real = last.backend.delete_tree

    def delete_tree(prefix):
        seen["left"] = names(Path(last.location) / prefix)
        real(prefix)

    monkeypatch.setattr(last.backend, "delete_tree", delete_tree)
    last.delete(checkpoint)
    assert seen["left"] and not [n for n in seen["left"] if n.startswith("manifest")]
    assert names(Path(last.location)) == [".lock"]


def test_a_renamed_checkpoint_is_taken_over_by_the_manifest_last_protocol(tmp_path):
    root = tmp_path / "root"
    with asyncckpt.CheckpointManager(root) as mgr:
        mgr.save(1, {"x": torch.ones(3)}).wait()
    assert names(root / "step-000000000001") == ["data-00000.bin", "manifest.json"]
    with asyncckpt.CheckpointManager(LocalBackend(root, atomic_rename=False)) as mgr:
        assert mgr.steps() == [1]
        mgr.tag(1, "old")
        assert read_manifest(root / "step-000000000001").tags == ["old"]
        assert names(root / "step-000000000001") == ["data-00000.bin", "manifest-000000000001.json"]
        mgr.save(1, {"x": torch.zeros(3)}).wait()
    assert [n for n in names(root / "step-000000000001") if n.startswith("data-")] != ["data-00000.bin"]
    assert asyncckpt.load(root)["x"].tolist() == [0.0] * 3


def test_a_manager_on_a_manifest_last_root_saves_restores_tags_and_keeps(tmp_path):
    root = tmp_path / "root"
    state = {"w": torch.arange(1000, dtype=torch.float32), "step": 0}
    with asyncckpt.CheckpointManager(LocalBackend(root, atomic_rename=False), keep_last=2) as mgr:
        for step in (1, 2, 3, 3, 4):
            state["w"] += 1
            state["step"] = step
            mgr.save(step, state, metrics={"loss": float(step)}).wait()
        mgr.tag(3, "keep")
        mgr.save(5, state).wait()
        assert mgr.steps() == [3, 4, 5]
        live = {"w": torch.zeros(1000), "step": -1}
        assert mgr.restore(live, step=3) == 3
        assert live["step"] == 3
    assert asyncckpt.load(root)["w"].equal(state["w"])
    for step in (3, 4, 5):
        files = names(root / f"step-{step:012d}")
        assert len(files) == 2, files


# ---- crashes: SIGKILL inside each phase of a save --------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import importlib, os, sys
    import torch
    import asyncckpt
    from asyncckpt import _phases
    from asyncckpt.storage.local import LocalBackend

    root, rename, phase, mark = sys.argv[1], sys.argv[2] == "1", sys.argv[3], sys.argv[4]

    def content(step, version=0):
        gen = torch.Generator().manual_seed(step * 10 + version)
        return {"x": torch.randn(200_000, generator=gen), "step": step, "version": version}

    mgr = asyncckpt.CheckpointManager(
        LocalBackend(root, atomic_rename=rename), keep_last=2, chunk_size=1 << 18, compression=None
    )
    for step in (1, 2, 3):
        mgr.save(step, content(step)).wait()
    os.environ["ASYNCCKPT_PHASE_DELAY"] = f"{phase}=60"
    os.environ["ASYNCCKPT_PHASE_MARK"] = mark
    importlib.reload(_phases)
    if phase == "replace":
        mgr.save(3, content(3, 1)).wait()  # a re-save of a committed step
    else:
        mgr.save(4, content(4)).wait()
    mgr.close()
    """
)


def _content(step: int, version: int = 0) -> dict:
    gen = torch.Generator().manual_seed(step * 10 + version)
    return {"x": torch.randn(200_000, generator=gen), "step": step, "version": version}


def _kill_in(tmp_path: Path, rename: bool, phase: str) -> Path:
    root, mark = tmp_path / "root", tmp_path / "mark"
    kill_when(
        [_CHILD, str(root), "1" if rename else "0", phase, str(mark)],
        lambda: mark.exists() and phase in mark.read_text().split(),
        phase,
    )
    return root


ML_PHASES = ["compress", "write", "fsync", "manifest", "replace", "retention"]


@pytest.mark.parametrize(
    ("rename", "phase"),
    [(False, p) for p in ML_PHASES] + [(True, "manifest"), (True, "replace")],
    ids=[f"manifest-last-{p}" for p in ML_PHASES] + ["rename-manifest", "rename-replace"],
)
def test_a_kill_in_any_phase_shows_no_partial_step_and_keeps_older_ones(tmp_path, rename, phase):
    root = _kill_in(tmp_path, rename, phase)
    # before any writer sweeps: readers see only whole steps, and nothing is reported damaged
    seen = [c.step for c in list_checkpoints(root)]
    committed_new = phase in ("replace", "retention") and not rename
    expected = {
        "retention": [2, 3, 4],
        "replace": [2, 3],
    }.get(phase, [2, 3])
    # a rename replace cut between its two renames hides the old step until the sweep puts it back
    assert seen == ([2] if rename and phase == "replace" else expected), seen

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in seen:
            loaded = asyncckpt.load(root, step=step)
            version = loaded["version"]
            assert loaded["x"].equal(_content(step, version)["x"])
            if step == 3 and phase == "replace":
                assert version == (1 if committed_new else 0)
    with asyncckpt.CheckpointManager(LocalBackend(root, atomic_rename=rename), keep_last=2) as mgr:
        assert mgr.steps() == expected
        for step in expected:
            files = names(root / f"step-{step:012d}")
            manifest = read_manifest(root / f"step-{step:012d}")
            data = sorted({c.file for c in manifest.chunks})
            assert sorted(f for f in files if f.startswith("data-")) == data, files  # no stray data
            assert len([f for f in files if f.startswith("manifest")]) == 1, files
        assert not [n for n in os.listdir(root) if n.startswith((".tmp-", ".replaced-"))]
        mgr.save(9, _content(9)).wait()  # the root is usable
    assert parse_manifest((root / "step-000000000009" / names(root / "step-000000000009")[-1]).read_bytes()).step == 9


def test_a_listing_that_saw_a_step_vanish_lists_again_and_finds_its_successor(tmp_path):
    """A live writer commits step N+1, then deletes step N. A reader whose snapshot of the root
    named only N, which was gone by the time it was checked, must not report an empty root: it
    lists again and finds N+1 (a verify on a live root said "no checkpoints")."""
    with asyncckpt.CheckpointManager(tmp_path / "root", keep_last=1) as mgr:
        mgr.save(6, {"x": torch.ones(2)}).wait()

    class StaleFirstListing(LocalBackend):
        calls = 0

        def list(self, prefix: str = ""):
            if prefix == "":
                self.calls += 1
                if self.calls == 1:  # the snapshot taken before 6 was committed and 5 deleted
                    return [Entry("step-000000000005", True)]
            return super().list(prefix)

    backend = StaleFirstListing(tmp_path / "root")
    assert [c.step for c in published_checkpoints(backend)] == [6]
    assert backend.calls == 2


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_checkpoint_directory_is_refused_as_a_root_and_left_untouched(tmp_path, request, where):
    """Passed to resume from it, one checkpoint's directory became a root: its restore found no step
    (training started afresh), new steps went inside the checkpoint, and the real root's retention
    deleted them with it."""
    if where == "s3":
        root = request.getfixturevalue("s3_url")
        options = request.getfixturevalue("s3_server").storage_options
    else:
        root, options = str(tmp_path / "root"), None
    with asyncckpt.CheckpointManager(root, keep_last=1, storage_options=options) as mgr:
        mgr.save(1000, {"w": torch.ones(3)}).wait()
    step = f"{root}/step-000000001000"
    before = read_manifest(CheckpointRef(open_backend(root, storage_options=options), "step-000000001000"))
    with pytest.raises(CheckpointError, match="step-000000001000 is one checkpoint, not a checkpoint root"):
        asyncckpt.CheckpointManager(step, storage_options=options)
    after = read_manifest(CheckpointRef(open_backend(root, storage_options=options), "step-000000001000"))
    assert after == before
    if where == "local":
        assert sorted(os.listdir(step)) == ["data-00000.bin", "manifest.json"]  # no lock, log or step


def test_a_regular_file_where_a_step_goes_is_named_as_one(tmp_path):
    root = tmp_path / "root"
    with asyncckpt.CheckpointManager(root, keep_last=None) as mgr:
        mgr.save(1, {"w": torch.ones(2)}).wait()
        (root / "step-000000000002").write_bytes(b"notes")
        with pytest.raises(asyncckpt.SaveFailedError, match="exists and is a regular file, not a checkpoint"):
            mgr.save(2, {"w": torch.ones(2)}).wait()
    assert (root / "step-000000000002").read_bytes() == b"notes"
