"""fork() under the asyncio façade: a forked child neither steals the parent's signals nor hangs on
the parent's calls, and any use of the parent's façade there is a clear error.

Each story runs in a fresh interpreter (a forked copy of pytest would go on running tests), with a
real multiprocessing "fork" worker or ``os.fork()``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from _waiting import run_with_timeout

PRELUDE = """
import asyncio, os, signal, sys, threading, time, torch
from asyncckpt import CheckpointError
from asyncckpt.aio import AsyncCheckpointManager
root = sys.argv[1]
state = {"w": torch.arange(1000, dtype=torch.float32)}
"""


def run_story(tmp_path, body: str) -> tuple[int, str, str]:
    script = tmp_path / "story.py"
    script.write_text(PRELUDE + textwrap.dedent(body))
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "ckpts")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = run_with_timeout(proc.communicate, timeout=180)
    finally:
        proc.kill()
    return proc.returncode, out, err


SIGTERM_TO_A_WORKER = """
import multiprocessing

def worker(ready):
    os.write(ready, b"x")
    time.sleep(30)  # a DataLoader-like worker, told to stop with SIGTERM long before

async def main():
    am = await AsyncCheckpointManager.open(root)
    am.install_signal_handlers()
    ready_r, ready_w = os.pipe()
    p = multiprocessing.get_context("fork").Process(target=worker, args=(ready_w,))
    p.start()
    os.read(ready_r, 1)
    p.terminate()  # SIGTERM to the child only
    await asyncio.get_running_loop().run_in_executor(None, p.join, 60)
    for _ in range(10):  # let the loop read its signal socket, had the child written to it
        await asyncio.sleep(0)
    print("child-exitcode", p.exitcode, flush=True)
    await am.maybe_save(1, state)  # not due: a stolen SIGTERM would make this a final save and exit
    print("parent-alive preempted", am._preempted, flush=True)
    await am.close()

asyncio.run(main())
"""


def test_sigterm_to_a_forked_worker_ends_the_worker_not_the_parent(tmp_path):
    code, out, err = run_story(tmp_path, SIGTERM_TO_A_WORKER)
    assert code == 0, (code, out, err)
    assert out.splitlines() == ["child-exitcode -15", "parent-alive preempted None"], (out, err)
    assert not (tmp_path / "ckpts" / "step-000000000001").exists()


# SIGINT's default handler first (a story started with SIGINT ignored would keep it so), so that
# asyncio.run takes SIGINT: the worker must not inherit asyncio.run's handler, which would only
# cancel the worker's copy of a task that never runs there
SIGINT_TO_A_WORKER = "signal.signal(signal.SIGINT, signal.default_int_handler)\n" + SIGTERM_TO_A_WORKER.replace(
    "p.terminate()  # SIGTERM to the child only", "os.kill(p.pid, signal.SIGINT)  # to the child only"
)


def test_sigint_to_a_forked_worker_interrupts_the_worker_not_the_parent(tmp_path):
    code, out, err = run_story(tmp_path, SIGINT_TO_A_WORKER)
    assert code == 0, (code, out, err)
    # KeyboardInterrupt in the worker: multiprocessing's exit code 1 for an exception
    assert out.splitlines() == ["child-exitcode 1", "parent-alive preempted None"], (out, err)
    assert "KeyboardInterrupt" in err
    assert not (tmp_path / "ckpts" / "step-000000000001").exists()


FORK_DURING_A_CALL = """
gate = threading.Event()

async def child_uses(am, handle):
    lines = []
    calls = [
        ("prepare", lambda: am.prepare(state)),
        ("save", lambda: am.save(2, state)),
        ("maybe_save", lambda: am.maybe_save(3000, state)),
        ("wait", am.wait),
        ("restore", lambda: am.restore(state)),
        ("steps", am.steps),
        ("handle", lambda: handle._wait()),
    ]
    for name, call in calls:
        try:
            await asyncio.wait_for(call(), 60)  # a guard: a hang is a failure, not a stuck suite
            lines.append(f"{name}: no error")
        except CheckpointError as exc:
            lines.append(f"{name}: {exc}")
        except asyncio.TimeoutError:
            lines.append(f"{name}: hung")
    try:
        am.install_signal_handlers()
        lines.append("install_signal_handlers: no error")
    except CheckpointError as exc:
        lines.append(f"install_signal_handlers: {exc}")
    for name, call in [("close", am.close), ("async-with", lambda: am.__aexit__(None, None, None))]:
        try:
            await asyncio.wait_for(call(), 60)
            lines.append(f"{name}: returned")
        except asyncio.TimeoutError:
            lines.append(f"{name}: hung")
    return lines

async def main():
    am = await AsyncCheckpointManager.open(root)
    am.install_signal_handlers()
    first = await am.save(1, state)
    await first
    real_save = am.manager.save
    am.manager.save = lambda *a, **k: gate.wait() and real_save(*a, **k)  # the call stays in flight
    in_flight = asyncio.ensure_future(am.save(2, state))
    while not am._calls.locked():
        await asyncio.sleep(0.01)
    pid = os.fork()
    if pid == 0:
        signal.alarm(300)  # the last guard
        lines = asyncio.run(child_uses(am, first))
        with open(root + "-child.txt", "w") as out:
            out.write("\\n".join(lines) + "\\n")
        os._exit(0)
    _, status = await asyncio.get_running_loop().run_in_executor(None, os.waitpid, pid, 0)
    print("child-exit", os.waitstatus_to_exitcode(status), flush=True)
    gate.set()
    print("committed", (await (await in_flight)).name, flush=True)
    await am.close()

asyncio.run(main())
"""


def test_a_child_forked_during_a_call_cannot_use_the_facade_and_never_hangs(tmp_path):
    code, out, err = run_story(tmp_path, FORK_DURING_A_CALL)
    assert code == 0, (code, out, err)
    assert out.splitlines() == ["child-exit 0", "committed step-000000000002"], (out, err)
    lines = (tmp_path / "ckpts-child.txt").read_text().splitlines()
    names = [line.split(":")[0] for line in lines]
    assert names == [
        "prepare",
        "save",
        "maybe_save",
        "wait",
        "restore",
        "steps",
        "handle",
        "install_signal_handlers",
        "close",
        "async-with",
    ], lines
    parent = None
    for line in lines[:-2]:
        assert "belongs to pid" in line and "a forked child cannot" in line, line
        parent = parent or line.split("belongs to pid ")[1].split(";")[0]
    assert lines[-2:] == ["close: returned", "async-with: returned"]
    assert sorted(p for p in os.listdir(tmp_path / "ckpts") if p.startswith("step-")) == [
        "step-000000000001",
        "step-000000000002",
    ]
