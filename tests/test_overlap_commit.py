"""Overlap mode commits at the training thread's first fence or settle point after the copy is done.

A settle point is a forward of a saved module: an evaluation after ``save`` (forward passes, no
optimizer step) commits the checkpoint, which holds the state at ``save`` and survives a SIGKILL
that comes before any fence. The verdict is the training thread's: an in-place op still running
there when the copy ends has not moved its version counter yet, so the writer never judges alone.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

import asyncckpt
from _overlap_state import CommitGate, plain, to_cpu
from _trees import assert_same_tree
from _waiting import wait_until
from asyncckpt import CheckpointManager, OverlapGuardError, _phases


def make_state() -> dict:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.BatchNorm1d(128), torch.nn.Linear(128, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(16, 128)).square().mean().backward()
    opt.step()
    opt.zero_grad()
    return {"model": model, "optimizer": opt}


def test_commits_during_an_evaluation_with_no_optimizer_step(tmp_path, slow_copy):
    state = make_state()
    with CheckpointManager(tmp_path, snapshot="overlap") as mgr:
        expected = plain(state)
        handle = mgr.save(1, state)
        assert not handle.done()  # the copy thread is still asleep
        model = state["model"]
        model.eval()
        with torch.no_grad():

            def evaluating() -> bool:
                model(torch.randn(16, 128))  # reads the parameters, never steps
                return handle.done()

            wait_until(evaluating, timeout=30, what="the commit with no optimizer step after save")
        assert handle.error() is None and mgr.steps() == [1]
        model.train()
        model(torch.randn(16, 128)).square().mean().backward()
        state["optimizer"].step()  # the fence is still passed, and the guard has nothing to say
        mgr.wait()
    assert_same_tree(expected, asyncckpt.load(tmp_path))


def test_guard_still_rejects_an_update_before_the_copy_finished_without_a_fence(tmp_path, slow_copy, monkeypatch):
    state = make_state()
    weight = state["model"][0].weight
    gate = CommitGate(monkeypatch)
    with CheckpointManager(tmp_path, snapshot="overlap") as mgr:
        gate.close()  # the update comes before the writer checks, however slow this thread is
        handle = mgr.save(1, state)
        with torch.no_grad():
            weight.mul_(2.0)  # in place, outside the optimizer, while the copy sleeps
        gate.open()
        with torch.no_grad():

            def evaluating() -> bool:
                state["model"](torch.randn(16, 128))  # settle points: the verdict, with no fence
                return handle.done()

            wait_until(evaluating, timeout=30, what="the guard's verdict with no fence")
        with pytest.raises(OverlapGuardError, match=r"overlap guard: 1 tensor\(s\) changed in place.*0\.weight"):
            handle.wait()
        assert mgr.steps() == []
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


class PhaseEvents:
    """Events set (or waited for) as the save enters its phases, so a test orders training's moves
    against the copy and the writer without timing."""

    def __init__(self, monkeypatch) -> None:
        self.copy_may_start = threading.Event()
        self.copied = threading.Event()  # an encoder started: the copy is complete
        self.at_verdict = threading.Event()  # the writer reached its commit decision
        real = _phases.pause

        def pause(phase: str) -> None:
            if phase == "lazy_copy":
                assert self.copy_may_start.wait(60), "the copy was never let start"
            elif phase == "compress":
                self.copied.set()
            elif phase in ("verdict", "rename"):
                self.at_verdict.set()
            real(phase)

        monkeypatch.setattr(_phases, "pause", pause)


def test_commit_waits_for_a_training_thread_point_while_training_only_sleeps(tmp_path, monkeypatch):
    state = make_state()
    phases = PhaseEvents(monkeypatch)
    with CheckpointManager(tmp_path, snapshot="overlap") as mgr:
        expected = plain(state)
        handle = mgr.save(1, state)
        phases.copy_may_start.set()
        assert phases.at_verdict.wait(60)  # copied, encoded, written: only the verdict is missing
        time.sleep(0.3)  # a data wait: no forward, no optimizer step
        assert not handle.done() and mgr.steps() == []
        state["model"].eval()
        with torch.no_grad():
            state["model"](torch.randn(16, 128))  # the first settle point after the copy
        assert handle.wait(timeout=60) == tmp_path / "step-000000000001"
    assert_same_tree(expected, asyncckpt.load(tmp_path))


def test_a_forward_on_another_thread_gives_no_verdict(tmp_path, monkeypatch):
    state = make_state()
    phases = PhaseEvents(monkeypatch)
    with CheckpointManager(tmp_path, snapshot="overlap") as mgr:
        handle = mgr.save(1, state)
        phases.copy_may_start.set()
        assert phases.at_verdict.wait(60)
        with torch.no_grad():
            other = threading.Thread(target=lambda: state["model"](torch.randn(16, 128)))
            other.start()
            other.join()
        time.sleep(0.3)
        assert not handle.done()  # that thread's forward says nothing about the training thread's ops
        with torch.no_grad():
            state["model"](torch.randn(16, 128))
        handle.wait(timeout=60)
        assert mgr.steps() == [1]


def test_an_in_place_op_still_running_when_the_copy_ends_is_refused(tmp_path, monkeypatch):
    """A long in-place op outside the optimizer (``index_add_`` over millions of rows, under no_grad)
    writes part of a tensor before its copy reads it and part after; its version counter moves only
    when it returns, after the copy. Read then on the writer, the counters showed nothing and a
    checkpoint matching neither step was committed; the training thread's verdict sees the op."""
    torch.manual_seed(0)
    emb = torch.nn.Embedding(1024, 64)  # 256 KB: copied lazily
    opt = torch.optim.SGD(emb.parameters(), lr=0.1)
    state = {"model": emb, "optimizer": opt}
    weight, half = emb.weight, 512
    phases = PhaseEvents(monkeypatch)
    with CheckpointManager(tmp_path, snapshot="overlap") as mgr:
        handle = mgr.save(1, state)
        # The op, written through .data (which has no version counter of its own) so that its
        # counter moves only at its end, as an ATen in-place kernel's does.
        weight.data[:half] += 1.0  # before the copy reads these rows
        phases.copy_may_start.set()
        assert phases.copied.wait(60)
        weight.data[half:] += 1.0  # after the copy read these
        assert phases.at_verdict.wait(60)  # the writer is at its commit decision, the op still running
        torch.autograd.graph.increment_version(weight)  # the op returns
        with torch.no_grad():
            emb(torch.tensor([0, 1]))  # an evaluation: the settle point judges
        with pytest.raises(OverlapGuardError, match=r"1 tensor\(s\) changed in place.*\['weight'\]"):
            handle.wait(timeout=60)
        assert mgr.steps() == []
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


CHILD = """
import sys, time, torch, asyncckpt
root, expected_path, log_path = sys.argv[1], sys.argv[2], sys.argv[3]
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 4))
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
model(torch.randn(16, 256)).square().mean().backward()
opt.step()
opt.zero_grad()
state = {"model": model, "optimizer": opt}
mgr = asyncckpt.CheckpointManager(root, snapshot="overlap")
torch.save({"model": model.state_dict()}, expected_path)
handle = mgr.save(1, state)
log = open(log_path, "w")
print("saved", handle.done(), file=log, flush=True)
model.eval()
with torch.no_grad():
    while True:  # a long evaluation: forwards, never an optimizer step
        model(torch.randn(16, 256))
        time.sleep(0.01)
"""


def test_sigkill_during_a_long_evaluation_after_an_overlap_save_keeps_the_checkpoint(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    root, log = tmp_path / "root", tmp_path / "log"
    env = {**__import__("os").environ, "ASYNCCKPT_PHASE_DELAY": "lazy_copy=0.5"}
    child = subprocess.Popen([sys.executable, str(script), str(root), str(tmp_path / "expected.pt"), str(log)], env=env)
    try:
        deadline = time.monotonic() + 60
        while not (root / "step-000000000001").exists():
            assert time.monotonic() < deadline and child.poll() is None, "no commit without an optimizer step"
            time.sleep(0.01)
        assert log.read_text().split() == ["saved", "False"]  # save returned before the copy ended
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        child.kill()
    with CheckpointManager(root) as mgr:
        assert mgr.steps() == [1]
    expected = torch.load(tmp_path / "expected.pt")
    assert_same_tree(expected["model"], asyncckpt.load(root)["model"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_commits_during_an_evaluation_with_no_optimizer_step_on_cuda(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048) for _ in range(4)]).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(64, 2048, device="cuda")).square().mean().backward()
    opt.step()
    opt.zero_grad()
    state = {"model": model, "optimizer": opt}
    with CheckpointManager(tmp_path, snapshot="overlap") as mgr:
        torch.cuda.synchronize()
        expected = plain(state)
        handle = mgr.save(1, state)
        with torch.no_grad():

            def evaluating() -> bool:
                model(torch.randn(64, 2048, device="cuda"))
                return handle.done()

            wait_until(evaluating, timeout=60, what="the commit with no optimizer step after save")
        assert handle.error() is None and mgr.steps() == [1]
    assert_same_tree(to_cpu(expected), asyncckpt.load(tmp_path))


def test_under_the_asyncio_facade_a_forward_on_the_loop_thread_is_a_settle_point(tmp_path, monkeypatch):
    import asyncio

    from asyncckpt import AsyncCheckpointManager

    state = make_state()
    phases = PhaseEvents(monkeypatch)

    async def main() -> None:
        mgr = AsyncCheckpointManager(tmp_path, snapshot="overlap")
        handle = await mgr.save(1, state)  # taken on an executor thread, for the loop's thread
        phases.copy_may_start.set()
        assert await asyncio.to_thread(phases.at_verdict.wait, 60)
        assert not handle.done()
        with torch.no_grad():
            state["model"](torch.randn(16, 128))  # on the loop's thread: the training thread
        wait_until(handle.done, timeout=60, what="the commit after a forward on the loop's thread")
        assert handle.error() is None
        await mgr.close()

    asyncio.run(main())
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("step-")] == ["step-000000000001"]
