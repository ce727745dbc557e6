"""A save that fails or is interrupted on its way to the writer gives back all it took, close() and
tags meet saves in flight without losing either, and the policy's clock starts at the save's start."""

from __future__ import annotations

import errno
import signal
import sys
import threading
import warnings

import pytest
import torch

from _overlap_state import CommitGate
from _waiting import run_with_timeout, wait_until
from asyncckpt import CheckpointError, CheckpointManager, EverySeconds, EverySteps, _phases
from asyncckpt.engine import pipeline as pipeline_module
from asyncckpt.engine.admission import Admission
from asyncckpt.engine.reader import read_manifest


class FlakyPolicy(EverySteps):
    def __init__(self, error: BaseException) -> None:
        super().__init__(1)
        self.error = error

    def saved(self, step: int) -> None:
        raise self.error


@pytest.mark.parametrize("error", [RuntimeError("policy bookkeeping failed"), KeyboardInterrupt()])
def test_a_policy_that_raises_in_saved_leaves_no_save_pending(tmp_path, error):
    policy = FlakyPolicy(error)
    mgr = CheckpointManager(tmp_path, policy=policy)
    with pytest.raises(type(error)):
        mgr.maybe_save(1, {"w": torch.zeros(10)})
    assert not mgr._admission._reservations
    run_with_timeout(mgr.wait, timeout=30)  # nothing pending: returns at once
    policy.saved = lambda step: None  # type: ignore[method-assign]
    mgr.maybe_save(2, {"w": torch.ones(10)}).wait()
    assert mgr.steps() == [2]
    run_with_timeout(mgr.close, timeout=30)  # no phantom save holds it


@pytest.mark.parametrize("snapshot", ["blocking", "overlap"])
@pytest.mark.parametrize("where", ["snapshot", "submit"])
def test_an_interrupt_on_the_way_to_the_writer_gives_everything_back(tmp_path, monkeypatch, snapshot, where):
    torch.manual_seed(0)
    model = torch.nn.Linear(128, 128)
    state = {"model": model, "optimizer": torch.optim.SGD(model.parameters(), lr=0.1)}
    with CheckpointManager(tmp_path, snapshot=snapshot, max_pending=1) as mgr:
        mgr.save(1, state).wait()
        held = mgr._admission.arenas.held_bytes()
        if where == "snapshot":
            real = _phases.pause

            def pause(phase: str) -> None:
                if phase == "snapshot":
                    raise KeyboardInterrupt
                real(phase)

            monkeypatch.setattr(_phases, "pause", pause)
        else:

            def submit(job):
                raise KeyboardInterrupt

            monkeypatch.setattr(mgr._pipeline, "submit", submit)
        with pytest.raises(KeyboardInterrupt):
            mgr.save(2, state)
        monkeypatch.undo()
        assert mgr._admission.arenas.held_bytes() == held  # the arena is back in the pool
        run_with_timeout(mgr.wait, timeout=30)  # no phantom pending save
        mgr.save(3, state).wait(timeout=60)  # the slot was given back (max_pending=1)
        assert mgr.steps() == [1, 3]


def test_every_seconds_restarts_its_interval_at_the_save_start(tmp_path, monkeypatch):
    now = [0.0]
    policy = EverySeconds(10, clock=lambda: now[0])
    real = _phases.pause

    def pause(phase: str) -> None:
        if phase == "snapshot":
            now[0] += 3.0  # a snapshot that takes 3 s
        real(phase)

    monkeypatch.setattr(_phases, "pause", pause)
    with CheckpointManager(tmp_path, policy=policy) as mgr:
        assert mgr.maybe_save(0, {"w": torch.zeros(4)}) is None  # starts the clock
        now[0] = 10.0
        mgr.maybe_save(1, {"w": torch.zeros(4)}).wait()  # started at 10 s, copied at 13 s
        now[0] = 20.0
        assert mgr.due(2)  # 10 s since that save started


def test_close_while_a_save_waits_for_a_slot_refuses_it_cleanly(tmp_path, monkeypatch):
    gate = threading.Event()
    real = _phases.pause

    def pause(phase: str) -> None:
        if phase == "write":
            assert gate.wait(60)
        real(phase)

    monkeypatch.setattr(_phases, "pause", pause)
    mgr = CheckpointManager(tmp_path, max_pending=1)
    state = {"w": torch.zeros(1000)}
    first = mgr.save(1, state)  # held in the writer: the only slot is taken
    outcome: dict = {}

    def second() -> None:
        try:
            outcome["handle"] = mgr.save(2, state)
        except CheckpointError as exc:
            outcome["error"] = exc

    saver = threading.Thread(target=second)
    saver.start()
    wait_until(lambda: mgr._admission._cond._waiters, timeout=30, what="the second save waiting for a slot")  # type: ignore[attr-defined]
    closer = threading.Thread(target=mgr.close)
    closer.start()
    wait_until(lambda: mgr._admission.closed, timeout=30, what="close under way")
    gate.set()
    run_with_timeout(lambda: (saver.join(60), closer.join(60)), timeout=90)
    assert not saver.is_alive() and not closer.is_alive()
    assert first.done() and first.error() is None
    assert "handle" not in outcome
    assert str(outcome["error"]) == f"CheckpointManager({mgr.root}) is closed"
    assert [p.name for p in mgr.root.iterdir() if p.name.startswith("step-")] == ["step-000000000001"]


def test_close_while_a_save_is_snapshotting_commits_it(tmp_path, monkeypatch):
    in_snapshot, release = threading.Event(), threading.Event()
    real = _phases.pause

    def pause(phase: str) -> None:
        if phase == "snapshot" and threading.current_thread().name == "saver":
            in_snapshot.set()
            assert release.wait(60)
        real(phase)

    monkeypatch.setattr(_phases, "pause", pause)
    mgr = CheckpointManager(tmp_path)
    outcome: dict = {}

    def save() -> None:
        try:
            outcome["path"] = mgr.save(1, {"w": torch.ones(1000)}).wait(timeout=60)
        except Exception as exc:  # noqa: BLE001
            outcome["error"] = exc

    saver = threading.Thread(target=save, name="saver")
    saver.start()
    assert in_snapshot.wait(60)
    closer = threading.Thread(target=mgr.close)
    closer.start()
    wait_until(lambda: mgr._admission.closed, timeout=30, what="close under way")
    release.set()
    run_with_timeout(lambda: (saver.join(60), closer.join(60)), timeout=90)
    assert not saver.is_alive() and not closer.is_alive()
    assert outcome == {"path": mgr.root / "step-000000000001"}


def test_a_tag_given_while_a_resave_is_in_flight_survives_its_failure(tmp_path, monkeypatch):
    real_encode = pipeline_module.codec.encode
    armed = threading.Event()
    may_fail = threading.Event()

    def encode(*args, **kwargs):
        if armed.is_set():
            assert may_fail.wait(60)
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        return real_encode(*args, **kwargs)

    monkeypatch.setattr(pipeline_module.codec, "encode", encode)
    state = {"w": torch.zeros(1000)}
    with CheckpointManager(tmp_path, keep_last=2) as mgr:
        mgr.save(5, state).wait()
        armed.set()
        resave = mgr.save(5, state)  # the same step again (a rolled-back run), still in flight
        assert mgr.tag(5, "best") == ["best"]
        may_fail.set()
        with pytest.raises(CheckpointError, match="save of step 5 failed"):
            resave.wait()
        armed.clear()
        assert read_manifest(tmp_path / "step-000000000005").tags == ["best"]
        for step in (6, 7, 8):
            mgr.save(step, state).wait()
        assert mgr.steps() == [5, 7, 8]  # the tagged checkpoint is kept


def test_the_preemption_warning_names_an_other_failed_save_as_earlier(tmp_path, monkeypatch):
    first_may_fail = threading.Event()
    calls = [0]
    real = _phases.pause

    def pause(phase: str) -> None:
        if phase == "write":
            calls[0] += 1
            if calls[0] == 1:  # step 1 fails, after the final save was taken
                assert first_may_fail.wait(60)
                raise OSError(errno.EIO, "I/O error (injected)")
        if phase == "snapshot" and calls[0] >= 1:  # the final save's snapshot: let step 1 fail later
            threading.Timer(0.2, first_may_fail.set).start()
        real(phase)

    monkeypatch.setattr(_phases, "pause", pause)
    seen: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: seen.append(signum))
    try:
        with CheckpointManager(tmp_path, policy=EverySteps(100), max_pending=2) as mgr:
            mgr.install_signal_handlers((signal.SIGUSR1,))
            mgr.save(1, {"w": torch.zeros(10)})
            wait_until(lambda: calls[0] == 1, timeout=30, what="step 1 in the writer")
            signal.raise_signal(signal.SIGUSR1)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                assert mgr.maybe_save(2, {"w": torch.ones(10)}) is None
            assert mgr.steps() == [2]
    finally:
        signal.signal(signal.SIGUSR1, previous)
    messages = [str(w.message) for w in caught]
    assert seen == [signal.SIGUSR1]
    assert not [m for m in messages if "final checkpoint" in m], messages
    assert [m for m in messages if m.startswith("asyncckpt: before signal") and "save of step 1 failed" in m]


def test_a_tag_on_a_first_save_that_fails_is_dropped_with_it(tmp_path, monkeypatch):
    """Documented: with no committed checkpoint of the step, the tag lives only in the save."""
    may_fail = threading.Event()

    def encode(*args, **kwargs):
        assert may_fail.wait(60)
        raise OSError(errno.ENOSPC, "No space left on device (injected)")

    monkeypatch.setattr(pipeline_module.codec, "encode", encode)
    with CheckpointManager(tmp_path) as mgr:
        handle = mgr.save(1, {"w": torch.zeros(10)})
        assert mgr.tag(1, "best") == ["best"]
        may_fail.set()
        with pytest.raises(CheckpointError):
            handle.wait()
        assert mgr.steps() == []


def _interrupt_at(code, line: int, fired: list[int]):
    """A ``sys.settrace`` tracer that raises KeyboardInterrupt once, before ``line`` of ``code``
    runs, and records the line in ``fired``."""

    def tracer(frame, event, arg):
        if frame.f_code is not code:
            return None

        def local(f, ev, a):
            if ev == "line" and f.f_lineno == line and not fired:
                fired.append(line)
                raise KeyboardInterrupt
            return local

        return local

    return tracer


def _lines_of(*functions) -> list[tuple[object, int]]:
    return sorted(
        {(f.__code__, line) for f in functions for _, _, line in f.__code__.co_lines() if line},
        key=lambda pair: (pair[0].co_name, pair[1]),
    )


@pytest.mark.parametrize("snapshot", ["blocking", "overlap"])
def test_an_interrupt_at_any_line_of_a_save_leaks_no_slot_and_undoes_no_handed_over_job(tmp_path, snapshot):
    """A KeyboardInterrupt raised before each line of the save path in turn (sys.settrace): the
    manager never leaks a max_pending slot or counts one twice (the next save and close would
    hang), and a job the writer already took is never rolled back under it (its arena reused, its
    handle lost); later saves commit and nothing fails."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(8, 64)).sum().backward()
    opt.step()
    state = {"model": model, "optimizer": opt}
    fired_at = []
    save_path = (CheckpointManager._save, Admission.save, Admission.admit, Admission._take_and_submit)
    for index, (code, line) in enumerate(_lines_of(*save_path)):
        fired: list[int] = []
        tracer = _interrupt_at(code, line, fired)
        mgr = CheckpointManager(tmp_path / f"r{index}", snapshot=snapshot, max_pending=1, workers=1)
        mgr.save(0, state)
        sys.settrace(tracer)
        try:
            mgr.save(1, state)
        except KeyboardInterrupt:
            pass
        finally:
            sys.settrace(None)

        def finish(mgr=mgr):
            mgr.wait()
            mgr.save(2, state).wait()
            mgr.close()

        run_with_timeout(finish, timeout=60)
        assert not mgr._admission._reservations, f"line {line}: a max_pending slot leaked"
        assert 2 in mgr.steps()
        fired_at += fired
    assert len(fired_at) > 20  # the interrupt really landed all along the save path


def _resave_path() -> list[object]:
    """The functions a re-save of a step runs through while it registers as that step's newest save
    in flight (the manager's own method before the save path was split into parts)."""
    try:
        from asyncckpt.engine.tags import Tags
    except ImportError:
        return [CheckpointManager._take_and_submit]  # type: ignore[attr-defined]
    return [Admission._take_and_submit, Tags.begin]


def test_an_interrupt_at_any_line_of_a_resave_keeps_the_earlier_save_of_the_step_taggable(tmp_path, monkeypatch):
    """A re-save of a step whose first save is still in flight, interrupted before each line in
    turn: rolled back, it hands the step back to that first save, so a tag given next still reaches
    the checkpoint instead of failing with 'no save in flight'."""
    gate = CommitGate(monkeypatch)
    state = {"w": torch.arange(16.0)}
    lines = _lines_of(*_resave_path())
    for index, (code, line) in enumerate(lines):
        fired: list[int] = []
        tracer = _interrupt_at(code, line, fired)
        mgr = CheckpointManager(tmp_path / f"r{index}", max_pending=2, workers=1)
        gate.close()
        try:
            mgr.save(5, state)  # held before its manifest: in flight
            sys.settrace(tracer)
            try:
                mgr.save(5, state)
            except KeyboardInterrupt:
                pass
            finally:
                sys.settrace(None)
            assert mgr.tag(5, "keep") == ["keep"], f"line {line}"
        finally:
            gate.open()
            run_with_timeout(mgr.close, timeout=60)
        assert read_manifest(tmp_path / f"r{index}" / "step-000000000005").tags == ["keep"], f"line {line}"
