"""install_signal_handlers: a final checkpoint on preemption, then the signal acts as it would have."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import asyncckpt

# Each child starts with SIGINT's default handler: a process started with SIGINT ignored (a
# background job of a non-interactive shell, as the suite itself may be) keeps ignoring it, and
# the signal then "acts as it would have" by doing nothing (test_an_ignored_signal_...).
CHILD = """
import signal, sys, time, torch, asyncckpt
signal.signal(signal.SIGINT, getattr(signal, sys.argv[3]) if len(sys.argv) > 3 else signal.default_int_handler)
root, log_path = sys.argv[1], sys.argv[2]
state = {"w": torch.zeros(100_000), "step": 0}
mgr = asyncckpt.CheckpointManager(root, policy=asyncckpt.EverySteps(10_000))
mgr.install_signal_handlers()
log = open(log_path, "w")
try:
    for step in range(1, 100_000):
        state["w"] += 1
        state["step"] = step
        print(step, file=log, flush=True)
        time.sleep(0.01)
        mgr.maybe_save(step, state)
except KeyboardInterrupt:
    print("interrupted", file=log, flush=True)
    mgr.close()
    sys.exit(3)
"""


ASYNC_CHILD = """
import asyncio, signal, sys, torch, asyncckpt
signal.signal(signal.SIGINT, getattr(signal, sys.argv[3]) if len(sys.argv) > 3 else signal.default_int_handler)
root, log_path = sys.argv[1], sys.argv[2]

async def main():
    state = {"w": torch.zeros(100_000), "step": 0}
    async with asyncckpt.AsyncCheckpointManager(root, policy=asyncckpt.EverySteps(10_000)) as mgr:
        mgr.install_signal_handlers()
        log = open(log_path, "w")
        for step in range(1, 100_000):
            state["w"] += 1
            state["step"] = step
            print(step, file=log, flush=True)
            await asyncio.sleep(0.01)
            await mgr.maybe_save(step, state)

try:
    asyncio.run(main())
except KeyboardInterrupt:
    print("interrupted", file=open(log_path, "a"), flush=True)
    sys.exit(3)
"""


def run_and_signal(tmp_path, signum: int, child_source: str = CHILD) -> tuple[int, list[str]]:
    script = tmp_path / "child.py"
    script.write_text(child_source)
    log = tmp_path / "log"
    child = subprocess.Popen([sys.executable, str(script), str(tmp_path / "root"), str(log)])
    try:
        wait_for_lines(child, log, 20)
        child.send_signal(signum)
        returncode = child.wait(timeout=60)
    finally:
        child.kill()
    return returncode, log.read_text().split()


def wait_for_lines(child: subprocess.Popen, log, count: int) -> None:
    deadline = time.monotonic() + 60
    while not (log.exists() and len(log.read_text().split()) >= count):
        assert child.poll() is None, f"the child exited ({child.returncode}) after {count} steps or fewer"
        assert time.monotonic() < deadline, f"the child logged fewer than {count} steps in 60 s"
        time.sleep(0.02)


@pytest.mark.parametrize(
    ("signum", "expected_returncode"),
    [(signal.SIGTERM, -signal.SIGTERM), (signal.SIGUSR1, -signal.SIGUSR1), (signal.SIGINT, 3)],
    ids=["SIGTERM", "SIGUSR1", "SIGINT"],
)
@pytest.mark.parametrize("child", [CHILD, ASYNC_CHILD], ids=["CheckpointManager", "AsyncCheckpointManager"])
def test_signal_takes_a_final_checkpoint_then_acts(tmp_path, signum, expected_returncode, child):
    returncode, lines = run_and_signal(tmp_path, signum, child)
    assert returncode == expected_returncode
    if signum == signal.SIGINT:
        assert lines[-1] == "interrupted"
        lines = lines[:-1]
    last_step = int(lines[-1])
    steps = [c.step for c in asyncckpt.storage.local.list_checkpoints(tmp_path / "root")]
    assert steps == [last_step]  # the policy never saved; the signal's save is the step it came at
    tree = asyncckpt.load(tmp_path / "root")
    assert tree["step"] == last_step
    assert torch.equal(tree["w"], torch.full((100_000,), float(last_step)))


@pytest.mark.parametrize("child_source", [CHILD, ASYNC_CHILD], ids=["CheckpointManager", "AsyncCheckpointManager"])
def test_an_ignored_signal_gets_its_final_checkpoint_and_stays_ignored(tmp_path, child_source):
    """SIGINT ignored when the process started (a background job of a script): the handler still
    takes the final checkpoint, then the signal acts as it would have: not at all."""
    script, log = tmp_path / "child.py", tmp_path / "log"
    script.write_text(child_source)
    child = subprocess.Popen([sys.executable, str(script), str(tmp_path / "root"), str(log), "SIG_IGN"])
    try:
        wait_for_lines(child, log, 20)
        child.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 60
        while not list((tmp_path / "root").glob("step-*/manifest.json")):
            assert child.poll() is None and time.monotonic() < deadline, "no final checkpoint"
            time.sleep(0.02)
        saved = asyncckpt.load(tmp_path / "root")["step"]
        wait_for_lines(child, log, saved + 20)  # training goes on past the checkpoint
        assert child.poll() is None
    finally:
        child.kill()
        child.wait()
    steps = [c.step for c in asyncckpt.storage.local.list_checkpoints(tmp_path / "root")]
    assert steps == [saved]  # one final checkpoint, and the policy's none


def test_handlers_are_put_back_on_close(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    with asyncckpt.CheckpointManager(tmp_path) as mgr:
        mgr.install_signal_handlers()
        assert signal.getsignal(signal.SIGTERM) != before
    assert signal.getsignal(signal.SIGTERM) == before


@pytest.mark.parametrize("order", ["a, b", "b, a"])
def test_handlers_are_put_back_whatever_order_two_managers_close_in(tmp_path, order):
    """Two managers catch SIGTERM, the second over the first: closed in either order, the handler
    found before both is back, never a closed manager's (which would swallow the signal)."""
    before = signal.getsignal(signal.SIGTERM)
    a, b = asyncckpt.CheckpointManager(tmp_path / "a"), asyncckpt.CheckpointManager(tmp_path / "b")
    a.install_signal_handlers()
    b.install_signal_handlers()
    first, second = (a, b) if order == "a, b" else (b, a)
    first.close()
    assert signal.getsignal(signal.SIGTERM) == second._preemption._on_signal  # the open one's
    second.close()
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_manager_installing_again_over_another_leaves_no_closed_handler_behind(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    a, b = asyncckpt.CheckpointManager(tmp_path / "a"), asyncckpt.CheckpointManager(tmp_path / "b")
    a.install_signal_handlers()
    b.install_signal_handlers()
    a.install_signal_handlers()  # on top again
    a.close()
    assert signal.getsignal(signal.SIGTERM) == b._preemption._on_signal
    b.close()
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_handler_of_the_program_installed_between_two_managers_is_kept(tmp_path):
    before = signal.getsignal(signal.SIGTERM)

    def program(signum, frame):  # pragma: no cover - never called
        pass

    a, b = asyncckpt.CheckpointManager(tmp_path / "a"), asyncckpt.CheckpointManager(tmp_path / "b")
    try:
        a.install_signal_handlers()
        signal.signal(signal.SIGTERM, program)
        b.install_signal_handlers()
        a.close()
        b.close()
        assert signal.getsignal(signal.SIGTERM) is program
    finally:
        signal.signal(signal.SIGTERM, before)


def test_asyncio_run_s_sigint_handler_is_not_left_behind_by_a_close_at_its_shutdown(tmp_path) -> None:
    async def main() -> None:
        mgr = asyncckpt.AsyncCheckpointManager(tmp_path)
        mgr.install_signal_handlers((signal.SIGINT,))  # found: asyncio.run's own SIGINT handler

        async def hold() -> None:
            async with mgr:  # closed when asyncio.run cancels this task on its way out
                await asyncio.sleep(3600)

        asyncio.get_running_loop().create_task(hold())
        await asyncio.sleep(0)

    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # asyncio.run takes SIGINT only then
    try:
        asyncio.run(main())
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)


LATE_CHILD = """
import asyncio, os, signal, sys, threading, time, torch, asyncckpt
root, log_path, case = sys.argv[1], sys.argv[2], sys.argv[3]
log = open(log_path, "w")
say = lambda line: print(line, file=log, flush=True)
state = {"w": torch.zeros(1000)}
if case == "async, after the last maybe_save":
    async def main():
        mgr = asyncckpt.AsyncCheckpointManager(root, policy=asyncckpt.EverySteps(2))
        mgr.install_signal_handlers()
        for step in (1, 2):
            await mgr.maybe_save(step, state)
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.sleep(0.2)
        say("signalled")
        await mgr.close()
        say("closed")
    asyncio.run(main())
    sys.exit(0)
mgr = asyncckpt.CheckpointManager(root, policy=asyncckpt.EverySteps(2))
mgr.install_signal_handlers()
for step in (1, 2):
    mgr.maybe_save(step, state)
if case == "after the last maybe_save":
    os.kill(os.getpid(), signal.SIGTERM)
    say("signalled")
    mgr.close()
elif case == "closed off the main thread":
    closing = threading.Thread(target=mgr.close)
    closing.start()
    closing.join()
    say("closed")
    os.kill(os.getpid(), signal.SIGTERM)
elif case == "final save fails":
    os.kill(os.getpid(), signal.SIGTERM)
    mgr.maybe_save(3, {"w": torch.zeros(4), "seen": {1, 2}})  # a set: save raises TypeError
elif case == "second signal during the final save":
    big = {"w": torch.zeros(30_000_000)}
    os.kill(os.getpid(), signal.SIGINT)
    threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGINT)).start()
    began = time.monotonic()
    try:
        mgr.maybe_save(3, big)
    except KeyboardInterrupt:
        say(f"interrupted {time.monotonic() - began:.2f}")
    try:
        assert mgr.maybe_save(5, big) is None  # no stale signal: not due, and nothing raised
        say("no stale signal")
    except KeyboardInterrupt:
        say("stale signal")
    mgr.close()
    sys.exit(0)
time.sleep(0.5)
say("still running")
"""


@pytest.mark.parametrize(
    "case",
    [
        "after the last maybe_save",
        "async, after the last maybe_save",
        "closed off the main thread",
        "final save fails",
        "second signal during the final save",
    ],
)
def test_a_signal_no_maybe_save_took_is_never_swallowed(tmp_path, case):
    """A signal that came after the last maybe_save acts when the manager closes, a closed
    manager's handlers never keep one, a final save that fails says why before the signal acts,
    and a second signal during the final save acts at once, leaving none behind (each used to be
    swallowed, or ended the process without a word)."""
    script, log = tmp_path / "child.py", tmp_path / "log"
    script.write_text(LATE_CHILD)
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "root"), str(log), case],
        capture_output=True,
        text=True,
        timeout=120,
        # the final save's write lasts a second: the second signal, 0.1 s after the first, comes
        # during it however fast the machine (else it may come after, in close)
        env={**os.environ, "ASYNCCKPT_PHASE_DELAY": "write=1"}
        if case == "second signal during the final save"
        else None,
    )
    lines = log.read_text().splitlines()
    if case == "second signal during the final save":
        assert done.returncode == 0, done.stderr
        assert lines[0].startswith("interrupted") and float(lines[0].split()[1]) < 5.0, lines
        assert lines[1:] == ["no stale signal"], lines
        return
    assert done.returncode == -signal.SIGTERM, (done.returncode, lines, done.stderr)
    assert "still running" not in lines and "closed" not in lines[1:], lines
    if case == "final save fails":
        assert "the final checkpoint before signal 15 failed: TypeError: state['seen']" in done.stderr, done.stderr
    assert [c.step for c in asyncckpt.storage.local.list_checkpoints(tmp_path / "root")] == [2]


def test_a_closed_manager_installs_no_handlers(tmp_path):
    mgr = asyncckpt.CheckpointManager(tmp_path)
    mgr.close()
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(asyncckpt.CheckpointError, match="is closed"):
        mgr.install_signal_handlers()
    assert signal.getsignal(signal.SIGTERM) == before
