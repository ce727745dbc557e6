"""storage/catalog.py: the one list of committed checkpoints, with metrics and tags."""

from __future__ import annotations

import pytest
import torch

import asyncckpt
from asyncckpt import CheckpointError
from asyncckpt.cli.tools import prune
from asyncckpt.retention import CheckpointInfo, RetentionPolicy
from asyncckpt.storage.catalog import Catalog
from asyncckpt.storage.commit import open_storage
from asyncckpt.storage.local import LocalBackend


def make_root(root, rename: bool = True, steps=(1, 2, 3)):
    with asyncckpt.CheckpointManager(LocalBackend(root, atomic_rename=rename), keep_last=None) as mgr:
        for step in steps:
            mgr.save(step, {"x": torch.full((8,), float(step))}, metrics={"loss": 10.0 - step}).wait()
        mgr.tag(1, "first")


@pytest.mark.parametrize("rename", [True, False], ids=["rename", "manifest-last"])
def test_a_writers_catalog_lists_through_its_protocol_with_metrics_and_tags(tmp_path, rename):
    make_root(tmp_path / "root", rename)
    storage = open_storage(LocalBackend(tmp_path / "root", atomic_rename=rename))
    try:
        catalog = Catalog.of_writer(storage)
        assert catalog.steps() == [1, 2, 3]
        assert catalog.infos() == [
            CheckpointInfo(1, {"loss": 9.0}, ("first",)),
            CheckpointInfo(2, {"loss": 8.0}, ()),
            CheckpointInfo(3, {"loss": 7.0}, ()),
        ]
        assert catalog.find(2).path == tmp_path / "root" / "step-000000000002"
        assert catalog.find(4) is None
        assert catalog.newest_known() == 3
        catalog.delete(catalog.find(2))
        assert catalog.steps() == [1, 3]
        assert Catalog.of_reader(tmp_path / "root").steps() == [1, 3]
    finally:
        storage.close()


def test_what_the_writer_records_is_what_the_catalog_knows(tmp_path):
    make_root(tmp_path / "root")
    storage = open_storage(tmp_path / "root")
    try:
        catalog = Catalog.of_writer(storage)
        catalog.record(CheckpointInfo(3, {"loss": 1.0}, ("best",)))
        assert catalog.infos()[-1] == CheckpointInfo(3, {"loss": 1.0}, ("best",))  # not read again
    finally:
        storage.close()


def test_an_unreadable_manifest_is_marked_with_the_reason(tmp_path):
    make_root(tmp_path / "root")
    (tmp_path / "root" / "step-000000000002" / "manifest.json").write_bytes(b"{}")
    (info,) = [i for i in Catalog.of_reader(tmp_path / "root").infos() if i.step == 2]
    assert info.unreadable and "manifest" in info.unreadable


def test_an_unreadable_checkpoint_is_read_again_and_a_readable_one_is_not(tmp_path):
    """A store failing for a moment must not keep a checkpoint from retention until a restart."""
    make_root(tmp_path / "root")
    catalog = Catalog.of_reader(tmp_path / "root")
    manifest = tmp_path / "root" / "step-000000000002" / "manifest.json"
    good = manifest.read_bytes()
    manifest.write_bytes(b"{}")
    assert [i.unreadable is None for i in catalog.infos()] == [True, False, True]
    manifest.write_bytes(good)
    assert [(i.step, i.metrics, i.unreadable) for i in catalog.infos()][1] == (2, {"loss": 8.0}, None)
    manifest.write_bytes(b"{}")  # read once and kept: what the catalog knows of it stands
    assert [i.unreadable is None for i in catalog.infos()] == [True, True, True]


def test_a_readers_catalog_cannot_delete(tmp_path):
    make_root(tmp_path / "root")
    catalog = Catalog.of_reader(tmp_path / "root")
    with pytest.raises(CheckpointError, match="read-only"):
        catalog.delete(catalog.find(1))
    assert catalog.steps() == [1, 2, 3]


def test_prune_and_the_manager_keep_the_same_checkpoints(tmp_path):
    """One catalog, one rule: a tagged checkpoint survives keep_last in both."""
    make_root(tmp_path / "a")
    make_root(tmp_path / "b")
    assert prune(tmp_path / "a", RetentionPolicy(keep_last=1)).kept == [1, 3]
    with asyncckpt.CheckpointManager(tmp_path / "b", keep_last=1) as mgr:
        mgr.save(4, {"x": torch.zeros(8)}).wait()
        assert mgr.steps() == [1, 4]


@pytest.mark.parametrize("rename", [True, False], ids=["rename", "manifest-last"])
def test_delete_above_goes_newest_first_and_a_failure_names_what_was_deleted(tmp_path, rename):
    make_root(tmp_path / "root", rename, steps=(1, 2, 3, 4))
    storage = open_storage(LocalBackend(tmp_path / "root", atomic_rename=rename))
    try:
        order = []

        def deleting(checkpoint):
            if checkpoint.step == 2:
                raise PermissionError(13, "Permission denied")
            order.append(checkpoint.step)
            storage.delete(checkpoint)

        catalog = Catalog(storage.checkpoints, deleting)
        with pytest.raises(CheckpointError, match=r"^deleted steps \[3, 4\], then failed deleting step 2 \("):
            catalog.delete_above(1)
        assert order == [4, 3]  # the newest first; the failed one and those below it stay
        assert catalog.steps() == [1, 2]
        assert Catalog(storage.checkpoints, storage.delete).delete_above(1) == [2]
        assert Catalog(storage.checkpoints, storage.delete).delete_above(1) == []
    finally:
        storage.close()
