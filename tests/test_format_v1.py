"""Checkpoints written by format version 1 (committed fixtures, made by tests/fixtures/make_v1.py)
still load: bit-exact through ``load``, in place through ``restore`` and ``load_weights``, and
through the command line. A change to the reader or the format that breaks them fails here."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tests._cli import cli
from tests._trees import assert_same_tree

import asyncckpt

FIXTURES = Path(__file__).resolve().parent / "fixtures"
sys.path.insert(0, str(FIXTURES))
from make_v1 import fixture_state  # noqa: E402

NAMES = ["v1-zstd", "v1-raw"]


def saved_state(name: str) -> dict:
    """The fixture's live objects holding the values saved at step 7, from the committed reference:
    computed afresh, an AdamW step rounds differently on another CPU (AVX2 against AVX-512) by an ulp."""
    state = fixture_state()
    reference = torch.load(FIXTURES / f"{name}-step7.pt", weights_only=True)
    for key in ("model", "optimizer", "scheduler"):
        state[key].load_state_dict(reference[key])
    return state


@pytest.fixture(params=NAMES)
def fixture_root(request) -> Path:
    return FIXTURES / request.param


def test_the_fixtures_are_untouched_by_reading(fixture_root):
    """Reading must never write into a root: a lock or swept name here would mean it did."""
    asyncckpt.load(fixture_root)
    assert not (fixture_root / ".lock").exists()


@pytest.mark.parametrize(("name", "mmap"), [("v1-zstd", False), ("v1-raw", False), ("v1-raw", True)])
def test_load_is_bit_exact(name, mmap):
    fixture_root = FIXTURES / name
    expected = torch.load(FIXTURES / f"{fixture_root.name}-step7.pt", weights_only=True)
    loaded = asyncckpt.load(fixture_root, step=7, mmap=mmap)
    assert isinstance(loaded["extra"]["array"], np.ndarray)
    loaded["extra"]["array"] = torch.from_numpy(loaded["extra"]["array"])
    assert_same_tree(expected, loaded, exact_dict_types=True)
    newest = asyncckpt.load(fixture_root)
    assert newest["extra"]["epoch"] == 3
    assert newest["extra"]["tied_a"].data_ptr() == newest["extra"]["tied_b"].data_ptr()


def test_restore_in_place_and_catalog(fixture_root, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(fixture_root, root)
    want = saved_state(fixture_root.name)
    live = fixture_state()
    with torch.no_grad():
        for p in live["model"].parameters():
            p.add_(1.0)
    live["step"] = 0
    live["extra"]["epoch"] = -1
    with asyncckpt.CheckpointManager(root, keep_last=None) as mgr:
        assert mgr.steps() == [7, 9]
        assert mgr.restore(live, step=7) == 7
        assert mgr.tag(9, "late") == ["late"]
        assert mgr.untag(7, "best") == []
    assert live["step"] == 7 and live["extra"]["epoch"] == 2
    for a, b in zip(live["model"].state_dict().values(), want["model"].state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert_same_tree(want["optimizer"].state_dict(), live["optimizer"].state_dict(), exact_dict_types=True)
    assert live["scheduler"].state_dict() == want["scheduler"].state_dict()


def test_load_weights(fixture_root):
    model = fixture_state()["model"]
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    assert asyncckpt.load_weights(fixture_root / "step-000000000007", model) == 7
    want = saved_state(fixture_root.name)["model"].state_dict()
    for a, b in zip(model.state_dict().values(), want.values(), strict=True):
        assert torch.equal(a, b)


def test_cli_ls_verify_export(fixture_root, tmp_path, capsys):
    code, out, _ = cli(capsys, "ls", fixture_root)
    assert code == 0 and "best" in out and '"acc": 0.75' in out
    code, out, _ = cli(capsys, "verify", fixture_root)
    assert code == 0, out
    out_file = tmp_path / "model.safetensors"
    code, _, err = cli(capsys, "export", fixture_root / "step-000000000007", "-o", out_file, "--key", "model")
    assert code == 0, err
    from safetensors.torch import load_file

    exported = load_file(out_file)
    for name, value in saved_state(fixture_root.name)["model"].state_dict().items():
        assert torch.equal(exported[name], value), name
