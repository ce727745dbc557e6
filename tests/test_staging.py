"""staging.py: layout planning, arena views, arena reuse and the copy into the arena."""

from __future__ import annotations

import gc
import threading

import pytest
import torch

from _fake_cuda import FakeCudart
from asyncckpt.engine import staging
from asyncckpt.engine.staging import Arena, ArenaPool, CopyEngine, DtypeGroup, TensorSlot, plan_layout
from asyncckpt.format import ALIGNMENT, DTYPES


def stage(tensors, pool=None):
    layout = plan_layout(tensors)
    arena = (pool or ArenaPool(pinned=False)).acquire(layout.total)
    CopyEngine().copy(tensors, layout, arena)
    return layout, arena


def test_plan_layout_groups_by_dtype_in_first_seen_order_with_64_byte_alignment():
    tensors = [
        torch.zeros(3, dtype=torch.float32),  # 12 bytes
        torch.zeros(5, dtype=torch.int64),  # 40 bytes
        torch.zeros(2, 5, dtype=torch.float32),  # 40 bytes, joins the float32 group
        torch.zeros(7, dtype=torch.bfloat16),  # 14 bytes
    ]
    layout = plan_layout(tensors)
    assert layout.slots == [
        TensorSlot(torch.float32, (3,), 0, 12),
        TensorSlot(torch.int64, (5,), 128, 40),
        TensorSlot(torch.float32, (2, 5), 64, 40),
        TensorSlot(torch.bfloat16, (7,), 192, 14),
    ]
    assert layout.groups == [
        DtypeGroup(torch.float32, 0, 128),
        DtypeGroup(torch.int64, 128, 192),
        DtypeGroup(torch.bfloat16, 192, 256),
    ]
    assert layout.total == 256


def test_plan_layout_slots_are_aligned_disjoint_and_inside_their_group():
    gen = torch.Generator().manual_seed(5)
    dtypes = [torch.float32, torch.float16, torch.int8, torch.float64, torch.bool, torch.complex64]
    tensors = []
    for i in range(40):
        n = int(torch.randint(0, 300, (1,), generator=gen))
        tensors.append(torch.zeros(n, dtype=dtypes[i % len(dtypes)]))
    layout = plan_layout(tensors)
    spans = []
    for tensor, slot in zip(tensors, layout.slots, strict=True):
        assert slot.offset % ALIGNMENT == 0
        assert slot.nbytes == tensor.numel() * tensor.element_size()
        assert slot.dtype == tensor.dtype and slot.shape == tuple(tensor.shape)
        (group,) = [g for g in layout.groups if g.dtype == tensor.dtype]
        assert group.start <= slot.offset and slot.offset + slot.nbytes <= group.end
        if slot.nbytes:
            spans.append((slot.offset, slot.offset + slot.nbytes))
    spans.sort()
    for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
        assert end <= start
    for a, b in zip(layout.groups, layout.groups[1:], strict=False):
        assert a.end == b.start and a.start % ALIGNMENT == 0
    assert layout.groups[0].start == 0 and layout.groups[-1].end == layout.total
    assert len({g.dtype for g in layout.groups}) == len(layout.groups)


def test_empty_tensors_take_no_space_and_make_no_group():
    layout = plan_layout([torch.zeros(0, 3, dtype=torch.int16), torch.ones(2), torch.zeros(0)])
    assert [s.nbytes for s in layout.slots] == [0, 8, 0]
    assert layout.groups == [DtypeGroup(torch.float32, 0, 64)]
    assert layout.total == 64


def test_plan_layout_of_nothing():
    layout = plan_layout([])
    assert layout.slots == [] and layout.groups == [] and layout.total == 0


def test_plan_layout_refuses_a_dtype_the_format_cannot_store():
    with pytest.raises(TypeError, match="not supported by the checkpoint format"):
        plan_layout([torch.zeros(2), torch.empty(4, dtype=torch.bits8)])


def test_arena_views_share_the_buffer_at_their_offsets():
    arena = Arena(256, pinned=False)
    assert arena.capacity == 256 and not arena.pinned
    assert arena.buffer.dtype == torch.uint8 and not arena.buffer.any()
    slot = TensorSlot(torch.float32, (2, 3), 64, 24)
    view = arena.view(slot)
    assert view.dtype == torch.float32 and view.shape == (2, 3)
    assert view.data_ptr() == arena.buffer.data_ptr() + 64
    view.fill_(1.0)
    assert torch.equal(arena.raw(64, 88), torch.ones(6).view(torch.uint8))
    assert not arena.raw(0, 64).any() and not arena.raw(88, 256).any()
    assert arena.raw(10, 20).shape == (10,) and arena.raw(10, 20).data_ptr() == arena.buffer.data_ptr() + 10


def test_zero_capacity_arena_still_works():
    arena = Arena(0, pinned=False)
    view = arena.view(TensorSlot(torch.float32, (0, 4), 0, 0))
    assert view.shape == (0, 4)


def test_arena_pool_reuses_one_arena_for_repeated_saves_of_one_size():
    pool = ArenaPool(pinned=False)
    first = pool.acquire(10_000)
    pool.release(first)
    for _ in range(50):
        arena = pool.acquire(10_000)
        assert arena is first
        pool.release(arena)
    assert pool.allocations == 1
    assert pool.held_bytes() == 10_000


def test_arena_pool_keeps_one_arena_per_save_in_flight():
    pool = ArenaPool(pinned=False)
    for _ in range(10):
        a, b = pool.acquire(4096), pool.acquire(4096)
        assert a is not b
        pool.release(a)
        pool.release(b)
    assert pool.allocations == 2


def test_arena_pool_serves_a_smaller_state_from_a_big_arena_and_replaces_a_small_one():
    pool = ArenaPool(pinned=False)
    small = pool.acquire(1000)
    pool.release(small)
    big = pool.acquire(5000)  # the small arena is dropped, not hoarded
    assert big is not small and big.capacity >= 5000
    assert pool.allocations == 2 and pool.held_bytes() == 0
    pool.release(big)
    assert pool.acquire(100) is big
    assert pool.allocations == 2


@pytest.mark.parametrize("name", sorted(DTYPES))
@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
def test_copy_is_bit_exact_for_every_format_dtype(name):
    dtype = DTYPES[name]
    gen = torch.Generator().manual_seed(2)
    if dtype == torch.bool:
        source = torch.randint(0, 2, (37,), generator=gen).bool()
    else:
        source = torch.randint(0, 256, (37 * dtype.itemsize,), dtype=torch.uint8, generator=gen).view(dtype)
    pad = torch.ones(3, dtype=torch.int16)
    layout, arena = stage([pad, source])
    slot = layout.slots[1]
    assert torch.equal(arena.raw(slot.offset, slot.offset + slot.nbytes), source.view(torch.uint8))


def test_copy_is_a_real_copy_not_a_view():
    source = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    layout, arena = stage([source])
    source.add_(100)
    source[0, 0] = -1
    assert torch.equal(arena.view(layout.slots[0]), torch.arange(12, dtype=torch.float32).reshape(3, 4))
    assert arena.view(layout.slots[0]).data_ptr() != source.data_ptr()


def test_copy_of_non_contiguous_and_tied_tensors():
    base = torch.arange(24, dtype=torch.int32).reshape(4, 6)
    tensors = [base.t(), base[:, ::2], torch.tensor([1.5, 2.5]).expand(3, 2), base]
    layout, arena = stage(tensors)
    for tensor, slot in zip(tensors, layout.slots, strict=True):
        assert torch.equal(arena.view(slot), tensor)
        assert arena.view(slot).is_contiguous()


def test_copy_leaves_padding_zero_in_a_fresh_arena():
    tensors = [torch.full((3,), -1.0), torch.full((5,), -1, dtype=torch.int64)]
    layout, arena = stage(tensors)
    data = arena.raw(0, layout.total).clone()
    for slot in layout.slots:
        data[slot.offset : slot.offset + slot.nbytes] = 0
    assert not data.any()


def test_padding_stays_zero_when_an_arena_is_reused_for_another_layout():
    """The arena is zeroed once "so alignment padding never carries stale bytes into a checkpoint",
    but a pooled arena reused for a different (here: smaller) layout still holds the previous
    save's tensor bytes where the new layout has padding, and those bytes get written."""
    pool = ArenaPool(pinned=False)
    _, arena = stage([torch.full((16,), 7.0)], pool)  # fills bytes 0..64
    pool.release(arena)
    layout, reused = stage([torch.ones(3)], pool)  # 12 bytes of data, padding 12..64
    assert reused is arena and layout.total == 64
    padding = reused.raw(12, layout.total)
    assert not padding.any(), f"stale bytes in padding: {padding.tolist()}"


def test_copy_skips_empty_tensors():
    tensors = [torch.zeros(0), torch.full((2,), 3.0)]
    layout, arena = stage(tensors)
    assert torch.equal(arena.view(layout.slots[1]), torch.full((2,), 3.0))
    assert arena.view(layout.slots[0]).numel() == 0


def test_a_pinned_arena_registers_exactly_its_bytes_and_unregisters_once_freed(monkeypatch):
    fake = FakeCudart()
    fake.install(monkeypatch)
    nbytes = 3_000_005  # no power of two: PyTorch's pinned cache would round this to 4 MiB
    arena = Arena(nbytes, pinned=True)
    address = arena.buffer.data_ptr()
    assert fake.registered == [(address, nbytes, 1)]
    assert arena.buffer.numel() == nbytes and not arena.buffer.any()
    view = arena.raw(0, 64)  # the pipeline's views keep the memory (and its registration) alive
    del arena
    gc.collect()
    assert fake.unregistered == []
    del view
    gc.collect()
    assert fake.unregistered == [address]


def test_a_closed_pool_unregisters_its_pinned_arenas(monkeypatch):
    fake = FakeCudart()
    fake.install(monkeypatch)
    pool = ArenaPool(pinned=True)
    arena = pool.acquire(1 << 20)
    address = arena.buffer.data_ptr()
    pool.release(arena)
    del arena
    gc.collect()
    assert fake.unregistered == []  # a free arena is kept for the next save
    pool.clear()
    gc.collect()
    assert fake.unregistered == [address]


def test_a_failed_registration_falls_back_to_pytorchs_pinned_allocator_with_a_warning(monkeypatch):
    fake = FakeCudart(error=2)
    fake.install(monkeypatch)
    fallback = torch.full((4096,), 0, dtype=torch.uint8)
    monkeypatch.setattr(staging, "_cached_pinned_zeros", lambda n: fallback[:n])
    with pytest.warns(RuntimeWarning, match=r"cudaHostRegister .* failed \(CUDA error 2\)"):
        arena = Arena(4000, pinned=True)
    assert arena.buffer.data_ptr() == fallback.data_ptr()
    gc.collect()
    assert fake.unregistered == []  # nothing was registered, so nothing is unregistered


def test_cuda_host_calls_run_on_a_throwaway_thread_on_the_callers_device(monkeypatch):
    # A failed cudaHostRegister stays as the thread's CUDA "last error" until the next kernel
    # launch raises it: it must never be the training thread's. And no other GPU may get a context.
    fake = FakeCudart(error=2)
    fake.install(monkeypatch, device=3)
    monkeypatch.setattr(staging, "_cached_pinned_zeros", lambda n: torch.zeros(n, dtype=torch.uint8))
    with pytest.warns(RuntimeWarning):
        Arena(4096, pinned=True)
    fake.error = 0
    arena = Arena(4096, pinned=True)
    del arena
    gc.collect()
    assert len(fake.threads) == 3 and threading.get_ident() not in fake.threads
    assert fake.devices == [3, 3, 3]


def test_a_failed_cpu_copy_still_waits_for_the_gpu_copies_before_raising(monkeypatch):
    # The arena is released right after wait_copied raises: no DMA may still be writing into it.
    import contextlib
    from concurrent.futures import Future

    from asyncckpt.engine.overlap import DeviceCopy, LazyCopy

    class FakeEvent:
        synchronized = False

        def synchronize(self) -> None:
            self.synchronized = True

    failed: Future = Future()
    failed.set_exception(RuntimeError("copy thread failed"))
    event = FakeEvent()
    lazy = LazyCopy([], [], [], cpu=failed, devices={torch.device("cuda", 0): DeviceCopy(event, None)})
    devices = []
    monkeypatch.setattr(torch.cuda, "device", lambda d: devices.append(d) or contextlib.nullcontext())
    with pytest.raises(RuntimeError, match="copy thread failed"):
        lazy.wait_copied()
    assert event.synchronized and devices == [torch.device("cuda", 0)]  # on the event's device


class _FakeStream:
    """Stands in for a CUDA stream: logs what is queued on it."""

    def __init__(self, name: str, log: list, device: torch.device) -> None:
        self.name, self._log, self.device = name, log, device

    def wait_event(self, event) -> None:
        self._log.append(("wait", self.name, event))


class _FakeTimingEvent:
    """Stands in for torch.cuda.Event(enable_timing=True): completion and elapsed times are scripted."""

    elapsed_ms: dict = {}  # noqa: RUF012 - (before, after) -> ms, set per test

    def __init__(self, enable_timing: bool = False) -> None:
        assert enable_timing
        self.done = True  # query(): the stream has passed this event

    def record(self, stream: _FakeStream) -> None:
        stream._log.append(("record", stream.name, self))

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        raise AssertionError("the writer must poll, not block: a stuck stream would hold it forever")

    def elapsed_time(self, end: _FakeTimingEvent) -> float:
        assert end.done, "elapsed_time needs the end event complete"
        return self.elapsed_ms[(self, end)]


class _FakeCuda:
    """torch.cuda's stream context, capture query and current stream, per thread as in CUDA."""

    def __init__(self, monkeypatch, compute: dict) -> None:
        import contextlib

        self.capturing: set = set()  # streams being captured into a CUDA graph
        self.entered: list = []  # devices the writer read events on
        self._current = threading.local()

        @contextlib.contextmanager
        def stream(s):
            before = getattr(self._current, "stream", None)
            self._current.stream = s
            try:
                yield
            finally:
                self._current.stream = before

        monkeypatch.setattr(torch.cuda, "Event", _FakeTimingEvent)
        monkeypatch.setattr(torch.cuda, "stream", stream)
        monkeypatch.setattr(
            torch.cuda, "is_current_stream_capturing", lambda: getattr(self._current, "stream", None) in self.capturing
        )
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device: compute[device])
        monkeypatch.setattr(torch.cuda, "device", lambda d: self.entered.append(d) or contextlib.nullcontext())


def _gpu_lazy_copy(monkeypatch, devices: list[int], log: list, cpu_copy=None):
    """A LazyCopy as overlap.start_copy leaves it for GPU tensors, with fake streams and events."""
    from asyncckpt.engine.overlap import DeviceCopy, LazyCopy

    tensor = torch.zeros(4)
    copy_done, compute = {}, {}
    for index in devices:
        device = torch.device("cuda", index)
        copy_done[device] = object()
        compute[device] = _FakeStream(f"compute{index}", log, device)
    on_gpu = {device: DeviceCopy(copy_done[device], compute[device]) for device in copy_done}
    lazy = LazyCopy([tensor], ["w"], [tensor._version], cpu=cpu_copy, devices=on_gpu)
    return lazy, copy_done, compute, _FakeCuda(monkeypatch, compute)


def _marks(log: list) -> list:
    """(before, after) timing events of each fence in the log: record, wait, record."""
    starts = [i for i in range(len(log) - 2) if log[i][0] == "record" and log[i + 1][0] == "wait"]
    return [(log[i][2], log[i + 2][2]) for i in starts]


def test_the_gpu_fence_wait_is_timed_on_the_compute_stream_around_its_wait(monkeypatch):
    log: list = []
    lazy, copy_done, compute, cuda = _gpu_lazy_copy(monkeypatch, [0, 1], log)
    lazy.fence()
    assert cuda.entered == list(copy_done)  # the capture check ran on each stream's own device
    cuda.entered.clear()
    # Per device: a timing event, the wait for the copy, a timing event, all on training's stream.
    for index, device in enumerate(copy_done):
        record_before, wait, record_after = log[3 * index : 3 * index + 3]
        assert record_before[:2] == ("record", f"compute{device.index}")
        assert wait == ("wait", f"compute{device.index}", copy_done[device])
        assert record_after[:2] == ("record", f"compute{device.index}")
    marks = _marks(log)
    _FakeTimingEvent.elapsed_ms = {marks[0]: 12.5, marks[1]: 30.0}
    # Devices wait side by side: the longest wait is training's.
    assert lazy.gpu_fence_wait(timeout=1.0) == pytest.approx(0.030)
    assert cuda.entered == list(copy_done)  # each read on its own device, never on the thread's current one


def test_a_stream_that_has_not_reached_its_fence_is_not_waited_for(monkeypatch):
    log: list = []
    lazy, _, _, _ = _gpu_lazy_copy(monkeypatch, [0], log)
    lazy.fence()
    ((before, after),) = _marks(log)
    after.done = False  # training's stream is stuck before the fence (a hung collective, say)
    assert lazy.gpu_fence_wait(timeout=0.05) is None  # polled to its deadline (synchronize() would raise)
    after.done = True
    _FakeTimingEvent.elapsed_ms = {(before, after): 7.0}
    assert lazy.gpu_fence_wait(timeout=0.05) == pytest.approx(0.007)


def test_a_fence_retried_after_an_interrupt_keeps_its_first_timing(monkeypatch):
    from concurrent.futures import Future

    log: list = []
    cpu_copy: Future = Future()  # a CPU copy still running: the fence times out after the GPU part
    lazy, copy_done, _, _ = _gpu_lazy_copy(monkeypatch, [0], log, cpu_copy=cpu_copy)
    with pytest.raises(TimeoutError):
        lazy.fence(timeout=0.01)
    first = _marks(log)
    cpu_copy.set_result(None)
    lazy.fence()
    # The retry orders training after the copy again but records no second pair: the stream was
    # already waiting since the first attempt, and a new pair would time almost nothing.
    assert [entry[0] for entry in log] == ["record", "wait", "record", "wait"]
    assert lazy._gpu_wait_marks == {torch.device("cuda", 0): first[0]} and lazy.fenced()


def test_no_gpu_fence_wait_without_a_fence_or_while_the_compute_stream_is_captured(monkeypatch):
    log: list = []
    lazy, copy_done, compute, cuda = _gpu_lazy_copy(monkeypatch, [0], log)
    assert lazy.gpu_fence_wait(timeout=1.0) == 0.0  # not fenced yet: nothing was timed
    # Training captures a CUDA graph on its stream while the fence runs from this thread, whose
    # own current stream is not capturing: no event may be recorded into the captured stream.
    cuda.capturing.add(compute[torch.device("cuda", 0)])
    lazy.fence()
    assert [entry[0] for entry in log] == ["wait"]  # the wait still orders training; no events recorded
    assert lazy.gpu_fence_wait(timeout=1.0) == 0.0


def test_plan_layout_returns_the_previous_layout_while_the_tensors_fit_it():
    tensors = [torch.zeros(3, 5), torch.zeros(7, dtype=torch.int8), torch.zeros(0), torch.zeros(2, 2)]
    first = plan_layout(tensors)
    same = [torch.ones(3, 5), torch.ones(7, dtype=torch.int8), torch.ones(0), torch.ones(2, 2).t()]
    assert plan_layout(same, like=first) is first


@pytest.mark.parametrize(
    "changed",
    [
        [torch.zeros(3, 6), torch.zeros(7, dtype=torch.int8), torch.zeros(0), torch.zeros(2, 2)],  # a shape
        [torch.zeros(15), torch.zeros(7, dtype=torch.int8), torch.zeros(0), torch.zeros(2, 2)],  # same size
        [torch.zeros(3, 5), torch.zeros(7, dtype=torch.uint8), torch.zeros(0), torch.zeros(2, 2)],  # a dtype
        [torch.zeros(3, 5), torch.zeros(7, dtype=torch.int8), torch.zeros(0)],  # one fewer
        [torch.zeros(3, 5), torch.zeros(7, dtype=torch.int8), torch.zeros(0), torch.zeros(2, 2), torch.zeros(1)],
    ],
)
def test_plan_layout_plans_anew_when_a_tensor_changed(changed):
    first = plan_layout([torch.zeros(3, 5), torch.zeros(7, dtype=torch.int8), torch.zeros(0), torch.zeros(2, 2)])
    layout = plan_layout(changed, like=first)
    assert layout is not first
    assert layout == plan_layout(changed)


def test_arena_views_are_made_once_per_layout_and_are_the_slot_views():
    tensors = [torch.zeros(3, 5), torch.zeros(0, 4), torch.zeros(9, dtype=torch.float16)]
    layout = plan_layout(tensors)
    arena = Arena(layout.total, pinned=False)
    views = arena.views(layout)
    assert arena.views(layout) is views
    for view, slot in zip(views, layout.slots, strict=True):
        expected = arena.view(slot)
        assert (view.data_ptr(), view.dtype, view.shape) == (expected.data_ptr(), expected.dtype, expected.shape)
    other = plan_layout([torch.zeros(15), torch.zeros(0, 4), torch.zeros(9, dtype=torch.float16)])
    assert [v.shape for v in arena.views(other)] == [(15,), (0, 4), (9,)]


def test_a_copy_with_the_previous_layout_lands_every_new_value():
    pool = ArenaPool(pinned=False)
    first = [torch.randn(4, 3), torch.arange(5, dtype=torch.int64)]
    layout, arena = stage(first, pool)
    pool.release(arena)
    second = [torch.randn(4, 3), torch.arange(5, 10, dtype=torch.int64)]
    again = plan_layout(second, like=layout)
    arena = pool.acquire(again.total)
    CopyEngine().copy(second, again, arena)
    assert again is layout
    for tensor, slot in zip(second, again.slots, strict=True):
        assert torch.equal(arena.view(slot), tensor)


def test_arena_views_made_inside_inference_mode_take_copies_outside_it():
    layout = plan_layout([torch.zeros(3, 5)])
    arena = Arena(layout.total, pinned=False)
    with torch.inference_mode():
        views = arena.views(layout)
    views[0].copy_(torch.ones(3, 5))  # an inference tensor would refuse this
    assert torch.equal(arena.view(layout.slots[0]), torch.ones(3, 5))


def test_a_layout_s_manifest_entries_are_made_once_for_every_save_it_serves():
    from asyncckpt.format import TensorEntry

    tensors = [torch.zeros(3, 2), torch.zeros(5, dtype=torch.int64), torch.zeros(0)]
    layout = plan_layout(tensors)
    want = [TensorEntry(staging.dtype_name(s.dtype), s.shape, s.offset, s.nbytes) for s in layout.slots]
    assert layout.entries == want
    assert [e.shape for e in layout.entries] == [(3, 2), (5,), (0,)]
    again = plan_layout([torch.ones(3, 2), torch.ones(5, dtype=torch.int64), torch.ones(0)], like=layout)
    assert again is layout
    assert plan_layout([torch.ones(2, 3)], like=layout).entries[0].shape == (2, 3)  # a new layout, new entries
