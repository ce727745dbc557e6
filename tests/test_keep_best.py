"""keep_best with a metric no checkpoint carries (a misspelt name, a metric not passed yet): retention
deletes nothing, the manager warns once, and `asyncckpt prune` refuses."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from asyncckpt import CheckpointManager
from asyncckpt.cli.commands import main


def steps(root: Path) -> list[int]:
    return sorted(int(p.name.removeprefix("step-")) for p in root.glob("step-*"))


def save_losses(root: Path, losses: dict[int, float], **options) -> list[str]:
    """Save one checkpoint per step with metrics={"loss": ...}; the asyncckpt warnings raised meanwhile."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with CheckpointManager(root, workers=1, **options) as mgr:
            for step, loss in losses.items():
                mgr.save(step, {"w": torch.full((4,), float(step))}, metrics={"loss": loss}).wait()
    return [str(w.message) for w in caught if "asyncckpt" in str(w.message)]


def test_keep_best_with_an_absent_metric_deletes_nothing_and_warns_once(tmp_path):
    root = tmp_path / "ckpts"
    caught = save_losses(root, {1: 0.5, 2: 0.1, 3: 0.9, 4: 0.7}, keep_last=1, keep_best=1, best_metric="val_loss")
    assert steps(root) == [1, 2, 3, 4]
    about = [m for m in caught if "val_loss" in m]
    assert len(about) == 1, caught
    assert "no committed checkpoint" in about[0] and "deletes nothing" in about[0]


def test_keep_best_applies_once_a_checkpoint_carries_the_metric(tmp_path):
    root = tmp_path / "ckpts"
    save_losses(root, {1: 0.5, 2: 0.1, 3: 0.9}, keep_last=1, keep_best=1, best_metric="loss")
    assert steps(root) == [2, 3]


def test_prune_with_a_metric_no_checkpoint_has_is_an_error_and_deletes_nothing(tmp_path, capsys):
    root = tmp_path / "ckpts"
    save_losses(root, {1: 0.5, 2: 0.1, 3: 0.9}, keep_last=None)
    for extra in ([], ["--dry-run"]):
        code = main(["prune", str(root), "--keep-last", "1", "--keep-best", "1", "--metric", "acc", *extra])
        err = capsys.readouterr().err
        assert code == 2
        assert err.startswith("asyncckpt: error:") and "'acc'" in err and "loss" in err
        assert steps(root) == [1, 2, 3]
