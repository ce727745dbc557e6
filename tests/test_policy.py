"""policy.py: when a save is due."""

from __future__ import annotations

import numpy as np
import pytest

import asyncckpt
from asyncckpt import EverySeconds, EverySteps


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now
        self.calls = 0

    def __call__(self) -> float:
        self.calls += 1
        return self.now


def test_every_steps_is_due_at_positive_multiples():
    policy = EverySteps(3)
    assert [s for s in range(0, 13) if policy.due(s)] == [3, 6, 9, 12]


def test_every_steps_does_not_depend_on_history():
    """Due steps are the same after a resume, whatever was saved before."""
    policy = EverySteps(4)
    policy.saved(3)
    assert policy.due(8) and not policy.due(9) and policy.due(4_000_000)
    assert not EverySteps(4).due(0)
    assert [s for s in range(1, 5) if EverySteps(1).due(s)] == [1, 2, 3, 4]


@pytest.mark.parametrize("n", [0, -1, 1.5, True, "2", None])
def test_every_steps_rejects_non_positive_integers(n):
    with pytest.raises(ValueError, match="EverySteps needs a positive integer"):
        EverySteps(n)


def test_every_seconds_follows_the_clock():
    clock = FakeClock()
    policy = EverySeconds(10, clock=clock)
    assert not policy.due(1)  # the first call starts the interval
    clock.now += 5
    assert not policy.due(2)
    clock.now += 4.999
    assert not policy.due(3)
    clock.now += 0.001
    assert policy.due(4)
    clock.now += 100
    assert policy.due(5)  # still due until a save starts
    policy.saved(5)
    assert not policy.due(6)
    clock.now += 9
    assert not policy.due(7)
    clock.now += 1
    assert policy.due(8)
    assert clock.calls > 0


def test_every_seconds_counts_from_the_last_save():
    clock = FakeClock(0.0)
    policy = EverySeconds(60, clock=clock)
    assert not policy.due(0)
    clock.now = 30
    policy.saved(0)  # a save started (e.g. an unconditional save) restarts the interval
    clock.now = 70
    assert not policy.due(1)
    clock.now = 90
    assert policy.due(2)


def test_every_seconds_fractional_interval():
    clock = FakeClock(0.0)
    policy = EverySeconds(0.5, clock=clock)
    assert not policy.due(0)
    clock.now = 0.25
    assert not policy.due(1)
    clock.now = 0.5
    assert policy.due(2)


@pytest.mark.parametrize("seconds", [np.int64(60), np.float32(1.5), 0.25])
def test_every_seconds_takes_any_real_number_of_seconds(seconds):
    assert EverySeconds(seconds).seconds == float(seconds)


@pytest.mark.parametrize("seconds", [0, -1, float("nan"), -0.0, float("inf"), True, "60"])
def test_every_seconds_rejects_what_is_no_positive_finite_interval(seconds):
    with pytest.raises(ValueError, match="EverySeconds needs a positive, finite number of seconds"):
        EverySeconds(seconds)


@pytest.mark.parametrize("policy", [5, "every 10", asyncckpt.EverySteps])
def test_a_policy_that_is_not_a_save_policy_is_refused_when_the_manager_opens(tmp_path, policy):
    with pytest.raises(TypeError, match="policy must be a SavePolicy .*got "):
        asyncckpt.CheckpointManager(tmp_path / "root", policy=policy)
    assert not (tmp_path / "root" / ".lock").exists()
