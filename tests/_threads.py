"""Thread-count probes shared by tests that must leave torch's process-wide settings alone."""

from __future__ import annotations

import threading

import torch


def torch_threads_in_a_new_thread() -> int:
    """torch's thread count as a thread created now starts with (what torch.set_num_threads in any
    thread would move for every thread created later)."""
    seen: list[int] = []
    thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    return seen[0]
