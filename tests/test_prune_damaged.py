"""Retention never deletes what it cannot read, and never counts it as one of the newest: a damaged
newer checkpoint does not cost the last good one, and a tagged checkpoint whose manifest cannot be
read keeps its protection."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from _cli import cli, remaining
from asyncckpt import CheckpointManager
from asyncckpt.engine.reader import verify_checkpoint
from asyncckpt.format import MANIFEST_NAME, step_dir_name
from asyncckpt.retention import CheckpointInfo, RetentionPolicy, steps_to_delete


@pytest.fixture
def root(tmp_path) -> Path:
    root = tmp_path / "ckpts"
    with CheckpointManager(root, keep_last=None, workers=1) as mgr:
        for step in (1, 2, 3, 4):
            mgr.save(step, {"w": torch.full((3,), float(step))}, metrics={"loss": 1.0 / step}).wait()
    return root


def damage_manifest(root: Path, step: int) -> None:
    (root / step_dir_name(step) / MANIFEST_NAME).write_bytes(b"{ not json")


@pytest.mark.parametrize("dry_run", [False, True])
def test_a_damaged_newest_never_costs_the_last_good_checkpoint(root, capsys, dry_run):
    damage_manifest(root, 4)
    code, out, err = cli(capsys, "prune", root, "--keep-last", "1", *(["--dry-run"] if dry_run else []))
    assert code == 0
    assert remaining(root) == ([1, 2, 3, 4] if dry_run else [3, 4])
    verify_checkpoint(root / step_dir_name(3))
    assert "step 4" in err and "cannot be read" in err and "kept" in err


def test_a_tagged_checkpoint_with_an_unreadable_manifest_stays(root, capsys):
    with CheckpointManager(root, keep_last=None) as mgr:
        mgr.tag(1, "release")
    damage_manifest(root, 1)
    code, _, err = cli(capsys, "prune", root, "--keep-last", "1")
    assert code == 0 and remaining(root) == [1, 4]
    assert "step 1" in err and "cannot be read" in err


def test_retention_keeps_unreadable_checkpoints_and_counts_only_readable_ones_as_newest():
    infos = [CheckpointInfo(s, {"loss": 1.0}) for s in (1, 2, 3)] + [CheckpointInfo(4, {}, unreadable="bad json")]
    assert steps_to_delete(infos, RetentionPolicy(keep_last=1)) == [1, 2]
    assert steps_to_delete(infos, RetentionPolicy(keep_last=2)) == [1]
    assert steps_to_delete(infos, RetentionPolicy(keep_last=1, keep_best=1, best_metric="loss")) == [1, 2]


def test_the_manager_keeps_the_last_good_checkpoint_beside_a_damaged_newer_one(root):
    damage_manifest(root, 4)
    with CheckpointManager(root, keep_last=1, workers=1) as mgr:
        mgr.save(5, {"w": torch.zeros(3)}).wait()
    assert remaining(root) == [4, 5]  # 4 is kept for a person to look at, not deleted unread
