"""Overlap mode's edge cases: fences racing across threads, interrupts, hooks, odd optimizers.

Tests marked ``# Regression:`` failed on the first version of overlap mode (a review found them)
and describe the bug they guard against; the others pin down behaviour the contract promises
beyond tests/test_overlap.py.
"""

from __future__ import annotations

import asyncio
import gc
import signal
import subprocess
import sys
import textwrap
import threading
import time
import weakref

import pytest
import torch

import asyncckpt
import asyncckpt.engine.overlap
from _overlap_state import CommitGate, plain
from _trees import assert_same_tree
from _waiting import run_with_timeout
from asyncckpt import AsyncCheckpointManager, CheckpointError, CheckpointManager, _phases
from asyncckpt.engine.overlap import LazyCopy
from asyncckpt.metrics import read_log


def make_model(width: int = 128) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, 4))


def one_step(model, opt, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    width = next(model.parameters()).shape[-1]
    model(torch.randn(8, width, generator=gen)).square().mean().backward()
    opt.step()
    opt.zero_grad()


@pytest.fixture
def fence_entered(monkeypatch) -> threading.Event:
    """Set when some thread enters LazyCopy.fence (which then waits for the slowed copy)."""
    entered = threading.Event()
    original = LazyCopy.fence

    def fence(self, *args, **kwargs):
        entered.set()
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LazyCopy, "fence", fence)
    return entered


# ---- regressions (each comment says what the first version did wrong) ---------------------------


# Regression: CheckpointManager._fence reads `self._unfenced` outside `_fence_lock` and empties the list
# before the copy has finished. While one thread is inside a fence (here handle.wait() on a helper
# thread, waiting for the copy), the training thread's step pre-hook sees an empty list, returns at
# once, and the optimizer step runs during the copy: the save fails the guard although the only
# update after save() was an optimizer step (and in a narrow window a torn copy could even pass it).
def test_step_waits_for_a_fence_running_on_another_thread(tmp_path, slow_copy, fence_entered):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    one_step(model, opt)
    state = {"model": model, "optimizer": opt}
    box: dict = {}
    with CheckpointManager(tmp_path, snapshot="overlap") as mgr:
        expected = plain(state)
        handle = mgr.save(1, state)

        def waiter() -> None:
            try:
                box["path"] = handle.wait()
            except BaseException as exc:  # noqa: BLE001
                box["error"] = exc

        thread = threading.Thread(target=waiter, daemon=True)
        thread.start()
        assert fence_entered.wait(10), "the helper thread never entered the fence"
        assert not handle.done()  # the copy thread is still asleep: the fence is in progress
        one_step(model, opt, seed=2)  # a fenced optimizer step: must wait for the copy
        thread.join(30)
        assert not thread.is_alive()
        assert "error" not in box, f"the save failed: {box.get('error')}"
        run_with_timeout(mgr.wait, timeout=30)
    assert_same_tree(expected, asyncckpt.load(tmp_path))


# Regression: the same race through the asyncio facade: `await handle` runs the fence in the executor, so a
# task awaiting the commit while the loop thread keeps training makes the next step skip the fence.
def test_awaiting_the_commit_in_a_task_does_not_unfence_training(tmp_path, slow_copy, fence_entered):
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    one_step(model, opt)
    state = {"model": model, "optimizer": opt}
    expected = plain(state)

    async def main() -> None:
        async with AsyncCheckpointManager(tmp_path, snapshot="overlap") as mgr:
            handle = await mgr.save(1, state)
            commit = asyncio.ensure_future(handle)  # notify on commit, keep training meanwhile
            deadline = time.monotonic() + 10
            while not fence_entered.is_set() and time.monotonic() < deadline:
                await asyncio.sleep(0.001)
            assert not handle.done()
            one_step(model, opt, seed=2)  # synchronous training on the loop thread
            await asyncio.wait_for(commit, timeout=30)

    run_with_timeout(lambda: asyncio.run(main()), timeout=60)
    assert_same_tree(expected, asyncckpt.load(tmp_path))


class _Interrupted(BaseException):
    """What a signal handler raises (KeyboardInterrupt without disturbing pytest)."""


# Regression: LazyCopy.fence swallows every BaseException from `self._cpu.result()`, meant for a failed
# copy, but result() also raises what a signal handler raises in the waiting thread (Ctrl-C,
# a preemption handler). The interrupt is lost, the fence completes while the copy is still
# running, the guard passes (nothing changed yet), the step then updates the parameters under the
# copy, and a checkpoint mixing two steps is committed. Fix: wait for the copy without catching
# (e.g. concurrent.futures.wait, then read .exception()), and if a fence is interrupted, put the
# lazy copies back into `_unfenced` so the writer's verdict() is not stranded (else wait() hangs).
@pytest.mark.skipif(not hasattr(signal, "pthread_kill"), reason="needs signal.pthread_kill")
def test_interrupt_during_the_fence_is_raised_and_no_mixed_checkpoint_commits(tmp_path, monkeypatch):
    assert threading.current_thread() is threading.main_thread()
    stepping = threading.Event()
    main_id = threading.main_thread().ident

    def pause(phase: str) -> None:  # the copy thread, before it copies anything
        if phase == "lazy_copy":
            stepping.wait(10)
            time.sleep(0.2)  # the training thread is now blocked in the fence
            signal.pthread_kill(main_id, signal.SIGUSR1)
            time.sleep(0.3)  # copy only after the (unfenced) step would have run

    def on_signal(signum, frame):
        raise _Interrupted()

    monkeypatch.setattr(_phases, "pause", pause)
    previous = signal.signal(signal.SIGUSR1, on_signal)
    try:
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        one_step(model, opt)
        opt.register_step_pre_hook(lambda *args: stepping.set())  # runs before the manager's hook
        state = {"model": model, "optimizer": opt}
        mgr = CheckpointManager(tmp_path, snapshot="overlap")
        try:
            expected = plain(state)
            mgr.save(1, state)
            model(torch.randn(8, 128)).square().mean().backward()
            interrupted = False
            try:
                opt.step()
            except _Interrupted:
                interrupted = True
            try:
                run_with_timeout(mgr.wait, timeout=30)  # must not hang either
                committed = True
            except CheckpointError:
                committed = False
            if committed:  # a committed checkpoint must be the state at save()
                assert_same_tree(expected, asyncckpt.load(tmp_path))
            assert interrupted, "the interrupt raised while waiting in the fence was swallowed"
        finally:
            stepping.set()
            mgr._close_quietly()
    finally:
        signal.signal(signal.SIGUSR1, previous)


# Regression: `_fence` empties `_unfenced` before fencing, so when a fence raises (an interrupt landing
# in it, a CUDA error from wait_event; injected here, once) the copy is dropped without a verdict:
# the writer waits in LazyCopy.verdict() forever, and every later wait()/close() hangs. Fix: remove
# an entry only once its fence has returned (and give close() a way to release a verdict it cannot
# get, so Pipeline.close() never joins a writer stuck in verdict()).
def test_a_fence_that_raises_does_not_strand_the_writer(tmp_path, slow_copy, monkeypatch):
    original = LazyCopy.fence
    fenced: list[LazyCopy] = []

    def fails_once(self, *args, **kwargs) -> float:
        fenced.append(self)
        if len(fenced) == 1:
            raise RuntimeError("fence failed (injected)")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LazyCopy, "fence", fails_once)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    one_step(model, opt)
    state = {"model": model, "optimizer": opt}
    mgr = CheckpointManager(tmp_path, snapshot="overlap")
    try:
        expected = plain(state)
        mgr.save(1, state)
        with pytest.raises(RuntimeError, match="injected"):
            mgr.wait()
        run_with_timeout(mgr.wait, timeout=20)  # the next fence must pick the copy up again
        assert mgr.steps() == [1]
    finally:
        for lazy in fenced:
            lazy._fenced.set()  # release a stranded writer, or close() would hang too
        mgr._close_quietly()
    assert_same_tree(expected, asyncckpt.load(tmp_path))


# Regression: module load_state_dict is fenced only on the exact module object in the saved state
# (_install_fence hooks the top module). Loading into one of its submodules, or into the original
# module behind a torch.compile / DDP-style wrapper saved in the state, copies into lazily-copied
# parameters without a fence: the checkpoint is refused by the guard although the user only used a
# load_state_dict the README calls a fence. Fix: in _install_fence hook every module in
# obj.modules() (and, for wrappers, the wrapped module), not just the root.
def test_submodule_load_state_dict_is_fenced(tmp_path, slow_copy):
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    one_step(model, opt)
    donor = make_model(width=128)
    with torch.no_grad():
        for p in donor.parameters():
            p.add_(1.0)
    state = {"model": model, "optimizer": opt}
    with CheckpointManager(tmp_path, snapshot="overlap") as mgr:
        expected = plain(state)
        mgr.save(1, state)
        model[0].load_state_dict(donor[0].state_dict())  # e.g. re-initialising one layer
        run_with_timeout(mgr.wait, timeout=30)
    assert_same_tree(expected, asyncckpt.load(tmp_path))
    assert torch.equal(model[0].weight, donor[0].weight)


# Regression: `_fence` adds the wait to `record.fence_wait_s` only after LazyCopy.fence() has set
# the verdict, so the writer may commit and append the record to the metrics log first; the log (and
# `asyncckpt stats`) then shows fence_wait_s = 0. Here the training thread is held for a moment right
# after the fence, as a preemption by the OS would. Fix: account the wait before `_fenced.set()`
# (e.g. LazyCopy.fence takes the record), or have the writer log after the fence's bookkeeping.
def test_fence_wait_reaches_the_metrics_log(tmp_path, slow_copy, monkeypatch):
    original = LazyCopy.fence

    def fence_then_descheduled(self, *args, **kwargs) -> float:
        waited = original(self, *args, **kwargs)
        time.sleep(1.0)
        return waited

    monkeypatch.setattr(LazyCopy, "fence", fence_then_descheduled)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gate = CommitGate(monkeypatch)
    with CheckpointManager(tmp_path, snapshot="overlap") as mgr:
        gate.close()  # the fence comes before the commit, however slow this thread is
        mgr.save(1, {"model": model, "optimizer": opt})
        one_step(model, opt)
        gate.open()
        run_with_timeout(mgr.wait, timeout=30)
        assert mgr.stats.records[0].fence_wait_s > 0  # known in memory
    (record,) = read_log(tmp_path)
    assert record.ok and record.fence_wait_s > 0, "the metrics log lost the fence wait"


# ---- behaviour pinned down ------------------------------------------------------------------------


def test_optimizer_not_in_the_state_means_everything_is_copied_eagerly(tmp_path, slow_copy):
    """Only the model is saved; its optimizer steps right after save without any fence."""
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    one_step(model, opt)
    hooks_before = len(opt._optimizer_step_pre_hooks)
    with CheckpointManager(tmp_path, snapshot="overlap") as mgr:
        expected = plain({"model": model})
        mgr.save(1, {"model": model})
        assert len(opt._optimizer_step_pre_hooks) == hooks_before  # not fenced: nothing lazy to wait for
        one_step(model, opt, seed=2)
        with torch.no_grad():
            model[0].weight.mul_(2.0)  # no guard failure either: the weight was copied before save returned
        run_with_timeout(mgr.wait, timeout=30)
    assert_same_tree(expected, asyncckpt.load(tmp_path))


def test_tied_parameters_are_stored_once_and_fenced(tmp_path, slow_copy):
    torch.manual_seed(0)
    embed = torch.nn.Embedding(256, 128)
    head = torch.nn.Linear(128, 256, bias=False)
    head.weight = embed.weight  # weight tying, as in language models
    model = torch.nn.ModuleDict({"embed": embed, "head": head})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)

    def step(seed: int) -> None:
        tokens = torch.randint(0, 256, (4, 8), generator=torch.Generator().manual_seed(seed))
        model["head"](model["embed"](tokens)).logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()

    step(1)
    state = {"model": model, "optimizer": opt}
    with CheckpointManager(tmp_path, snapshot="overlap") as mgr:
        expected = plain(state)
        mgr.save(1, state)
        step(2)
        step(3)
        run_with_timeout(mgr.wait, timeout=30)
        assert mgr.stats.records[0].ok
    loaded = asyncckpt.load(tmp_path)
    assert_same_tree(expected, loaded)
    assert torch.equal(loaded["model"]["embed.weight"], loaded["model"]["head.weight"])


def test_param_group_added_after_the_first_save_is_copied_lazily_and_fenced(tmp_path, slow_copy):
    model = make_model()
    opt = torch.optim.SGD(model[0].parameters(), lr=0.1, momentum=0.9)
    one_step(model, opt)
    state = {"model": model, "optimizer": opt}
    with CheckpointManager(tmp_path, snapshot="overlap", keep_last=None) as mgr:
        mgr.save(1, state)
        opt.add_param_group({"params": list(model[2].parameters()), "lr": 0.5})
        one_step(model, opt, seed=2)
        expected = plain(state)
        handle = mgr.save(2, state)
        assert not handle.done()
        one_step(model, opt, seed=3)  # the new group's parameters change right after save
        run_with_timeout(mgr.wait, timeout=30)
    assert_same_tree(expected, asyncckpt.load(tmp_path, step=2))


def test_save_before_the_first_step_while_the_optimizer_creates_its_state(tmp_path, slow_copy):
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    state = {"model": model, "optimizer": opt}
    with CheckpointManager(tmp_path, snapshot="overlap") as mgr:
        expected = plain(state)
        assert not expected["optimizer"]["state"]
        mgr.save(0, state)
        one_step(model, opt)  # state created lazily inside the (fenced) first step
        one_step(model, opt, seed=2)
        run_with_timeout(mgr.wait, timeout=30)
    loaded = asyncckpt.load(tmp_path)
    assert_same_tree(expected, loaded)
    assert loaded["optimizer"]["state"] == {}


def test_replaced_state_tensor_keeps_the_saved_value_and_is_released_after_commit(tmp_path, slow_copy):
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    one_step(model, opt)
    state = {"model": model, "optimizer": opt}
    weight = model[0].weight
    with CheckpointManager(tmp_path, snapshot="overlap") as mgr:
        expected = plain(state)
        mgr.save(1, state)
        old = opt.state[weight]["exp_avg"]
        gone = weakref.ref(old)
        opt.state[weight]["exp_avg"] = torch.full_like(old, 7.0)  # replaced, not updated in place
        del old
        one_step(model, opt, seed=2)
        run_with_timeout(mgr.wait, timeout=30)
        gc.collect()
        assert gone() is None, "the replaced tensor is still held after the commit"
    assert_same_tree(expected, asyncckpt.load(tmp_path))


def test_usual_training_loop_never_trips_the_guard(tmp_path, slow_copy):
    """Gradient accumulation, GradScaler with an inf-skipped step, an LR scheduler, zero_grad with
    set_to_none=False and clip_grad_norm_: every overlap save commits the state at its save()."""
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    state = {"model": model, "optimizer": opt, "scheduler": sched, "scaler": scaler}
    gen = torch.Generator().manual_seed(3)
    expected: dict[int, dict] = {}
    skipped = 0
    with CheckpointManager(tmp_path, snapshot="overlap", keep_last=None) as mgr:
        for step in range(1, 7):
            for micro in range(2):  # gradient accumulation
                loss = model(torch.randn(8, 128, generator=gen)).square().mean()
                if step == 3 and micro == 1:
                    loss = loss * float("inf")  # GradScaler skips this optimizer step
                scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scale = scaler.get_scale()
            scaler.step(opt)
            scaler.update()
            skipped += scaler.get_scale() < scale
            sched.step()
            opt.zero_grad(set_to_none=False)
            if step % 2 == 1 or step == 4:  # save 4 lands right after the skipped step
                expected[step] = plain(state)
                mgr.save(step, state)
        run_with_timeout(mgr.wait, timeout=60)
        assert all(r.ok for r in mgr.stats.records), [r.error for r in mgr.stats.records]
    assert skipped == 1
    for step, want in expected.items():
        assert_same_tree(want, asyncckpt.load(tmp_path, step=step), f"step {step}")


def test_two_managers_on_one_optimizer_one_closed(tmp_path, slow_copy):
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    one_step(model, opt)
    state = {"model": model, "optimizer": opt}
    hooks_before = len(opt._optimizer_step_pre_hooks)
    first = CheckpointManager(tmp_path / "a", snapshot="overlap")
    second = CheckpointManager(tmp_path / "b", snapshot="overlap")
    try:
        first.save(1, state)
        second.save(1, state)
        assert len(opt._optimizer_step_pre_hooks) == hooks_before + 2
        run_with_timeout(first.close, timeout=30)
        assert len(opt._optimizer_step_pre_hooks) == hooks_before + 1  # only its own hook went
        one_step(model, opt, seed=2)  # fences the second manager's copy
        expected = plain(state)
        second.save(2, state)
        one_step(model, opt, seed=3)  # still fenced by the open manager's hook
        run_with_timeout(second.wait, timeout=30)
    finally:
        first._close_quietly()
        second._close_quietly()
    assert len(opt._optimizer_step_pre_hooks) == hooks_before
    assert_same_tree(expected, asyncckpt.load(tmp_path / "b"))
    one_step(model, opt, seed=4)  # both closed: stepping is untouched


def test_failed_submit_after_the_copy_started_neither_hangs_nor_leaks(tmp_path, slow_copy, monkeypatch):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    one_step(model, opt)
    state = {"model": model, "optimizer": opt}
    with CheckpointManager(tmp_path, snapshot="overlap") as mgr:

        def refuse(job):
            raise CheckpointError("writer gone (injected)")

        with monkeypatch.context() as patch:
            patch.setattr(mgr._pipeline, "submit", refuse)
            with pytest.raises(CheckpointError, match="injected"):
                mgr.save(1, state)
        assert mgr._admission.arenas.held_bytes() > 0  # the arena came back, after the copy was done with it
        one_step(model, opt, seed=2)  # fences the orphaned copy: no error, no hang
        expected = plain(state)
        mgr.save(2, state)
        one_step(model, opt, seed=3)
        run_with_timeout(mgr.wait, timeout=30)
        assert mgr.steps() == [2]
    assert_same_tree(expected, asyncckpt.load(tmp_path))


@pytest.mark.parametrize("max_pending", [2, 3])
def test_max_pending_with_retention_commits_every_step_at_its_save(tmp_path, slow_copy, max_pending):
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    one_step(model, opt)
    state = {"model": model, "optimizer": opt}
    expected = {}

    def run() -> list[int]:
        with CheckpointManager(tmp_path, snapshot="overlap", max_pending=max_pending, keep_last=2) as mgr:
            for step in range(1, 6):
                expected[step] = plain(state)
                mgr.save(step, state)
                if step != 3:  # two saves with no step between them, too
                    one_step(model, opt, seed=step + 1)
            mgr.wait()
            return mgr.steps()

    assert run_with_timeout(run, timeout=60) == [4, 5]
    for step in (4, 5):
        assert_same_tree(expected[step], asyncckpt.load(tmp_path, step=step), f"step {step}")


def test_interpreter_exit_commits_a_save_whose_copy_is_still_running(tmp_path):
    script = textwrap.dedent(
        """
        import sys, torch
        from asyncckpt import CheckpointManager, _phases
        _phases._DELAYS["lazy_copy"] = 0.5
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.Linear(128, 4))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        model(torch.randn(4, 128)).sum().backward()
        opt.step()
        mgr = CheckpointManager(sys.argv[1], snapshot="overlap")
        torch.save(model.state_dict(), sys.argv[2])
        mgr.save(1, {"model": model, "optimizer": opt})
        # no wait, no close, no optimizer step: the exit hook must fence and commit
        """
    )
    root, expected = tmp_path / "root", tmp_path / "expected.pt"
    result = subprocess.run(
        [sys.executable, "-c", script, str(root), str(expected)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert [p.name for p in root.iterdir() if p.name.startswith("step-")] == ["step-000000000001"]
    assert_same_tree(torch.load(expected), asyncckpt.load(root)["model"])


def test_failed_copy_is_reported_by_wait_and_never_by_the_fence(tmp_path, slow_copy):
    """An optimizer-state tensor resized in place after save breaks the lazy copy: the fence does
    not raise the copy's error itself (a step pre-hook must never raise it), the writer reports it as
    the save's failure at the next wait, nothing is committed, and the next save commits."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    one_step(model, opt)
    weight = model[0].weight
    state = {"model": model, "optimizer": opt}
    with CheckpointManager(tmp_path, snapshot="overlap") as mgr:
        mgr.save(1, state)
        buffer = opt.state[weight]["momentum_buffer"]
        buffer.resize_(10)  # the copy thread, still asleep, will fail on it
        with pytest.raises(CheckpointError, match="save of step 1 failed"):
            run_with_timeout(mgr.wait, timeout=30)
        assert mgr.steps() == []
        opt.state[weight]["momentum_buffer"] = torch.zeros_like(weight)
        expected = plain(state)
        mgr.save(2, state)
        one_step(model, opt, seed=2)
        run_with_timeout(mgr.wait, timeout=30)
        assert mgr.steps() == [2]
    assert_same_tree(expected, asyncckpt.load(tmp_path))


def test_an_interrupt_before_the_pending_copy_returns_never_lets_it_write_into_the_next_snapshot(tmp_path, monkeypatch):
    """An interrupt after the lazy copy was handed to the copy thread, but before ``save`` got the
    pending copy back, rolls the save back with no pending copy to wait for. The arena must still
    not go back to the pool until that copy is done: a next save of another state reuses the
    arena, and the stale copy landing late would overwrite its snapshot."""
    model = torch.nn.Linear(256, 256)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 256)).sum().backward()
    opt.step()
    with CheckpointManager(tmp_path, snapshot="overlap") as mgr:

        def interrupted(*args, **kwargs):
            raise KeyboardInterrupt

        monkeypatch.setitem(_phases._DELAYS, "lazy_copy", 0.5)  # the stale copy lands late
        monkeypatch.setattr(asyncckpt.engine.overlap, "LazyCopy", interrupted)
        with pytest.raises(KeyboardInterrupt):
            mgr.save(1, {"model": model, "optimizer": opt})
        monkeypatch.undo()
        monkeypatch.setitem(_phases._DELAYS, "compress", 1.0)  # the encoders read after it would land
        plain_state = {"x": torch.full((64 * 1024,), 7.0)}  # eager: not the optimizer's
        mgr.save(2, plain_state).wait()
    assert torch.equal(asyncckpt.load(tmp_path, step=2)["x"], plain_state["x"])
