"""Read boxes of the global tensors of a multi-rank checkpoint from the pieces that overlap them.

A reader asks for a box of a global tensor (the whole tensor for ``load``, a rank's shard for a
resharding ``restore``). Each piece overlapping it is a tensor of some rank's table; only the rows
of the piece that overlap the box are read (a contiguous byte range of that rank's logical byte
space), so only the chunks holding those rows are decoded: chunks are cut on row boundaries, which
keeps a power-of-two reshard close to the bytes it needs. Rows that are whole rows of the box (a
piece split on the first dimension only) are decoded straight into the box's memory; others are
decoded apart and copied in (cutting other dimensions there, for shards that split a later
dimension).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch

from asyncckpt._in_order import in_order
from asyncckpt.errors import CheckpointDamagedError, CheckpointError
from asyncckpt.format import DTYPES, MultiRankManifest, TensorEntry
from asyncckpt.storage.backend import CheckpointRef

Where = Path | CheckpointRef
_REMOTE_RANK_READS = 4  # ranks' pieces read at once from a remote store (each with its own readers)


@dataclass(frozen=True)
class Box:
    """A box of global tensor ``index``: ``offsets`` and ``shape`` in its dimensions."""

    index: int
    offsets: tuple[int, ...]
    shape: tuple[int, ...]


@dataclass(frozen=True)
class _Cut:
    """Rows [first, end) of a piece, to copy into the box: piece-relative and box-relative starts."""

    box: int  # which requested box
    rank: int
    entry: TensorEntry  # the piece's tensor in its rank's table
    first: int
    end: int
    piece_offsets: tuple[int, ...]


def whole(view: MultiRankManifest, index: int) -> Box:
    """The box of all of global tensor ``index``."""
    shape = view.globals[index].shape
    return Box(index, (0,) * len(shape), shape)


def read_boxes(path: Where, view: MultiRankManifest, boxes: list[Box], workers: int) -> tuple[list[torch.Tensor], int]:
    """Read each box of a global tensor into a new CPU tensor.

    Args:
        path: The checkpoint (as ``reader.read_checkpoint`` takes it).
        view: Its consolidated manifest, with the rank tables.
        boxes: The boxes wanted.
        workers: Reader threads per rank's read.

    Returns:
        The tensors, by box, and the number of logical bytes decoded to get them.

    Raises:
        CheckpointError: A box outside its global tensor, or any read failure (damage included).
    """
    from asyncckpt.engine.reader import _remote, _same_directory

    assert view.tables is not None
    out: list[torch.Tensor | None] = []
    cuts: dict[int, list[_Cut]] = {}
    for n, box in enumerate(boxes):
        entry = view.globals[box.index]
        if len(box.shape) != len(entry.shape) or any(
            o + s > d for o, s, d in zip(box.offsets, box.shape, entry.shape, strict=True)
        ):
            raise CheckpointError(f"box {list(box.offsets)}+{list(box.shape)} lies outside {list(entry.shape)}")
        pieces = [
            (rank, piece)
            for rank, piece in view.pieces_of(box.index)
            if math.prod(view.tables[rank].tensors[piece.tensor].shape)
            and _overlaps(box, piece.offsets, view.tables[rank].tensors[piece.tensor].shape)
        ]
        whole_piece = len(pieces) == 1 and (
            pieces[0][1].offsets == box.offsets
            and view.tables[pieces[0][0]].tensors[pieces[0][1].tensor].shape == box.shape
        )
        # a box that is one stored piece exactly (a restore at the same sharding) is decoded into a
        # tensor of its own and handed over as it is, not copied into a second one
        out.append(None if whole_piece else torch.empty(box.shape, dtype=DTYPES[entry.dtype]))
        if not math.prod(box.shape):
            continue
        for rank, piece in pieces:
            tensor = view.tables[rank].tensors[piece.tensor]
            if tensor.shape:
                first = max(0, box.offsets[0] - piece.offsets[0])
                end = min(tensor.shape[0], box.offsets[0] + box.shape[0] - piece.offsets[0])
            else:
                first, end = 0, 1
            cuts.setdefault(rank, []).append(_Cut(n, rank, tensor, first, end, piece.offsets))

    def read(rank: int) -> int:
        return _read_rank_cuts(path, view, boxes, out, rank, cuts[rank], workers)

    with _same_directory(path):  # once for every rank's read: the checkpoint is still the one listed
        # each rank's data is requests with round trips on a remote store: several ranks at once
        at_once = _REMOTE_RANK_READS if _remote(path) else 1
        decoded = sum(in_order(read, list(cuts), at_once, "asyncckpt-pieces"))
    return cast(list[torch.Tensor], out), decoded


def _read_rank_cuts(
    path: Where,
    view: MultiRankManifest,
    boxes: list[Box],
    out: list[torch.Tensor | None],
    rank: int,
    wanted: list[_Cut],
    workers: int,
) -> int:
    """Read the rows ``wanted`` of rank ``rank``'s pieces into the boxes' tensors (``out``);
    the logical bytes decoded to get them."""
    from asyncckpt.engine.reader import _Index, _read_checkpoint

    assert view.tables is not None
    table = view.tables[rank]
    ranges = []
    into: dict[int, torch.Tensor] = {}
    for k, cut in enumerate(wanted):
        row = cut.entry.nbytes // (cut.entry.shape[0] if cut.entry.shape else 1)
        start = cut.entry.offset + cut.first * row
        ranges.append(TensorEntry("uint8", ((cut.end - cut.first) * row,), start, (cut.end - cut.first) * row))
        target = out[cut.box]
        if target is not None and _whole_rows(boxes[cut.box], cut):
            first = cut.piece_offsets[0] + cut.first - boxes[cut.box].offsets[0] if cut.entry.shape else 0
            into[k] = _bytes_of(target)[first * row : (first + cut.end - cut.first) * row]
    # the ranges are no tensors of the table's tree: a damage message must not name its leaves
    synthetic = dataclasses.replace(table, tensors=ranges, tree={"d": []})
    try:
        loaded = _read_checkpoint(path, workers, synthetic, set(range(len(ranges))), False, None, into=into)
    except CheckpointDamagedError as exc:
        shown = sorted({boxes[cut.box].index for cut in wanted})
        names = ", ".join(f"{view.globals[g].dtype}{list(view.globals[g].shape)}" for g in shown[:4])
        more = f" and {len(shown) - 4} more" if len(shown) > 4 else ""
        raise CheckpointDamagedError(f"rank {rank}'s pieces of global tensors {names}{more}: {exc}") from exc
    needs = _Index(synthetic).needs  # the chunks the read decoded: those overlapping a range
    decoded = sum(c.raw_length for c in synthetic.chunks if needs(c.raw_offset, c.raw_offset + c.raw_length))
    for k, (cut, raw) in enumerate(zip(wanted, loaded.tensors, strict=True)):
        if k in into:
            continue  # decoded in place
        rows = raw.view(DTYPES[cut.entry.dtype]).view(
            (cut.end - cut.first, *cut.entry.shape[1:]) if cut.entry.shape else ()
        )
        target = out[cut.box]
        if target is None:
            out[cut.box] = rows
        else:
            _place(target, boxes[cut.box], rows, cut)
    return decoded


def _whole_rows(box: Box, cut: _Cut) -> bool:
    """Whether the cut's rows lie in the box whole: one contiguous run of the box's bytes, which
    they can be decoded into directly (a piece split on dimension 0 only, as FSDP2's and row
    pieces are)."""
    return cut.piece_offsets[1:] == box.offsets[1:] and cut.entry.shape[1:] == box.shape[1:]


def _bytes_of(target: torch.Tensor) -> torch.Tensor:
    """The bytes of a new (contiguous) box tensor, flat: a view, never a copy."""
    return target.view(-1).view(torch.uint8)


def _overlaps(box: Box, offsets: tuple[int, ...], shape: tuple[int, ...]) -> bool:
    return all(o < bo + bs and bo < o + s for o, s, bo, bs in zip(offsets, shape, box.offsets, box.shape, strict=True))


def _place(target: torch.Tensor, box: Box, rows: torch.Tensor, cut: _Cut) -> None:
    """Copy the part of ``rows`` (rows first..end of a piece at ``cut.piece_offsets``) that lies in
    the box into ``target`` (the box's tensor)."""
    if not box.shape:
        target.copy_(rows)
        return
    src, dst = [], []
    for dim in range(len(box.shape)):
        # the piece's rows start at piece_offsets[0] + first in the global tensor
        start = cut.piece_offsets[dim] + (cut.first if dim == 0 else 0)
        size = rows.shape[dim]
        lo, hi = max(start, box.offsets[dim]), min(start + size, box.offsets[dim] + box.shape[dim])
        src.append(slice(lo - start, hi - start))
        dst.append(slice(lo - box.offsets[dim], hi - box.offsets[dim]))
    target[tuple(dst)].copy_(rows[tuple(src)])
