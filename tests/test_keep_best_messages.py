"""The keep_best messages tell a metric that is absent from one that is there but never a usable number
(NaN, a string): both `asyncckpt prune` and the manager's warning."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from asyncckpt import CheckpointManager
from asyncckpt.cli.commands import main


def save(root: Path, metrics: list[dict], **options) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with CheckpointManager(root, workers=1, **options) as mgr:
            for step, m in enumerate(metrics, 1):
                mgr.save(step, {"w": torch.full((2,), float(step))}, metrics=m).wait()
    return [str(w.message) for w in caught if "asyncckpt" in str(w.message)]


UNUSABLE = [{"acc": float("nan"), "loss": 0.5}, {"acc": "high", "loss": 0.4}, {"acc": None, "loss": 0.3}]


def test_prune_says_the_metric_has_no_number_when_it_is_there_but_unusable(tmp_path, capsys):
    root = tmp_path / "ckpts"
    save(root, UNUSABLE, keep_last=None)
    code = main(["prune", str(root), "--keep-best", "1", "--metric", "acc"])
    err = capsys.readouterr().err
    assert code == 2 and "has the metric" not in err
    assert "no checkpoint" in err and "finite numeric value for the metric 'acc'" in err and "nothing deleted" in err
    assert len(list(root.glob("step-*"))) == 3


def test_prune_says_the_metric_is_absent_when_no_checkpoint_names_it(tmp_path, capsys):
    root = tmp_path / "ckpts"
    save(root, UNUSABLE, keep_last=None)
    code = main(["prune", str(root), "--keep-best", "1", "--metric", "val_acc"])
    err = capsys.readouterr().err
    assert code == 2 and "no checkpoint" in err and "has the metric 'val_acc'" in err and "acc, loss" in err


@pytest.mark.parametrize(("metric", "wording"), [("acc", "finite numeric value"), ("val", "has the metric")])
def test_the_manager_warning_uses_the_same_wording(tmp_path, metric, wording):
    caught = save(tmp_path / "r", UNUSABLE, keep_last=1, keep_best=1, best_metric=metric)
    about = [m for m in caught if repr(metric) in m]
    assert len(about) == 1 and wording in about[0] and "deletes nothing" in about[0], caught
    if metric == "acc":
        assert "has the metric" not in about[0]
