"""The manifest limits a reader enforces are enforced when saving too: nothing commits that a
reader would refuse, so ``load(root)`` never falls back from a healthy checkpoint to an older one."""

from __future__ import annotations

import warnings

import pytest
import torch

import asyncckpt
from asyncckpt import CheckpointDamagedError, CheckpointManager, SaveFailedError
from asyncckpt import format as fmt
from asyncckpt.engine.reader import read_manifest
from asyncckpt.format import MANIFEST_NAME, MAX_MANIFEST_BYTES, MAX_MANIFEST_VALUES, seal_manifest


def _load_quietly(root):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = asyncckpt.load(root)
    return out, [str(w.message) for w in caught]


def test_a_save_of_a_list_over_the_value_limit_fails_and_commits_nothing(tmp_path):
    with CheckpointManager(tmp_path, keep_last=None) as mgr:
        mgr.save(1, {"w": torch.ones(3), "hist": [0]}).wait()
        handle = mgr.save(2, {"w": torch.ones(3), "hist": list(range(MAX_MANIFEST_VALUES // 2 + 1000))})
        with pytest.raises(SaveFailedError, match="reader's limit of 2000000 JSON values") as caught:
            handle.wait()
        assert "as a tensor" in str(caught.value)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-000000000001"]
    out, caught_warnings = _load_quietly(tmp_path)  # before: step 2 committed, load warned and fell back
    assert out["hist"] == [0] and caught_warnings == []


def test_a_save_of_metadata_over_the_byte_limit_fails_and_commits_nothing(tmp_path):
    with CheckpointManager(tmp_path) as mgr:
        handle = mgr.save(1, {"w": torch.ones(3)}, metadata={"blob": "x" * (MAX_MANIFEST_BYTES + 1)})
        with pytest.raises(SaveFailedError, match=f"reader's limit of {MAX_MANIFEST_BYTES} bytes"):
            handle.wait()
    assert not list(tmp_path.glob("step-*"))


def test_many_small_tensors_over_the_value_limit_fail_at_save(tmp_path, monkeypatch):
    """The same check with a lower limit (the real one takes ~180,000 tensors, slow to stage)."""
    monkeypatch.setattr(fmt, "MAX_MANIFEST_VALUES", 5_000)
    with CheckpointManager(tmp_path) as mgr:
        handle = mgr.save(1, {f"p{i}": torch.zeros(1) for i in range(1_000)})
        with pytest.raises(SaveFailedError, match="reader's limit of 5000 JSON values"):
            handle.wait()
        mgr.save(2, {f"p{i}": torch.zeros(1) for i in range(100)}).wait()  # under it: saved and read
    assert len(asyncckpt.load(tmp_path)) == 100


def test_an_over_limit_manifest_on_disk_is_reported_as_over_the_readers_limit(tmp_path):
    with CheckpointManager(tmp_path, keep_last=None) as mgr:
        mgr.save(1, {"w": torch.ones(3)}).wait()
        mgr.save(2, {"w": torch.ones(3)}).wait()
    newest = tmp_path / "step-000000000002"
    body = read_manifest(newest).to_json()
    body = body[: body.rindex(b',"crc32"')] + b',"pad":[' + b"0," * MAX_MANIFEST_VALUES + b"0]}"
    (newest / MANIFEST_NAME).write_bytes(seal_manifest(body))
    with pytest.raises(CheckpointDamagedError, match="exceeds the reader's limit"):
        read_manifest(newest)
    out, caught = _load_quietly(tmp_path)
    assert torch.equal(out["w"], torch.ones(3))
    assert len(caught) == 1 and "exceeds the reader's limit of 2000000 JSON values" in caught[0], caught
    assert "damaged" not in caught[0]


def test_a_sparse_manifest_over_the_byte_limit_is_reported_as_over_the_readers_limit(tmp_path):
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(1, {"w": torch.ones(3)}).wait()
    with open(tmp_path / "step-000000000001" / MANIFEST_NAME, "r+b") as f:
        f.truncate(MAX_MANIFEST_BYTES + 1)
    with pytest.raises(CheckpointDamagedError, match=f"exceeds the reader's limit of {MAX_MANIFEST_BYTES} bytes"):
        read_manifest(tmp_path / "step-000000000001")
