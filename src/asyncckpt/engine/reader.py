"""Read a committed checkpoint back into tensors: validate, read chunks in parallel, verify, decode.

The whole checkpoint is verified into host memory before anything is handed back, so a restore
either applies a fully verified state or applies nothing. Memory is bounded by what the manifest
declares: each tensor is allocated once and every chunk is read, checksummed and decompressed
straight into it in pieces (``codec.decode_chunk``), never held whole on the side.

A raw checkpoint (``compression=None``) can instead be mapped (``mmap=True``, an opt-in): the
tensors are then views of a private mapping of the data file (zero-copy: no second copy in
anonymous memory, pages shared with the page cache), every chunk's CRC32 still verified over the
mapped bytes first. Mapped tensors follow the file: see ``_map_raw`` for the caveats.

A checkpoint that is deleted or replaced while it is read (retention pruning behind a reader of a
live root, a step re-saved) raises ``CheckpointGoneError``, not a damage error: readers of a root
retry with the newest checkpoint instead of reporting a healthy one as damaged. They take the
directory's identity when they list the root and pass it to every read of that checkpoint
(``identity=``), so a deletion or replacement between the listing and any of the reads counts.

Every byte is read through the storage backend (``storage/backend.py``): the manifest as a small
object, chunks as byte ranges of their data objects, and a memory map only where the backend
offers one (``Capabilities.mmap``). A checkpoint is named by its directory's path; its root's
backend is found from that path.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import itertools
import mmap as _mmap
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import torch

from asyncckpt import codec
from asyncckpt._in_order import in_order
from asyncckpt.codec.crc import crc32
from asyncckpt.errors import CheckpointDamagedError, CheckpointError, CheckpointNotFoundError
from asyncckpt.format import (
    DTYPES,
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    Manifest,
    MultiRankManifest,
    RankTable,
    check_manifest_seal,
    consolidate,
    parse_manifest,
    parse_rank_table,
    parse_step_dir,
    seal_of,
    too_large,
)
from asyncckpt.state.skeleton import tensor_indices, tensor_paths
from asyncckpt.storage.backend import Backend, CheckpointRef, ReadHandle, open_backend
from asyncckpt.storage.commit import CommittedCheckpoint, manifest_to_read, manifest_versions

_T = TypeVar("_T")


class CheckpointGoneError(CheckpointNotFoundError):
    """The checkpoint directory was deleted (or replaced) while it was being read: not damage."""


# (st_dev, st_ino) of a checkpoint directory, and the name of the manifest that is its version
DirIdentity = tuple[Any, str]


# A checkpoint as the reader is given it: a ref, or a local directory (its parent being the root).
Where = Path | CheckpointRef


def _locate(path: Where) -> tuple[Backend, str]:
    """The backend of the checkpoint ``path``'s root, and the checkpoint's name in it."""
    if isinstance(path, CheckpointRef):
        return path.backend, path.name
    path = Path(os.path.abspath(path))  # "." or "step-1/..": the directory's own name, not ""
    return open_backend(path.parent), path.name


def _manifest_name(store: Backend, name: str) -> str:
    """Which manifest is the checkpoint's version: ``manifest.json`` (a renamed checkpoint), else
    the newest ``manifest-<generation>.json`` that verifies (a checkpoint committed by writing its
    manifest last; a newer one that does not verify is a publish still under way or cut short),
    or a newer one that could not be read at all (``manifest_to_read``). One listing tells which:
    on an object store it replaces a HEAD and a look under the name that find nothing."""
    try:
        versions = manifest_versions(store, name)
        if MANIFEST_NAME in versions:
            return MANIFEST_NAME
        chosen = manifest_to_read(store, name, versions)
    except CheckpointError:
        return MANIFEST_NAME
    return MANIFEST_NAME if chosen is None else chosen


def _identity(store: Backend, name: str) -> DirIdentity | None:
    where = store.identity(name)
    if where is None:
        return None
    return where, _manifest_name(store, name)


def directory_identity(path: Where) -> DirIdentity | None:
    """Which checkpoint ``path`` names now (None: nothing there): its directory and the version of
    its manifest. A reader of a root takes it right after listing and hands it to every read of
    that checkpoint, so a checkpoint deleted or replaced at any point after the listing is told
    from a damaged one.

    Args:
        path: A checkpoint directory.

    Returns:
        A comparable identity, or None when nothing is at ``path``.
    """
    return _identity(*_locate(path))


@contextlib.contextmanager
def _same_directory(path: Where, identity: DirIdentity | None = None) -> Iterator[DirIdentity]:
    """Tell a checkpoint that vanished under a reader from a damaged one.

    A committed checkpoint never changes in place: it is only ever renamed away whole (retention,
    a replaced step) and then removed. So when ``path`` no longer names the directory it named when
    reading began (``identity``, taken when the root was listed; else now), the checkpoint is gone:
    a read that fails then failed because of the deletion, not because of damage.
    """
    store, name = _locate(path)
    now = _identity(store, name)
    if identity is not None and now != identity:
        raise CheckpointGoneError(f"{path} was deleted or replaced since the root was listed")
    if now is None:
        raise CheckpointNotFoundError(f"{path} does not exist")
    try:
        yield now  # which directory and manifest version ``path`` names now, taken once for the caller too
    except CheckpointGoneError:
        raise
    except Exception as exc:
        if _identity(store, name) != now:
            raise CheckpointGoneError(f"{path} was deleted or replaced while it was being read") from exc
        raise


def _damaged(call: Callable[..., _T], *args: object) -> _T:
    """A file of a checkpoint that cannot be opened or read (a link, a FIFO, missing): damage."""
    try:
        return call(*args)
    except CheckpointDamagedError:
        raise
    except CheckpointError as exc:
        raise CheckpointDamagedError(str(exc)) from exc.__cause__


@dataclass
class LoadedCheckpoint:
    path: Where
    manifest: Manifest
    # None for the tensors not asked for (``only``), and by default for those of a multi-rank
    # checkpoint's consolidated view that its tree does not name (rank 0's pieces)
    tensors: list[torch.Tensor]
    mapped: bool = False  # the tensors are views of a private mapping of the data file


def read_manifest(path: Where, *, identity: DirIdentity | None = None, rank_tables: bool = True) -> Manifest:
    """The validated manifest of the checkpoint at ``path``. ``identity`` (from
    :func:`directory_identity`): the directory ``path`` named when its root was listed; if the path
    names another one or none by now, or stops naming it during a failed read, CheckpointGoneError.

    ``rank_tables=False`` leaves a multi-rank checkpoint's rank tables unread: its manifest alone
    (step, metrics, tags, the ranks' entries; no tree) is what a rank that applies no retention
    needs to list a root, without reading every rank's table of every checkpoint."""
    with _same_directory(path, identity) as now:
        return _manifest_at(path, now, rank_tables)


def _manifest_at(path: Where, now: DirIdentity, rank_tables: bool = True) -> Manifest:
    """:func:`read_manifest`'s work, inside a ``_same_directory`` that yielded ``now``: a read of
    the checkpoint that already holds it to its identity need not take that identity again."""
    store, name = _locate(path)
    info = store.stat(name)
    if info is not None and info.kind == "link":
        raise CheckpointDamagedError(f"{path} is a symbolic link; checkpoints never follow links")
    if info is None or info.kind != "dir":
        raise CheckpointNotFoundError(f"{path} is not a checkpoint directory")
    manifest_file = now[1]  # the version the identity names (the given one's, else found just now)
    manifest_path = path / manifest_file
    manifest_info = store.stat(f"{name}/{manifest_file}")
    if manifest_info is None:
        raise CheckpointDamagedError(f"{path} has no {MANIFEST_NAME}: not a committed checkpoint")
    if manifest_info.size > MAX_MANIFEST_BYTES:  # refused unread, as such
        raise too_large(
            str(manifest_path),
            f"is {manifest_info.size} bytes",
            f"the reader's limit of {MAX_MANIFEST_BYTES} bytes",
        )
    raw = _damaged(store.read_small, f"{name}/{manifest_file}", MAX_MANIFEST_BYTES)
    check_manifest_seal(raw, str(manifest_path))
    manifest = parse_manifest(raw, str(manifest_path))
    named = parse_step_dir(name)
    if named is not None and named != manifest.step:
        raise CheckpointDamagedError(f"{manifest_path} is the manifest of step {manifest.step}, not of {name}")
    if isinstance(manifest, MultiRankManifest) and rank_tables:
        manifest = consolidate(manifest, _read_rank_tables(path, store, name, manifest))
    return manifest


def _yielded(now: DirIdentity | None) -> DirIdentity:
    if now is None:
        raise TypeError("no manifest given, and no identity to read it by")
    return now


def _read_rank_tables(path: Where, store: Backend, name: str, manifest: MultiRankManifest) -> list[RankTable]:
    """Every rank table a multi-rank manifest names, each checked against the seal it records.

    On a remote store each table is a request with a round trip, and a restore or a retention
    check reads all of them before it can plan: fetched one at a time, a 64-rank checkpoint costs
    64 round trips. They are read :data:`_REMOTE_TABLE_READS` at a time there; the error raised is
    still the lowest failing rank's, as when read one by one."""

    def table(rank: int) -> RankTable:
        entry = manifest.ranks[rank]
        where = str(path / entry.file)
        raw = _damaged(store.read_small, f"{name}/{entry.file}", MAX_MANIFEST_BYTES)
        check_manifest_seal(raw, where)
        if seal_of(raw) != entry.crc32:
            raise CheckpointDamagedError(
                f"{where} is not the rank table the manifest committed (seal {seal_of(raw):08x}, "
                f"the manifest records {entry.crc32:08x})"
            )
        return parse_rank_table(raw, where, manifest, rank)

    at_once = _REMOTE_TABLE_READS if store.capabilities.remote else 1
    return in_order(table, range(len(manifest.ranks)), at_once, "asyncckpt-tables")


def _tensor_names(manifest: Manifest, start: int, end: int) -> str:
    hits = [i for i, t in enumerate(manifest.tensors) if t.offset < end and t.offset + t.nbytes > start]
    paths = tensor_paths(manifest.tree) if hits else {}  # only on failure: a walk of the whole tree

    def name(i: int) -> str:
        entry = manifest.tensors[i]
        return f"{paths.get(i, f'tensor #{i}')} {entry.dtype}{list(entry.shape)}"

    shown = ", ".join(name(i) for i in hits[:4])
    more = f" and {len(hits) - 4} more" if len(hits) > 4 else ""
    return f"{shown}{more}" if hits else "padding only"


class _Index:
    """Which of the wanted tensors overlap a range of the logical byte space."""

    def __init__(self, manifest: Manifest, only: set[int] | None = None) -> None:
        entries = manifest.tensors
        wanted = set(range(len(entries))) if only is None else only
        self._order = sorted((i for i in wanted if entries[i].nbytes), key=lambda i: entries[i].offset)
        self._starts = [entries[i].offset for i in self._order]
        # the furthest end of the ranges up to each one: ranges may overlap (a reshard's rows of
        # one piece wanted by two boxes), so the last to start before a chunk need not reach it
        self._reach = list(itertools.accumulate((entries[i].offset + entries[i].nbytes for i in self._order), max))
        self._entries = entries

    def overlapping(self, start: int, end: int) -> list[tuple[int, int, int]]:
        """(tensor index, first byte, end byte) of every tensor overlapping [start, end)."""
        out = []
        j = bisect.bisect_right(self._reach, start)  # every range before it ends by ``start``
        while j < len(self._order) and self._starts[j] < end:
            i = self._order[j]
            entry = self._entries[i]
            a, b = max(start, entry.offset), min(end, entry.offset + entry.nbytes)
            if a < b:
                out.append((i, a, b))
            j += 1
        return out

    def needs(self, start: int, end: int) -> bool:
        return bool(self.overlapping(start, end))


class _Scatter(_Index):
    """Routes a decoded chunk's bytes into the tensors it overlaps (each tensor owns its storage)."""

    def __init__(
        self, manifest: Manifest, only: set[int] | None = None, into: Mapping[int, torch.Tensor] | None = None
    ) -> None:
        super().__init__(manifest, only)
        wanted = set(range(len(manifest.tensors))) if only is None else only
        into = into or {}
        try:
            self.buffers = [
                (into[i] if i in into else torch.empty(t.nbytes, dtype=torch.uint8)) if i in wanted else None
                for i, t in enumerate(manifest.tensors)
            ]
        except (RuntimeError, MemoryError) as exc:
            raise CheckpointError(f"cannot allocate {manifest.raw_bytes} bytes of tensors: {exc}") from None

    def target(self, start: int, end: int) -> torch.Tensor | None:
        """The tensor slice to decode into directly when one tensor holds the whole range."""
        hits = self.overlapping(start, end)
        if len(hits) == 1 and hits[0][1:] == (start, end):
            i = hits[0][0]
            base = self._entries[i].offset
            buffer = self.buffers[i]
            assert buffer is not None  # only wanted tensors overlap
            return buffer[start - base : end - base]
        return None

    def emitter(self, start: int, end: int) -> codec.Emit:
        """Where decoded bytes of the chunk covering [start, end) go: into the tensors they belong
        to (padding dropped), also every ``stride``-th byte (a byte-grouped plane)."""
        hits = self.overlapping(start, end)

        def emit(first: int, stride: int, data: torch.Tensor) -> None:
            n = data.numel()
            for i, a, b in hits:
                # the k with a <= start + first + k * stride < b
                lo = max(0, -((start + first - a) // stride))
                hi = min(n, -((start + first - b) // stride))
                if lo < hi:
                    at = start + first + lo * stride - self._entries[i].offset
                    buffer = self.buffers[i]
                    assert buffer is not None  # only wanted tensors overlap
                    buffer[at : at + (hi - lo - 1) * stride + 1 : stride].copy_(data[lo:hi])

        return emit

    def tensors(self) -> list[torch.Tensor | None]:
        """Every tensor read (None for those not asked for)."""
        return [
            None if buf is None else buf.view(DTYPES[t.dtype]).view(t.shape)
            for buf, t in zip(self.buffers, self._entries, strict=True)
        ]


def read_checkpoint(
    path: Where,
    workers: int = 4,
    manifest: Manifest | None = None,
    only: set[int] | None = None,
    mmap: bool = False,
    *,
    identity: DirIdentity | None = None,
    into: Mapping[int, torch.Tensor] | None = None,
) -> LoadedCheckpoint:
    """Read and verify the checkpoint at ``path`` into CPU tensors (all or none): every chunk
    holding a wanted tensor (``only``; by default every tensor, of a multi-rank checkpoint every
    tensor its consolidated tree names).

    Each tensor gets its own storage (not a view of one big buffer): a loaded tensor can be kept,
    saved with torch.save or exported without dragging the rest of the checkpoint along. Private
    memory: nothing done to the files afterwards changes the tensors.

    With ``mmap`` (opt-in), a checkpoint whose wanted chunks are all raw and laid out at their
    logical offsets in one data file (what ``compression=None`` writes) is mapped instead of read:
    see :func:`_map_raw`. Any other layout reads and decodes chunk by chunk.

    ``identity``: as for :func:`read_manifest`; pass the one ``manifest`` was read under, so a step
    replaced between the two reads is found gone, not damaged.

    ``into`` maps a tensor index to where its bytes are decoded (a contiguous uint8 tensor of
    exactly its ``nbytes``, such as a slice of a larger tensor the caller assembles): the returned
    tensor is then a view of it, and no storage of its own is allocated and copied from. The
    destinations hold partly decoded bytes when the read fails; the caller drops them then.
    Not with ``mmap``, and only for a single-rank manifest (or a rank's table).
    """
    with _same_directory(path, identity) as now:
        return _read_checkpoint(path, workers, manifest, only, mmap, now, into=into)


def _read_checkpoint(
    path: Where,
    workers: int,
    manifest: Manifest | None,
    only: set[int] | None,
    mmap: bool,
    now: DirIdentity | None,
    *,
    into: Mapping[int, torch.Tensor] | None = None,
) -> LoadedCheckpoint:
    """``now``: the identity ``_same_directory`` yielded, to read the manifest by (None when
    ``manifest`` is given)."""
    manifest = manifest or _manifest_at(path, _yielded(now))
    if into:
        _check_destinations(manifest, only, into, mmap)
    if isinstance(manifest, MultiRankManifest):
        return _read_multi_rank(path, workers, manifest, only)
    files: dict[str, ReadHandle] = {}
    try:
        _open_data_files(path, manifest, files)
        # a partial read (``only``) skips chunks that hold none of the wanted tensors
        index = _Index(manifest, only)
        wanted_chunks = [
            i
            for i, c in enumerate(manifest.chunks)
            if only is None or index.needs(c.raw_offset, c.raw_offset + c.raw_length)
        ]
        if mmap:
            mapped = _map_raw(path, manifest, files, wanted_chunks, only, workers)
            if mapped is not None:
                return LoadedCheckpoint(path, manifest, cast(list[torch.Tensor], mapped), mapped=True)
        scatter = _Scatter(manifest, only, into)
        readers = _readers(path, workers)

        def load_chunk(index: int) -> None:
            chunk = manifest.chunks[index]
            start, end = chunk.raw_offset, chunk.raw_offset + chunk.raw_length
            _decode_chunk(path, manifest, files, index, scatter.target(start, end), scatter.emitter(start, end))

        _for_each_chunk(load_chunk, wanted_chunks, readers)
    finally:
        for handle in files.values():
            handle.close()
    return LoadedCheckpoint(path, manifest, cast(list[torch.Tensor], scatter.tensors()))


def _check_destinations(
    manifest: Manifest, only: set[int] | None, into: Mapping[int, torch.Tensor], mmap: bool
) -> None:
    """``into`` fits the tensors it names. A misfit is the caller's bug, never the checkpoint's:
    TypeError, which a load does not take for damage (it would fall back to an older step)."""
    if mmap or isinstance(manifest, MultiRankManifest):
        raise TypeError("destinations are taken for a decoded read of one table, not with mmap")
    for i, buffer in into.items():
        if not 0 <= i < len(manifest.tensors) or (only is not None and i not in only):
            raise TypeError(f"destination of tensor {i}: not a wanted tensor of the manifest")
        entry = manifest.tensors[i]
        if buffer.dtype != torch.uint8 or buffer.dim() != 1:
            raise TypeError(f"destination of tensor {i} is not a flat uint8 buffer")
        if buffer.numel() != entry.nbytes or not buffer.is_contiguous() or buffer.device.type != "cpu":
            raise TypeError(f"destination of tensor {i} is not {entry.nbytes} contiguous bytes in CPU memory")
        if buffer.storage_offset() % DTYPES[entry.dtype].itemsize:
            raise TypeError(f"destination of tensor {i} does not start at a multiple of its element size")


def _read_multi_rank(path: Where, workers: int, view: MultiRankManifest, only: set[int] | None) -> LoadedCheckpoint:
    """``read_checkpoint`` of a multi-rank checkpoint's consolidated view: rank 0's own tensors from
    its data file, each global tensor assembled whole from its pieces.

    By default only the tensors the tree names are read (the others stay None): rank 0's table also
    lists its pieces of the global tensors, which are read as parts of those, not a second time."""
    from asyncckpt.engine.pieces import read_boxes, whole

    assert view.tables is not None
    wanted = tensor_indices(view.tree) if only is None else only
    local = {i for i in wanted if i < view.local_count}
    tensors: list[torch.Tensor | None] = [None] * len(view.tensors)
    if local:
        own = _read_checkpoint(path, workers, view.tables[0], local, False, None).tensors
        for i in local:
            tensors[i] = own[i]
    globals_ = sorted(i - view.local_count for i in wanted if i >= view.local_count)
    read, _ = read_boxes(path, view, [whole(view, g) for g in globals_], workers)
    for g, tensor in zip(globals_, read, strict=True):
        tensors[view.local_count + g] = tensor
    return LoadedCheckpoint(path, view, cast(list[torch.Tensor], tensors))


def _for_each_chunk(
    work: Callable[[int], _T], indexes: Iterable[int], workers: int, done: Callable[[_T], None] | None = None
) -> None:
    """``work(i)`` for every chunk index, on up to ``workers`` threads (zstd, CRC32 and pread
    release the GIL), then ``done(result)`` in chunk order on this thread.

    At most two chunks per thread are in flight, taken in order, and the next one starts only once
    the oldest has succeeded: after a failure no further chunk is read, so a damaged checkpoint
    costs a few chunks, not a full read. The failure is raised once the running chunks finished.
    """
    indexes = list(indexes)
    if workers <= 1 or len(indexes) <= 1:
        for i in indexes:
            result = work(i)
            if done is not None:
                done(result)
        return
    upcoming = iter(indexes)
    pending: collections.deque[Future[_T]] = collections.deque()
    pool = ThreadPoolExecutor(min(workers, len(indexes)), "asyncckpt-read")
    try:
        for i in itertools.islice(upcoming, 2 * workers):
            pending.append(pool.submit(work, i))
        while pending:
            result = pending.popleft().result()
            following = next(upcoming, None)
            if following is not None:
                pending.append(pool.submit(work, following))
            if done is not None:
                done(result)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # before the caller closes the files the work reads


def _open_data_files(path: Where, manifest: Manifest, files: dict[str, ReadHandle]) -> None:
    """Open every data file into ``files`` (closed by the caller) and check each chunk ends within it."""
    store, name = _locate(path)
    sizes: dict[str, int] = {}
    for chunk in manifest.chunks:
        if chunk.file not in files:
            files[chunk.file] = _damaged(store.open_read, f"{name}/{chunk.file}")
            sizes[chunk.file] = files[chunk.file].size
        if chunk.offset + chunk.length > sizes[chunk.file]:
            raise CheckpointDamagedError(
                f"{path / chunk.file} is truncated: a chunk for "
                f"{_tensor_names(manifest, chunk.raw_offset, chunk.raw_offset + chunk.raw_length)} "
                f"ends at byte {chunk.offset + chunk.length}, the file has {sizes[chunk.file]}"
            )


# On a remote store each read is a request with a round trip, so a chunk's stored bytes are
# fetched in windows this large (one ranged GET per window, and a default chunk in one), not in
# the decoder's 1 MiB pieces; and at least this many chunks are in flight, whatever the core count.
_REMOTE_WINDOW = 16 << 20
_REMOTE_READERS = 16
_REMOTE_TABLE_READS = 16  # a multi-rank checkpoint's rank tables in flight at once on a remote store


def _remote(path: Where) -> bool:
    """Whether the checkpoint is on a remote store (a local path never is)."""
    return isinstance(path, CheckpointRef) and path.backend.capabilities.remote


def _readers(path: Where, workers: int) -> int:
    """Threads reading chunks: ``workers``, or more for a remote store (they wait on the network)."""
    return max(workers, _REMOTE_READERS) if _remote(path) else workers


def _chunk_source(handle: ReadHandle, offset: int, length: int, what: str, remote: bool) -> codec.ChunkSource:
    """The stored bytes of a chunk, read from its data object by byte ranges."""

    def read(out: memoryview, pos: int) -> int:
        try:
            return handle.read_into(out, offset + pos)
        except OSError as exc:
            raise CheckpointDamagedError(f"cannot read {what}: {exc.strerror or exc}") from exc

    if not remote:
        return codec.ChunkSource(length, read, what)
    window = bytearray(min(length, _REMOTE_WINDOW))
    held = [0, 0]  # the chunk range [start, end) the window holds

    def windowed(out: memoryview, pos: int) -> int:
        if not held[0] <= pos < held[1]:
            size = min(len(window), length - pos)
            got = 0
            while got < size:
                n = read(memoryview(window)[got:size], pos + got)
                if n <= 0:
                    break
                got += n
            held[:] = [pos, pos + got]
            if got == 0:
                return 0
        n = min(len(out), held[1] - pos)
        out[:n] = memoryview(window)[pos - held[0] : pos - held[0] + n]
        return n

    return codec.ChunkSource(length, windowed, what)


def _decode_chunk(
    path: Where,
    manifest: Manifest,
    files: dict[str, ReadHandle],
    index: int,
    direct: torch.Tensor | None = None,
    emit: codec.Emit | None = None,
) -> None:
    """Read chunk ``index`` in pieces, check its CRC32 and codec chain, decode it into ``direct``
    (one tensor holds the whole chunk) or through ``emit`` (neither: verify only)."""
    chunk = manifest.chunks[index]
    source = _chunk_source(files[chunk.file], chunk.offset, chunk.length, f"chunk {index}", _remote(path))
    try:
        codec.decode_chunk(source, chunk.codecs, chunk.crc32, chunk.raw_length, direct, emit)
    except CheckpointDamagedError as exc:
        # names are worked out only on failure: they cost a scan of the tensor table and the tree
        start, end = chunk.raw_offset, chunk.raw_offset + chunk.raw_length
        raise CheckpointDamagedError(
            f"{path / chunk.file}: {exc} (holds {_tensor_names(manifest, start, end)})"
        ) from None


def verify_checkpoint(
    path: Where,
    progress: Callable[[int], None] | None = None,
    manifest: Manifest | None = None,
    workers: int = 4,
    *,
    identity: DirIdentity | None = None,
) -> Manifest:
    """Check the manifest and every chunk's CRC32 and codec chain; the manifest, or a CheckpointError.

    The same checks as ``read_checkpoint`` (a checkpoint this passes, restore reads), decoding each
    chunk piece by piece into nothing: memory stays at a few pieces per thread, whatever the
    checkpoint's size. ``progress`` gets each verified chunk's stored length, in chunk order; on
    success the calls sum to ``manifest.stored_bytes``. ``identity``: as for :func:`read_checkpoint`.
    """
    with _same_directory(path, identity) as now:
        return _verify_checkpoint(path, progress, manifest, workers, now)


def why_no_tier_verifies(step: int, tiers: Mapping[str, list[CommittedCheckpoint]]) -> list[str] | None:
    """None when ``step`` verifies in one of ``tiers`` (a root and its mirror, by name), else each
    tier's reason ("in the mirror: ..."): a rollback must keep a checkpoint that restores.

    Args:
        step: The step rolled back to.
        tiers: Each tier's committed checkpoints.

    Returns:
        None, or the reasons (empty when no tier holds ``step``).
    """
    reasons = []
    for tier, committed in tiers.items():
        found = next((c for c in committed if c.step == step), None)
        if found is None:
            continue
        try:
            verify_checkpoint(found.ref)
            return None
        except CheckpointError as exc:
            reasons.append(f"in the {tier}: {exc}")
    return reasons


def _verify_checkpoint(
    path: Where,
    progress: Callable[[int], None] | None,
    manifest: Manifest | None,
    workers: int,
    now: DirIdentity | None,
) -> Manifest:
    manifest = manifest or _manifest_at(path, _yielded(now))
    if isinstance(manifest, MultiRankManifest):
        assert manifest.tables is not None
        for table in manifest.tables:  # each rank's chunks, named by its data file
            _verify_checkpoint(path, progress, table, workers, None)
        return manifest
    files: dict[str, ReadHandle] = {}
    try:
        _open_data_files(path, manifest, files)

        def check(index: int) -> int:
            _decode_chunk(path, manifest, files, index)
            return manifest.chunks[index].length

        # results come back in chunk order, on this thread: progress needs no lock
        _for_each_chunk(check, range(len(manifest.chunks)), _readers(path, workers), progress)
    finally:
        for handle in files.values():
            handle.close()
    return manifest


def _is_identity_layout(manifest: Manifest, wanted_chunks: list[int]) -> bool:
    """True when every wanted chunk is raw, in one data file, at file offset == logical offset."""
    chunks = [manifest.chunks[i] for i in wanted_chunks]
    return bool(chunks) and all(
        not c.codecs and c.file == chunks[0].file and c.offset == c.raw_offset and c.length == c.raw_length
        for c in chunks
    )


def _map_raw(
    path: Where,
    manifest: Manifest,
    files: dict[str, ReadHandle],
    wanted_chunks: list[int],
    only: set[int] | None,
    workers: int,
) -> list[torch.Tensor | None] | None:
    """Map a raw checkpoint's data file and return its verified tensors as views of the mapping.

    None when the layout does not qualify (a compressed chunk, several data files, a chunk not at
    its logical offset), the backend offers no memory map, or the file cannot be mapped: the
    caller then reads it the usual way.

    How, and why this way (works on torch >= 2.4, needs only the standard library):

    - The file mapped is the file checked: ``mmap.mmap`` maps the descriptor the backend's
      ``open_read`` opened (O_NOFOLLOW, regular files only) and whose size the caller compared with the manifest.
      ``torch.UntypedStorage.from_file`` would re-open the path (following links, with a window
      in which the file could be swapped), and hands back one storage for the whole file.
    - The mapping is private (``ACCESS_COPY``: MAP_PRIVATE, read-write): a write into a loaded
      tensor copies that page for this process and never reaches the file; untouched pages stay
      shared with the page cache, so the state costs no anonymous memory.
    - Each tensor is ``torch.frombuffer(mapping, count, offset)``: its own storage of exactly its
      bytes, which holds a reference to the mapping (unmapped when the last tensor goes). A tensor
      can still be kept, saved or exported alone without dragging the whole file along.
    - Every wanted chunk's CRC32 is computed over the mapped bytes (in parallel; the CRC32 releases the
      GIL) before any tensor is made, so a damaged file is an error, never a silently wrong state.
    - The caller has checked that every chunk ends within the file, so no page of the mapping
      lies past the end of the file (the SIGBUS case); mapping only up to the manifest's end keeps
      trailing bytes out. A file truncated by someone else *while* mapped can still fault: committed
      checkpoints are never rewritten by asyncckpt (retention unlinks, which keeps the pages).
    """
    if not _is_identity_layout(manifest, wanted_chunks):
        return None
    name = manifest.chunks[wanted_chunks[0]].file
    end = max(c.offset + c.length for c in manifest.chunks if c.file == name)
    fd = files[name].fileno() if _locate(path)[0].capabilities.mmap else None
    if fd is None:
        return None
    try:
        mapping = _mmap.mmap(fd, end, access=_mmap.ACCESS_COPY)
    except (OSError, ValueError):  # a filesystem that cannot map: read it instead
        return None
    try:
        if hasattr(_mmap, "MADV_WILLNEED"):  # start reading ahead of the page faults (cold cache)
            first = min(manifest.chunks[i].offset for i in wanted_chunks)
            start = first - first % _mmap.PAGESIZE
            last = max(manifest.chunks[i].offset + manifest.chunks[i].length for i in wanted_chunks)
            try:
                mapping.madvise(_mmap.MADV_WILLNEED, start, last - start)
            except OSError:  # only a hint
                pass
        with memoryview(mapping) as view:

            def verify(index: int) -> None:
                chunk = manifest.chunks[index]
                actual = crc32(view[chunk.offset : chunk.offset + chunk.length], 0)
                if actual != chunk.crc32:
                    where = _tensor_names(manifest, chunk.raw_offset, chunk.raw_offset + chunk.raw_length)
                    raise CheckpointDamagedError(
                        f"{path / chunk.file}: checksum mismatch in chunk {index}: stored CRC32 "
                        f"{chunk.crc32:08x}, computed {actual:08x} (holds {where})"
                    )

            _for_each_chunk(verify, wanted_chunks, workers)
    except BaseException:
        try:
            mapping.close()  # unmapped now, not at garbage collection: no tensor refers to it yet
        except BufferError:
            pass
        raise
    tensors: list[torch.Tensor | None] = []
    for i, entry in enumerate(manifest.tensors):
        dtype = DTYPES[entry.dtype]
        if only is not None and i not in only:
            tensors.append(None)
        elif entry.nbytes == 0:
            tensors.append(torch.empty(entry.shape, dtype=dtype))
        else:
            raw = torch.frombuffer(mapping, dtype=torch.uint8, count=entry.nbytes, offset=entry.offset)
            tensors.append(raw.view(dtype).view(entry.shape))
    return tensors
