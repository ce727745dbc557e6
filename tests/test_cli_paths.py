"""One rule for the paths `ls`, `verify` and `inspect` take: a path that does not exist, or a folder
that is not a checkpoint root, is an error (exit 2); a root with no checkpoint is "no checkpoints"
(exit 1); the message says which."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from _cli import cli
from asyncckpt import CheckpointManager


@pytest.fixture
def notroot(tmp_path) -> Path:
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    (folder / "cat.jpg").write_bytes(b"meow")
    return folder


@pytest.mark.parametrize("command", ["ls", "verify", "inspect"])
def test_a_missing_path_does_not_exist(tmp_path, capsys, command):
    code, out, err = cli(capsys, command, tmp_path / "nonexist")
    assert code == 2 and out == ""
    assert err.startswith("asyncckpt: error:") and "does not exist" in err and "nonexist" in err


@pytest.mark.parametrize("command", ["ls", "verify"])
@pytest.mark.parametrize("kind", ["with files", "empty"])
def test_a_folder_that_is_not_a_root_is_an_error(tmp_path, notroot, capsys, command, kind):
    folder = notroot if kind == "with files" else tmp_path / "empty"
    folder.mkdir(exist_ok=True)
    before = sorted(p.name for p in folder.iterdir())
    for extra in ([], ["--json"]):
        code, out, err = cli(capsys, command, folder, *extra)
        assert code == 2 and out == "", (out, err)
        assert err.startswith("asyncckpt: error:") and "not a checkpoint root" in err and str(folder) in err
    assert sorted(p.name for p in folder.iterdir()) == before


def test_inspect_of_a_folder_that_is_not_a_checkpoint(notroot, capsys):
    code, out, err = cli(capsys, "inspect", notroot)
    assert code == 2 and out == "" and "is not a checkpoint" in err


@pytest.mark.parametrize("command", ["ls", "verify"])
def test_a_root_with_no_checkpoint_says_so_and_exits_1(tmp_path, capsys, command):
    root = tmp_path / "ckpts"
    CheckpointManager(root).close()  # opened, never saved
    code, out, err = cli(capsys, command, root)
    assert code == 1 and f"no checkpoints in {root}" in err
    code, out, err = cli(capsys, command, root, "--json")
    assert code == 1 and json.loads(out) == [] and "no checkpoints" in err


def test_ls_of_a_root_lists_and_exits_0(tmp_path, capsys):
    root = tmp_path / "ckpts"
    with CheckpointManager(root) as mgr:
        mgr.save(1, {"w": torch.zeros(2)}).wait()
    code, out, _ = cli(capsys, "ls", root)
    assert code == 0 and "step" in out.splitlines()[0] and out.splitlines()[1].split()[0] == "1"


def test_verify_of_a_checkpoint_directory_that_lost_its_manifest_says_damaged(tmp_path, capsys):
    root = tmp_path / "ckpts"
    with CheckpointManager(root) as mgr:
        mgr.save(4, {"w": torch.zeros(2)}).wait()
    (root / "step-000000000004" / "manifest.json").unlink()
    code, out, _ = cli(capsys, "verify", root / "step-000000000004")
    assert code == 1 and "DAMAGED" in out


@pytest.mark.parametrize("named", [".", "../step-000000000001", "./"])
def test_a_checkpoint_named_relative_to_the_working_directory_reads_as_itself(tmp_path, capsys, monkeypatch, named):
    """Run from inside a checkpoint, ``.`` names it (its own name is not the empty string)."""
    import asyncckpt

    root = tmp_path / "root"
    with CheckpointManager(root) as mgr:
        mgr.save(1, {"w": torch.ones(3)}).wait()
    monkeypatch.chdir(root / "step-000000000001")
    code, out, err = cli(capsys, "verify", named)
    assert code == 0 and out.startswith("ok") and "1 chunk verified" in out, (out, err)
    code, out, _ = cli(capsys, "inspect", named, "--json")
    assert code == 0 and json.loads(out)["step"] == 1
    code, out, _ = cli(capsys, "ls", named)
    assert code == 0 and "invalid" not in out and out.splitlines()[1].split()[0] == "1"
    assert asyncckpt.load(named)["w"].tolist() == [1.0] * 3


@pytest.mark.parametrize(
    "argv",
    [
        ["prune", "", "--keep-last", "1"],
        ["prune", ".", "--after", "1", "--mirror", ""],
        ["ls", ""],
        ["ls", ".", "--mirror", ""],
        ["verify", ""],
        ["stats", ""],
        ["inspect", ""],
        ["diff", "", "."],
        ["export", "", "-o", "x.pt"],
        ["export", ".", "-o", ""],
    ],
    ids=lambda argv: " ".join(repr(a) for a in argv),
)
def test_an_empty_path_is_refused_never_taken_for_the_working_directory(tmp_path, capsys, monkeypatch, argv):
    """An unset shell variable ("$ROOT") must not make `prune` delete in the working directory."""
    with CheckpointManager(tmp_path, keep_last=None) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, {"w": torch.ones(2)}).wait()
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(capsys, *argv)
    assert code == 2 and out == ""
    assert "an empty path (an unset variable?); name the path" in err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("step-")) == [
        f"step-00000000000{s}" for s in (1, 2, 3)
    ]
