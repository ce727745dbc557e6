"""Checkpoints as versions: tags protect from retention; load_weights reads only the model."""

from __future__ import annotations

import os

import pytest
import torch

import asyncckpt
from asyncckpt import CheckpointError
from asyncckpt.engine.reader import read_manifest


def model_state(seed: int) -> dict:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 64)).sum().backward()
    opt.step()
    return {"model": model, "optimizer": opt, "step": seed}


def test_tags_are_saved_protect_from_retention_and_untag_releases(tmp_path):
    root = tmp_path / "ckpts"
    with asyncckpt.CheckpointManager(root, keep_last=1) as mgr:
        mgr.save(1, {"w": torch.ones(3)}, tags=["best", "pre-lr-drop"], metadata={"note": "x"}).wait()
        mgr.save(2, {"w": torch.ones(3)}).wait()
        mgr.save(3, {"w": torch.ones(3)}).wait()
        assert mgr.steps() == [1, 3]  # 2 went, 1 is tagged
        assert read_manifest(root / "step-000000000001").tags == ["best", "pre-lr-drop"]
        assert mgr.tag(3, "candidate") == ["candidate"]
        assert mgr.untag(1, "best") == ["pre-lr-drop"]
        mgr.save(4, {"w": torch.ones(3)}).wait()
        assert mgr.steps() == [1, 3, 4]  # 1 still tagged, 3 newly tagged
        assert mgr.untag(1) == []
        mgr.save(5, {"w": torch.ones(3)}).wait()
        assert mgr.steps() == [3, 5]
        with pytest.raises(CheckpointError, match="no committed checkpoint and no save in flight for step 1"):
            mgr.tag(1, "x")
    # tags survive a reopen and still protect
    with asyncckpt.CheckpointManager(root, keep_last=1) as mgr:
        mgr.save(6, {"w": torch.ones(3)}).wait()
        assert mgr.steps() == [3, 6]
        # a retagged checkpoint still verifies (its manifest was rewritten with a new checksum)
        assert torch.equal(asyncckpt.load(root, step=3)["w"], torch.ones(3))


@pytest.mark.parametrize("bad", [["a", "a"], [""], ["x" * 200], [3], ["tab\there"]])
def test_bad_tags_are_refused_at_save(tmp_path, bad):
    with asyncckpt.CheckpointManager(tmp_path) as mgr:
        with pytest.raises(ValueError, match="tag"):
            mgr.save(1, {"w": torch.ones(1)}, tags=bad)
        assert mgr.steps() == []


def test_load_weights_reads_only_the_model_and_loads_it_exactly(tmp_path, monkeypatch):
    root = tmp_path / "ckpts"
    saved = model_state(1)
    extra = torch.randn(2_000_000)  # 8 MB the inference side must not read
    with asyncckpt.CheckpointManager(root, chunk_size=1 << 20) as mgr:
        mgr.save(7, {**saved, "big": extra}).wait()

    reads = []
    real_pread = os.pread

    def counting_pread(fd, n, offset):
        reads.append(n)
        return real_pread(fd, n, offset)

    monkeypatch.setattr(os, "pread", counting_pread)
    fresh = model_state(2)["model"]
    assert asyncckpt.load_weights(root, fresh) == 7
    monkeypatch.undo()
    for (name, a), b in zip(saved["model"].state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    manifest_bytes = (root / "step-000000000007" / "manifest.json").stat().st_size
    data_read = sum(reads) - manifest_bytes
    model_bytes = sum(t.numel() * t.element_size() for t in saved["model"].state_dict().values())
    assert data_read < model_bytes * 2 + (1 << 20)  # far below the 8 MB of "big" and optimizer state


def test_load_weights_errors(tmp_path):
    root = tmp_path / "ckpts"
    with asyncckpt.CheckpointManager(root) as mgr:
        mgr.save(1, model_state(1)).wait()
    with pytest.raises(CheckpointError, match="has no entry 'ema'"):
        asyncckpt.load_weights(root, model_state(2)["model"], key="ema")
    with pytest.raises(CheckpointError, match="does not fit"):
        asyncckpt.load_weights(root, torch.nn.Linear(3, 3))
    with pytest.raises(CheckpointError, match="no checkpoint"):
        asyncckpt.load_weights(tmp_path / "nowhere", torch.nn.Linear(3, 3))
    # a dotted key reaches into nested entries and stateful objects
    with asyncckpt.CheckpointManager(root) as mgr:
        mgr.save(2, {"ema": {"model": model_state(3)["model"]}}).wait()
    target = model_state(4)["model"]
    assert asyncckpt.load_weights(root, target, key="ema.model") == 2
    assert torch.equal(target[0].weight, model_state(3)["model"][0].weight)


def test_ls_shows_tags_and_metadata(tmp_path, capsys):
    import json

    from asyncckpt.cli.commands import main

    with asyncckpt.CheckpointManager(tmp_path) as mgr:
        mgr.save(1, {"w": torch.ones(1)}, tags=["best"], metadata={"run": "a"}).wait()
        mgr.save(2, {"w": torch.ones(1)}).wait()
    assert main(["ls", str(tmp_path), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["step"], r["tags"], r["metadata"]) for r in rows] == [(1, ["best"], {"run": "a"}), (2, [], {})]
    assert main(["ls", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    tags_column = lines[0].split().index("tags") + 1  # "created (UTC)": two words; a row's sizes: four (23 B)
    assert lines[1].split()[tags_column] == "best" and lines[2].split()[tags_column] == "-"
