"""What ``save`` takes at the call (metrics, metadata, a slot in flight), tags, and asking whether a save is due."""

from __future__ import annotations

import threading

import pytest
import torch

from _waiting import run_with_timeout
from asyncckpt import _phases
from asyncckpt.manager import CheckpointManager
from asyncckpt.reader import read_manifest


def test_metadata_and_metrics_changed_after_save_never_reach_the_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setitem(_phases._DELAYS, "write", 0.3)  # the manifest is written well after save returns
    metadata = {"config": {"layers": [1, 2, 3], "opt": {"lr": 0.1}}, "notes": ["a"]}
    metrics = {"loss": 0.5, "per_class": [0.1, 0.2]}
    with CheckpointManager(tmp_path) as mgr:
        handle = mgr.save(1, {"w": torch.ones(8)}, metrics=metrics, metadata=metadata)
        metadata["config"]["layers"].append(4)
        metadata["config"]["opt"]["lr"] = 99.0
        metadata["notes"][0] = "changed"
        metadata["new"] = True
        metrics["per_class"].append(0.3)
        metrics["loss"] = 7.0
        path = handle.wait()
    manifest = read_manifest(path)
    assert manifest.metadata == {"config": {"layers": [1, 2, 3], "opt": {"lr": 0.1}}, "notes": ["a"]}
    assert manifest.metrics == {"loss": 0.5, "per_class": [0.1, 0.2]}


@pytest.mark.filterwarnings("ignore:asyncckpt. saving step")
def test_max_pending_holds_when_threads_save_at_once(tmp_path, monkeypatch):
    monkeypatch.setitem(_phases._DELAYS, "write", 0.05)  # a slow writer: saves stay in flight
    monkeypatch.setitem(_phases._DELAYS, "snapshot", 0.02)  # a long gap between a slot check and the hand-over
    for max_pending in (1, 2):
        mgr = CheckpointManager(tmp_path / str(max_pending), max_pending=max_pending, keep_last=None)
        lock = threading.Lock()
        in_flight = [0, 0]  # now, most seen

        real_submit, real_on_done = mgr._pipeline.submit, mgr._on_done

        def submit(job, real_submit=real_submit, lock=lock, in_flight=in_flight):
            with lock:
                in_flight[0] += 1
                in_flight[1] = max(in_flight[1], in_flight[0])
            real_submit(job)

        def on_done(job, path, real_on_done=real_on_done, lock=lock, in_flight=in_flight):
            with lock:  # before the handle resolves and its slot frees: never counts low
                in_flight[0] -= 1
            real_on_done(job, path)

        mgr._pipeline.submit, mgr._pipeline._on_done = submit, on_done

        def saver(first: int, mgr: CheckpointManager = mgr) -> None:
            for step in range(first, first + 24, 4):
                mgr.save(step, {"w": torch.full((1000,), float(step))})

        threads = [threading.Thread(target=saver, args=(i,)) for i in range(1, 5)]
        for thread in threads:
            thread.start()
        for thread in threads:
            run_with_timeout(thread.join, timeout=120)
        mgr.close()
        assert in_flight == [0, max_pending], f"max_pending={max_pending}"
        assert len(mgr.steps()) == 24


@pytest.mark.parametrize("max_pending", [1, 2])
def test_a_failed_hand_over_gives_its_slot_back(tmp_path, monkeypatch, max_pending):
    with CheckpointManager(tmp_path, max_pending=max_pending) as mgr:
        for _ in range(max_pending + 1):
            with pytest.raises(TypeError, match="state"):
                mgr.save(1, {"fn": print})
        mgr.save(2, {"w": torch.ones(4)}).wait()
        assert mgr.steps() == [2]
