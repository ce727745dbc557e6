"""Cut a save's logical byte space into chunks that follow its tensors.

The staging layout (``engine.staging.plan_layout``) puts tensors one after another, grouped by
dtype, each 64-byte aligned; a tensor's *extent* is its bytes plus the alignment padding after it,
and the extents tile the layout. Chunks are contiguous ranges of that space (the format needs
nothing more), cut so that a reader of some tensors decodes only their chunks:

- a tensor of at most ``chunk_size`` bytes is never cut: consecutive small tensors of one dtype are
  packed into a chunk while they fit;
- a larger tensor gets chunks of its own, cut on row boundaries (a row is ``shape[1:]`` elements),
  each as full as the chunk size allows; a single row larger than a chunk is cut on element
  boundaries.

- in a save of several ranks, a *piece* of a global tensor (a DTensor's shard, rows of a
  replicated tensor) of at least ``2 * MIN_RESHARD_PART`` bytes also gets chunks of its own, cut
  first into 2, 4 or 8 equal row ranges (:func:`reshard_parts`), then each range as a larger
  tensor is. A job resumed at twice, four or eight times the ranks shards each piece in halves,
  quarters or eighths: each new rank then decodes only its own rows' chunks, instead of the whole
  piece (and whatever small tensors were packed with it).

Every chunk is at most ``chunk_size`` bytes (padding included), holds one dtype, and its length
is a whole number of elements, so byte-grouping applies to it as to the tensors.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Collection
from dataclasses import dataclass

from asyncckpt.codec import bytegroup_size
from asyncckpt.engine.staging import Layout, TensorSlot
from asyncckpt.format import ALIGNMENT

MAX_RESHARD_PARTS = 8  # row ranges a piece is cut into at most: exact reshards up to 8x the ranks
MIN_RESHARD_PART = 256 << 10  # bytes a row range holds at least (smaller chunks cost Python, not ratio)


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


def _cut_large(slot: TensorSlot, capacity: int) -> list[tuple[int, int]]:
    """The (start, end) ranges of a tensor larger than a chunk; the last one takes the padding."""
    rows, row = _slot_rows(slot)
    tail = _extent_end(slot) - (slot.offset + slot.nbytes)
    return _cut_rows(slot.offset, rows, row, slot.dtype.itemsize, tail, capacity)


def reshard_parts(slot: TensorSlot) -> int:
    """How many equal row ranges a piece of a global tensor is cut into: the most, up to
    :data:`MAX_RESHARD_PARTS` and a power of two, that each hold a row at least and
    :data:`MIN_RESHARD_PART` bytes at least (1: the piece is chunked as any tensor)."""
    if not slot.nbytes:
        return 1
    rows, _ = _slot_rows(slot)
    parts = 1
    while 2 * parts <= min(MAX_RESHARD_PARTS, rows) and slot.nbytes // (2 * parts) >= MIN_RESHARD_PART:
        parts *= 2
    return parts


def _cut_piece(slot: TensorSlot, parts: int, capacity: int) -> list[tuple[int, int]]:
    """The (start, end) ranges of a piece cut into ``parts`` row ranges as ``torch.chunk`` cuts
    rows (``ceil(rows / parts)`` each, the last what is left), each range then as
    :func:`_cut_rows` cuts it; the last one takes the padding."""
    rows, row = _slot_rows(slot)
    tail = _extent_end(slot) - (slot.offset + slot.nbytes)
    per = -(-rows // parts)
    ranges: list[tuple[int, int]] = []
    for first in range(0, rows, per):
        count = min(per, rows - first)
        last = first + count == rows
        ranges += _cut_rows(slot.offset + first * row, count, row, slot.dtype.itemsize, tail if last else 0, capacity)
    return ranges


def plan_chunks(layout: Layout, chunk_size: int, pieces: Collection[int] = ()) -> list[ChunkPlan]:
    """Cut the layout into tensor-aligned chunks of at most ``chunk_size`` bytes (see the module).

    Args:
        layout: the save's staging layout.
        chunk_size: the largest chunk in bytes (rounded down to a multiple of 64, at least 64).
        pieces: the indices in ``layout.slots`` of the pieces of global tensors (a save of
            several ranks), cut for resharding.

    Returns:
        The chunks, in order: contiguous, covering ``[0, layout.total)``.
    """
    capacity = max(ALIGNMENT, chunk_size - chunk_size % ALIGNMENT)
    parts = {id(layout.slots[i]): reshard_parts(layout.slots[i]) for i in pieces}
    slots = sorted((s for s in layout.slots if s.nbytes), key=lambda s: s.offset)
    starts = [s.offset for s in slots]
    plans: list[ChunkPlan] = []
    for group in layout.groups:
        size = bytegroup_size(group.dtype)
        pack: int | None = None  # where the open pack of small tensors starts
        first, last = bisect.bisect_left(starts, group.start), bisect.bisect_left(starts, group.end)
        for slot in slots[first:last]:
            end = _extent_end(slot)
            cut = parts.get(id(slot), 1)
            if end - slot.offset <= capacity and cut == 1:
                if pack is not None and end - pack > capacity:
                    plans.append(ChunkPlan(pack, slot.offset, size))
                    pack = None
                if pack is None:
                    pack = slot.offset
                continue
            if pack is not None:
                plans.append(ChunkPlan(pack, slot.offset, size))
                pack = None
            ranges = _cut_large(slot, capacity) if cut == 1 else _cut_piece(slot, cut, capacity)
            plans.extend(ChunkPlan(start, stop, size) for start, stop in ranges)
        if pack is not None:
            plans.append(ChunkPlan(pack, group.end, size))
    return plans
