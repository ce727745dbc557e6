"""Data loss and silent wrongness of s3:// roots, against the real server (the session's
``s3_server``, ``weed mini`` on 127.0.0.1): what readers see of emptied step prefixes, and what a
SIGKILL at each point of a re-save, a retention delete or a tag change leaves."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import asyncckpt
from asyncckpt.cli.commands import main as cli_main
from asyncckpt.storage.commit import ManifestLastCommit, published_checkpoints
from asyncckpt.storage.objectstore import ObjectStoreBackend
from conftest import fresh_s3_url


def _state(step: int, version: int = 0) -> dict:
    gen = torch.Generator().manual_seed(step * 10 + version)
    return {"x": torch.randn(50_000, generator=gen), "step": step, "version": version}


def _empty_prefix(backend: ObjectStoreBackend, step_name: str) -> None:
    """Leave ``step_name/`` as a store with directories keeps it after its last object is deleted
    (SeaweedFS lists it as a common prefix): what a delete cut short between removing the objects
    and removing the directory leaves, or a user's ``aws s3 rm --recursive``."""
    name = f"{step_name}/data-00000-0123456789abcdef.bin"
    backend.write_small(name, b"x" * 10)
    backend._client.delete([name])
    assert any(e.name == step_name and e.is_dir for e in backend.list("")), "the store does not keep emptied prefixes"


def test_an_empty_step_prefix_is_no_checkpoint_for_readers(s3_server, s3_env, capsys):
    """An emptied ``step-N/`` prefix holds nothing: it is not listed, not reported damaged or gone,
    and never stops ``load`` from reading the newest checkpoint that verifies."""
    url = fresh_s3_url()
    with asyncckpt.CheckpointManager(url) as mgr:
        mgr.save(4, _state(4)).wait()
    backend = ObjectStoreBackend(url)
    _empty_prefix(backend, "step-000000000003")
    _empty_prefix(backend, "step-000000000005")

    assert [c.step for c in published_checkpoints(backend)] == [4]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert asyncckpt.load(url)["x"].equal(_state(4)["x"])
    with pytest.raises(asyncckpt.CheckpointNotFoundError, match=r"no checkpoint for step 5 .*committed steps: \[4\]"):
        asyncckpt.load(url, 5)
    capsys.readouterr()
    assert cli_main(["ls", "--json", url]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r.get("step") for r in rows] == [4], rows
    assert cli_main(["verify", url]) == 0
    out = capsys.readouterr().out
    assert "step-000000000003" not in out and "step-000000000005" not in out, out
    # the next writer's sweep removes the empty prefixes and touches nothing else
    with asyncckpt.CheckpointManager(url) as mgr:
        assert mgr.steps() == [4]
    assert [e.name for e in backend.list("") if e.is_dir] == ["step-000000000004"]
    assert [c.step for c in ManifestLastCommit(backend).checkpoints()] == [4]
