"""Helpers shared by tests that must fail on a hang rather than hang the suite."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


def run_with_timeout(fn: Callable, timeout: float = 60.0):
    """Run ``fn`` on a daemon thread; fail if it does not return in ``timeout`` (a hang); re-raise."""
    box: dict = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True, name="hang-guard")
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"{fn} did not return within {timeout} s (hang)"
    if "error" in box:
        raise box["error"]
    return box.get("value")


def wait_until(predicate: Callable[[], bool], timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not reached within {timeout} s"
        time.sleep(0.005)
