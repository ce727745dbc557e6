"""engine/overlap.py on its own: the pending copy built complete, the fences, the writer's verdict."""

from __future__ import annotations

import threading
from concurrent.futures import Future

import pytest
import torch

from asyncckpt import _phases
from asyncckpt.engine.overlap import Fences, LazyCopy, check_verdict, start_copy
from asyncckpt.engine.staging import Arena, CopyEngine, plan_layout
from asyncckpt.errors import CheckpointError, OverlapGuardError
from asyncckpt.metrics import SaveRecord


def _big(value: float) -> torch.Tensor:
    return torch.full((64 << 10,), value)  # 256 KiB: above SMALL_COPY_BYTES


@pytest.fixture
def copier():
    engine = CopyEngine()
    yield engine
    engine.close()


def test_start_copy_returns_a_complete_pending_copy_that_judges_on_the_training_thread(copier, monkeypatch):
    monkeypatch.setitem(_phases._DELAYS, "lazy_copy", 0.2)
    lazy_tensor, eager_tensor = _big(1.0), torch.ones(3)
    layout = plan_layout([lazy_tensor, eager_tensor])
    arena = Arena(layout.total, pinned=False)
    pending = start_copy(copier, [lazy_tensor, eager_tensor], ["w", "b"], [True, False], layout, arena)
    assert not pending.fenced() and pending.trainer == threading.get_ident()
    assert not pending.try_settle()  # the copy thread is still sleeping: a settle point never waits
    pending.fence()  # joins the copy thread
    assert pending.fenced()
    lazy_tensor.add_(1)  # after the verdict: ordered after the copy, so not a change of the snapshot
    pending.wait_copied()
    assert pending.verdict() == []
    assert torch.equal(arena.view(layout.slots[0]), torch.full((64 << 10,), 1.0))
    assert torch.equal(arena.view(layout.slots[1]), torch.ones(3))


def test_a_change_before_the_verdict_is_named_and_refused(copier):
    tensor = _big(0.0)
    layout = plan_layout([tensor])
    pending = start_copy(copier, [tensor], ["model.weight"], [True], layout, Arena(layout.total, pinned=False))
    tensor.add_(1)
    pending.fence()
    pending.wait_copied()
    record = SaveRecord(step=3)
    with pytest.raises(OverlapGuardError, match=r"1 tensor\(s\) changed in place.*model\.weight"):
        check_verdict(pending, record)


def test_nothing_lazy_needs_no_verdict_and_the_constructor_checks_its_lists():
    assert LazyCopy([], [], []).fenced()
    with pytest.raises(ValueError, match="1 tensors, 0 names and 1 versions"):
        LazyCopy([torch.ones(1)], [], [0])


def test_the_verdict_waits_for_the_copy_thread_given_to_the_constructor():
    tensor = torch.ones(2)
    copy: Future = Future()
    pending = LazyCopy([tensor], ["w"], [tensor._version], cpu=copy)
    assert not pending.try_settle()  # the copy is still running
    copy.set_result(None)
    assert pending.try_settle() and pending.verdict() == []


def test_an_abandoned_copy_is_never_committed():
    tensor = torch.ones(2)
    pending = LazyCopy([tensor], ["w"], [tensor._version], cpu=Future())
    pending.abandon()
    with pytest.raises(CheckpointError, match="closed without a completed fence"):
        check_verdict(pending, SaveRecord(step=1))


def test_fences_hook_a_saved_optimizer_once_and_close_removes_the_hooks(copier):
    model = torch.nn.Linear(256, 256)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(2, 256)).sum().backward()
    fences = Fences()
    hooks_before = len(opt._optimizer_step_pre_hooks)
    state = {"model": model, "optimizer": opt}
    tensors = [model.weight, model.bias]
    layout = plan_layout(tensors)
    arena = Arena(layout.total, pinned=False)
    for _ in range(2):
        fences.start(copier, state, tensors, ["model.weight", "model.bias"], layout, arena).wait_copied()
    assert len(opt._optimizer_step_pre_hooks) == hooks_before + 1
    fences.close()
    assert len(opt._optimizer_step_pre_hooks) == hooks_before


def test_a_forgotten_copy_is_abandoned_and_no_longer_pending(copier, monkeypatch):
    from asyncckpt.engine.handle import SaveHandle

    monkeypatch.setitem(_phases._DELAYS, "lazy_copy", 0.1)
    tensor = _big(2.0)
    layout = plan_layout([tensor])
    pending = start_copy(copier, [tensor], ["w"], [True], layout, Arena(layout.total, pinned=False))
    fences = Fences()
    fences.track(pending, SaveHandle(1))
    assert fences.pending()
    fences.forget(pending)  # returns once the copy thread is done with the arena
    assert not fences.pending() and pending.abandoned


def _spanned_bytes(t: torch.Tensor) -> tuple[int, int]:
    """The byte range an independent route says ``t`` reads: every element's storage index."""
    if t.numel() == 0:
        first = t.storage_offset() * t.element_size()
        return first, first
    index = torch.arange(t.untyped_storage().nbytes() // t.element_size()).as_strided(
        t.shape, t.stride(), t.storage_offset()
    )
    return int(index.min()) * t.element_size(), (int(index.max()) + 1) * t.element_size()


@pytest.mark.parametrize(
    "make",
    [
        lambda base: base,
        lambda base: base[2:5],
        lambda base: base.t(),
        lambda base: base[:, 1:3],
        lambda base: base[1::2, ::3],
        lambda base: base[3],
        lambda base: base[3, 4],
        lambda base: base[0:0],
        lambda base: base[1:2, 0:1],
        lambda base: base[4].unsqueeze(0).expand(3, -1),
        lambda base: base.view(torch.int16)[1:, 2:9],
    ],
)
def test_tensor_key_spans_exactly_the_bytes_the_tensor_reads(make):
    from asyncckpt.engine.overlap import _tensor_key

    base = torch.zeros(8, 6)
    t = make(base)
    storage, first, end = _tensor_key(t)
    assert storage == (base.device, base.untyped_storage().data_ptr())
    assert (first, end) == _spanned_bytes(t)
