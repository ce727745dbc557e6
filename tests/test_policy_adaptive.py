"""policy.Adaptive driven by a fake clock and scripted save costs, regime by regime."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest

from asyncckpt import Adaptive


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Loop:
    """A training loop calling due() once per step; saves commit after a scripted delay."""

    def __init__(self, policy: Adaptive, clock: Clock) -> None:
        self.policy, self.clock = policy, clock
        self.step = 0
        self.saves: list[int] = []
        self.pending: tuple[float, float, float] | None = None  # (commit time, stall, persist)

    def run(self, steps: int, iteration: float, stall: float, persist: float, gpu_fence: float = 0.0) -> None:
        """``gpu_fence``: overlap mode on a GPU, the compute stream's wait at the fence (the host's is 0)."""
        for _ in range(steps):
            self.step += 1
            if self.pending and self.clock.now >= self.pending[0]:
                _, s, p = self.pending
                self.pending = None
                record = SimpleNamespace(ok=True, stall_s=s, persist_s=p, fence_wait_s=0.0, fence_gpu_wait_s=gpu_fence)
                self.policy.committed(record)
            if self.policy.due(self.step):
                self.policy.saved(self.step)
                self.saves.append(self.step)
                self.pending = (self.clock.now + stall + persist, stall, persist)
                self.clock.now += stall
            self.clock.now += iteration

    def gaps(self, last: int) -> list[int]:
        return [b - a for a, b in zip(self.saves, self.saves[1:], strict=False)][-last:]


def make(**kw) -> tuple[Adaptive, Loop]:
    clock = Clock()
    policy = Adaptive(clock=clock, **kw)
    return policy, Loop(policy, clock)


def test_cheap_saves_are_taken_every_step():
    policy, loop = make(max_overhead=0.01)
    loop.run(40, iteration=0.1, stall=0.0005, persist=0.02)  # 0.5 ms stall < 1% of 100 ms
    assert policy.interval == 1
    assert loop.gaps(5) == [1, 1, 1, 1, 1]


def test_overhead_bound_sets_the_interval():
    policy, loop = make(max_overhead=0.01)
    loop.run(200, iteration=0.1, stall=0.05, persist=0.01)  # needs k*0.1*0.01 >= 0.05 -> k = 50
    assert policy.interval == 50
    assert policy.explain()["reason"] == "overhead bound"
    assert loop.gaps(2) == [50, 50]


def test_the_gpu_streams_fence_wait_counts_toward_the_overhead_bound():
    # Overlap mode on a GPU: save() itself stalls 0.5 ms, but the next optimizer step's kernels wait
    # 49.5 ms on the device for the copy. Training lost 50 ms per save, as in the test above.
    policy, loop = make(max_overhead=0.01)
    loop.run(200, iteration=0.1, stall=0.0005, persist=0.01, gpu_fence=0.0495)
    assert policy.interval == 50
    assert loop.gaps(2) == [50, 50]


def test_slow_disk_means_waiting_for_the_previous_commit_then_recovers():
    policy, loop = make(max_overhead=0.5)
    loop.run(300, iteration=0.1, stall=0.001, persist=4.0)  # commit takes ~40 steps
    assert policy.interval == 41
    assert policy.explain()["reason"] == "previous save commits first"
    loop.run(100, iteration=0.1, stall=0.001, persist=0.2)  # the disk got fast again
    assert policy.interval == 3


def test_growing_iteration_time_shrinks_the_interval():
    policy, loop = make(max_overhead=0.01)
    loop.run(300, iteration=0.1, stall=0.05, persist=0.01)
    assert policy.interval == 50
    loop.run(300, iteration=0.2, stall=0.05, persist=0.01)  # median gap moves to 0.2 s
    assert policy.interval == 25


def test_a_save_due_while_one_is_in_flight_is_deferred_not_waited_for():
    policy, loop = make(max_overhead=0.9)
    loop.run(4, iteration=0.1, stall=0.001, persist=10.0)  # first save at step 4, commits at ~t=10.4
    assert loop.saves == [4]
    loop.run(30, iteration=0.1, stall=0.001, persist=10.0)
    assert loop.saves == [4]  # nothing started while step 4's save was in flight
    assert policy.deferred == 30
    loop.run(80, iteration=0.1, stall=0.001, persist=10.0)
    assert len(loop.saves) == 2 and policy.explain()["deferred"] >= 30


def test_max_interval_caps_the_interval_and_warns_when_it_breaks_the_overhead_bound():
    policy, loop = make(max_overhead=0.01, max_interval=2.0)  # 2 s = 20 steps at 0.1 s
    with pytest.warns(UserWarning, match=r"max_interval=2 s allows at most 20 steps.*2\.5%"):
        loop.run(200, iteration=0.1, stall=0.05, persist=0.01)  # overhead bound wants 50
    assert policy.interval == 20
    assert policy.explain()["reason"] == "max_interval cap"


def test_max_interval_that_does_not_bind_gives_no_warning():
    policy, loop = make(max_overhead=0.01, max_interval=60.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loop.run(200, iteration=0.1, stall=0.05, persist=0.01)
    assert policy.interval == 50


def test_young_daly_optimum_with_mtbf():
    policy, loop = make(max_overhead=0.5, mtbf=3600.0)
    loop.run(400, iteration=0.1, stall=0.05, persist=0.01)
    # sqrt(2 * 0.05 * 3600) = 18.97 s -> 190 steps at 0.1 s
    assert policy.interval == 190
    assert policy.explain()["k_young_daly"] == 190


def test_no_save_before_the_iteration_time_is_known():
    policy, loop = make()
    loop.run(3, iteration=0.1, stall=0.001, persist=0.001)
    assert loop.saves == []
    assert policy.explain()["reason"] == "no save committed yet"


@pytest.mark.parametrize("kwargs", [{"max_overhead": 0}, {"max_overhead": 1.5}, {"max_interval": -1}, {"mtbf": 0}])
def test_invalid_arguments(kwargs):
    with pytest.raises(ValueError):
        Adaptive(**kwargs)


def test_adaptive_drives_a_real_manager_without_blocking_on_in_flight_saves(tmp_path):
    import time

    import torch

    import asyncckpt

    policy = asyncckpt.Adaptive(max_overhead=0.5)
    state = {"w": torch.zeros(1000)}
    with asyncckpt.CheckpointManager(tmp_path, policy=policy, keep_last=None) as mgr:
        for step in range(1, 5000):  # until a few saves committed, however slow the disk is
            if len(mgr.steps()) >= 3:
                break
            state["w"] += 1
            handle = mgr.maybe_save(step, state)
            if handle is not None:
                # Adaptive only says "due" when nothing is in flight, so a save never waits
                assert all(h is handle for h in mgr._admission._pending)
            time.sleep(0.002)
        mgr.wait()
        steps = mgr.steps()
        summary = mgr.stats.summary()
    assert summary["deferred_saves"] == policy.deferred
    assert 0 < summary["overhead_fraction"] < 1
    stalls = sum(r.stall_s for r in mgr.stats.records)
    assert summary["overhead_fraction"] == pytest.approx(stalls / summary["loop_wall_s"])
    assert len(steps) >= 2
    explained = policy.explain()
    assert explained["iteration_s"] > 0 and explained["interval_steps"] >= 1
    for step in steps:
        assert torch.equal(asyncckpt.load(tmp_path, step=step)["w"], torch.full((1000,), float(step)))
