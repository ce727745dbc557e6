"""Run a child process until it says it reached a point, then SIGKILL it there (crash tests)."""

from __future__ import annotations

import multiprocessing.process
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable

import pytest

from _dist import rank_context


def start_code(args: list[str], env: dict | None = None) -> tuple[multiprocessing.process.BaseProcess, str]:
    """Start ``python -c <args...>`` and return the process and the file its stdout and stderr go to
    (the caller deletes it).

    The child is forked from the fork server that starts the multi-rank tests' ranks, which has
    torch imported (asyncckpt is not: it reads some variables at import), so it starts in a
    fraction of a second instead of 2-3 s; it runs the code as ``python -c`` would, with the test's
    environment plus ``env``. It ends like a ``multiprocessing`` child: an exception's traceback
    goes to the file, and the interpreter's exit handlers do not run (use it for code that is
    killed, or that ends by itself after its ``with`` blocks)."""
    code, *argv = args
    fd, output = tempfile.mkstemp(prefix="child-", suffix=".log")
    os.close(fd)
    environ = {**os.environ, **(env or {})}
    child = rank_context().Process(target=_run_code, args=(code, argv, environ, output), name="child")
    child.start()
    return child, output


def kill_when(args: list[str], reached: Callable[[], bool], what: str, env: dict | None = None) -> None:
    """Run ``python -c <args...>`` (see ``start_code``) and SIGKILL it as soon as ``reached()`` is
    true (checked every 10 ms, for at most 120 s). A child that exits first fails the test with its
    output."""
    child, output = start_code(args, env)
    try:
        deadline = time.monotonic() + 120
        while not reached():
            if child.exitcode is not None:
                with open(output, errors="replace") as f:
                    pytest.fail(f"the saver exited ({child.exitcode}) before {what}: {f.read()}")
            assert time.monotonic() < deadline, f"the saver never reached {what}"
            time.sleep(0.01)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        if child.exitcode is None:
            child.kill()
        child.join(60)
        os.unlink(output)


def _run_code(code: str, argv: list[str], environ: dict, log: str) -> None:
    """In the child: the environment, stdout and stderr to ``log``, ``sys.argv``, then the code as
    ``__main__``."""
    os.environ.clear()
    os.environ.update(environ)
    out = os.open(log, os.O_WRONLY | os.O_APPEND)
    os.dup2(out, 1)
    os.dup2(out, 2)
    sys.argv = ["-c", *argv]
    exec(compile(code, "<string>", "exec"), {"__name__": "__main__"})
