"""Readers of a live root: a checkpoint the writer's retention deletes mid-read is gone, not damaged.

A real writer process saves continuously with ``keep_last=1`` (every commit deletes the previous
checkpoint) while this process runs ``asyncckpt verify ROOT`` and ``asyncckpt.load(ROOT)`` over and
over. Any DAMAGED line, non-zero exit, exception or damage warning is a false alarm: every
checkpoint the writer commits is healthy. ``bench/live_verify.py`` runs the same for longer.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytest

import asyncckpt
from asyncckpt.cli import main as cli_main

WRITER = r"""
import sys, torch, asyncckpt
from pathlib import Path
root, stop = Path(sys.argv[1]), Path(sys.argv[2])
torch.manual_seed(0)
state = {"w": torch.randn(64, 1024), "b": torch.randn(4096).bfloat16(), "i": torch.arange(3000), "step": 0}
with asyncckpt.CheckpointManager(root, keep_last=1, chunk_size=16384, workers=1) as mgr:
    step = 0
    while not stop.exists():
        step += 1
        state["step"] = step
        mgr.save(step, state).wait()
print(step)
"""


@contextlib.contextmanager
def live_writer(root: Path):
    stop = root.parent / "stop"
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(root), str(stop)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 60
        while not any(root.glob("step-*")):
            assert writer.poll() is None, writer.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "the writer never committed"
            time.sleep(0.01)
        yield writer
    finally:
        stop.touch()
        try:
            out, err = writer.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            writer.kill()
            out, err = writer.communicate()
    assert writer.returncode == 0, err[-2000:]
    writer.saves = int(out.split()[-1])  # type: ignore[attr-defined]


def read_live_root(root: Path, rounds: int) -> dict:
    """``rounds`` x (verify ROOT, load ROOT); counts of what each saw."""
    counts = {"verify": 0, "load": 0, "false_alarms": 0, "gone_rows": 0, "verified": 0}
    alarms = []
    for _ in range(rounds):
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            status = cli_main(["verify", str(root), "--no-progress"])
        text = out.getvalue()
        counts["verify"] += 1
        counts["gone_rows"] += text.count("gone ")
        counts["verified"] += text.count("ok ")
        if status != 0 or "DAMAGED" in text:
            alarms.append(f"verify exit {status}: {text[-500:]}")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                loaded = asyncckpt.load(root)
                assert loaded["step"] >= 1 and tuple(loaded["w"].shape) == (64, 1024)
            except Exception as exc:  # noqa: BLE001 - every failure here is a false alarm
                alarms.append(f"load: {type(exc).__name__}: {exc}")
        counts["load"] += 1
        alarms += [f"load warned: {w.message}" for w in caught]
    counts["false_alarms"] = len(alarms)
    counts["examples"] = alarms[:3]
    return counts


@pytest.fixture
def fast_dir(tmp_path):
    """A directory on tmpfs where there is one: fsync costs nothing there, so the writer commits
    (and prunes) many times per verify and the race is run often."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    with tempfile.TemporaryDirectory(dir=shm, prefix="asyncckpt-live-") as path:
        yield Path(path)


def test_verify_and_load_on_a_root_pruned_by_a_live_writer_raise_no_false_alarm(fast_dir):
    root = fast_dir / "root"
    with live_writer(root) as writer:
        counts = read_live_root(root, rounds=200)
    assert counts["false_alarms"] == 0, counts
    assert counts["verified"] > 0 and writer.saves > 10, counts  # the race was really run


@pytest.mark.slow
def test_live_root_over_two_thousand_runs(fast_dir):
    root = fast_dir / "root"
    with live_writer(root):
        counts = read_live_root(root, rounds=2000)
    assert counts["false_alarms"] == 0, counts
