"""Cut a save's logical byte space into chunks that follow its tensors.

The staging layout (``engine.staging.plan_layout``) puts tensors one after another, grouped by
dtype, each 64-byte aligned; a tensor's *extent* is its bytes plus the alignment padding after it,
and the extents tile the layout. Chunks are contiguous ranges of that space (the format needs
nothing more), cut so that a reader of some tensors decodes only their chunks:

- a tensor of at most ``chunk_size`` bytes is never cut: consecutive small tensors of one dtype are
  packed into a chunk while they fit;
- a larger tensor gets chunks of its own, cut on row boundaries (a row is ``shape[1:]`` elements),
  each as full as the chunk size allows; a single row larger than a chunk is cut on element
  boundaries;
- in a save of several ranks, a *piece* of a global tensor (a DTensor's shard, rows of a
  replicated tensor) also gets chunks of its own where it is cut for resharding
  (:func:`reshard_cuts`): at the rows where FSDP2's shards of the whole tensor start at the
  job's shard count (the ranks its rows are split over), at 2, 4 or 8 times it, or at a half, a
  quarter or an eighth of it, as far as the piece is large enough. A job resumed at such a world
  size then decodes on each rank only its own rows' chunks, instead of whole pieces (and whatever
  small tensors were packed with them). A piece too small to be cut but of ``MIN_RESHARD_PART``
  bytes or more still gets a chunk of its own: a rank that needs only the small tensors beside it
  (a replicated scalar every rank reads) does not decode it.

Every chunk is at most ``chunk_size`` bytes (padding included), holds one dtype, and its length
is a whole number of elements, so byte-grouping applies to it as to the tensors.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from asyncckpt.codec import bytegroup_size
from asyncckpt.engine.staging import Layout, TensorSlot
from asyncckpt.format import ALIGNMENT, GlobalEntry, PieceEntry

RESHARD_FACTORS = (2, 4, 8)  # shard counts a piece is cut for: these times the job's, and the job's over these
# a piece is cut for a factor when its 1/factor holds this many bytes: a chunk has fixed costs
# (a zstd frame per plane, a CRC, a write, a chunk entry), so small ones cost more per byte
MIN_RESHARD_PART = 1 << 20


@dataclass(frozen=True)
class ChunkPlan:
    """A contiguous, dtype-homogeneous range of the arena to encode as one stored chunk."""

    start: int
    end: int
    group: int  # byte-group size (1 = none)


def _extent_end(slot: TensorSlot) -> int:
    return -(-(slot.offset + slot.nbytes) // ALIGNMENT) * ALIGNMENT


def _split(units: int, unit: int, capacity: int, tail: int) -> list[int]:
    """How many units each piece gets: as many as ``capacity`` bytes hold, the last piece what is
    left (and ``tail`` bytes of padding with it): the fewest pieces, all but the last full.

    Full pieces compress better than near-equal ones: 0.3% of ratio on MiniLM's large matrices at
    4 MiB (bench/codec.py), likely because a full chunk's byte planes then end near zstd's 128 KiB
    block boundaries, and a block holding the end of one plane and the start of the next gets one
    entropy table for both. The caller makes sure one unit plus the tail fits: ``unit + tail <=
    capacity``.
    """
    per, per_last = capacity // unit, (capacity - tail) // unit
    counts = []
    while units > per_last:
        take = min(per, units - 1)  # at least one unit left for the last piece
        counts.append(take)
        units -= take
    return [*counts, units]


def _cut_rows(start: int, rows: int, row: int, itemsize: int, tail: int, capacity: int) -> list[tuple[int, int]]:
    """The (start, end) ranges of ``rows`` rows of ``row`` bytes from ``start``, each at most
    ``capacity`` bytes: on row boundaries, or on element boundaries where a row (with ``tail``
    bytes of padding after the last) does not fit; the last range takes the padding."""
    if row + tail <= capacity:  # whole rows
        counts = [(count, row) for count in _split(rows, row, capacity, tail)]
    else:  # each row cut on element boundaries
        counts = [
            (count, itemsize)
            for r in range(rows)
            for count in _split(row // itemsize, itemsize, capacity, tail if r == rows - 1 else 0)
        ]
    pieces = []
    at = start
    for count, unit in counts:
        pieces.append((at, at + count * unit))
        at += count * unit
    assert at == start + rows * row
    pieces[-1] = (pieces[-1][0], at + tail)
    return pieces


def _slot_rows(slot: TensorSlot) -> tuple[int, int]:
    """A slot's rows and bytes per row (a 0-dim tensor is one row)."""
    row = math.prod(slot.shape[1:]) * slot.dtype.itemsize
    return slot.nbytes // row, row


def reshard_cuts(first: int, rows: int, total: int, row: int, parts: int) -> list[int]:
    """Where to cut a piece holding rows ``[first, first + rows)`` of a tensor of ``total`` rows
    of ``row`` bytes whose rows the job splits in ``parts`` (the product of the sizes of the mesh
    dimensions placed ``Shard(0)``; the world size for a tensor whose rows are not sharded):
    its rows (counted from ``first``) at which FSDP2's shards of the tensor start at M =
    ``parts`` and ``parts`` times and over each factor of :data:`RESHARD_FACTORS` (``ceil(total
    / M)`` rows a shard at M ranks). Only for the factors whose share of the piece, and for the
    M whose shard, holds :data:`MIN_RESHARD_PART` bytes: small pieces stay whole (packed with
    their neighbours), and a piece holding a whole tensor (a replicated one) is not cut into a
    thousand slivers at a large world size, as more, smaller chunks cost more per byte to encode."""
    cuts: set[int] = set()
    if total <= 0 or rows <= 0 or row <= 0 or parts <= 0:
        return []
    for factor in (1, *RESHARD_FACTORS):
        if rows * row // factor < MIN_RESHARD_PART:
            break
        worlds = [parts * factor]
        if factor > 1 and parts % factor == 0 and parts > factor:
            worlds.append(parts // factor)
        for world in worlds:
            per = -(-total // world)
            if per * row < MIN_RESHARD_PART:
                continue
            at = (first // per + 1) * per
            while at < first + rows:
                cuts.add(at - first)
                at += per
    return sorted(cuts)


def piece_cuts(
    slots: Sequence[TensorSlot], pieces: Sequence[PieceEntry], globals_: Sequence[GlobalEntry], parts: Sequence[int]
) -> dict[int, list[int]]:
    """:func:`reshard_cuts` of every piece of a rank's save that holds whole rows of its global
    tensor (FSDP2's shards, replicated tensors' row pieces; not a shard of another dimension),
    by the piece's index in ``slots`` (its tensor in the rank table), and with no cuts every such
    piece of :data:`MIN_RESHARD_PART` bytes or more, which gets chunks of its own all the same;
    ``parts``: by piece, in how many parts the job splits its global tensor's rows."""
    cuts: dict[int, set[int]] = {}
    for piece, split in zip(pieces, parts, strict=True):
        slot, entry = slots[piece.tensor], globals_[piece.index]
        if not slot.nbytes or not slot.shape or slot.shape[1:] != tuple(entry.shape[1:]) or any(piece.offsets[1:]):
            continue
        rows = slot.shape[0]
        found = reshard_cuts(piece.offsets[0], rows, entry.shape[0], slot.nbytes // rows, split)
        if found or slot.nbytes >= MIN_RESHARD_PART:
            # a piece of this size is not packed with its neighbours even where it is not cut: a
            # rank that needs one of them (a replicated scalar every rank reads) would decode it too
            cuts.setdefault(piece.tensor, set()).update(found)
    return {index: sorted(rows) for index, rows in cuts.items()}


def _cut_tensor(slot: TensorSlot, cuts: list[int], capacity: int) -> list[tuple[int, int]]:
    """The (start, end) ranges of a tensor with chunks of its own (larger than a chunk, or a piece
    cut at the rows ``cuts``, sorted, inside it), each row range as :func:`_cut_rows` cuts it;
    the last one takes the padding."""
    rows, row = _slot_rows(slot)
    tail = _extent_end(slot) - (slot.offset + slot.nbytes)
    bounds = [0, *cuts, rows]
    ranges: list[tuple[int, int]] = []
    for first, end in zip(bounds, bounds[1:], strict=False):
        padding = tail if end == rows else 0
        ranges += _cut_rows(slot.offset + first * row, end - first, row, slot.dtype.itemsize, padding, capacity)
    return ranges


def plan_chunks(layout: Layout, chunk_size: int, cuts: Mapping[int, list[int]] | None = None) -> list[ChunkPlan]:
    """Cut the layout into tensor-aligned chunks of at most ``chunk_size`` bytes (see the module).

    Args:
        layout: the save's staging layout.
        chunk_size: the largest chunk in bytes (rounded down to a multiple of 64, at least 64).
        cuts: by index in ``layout.slots``, the rows at which a tensor is cut besides (a piece
            of a global tensor, for resharding: :func:`piece_cuts`); such a tensor gets chunks of
            its own, with no cut besides where the list is empty.

    Returns:
        The chunks, in order: contiguous, covering ``[0, layout.total)``.
    """
    capacity = max(ALIGNMENT, chunk_size - chunk_size % ALIGNMENT)
    cut_at = {id(layout.slots[i]): rows for i, rows in (cuts or {}).items() if layout.slots[i].nbytes}
    slots = sorted((s for s in layout.slots if s.nbytes), key=lambda s: s.offset)
    starts = [s.offset for s in slots]
    plans: list[ChunkPlan] = []
    for group in layout.groups:
        size = bytegroup_size(group.dtype)
        pack: int | None = None  # where the open pack of small tensors starts
        first, last = bisect.bisect_left(starts, group.start), bisect.bisect_left(starts, group.end)
        for slot in slots[first:last]:
            end = _extent_end(slot)
            rows = cut_at.get(id(slot))
            if end - slot.offset <= capacity and rows is None:
                if pack is not None and end - pack > capacity:
                    plans.append(ChunkPlan(pack, slot.offset, size))
                    pack = None
                if pack is None:
                    pack = slot.offset
                continue
            if pack is not None:
                plans.append(ChunkPlan(pack, slot.offset, size))
                pack = None
            plans.extend(ChunkPlan(start, stop, size) for start, stop in _cut_tensor(slot, rows or [], capacity))
        if pack is not None:
            plans.append(ChunkPlan(pack, group.end, size))
    return plans
