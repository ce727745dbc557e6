"""Overlap mode: a snapshot whose large optimizer-owned tensors are still copying when ``save`` returns.

Everything overlap mode is lives here, in three parts that meet on three threads:

- ``start_copy`` (training thread, inside ``save``): copies the eager tensors, starts the lazy ones
  on the copy thread (CPU) or the copy stream (GPU), and returns a ``LazyCopy`` built complete.
- ``Fences`` (training thread): the manager's side. It hooks a fence into the saved optimizers'
  ``step`` and every saved module's ``load_state_dict``, and a settle point into saved modules'
  forward; a fence or a settle point gives each pending copy its verdict.
- ``check_verdict`` and ``read_gpu_fence_wait`` (writer thread): the writer commits only on the
  training thread's verdict that nothing lazily copied changed in place, and reads afterwards how
  long training's GPU stream waited at the fence.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from typing import Any

import torch

from asyncckpt import _phases
from asyncckpt.engine.handle import SaveHandle
from asyncckpt.engine.staging import Arena, CopyEngine, Layout, on_stream
from asyncckpt.errors import CheckpointError, OverlapGuardError
from asyncckpt.metrics import SaveRecord

# Tensors below this size are copied before ``save`` returns: they cost next to nothing, and their
# version counters then need no watching.
SMALL_COPY_BYTES = 64 << 10

# How long the writer, after a commit, waits for training's GPU stream to pass an overlap fence
# before it gives up timing that fence's wait (normally the stream passed it long before).
_GPU_FENCE_READ_TIMEOUT_S = 1.0


@dataclass(frozen=True)
class DeviceCopy:
    """The lazy copies queued on one GPU: where they end, and the stream training ran on at ``save``.

    Attributes:
        done: An event recorded on the copy stream after the device's last lazy copy.
        compute: The stream current on that device when ``save`` was called; a fence makes it wait
            for ``done``.
    """

    done: torch.cuda.Event
    compute: torch.cuda.Stream


def _capturing(stream: torch.cuda.Stream) -> bool:
    """Whether ``stream`` (not the calling thread's current one) is being captured into a CUDA graph."""
    with on_stream(stream):
        return torch.cuda.is_current_stream_capturing()


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

    Built complete: every copy is already queued when the constructor runs, and nothing outside
    this class sets its fields.

    Args:
        tensors: The live tensors copied lazily (watched until the verdict).
        names: Their user-facing paths, for the guard's message.
        versions: Their version counters read before any of their copies started.
        trainer: The thread whose in-place ops count (default: the calling thread).
        cpu: The copy thread's future for the lazy CPU tensors, or None.
        devices: Per GPU, the event after its lazy copies and training's stream.
        started: ``time.perf_counter()`` when the copies started (default: now).

    Raises:
        ValueError: ``tensors``, ``names`` and ``versions`` differ in length.
    """

    def __init__(
        self,
        tensors: list[torch.Tensor],
        names: list[str],
        versions: list[int],
        *,
        trainer: int | None = None,
        cpu: Future | None = None,
        devices: dict[torch.device, DeviceCopy] | None = None,
        started: float | None = None,
    ) -> None:
        if not len(tensors) == len(names) == len(versions):
            raise ValueError(f"{len(tensors)} tensors, {len(names)} names and {len(versions)} versions")
        self._tensors = tensors
        self.trainer = threading.get_ident() if trainer is None else trainer  # the thread whose ops count
        self._names = names
        self._versions = versions
        self._cpu = cpu
        self._devices: dict[torch.device, DeviceCopy] = dict(devices or {})
        # Timing events on each compute stream around its wait at the fence: the host does not block
        # there, so how long training's GPU work waited for the copy is only visible on the device.
        self._gpu_wait_marks: dict[torch.device, tuple[torch.cuda.Event, torch.cuda.Event]] = {}
        self._lock = threading.Lock()
        self._fenced = threading.Event()
        self.changed: list[str] = []  # guard verdict: tensors updated in place before the verdict
        self.started = time.perf_counter() if started is None else started
        self.copy_s = 0.0  # from save to the last byte copied (known once wait_copied returns)
        self.fence_wait_s = 0.0  # how long the fencing thread waited (known once fenced)
        self.abandoned = False  # no fence ever completed: the guard never ran
        if not tensors:  # nothing a later step could touch mid-copy: no fence to wait for
            self._fenced.set()

    def wait_copied(self) -> None:
        """Block until every lazy byte is in the arena (writer thread).

        Raises:
            BaseException: What the CPU copy raised, once the GPU copies are done too.
        """
        try:
            if self._cpu is not None:
                self._cpu.result()
        finally:  # even when the CPU copy failed: the arena is released next, and DMA must be done
            for device, copy in self._devices.items():
                # On the event's device: a CUDA call from a thread with no current device would
                # bind (and maybe create) a context on GPU 0, in every rank of a multi-GPU job.
                with torch.cuda.device(device):
                    copy.done.synchronize()
        self.copy_s = time.perf_counter() - self.started

    def _judge(self) -> None:
        """The verdict, under ``_lock``, once the copy is known complete on this thread."""
        watched = zip(self._tensors, self._versions, self._names, strict=True)
        self.changed = [name for tensor, version, name in watched if tensor._version != version]
        self._tensors = []  # the copy is ordered before anything later: stop holding the tensors
        self._fenced.set()

    def fence(self, count_wait: bool = True, timeout: float | None = None) -> float:
        """Order later updates after the copy and run the guard; idempotent.

        The wait is kept in ``fence_wait_s`` (unless ``count_wait`` is false) before the verdict is
        published, so the writer, which commits and logs right after, always sees it.

        Args:
            count_wait: Whether the wait counts as this save's ``fence_wait_s``.
            timeout: Seconds to wait for a CPU copy still running; None waits as long as it takes.

        Returns:
            The seconds this call waited (0.0 when already fenced).

        Raises:
            TimeoutError: The CPU copy was still running after ``timeout`` seconds (fence not passed).
        """
        with self._lock:
            if self._fenced.is_set():
                return 0.0
            began = time.perf_counter()
            for device, copy in self._devices.items():
                # The stream training ran on at save(), and this thread's own: a fence reached from
                # another thread (handle.wait, the asyncio façade) must still order training's work.
                compute = copy.compute
                # Timed even inside save (count_wait false): its wait_prev_s sees only the host's
                # wait. Timed once: a fence retried after an interrupt finds the stream already
                # waiting, and a second pair of events would time nothing. Never into a stream being
                # captured into a CUDA graph (recording there would break the capture).
                timed = device not in self._gpu_wait_marks and not _capturing(compute)
                if timed:
                    before = torch.cuda.Event(enable_timing=True)
                    before.record(compute)
                compute.wait_event(copy.done)
                if timed:
                    after = torch.cuda.Event(enable_timing=True)
                    after.record(compute)
                    self._gpu_wait_marks[device] = (before, after)
                current = torch.cuda.current_stream(device)
                if current != compute:
                    current.wait_event(copy.done)
            if self._cpu is not None:
                # Not result(): a failed copy is the writer's to report, and an interrupt (Ctrl-C, a
                # signal handler's exception) while waiting must propagate with the fence unpassed.
                if not wait_futures([self._cpu], timeout).done:
                    raise TimeoutError(f"overlap fence: the copy was still running after {timeout} s")
            waited = time.perf_counter() - began
            if count_wait:
                self.fence_wait_s = waited
            self._judge()
            return waited

    def fenced(self) -> bool:
        """Whether the verdict is in.

        Returns:
            True once a fence, a settle point or ``abandon`` gave it.
        """
        return self._fenced.is_set()

    def gpu_fence_wait(self, timeout: float) -> float | None:
        """Seconds training's compute stream waited at the fence for the copy.

        Read on the writer thread after the commit, when the stream has normally long passed its
        fence: a metric is never worth holding up a checkpoint or ``close``.

        Args:
            timeout: Seconds to poll for the streams to pass their fence.

        Returns:
            The longest wait over devices (they wait side by side); 0.0 on CPU or where nothing was
            timed; None if a stream has not got there within ``timeout`` (queued far behind, or stuck).
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
        thread's stream is being captured into a CUDA graph (a query there would break the capture).

        Returns:
            True once a verdict is in (here or earlier).
        """
        if threading.get_ident() != self.trainer or not self._lock.acquire(blocking=False):
            return self._fenced.is_set()
        try:
            if self._fenced.is_set():
                return True
            if self._cpu is not None and not self._cpu.done():
                return False
            if self._devices:
                if torch.cuda.is_current_stream_capturing():
                    return False
                for device, copy in self._devices.items():
                    with torch.cuda.device(device):
                        if not copy.done.query():
                            return False
            self._judge()
            return True
        finally:
            self._lock.release()

    def verdict(self) -> list[str]:
        """Wait for the training thread's verdict (writer thread, once ``wait_copied`` returned).

        Returns:
            The names of lazily copied tensors changed in place before the verdict.
        """
        self._fenced.wait()
        with self._lock:
            return self.changed


_TRAINER = threading.local()


@contextlib.contextmanager
def training_thread(ident: int) -> Iterator[None]:
    """Saves started inside count ``ident`` as their training thread.

    For a façade that saves from a worker thread on behalf of the thread that runs training.

    Args:
        ident: The ``threading.get_ident()`` of the training thread.

    Returns:
        A context manager.
    """
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


def _copy_pairs(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    _phases.pause("lazy_copy")
    with torch.no_grad():
        for tensor, target in pairs:
            target.copy_(tensor)


_Pairs = list[tuple[torch.Tensor, torch.Tensor]]


def start_copy(
    copier: CopyEngine, tensors: list[torch.Tensor], names: list[str], lazy: list[bool], layout: Layout, arena: Arena
) -> LazyCopy:
    """Copy the eager tensors now, start the lazy ones, and return at once.

    On GPU both go on the copy stream (after the work already queued), and the compute stream waits
    for the eager copies on the device, so the host never blocks; on CPU eager tensors are copied
    here and the lazy ones on the copy thread. Version counters of lazy tensors are read before any
    of their copies starts.

    Args:
        copier: The manager's copy engine (its streams and copy thread).
        tensors: Every tensor of the snapshot, in layout order.
        names: Their user-facing paths.
        lazy: Per tensor, whether it may be copied after ``save`` returns.
        layout: Where each tensor goes in ``arena``.
        arena: The host memory the snapshot goes into.

    Returns:
        The pending copy; its verdict is still to come unless nothing was lazy.

    Raises:
        BaseException: Whatever a copy raised, once no copy still writes into ``arena``.
    """
    arena.hold(layout)
    lazy_tensors: list[torch.Tensor] = []
    lazy_names: list[str] = []
    versions: list[int] = []
    cpu_lazy: _Pairs = []
    on_gpu: dict[torch.device, tuple[_Pairs, _Pairs]] = {}
    with torch.no_grad():
        for tensor, slot, target, name, is_lazy in zip(
            tensors, layout.slots, arena.views(layout), names, lazy, strict=True
        ):
            if slot.nbytes == 0:
                continue
            version = _version(tensor) if is_lazy else None
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
        started = time.perf_counter()
        devices: dict[torch.device, DeviceCopy] = {}
        cpu: Future | None = None
        used: list[torch.cuda.Stream] = []
        try:
            for device, (eager_pairs, lazy_pairs) in on_gpu.items():
                stream = copier.stream_for(device)
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
                    devices[device] = DeviceCopy(stream.record_event(), compute)
                compute.wait_event(eager_done)  # the next forward's buffer updates come after
            if cpu_lazy:
                cpu = copier.submit(_copy_pairs, cpu_lazy)
        except BaseException:  # the caller releases the arena: no copy may still write to it
            for stream in used:
                stream.synchronize()
            raise
    trainer = getattr(_TRAINER, "ident", None)
    return LazyCopy(lazy_tensors, lazy_names, versions, trainer=trainer, cpu=cpu, devices=devices, started=started)


def _fenceable(state: Any, depth: int = 0) -> tuple[list[torch.optim.Optimizer], list[torch.nn.Module]]:
    """The optimizers and modules held (through dicts, lists, tuples) by a saved state."""
    optimizers: list[torch.optim.Optimizer] = []
    modules: list[torch.nn.Module] = []
    if isinstance(state, torch.optim.Optimizer):
        optimizers.append(state)
    elif isinstance(state, torch.nn.Module):
        modules.append(state)
    elif depth < 16 and isinstance(state, (dict, list, tuple)):
        for child in state.values() if isinstance(state, dict) else state:
            more_optimizers, more_modules = _fenceable(child, depth + 1)
            optimizers += more_optimizers
            modules += more_modules
    return optimizers, modules


def _tensor_key(t: torch.Tensor) -> tuple[tuple, int, int]:
    """The memory a tensor's values live in: (its storage, first byte, end byte). A staged tensor
    may be a view of an optimizer's tensor (a row piece of a DDP parameter) or the local shard of
    one (a DTensor's ``to_local()``): it is still changed only by that optimizer's step."""
    local = getattr(t, "_local_tensor", None)  # a DTensor: its shard on this rank
    if isinstance(local, torch.Tensor):
        t = local
    size = t.element_size()
    first = t.storage_offset() * size
    count = t.numel()
    if not count:
        span = -1
    elif t.is_contiguous():  # the common case, without a Python loop over the dimensions
        span = count - 1
    else:
        span = sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride(), strict=True))
    return (t.device, t.untyped_storage().data_ptr()), int(first), int(first + (span + 1) * size)


_Owned = dict[tuple, tuple[list[int], list[int]]]


def _optimizer_owned(optimizers: list[torch.optim.Optimizer]) -> _Owned:
    """The byte ranges, by storage, of the tensors only an optimizer step changes (its parameters
    and its state): per storage, the ranges' starts sorted, and the furthest end up to each."""
    ranges: dict[tuple, list[tuple[int, int]]] = {}

    def add(t: Any) -> None:
        if isinstance(t, torch.Tensor):
            storage, first, end = _tensor_key(t)
            ranges.setdefault(storage, []).append((first, end))

    for opt in optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                add(p)
        for per_param in opt.state.values():
            if isinstance(per_param, dict):
                for v in per_param.values():
                    add(v)
    owned: _Owned = {}
    for storage, spans in ranges.items():
        spans.sort()
        ends = list(itertools.accumulate((b for _, b in spans), max))
        owned[storage] = ([a for a, _ in spans], ends)
    return owned


def _is_owned(t: torch.Tensor, owned: _Owned) -> bool:
    """Whether ``t``'s bytes lie within one optimizer-owned tensor's: sharing a storage is not
    enough (a buffer next to a parameter in one flat storage is not the optimizer's)."""
    storage, first, end = _tensor_key(t)
    found = owned.get(storage)
    if found is None:
        return False
    starts, ends = found
    at = bisect.bisect_right(starts, first) - 1
    return at >= 0 and ends[at] >= end


def _is_compiling() -> bool:
    is_compiling = getattr(torch.compiler, "is_compiling", None)
    return bool(is_compiling is not None and is_compiling())


def _fence_hook(ref: weakref.ReferenceType[Fences]) -> Callable[..., None]:
    def hook(*args: Any, **kwargs: Any) -> None:
        fences = ref()
        if fences is not None and fences._pid == os.getpid():  # inert in a forked child: no copy to wait for
            fences.fence()

    return hook


def _settle_hook(ref: weakref.ReferenceType[Fences]) -> Callable[..., None]:
    """A forward pre-hook: a settle point, which never waits (nothing to do unless a copy is still
    unjudged). Traced by torch.compile it does nothing, so compiled graphs stay whole."""

    def hook(*args: Any, **kwargs: Any) -> None:
        if _is_compiling():
            return
        fences = ref()
        if fences is not None and fences._unfenced and fences._pid == os.getpid():
            fences.settle_point()

    return hook


class Fences:
    """The training thread's side of overlap mode for one manager: its hooks and unjudged copies.

    The pending copies are judged oldest first, by a fence (``fence``: an optimizer step, a
    ``load_state_dict``, and the manager's save, wait, restore and close) or a settle point (a
    forward of a saved module). The hooks hold this object weakly, and do nothing in a forked child.
    """

    def __init__(self) -> None:
        self._pid = os.getpid()  # a forked child's copy has no copies to wait for
        self._unfenced: list[LazyCopy] = []  # copies not yet judged, oldest first
        self._lock = threading.Lock()
        self._hooks: dict[int, tuple[weakref.ReferenceType, list[Any]]] = {}  # id(obj) -> (obj, handles)

    def start(
        self,
        copier: CopyEngine,
        state: Any,
        tensors: list[torch.Tensor],
        names: list[str],
        layout: Layout,
        arena: Arena,
    ) -> LazyCopy:
        """Hook the state's optimizers and modules, then copy lazily what only a fenced optimizer
        step changes, everything else now.

        Args:
            copier: The manager's copy engine.
            state: The state being saved (its optimizers and modules get the hooks).
            tensors: Its flattened tensors, in layout order.
            names: Their user-facing paths.
            layout: Where each tensor goes in ``arena``.
            arena: The host memory the snapshot goes into.

        Returns:
            The pending copy; hand it to ``track`` once its save is in flight.

        Raises:
            BaseException: Whatever a copy raised, once no copy still writes into ``arena``.
        """
        optimizers, modules = _fenceable(state)
        hooked: list[torch.optim.Optimizer | torch.nn.Module] = [*optimizers, *modules]
        for obj in hooked:
            self._install(obj)
        owned = _optimizer_owned(optimizers)
        lazy = [t.numel() * t.element_size() >= SMALL_COPY_BYTES and _is_owned(t, owned) for t in tensors]
        return start_copy(copier, tensors, names, lazy, layout, arena)

    def track(self, lazy: LazyCopy, handle: SaveHandle) -> None:
        """Queue a copy for its verdict, and make waiting on its handle a fence first.

        Args:
            lazy: The copy ``start`` returned.
            handle: Its save's handle.
        """
        if lazy.fenced():
            return
        handle._set_fence(self.fence)  # a handle waited on directly must not wait for a step
        with self._lock:
            self._unfenced.append(lazy)

    def forget(self, lazy: LazyCopy) -> None:
        """Undo ``track`` for a save rolled back before the writer got it; return once the copy
        thread is done with its arena. A failed copy is not raised: the save's own error is.

        Args:
            lazy: The copy of the rolled-back save.
        """
        with self._lock:
            if lazy in self._unfenced:
                self._unfenced.remove(lazy)
        lazy.abandon()
        try:
            lazy.wait_copied()  # the copy thread must be done with the arena before reuse
        except BaseException:  # noqa: BLE001 - the save's own failure is the error to report
            pass

    def pending(self) -> bool:
        """Whether a copy still waits for its verdict.

        Returns:
            True while one does.
        """
        return bool(self._unfenced)

    def fence(self, in_save: bool = False, timeout: float | None = None) -> None:
        """Make everything from here on wait for the pending copies, and run the guard.

        Time waited here counts as the earlier save's ``fence_wait_s`` (inside ``save`` it already
        shows in that save's ``wait_prev_s``, so it is not counted twice).

        Args:
            in_save: Called by ``save``: the wait is not counted as a fence wait.
            timeout: Seconds at most; None waits as long as it takes.

        Raises:
            TimeoutError: The copies or another fencing thread took longer than ``timeout``; the
                copies not yet judged stay queued for the next fence.
        """
        if not self._unfenced:
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        # A second thread fencing meanwhile waits here for the same copies.
        if not self._lock.acquire(timeout=-1 if timeout is None else max(0.0, timeout)):
            raise TimeoutError(f"overlap fence: another thread held it past the {timeout} s timeout")
        try:
            while self._unfenced:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                # may raise (an interrupt, the timeout): the entry stays for the next fence
                self._unfenced[0].fence(count_wait=not in_save, timeout=left)
                self._unfenced.pop(0)  # only once fenced: nobody may skip a fence still under way
        finally:
            self._lock.release()

    def settle_point(self) -> None:
        """A forward of a saved module: judge the copies already finished, oldest first; never
        wait (a thread fencing right now is left to it)."""
        if not self._lock.acquire(blocking=False):
            return
        try:
            while self._unfenced and self._unfenced[0].try_settle():
                self._unfenced.pop(0)
        finally:
            self._lock.release()

    def close(self) -> None:
        """Abandon the copies no fence judged (only after an interrupted fence: the writer must
        not wait forever; it then refuses those saves) and remove every hook."""
        with self._lock:
            for lazy in self._unfenced:
                lazy.abandon()
            self._unfenced.clear()
        for _, handles in self._hooks.values():
            for handle in handles:
                handle.remove()
        self._hooks.clear()

    def _install(self, obj: torch.optim.Optimizer | torch.nn.Module) -> None:
        """Hook the fence into ``obj``'s step / load_state_dict, and a settle point into a module's
        forward, once per object."""
        known = self._hooks.get(id(obj))
        if known is not None and known[0]() is obj:
            return
        hook = _fence_hook(weakref.ref(self))
        if isinstance(obj, torch.optim.Optimizer):
            handles = [obj.register_step_pre_hook(hook), obj.register_load_state_dict_pre_hook(hook)]
        else:
            # Every submodule: a load into one layer (or into the module a wrapper such as
            # torch.compile or DDP holds) writes into lazily copied parameters too.
            handles = []
            for module in obj.modules():
                register = getattr(module, "register_load_state_dict_pre_hook", None)
                if register is None:  # torch < 2.5
                    register = module._register_load_state_dict_pre_hook
                handles.append(register(hook))
            # The saved module only (not every submodule): one cheap check per forward call.
            try:
                handles.append(obj.register_forward_pre_hook(_settle_hook(weakref.ref(self))))
            except Exception:  # noqa: BLE001 - a module that takes no hooks (scripted): fences only
                pass
        self._hooks[id(obj)] = (weakref.ref(obj), handles)


def check_verdict(lazy: LazyCopy, record: SaveRecord) -> None:
    """Right before the commit (writer thread): commit only on the training thread's verdict.

    Waits for its next fence or settle point, and records the fence wait in ``record``.

    Args:
        lazy: The save's pending copy, its ``wait_copied`` returned.
        record: The save's record.

    Raises:
        CheckpointError: The manager was closed without a completed fence.
        OverlapGuardError: A lazily copied tensor changed in place since ``save``.
    """
    _phases.pause("verdict")
    changed = lazy.verdict()
    record.fence_wait_s = lazy.fence_wait_s
    if lazy.abandoned:
        raise CheckpointError(
            "overlap mode: the manager was closed without a completed fence (interrupted while "
            "waiting for the copy?), so the snapshot could not be checked; it was not committed"
        )
    if changed:
        shown = ", ".join(changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8 else "")
        raise OverlapGuardError(
            f"overlap guard: {len(changed)} tensor(s) changed in place after save(), before their copy was "
            f"known to be complete: {shown}. The snapshot could mix two steps, so it was not committed; "
            "update these tensors only in the optimizer step, or use snapshot='blocking'"
        )


def read_gpu_fence_wait(lazy: LazyCopy, record: SaveRecord, warn: Callable[[str], None]) -> None:
    """After the commit (writer thread): record how long training's GPU stream waited at the fence.

    After, so that a stream that never reaches its fence cannot hold the checkpoint back; a metric
    that cannot be read is left at 0 with a warning.

    Args:
        lazy: The committed save's copy.
        record: The save's record (``fence_gpu_wait_s`` is set).
        warn: How to warn from the writer thread without ever raising.
    """
    try:
        waited = lazy.gpu_fence_wait(timeout=_GPU_FENCE_READ_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 - the checkpoint is committed: never report it failed
        warn(f"asyncckpt: the GPU fence wait of step {record.step} could not be timed: {exc}")
        return
    if waited is None:  # one message for every step: a stream far behind would repeat it
        warn(
            "asyncckpt: an overlap fence's GPU wait was not timed (fence_gpu_wait_s left at 0): training's "
            f"stream had not reached the fence {_GPU_FENCE_READ_TIMEOUT_S} s after the commit"
        )
        return
    record.fence_gpu_wait_s = waited
