"""Overlap mode: save returns before the lazy copy ends; fence at the next optimizer step.

Most tests slow the lazy copy down on purpose (the ``lazy_copy`` phase seam sleeps inside the copy
thread), so training really runs while the copy is in flight: without the fence the optimizer step
would change parameters mid-copy, and the guard would reject the checkpoint; these tests would fail.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import asyncckpt
from _overlap_state import CommitGate, plain, to_cpu
from _trees import assert_same_tree
from _waiting import run_with_timeout
from asyncckpt import CheckpointError, CheckpointManager
from asyncckpt.metrics import read_log


def make_model(width: int = 128) -> torch.nn.Module:
    torch.manual_seed(0)
    # BatchNorm: a forward pass updates its running stats in place, before any optimizer step.
    return torch.nn.Sequential(
        torch.nn.Linear(width, width), torch.nn.BatchNorm1d(width), torch.nn.ReLU(), torch.nn.Linear(width, 4)
    )


def train(model, optimizers, steps: int, accumulate: int = 2, scaler=None, seed: int = 1) -> None:
    """``steps`` optimizer steps, each after ``accumulate`` forward/backward passes."""
    gen = torch.Generator().manual_seed(seed)
    width = next(model.parameters()).shape[-1]
    for _ in range(steps):
        for _ in range(accumulate):
            loss = model(torch.randn(16, width, generator=gen)).square().mean()
            (scaler.scale(loss) if scaler is not None else loss).backward()
        for opt in optimizers:
            if scaler is not None:
                scaler.step(opt)
            else:
                opt.step()
            opt.zero_grad()
        if scaler is not None:
            scaler.update()


def step_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("step-"))


OPTIMIZERS = {
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-2),
    "adamw-foreach": lambda params: torch.optim.AdamW(params, lr=1e-2, foreach=True),
    "adamw-fused": lambda params: torch.optim.AdamW(params, lr=1e-2, fused=True),
    "sgd-momentum": lambda params: torch.optim.SGD(params, lr=1e-2, momentum=0.9),
}


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_checkpoint_equals_state_at_save_while_training_runs_on(tmp_path, slow_copy, kind, monkeypatch):
    model = make_model()
    opt = OPTIMIZERS[kind](model.parameters())
    train(model, [opt], steps=2)
    state = {"model": model, "optimizer": opt, "step": 2}
    gate = CommitGate(monkeypatch)
    with CheckpointManager(tmp_path, snapshot="overlap") as mgr:
        expected = plain(state)
        gate.close()  # the fence comes before the commit, however slow training is here
        handle = mgr.save(2, state)
        assert not handle.done()  # the copy thread is still asleep inside the copy
        train(model, [opt], steps=3)  # forwards (BatchNorm stats), backwards, fenced steps
        gate.open()
        assert handle.wait().name == "step-000000000002"
        record = mgr.stats.records[0]
    assert record.ok and record.lazy_copy_s > 0 and record.fence_wait_s > 0
    assert_same_tree(expected, asyncckpt.load(tmp_path))
    # and training did move on: the live state is not what was saved
    assert not torch.equal(model[0].weight, expected["model"]["0.weight"])


def test_buffers_and_unowned_tensors_are_copied_before_save_returns(tmp_path, slow_copy):
    """Buffers, small tensors and tensors no saved optimizer owns (an EMA copy) may change in place
    right after save: they were copied eagerly, so the checkpoint still commits with the old values."""
    model = make_model()
    ema = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train(model, [opt], steps=1)
    state = {"model": model, "ema": ema, "optimizer": opt}
    with CheckpointManager(tmp_path, snapshot="overlap") as mgr:
        expected = plain(state)
        mgr.save(1, state)
        model.train()
        model(torch.randn(8, 128))  # running_mean / running_var / num_batches_tracked, in place
        with torch.no_grad():
            for p in ema.parameters():
                p.mul_(0.5)  # an EMA update: not an optimizer's tensor
        mgr.wait()
    assert_same_tree(expected, asyncckpt.load(tmp_path))


def test_guard_rejects_in_place_update_outside_the_optimizer(tmp_path, slow_copy, monkeypatch):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    state = {"model": model, "optimizer": opt}
    gate = CommitGate(monkeypatch)
    with CheckpointManager(tmp_path, snapshot="overlap", keep_last=None) as mgr:
        before = plain(state)
        mgr.save(1, state)
        mgr.wait()
        gate.close()  # the update comes before the writer checks, however slow this thread is
        handle = mgr.save(2, state)
        with torch.no_grad():
            model[0].weight.mul_(2.0)  # not through the optimizer: not covered by the fence
        gate.open()
        doubled = model[0].weight.clone()
        train(model, [opt], steps=1)  # training itself is not disturbed: no exception here
        assert not torch.equal(model[0].weight, doubled)
        with pytest.raises(CheckpointError, match=r"overlap guard: 1 tensor\(s\) changed in place") as info:
            handle.wait()
        assert "['model'].state_dict()['0.weight']" in str(info.value)
        assert "step 2" in str(info.value)
        assert step_dirs(tmp_path) == ["step-000000000001"]  # nothing half-written, nothing else
        assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]  # temp dir removed
        # the next save, with no stray update, commits
        after = plain(state)
        mgr.save(3, state)
        mgr.wait()
    assert_same_tree(before, asyncckpt.load(tmp_path, step=1))
    assert_same_tree(after, asyncckpt.load(tmp_path, step=3))


def test_guard_failure_is_raised_by_the_next_save(tmp_path, slow_copy, monkeypatch):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    state = {"model": model, "optimizer": opt}
    gate = CommitGate(monkeypatch)
    with CheckpointManager(tmp_path, snapshot="overlap") as mgr:
        gate.close()
        mgr.save(1, state)
        with torch.no_grad():
            model[0].weight.add_(1.0)
        gate.open()
        with pytest.raises(CheckpointError, match="overlap guard"):
            mgr.save(2, state)  # fences save 1, waits for it, reports its failure
        mgr.save(2, state)
        mgr.wait()
        assert mgr.steps() == [2]


@pytest.mark.parametrize("first", [0, 1])
def test_fence_holds_with_two_optimizers(tmp_path, slow_copy, first):
    model = make_model()
    head, body = list(model[3].parameters()), [p for m in list(model)[:3] for p in m.parameters()]
    optimizers = [torch.optim.AdamW(body, lr=1e-2), torch.optim.SGD(head, lr=1e-1, momentum=0.9)]
    train(model, optimizers, steps=2)
    state = {"model": model, "body_opt": optimizers[0], "head_opt": optimizers[1]}
    order = [optimizers[first], optimizers[1 - first]]
    with CheckpointManager(tmp_path, snapshot="overlap") as mgr:
        expected = plain(state)
        mgr.save(2, state)
        train(model, order, steps=2)  # whichever optimizer steps first must wait for the copy
        mgr.wait()
    assert_same_tree(expected, asyncckpt.load(tmp_path))


def test_load_state_dict_is_fenced(tmp_path, slow_copy):
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train(model, [opt], steps=2)
    other_model = make_model()
    other_opt = torch.optim.AdamW(other_model.parameters(), lr=1e-2)
    train(other_model, [other_opt], steps=3, seed=7)
    state = {"model": model, "optimizer": opt}
    with CheckpointManager(tmp_path, snapshot="overlap") as mgr:
        expected = plain(state)
        mgr.save(2, state)
        model.load_state_dict(other_model.state_dict())  # copies into the parameters in place
        opt.load_state_dict(other_opt.state_dict())
        mgr.wait()
    assert_same_tree(expected, asyncckpt.load(tmp_path))
    assert torch.equal(model[0].weight, other_model[0].weight)


def test_second_save_restore_and_close_are_fences(tmp_path, slow_copy):
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train(model, [opt], steps=1)
    state = {"model": model, "optimizer": opt}
    with CheckpointManager(tmp_path, snapshot="overlap", max_pending=2, keep_last=None) as mgr:
        first = plain(state)
        mgr.save(1, state)
        mgr.save(2, state)  # no step between: the same state, both commit
        train(model, [opt], steps=1)
        mgr.restore(state)  # waits for both, then loads step 2 into the live state
        assert_same_tree(first, plain(state))
        assert mgr.steps() == [1, 2]
        train(model, [opt], steps=1)
        last = plain(state)
        mgr.save(3, state)
    # close() (leaving the with block) fenced and committed step 3
    assert_same_tree(last, asyncckpt.load(tmp_path, step=3))


def test_waiting_on_the_handle_needs_no_optimizer_step(tmp_path, slow_copy):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    with CheckpointManager(tmp_path, snapshot="overlap") as mgr:
        handle = mgr.save(5, {"model": model, "optimizer": opt})
        path = run_with_timeout(handle.wait, timeout=30)
    assert path == tmp_path / "step-000000000005"


def test_grad_scaler_and_compiled_model(tmp_path, slow_copy):
    model = make_model()
    compiled = torch.compile(model, backend="aot_eager")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    train(compiled, [opt], steps=2, scaler=scaler)
    state = {"model": compiled, "optimizer": opt, "scaler": scaler}
    with CheckpointManager(tmp_path, snapshot="overlap") as mgr:
        expected = plain(state)
        mgr.save(2, state)
        train(compiled, [opt], steps=2, scaler=scaler)  # scaler.step -> optimizer.step -> fence
        mgr.wait()
    assert mgr.stats.records[0].ok
    assert_same_tree(expected, asyncckpt.load(tmp_path))


def test_fence_hooks_go_away_with_the_manager(tmp_path):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    hooks_before = (len(opt._optimizer_step_pre_hooks), len(model._load_state_dict_pre_hooks))
    with CheckpointManager(tmp_path, snapshot="overlap") as mgr:
        mgr.save(1, {"model": model, "optimizer": opt})
        mgr.save(2, {"model": model, "optimizer": opt})
        assert len(opt._optimizer_step_pre_hooks) == hooks_before[0] + 1  # one per object, not per save
        assert len(model._load_state_dict_pre_hooks) == hooks_before[1] + 1
    assert (len(opt._optimizer_step_pre_hooks), len(model._load_state_dict_pre_hooks)) == hooks_before
    train(model, [opt], steps=1)  # and the optimizer still steps after close


def test_overlap_in_the_metrics_log(tmp_path, slow_copy, monkeypatch):
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gate = CommitGate(monkeypatch)
    with CheckpointManager(tmp_path, snapshot="overlap") as mgr:
        gate.close()  # the fence comes before the commit
        mgr.save(1, {"model": model, "optimizer": opt})
        train(model, [opt], steps=1)
        gate.open()
        mgr.wait()
    (record,) = read_log(tmp_path)
    assert record.ok and record.fence_wait_s > 0 and record.lazy_copy_s > 0


def test_unknown_snapshot_mode_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"snapshot must be one of \('blocking', 'overlap'\), got 'lazy'"):
        CheckpointManager(tmp_path, snapshot="lazy")
    CheckpointManager(tmp_path).close()  # the refused constructor left the root unlocked


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_overlap_on_cuda_checkpoint_equals_state_at_save(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048) for _ in range(8)], torch.nn.BatchNorm1d(2048)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)

    def steps(n: int) -> None:
        for _ in range(n):
            model(torch.randn(64, 2048, device="cuda")).square().mean().backward()
            opt.step()
            opt.zero_grad()

    steps(2)
    state = {"model": model, "optimizer": opt}
    with CheckpointManager(tmp_path, snapshot="overlap") as mgr:
        torch.cuda.synchronize()
        expected = plain(state)
        mgr.save(2, state)
        steps(3)  # queued right behind the copy: the fence makes the first step wait on the GPU
        mgr.wait()
        assert mgr.stats.records[0].ok
    assert_same_tree(to_cpu(expected), asyncckpt.load(tmp_path))


class _Interrupted(BaseException):
    """Stands for KeyboardInterrupt (which pytest itself would act on)."""


def test_close_after_an_interrupted_fence_neither_hangs_nor_commits(tmp_path, slow_copy, monkeypatch):
    from asyncckpt.engine.overlap import LazyCopy

    def interrupted(self, count_wait=True, timeout=None):
        raise _Interrupted()

    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    gate = CommitGate(monkeypatch)
    real_abandon = LazyCopy.abandon

    def abandon(self) -> None:
        real_abandon(self)
        gate.open()  # the writer settles only now: it finds the fence abandoned, never passed

    monkeypatch.setattr(LazyCopy, "abandon", abandon)
    mgr = CheckpointManager(tmp_path, snapshot="overlap")
    gate.close()
    handle = mgr.save(1, {"model": model, "optimizer": opt})
    monkeypatch.setattr(LazyCopy, "fence", interrupted)
    with pytest.raises(_Interrupted):
        train(model, [opt], steps=1)  # the interrupt reaches the training loop, as Ctrl-C would

    def close() -> None:
        with pytest.raises(_Interrupted):
            mgr.close()  # its own fence is interrupted too; the writer must still be released

    run_with_timeout(close, timeout=30)
    with pytest.raises(CheckpointError, match="closed without a completed fence"):
        handle.wait(timeout=5)
    assert step_dirs(tmp_path) == []
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.slow  # inductor compiles C++ for ~20 s on 2 cores: `pytest -m slow` runs it
def test_inductor_compiled_model_with_fused_adamw(tmp_path, slow_copy):
    model = make_model()
    compiled = torch.compile(model)  # the default backend, inductor
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    train(compiled, [opt], steps=2)
    state = {"model": compiled, "optimizer": opt}
    with CheckpointManager(tmp_path, snapshot="overlap") as mgr:
        expected = plain(state)
        mgr.save(2, state)
        train(compiled, [opt], steps=2)
        mgr.wait()
    assert_same_tree(expected, asyncckpt.load(tmp_path))


def test_a_save_with_nothing_lazy_commits_without_waiting_for_a_fence(tmp_path, slow_copy):
    """No saved optimizer (or only small tensors): everything was copied eagerly, so the commit must
    not wait for a next save/wait/close that may come much later."""
    from _waiting import wait_until

    model = make_model()
    with CheckpointManager(tmp_path, snapshot="overlap") as mgr:
        expected = plain({"model": model})
        handle = mgr.save(1, {"model": model})
        wait_until(handle.done, timeout=30, what="the commit, with no fence called")
        assert handle.error() is None and mgr.steps() == [1]
    assert_same_tree(expected, asyncckpt.load(tmp_path))


def test_handle_wait_timeout_covers_the_fence(tmp_path, slow_copy):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    state = {"model": model, "optimizer": opt}
    with CheckpointManager(tmp_path, snapshot="overlap") as mgr:
        expected = plain(state)
        handle = mgr.save(1, state)
        with pytest.raises(TimeoutError, match="copy was still running"):
            handle.wait(timeout=0.01)  # the copy thread sleeps 0.3 s first
        assert handle.wait(timeout=30) == tmp_path / "step-000000000001"  # the fence is still owed: passed now
    assert_same_tree(expected, asyncckpt.load(tmp_path))
