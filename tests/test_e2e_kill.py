"""Crash safety end to end: SIGKILL a saving process at random instants, then check the root.

Also the ``asyncckpt`` command line (verify, ls, demo), run as a real subprocess.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import asyncckpt
from _kill import start_code
from asyncckpt import CheckpointError, CheckpointManager

NUMEL = 2_500_000  # float32: 10 MB of state per checkpoint

SAVER = r"""
import hashlib, os, sys
import torch
import asyncckpt

root, log_path, numel, mode, compression = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]

def content(it):
    return torch.randn(numel, generator=torch.Generator().manual_seed(it))

x = torch.zeros(numel)
state = {"x": x, "iter": 0}
mgr = asyncckpt.CheckpointManager(root, keep_last=3, compression=None if compression == "none" else compression)
mgr.restore(state)  # resume after the previous kill, as a training job would
it = state["iter"]
log = open(log_path, "a")
print("ready", it, flush=True)
while True:
    it += 1
    x.copy_(content(it))
    state["iter"] = it
    step = 1 if mode == "replace" else it
    mgr.save(step, state, metrics={"iter": it}).wait()
    log.write(f"{it} {hashlib.sha256(x.numpy().tobytes()).hexdigest()}\n")
    log.flush()
    os.fsync(log.fileno())
"""


def content(it: int) -> torch.Tensor:
    return torch.randn(NUMEL, generator=torch.Generator().manual_seed(it))


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def recorded(log: Path) -> dict[int, str]:
    """Complete lines of the saver's log (a kill may cut the last line short)."""
    if not log.exists():
        return {}
    out = {}
    for line in log.read_text().splitlines(keepends=True):
        if line.endswith("\n"):
            it, sha = line.split()
            out[int(it)] = sha
    return out


def _whole_lines(text: str) -> list[str]:
    return text.rpartition("\n")[0].splitlines()


def run_and_kill(script: Path, root: Path, log: Path, mode: str, compression: str, delay: float) -> int:
    """Start the saver, SIGKILL it ``delay`` s after it is ready; return the iter it resumed from."""
    with start_code([script.read_text(), str(root), str(log), str(NUMEL), mode, compression]) as saver:
        deadline = time.monotonic() + 120
        while not (ready := [x for x in _whole_lines(saver.output()) if x.startswith("ready ")]):
            assert saver.process.exitcode is None, f"saver failed to start ({saver.process.exitcode}): {saver.output()}"
            assert time.monotonic() < deadline, f"the saver never became ready: {saver.output()}"
            time.sleep(0.01)
        time.sleep(delay)
        assert saver.process.exitcode is None, f"saver died by itself: {saver.output()}"
        saver.process.kill()
        saver.process.join(60)
        assert saver.process.exitcode == -signal.SIGKILL, saver.output()
        return int(ready[0].split()[1])


def check_root_after_kill(root: Path, log: Path, mode: str, started: int, where: str) -> int:
    """Every committed checkpoint loads and holds exactly what was saved; returns the newest iter.

    ``started`` is the iter the killed run resumed from (0 on an empty root).
    """
    records = recorded(log)
    with CheckpointManager(root) as mgr:  # sweeps what the dead writer left
        leftovers = [p.name for p in root.iterdir() if p.name.startswith((".tmp-", ".replaced-"))]
        assert leftovers == [], f"{where}: {leftovers}"
        steps = mgr.steps()
        if mode == "replace":
            assert steps in ([], [1]), f"{where}: {steps}"
        newest = 0
        for step in steps:
            tree = asyncckpt.load(root / f"step-{step:012d}")
            it = tree["iter"]
            assert mode == "replace" or it == step, f"{where}: step {step} holds iter {it}"
            sha = digest(tree["x"])
            assert sha == digest(content(it)), f"{where}: step {step} does not hold the content of iter {it}"
            if it in records:
                assert sha == records[it], f"{where}: iter {it} differs from the recorded hash"
            newest = max(newest, it)

        # everything recorded was committed and survives; at most one newer save committed unrecorded
        floor = max([started, *records])
        assert newest in (floor, floor + 1), f"{where}: newest iter {newest}, recorded/resumed up to {floor}"

        live = {"x": torch.zeros(NUMEL), "iter": -1}
        restored = mgr.restore(live)
        if newest == 0:
            assert restored is None and steps == [], where
        else:
            assert restored == (1 if mode == "replace" else newest), where
            assert live["iter"] == newest
            assert digest(live["x"]) == digest(content(newest)), where
    return newest


@pytest.mark.parametrize(("mode", "trials"), [("steps", 6), ("replace", 3)])
def test_sigkill_at_random_points_never_damages_committed_checkpoints(tmp_path, mode, trials):
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    script = tmp_path / "saver.py"
    script.write_text(SAVER)
    root, log = tmp_path / "ckpts", tmp_path / "saved.log"
    newest = 0
    progress = []
    for trial in range(trials):
        delay = rng.uniform(0.05, 1.5)
        compression = rng.choice(["zstd", "none"])
        where = f"seed {seed}, trial {trial}, kill after {delay:.3f} s, compression {compression}, mode {mode}"
        started = run_and_kill(script, root, log, mode, compression, delay)
        assert started == newest, f"{where}: resumed from iter {started}, the newest committed was {newest}"
        newest = check_root_after_kill(root, log, mode, started, where)
        progress.append(newest)
    assert newest > 0, f"seed {seed}: no checkpoint ever committed {progress}"


# ---- the command line ------------------------------------------------------------------------


def cli(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "asyncckpt.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def two_checkpoints(tmp_path) -> Path:
    root = tmp_path / "ckpts"
    with CheckpointManager(root, keep_last=None) as mgr:
        for step in (10, 20):
            mgr.save(step, {"w": content(step)[:300_000], "step": step}, metrics={"loss": step / 100})
    return root


def test_cli_verify_good_and_damaged(tmp_path, two_checkpoints):
    root = two_checkpoints
    good = cli("verify", str(root), cwd=tmp_path)
    assert good.returncode == 0, good.stdout + good.stderr
    assert good.stdout.count("ok") >= 2

    data = root / "step-000000000020" / "data-00000.bin"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 3] ^= 0x40
    data.write_bytes(bytes(raw))
    bad = cli("verify", str(root), cwd=tmp_path)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "step-000000000020" in bad.stdout and "DAMAGED" in bad.stdout
    assert "checksum" in bad.stdout.lower()
    with pytest.raises(CheckpointError, match="checksum"):
        asyncckpt.load(root, step=20)

    missing = cli("verify", str(tmp_path / "nowhere"), cwd=tmp_path)
    assert missing.returncode != 0


def test_cli_ls_json(tmp_path, two_checkpoints):
    result = cli("ls", str(two_checkpoints), "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [row["step"] for row in rows] == [10, 20]
    assert [row["metrics"] for row in rows] == [{"loss": 0.1}, {"loss": 0.2}]
    assert all(row["manifest"] == "ok" and row["raw_bytes"] >= 1_200_000 for row in rows)


def test_cli_demo(tmp_path):
    root = tmp_path / "demo"
    result = cli("demo", "--seconds", "3", "--width", "128", "--depth", "2", "--root", str(root), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "bit-exact" in result.stdout
    assert "MISMATCH" not in result.stdout
    assert any(p.name.startswith("step-") for p in (root / "asyncckpt").iterdir())


def test_cli_demo_overlap(tmp_path):
    root = tmp_path / "demo"
    argv = ("demo", "--seconds", "3", "--width", "128", "--depth", "2", "--snapshot", "overlap", "--root", str(root))
    result = cli(*argv, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "asyncckpt (overlap snapshot)" in result.stdout and "bit-exact" in result.stdout
    assert "fence wait at the next optimizer step" in result.stdout
