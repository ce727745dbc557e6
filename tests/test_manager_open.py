"""CheckpointManager's constructor: a failure anywhere in it leaves the root free, in this process too."""

from __future__ import annotations

import pytest
import torch

from asyncckpt import CheckpointManager
from asyncckpt import manager as manager_mod


@pytest.mark.parametrize("part", ["ArenaPool", "CopyEngine", "Pipeline"])
def test_a_constructor_that_fails_leaves_the_root_free(tmp_path, monkeypatch, part):
    def fail(*args, **kwargs):
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(manager_mod, part, fail)
    with pytest.raises(RuntimeError, match="can't start new thread"):
        CheckpointManager(tmp_path / "ckpts")
    monkeypatch.undo()
    with CheckpointManager(tmp_path / "ckpts") as mgr:  # not refused as "already open in this process"
        mgr.save(1, {"w": torch.ones(3)}).wait()
        assert mgr.steps() == [1]
