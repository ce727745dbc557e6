"""load_weights resolves a key exactly as ``asyncckpt export --key`` does, and says what exists when
the key names nothing."""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import load_file

import asyncckpt
from _cli import cli
from asyncckpt import CheckpointError, CheckpointManager


def _models() -> dict:
    torch.manual_seed(0)
    return {
        "models": [torch.nn.Linear(3, 2), {"inner": torch.nn.Linear(2, 2)}],
        "ema": {"model": torch.nn.Linear(4, 1)},
        "pairs": (torch.nn.Linear(1, 3),),
        7: {"model": torch.nn.Linear(2, 3)},
        "step": 5,
    }


@pytest.fixture
def root(tmp_path):
    with CheckpointManager(tmp_path / "root") as mgr:
        mgr.save(5, _models()).wait()
    return tmp_path / "root"


@pytest.mark.parametrize(
    ("key", "saved"),
    [
        ("models.0", lambda s: s["models"][0]),  # before: "has no entry 'models.0'"
        ("models.1.inner", lambda s: s["models"][1]["inner"]),
        ("pairs.0", lambda s: s["pairs"][0]),
        ("7.model", lambda s: s[7]["model"]),
        ("ema.model", lambda s: s["ema"]["model"]),
    ],
)
def test_load_weights_and_export_resolve_the_same_key(root, tmp_path, capsys, key, saved):
    model = saved(_models())
    fresh = type(model)(model.in_features, model.out_features)
    assert asyncckpt.load_weights(root, fresh, key=key) == 5
    for name, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name
    out = tmp_path / "out.safetensors"
    assert cli(capsys, "export", root / "step-000000000005", "-o", out, "--key", key)[0] == 0
    exported = load_file(out)
    assert exported.keys() == fresh.state_dict().keys()
    for name, value in exported.items():
        assert torch.equal(value, fresh.state_dict()[name]), name


def _load_weights_error(root, key: str) -> str:
    with pytest.raises(CheckpointError) as caught:
        asyncckpt.load_weights(root, torch.nn.Linear(3, 2), key=key)
    return str(caught.value)


def test_a_key_naming_nothing_is_one_error_for_both_listing_what_exists(root, tmp_path, capsys):
    ckpt = root / "step-000000000005"
    for key, listing in (
        ("models.2", "('models' is a list of 2: indices 0 to 1)"),
        ("nope", "(top-level keys: 'models', 'ema', 'pairs', 7, 'step')"),
    ):
        assert _load_weights_error(root, key) == f"{ckpt} has no entry {key!r} {listing}"
        code, _, err = cli(capsys, "export", ckpt, "-o", tmp_path / "x.pt", "--key", key)
        assert code == 2 and f"{ckpt} has no entry {key!r} {listing}" in err


@pytest.mark.parametrize("key", ["models.--1", "models.²", "--1", "²", "1" * 5000])
def test_a_key_part_that_only_looks_like_a_number_names_nothing(root, tmp_path, capsys, key):
    # str.isdigit() accepts '²' and lstrip('-') accepts '--1', which int() refuses: the ValueError
    # made load_weights call every checkpoint damaged, and export print a traceback
    ckpt = root / "step-000000000005"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "is damaged, falling back" warning
        assert _load_weights_error(root, key).startswith(f"{ckpt} has no entry {key!r} (")
    code, _, err = cli(capsys, "export", ckpt, "-o", tmp_path / "x.pt", f"--key={key}")
    assert code == 2 and f"{ckpt} has no entry {key!r} (" in err


def test_a_step_asked_of_one_checkpoint_is_its_own_or_an_error_naming_it(tmp_path):
    root = tmp_path / "root"
    with asyncckpt.CheckpointManager(root, keep_last=None) as mgr:
        for step in (1, 2):
            mgr.save(step, {"w": torch.full((2,), float(step))}).wait()
    one = root / "step-000000000001"
    assert asyncckpt.load(one, step=1)["w"].tolist() == [1.0, 1.0]
    with pytest.raises(asyncckpt.CheckpointNotFoundError, match="is the checkpoint of step 1, not of step 2"):
        asyncckpt.load(one, step=2)
