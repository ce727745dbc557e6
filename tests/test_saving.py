"""What ``save`` takes at the call (metrics, metadata, a slot in flight), tags, and asking whether a save is due."""

from __future__ import annotations

import asyncio
import signal
import threading
from types import SimpleNamespace

import pytest
import torch

from _waiting import run_with_timeout, wait_until
from asyncckpt import (
    Adaptive,
    AsyncCheckpointManager,
    CheckpointNotFoundError,
    EverySeconds,
    EverySteps,
    _phases,
    load,
)
from asyncckpt.engine.reader import read_manifest
from asyncckpt.manager import CheckpointManager


def test_metadata_and_metrics_changed_after_save_never_reach_the_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setitem(_phases._DELAYS, "write", 0.3)  # the manifest is written well after save returns
    metadata = {"config": {"layers": [1, 2, 3], "opt": {"lr": 0.1}}, "notes": ["a"]}
    metrics = {"loss": 0.5, "per_class": [0.1, 0.2]}
    with CheckpointManager(tmp_path) as mgr:
        handle = mgr.save(1, {"w": torch.ones(8)}, metrics=metrics, metadata=metadata)
        metadata["config"]["layers"].append(4)
        metadata["config"]["opt"]["lr"] = 99.0
        metadata["notes"][0] = "changed"
        metadata["new"] = True
        metrics["per_class"].append(0.3)
        metrics["loss"] = 7.0
        path = handle.wait()
    manifest = read_manifest(path)
    assert manifest.metadata == {"config": {"layers": [1, 2, 3], "opt": {"lr": 0.1}}, "notes": ["a"]}
    assert manifest.metrics == {"loss": 0.5, "per_class": [0.1, 0.2]}


@pytest.mark.filterwarnings("ignore:asyncckpt. saving step")
def test_max_pending_holds_when_threads_save_at_once(tmp_path, monkeypatch):
    monkeypatch.setitem(_phases._DELAYS, "write", 0.05)  # a slow writer: saves stay in flight
    monkeypatch.setitem(_phases._DELAYS, "snapshot", 0.02)  # a long gap between a slot check and the hand-over
    for max_pending in (1, 2):
        mgr = CheckpointManager(tmp_path / str(max_pending), max_pending=max_pending, keep_last=None)
        lock = threading.Lock()
        in_flight = [0, 0]  # now, most seen

        real_submit, real_on_done = mgr._pipeline.submit, mgr._on_done

        def submit(job, real_submit=real_submit, lock=lock, in_flight=in_flight):
            with lock:
                in_flight[0] += 1
                in_flight[1] = max(in_flight[1], in_flight[0])
            real_submit(job)

        def on_done(job, path, real_on_done=real_on_done, lock=lock, in_flight=in_flight):
            with lock:  # before the handle resolves and its slot frees: never counts low
                in_flight[0] -= 1
            real_on_done(job, path)

        mgr._pipeline.submit, mgr._pipeline._on_done = submit, on_done

        def saver(first: int, mgr: CheckpointManager = mgr) -> None:
            for step in range(first, first + 24, 4):
                mgr.save(step, {"w": torch.full((1000,), float(step))})

        threads = [threading.Thread(target=saver, args=(i,)) for i in range(1, 5)]
        for thread in threads:
            thread.start()
        for thread in threads:
            run_with_timeout(thread.join, timeout=120)
        mgr.close()
        assert in_flight == [0, max_pending], f"max_pending={max_pending}"
        assert len(mgr.steps()) == 24


@pytest.mark.parametrize("max_pending", [1, 2])
def test_a_failed_hand_over_gives_its_slot_back(tmp_path, monkeypatch, max_pending):
    with CheckpointManager(tmp_path, max_pending=max_pending) as mgr:
        for _ in range(max_pending + 1):
            with pytest.raises(TypeError, match="state"):
                mgr.save(1, {"fn": print})
        mgr.save(2, {"w": torch.ones(4)}).wait()
        assert mgr.steps() == [2]


# ---- tags on maybe_save and on saves in flight -----------------------------------------------------


def test_maybe_save_takes_tags(tmp_path):
    with CheckpointManager(tmp_path, policy=EverySteps(2)) as mgr:
        assert mgr.maybe_save(1, {"w": torch.ones(4)}, tags=("warmup",)) is None
        path = mgr.maybe_save(2, {"w": torch.ones(4)}, tags=("warmup",)).wait()
    assert read_manifest(path).tags == ["warmup"]


def test_tags_given_as_one_string_are_refused_and_nothing_is_saved(tmp_path):
    """tags="best" made the tags b, e, s, t: a checkpoint no untag("best") freed from retention."""
    with CheckpointManager(tmp_path, policy=EverySteps(1)) as mgr:
        with pytest.raises(TypeError, match=r"tags must be a list of strings, not one string: tags=\['best'\]"):
            mgr.save(1, {"w": torch.ones(4)}, tags="best")
        with pytest.raises(TypeError, match="not one string"):
            mgr.maybe_save(2, {"w": torch.ones(4)}, tags="keep")
        mgr.save(3, {"w": torch.ones(4)}, tags=("best",)).wait()
        assert mgr.steps() == [3]


def test_tag_and_untag_a_save_still_in_flight_apply_at_commit(tmp_path, monkeypatch):
    monkeypatch.setitem(_phases._DELAYS, "write", 0.3)
    with CheckpointManager(tmp_path, keep_last=1) as mgr:
        handle = mgr.save(1, {"w": torch.ones(4)}, tags=["a", "b"])
        assert not handle.done()
        assert mgr.tag(1, "best") == ["a", "b", "best"]
        assert mgr.untag(1, "a") == ["b", "best"]
        path = handle.wait()
        assert read_manifest(path).tags == ["b", "best"]
        mgr.save(2, {"w": torch.ones(4)}).wait()
        mgr.save(3, {"w": torch.ones(4)}).wait()
        assert mgr.steps() == [1, 3]  # the tag given in flight protects it from keep_last
        mgr.untag(1)
        mgr.save(4, {"w": torch.ones(4)}).wait()
        assert mgr.steps() == [4]


def test_tag_after_the_manifest_was_written_still_reaches_the_checkpoint(tmp_path, monkeypatch):
    mark = tmp_path / "phases"
    monkeypatch.setattr(_phases, "_MARK", str(mark))
    monkeypatch.setitem(_phases._DELAYS, "rename", 0.5)  # between the manifest and the commit
    root = tmp_path / "root"
    with CheckpointManager(root) as mgr:
        handle = mgr.save(1, {"w": torch.ones(4)})
        wait_until(lambda: mark.exists() and "rename" in mark.read_text(), timeout=30, what="the rename phase")
        assert not handle.done()
        assert mgr.tag(1, "late") == ["late"]
        path = handle.wait()
        assert [i.tags for i in mgr._tags.catalog.infos() if i.step == 1] == [("late",)]
    assert read_manifest(path).tags == ["late"]


def test_tag_of_a_step_neither_committed_nor_in_flight_is_not_found(tmp_path):
    with CheckpointManager(tmp_path) as mgr:
        with pytest.raises(CheckpointNotFoundError, match="no committed checkpoint and no save in flight for step 7"):
            mgr.tag(7, "x")


# ---- asking whether a save is due ------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def policy_state(policy) -> dict:
    """Everything a policy remembers, copied (the deque and the lock aside, compared by value)."""
    return {
        k: (list(v) if hasattr(v, "maxlen") else v) for k, v in vars(policy).items() if k not in ("_lock", "_clock")
    }


def make_policy(kind: str, clock: Clock):
    if kind == "steps":
        return EverySteps(3)
    if kind == "seconds":
        return EverySeconds(2.5, clock=clock)
    return Adaptive(max_overhead=0.5, clock=clock)


@pytest.mark.parametrize("kind", ["steps", "seconds", "adaptive"])
def test_due_changes_no_policy_state_and_maybe_save_follows_it(tmp_path, kind):
    clock = Clock()
    policy = make_policy(kind, clock)
    answers, saved = [], []
    with CheckpointManager(tmp_path, policy=policy, keep_last=None) as mgr:
        for step in range(1, 30):
            clock.now += 1.0
            before = policy_state(policy)
            answer = mgr.due(step)
            assert [mgr.due(step) for _ in range(3)] == [answer] * 3
            assert policy_state(policy) == before, f"due({step}) changed the policy"
            handle = mgr.maybe_save(step, {"w": torch.full((4,), float(step))})
            answers.append(answer)
            saved.append(handle is not None)
            if handle is not None:
                handle.wait()  # Adaptive: the commit is in, so the next due is not deferred by timing
    assert saved == answers and any(saved) and not all(saved)


@pytest.mark.parametrize("kind", ["steps", "seconds", "adaptive"])
def test_peek_gives_the_same_schedule_as_not_asking(kind):
    """Policy level, with scripted commits: asking peek() before every due() changes no decision."""

    def run(ask: bool) -> list[int]:
        clock = Clock()
        policy = make_policy(kind, clock)
        saves = []
        for step in range(1, 60):
            clock.now += 1.0
            peeked = [policy.peek(step) for _ in range(2)] if ask else None
            decided = policy.due(step)
            if ask:
                assert peeked == [decided, decided]
            if decided:
                policy.saved(step)
                saves.append(step)
                record = SimpleNamespace(ok=True, stall_s=0.3, persist_s=2.5, fence_wait_s=0.0, fence_gpu_wait_s=0.0)
                policy.committed(record)
        return saves

    assert run(ask=True) == run(ask=False)
    assert run(ask=False)


def test_due_is_true_after_a_preemption_signal(tmp_path):
    with CheckpointManager(tmp_path, policy=EverySteps(1000)) as mgr:
        mgr.install_signal_handlers()
        assert not mgr.due(5)
        mgr._preemption.signum = signal.SIGUSR1  # what the handler records, without delivering a signal
        assert mgr.due(5)
        mgr._preemption.signum = None


# ---- the asyncio façade mirrors all of it ------------------------------------------------------------


def test_async_manager_due_tags_and_tag_in_flight(tmp_path, monkeypatch):
    monkeypatch.setitem(_phases._DELAYS, "write", 0.2)

    async def main() -> None:
        async with AsyncCheckpointManager(tmp_path, policy=EverySteps(2), keep_last=None) as mgr:
            assert not mgr.due(1)
            assert await mgr.maybe_save(1, {"w": torch.ones(4)}, tags=["x"]) is None
            assert mgr.due(2)
            handle = await mgr.maybe_save(2, {"w": torch.ones(4)}, tags=["x"])
            assert await mgr.tag(2, "best") == ["x", "best"]
            assert await mgr.untag(2, "x") == ["best"]
            path = await handle
            assert read_manifest(path).tags == ["best"]
            handle = await mgr.save(3, {"w": torch.ones(4)}, tags=["y"])
            assert read_manifest(await handle).tags == ["y"]

    asyncio.run(main())


@pytest.mark.parametrize("snapshot", ["blocking", "overlap"])
@pytest.mark.parametrize("prepared", [False, True])
def test_a_save_inside_inference_mode_leaves_later_saves_working(tmp_path, snapshot, prepared):
    state = {"w": torch.ones(8, 8), "b": torch.zeros(8)}
    with CheckpointManager(tmp_path, keep_last=None, snapshot=snapshot) as mgr:
        if prepared:
            mgr.prepare(state).result()  # the arena allocated on a helper thread, in normal mode
        with torch.inference_mode():  # a save from inside an evaluation loop
            mgr.save(1, state).wait()
        state["w"].add_(1)
        mgr.save(2, state).wait()
        state["w"] = torch.full((4, 16), 3.0)  # another layout: the arena is cleared for it
        mgr.save(3, state).wait()
    assert torch.equal(load(tmp_path, step=1)["w"], torch.ones(8, 8))
    assert torch.equal(load(tmp_path, step=2)["w"], torch.full((8, 8), 2.0))
    assert torch.equal(load(tmp_path, step=3)["w"], torch.full((4, 16), 3.0))


@pytest.mark.parametrize("snapshot", ["blocking", "overlap"])
def test_a_state_whose_tensors_change_between_saves_is_saved_as_it_was_at_each_save(tmp_path, snapshot):
    from _trees import assert_same_tree

    states = [
        {"a": torch.arange(12.0).view(3, 4), "b": torch.ones(5, dtype=torch.int8)},
        {"a": torch.arange(12.0).view(4, 3) + 1, "b": torch.ones(5, dtype=torch.int8) * 2},  # a shape, same bytes
        {"a": torch.arange(12.0).view(4, 3) + 2, "b": torch.ones(5, dtype=torch.uint8) * 3},  # a dtype
        {"a": torch.arange(12.0).view(4, 3) + 3, "b": torch.ones(5, dtype=torch.uint8) * 4},  # as before
        {"a": torch.arange(6.0) + 5},  # one fewer
        {"a": torch.arange(6.0) + 6, "b": torch.zeros(0), "c": torch.ones(2, 2).t()},  # more
    ]
    with CheckpointManager(tmp_path, keep_last=None, snapshot=snapshot) as mgr:
        for step, state in enumerate(states):
            mgr.save(step, state).wait()
    for step, state in enumerate(states):
        assert_same_tree(state, load(tmp_path, step=step), f"step {step}")


def test_metadata_nested_past_the_interpreter_s_recursion_is_a_type_error(tmp_path):
    deep: dict = {}
    cursor = deep
    for _ in range(5000):
        cursor["a"] = {}
        cursor = cursor["a"]
    with CheckpointManager(tmp_path) as mgr:
        with pytest.raises(TypeError, match="metadata is nested too deeply to be JSON"):
            mgr.save(1, {"w": torch.ones(2)}, metadata=deep)
        mgr.save(2, {"w": torch.ones(2)}).wait()  # the refused save took nothing with it
        assert mgr.steps() == [2]
