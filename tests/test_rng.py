"""rng.py: RNGState restores every generator so random draws continue exactly."""

from __future__ import annotations

import random

import numpy as np
import torch

import asyncckpt


def draws() -> tuple:
    return (
        [random.random() for _ in range(3)],
        random.gauss(0, 1),
        np.random.rand(3).tolist(),
        torch.rand(3).tolist(),
    )


def test_restored_generators_continue_the_same_sequence(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached gaussian in Python's state
    state = {"rng": asyncckpt.RNGState()}
    with asyncckpt.CheckpointManager(tmp_path) as mgr:
        mgr.save(1, state).wait()
        expected = draws()
        random.seed(99)
        np.random.seed(99)
        torch.manual_seed(99)
        assert draws() != expected
        assert mgr.restore({"rng": asyncckpt.RNGState()}) == 1
    assert draws() == expected


def test_rng_state_is_plain_tensors_and_json(tmp_path):
    with asyncckpt.CheckpointManager(tmp_path) as mgr:
        mgr.save(1, {"rng": asyncckpt.RNGState()}).wait()
    tree = asyncckpt.load(tmp_path)
    assert tree["rng"]["torch"].dtype == torch.uint8
    assert tree["rng"]["python"]["state"].shape == (625,)
    assert tree["rng"]["numpy"]["keys"].shape == (624,)
