"""AsyncCheckpointManager: the asyncio façade over CheckpointManager (src/asyncckpt/aio.py)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import time
from pathlib import Path

import pytest
import torch

import asyncckpt
from _trees import assert_same_tree
from asyncckpt import AsyncCheckpointManager, CheckpointError, CheckpointManager
from asyncckpt.storage.local import TEMP_PREFIX, DataFileWriter

pytestmark = pytest.mark.asyncio

MiB = 1 << 20


def random_state(nbytes: int, seed: int = 0) -> dict:
    """Mostly one big float tensor: tensors freed between 4 and 32 MiB would raise glibc's dynamic
    mmap threshold and skew the RSS bounds of tests/test_reliability.py run later in this process."""
    gen = torch.Generator().manual_seed(seed)
    n = nbytes // 4
    return {
        "w": torch.randn(n - n // 64, generator=gen),
        "b": torch.randint(0, 1 << 30, (n // 64,), dtype=torch.int32, generator=gen),
        "h": torch.randn(17, 3, generator=gen).half(),
        "step": 7,
        "extra": {"name": "run", "lr": 1e-3},
    }


def zeros_like_state(state: dict) -> dict:
    return {
        "w": torch.zeros_like(state["w"]),
        "b": torch.zeros_like(state["b"]),
        "h": torch.zeros_like(state["h"]),
        "step": 0,
        "extra": {"name": "", "lr": 0.0},  # the same keys: restore refuses a state with other keys
    }


def temp_dirs(root: Path) -> list[str]:
    return [p.name for p in root.iterdir() if p.name.startswith(TEMP_PREFIX)]


class Ticker:
    """A task that counts 1 ms ticks: it only advances while the event loop is free."""

    def __init__(self) -> None:
        self.ticks = 0
        self.max_gap = 0.0
        self._last = time.perf_counter()
        self._task: asyncio.Task | None = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            self.ticks += 1
            self.max_gap = max(self.max_gap, now - self._last)
            self._last = now

    async def __aenter__(self) -> Ticker:
        self._task = asyncio.create_task(self._run())
        await asyncio.sleep(0)
        self.ticks, self.max_gap, self._last = 0, 0.0, time.perf_counter()
        return self

    async def __aexit__(self, *exc) -> None:
        assert self._task is not None
        self.max_gap = max(self.max_gap, time.perf_counter() - self._last)  # a stall at the end
        self._task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self._task


async def test_round_trip_bit_exact(tmp_path: Path) -> None:
    state = random_state(2 * MiB)
    async with AsyncCheckpointManager(tmp_path / "ckpt", chunk_size=256 << 10) as mgr:
        handle = await mgr.save(10, state, metrics={"loss": 0.5})
        assert isinstance(handle, asyncckpt.AsyncSaveHandle) and handle.step == 10
        path = await handle
        assert handle.done() and path == tmp_path / "ckpt" / "step-000000000010"
        assert await handle == path  # awaiting again gives the same result
        assert await mgr.steps() == [10]
        restored = zeros_like_state(state)
        assert await mgr.restore(restored) == 10
        assert_same_tree(state, restored)
        assert await mgr.restore(zeros_like_state(state), step=10) == 10
    loaded = asyncckpt.load(tmp_path / "ckpt")
    assert torch.equal(loaded["w"], state["w"])


async def test_open_and_wrap_existing_manager(tmp_path: Path) -> None:
    mgr = await AsyncCheckpointManager.open(tmp_path, keep_last=1)
    state = random_state(64 << 10)
    assert await mgr.prepare(state) > 0
    for step in (1, 2):
        await mgr.save(step, state)
    await mgr.wait()
    assert await mgr.steps() == [2]
    await mgr.close()
    with CheckpointManager(tmp_path) as sync_mgr:
        wrapped = AsyncCheckpointManager(sync_mgr)
        assert wrapped.manager is sync_mgr
        restored = zeros_like_state(state)
        assert await wrapped.restore(restored) == 2
        assert_same_tree(state, restored)
    with pytest.raises(TypeError):
        AsyncCheckpointManager(sync_mgr, keep_last=2)


async def test_loop_runs_while_saving_and_restoring(tmp_path: Path) -> None:
    # 24 MiB restores in ~50 ms on 2 cores (dozens of ticks); a much larger state here nudges the
    # allocator enough to skew test_reliability's RSS bounds later in the same process.
    state = random_state(24 * MiB)
    async with AsyncCheckpointManager(tmp_path, compression="zstd", workers=2, chunk_size=1 << 20) as mgr:
        async with Ticker() as during_save:
            handle = await mgr.save(1, state)
            await handle
        async with Ticker() as during_restore:
            began = time.perf_counter()
            restored = zeros_like_state(state)
            assert await mgr.restore(restored) == 1
            restore_s = time.perf_counter() - began
        assert_same_tree(state, restored)
    # a restore blocking the loop would allow at most one tick (its whole duration in one gap)
    assert during_save.ticks >= 3, during_save.ticks
    assert during_restore.ticks >= 3, (during_restore.ticks, during_restore.max_gap, restore_s)


async def test_cancelled_waiter_does_not_cancel_the_save(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = DataFileWriter.append

    def slow_append(self, data):
        time.sleep(0.02)  # keep the save in flight long enough to cancel its waiter
        return original(self, data)

    monkeypatch.setattr(DataFileWriter, "append", slow_append)
    state = random_state(4 * MiB)
    expected = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in state.items()}
    mgr = AsyncCheckpointManager(tmp_path, chunk_size=256 << 10, workers=2)
    handle = await mgr.save(5, state)
    waiter = asyncio.create_task(_await(handle))
    await asyncio.sleep(0.01)
    assert not waiter.done() and not handle.done()
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    state["w"].add_(1.0)  # the snapshot was taken: later changes never reach step 5
    assert not handle.done()
    path = await handle  # the save itself was not cancelled
    # a waiter cancelled during the snapshot: the save is still taken and commits
    snap = asyncio.create_task(mgr.save(6, expected))
    await asyncio.sleep(0)
    snap.cancel()
    with pytest.raises(asyncio.CancelledError):
        await snap
    await mgr.wait()
    await mgr.close()
    assert path.is_dir() and temp_dirs(tmp_path) == []
    assert_same_tree(expected, asyncckpt.load(tmp_path, step=5))
    assert_same_tree(expected, asyncckpt.load(tmp_path, step=6))


async def _await(handle: asyncckpt.AsyncSaveHandle) -> Path:
    return await handle


async def test_background_error_surfaces_as_checkpoint_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full_disk(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    state = random_state(256 << 10)
    mgr = AsyncCheckpointManager(tmp_path)
    await (await mgr.save(1, state))
    monkeypatch.setattr(DataFileWriter, "append", full_disk)
    handle = await mgr.save(2, state)
    with pytest.raises(CheckpointError, match="step 2.*No space left"):
        await handle
    assert isinstance(handle.error(), CheckpointError)
    await mgr.wait()  # already reported through the handle: not raised twice
    await mgr.save(3, state)  # not awaited: the next wait raises it
    with pytest.raises(CheckpointError, match="step 3"):
        await mgr.wait()
    monkeypatch.undo()
    await (await mgr.save(4, state))
    await mgr.close()
    assert await mgr.steps() == [1, 4]
    assert temp_dirs(tmp_path) == []


async def test_async_with_closes_and_releases_the_lock(tmp_path: Path) -> None:
    state = random_state(256 << 10)
    async with AsyncCheckpointManager(tmp_path) as mgr:
        await mgr.save(1, state)  # pending at exit: close waits for the commit
        with pytest.raises(CheckpointError, match="in use"):
            CheckpointManager(tmp_path)
    assert mgr.manager._admission.closed
    with pytest.raises(CheckpointError, match="closed"):
        await mgr.save(2, state)
    async with AsyncCheckpointManager(tmp_path) as again:  # the lock was released
        assert await again.steps() == [1]
    with pytest.raises(ValueError, match="user"):
        async with AsyncCheckpointManager(tmp_path) as third:
            raise ValueError("user error")
    assert third.manager._admission.closed


async def test_overlap_mode_commit_is_awaitable_without_an_optimizer_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In overlap mode a commit waits for a fence; awaiting the handle must be one, or it would hang."""
    from asyncckpt import _phases

    monkeypatch.setitem(_phases._DELAYS, "lazy_copy", 0.2)
    model = torch.nn.Linear(256, 256)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    async with AsyncCheckpointManager(tmp_path, snapshot="overlap") as mgr:
        handle = await mgr.save(3, {"model": model, "optimizer": opt})
        path = await asyncio.wait_for(handle, timeout=30)
        assert path == tmp_path / "step-000000000003"
    loaded = asyncckpt.load(tmp_path)["model"]
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())


async def test_signal_handlers_go_through_the_loop_and_are_removed_on_close(tmp_path: Path) -> None:
    import signal

    assert signal.getsignal(signal.SIGUSR2) == signal.SIG_DFL
    async with AsyncCheckpointManager(tmp_path) as mgr:
        mgr.install_signal_handlers((signal.SIGUSR2,))
        assert signal.getsignal(signal.SIGUSR2) != signal.SIG_DFL  # the loop's wakeup handler
        signal.raise_signal(signal.SIGUSR2)
        await asyncio.sleep(0.05)  # the loop runs the handler: preemption noted, nothing raised yet
        assert mgr._preempted == signal.SIGUSR2
        mgr._preempted = None  # not acted on here (acting would end this process: test_signals.py)
    assert signal.getsignal(signal.SIGUSR2) == signal.SIG_DFL


async def test_a_handler_found_at_install_is_put_back_on_close(tmp_path: Path) -> None:
    import signal

    def users_own(signum: int, frame: object) -> None:
        pass

    before = signal.signal(signal.SIGUSR2, users_own)
    try:
        async with AsyncCheckpointManager(tmp_path) as mgr:
            mgr.install_signal_handlers((signal.SIGUSR2,))
            assert signal.getsignal(signal.SIGUSR2) is not users_own
        assert signal.getsignal(signal.SIGUSR2) is users_own  # not the default the loop leaves
    finally:
        signal.signal(signal.SIGUSR2, before)


async def test_a_loop_handler_found_at_install_does_not_leave_the_signal_a_no_op(tmp_path: Path) -> None:
    import signal

    loop = asyncio.get_running_loop()
    before = signal.getsignal(signal.SIGUSR2)
    loop.add_signal_handler(signal.SIGUSR2, lambda: None)  # the process's handler is then the loop's no-op
    try:
        async with AsyncCheckpointManager(tmp_path) as mgr:
            mgr.install_signal_handlers((signal.SIGUSR2,))
        assert signal.getsignal(signal.SIGUSR2) == signal.SIG_DFL  # acts again, not swallowed
    finally:
        loop.remove_signal_handler(signal.SIGUSR2)
        signal.signal(signal.SIGUSR2, signal.SIG_DFL if before is None else before)


class FakeStream(str):
    """A named stand-in for a CUDA stream, on GPU 0."""

    device = torch.device("cuda", 0)


class FakeStreams:
    """torch.cuda's per-thread current stream, faked for a machine without CUDA."""

    def __init__(self) -> None:
        import threading

        self._local = threading.local()

    def current_stream(self, device=None):
        return getattr(self._local, "stream", FakeStream("default stream"))

    def stream(self, stream):
        import contextlib

        @contextlib.contextmanager
        def using():
            before = self.current_stream()
            self._local.stream = stream
            try:
                yield
            finally:
                self._local.stream = before

        return using()

    def install(self, patch: pytest.MonkeyPatch) -> None:
        patch.setattr(torch.cuda, "is_available", lambda: True)
        patch.setattr(torch.cuda, "is_initialized", lambda: True)
        patch.setattr(torch.cuda, "current_stream", self.current_stream)
        patch.setattr(torch.cuda, "stream", self.stream)
        patch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())


async def test_executor_calls_run_under_the_callers_cuda_stream(tmp_path: Path, monkeypatch) -> None:
    # Executor threads start on the default stream; a save made there would order its copies
    # against the wrong stream when training runs under torch.cuda.stream(s).
    async with await AsyncCheckpointManager.open(tmp_path) as mgr:
        fake = FakeStreams()
        with monkeypatch.context() as patch:
            fake.install(patch)
            with fake.stream(FakeStream("training stream")):  # on the loop's thread, as training would be
                seen = await mgr._run(lambda: torch.cuda.current_stream())
            outside = await mgr._run(lambda: torch.cuda.current_stream())
    assert seen == "training stream"
    assert outside == "default stream"
