"""`asyncckpt prune`: the same catalog of committed checkpoints (metrics and tags) as the manager."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from asyncckpt import CheckpointManager
from asyncckpt.cli import main
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


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def remaining(root: Path) -> list[int]:
    return sorted(int(p.name.removeprefix("step-")) for p in root.glob("step-*"))


def test_prune_keeps_a_tagged_checkpoint(root, capsys):
    with CheckpointManager(root, keep_last=None) as mgr:
        mgr.tag(1, "first")
    code, out, _ = cli(capsys, "prune", root, "--keep-last", "1", "--dry-run")
    assert code == 0 and "would delete step 1" not in out
    code, out, _ = cli(capsys, "prune", root, "--keep-last", "1")
    assert code == 0
    assert remaining(root) == [1, 4]
    assert (root / step_dir_name(1) / "manifest.json").exists()
