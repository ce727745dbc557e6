"""`asyncckpt prune`: the same catalog of committed checkpoints (metrics and tags) as the manager."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

import asyncckpt
from _cli import cli, remaining
from asyncckpt import CheckpointManager
from asyncckpt.format import step_dir_name

STEPS = [1, 2, 3, 4]
LOSSES = {1: 0.5, 2: 0.1, 3: 0.9, 4: 0.7}


@pytest.fixture
def root(tmp_path) -> Path:
    root = tmp_path / "ckpts"
    state = {"w": torch.arange(6.0), "step": 0}
    with CheckpointManager(root, keep_last=None, workers=1) as mgr:
        for step in STEPS:
            state["step"] = step
            mgr.save(step, state, metrics={"loss": LOSSES[step]}).wait()
    return root


def test_prune_keeps_a_tagged_checkpoint(root, capsys):
    with CheckpointManager(root, keep_last=None) as mgr:
        mgr.tag(1, "first")
    code, out, _ = cli(capsys, "prune", root, "--keep-last", "1", "--dry-run")
    assert code == 0 and "would delete step 1" not in out
    code, out, _ = cli(capsys, "prune", root, "--keep-last", "1")
    assert code == 0
    assert remaining(root) == [1, 4]
    assert (root / step_dir_name(1) / "manifest.json").exists()


def test_prune_needs_no_keep_last_when_another_rule_is_given(root, capsys):
    code, out, _ = cli(capsys, "prune", root, "--keep-best", "1", "--metric", "loss")
    assert code == 0, out
    assert remaining(root) == [2, 4]  # the best (0.1) and the newest


def test_prune_keep_every_alone(root, capsys):
    assert cli(capsys, "prune", root, "--keep-every", "2")[0] == 0
    assert remaining(root) == [2, 4]


def test_prune_without_any_rule_is_a_usage_error(root, capsys):
    code, _, err = cli(capsys, "prune", root)
    assert code == 2 and "asyncckpt: error:" in err and "--keep-last" in err
    assert remaining(root) == STEPS


def test_prune_refuses_a_folder_that_is_not_a_root_and_leaves_no_lock(tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "cat.jpg").write_bytes(b"meow")
    for extra in ([], ["--dry-run"]):
        code, _, err = cli(capsys, "prune", folder, "--keep-last", "1", *extra)
        assert code == 2 and err.startswith("asyncckpt: error:") and "not a checkpoint root" in err
        assert sorted(p.name for p in folder.iterdir()) == ["cat.jpg"]
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = cli(capsys, "prune", empty, "--keep-last", "1")
    assert code == 2 and "not a checkpoint root" in err
    assert list(empty.iterdir()) == []


def test_prune_of_a_root_with_no_checkpoint_left_deletes_nothing(tmp_path, capsys):
    root = tmp_path / "ckpts"
    CheckpointManager(root).close()  # a root a manager opened, but no checkpoint committed yet
    before = sorted(p.name for p in root.iterdir())
    code, out, _ = cli(capsys, "prune", root, "--keep-last", "1")
    assert code == 0 and "deleted 0, kept 0" in out
    assert sorted(p.name for p in root.iterdir()) == before


def test_a_delete_that_fails_midway_is_an_error_saying_what_was_deleted(root, capsys):
    """Step 2's directory cannot be renamed away (immutable, as a real filesystem can make it):
    prune says which steps it deleted and where it stopped, exits 2, and touches nothing after it."""
    stuck = root / step_dir_name(2)
    if subprocess.run(["chattr", "+i", str(stuck)], capture_output=True).returncode != 0:
        pytest.skip("this filesystem cannot make a directory immutable (chattr +i)")
    try:
        code, _, err = cli(capsys, "prune", root, "--keep-last", "1")
    finally:
        subprocess.run(["chattr", "-i", str(stuck)], check=True)
    assert code == 2 and "Traceback" not in err
    assert "deleted steps [1], then failed deleting step 2" in err and "Operation not permitted" in err, err
    assert remaining(root) == [2, 3, 4]


@pytest.mark.parametrize("damage", ["flipped byte", "data file gone"])
def test_a_newer_checkpoint_with_damaged_data_never_costs_the_newest_that_verifies(root, capsys, damage):
    """Its manifest reads fine, so it used to count as the newest: ``--keep-last 1`` deleted every
    good checkpoint, and nothing could be loaded afterwards."""
    data = next((root / step_dir_name(4)).glob("data-*"))
    if damage == "flipped byte":
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        data.write_bytes(bytes(raw))
    else:
        data.unlink()
    code, out, err = cli(capsys, "prune", root, "--keep-last", "1", "--dry-run")
    assert code == 0 and out.splitlines() == [
        "would delete step 1",
        "would delete step 2",
        "would delete 2, kept 2: [3, 4]",
    ]
    assert "kept step 4: it does not verify" in err and data.name in err, err
    code, out, err = cli(capsys, "prune", root, "--keep-last", "1")
    assert code == 0 and "kept step 4: it does not verify" in err, err
    assert remaining(root) == [3, 4]
    with pytest.warns(UserWarning, match="step-000000000004 is damaged"):
        assert asyncckpt.load(root)["step"] == 3
