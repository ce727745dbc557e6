"""Failure and hostile-name cases of the commit protocols, through real saves on a local root."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest
import torch

import asyncckpt
from asyncckpt.engine.reader import read_checkpoint, read_manifest
from asyncckpt.errors import StorageError
from asyncckpt.format import parse_manifest
from asyncckpt.storage.backend import CheckpointRef
from asyncckpt.storage.commit import ManifestLastCommit
from asyncckpt.storage.local import LocalBackend


def names(path: Path) -> list[str]:
    return sorted(os.listdir(path))


def test_a_failed_cleanup_after_a_manifest_last_commit_keeps_the_new_version(tmp_path):
    """The new manifest is durable before the superseded version is removed: a failure removing it
    must neither report the save failed nor remove the data the new manifest references."""
    root = tmp_path / "root"
    backend = LocalBackend(root, atomic_rename=False)
    with asyncckpt.CheckpointManager(backend) as mgr:
        mgr.save(1, {"x": torch.ones(4)}).wait()
        real = backend.delete

        def delete(name: str) -> None:
            if "/data-" in name:
                raise OSError(errno.EIO, "injected")
            real(name)

        backend.delete = delete  # type: ignore[method-assign]
        mgr.save(1, {"x": torch.zeros(4)}).wait()
        backend.delete = real  # type: ignore[method-assign]
    assert asyncckpt.load(root)["x"].tolist() == [0.0] * 4
    with asyncckpt.CheckpointManager(LocalBackend(root, atomic_rename=False)) as mgr:
        assert mgr.steps() == [1]  # the sweep removed the superseded data
    assert len([n for n in names(root / "step-000000000001") if n.startswith("data-")]) == 1
    assert asyncckpt.load(root)["x"].tolist() == [0.0] * 4


def test_a_manifest_last_publish_that_fails_making_its_manifest_durable_keeps_the_old_version(tmp_path):
    """A publish that raises is not a commit: the old version must stay the step, and no manifest
    may be left referencing the data ``abort`` removes."""
    root = tmp_path / "root"
    backend = LocalBackend(root, atomic_rename=False)
    with asyncckpt.CheckpointManager(backend) as mgr:
        mgr.save(1, {"x": torch.ones(4)}).wait()
        real = backend.sync
        calls = []

        def sync(prefix: str) -> None:
            calls.append(prefix)
            if len(calls) == 3:  # data names, root, then the new manifest's name
                raise OSError(errno.EIO, "injected")
            real(prefix)

        backend.sync = sync  # type: ignore[method-assign]
        handle = mgr.save(1, {"x": torch.zeros(4)})
        try:
            handle.wait()
        except asyncckpt.SaveFailedError:
            pass
        backend.sync = real  # type: ignore[method-assign]
        assert asyncckpt.load(root)["x"].tolist() == [1.0] * 4
    with asyncckpt.CheckpointManager(LocalBackend(root, atomic_rename=False)) as mgr:
        assert mgr.steps() == [1]
    assert asyncckpt.load(root)["x"].tolist() == [1.0] * 4
    assert read_manifest(root / "step-000000000001").step == 1


def test_a_planted_top_generation_never_makes_a_manifest_last_step_vanish(tmp_path):
    """``manifest-999999999999.json`` (any bytes) must not push the next generation past the
    12-digit names readers parse: the step would lose every version it had."""
    root = tmp_path / "root"
    with asyncckpt.CheckpointManager(LocalBackend(root, atomic_rename=False)) as mgr:
        mgr.save(1, {"x": torch.ones(4)}).wait()
        (root / "step-000000000001" / "manifest-999999999999.json").write_bytes(b"not mine")
        for action in (lambda: mgr.tag(1, "best"), lambda: mgr.save(1, {"x": torch.zeros(4)}).wait()):
            try:
                action()
            except (asyncckpt.CheckpointError, asyncckpt.SaveFailedError):
                pass
            assert mgr.steps() == [1]
            assert asyncckpt.load(root)["x"].tolist() == [1.0] * 4


def _flip_inside(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # the seal at the end stays: the file was written to its end
    path.write_bytes(bytes(raw))


def test_the_sweep_keeps_a_manifest_last_step_whose_only_manifest_rotted(tmp_path):
    """A manifest written to its end (its seal is there) that no longer verifies was committed and
    then damaged: the writer's sweep must not delete the step with it."""
    root = tmp_path / "root"
    with asyncckpt.CheckpointManager(LocalBackend(root, atomic_rename=False)) as mgr:
        mgr.save(7, {"x": torch.ones(4)}).wait()
        mgr.save(8, {"x": torch.zeros(4)}).wait()
    step = root / "step-000000000007"
    before = names(step)
    (manifest,) = [n for n in before if n.startswith("manifest")]
    _flip_inside(step / manifest)
    with asyncckpt.CheckpointManager(LocalBackend(root, atomic_rename=False)) as mgr:
        assert mgr.steps() == [8]
    assert names(step) == before


def test_the_manifest_last_sweep_keeps_a_renamed_checkpoint_whose_manifest_rotted(tmp_path):
    """``manifest.json`` is never a manifest-last commit cut short: a damaged one stays."""
    root = tmp_path / "root"
    with asyncckpt.CheckpointManager(root) as mgr:
        mgr.save(1, {"x": torch.ones(4)}).wait()
    step = root / "step-000000000001"
    raw = (step / "manifest.json").read_bytes()
    (step / "manifest.json").write_bytes(raw[:-3])  # even without its seal
    with asyncckpt.CheckpointManager(LocalBackend(root, atomic_rename=False)):
        pass
    assert names(step) == ["data-00000.bin", "manifest.json"]


def test_a_tag_written_while_a_manifest_last_resave_publishes_never_loses_the_step(tmp_path, monkeypatch):
    """The tag takes the generation the re-save chose: the re-save's manifest write then fails on
    the existing name, and must not remove the manifest it did not write."""
    from asyncckpt import _phases

    root = tmp_path / "root"
    with asyncckpt.CheckpointManager(LocalBackend(root, atomic_rename=False)) as mgr:
        mgr.save(1, {"x": torch.ones(4)}).wait()
        real = _phases.pause

        tagger = threading.Thread(target=mgr.tag, args=(1, "best"))

        def pause(phase: str) -> None:
            if phase == "manifest":  # the tag may land here, or wait for the publish: either way
                monkeypatch.setattr(_phases, "pause", real)
                tagger.start()
                tagger.join(1.0)
            real(phase)

        monkeypatch.setattr(_phases, "pause", pause)
        try:
            mgr.save(1, {"x": torch.zeros(4)}).wait()
        except asyncckpt.SaveFailedError:
            pass
        tagger.join()
        assert mgr.steps() == [1]
        assert asyncckpt.load(root)["x"].tolist() in ([1.0] * 4, [0.0] * 4)
    with asyncckpt.CheckpointManager(LocalBackend(root, atomic_rename=False)) as mgr:
        assert mgr.steps() == [1]


@pytest.mark.parametrize("same_tensors", [False, True], ids=["new-tensors", "same-tensors"])
@pytest.mark.parametrize("rename", [True, False], ids=["rename", "manifest-last"])
def test_a_tag_racing_a_resave_never_writes_the_old_manifest_over_the_new_version(
    tmp_path, monkeypatch, rename, same_tensors
):
    """The tag reads the committed manifest, the re-save publishes, then the tag writes: it must not
    swap the old manifest in over the new version: not its chunk table (whose data the re-save
    removed), nor, when the re-save wrote the same tensors (so the same chunk table), its old
    values and metrics."""
    from asyncckpt.engine import tags as tags_module

    root = tmp_path / "root"
    with asyncckpt.CheckpointManager(LocalBackend(root, atomic_rename=rename)) as mgr:
        mgr.save(1, {"x": torch.ones(4), "epoch": 1}, metrics={"loss": 9.0}).wait()
        storage = mgr._storage
        published = threading.Event()
        real_publish, real_read = storage.publish, tags_module.read_manifest

        def publish(staging, manifest):
            try:
                return real_publish(staging, manifest)
            finally:
                published.set()

        def read_manifest(path, **kwargs):
            manifest = real_read(path, **kwargs)
            assert published.wait(30)
            return manifest

        monkeypatch.setattr(storage, "publish", publish)
        monkeypatch.setattr(tags_module, "read_manifest", read_manifest)
        x = torch.ones(4) if same_tensors else torch.zeros(4)
        handle = mgr.save(1, {"x": x, "epoch": 2}, metrics={"loss": 1.0})
        mgr.tag(1, "best")
        handle.wait()
        monkeypatch.setattr(tags_module, "read_manifest", real_read)
        loaded = asyncckpt.load(root)
        assert loaded["x"].tolist() == x.tolist() and loaded["epoch"] == 2
        manifest = read_manifest(root / "step-000000000001")
        assert manifest.tags == ["best"] and manifest.metrics == {"loss": 1.0}


def test_a_manifest_put_that_landed_though_its_request_failed_is_a_commit(tmp_path):
    """An object store can store a PUT and still fail the request (a timeout on the answer). The
    manifest is then there and verifies: the step is committed, so the save must say so (and the
    writer's catalog know it), not report a failure for a step readers already see."""
    root = tmp_path / "root"
    backend = LocalBackend(root, atomic_rename=False)
    with asyncckpt.CheckpointManager(backend, keep_last=1) as mgr:
        mgr.save(1, {"x": torch.ones(4)}).wait()
        real = backend.write_small

        def write_small(name: str, data: bytes) -> None:
            real(name, data)
            if "manifest-" in name:
                raise asyncckpt.CheckpointError(f"{backend.describe(name)}: cannot write: timed out")

        backend.write_small = write_small  # type: ignore[method-assign]
        mgr.save(2, {"x": torch.zeros(4)}).wait()  # committed: no SaveFailedError
        backend.write_small = real  # type: ignore[method-assign]
        assert mgr.steps() == [2]  # and retention ran on it
    assert asyncckpt.load(root)["x"].tolist() == [0.0] * 4


def test_a_manifest_put_that_failed_and_did_not_land_keeps_the_old_version(tmp_path):
    root = tmp_path / "root"
    backend = LocalBackend(root, atomic_rename=False)
    with asyncckpt.CheckpointManager(backend) as mgr:
        mgr.save(1, {"x": torch.ones(4)}).wait()
        real = backend.write_small

        def write_small(name: str, data: bytes) -> None:
            if "manifest-" in name:
                raise asyncckpt.CheckpointError(f"{backend.describe(name)}: cannot write: connection refused")
            real(name, data)

        backend.write_small = write_small  # type: ignore[method-assign]
        with pytest.raises(asyncckpt.SaveFailedError, match="connection refused"):
            mgr.save(1, {"x": torch.zeros(4)}).wait()
        backend.write_small = real  # type: ignore[method-assign]
    assert asyncckpt.load(root)["x"].tolist() == [1.0] * 4
    assert [n for n in names(root / "step-000000000001") if n.startswith("data-")].__len__() == 1


def _two_generations(root: Path) -> LocalBackend:
    """Step 2 committed twice on a manifest-last root, the first version's removal failed: both
    generations and both data files are there, the newer one (x = 42) committed."""
    backend = LocalBackend(root, atomic_rename=False)
    with asyncckpt.CheckpointManager(backend) as mgr:
        mgr.save(2, {"x": torch.zeros(4)}).wait()
        real = backend.delete
        backend.delete = lambda name: (_ for _ in ()).throw(StorageError(f"{name}: 503 Slow Down"))  # type: ignore[method-assign]
        mgr.save(2, {"x": torch.full((4,), 42.0)}).wait()
        backend.delete = real  # type: ignore[method-assign]
    return backend


def _failing_reads(backend: LocalBackend, suffix: str, times: int) -> None:
    """The next ``times`` reads of a name ending with ``suffix`` fail, as a throttled store's GET."""
    real, left = backend.read_small, [times]

    def read_small(name: str, limit: int) -> bytes:
        if left[0] and name.endswith(suffix):
            left[0] -= 1
            raise StorageError(f"{name}: 503 Slow Down")
        return real(name, limit)

    backend.read_small = read_small  # type: ignore[method-assign]


def test_the_opening_sweep_deletes_nothing_of_a_step_whose_newest_manifest_it_could_not_read(tmp_path):
    root = tmp_path / "root"
    _two_generations(root)
    step = root / "step-000000000002"
    before = names(step)
    assert [n for n in before if n.startswith("manifest")] == [
        "manifest-000000000001.json",
        "manifest-000000000002.json",
    ]
    backend = LocalBackend(root, atomic_rename=False)
    _failing_reads(backend, "manifest-000000000002.json", 1)  # fails during the sweep only
    with pytest.warns(UserWarning, match="manifest-000000000002.json could not be read, so nothing of"):
        mgr = asyncckpt.CheckpointManager(backend)
    with mgr:
        assert names(step) == before  # not "manifest 1 is the newest that verifies, 2 was cut short"
        live = {"x": torch.zeros(4)}
        assert mgr.restore(live) == 2 and live["x"].tolist() == [42.0] * 4
    with asyncckpt.CheckpointManager(LocalBackend(root, atomic_rename=False)):
        pass  # a sweep that reads every manifest removes the superseded version
    assert [n for n in names(step) if n.startswith("manifest")] == ["manifest-000000000002.json"]
    assert len([n for n in names(step) if n.startswith("data-")]) == 1
    assert asyncckpt.load(root)["x"].tolist() == [42.0] * 4


def test_a_publish_whose_outcome_is_unknown_keeps_the_data_its_manifest_may_name(tmp_path):
    """The manifest's put failed though the store kept it, and reading it back failed too: the save
    is reported failed, but its data stays, since its manifest may be (and here is) the step's
    committed version; and the next sweep then keeps that version, not the superseded one."""
    root = tmp_path / "root"
    backend = LocalBackend(root, atomic_rename=False)
    step = root / "step-000000000002"
    with asyncckpt.CheckpointManager(backend) as mgr:
        mgr.save(2, {"x": torch.zeros(4)}).wait()
        real_write = backend.write_small

        def write_small(name: str, data: bytes) -> None:
            real_write(name, data)
            if name.endswith("manifest-000000000002.json"):
                _failing_reads(backend, "manifest-000000000002.json", 2)  # the read-back, then abort's
                raise StorageError(f"{name}: the request timed out")

        backend.write_small = write_small  # type: ignore[method-assign]
        with pytest.raises(asyncckpt.CheckpointError, match="timed out"):
            mgr.save(2, {"x": torch.full((4,), 42.0)}).wait()
    assert len([n for n in names(step) if n.startswith("data-")]) == 2  # abort removed nothing
    assert asyncckpt.load(root)["x"].tolist() == [42.0] * 4  # the manifest that landed reads whole
    with asyncckpt.CheckpointManager(LocalBackend(root, atomic_rename=False)) as mgr:
        live = {"x": torch.zeros(4)}
        assert mgr.restore(live, step=2) == 2 and live["x"].tolist() == [42.0] * 4
    assert [n for n in names(step) if n.startswith("manifest")] == ["manifest-000000000002.json"]


@pytest.mark.parametrize("failures", [1, 100])
def test_a_reader_never_takes_an_older_version_for_a_newer_one_it_could_not_read(tmp_path, failures):
    """Both generations of step 2 are there and the newer one's GET fails: read again, it loads
    (one failure); still failing, the step is unreadable, never its superseded version (zeros)."""
    root = tmp_path / "root"
    _two_generations(root)
    backend = LocalBackend(root, atomic_rename=False)
    _failing_reads(backend, "manifest-000000000002.json", failures)
    ref = CheckpointRef(backend, "step-000000000002")
    if failures == 1:
        assert read_checkpoint(ref, workers=1).tensors[0].tolist() == [42.0] * 4
    else:
        with pytest.raises(asyncckpt.CheckpointError, match="manifest-000000000002.json"):
            read_checkpoint(ref, workers=1)
    assert asyncckpt.load(root)["x"].tolist() == [42.0] * 4


def test_a_tag_rewrite_never_replaces_a_version_it_could_not_read(tmp_path):
    """The tagger read version 1; a re-save then committed version 2 (version 1's removal failed);
    reading version 2 fails when the tag is written: the rewrite is refused, never version 1 with
    the new tags over version 2 (whose data the next sweep would then delete)."""
    root = tmp_path / "root"
    _two_generations(root)
    backend = LocalBackend(root, atomic_rename=False)
    protocol = ManifestLastCommit(backend)
    ref = CheckpointRef(backend, "step-000000000002")
    first = parse_manifest((root / "step-000000000002" / "manifest-000000000001.json").read_bytes(), "v1")
    first.tags = ["best"]
    _failing_reads(backend, "manifest-000000000002.json", 1)
    with pytest.raises(asyncckpt.CheckpointError, match="could not be read"):
        protocol.replace_manifest(ref, first.to_json())
    assert asyncckpt.load(root)["x"].tolist() == [42.0] * 4
    assert read_manifest(root / "step-000000000002").tags == []
    assert "manifest-000000000002.json" in names(root / "step-000000000002")
