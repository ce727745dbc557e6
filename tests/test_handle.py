"""SaveHandle's two sides: what a caller sees, and the internal API the writer and overlap mode use."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest
import torch

import asyncckpt
from asyncckpt import CheckpointManager, _phases
from asyncckpt.engine.handle import SaveHandle
from asyncckpt.errors import CheckpointError, OverlapGuardError, SaveFailedError
from asyncckpt.storage.local import list_checkpoints


def test_the_package_exports_the_handle_of_engine_handle():
    assert asyncckpt.SaveHandle is SaveHandle


def test_a_resolved_handle_gives_its_path_and_calls_back_once():
    handle = SaveHandle(7)
    seen: list[SaveHandle] = []
    handle.add_done_callback(seen.append)
    assert not handle.done() and repr(handle) == "SaveHandle(step=7, pending)"
    handle._resolve(Path("/ckpt/step-7"))
    assert handle.done() and handle.error() is None and seen == [handle]
    assert handle.wait(timeout=0) == Path("/ckpt/step-7")
    assert handle._outcome() == (Path("/ckpt/step-7"), None)
    assert repr(handle) == "SaveHandle(step=7, committed)"


def test_a_failure_is_known_before_the_handle_resolves_and_reported_once_waited_for():
    handle = SaveHandle(3)
    error = OverlapGuardError("save of step 3 failed: guard")
    handle._record_failure(error)  # the writer's bookkeeping sees it before waiters wake
    assert handle.error() is error and not handle.done()
    handle._fail(error)
    assert not handle.reported
    with pytest.raises(SaveFailedError, match="guard"):
        handle.wait()
    assert handle.reported and handle._outcome() == (None, error)
    assert repr(handle) == "SaveHandle(step=3, failed)"


def test_a_fence_set_on_the_handle_runs_first_within_the_timeout():
    handle = SaveHandle(1)
    calls: list[float | None] = []

    def fence(timeout: float | None = None) -> None:
        calls.append(timeout)
        handle._resolve(Path("done"))  # the fence let the copy finish, the writer committed

    handle._set_fence(fence)
    assert handle._fence() is fence
    assert handle.wait(timeout=5.0) == Path("done") and calls == [5.0]


def test_marking_a_failure_reported_keeps_it_from_being_raised_again():
    handle = SaveHandle(2)
    handle._mark_reported()
    assert handle.reported


@pytest.mark.parametrize(
    "call", ["the manager's wait", "another handle's wait", "close", "save", "maybe_save", "restore"]
)
def test_a_done_callback_that_waits_for_the_writer_is_refused_not_hung(tmp_path, monkeypatch, call):
    """Callbacks run on the writer thread: waiting there for a save in flight (or closing) made the
    writer wait for itself, and the manager hung for good."""
    monkeypatch.setitem(_phases._DELAYS, "write", 0.3)  # both saves are in flight when the first commits
    mgr = CheckpointManager(tmp_path, max_pending=2)
    errors: list[BaseException] = []
    saves: list = []
    called = threading.Event()

    def callback(handle) -> None:
        try:
            if call == "the manager's wait":
                mgr.wait()
            elif call == "another handle's wait":
                saves[1].wait()
            elif call == "save":  # with max_pending saves in flight: it would wait for a slot
                mgr.save(3, {"x": torch.ones(3)})
            elif call == "maybe_save":
                mgr.maybe_save(3, {"x": torch.ones(3)})
            elif call == "restore":  # it waits for the pending saves
                mgr.restore({"x": torch.zeros(3)})
            else:
                mgr.close()
        except CheckpointError as exc:
            errors.append(exc)
        finally:
            called.set()

    saves.append(mgr.save(1, {"x": torch.ones(3)}))
    saves[0].add_done_callback(callback)
    saves.append(mgr.save(2, {"x": torch.ones(1000)}))
    assert called.wait(60), "the callback never returned"
    closing = threading.Thread(target=mgr.close, daemon=True)
    closing.start()
    closing.join(60)
    assert not closing.is_alive(), "the manager hung"
    assert len(errors) == 1 and "done-callback, which runs on the writer thread" in str(errors[0]), errors
    assert saves[1].done() and [c.step for c in list_checkpoints(tmp_path)] == [1, 2]


def test_a_done_callback_that_exits_leaves_the_writer_running(tmp_path, caplog):
    """sys.exit() in a callback raised SystemExit on the writer thread, which ended it silently:
    every later save, wait and close waited forever."""
    mgr = CheckpointManager(tmp_path, max_pending=2)
    first = mgr.save(1, {"x": torch.ones(3)})
    first.add_done_callback(lambda handle: sys.exit("stop once it is on disk"))
    second = mgr.save(2, {"x": torch.ones(3)})
    closing = threading.Thread(target=mgr.close, daemon=True)
    closing.start()
    closing.join(60)
    assert not closing.is_alive(), "the manager hung"
    assert first.done() and second.done() and [c.step for c in list_checkpoints(tmp_path)] == [1, 2]
    assert "a done-callback of the save of step 1 raised SystemExit('stop once it is on disk')" in caplog.text


def test_a_done_callback_of_a_save_already_done_may_wait(tmp_path):
    with CheckpointManager(tmp_path) as mgr:
        handle = mgr.save(1, {"x": torch.ones(3)})
        handle.wait()
        waited: list = []
        handle.add_done_callback(lambda h: waited.append(mgr.wait()))
        assert waited == [None]
