"""SaveHandle's two sides: what a caller sees, and the internal API the writer and overlap mode use."""

from __future__ import annotations

from pathlib import Path

import pytest

import asyncckpt
from asyncckpt.engine.handle import SaveHandle
from asyncckpt.errors import OverlapGuardError, SaveFailedError


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
