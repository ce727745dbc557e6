"""Run a child process until it says it reached a point, then SIGKILL it there (crash tests)."""

from __future__ import annotations

import contextlib
import multiprocessing.connection
import multiprocessing.process
import os
import tempfile
import time
from collections.abc import Callable

import pytest

from _dist import _code_main, rank_context


class CodeChild:
    """A running ``python -c`` child (see ``start_code``): ``process``, ``output()`` (its stdout and
    stderr so far) and ``close()`` (or ``with``), which kills it if it still runs, reaps it and
    deletes its output file."""

    def __init__(self, args: list[str], env: dict | None) -> None:
        code, *argv = args
        environ = {**os.environ, **(env or {})}
        fd, self._output = tempfile.mkstemp(prefix="child-", suffix=".log")
        os.close(fd)
        self._lifeline: multiprocessing.connection.Connection | None = None
        self.process: multiprocessing.process.BaseProcess | None = None
        try:
            ctx = rank_context()
            lifeline, self._lifeline = ctx.Pipe(duplex=False)
            try:
                self.process = ctx.Process(target=_code_main, args=(code, argv, environ, self._output, lifeline))
                self.process.start()
            finally:
                lifeline.close()
        except BaseException:
            self.close()
            raise

    def output(self) -> str:
        with open(self._output, errors="replace") as f:
            return f.read()

    def close(self) -> None:
        if self.process is not None and self.process.pid is not None:
            if self.process.exitcode is None:  # reads the status the fork server reports once it reaped it
                self.process.kill()
            self.process.join(60)
        if self._lifeline is not None:
            self._lifeline.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._output)

    def __enter__(self) -> CodeChild:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_code(args: list[str], env: dict | None = None) -> CodeChild:
    """Start ``python -c <args...>``.

    The child is forked from the fork server that starts the multi-rank tests' ranks, which has
    torch imported (with one BLAS/OpenMP thread; asyncckpt is not imported there: it reads some
    variables at import), so it starts in a fraction of a second instead of 2-3 s. It runs the code
    with the test's environment plus ``env`` and exits if the test process dies. It ends like a
    ``multiprocessing`` child: an exception's traceback goes to its output, and the interpreter's
    exit handlers do not run (use it for code that is killed, or that ends after its ``with``
    blocks)."""
    return CodeChild(args, env)


def kill_when(args: list[str], reached: Callable[[], bool], what: str, env: dict | None = None) -> None:
    """Run ``python -c <args...>`` (see ``start_code``) and SIGKILL it as soon as ``reached()`` is
    true (checked every 10 ms, for at most 120 s). A child that exits first fails the test with its
    output."""
    with start_code(args, env) as child:
        deadline = time.monotonic() + 120
        while not reached():
            if child.process.exitcode is not None:
                pytest.fail(f"the saver exited ({child.process.exitcode}) before {what}: {child.output()}")
            assert time.monotonic() < deadline, f"the saver never reached {what}: {child.output()}"
            time.sleep(0.01)
