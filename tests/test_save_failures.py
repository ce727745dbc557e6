"""A failed background save: reported with its own type, and never the reason a later save is skipped."""

from __future__ import annotations

import errno
import signal
import subprocess
import sys
import time

import pytest
import torch

import asyncckpt
from _overlap_state import CommitGate
from _waiting import wait_until
from asyncckpt import CheckpointError, CheckpointManager, EverySteps, OverlapGuardError, SaveFailedError
from asyncckpt.engine import pipeline as pipeline_module


class FailingEncoder:
    """The real encoder, except that the chunks of the next ``arm()``ed save raise ENOSPC in the
    encoder thread, as a full disk would surface there."""

    def __init__(self, monkeypatch) -> None:
        self._real = pipeline_module.codec.encode
        self._armed = False
        monkeypatch.setattr(pipeline_module.codec, "encode", self)

    def arm(self) -> None:
        self._armed = True

    def disarm(self) -> None:
        self._armed = False

    def __call__(self, *args, **kwargs):
        if self._armed:
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        return self._real(*args, **kwargs)


def make_state() -> dict:
    return {"w": torch.arange(50_000, dtype=torch.float32), "step": 0}


def fail_in_background(mgr: CheckpointManager, encoder: FailingEncoder, step: int, state: dict):
    """Save ``step`` with the encoder armed; return once its failure is recorded (not yet reported)."""
    encoder.arm()
    handle = mgr.save(step, state)
    wait_until(handle.done, timeout=30, what=f"step {step}'s failure")
    encoder.disarm()
    return handle


def test_maybe_save_reports_the_old_failure_and_still_saves_the_due_step(tmp_path, monkeypatch):
    encoder = FailingEncoder(monkeypatch)
    state = make_state()
    with CheckpointManager(tmp_path, keep_last=None, policy=EverySteps(10)) as mgr:
        encoder.arm()
        for step in range(1, 11):
            handle = mgr.maybe_save(step, state)
        assert handle is not None
        wait_until(handle.done, timeout=30, what="step 10's failure")
        encoder.disarm()
        for step in range(11, 20):
            assert mgr.maybe_save(step, state) is None
        state["step"] = 20
        with pytest.raises(SaveFailedError, match=r"save of step 10 failed: OSError: .*No space left") as info:
            mgr.maybe_save(20, state)
        assert isinstance(info.value.__cause__, SaveFailedError)
        mgr.wait()  # step 20's own save was made, and commits: nothing more to report
        assert mgr.steps() == [20]
        for step in range(21, 31):
            mgr.maybe_save(step, state)
    assert mgr.steps() == [20, 30]
    assert asyncckpt.load(tmp_path, step=20)["step"] == 20


def test_save_is_attempted_after_an_unreported_failure(tmp_path, monkeypatch):
    encoder = FailingEncoder(monkeypatch)
    state = make_state()
    with CheckpointManager(tmp_path, keep_last=None) as mgr:
        fail_in_background(mgr, encoder, 1, state)
        with pytest.raises(SaveFailedError, match="save of step 1 failed"):
            mgr.save(2, state)
        mgr.wait()  # the failure was reported once; step 2 committed
        assert mgr.steps() == [2]


def test_failure_types_from_wait_close_and_the_handle(tmp_path, monkeypatch):
    encoder = FailingEncoder(monkeypatch)
    state = make_state()
    mgr = CheckpointManager(tmp_path)
    handle = fail_in_background(mgr, encoder, 3, state)
    with pytest.raises(SaveFailedError, match="save of step 3 failed") as from_handle:
        handle.wait()
    assert not isinstance(from_handle.value, OverlapGuardError)
    assert isinstance(from_handle.value.__cause__, OSError)
    mgr.wait()  # seen through the handle: not raised again
    fail_in_background(mgr, encoder, 4, state)
    with pytest.raises(SaveFailedError, match="save of step 4 failed"):
        mgr.wait()
    fail_in_background(mgr, encoder, 5, state)
    with pytest.raises(SaveFailedError, match="save of step 5 failed"):
        mgr.close()
    assert issubclass(SaveFailedError, CheckpointError)


def test_an_overlap_guard_rejection_is_an_overlap_guard_error(tmp_path, slow_copy, monkeypatch):
    model = torch.nn.Linear(256, 256)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gate = CommitGate(monkeypatch)
    with CheckpointManager(tmp_path, snapshot="overlap") as mgr:
        gate.close()  # the update comes before the writer checks, however slow this thread is
        handle = mgr.save(1, {"model": model, "optimizer": opt})
        with torch.no_grad():
            model.weight.mul_(2.0)  # in place, outside the optimizer step, while the copy sleeps
        gate.open()
        with pytest.raises(OverlapGuardError, match=r"save of step 1 failed: .*overlap guard"):
            handle.wait()
        gate.close()
        handle = mgr.save(2, {"model": model, "optimizer": opt})
        with torch.no_grad():
            model.weight.mul_(2.0)
        gate.open()

        def evaluating() -> bool:
            with torch.no_grad():
                model(torch.randn(4, 256))  # a settle point: the training thread's verdict
            return handle.done()

        wait_until(evaluating, timeout=30, what="step 2's rejection")
        with pytest.raises(OverlapGuardError, match="save of step 2 failed"):
            mgr.wait()


SIGNAL_PRELUDE = """
import asyncio, errno, sys, time, torch, asyncckpt
from asyncckpt.engine import pipeline
root, log_path = sys.argv[1], sys.argv[2]
real = pipeline.codec.encode
armed = [True]

def encode(*args, **kwargs):
    if armed[0]:
        raise OSError(errno.EIO, "Input/output error (injected)")
    return real(*args, **kwargs)

pipeline.codec.encode = encode
state = {"w": torch.zeros(100_000), "step": 0}
"""

SIGNAL_CHILD = (
    SIGNAL_PRELUDE
    + """
mgr = asyncckpt.CheckpointManager(root, policy=asyncckpt.EverySteps(10_000))
mgr.install_signal_handlers()
failed = mgr.save(0, state)  # fails in the background; nobody waits for it
while not failed.done():
    time.sleep(0.01)
armed[0] = False
log = open(log_path, "w")
for step in range(1, 100_000):
    state["w"] += 1
    state["step"] = step
    print(step, file=log, flush=True)
    time.sleep(0.01)
    mgr.maybe_save(step, state)
"""
)

ASYNC_SIGNAL_CHILD = (
    SIGNAL_PRELUDE
    + """
async def main():
    mgr = asyncckpt.AsyncCheckpointManager(root, policy=asyncckpt.EverySteps(10_000))
    mgr.install_signal_handlers()
    failed = await mgr.save(0, state)
    while not failed.done():
        await asyncio.sleep(0.01)
    armed[0] = False
    log = open(log_path, "w")
    for step in range(1, 100_000):
        state["w"] += 1
        state["step"] = step
        print(step, file=log, flush=True)
        await asyncio.sleep(0.01)
        await mgr.maybe_save(step, state)

asyncio.run(main())
"""
)


@pytest.mark.parametrize(
    "source", [SIGNAL_CHILD, ASYNC_SIGNAL_CHILD], ids=["CheckpointManager", "AsyncCheckpointManager"]
)
def test_the_preemption_checkpoint_is_taken_after_an_unreported_failure(tmp_path, source):
    script = tmp_path / "child.py"
    script.write_text(source)
    log = tmp_path / "log"
    child = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "root"), str(log)], stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 60
        while not (log.exists() and len(log.read_text().split()) >= 10):
            assert time.monotonic() < deadline and child.poll() is None, "the child never started its loop"
            time.sleep(0.02)
        child.send_signal(signal.SIGTERM)
        _, stderr = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == -signal.SIGTERM
    last_step = int(log.read_text().split()[-1])
    assert [c.step for c in asyncckpt.storage.local.list_checkpoints(tmp_path / "root")] == [last_step]
    assert asyncckpt.load(tmp_path / "root")["step"] == last_step
    assert "save of step 0 failed" in stderr  # the earlier failure was still reported (a warning)
