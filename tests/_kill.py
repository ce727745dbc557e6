"""Run a child process until it says it reached a point, then SIGKILL it there (crash tests)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import pytest


def kill_when(args: list[str], reached: Callable[[], bool], what: str, env: dict | None = None) -> None:
    """Run ``python -c <args...>`` and SIGKILL it as soon as ``reached()`` is true (checked every
    10 ms, for at most 120 s). A child that exits first fails the test with its output."""
    child = subprocess.Popen(
        [sys.executable, "-c", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=None if env is None else {**os.environ, **env},
    )
    try:
        deadline = time.monotonic() + 120
        while not reached():
            if child.poll() is not None:
                pytest.fail(f"the saver exited ({child.returncode}) before {what}: {child.stdout.read().decode()}")
            assert time.monotonic() < deadline, f"the saver never reached {what}"
            time.sleep(0.01)
        child.send_signal(signal.SIGKILL)
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
        child.stdout.close()
