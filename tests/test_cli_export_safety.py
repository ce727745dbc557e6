"""`asyncckpt export` never damages what it was not asked to write: not a checkpoint's own files, not
an existing file (unless --force), not the target of a symbolic link."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest
import torch

from _cli import cli
from asyncckpt import CheckpointManager
from asyncckpt.cli import tools
from asyncckpt.engine.reader import verify_checkpoint
from asyncckpt.errors import CheckpointError
from asyncckpt.format import step_dir_name


@pytest.fixture
def root(tmp_path) -> Path:
    root = tmp_path / "ckpts"
    torch.manual_seed(0)
    with CheckpointManager(root, keep_last=None, workers=1) as mgr:
        for step in (1, 2):
            mgr.save(step, {"model": torch.nn.Linear(4, 3), "step": step}).wait()
    return root


def tree_digest(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(path.rglob("*"))
    }


@pytest.mark.parametrize(
    ("target", "extra"),
    [
        ("step-000000000002/data-00000.bin", ()),
        ("step-000000000002/manifest.json", ("--format", "pt")),
        ("step-000000000002/new.safetensors", ()),
        ("model.safetensors", ()),  # beside the checkpoints, in the root
        ("step-000000000002/data-00000.bin", ("--force",)),  # --force does not make it right
    ],
)
def test_export_refuses_an_output_inside_a_checkpoint_or_a_root(root, capsys, target, extra):
    before = tree_digest(root)
    code, out, err = cli(capsys, "export", root / step_dir_name(2), "-o", root / target, *extra)
    assert code == 2 and out == ""
    assert "asyncckpt: error:" in err and "inside" in err and str(root) in err
    assert tree_digest(root) == before
    verify_checkpoint(root / step_dir_name(2))


def test_export_refuses_a_checkpoint_reached_through_a_linked_directory(root, tmp_path, capsys):
    link = tmp_path / "elsewhere"
    link.symlink_to(root / step_dir_name(2))
    before = tree_digest(root)
    code, _, err = cli(capsys, "export", root / step_dir_name(2), "-o", link / "data-00000.bin")
    assert code == 2 and "inside" in err
    assert tree_digest(root) == before


def test_export_refuses_to_replace_an_existing_file_without_force(root, tmp_path, capsys):
    precious = tmp_path / "precious.pt"
    precious.write_bytes(b"years of work")
    code, out, err = cli(capsys, "export", root / step_dir_name(2), "-o", precious)
    assert code == 2 and out == ""
    assert "already exists" in err and "--force" in err and str(precious) in err
    assert precious.read_bytes() == b"years of work"


def test_export_with_force_replaces_and_says_so(root, tmp_path, capsys):
    out_path = tmp_path / "model.pt"
    out_path.write_bytes(b"old")
    code, out, err = cli(capsys, "export", root / step_dir_name(2), "-o", out_path, "--force")
    assert code == 0 and f"replaced {out_path}" in out + err
    assert set(torch.load(out_path, weights_only=True)) == {"weight", "bias"}


def test_export_of_a_new_file_says_nothing_about_replacing(root, tmp_path, capsys):
    code, out, err = cli(capsys, "export", root / step_dir_name(2), "-o", tmp_path / "m.pt")
    assert code == 0 and "replaced" not in out + err


@pytest.mark.parametrize("force", [(), ("--force",)])
def test_export_never_writes_through_a_symlink(root, tmp_path, capsys, force):
    target = tmp_path / "target.pt"
    target.write_bytes(b"keep me")
    link = tmp_path / "link.pt"
    link.symlink_to(target)
    code, _, err = cli(capsys, "export", root / step_dir_name(2), "-o", link, *force)
    assert code == 2 and "symbolic link" in err
    assert target.read_bytes() == b"keep me" and link.is_symlink()


def test_the_library_export_refuses_an_existing_file_unless_overwrite(root, tmp_path):
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"mine")
    with pytest.raises(CheckpointError, match="already exists"):
        tools.export_checkpoint(root / step_dir_name(2), out)
    assert out.read_bytes() == b"mine"
    tools.export_checkpoint(root / step_dir_name(2), out, overwrite=True)
    assert out.read_bytes() != b"mine"


def test_export_beside_a_root_is_fine(root, tmp_path, capsys):
    code, _, _ = cli(capsys, "export", root / step_dir_name(2), "-o", tmp_path / "m.safetensors")
    assert code == 0 and (tmp_path / "m.safetensors").is_file()
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
    os.unlink(tmp_path / "m.safetensors")


@pytest.mark.parametrize("url", ["s3://ckpt/model.safetensors", "file:///tmp/model.safetensors"])
def test_export_to_a_url_says_it_writes_a_local_file(root, capsys, url):
    # a URL as OUT was read as a path ("its directory s3:/ckpt does not exist"), mangling the URL
    code, out, err = cli(capsys, "export", root / step_dir_name(2), "-o", url)
    assert code == 2 and out == ""
    assert f"-o {url} is a URL: export writes a local file" in err


@pytest.mark.parametrize("kind", ["FIFO", "character device"])
def test_export_with_force_never_replaces_a_special_file(root, tmp_path, capsys, kind):
    """As root, `-o /dev/null --force` must not put a regular file where the device was."""
    out = tmp_path / "out.pt"
    if kind == "FIFO":
        os.mkfifo(out)
    else:
        os.mknod(out, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # what /dev/null is
    code, _, err = cli(capsys, "export", root / step_dir_name(2), "-o", out, "--force")
    assert code == 2 and f"output {out} is a {kind}, not a regular file; refusing to replace it" in err
    mode = os.lstat(out).st_mode
    assert stat.S_ISFIFO(mode) if kind == "FIFO" else stat.S_ISCHR(mode), kind
