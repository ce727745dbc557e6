"""pipeline.py: the writer's ordering of commit steps, its threads."""

from __future__ import annotations

import torch

import asyncckpt
from asyncckpt.format import MANIFEST_NAME
from asyncckpt.storage import local as storage_mod


def test_commit_order_is_data_manifest_dir_rename_root(tmp_path, monkeypatch):
    """Power-loss order: data and manifest synced before the rename, the root synced after it."""
    events: list[str] = []
    real_fsync, real_rename = storage_mod.os.fsync, storage_mod.os.rename

    def fsync(fd):
        import os

        target = os.readlink(f"/proc/self/fd/{fd}")
        events.append("fsync " + os.path.basename(target))
        return real_fsync(fd)

    def rename(src, dst):
        events.append(f"rename {storage_mod.Path(src).name[:9]}->{storage_mod.Path(dst).name}")
        return real_rename(src, dst)

    with asyncckpt.CheckpointManager(tmp_path / "root") as mgr:
        monkeypatch.setattr(storage_mod.os, "fsync", fsync)
        monkeypatch.setattr(storage_mod.os, "rename", rename)
        mgr.save(7, {"w": torch.arange(10.0)}).wait()
        monkeypatch.undo()
    step = "step-000000000007"
    rename_at = events.index(f"rename .tmp-step->{step}")
    before = events[:rename_at]
    assert "fsync data-00000.bin" in before
    assert f"fsync {MANIFEST_NAME}" in before
    assert before.index("fsync data-00000.bin") < before.index(f"fsync {MANIFEST_NAME}")
    assert any(e.startswith("fsync .tmp-step-000000000007") for e in before[before.index(f"fsync {MANIFEST_NAME}") :])
    assert events[rename_at + 1] == "fsync root"


def test_retention_deletes_only_after_the_newer_commit_is_durable(tmp_path, monkeypatch):
    events: list[str] = []
    real_fsync, real_rename = storage_mod.os.fsync, storage_mod.os.rename

    def fsync(fd):
        import os

        events.append("fsync " + os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def rename(src, dst):
        events.append(f"rename {storage_mod.Path(src).name}->{storage_mod.Path(dst).name}")
        return real_rename(src, dst)

    root = tmp_path / "root"
    with asyncckpt.CheckpointManager(root, keep_last=1) as mgr:
        mgr.save(1, {"w": torch.zeros(4)}).wait()
        monkeypatch.setattr(storage_mod.os, "fsync", fsync)
        monkeypatch.setattr(storage_mod.os, "rename", rename)
        mgr.save(2, {"w": torch.ones(4)}).wait()
        monkeypatch.undo()
        assert mgr.steps() == [2]
    commit = next(i for i, e in enumerate(events) if e.endswith("->step-000000000002"))
    delete = next(i for i, e in enumerate(events) if e.startswith("rename step-000000000001->.tmp-delete"))
    assert events[commit + 1] == "fsync root"
    assert delete > commit + 1


def test_encoder_threads_are_niced_and_the_training_threads_settings_are_untouched(tmp_path):
    import os
    import threading

    main_threads = torch.get_num_threads()
    with asyncckpt.CheckpointManager(tmp_path, workers=2, background_nice=10) as mgr:
        base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

        def probe() -> int:
            return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

        seen = {mgr._pipeline._pool.submit(probe).result() for _ in range(8)}
        assert seen == {min(19, base + 10)}
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base
        assert torch.get_num_threads() == main_threads


def test_starting_a_manager_leaves_torchs_thread_count_for_new_threads_alone(tmp_path):
    # torch.set_num_threads in any of our threads would also move the default that threads
    # created later start from (a user's own threads would lose their cores).
    from _threads import torch_threads_in_a_new_thread as in_new_thread

    before = in_new_thread()
    with asyncckpt.CheckpointManager(tmp_path, workers=2) as mgr:
        mgr.save(1, {"w": torch.randn(1 << 16)}).wait()
        assert in_new_thread() == before
    assert in_new_thread() == before
