"""SIGKILL of a process saving to an ``s3://`` root, at several points of the upload and commit, then
a new manager on the same URL (against the real server, ``weed mini`` on 127.0.0.1).

Each saver commits steps 1 and 2, then is held (test seam: ``asyncckpt._phases.pause``) inside one
phase of its next save and killed there. What must hold afterwards: readers never see a partial
step; older steps are intact and bit-exact; the dead writer's lease makes a new manager say who
holds the root until it expires, then the new manager takes over and its sweep removes every object
no committed manifest names. The six savers run side by side (each forked from the tests' fork
server, see ``_kill.start_code``; all killed at once) so the whole costs one lease expiry.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch

import asyncckpt
from _cli import cli
from _kill import CodeChild, start_code
from _s3bucket import named_by_newest_manifest, objects
from asyncckpt import CheckpointManager, RootInUseError
from asyncckpt.format import step_dir_name
from asyncckpt.storage.catalog import Catalog
from asyncckpt.storage.objectstore import LEASE_NAME
from conftest import fresh_s3_url

NUMEL = 2 << 20  # float32: 8 MiB a checkpoint, in 1 MiB chunks, so a 5 MiB part is sent mid-save
LEASE_SECONDS = 5.0

SAVER = r"""
import sys, time
from collections import Counter
import torch
import asyncckpt
from asyncckpt import _phases

url, phase, nth, mark = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
numel, lease = int(sys.argv[5]), float(sys.argv[6])

def content(seed):
    return torch.randn(numel, generator=torch.Generator().manual_seed(seed))

options = {"lease_seconds": lease, "part_size": 5 << 20}
mgr = asyncckpt.CheckpointManager(url, keep_last=2, compression="zstd", chunk_size=1 << 20, storage_options=options)
for step in (1, 2):
    mgr.save(step, {"x": content(step), "step": step}).wait()

seen = Counter()
real = _phases.pause

def pause(name):
    seen[name] += 1
    if name == phase and seen[name] == nth:
        with open(mark + ".tmp", "w") as f:
            f.write(name)
        import os
        os.replace(mark + ".tmp", mark)
        time.sleep(3600)
    real(name)

_phases.pause = pause
target = 2 if phase == "replace" else 3  # replace: step 2 saved again
mgr.save(target, {"x": content(100 + target), "step": target})
time.sleep(3600)
"""

# phase -> (which entry into it holds the saver, the steps a reader sees after the kill, the seed of
# each step's content). "write" 7: six 1 MiB chunks appended, one 5 MiB part uploaded, the upload not
# complete. "manifest": every data object complete, no manifest. "replace": step 2's new version is
# committed, the old one not yet removed. "retention": step 3 committed, step 1 not yet deleted.
PHASES = {
    "compress": (1, {1: 1, 2: 2}),
    "write": (7, {1: 1, 2: 2}),
    "fsync": (1, {1: 1, 2: 2}),
    "manifest": (1, {1: 1, 2: 2}),
    "replace": (1, {1: 1, 2: 102}),
    "retention": (1, {1: 1, 2: 2, 3: 103}),
}


def content(seed: int) -> torch.Tensor:
    return torch.randn(NUMEL, generator=torch.Generator().manual_seed(seed))


def swept(server, url: str) -> list[str]:
    """Objects under the root that the newest manifest of their step does not name (the lease aside):
    what a dead writer left, or a superseded version."""
    stored = set(objects(server, url)) - {LEASE_NAME}
    kept: set[str] = set()
    for step_dir in {name.split("/")[0] for name in stored if "/" in name}:
        kept |= named_by_newest_manifest(server, url, step_dir)
    return sorted(stored - kept)


def open_after_the_lease(url: str) -> CheckpointManager:
    """A new manager on ``url``, once the dead writer's lease has expired (a bounded wait). Its own
    lease is as short: the backend takes an expired lease over only ``lease_seconds / 4`` (its own)
    past the recorded expiry, 15 s with the default 60 s lease."""
    deadline = time.monotonic() + 20 * LEASE_SECONDS
    while True:
        try:
            return CheckpointManager(url, keep_last=2, storage_options={"lease_seconds": LEASE_SECONDS})
        except RootInUseError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.25)


def test_sigkill_during_upload_and_commit_leaves_no_partial_step_and_the_next_manager_sweeps(
    s3_server, s3_env, tmp_path, capsys
):
    runs: dict[str, tuple[str, Path, CodeChild]] = {}
    with contextlib.ExitStack() as children:  # each killed if still running, and reaped
        for phase, (nth, _) in PHASES.items():
            url, mark = fresh_s3_url(), tmp_path / f"{phase}.mark"
            args = [SAVER, url, phase, str(nth), str(mark), str(NUMEL), str(LEASE_SECONDS)]
            runs[phase] = (url, mark, children.enter_context(start_code(args, s3_server.env)))
        deadline = time.monotonic() + 180
        for phase, (_, mark, child) in runs.items():
            while not mark.exists():
                assert child.process.exitcode is None, f"{phase}: the saver died by itself: {child.output()}"
                assert time.monotonic() < deadline, f"{phase}: the saver never reached the phase"
                time.sleep(0.05)
        for _, _, child in runs.values():
            os.kill(child.process.pid, signal.SIGKILL)
        for phase, (_, _, child) in runs.items():
            child.process.join(60)
            assert child.process.exitcode == -signal.SIGKILL, phase
    pids = {phase: child.process.pid for phase, (_, _, child) in runs.items()}

    # At once, while the dead writers' leases stand: a new manager is refused, naming the holder.
    for phase, (url, _, _) in runs.items():
        with pytest.raises(RootInUseError, match=rf"pid {pids[phase]}\b") as refused:
            CheckpointManager(url)
        assert LEASE_NAME in str(refused.value), phase

    # Readers see exactly the committed steps, bit-exact, before any sweep.
    for phase, (url, _, _) in runs.items():
        expected = PHASES[phase][1]
        newest = max(expected)
        assert Catalog.of_reader(url).steps() == sorted(expected), phase
        code, out, err = cli(capsys, "ls", url, "--json")
        assert code == 0, f"{phase}: {out}{err}"
        assert [row["step"] for row in json.loads(out)] == sorted(expected), phase
        tree = asyncckpt.load(url)
        assert tree["step"] == newest, phase
        assert torch.equal(tree["x"], content(expected[newest])), phase
    # what the dead writers left, where the phase had made it an object
    assert swept(s3_server, runs["manifest"][0]) != []  # step 3's complete data objects
    assert swept(s3_server, runs["replace"][0]) != []  # step 2's superseded version

    for phase, (url, _, _) in runs.items():
        expected = PHASES[phase][1]
        with open_after_the_lease(url) as mgr:
            assert swept(s3_server, url) == [], f"{phase}: the sweep left objects of the dead writer"
            assert mgr.steps() == sorted(expected), phase
            for step, seed in expected.items():
                live = {"x": torch.zeros(NUMEL), "step": -1}
                assert mgr.restore(live, step=step) == step, phase
                assert live["step"] == step and torch.equal(live["x"], content(seed)), f"{phase}: step {step}"
            mgr.save(4, {"x": content(4), "step": 4}).wait()  # the root is usable: commit and retention
            assert mgr.steps() == [max(expected), 4], phase
        assert sorted({n.split("/")[0] for n in objects(s3_server, url)}) == [
            step_dir_name(max(expected)),
            step_dir_name(4),
        ], phase
