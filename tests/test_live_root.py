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
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytest
import torch

import asyncckpt
from asyncckpt.cli.commands import main as cli_main

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


# ---- one race at a time, ordered by a hook at the seam where it happens --------------------------


def _quiet_load(root: Path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = asyncckpt.load(root)
    return out, [str(w.message) for w in caught]


def _after_first_listing(monkeypatch, action) -> None:
    """Run ``action`` once, right after a reader listed the root and before it reads anything."""
    import asyncckpt.loading as loading

    listing = loading._candidates
    done = []

    def candidates(root, step):
        out = listing(root, step)
        if not done:
            done.append(True)
            action()
        return out

    monkeypatch.setattr(loading, "_candidates", candidates)


def test_a_checkpoint_pruned_between_listing_and_reading_is_gone_and_the_newer_one_loads(tmp_path, monkeypatch):
    with asyncckpt.CheckpointManager(tmp_path, keep_last=1) as mgr:
        mgr.save(5, {"w": torch.full((1000,), 5.0)}).wait()
        # a live writer commits step 6 and its retention prunes step 5, which the reader just listed
        _after_first_listing(monkeypatch, lambda: mgr.save(6, {"w": torch.full((1000,), 6.0)}).wait())
        out, caught = _quiet_load(tmp_path)  # before: "no valid checkpoint" (step 5 "does not exist")
    assert out["w"][0].item() == 6.0 and caught == []


def test_a_step_pruned_between_listing_and_reading_falls_to_the_next_newest_without_a_warning(tmp_path, monkeypatch):
    with asyncckpt.CheckpointManager(tmp_path, keep_last=None) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, {"w": torch.full((10,), float(step))}).wait()
    _after_first_listing(monkeypatch, lambda: shutil.rmtree(tmp_path / "step-000000000003"))
    out, caught = _quiet_load(tmp_path)  # before: warned that step 3 "is damaged or cannot be read"
    assert out["w"][0].item() == 2.0 and caught == []


def test_verify_of_a_step_resaved_after_its_manifest_was_read_is_gone_then_verifies_the_new_one(
    tmp_path, monkeypatch, capsys
):
    import asyncckpt.cli.commands as cli

    with asyncckpt.CheckpointManager(tmp_path, keep_last=3) as mgr:
        mgr.save(5, {"w": torch.randn(100_000)}).wait()
        verify = cli.verify_checkpoint
        calls = []

        def resave_then_verify(path, *args, **kwargs):
            if not calls:  # between the manifest's read and the data's: the writer replaces step 5
                mgr.save(5, {"w": torch.randn(100_000)}).wait()
            calls.append(path)
            return verify(path, *args, **kwargs)

        monkeypatch.setattr(cli, "verify_checkpoint", resave_then_verify)
        status = cli_main(["verify", str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out
    assert "DAMAGED" not in out and status == 0, out  # before: DAMAGED (truncated), exit 1
    assert out.count("gone") == 1 and out.count("ok ") == 1, out
    assert len(calls) == 2


def test_load_weights_of_a_step_resaved_between_its_two_reads_loads_the_new_one(tmp_path, monkeypatch):
    import asyncckpt.loading as loading

    torch.manual_seed(0)
    model, replacement = torch.nn.Linear(300, 300), torch.nn.Linear(300, 300)
    with asyncckpt.CheckpointManager(tmp_path, keep_last=3) as mgr:
        mgr.save(4, {"model": model}).wait()
        mgr.save(5, {"model": model}).wait()
        read = loading.read_checkpoint
        calls = []

        def resave_then_read(path, *args, **kwargs):
            if not calls:  # after load_weights read step 5's manifest, before its data
                mgr.save(5, {"model": replacement}).wait()
            calls.append(path)
            return read(path, *args, **kwargs)

        monkeypatch.setattr(loading, "read_checkpoint", resave_then_read)
        target = torch.nn.Linear(300, 300)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step = asyncckpt.load_weights(tmp_path, target)
    assert [str(w.message) for w in caught] == []  # before: step 5 "damaged", fell back to step 4
    assert step == 5 and torch.equal(target.weight, replacement.weight)


def test_verify_says_nothing_was_verified_when_every_checkpoint_vanished(tmp_path, monkeypatch, capsys):
    import asyncckpt.cli.commands as cli

    with asyncckpt.CheckpointManager(tmp_path) as mgr:
        mgr.save(1, {"w": torch.ones(10)}).wait()
    read = cli.read_manifest

    def pruned_then_read(path, **kwargs):  # the writer's retention deletes it as verify reaches it
        shutil.rmtree(path)
        return read(path, **kwargs)

    monkeypatch.setattr(cli, "read_manifest", pruned_then_read)
    status = cli_main(["verify", str(tmp_path), "--no-progress"])
    captured = capsys.readouterr()
    assert "gone" in captured.out and "DAMAGED" not in captured.out
    assert status == 1 and "nothing verified" in captured.err  # before: exit 0, nothing said
