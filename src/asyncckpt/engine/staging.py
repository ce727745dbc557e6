"""Host staging: one reusable arena of host memory and the copy of live tensors into it.

Allocating (and, with CUDA, pinning) host memory costs far more than copying into it (pinning
ran at 1.1-1.9 GB/s on an H100 host, the copy at 54 GB/s), so arenas are allocated once, sized to
the state, and reused by every later save. One arena per save in flight (``max_pending``).
"""

from __future__ import annotations

import contextlib
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from typing import TypeVar

import torch

from asyncckpt import _phases
from asyncckpt.format import ALIGNMENT, dtype_name

# Overlap mode copies tensors below this size before ``save`` returns: they cost next to nothing,
# and their version counters then need no watching.
SMALL_COPY_BYTES = 64 << 10

_HOST_REGISTER_PORTABLE = 1  # cudaHostRegisterPortable: pinned for every CUDA context


T = TypeVar("T")


def in_new_thread(fn: Callable[[], T]) -> T:
    """``fn()`` on a fresh thread, whose per-thread state (torch's thread count, CUDA's last
    error) starts from the defaults and dies with it."""
    outcome: list[tuple[bool, object]] = []

    def run() -> None:
        try:
            outcome.append((True, fn()))
        except BaseException as exc:  # noqa: BLE001 - raised again on the calling thread
            outcome.append((False, exc))

    thread = threading.Thread(target=run, name="asyncckpt-helper")
    thread.start()
    thread.join()
    ok, value = outcome[0]
    if not ok:
        raise value  # type: ignore[misc]
    return value  # type: ignore[return-value]


def _cuda_call_in_new_thread(device: int, call: Callable[[], int]) -> int:
    """A cudart call that returns its error instead of raising leaves it as the calling thread's
    CUDA last error, which the next kernel launch on that thread would raise as its own. Made on
    a throwaway thread (on the caller's device, so no other GPU gets a context), it cannot."""

    def on_device() -> int:
        torch.cuda.set_device(device)
        return int(call())

    return in_new_thread(on_device)


def _unregister_host_memory(device: int, address: int) -> None:
    _cuda_call_in_new_thread(device, lambda: torch.cuda.cudart().cudaHostUnregister(address))


def _cached_pinned_zeros(nbytes: int) -> torch.Tensor:
    return torch.zeros(nbytes, dtype=torch.uint8, pin_memory=True)


def _pinned_zeros(nbytes: int) -> torch.Tensor:
    """Zeroed host memory of exactly ``nbytes``, page-locked for CUDA.

    ``torch.zeros(pin_memory=True)`` goes through PyTorch's pinned-memory cache, which rounds every
    block up to a power of two (a 4.4 GB state would pin 8 GiB, a 70 GB one 128 GiB) and keeps
    freed blocks pinned after the arena is gone. So the arena is ordinary host memory registered
    with CUDA, unregistered when its storage is freed; if registering fails (a locked-memory
    limit, say), PyTorch's pinned allocator is the fallback, with a warning.
    """
    buffer = torch.zeros(nbytes, dtype=torch.uint8)
    storage = buffer.untyped_storage()
    address, size = storage.data_ptr(), storage.nbytes()
    device = torch.cuda.current_device()
    error = _cuda_call_in_new_thread(
        device, lambda: torch.cuda.cudart().cudaHostRegister(address, size, _HOST_REGISTER_PORTABLE)
    )
    if error != 0:
        del buffer, storage
        warnings.warn(
            f"asyncckpt: cudaHostRegister of a {nbytes / 1e9:.2f} GB staging arena failed (CUDA error "
            f"{error}); using PyTorch's pinned allocator, which rounds it up to a power of two",
            RuntimeWarning,
            stacklevel=3,
        )
        return _cached_pinned_zeros(nbytes)
    release = weakref.finalize(storage, _unregister_host_memory, device, address)
    release.atexit = False  # at exit the CUDA context may already be gone; the process frees all
    return buffer


@dataclass(frozen=True)
class TensorSlot:
    """Where one tensor's bytes go in the arena (and in the checkpoint's logical byte space)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class DtypeGroup:
    """A contiguous arena range holding only tensors of one dtype (chunks never cross groups)."""

    dtype: torch.dtype
    start: int
    end: int


@dataclass(frozen=True)
class Layout:
    slots: list[TensorSlot]
    groups: list[DtypeGroup]
    total: int


def _align(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


def plan_layout(tensors: list[torch.Tensor]) -> Layout:
    """Group tensors by dtype (first-seen order) and give each a 64-byte aligned slot."""
    order: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        dtype_name(t.dtype)  # raises for dtypes the format cannot store
        order.setdefault(t.dtype, []).append(i)
    slots: list[TensorSlot | None] = [None] * len(tensors)
    groups = []
    cursor = 0
    for dtype, indices in order.items():
        start = cursor
        for i in indices:
            t = tensors[i]
            nbytes = t.numel() * t.element_size()
            slots[i] = TensorSlot(t.dtype, tuple(t.shape), cursor, nbytes)
            cursor = _align(cursor + nbytes)
        if cursor > start:
            groups.append(DtypeGroup(dtype, start, cursor))
    return Layout(slots, groups, cursor)  # type: ignore[arg-type]


class Arena:
    """A flat uint8 host buffer (pinned when CUDA is present) with typed views into it."""

    def __init__(self, capacity: int, pinned: bool) -> None:
        self.capacity = capacity
        self.pinned = pinned
        # Zeroed once so alignment padding never carries stale bytes into a checkpoint.
        size = max(capacity, 1)
        self.buffer = _pinned_zeros(size) if pinned else torch.zeros(size, dtype=torch.uint8)
        self._slots: list[TensorSlot] | None = None  # the layout whose padding is known to be zero
        self._fresh = True  # all zeros: the first layout needs no clearing

    def hold(self, layout: Layout) -> None:
        """Get ready for ``layout``: re-zero when it differs from the last, so padding stays zero.

        A fresh arena is already zero, so the first save costs what later ones do.
        """
        if self._slots != layout.slots:
            if not self._fresh:
                self.buffer[: layout.total].zero_()
            self._slots = layout.slots
        self._fresh = False

    def raw(self, start: int, end: int) -> torch.Tensor:
        return self.buffer[start:end]

    def view(self, slot: TensorSlot) -> torch.Tensor:
        raw = self.buffer[slot.offset : slot.offset + slot.nbytes]
        return raw.view(slot.dtype).view(slot.shape)


class ArenaPool:
    """Arenas for saves in flight. ``acquire`` never allocates when a free arena is big enough."""

    def __init__(self, pinned: bool) -> None:
        self.pinned = pinned
        self._free: list[Arena] = []
        self._lock = threading.Lock()
        self.allocations = 0  # how many arenas were ever allocated (tests watch for growth)

    def acquire(self, nbytes: int) -> Arena:
        with self._lock:
            fits = [a for a in self._free if a.capacity >= nbytes]
            if fits:
                arena = min(fits, key=lambda a: a.capacity)
                self._free.remove(arena)
                return arena
            if self._free:  # too small for a grown state: drop one rather than hoard memory
                self._free.remove(max(self._free, key=lambda a: a.capacity))
            self.allocations += 1
        return Arena(nbytes, self.pinned)

    def release(self, arena: Arena) -> None:
        with self._lock:
            self._free.append(arena)

    def clear(self) -> None:
        """Let go of every free arena (pinned memory is scarce: a closed manager keeps none)."""
        with self._lock:
            self._free.clear()

    def held_bytes(self) -> int:
        with self._lock:
            return sum(a.capacity for a in self._free)


class LazyCopy:
    """The part of an overlap-mode snapshot that may still be copying when ``save`` returns.

    Three threads meet here. The copy runs on a copy thread (CPU tensors) or a copy stream (GPU).
    The training thread (the one that called ``save``) gives the *verdict*: "copy complete and no
    lazily copied tensor changed in place since ``save``". A version counter moves only when its
    in-place op returns, so the counters are read only on that thread, where every earlier op of
    it has returned; read on the writer, they would miss an op still running there. Two places give
    it: a *fence* (the next optimizer step, restore, save, wait, close: on GPU the stream then waits
    for the copy without blocking the host, on CPU the copy thread is joined, so anything after it
    is ordered after the copy), and a *settle point* (a forward of a saved module), which never
    waits: it gives the verdict only if the copy has already finished, so anything after it comes
    after the copy too. The writer waits for the verdict before committing, and never decides alone.
    """

    def __init__(
        self, tensors: list[torch.Tensor], names: list[str], versions: list[int], trainer: int | None = None
    ) -> None:
        self._tensors = tensors
        self.trainer = threading.get_ident() if trainer is None else trainer  # the thread whose ops count
        self._names = names
        self._versions = versions
        self._cpu: Future | None = None
        self._events: dict[torch.device, torch.cuda.Event] = {}
        self._compute: dict[torch.device, torch.cuda.Stream] = {}  # the stream save() was called on
        # Timing events on each compute stream around its wait at the fence: the host does not block
        # there, so how long training's GPU work waited for the copy is only visible on the device.
        self._gpu_wait_marks: dict[torch.device, tuple[torch.cuda.Event, torch.cuda.Event]] = {}
        self._lock = threading.Lock()
        self._fenced = threading.Event()
        self.changed: list[str] = []  # guard verdict: tensors updated in place before the verdict
        self.started = time.perf_counter()
        self.copy_s = 0.0  # from save to the last byte copied (known once wait_copied returns)
        self.fence_wait_s = 0.0  # how long the fencing thread waited (known once fenced)
        self.abandoned = False  # no fence ever completed: the guard never ran
        if not tensors:  # nothing a later step could touch mid-copy: no fence to wait for
            self._fenced.set()

    def wait_copied(self) -> None:
        """Block until every lazy byte is in the arena (writer thread). Raises if the copy failed."""
        try:
            if self._cpu is not None:
                self._cpu.result()
        finally:  # even when the CPU copy failed: the arena is released next, and DMA must be done
            for device, event in self._events.items():
                # On the event's device: a CUDA call from a thread with no current device would
                # bind (and maybe create) a context on GPU 0, in every rank of a multi-GPU job.
                with torch.cuda.device(device):
                    event.synchronize()
        self.copy_s = time.perf_counter() - self.started

    def fence(self, count_wait: bool = True, timeout: float | None = None) -> float:
        """Order later updates after the copy and run the guard; idempotent. Returns seconds waited.

        The wait is kept in ``fence_wait_s`` (unless ``count_wait`` is false) before the verdict is
        published, so the writer, which commits and logs right after, always sees it. TimeoutError
        (fence not passed) if the CPU copy is still running after ``timeout`` seconds.
        """
        with self._lock:
            if self._fenced.is_set():
                return 0.0
            began = time.perf_counter()
            for device, event in self._events.items():
                # The stream training ran on at save(), and this thread's own: a fence reached from
                # another thread (handle.wait, the asyncio façade) must still order training's work.
                compute = self._compute[device]
                # Timed even inside save (count_wait false): its wait_prev_s sees only the host's
                # wait. Timed once: a fence retried after an interrupt finds the stream already
                # waiting, and a second pair of events would time nothing. Never into a stream being
                # captured into a CUDA graph (recording there would break the capture).
                timed = device not in self._gpu_wait_marks and not _capturing(compute)
                if timed:
                    before = torch.cuda.Event(enable_timing=True)
                    before.record(compute)
                compute.wait_event(event)
                if timed:
                    after = torch.cuda.Event(enable_timing=True)
                    after.record(compute)
                    self._gpu_wait_marks[device] = (before, after)
                current = torch.cuda.current_stream(device)
                if current != compute:
                    current.wait_event(event)
            if self._cpu is not None:
                # Not result(): a failed copy is the writer's to report, and an interrupt (Ctrl-C, a
                # signal handler's exception) while waiting must propagate with the fence unpassed.
                if not wait_futures([self._cpu], timeout).done:
                    raise TimeoutError(f"overlap fence: the copy was still running after {timeout} s")
            waited = time.perf_counter() - began
            watched = zip(self._tensors, self._versions, self._names, strict=True)
            self.changed = [name for tensor, version, name in watched if tensor._version != version]
            self._tensors = []  # the copy is ordered before anything later: stop holding the tensors
            if count_wait:
                self.fence_wait_s = waited
            self._fenced.set()
            return waited

    def fenced(self) -> bool:
        return self._fenced.is_set()

    def gpu_fence_wait(self, timeout: float) -> float | None:
        """Seconds training's compute stream waited at the fence for the copy; the longest over
        devices, which wait side by side. 0.0 on CPU or where nothing was timed.

        Read on the writer thread after the commit, when the stream has normally long passed its
        fence. None if a stream has not got there within ``timeout`` seconds (queued far behind,
        or stuck): a metric is never worth holding up a checkpoint or ``close``.
        """
        deadline = time.monotonic() + timeout
        waited = 0.0
        with self._lock:  # a fence may be adding marks right now: the commit no longer waits for it
            marks = list(self._gpu_wait_marks.items())
        for device, (before, after) in marks:
            with torch.cuda.device(device):  # as in wait_copied: never bind a context on GPU 0
                while not after.query():  # not synchronize(): no timeout, and it spins a core
                    if time.monotonic() >= deadline:
                        return None
                    time.sleep(0.001)
                waited = max(waited, before.elapsed_time(after) / 1e3)
        return waited

    def abandon(self) -> None:
        """Give the writer a verdict when no fence can complete (close after an interrupted fence):
        the snapshot is then unverified, and the writer refuses to commit it."""
        with self._lock:
            if not self._fenced.is_set():
                self.abandoned = True
                self._tensors = []
                self._fenced.set()

    def try_settle(self) -> bool:
        """A settle point: give the verdict if the copy has already finished; never wait, never sync.

        Only on the training thread (elsewhere an in-place op of that thread may still be running,
        its counter not moved yet). On GPU only ``event.query()``, and nothing at all while this
        thread's stream is being captured into a CUDA graph (a query there would break the
        capture). True once a verdict is in (here or earlier)."""
        if threading.get_ident() != self.trainer or not self._lock.acquire(blocking=False):
            return self._fenced.is_set()
        try:
            if self._fenced.is_set():
                return True
            if self._cpu is not None and not self._cpu.done():
                return False
            if self._events:
                if torch.cuda.is_current_stream_capturing():
                    return False
                for device, event in self._events.items():
                    with torch.cuda.device(device):
                        if not event.query():
                            return False
            watched = zip(self._tensors, self._versions, self._names, strict=True)
            self.changed = [name for tensor, version, name in watched if tensor._version != version]
            self._tensors = []
            self._fenced.set()
            return True
        finally:
            self._lock.release()

    def verdict(self) -> list[str]:
        """Writer thread, once ``wait_copied`` returned: wait for the training thread's verdict (a
        fence or a settle point) and return the names of lazily copied tensors changed in place."""
        self._fenced.wait()
        with self._lock:
            return self.changed


@contextlib.contextmanager
def on_stream(stream: torch.cuda.Stream) -> Iterator[None]:
    """``stream`` current, on its own device. torch.cuda.stream alone switches a thread whose current
    device is another one with a plain set-device, there and back, which creates a CUDA context on
    the thread's device (GPU 0 for a fresh thread: hundreds of MB in every rank of a multi-GPU job);
    torch.cuda.device restores the device without that."""
    with torch.cuda.device(stream.device), torch.cuda.stream(stream):
        yield


def _capturing(stream: torch.cuda.Stream) -> bool:
    """Whether ``stream`` (not the calling thread's current one) is being captured into a CUDA graph."""
    with on_stream(stream):
        return torch.cuda.is_current_stream_capturing()


_TRAINER = threading.local()


@contextlib.contextmanager
def training_thread(ident: int) -> Iterator[None]:
    """Saves started inside count ``ident`` as their training thread (a façade that saves from a
    worker thread on behalf of the thread that runs training)."""
    before = getattr(_TRAINER, "ident", None)
    _TRAINER.ident = ident
    try:
        yield
    finally:
        _TRAINER.ident = before


def _version(tensor: torch.Tensor) -> int | None:
    try:
        return tensor._version
    except RuntimeError:  # inference tensors have no version counter: copy them eagerly
        return None


class CopyEngine:
    """Copies live tensors into an arena; device tensors go through one side stream per GPU."""

    def __init__(self) -> None:
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._copy_thread: ThreadPoolExecutor | None = None

    def close(self) -> None:
        if self._copy_thread is not None:
            self._copy_thread.shutdown(wait=True)
            self._copy_thread = None

    def _stream_for(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device=device)
        return self._streams[device]

    def copy(self, tensors: list[torch.Tensor], layout: Layout, arena: Arena) -> None:
        """Copy every tensor into its slot and return once the copies are complete."""
        arena.hold(layout)
        by_device: dict[torch.device, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        with torch.no_grad():
            for tensor, slot in zip(tensors, layout.slots, strict=True):
                if slot.nbytes == 0:
                    continue
                if tensor.device.type == "cuda":
                    by_device.setdefault(tensor.device, []).append((tensor, arena.view(slot)))
                else:
                    arena.view(slot).copy_(tensor)
            streams = []
            try:
                for device, pairs in by_device.items():
                    stream = self._stream_for(device)
                    streams.append(stream)
                    # Ordered after the work already queued on the compute stream.
                    stream.wait_stream(torch.cuda.current_stream(device))
                    with on_stream(stream):
                        for tensor, target in pairs:
                            target.copy_(tensor, non_blocking=True)
            finally:  # also on an interrupt: the arena is not reused while copies still write to it
                for stream in streams:
                    stream.synchronize()

    def start(
        self, tensors: list[torch.Tensor], names: list[str], lazy: list[bool], layout: Layout, arena: Arena
    ) -> LazyCopy:
        """Overlap mode: copy the eager tensors now, start the lazy ones, and return at once.

        On GPU both go on the copy stream (after the work already queued), and the compute stream
        waits for the eager copies on the device, so the host never blocks; on CPU eager tensors are
        copied here and the lazy ones on the copy thread. Version counters of lazy tensors are read
        before any of their copies starts.
        """
        arena.hold(layout)
        lazy_tensors: list[torch.Tensor] = []
        lazy_names: list[str] = []
        versions: list[int] = []
        cpu_lazy: list[tuple[torch.Tensor, torch.Tensor]] = []
        on_gpu: dict[torch.device, tuple[list, list]] = {}
        with torch.no_grad():
            for tensor, slot, name, is_lazy in zip(tensors, layout.slots, names, lazy, strict=True):
                if slot.nbytes == 0:
                    continue
                version = _version(tensor) if is_lazy else None
                target = arena.view(slot)
                if version is not None:
                    lazy_tensors.append(tensor)
                    lazy_names.append(name)
                    versions.append(version)
                if tensor.device.type == "cuda":
                    eager_pairs, lazy_pairs = on_gpu.setdefault(tensor.device, ([], []))
                    (eager_pairs if version is None else lazy_pairs).append((tensor, target))
                elif version is not None:
                    cpu_lazy.append((tensor, target))
                else:
                    target.copy_(tensor)
            pending = LazyCopy(lazy_tensors, lazy_names, versions, getattr(_TRAINER, "ident", None))
            used: list[torch.cuda.Stream] = []
            try:
                for device, (eager_pairs, lazy_pairs) in on_gpu.items():
                    stream = self._stream_for(device)
                    used.append(stream)
                    compute = torch.cuda.current_stream(device)
                    stream.wait_stream(compute)
                    with on_stream(stream):
                        for tensor, _ in eager_pairs + lazy_pairs:
                            # The caching allocator must not hand this memory out again before the
                            # side stream has read it, even if training frees the tensor meanwhile.
                            tensor.record_stream(stream)
                        for tensor, target in eager_pairs:
                            target.copy_(tensor, non_blocking=True)
                        eager_done = stream.record_event()
                        for tensor, target in lazy_pairs:
                            target.copy_(tensor, non_blocking=True)
                        pending._events[device] = stream.record_event()
                    pending._compute[device] = compute
                    compute.wait_event(eager_done)  # the next forward's buffer updates come after
                if cpu_lazy:
                    if self._copy_thread is None:
                        self._copy_thread = ThreadPoolExecutor(1, thread_name_prefix="asyncckpt-copy")
                    pending._cpu = self._copy_thread.submit(_copy_pairs, cpu_lazy)
            except BaseException:  # the caller releases the arena: no copy may still write to it
                for stream in used:
                    stream.synchronize()
                raise
        return pending


def _copy_pairs(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    _phases.pause("lazy_copy")
    with torch.no_grad():
        for tensor, target in pairs:
            target.copy_(tensor)
