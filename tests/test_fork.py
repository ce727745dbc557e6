"""fork(): a forked child never unlocks, closes or hangs on its parent's manager, and cannot use it.

Each story runs in a fresh interpreter (a forked copy of pytest would go on running tests), with a
real ``os.fork()`` or a multiprocessing "fork" worker (what a DataLoader worker is).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from _waiting import run_with_timeout
from asyncckpt import CheckpointManager, RootInUseError

PRELUDE = """
import os, sys, time, torch
from asyncckpt import CheckpointError, CheckpointManager
root = sys.argv[1]
state = {"w": torch.arange(1000, dtype=torch.float32)}
"""


def open_paths(pid: int) -> list[str]:
    """What a live process's descriptors point at; a descriptor it closes while we look is skipped.

    A freshly exec'd program still opens and closes files (the loader's libraries), so a number
    listed a moment ago may be gone; an inherited descriptor stays open and is always seen.
    """
    paths = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            paths.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:
            continue
    return paths


def spawn(tmp_path, body: str, env: dict | None = None) -> subprocess.Popen:
    script = tmp_path / "story.py"
    script.write_text(PRELUDE + textwrap.dedent(body))
    return subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "ckpts")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, **(env or {})),
    )


def read_line(proc: subprocess.Popen) -> str:
    line = run_with_timeout(proc.stdout.readline, timeout=120)
    if not line:
        proc.wait(timeout=60)
        raise AssertionError(f"the story ended early ({proc.returncode}): {proc.stderr.read()}")
    return line.strip()


def finish(proc: subprocess.Popen) -> str:
    out, err = run_with_timeout(lambda: proc.communicate("go\n"), timeout=120)
    assert proc.returncode == 0, err
    return out


def assert_refused_by(root, pid: int) -> None:
    with pytest.raises(RootInUseError, match=f"pid {pid}"):
        CheckpointManager(root)


CHILD_EXITS_NORMALLY = """
mgr = CheckpointManager(root)
mgr.save(1, state).wait()
pid = os.fork()
if pid == 0:
    sys.exit(0)  # the interpreter's normal exit: its at-exit hooks run in the child
os.waitpid(pid, 0)
print("child-exited", flush=True)
sys.stdin.readline()
mgr.save(2, state).wait()
mgr.close()
print("steps", sorted(int(p[5:]) for p in os.listdir(root) if p.startswith("step-")), flush=True)
"""


def test_a_child_that_exits_normally_leaves_the_parent_holding_the_lock(tmp_path):
    proc = spawn(tmp_path, CHILD_EXITS_NORMALLY)
    try:
        assert read_line(proc) == "child-exited"
        assert_refused_by(tmp_path / "ckpts", proc.pid)
        assert "steps [1, 2]" in finish(proc)  # and the parent's manager still works
    finally:
        proc.kill()


MULTIPROCESSING_WORKER = """
import multiprocessing

def work():
    return None

mgr = CheckpointManager(root)
worker = multiprocessing.get_context("fork").Process(target=work)  # a DataLoader worker is one
worker.start()
worker.join()
print("worker-exited", worker.exitcode, flush=True)
sys.stdin.readline()
mgr.save(3, state).wait()
mgr.close()
"""


def test_a_multiprocessing_fork_worker_leaves_the_parent_holding_the_lock(tmp_path):
    proc = spawn(tmp_path, MULTIPROCESSING_WORKER)
    try:
        assert read_line(proc) == "worker-exited 0"
        assert_refused_by(tmp_path / "ckpts", proc.pid)
        finish(proc)
        assert (tmp_path / "ckpts" / "step-000000000003").is_dir()
    finally:
        proc.kill()


# A save held in flight (its first write waits for ``gate``), then a fork.
GATED_SAVE_THEN_FORK = """
import threading
from asyncckpt.storage.local import DataFileWriter

gate = threading.Event()  # the save's first write waits for it: in flight until the child is gone
real_append = DataFileWriter.append
DataFileWriter.append = lambda self, data: gate.wait() and real_append(self, data)
mgr = CheckpointManager(root)
handle = mgr.save(5, state)
pid = os.fork()
"""

FORK_DURING_A_SAVE = (
    GATED_SAVE_THEN_FORK
    + """
if pid == 0:
    sys.exit(0)
deadline = time.monotonic() + 60  # hang detection only
while time.monotonic() < deadline:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        break
    time.sleep(0.05)
else:
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    print("child-hung", flush=True)
    sys.exit(0)
print("child-exited", os.waitstatus_to_exitcode(status), "save-done-then", handle.done(), flush=True)
gate.set()
print("committed", handle.wait().name, flush=True)
mgr.close()
"""
)


def test_a_child_forked_during_a_save_exits_and_the_save_commits(tmp_path):
    proc = spawn(tmp_path, FORK_DURING_A_SAVE)
    try:
        # the child's exit does not wait for the parent's save, which is held until the child is gone
        assert read_line(proc) == "child-exited 0 save-done-then False"
        assert read_line(proc) == "committed step-000000000005"
        finish(proc)
    finally:
        proc.kill()


CHILD_WAITS_FOR_A_SAVE_IN_FLIGHT = (
    GATED_SAVE_THEN_FORK
    + """
if pid == 0:
    import signal
    signal.alarm(60)  # hang detection only: the child dies of SIGALRM if wait() blocks
    try:
        handle.wait()
        outcome = "no error"
    except CheckpointError as exc:
        outcome = str(exc)
    with open(sys.argv[1] + "-child.txt", "w") as out:
        out.write(outcome)
    os._exit(0)
_, status = os.waitpid(pid, 0)
print("child-exit", os.waitstatus_to_exitcode(status), flush=True)
gate.set()
print("committed", handle.wait().name, flush=True)
mgr.close()
"""
)


def test_waiting_in_a_forked_child_for_the_parents_save_is_a_clear_error(tmp_path):
    proc = spawn(tmp_path, CHILD_WAITS_FOR_A_SAVE_IN_FLIGHT)
    try:
        assert read_line(proc) == "child-exit 0"
        outcome = (tmp_path / "ckpts-child.txt").read_text()
        assert outcome.startswith(f"this save handle belongs to pid {proc.pid}; a forked child cannot wait for it"), (
            outcome
        )
        assert read_line(proc) == "committed step-000000000005"
        finish(proc)
    finally:
        proc.kill()


CHILD_OUTLIVES_PARENT = """
mgr = CheckpointManager(root)
mgr.save(1, state).wait()
pid = os.fork()
if pid == 0:
    time.sleep(600)  # a helper that outlives the trainer
    os._exit(0)
print("child", pid, flush=True)
sys.stdin.readline()
"""


def test_the_lock_dies_with_its_holder_even_while_a_forked_child_lives(tmp_path):
    proc = spawn(tmp_path, CHILD_OUTLIVES_PARENT)
    child = None
    try:
        child = int(read_line(proc).split()[1])
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        os.kill(child, 0)  # still alive, and without a descriptor of the lock file
        lock = str(tmp_path / "ckpts" / ".lock")
        assert lock not in open_paths(child)
        with CheckpointManager(tmp_path / "ckpts") as mgr:  # the dead trainer's lock is gone
            assert mgr.steps() == [1]
            mgr.save(2, {"w": torch.ones(3)}).wait()
    finally:
        proc.kill()
        if child is not None:
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass


CHILD_USES_THE_MANAGER = """
mgr = CheckpointManager(root)
mgr.save(1, state).wait()
pid = os.fork()
if pid == 0:
    with open(sys.argv[1] + "-child.txt", "w") as out:
        for name, call in [
            ("save", lambda: mgr.save(2, state)),
            ("maybe_save", lambda: mgr.maybe_save(3000, state)),
            ("wait", mgr.wait),
            ("restore", lambda: mgr.restore(state)),
            ("steps", mgr.steps),
            ("tag", lambda: mgr.tag(1, "best")),
            ("prepare", lambda: mgr.prepare(state)),
            ("install_signal_handlers", mgr.install_signal_handlers),
        ]:
            try:
                call()
                out.write(f"{name}: no error\\n")
            except CheckpointError as exc:
                out.write(f"{name}: {exc}\\n")
        mgr.close()  # inert: neither unlocks nor raises
        out.write("closed\\n")
    sys.exit(0)
os.waitpid(pid, 0)
print("child-exited", flush=True)
sys.stdin.readline()
mgr.save(4, state).wait()
mgr.close()
"""


def test_any_use_of_the_parents_manager_in_a_forked_child_is_a_clear_error(tmp_path):
    proc = spawn(tmp_path, CHILD_USES_THE_MANAGER)
    try:
        assert read_line(proc) == "child-exited"
        lines = (tmp_path / "ckpts-child.txt").read_text().splitlines()
        assert [line.split(":")[0] for line in lines] == [
            "save",
            "maybe_save",
            "wait",
            "restore",
            "steps",
            "tag",
            "prepare",
            "install_signal_handlers",
            "closed",
        ]
        for line in lines[:-1]:
            assert f"this CheckpointManager belongs to pid {proc.pid}; a forked child cannot use it" in line, line
        assert_refused_by(tmp_path / "ckpts", proc.pid)
        finish(proc)
        assert sorted(os.listdir(tmp_path / "ckpts")) == [
            ".lock",
            "asyncckpt-metrics.jsonl",
            "step-000000000001",
            "step-000000000004",
        ]
    finally:
        proc.kill()


SIGTERM_IN_A_CHILD = """
import shutil
import signal
mgr = CheckpointManager(root)
mgr.install_signal_handlers()
ready_r, ready_w = os.pipe()
pid = os.fork()
if pid == 0:
    os.write(ready_w, b"x")  # a signal that lands while the child is still being set up is lost
    time.sleep(60)  # SIGTERM must end it long before
    os._exit(0)
os.read(ready_r, 1)
os.kill(pid, signal.SIGTERM)
_, status = os.waitpid(pid, 0)
print("child-signalled", os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM, flush=True)
mgr.close()
"""


def test_the_parents_signal_handlers_do_not_keep_a_forked_child_alive(tmp_path):
    """A worker is ended with SIGTERM: the parent's preemption handler must not swallow it there."""
    proc = spawn(tmp_path, SIGTERM_IN_A_CHILD)
    try:
        assert read_line(proc) == "child-signalled True"
        finish(proc)
    finally:
        proc.kill()


def test_a_second_manager_in_the_same_process_is_refused_and_the_first_keeps_its_lock(tmp_path):
    """The same process is told so, and the refusal leaves the first manager's lock alone."""
    root = tmp_path / "ckpts"
    with CheckpointManager(root) as mgr:
        with pytest.raises(RootInUseError, match="already open in this process by another CheckpointManager"):
            CheckpointManager(root)
        with pytest.raises(RootInUseError):
            CheckpointManager(tmp_path / "." / "ckpts")  # another spelling of the same directory
        proc = spawn(tmp_path, "CheckpointManager(root)\n")
        out, err = run_with_timeout(proc.communicate, timeout=120)
        assert proc.returncode == 1 and f"RootInUseError: checkpoint root {root} is in use" in err, err
        mgr.save(1, {"w": torch.ones(3)}).wait()


def test_reading_the_root_in_the_writers_own_process_keeps_the_lock(tmp_path):
    """A backup of the root taken by the training process opens and closes ``.lock``: the lock holds."""
    root = tmp_path / "ckpts"
    with CheckpointManager(root) as mgr:
        mgr.save(1, {"w": torch.ones(3)}).wait()
        shutil.copytree(root, tmp_path / "backup")
        with open(root / ".lock", "rb") as lock:
            lock.read()
        proc = spawn(tmp_path, "CheckpointManager(root)\n")
        out, err = run_with_timeout(proc.communicate, timeout=120)
        assert proc.returncode == 1 and f"RootInUseError: checkpoint root {root} is in use" in err, err
        mgr.save(2, {"w": torch.ones(3)}).wait()


def test_the_lock_is_not_inherited_by_an_executed_subprocess(tmp_path):
    """A helper started with subprocess (fork + exec) holds no descriptor of the lock file."""
    root = tmp_path / "ckpts"
    with CheckpointManager(root):
        helper = subprocess.Popen(["sleep", "60"], close_fds=False)
        try:
            lock = str(root / ".lock")
            # look once the exec is done: between fork and exec the child still holds descriptors
            # (subprocess's error pipe) that the exec closes
            deadline = time.monotonic() + 10
            while Path(f"/proc/{helper.pid}/cmdline").read_bytes().split(b"\0")[0] != b"sleep":
                assert time.monotonic() < deadline, "the helper never exec'd"
                time.sleep(0.01)
            assert lock not in open_paths(helper.pid)
        finally:
            helper.kill()
            helper.wait()
