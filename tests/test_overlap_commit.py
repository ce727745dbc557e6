"""Overlap mode commits once the copy is done and nothing it copied changed, without waiting for a fence.

The lazy copy is slowed on purpose (``slow_copy``), and no optimizer step follows the save (an
evaluation, a long data wait): the checkpoint must still commit, hold the state at ``save``, and
survive a SIGKILL that comes before any fence.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import torch

import asyncckpt
from _overlap_state import CommitGate, assert_same, plain, to_cpu
from _waiting import wait_until
from asyncckpt import CheckpointManager, OverlapGuardError


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
        assert mgr._unfenced  # really no fence was passed: the commit did not wait for one
        model.train()
        model(torch.randn(16, 128)).square().mean().backward()
        state["optimizer"].step()  # the fence is still passed, and the guard has nothing to say
        mgr.wait()
    assert_same(expected, asyncckpt.load(tmp_path))


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
        wait_until(handle.done, timeout=30, what="the guard's verdict with no fence")
        with pytest.raises(OverlapGuardError, match=r"overlap guard: 1 tensor\(s\) changed in place.*0\.weight"):
            handle.wait()
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
    assert_same(expected["model"], asyncckpt.load(root)["model"])


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
    assert_same(to_cpu(expected), asyncckpt.load(tmp_path))
