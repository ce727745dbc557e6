"""Host staging: one reusable arena of host memory and the copy of live tensors into it.

Allocating (and, with CUDA, pinning) host memory costs far more than copying into it (pinning
ran at 1.1-1.9 GB/s on an H100 host, the copy at 54 GB/s), so arenas are allocated once, sized to
the state, and reused by every later save. One arena per save in flight (``max_pending``).
"""

from __future__ import annotations

import contextlib
import functools
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from asyncckpt.format import ALIGNMENT, TensorEntry, dtype_name

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

    @functools.cached_property
    def entries(self) -> list[TensorEntry]:
        """The manifest's entry of each slot, made once: a layout serves every save of a state
        whose tensors keep their dtypes and shapes, and new entries at each save would be
        thousands of objects for CPython's collector to promote (see ``state.tree.NodeCache``).
        Shared by those saves' manifests: not to be changed."""
        return [TensorEntry(dtype_name(s.dtype), s.shape, s.offset, s.nbytes) for s in self.slots]


def _align(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


def _fits(layout: Layout, tensors: list[torch.Tensor]) -> bool:
    """Whether ``layout`` is what :func:`plan_layout` would make of ``tensors``: the same dtype and
    shape at every position (the slots follow from them)."""
    return len(layout.slots) == len(tensors) and all(
        slot.dtype == t.dtype and slot.shape == t.shape for slot, t in zip(layout.slots, tensors, strict=True)
    )


def plan_layout(tensors: list[torch.Tensor], like: Layout | None = None) -> Layout:
    """Group tensors by dtype (first-seen order) and give each a 64-byte aligned slot.

    ``like``: the previous save's layout, returned as it is when it fits ``tensors``. A training
    state has the same tensors at every save, and the same layout object lets the arena reuse its
    views of the slots instead of making them again.
    """
    if like is not None and _fits(like, tensors):
        return like
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
        with torch.inference_mode(False):  # a first save inside inference mode: later ones write it too
            self.buffer = _pinned_zeros(size) if pinned else torch.zeros(size, dtype=torch.uint8)
        self._slots: list[TensorSlot] | None = None  # the layout whose padding is known to be zero
        self._fresh = True  # all zeros: the first layout needs no clearing
        self._views: tuple[Layout, list[torch.Tensor]] | None = None  # the last layout's slot views

    def hold(self, layout: Layout) -> None:
        """Get ready for ``layout``: re-zero when it differs from the last, so padding stays zero.

        A fresh arena is already zero, so the first save costs what later ones do.
        """
        if self._slots is not layout.slots and self._slots != layout.slots:
            if not self._fresh:
                self.buffer[: layout.total].zero_()
            self._slots = layout.slots
        self._fresh = False

    def raw(self, start: int, end: int) -> torch.Tensor:
        return self.buffer[start:end]

    def view(self, slot: TensorSlot) -> torch.Tensor:
        raw = self.buffer[slot.offset : slot.offset + slot.nbytes]
        return raw.view(slot.dtype).view(slot.shape)

    def views(self, layout: Layout) -> list[torch.Tensor]:
        """Every slot's view, in slot order; made once per layout (each costs a few microseconds
        of the training thread, and a save of a large model has thousands of tensors)."""
        if self._views is None or self._views[0] is not layout:
            # made outside inference mode even for a save inside it: an inference tensor could not
            # be copied into by the saves after it
            with torch.inference_mode(False):
                self._views = (layout, [self.view(slot) for slot in layout.slots])
        return self._views[1]


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


@contextlib.contextmanager
def on_stream(stream: torch.cuda.Stream) -> Iterator[None]:
    """``stream`` current, on its own device. torch.cuda.stream alone switches a thread whose current
    device is another one with a plain set-device, there and back, which creates a CUDA context on
    the thread's device (GPU 0 for a fresh thread: hundreds of MB in every rank of a multi-GPU job);
    torch.cuda.device restores the device without that."""
    with torch.cuda.device(stream.device), torch.cuda.stream(stream):
        yield


class CopyEngine:
    """Copies live tensors into an arena; device tensors go through one side stream per GPU."""

    def __init__(self) -> None:
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._copy_thread: ThreadPoolExecutor | None = None

    def close(self) -> None:
        if self._copy_thread is not None:
            self._copy_thread.shutdown(wait=True)
            self._copy_thread = None

    def stream_for(self, device: torch.device) -> torch.cuda.Stream:
        """The side stream copies from ``device`` go on, made on first use.

        Args:
            device: A CUDA device.

        Returns:
            The same stream for every call with that device.
        """
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device=device)
        return self._streams[device]

    def submit(self, fn: Callable[..., None], *args: Any) -> Future:
        """Run ``fn(*args)`` on the copy thread (one, started on first use): copies that finish after
        ``save`` returns.

        Args:
            fn: The copy to run.
            *args: Its arguments.

        Returns:
            The copy's future.
        """
        if self._copy_thread is None:
            self._copy_thread = ThreadPoolExecutor(1, thread_name_prefix="asyncckpt-copy")
        return self._copy_thread.submit(fn, *args)

    def quiesce(self) -> None:
        """Wait until every copy started so far has finished writing.

        A save interrupted after its copy started but before it got the pending copy back has
        nothing else to wait on, and its arena must not go back to the pool under a copy still
        writing into it: the next save would reuse the arena and the late copy would land in its
        snapshot.
        """
        if self._copy_thread is not None:
            try:
                self._copy_thread.submit(lambda: None).result()  # one thread, in order: all before it
            except RuntimeError:  # shut down: every copy it had has finished
                pass
        for stream in self._streams.values():
            stream.synchronize()

    def copy(self, tensors: list[torch.Tensor], layout: Layout, arena: Arena) -> None:
        """Copy every tensor into its slot and return once the copies are complete."""
        arena.hold(layout)
        by_device: dict[torch.device, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        with torch.no_grad():
            for tensor, slot, target in zip(tensors, layout.slots, arena.views(layout), strict=True):
                if slot.nbytes == 0:
                    continue
                if tensor.device.type == "cuda":
                    by_device.setdefault(tensor.device, []).append((tensor, target))
                else:
                    target.copy_(tensor)
            streams = []
            try:
                for device, pairs in by_device.items():
                    stream = self.stream_for(device)
                    streams.append(stream)
                    # Ordered after the work already queued on the compute stream.
                    stream.wait_stream(torch.cuda.current_stream(device))
                    with on_stream(stream):
                        for tensor, target in pairs:
                            target.copy_(tensor, non_blocking=True)
            finally:  # also on an interrupt: the arena is not reused while copies still write to it
                for stream in streams:
                    stream.synchronize()
