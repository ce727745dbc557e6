"""engine/chunking.py: tensor-aligned chunks (packs of small tensors, large tensors cut on rows)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import asyncckpt
from asyncckpt import codec
from asyncckpt.codec import bytegroup_size
from asyncckpt.engine.chunking import MIN_RESHARD_PART, ChunkPlan, piece_cuts, plan_chunks, reshard_cuts
from asyncckpt.engine.staging import Layout, TensorSlot, plan_layout
from asyncckpt.format import ALIGNMENT


def extent_end(slot: TensorSlot) -> int:
    return -(-(slot.offset + slot.nbytes) // ALIGNMENT) * ALIGNMENT


def check_cover(layout: Layout, chunks: list[ChunkPlan], chunk_size: int) -> int:
    """Contiguous cover of the whole layout, each chunk at most the capacity (returned), within one
    dtype group, of whole elements."""
    capacity = max(ALIGNMENT, chunk_size - chunk_size % ALIGNMENT)
    assert [c.start for c in chunks[:1]] == ([0] if layout.total else [])
    assert all(a.end == b.start for a, b in zip(chunks, chunks[1:], strict=False))
    assert (chunks[-1].end if chunks else 0) == layout.total
    for chunk in chunks:
        assert 0 < chunk.end - chunk.start <= capacity
        (group,) = [g for g in layout.groups if g.start <= chunk.start < g.end]
        assert chunk.end <= group.end
        assert chunk.group == bytegroup_size(group.dtype)
        assert (chunk.end - chunk.start) % group.dtype.itemsize == 0
    return capacity


def check_alignment(layout: Layout, chunks: list[ChunkPlan], chunk_size: int) -> None:
    """Every property the planner promises, checked from the outside."""
    capacity = check_cover(layout, chunks, chunk_size)
    bounds = {c.start for c in chunks} | {layout.total}
    for slot in (s for s in layout.slots if s.nbytes):
        start, end = slot.offset, extent_end(slot)
        inside = sorted(b for b in bounds if start < b < end)
        if end - start <= capacity:
            assert not inside, f"a tensor of {slot.nbytes} bytes is cut at {inside}"  # never straddles
            continue
        # a large tensor: chunks of its own, cut on rows (or on elements when one row is too big)
        assert start in bounds and end in bounds
        row = math.prod(slot.shape[1:]) * slot.dtype.itemsize
        tail = end - (slot.offset + slot.nbytes)
        unit = row if row + tail <= capacity else slot.dtype.itemsize
        assert all((b - start) % unit == 0 for b in inside), (row, unit, inside)
        if unit == row:  # as few pieces as fit, full but for the last two (the last holds the padding)
            pieces = [b - a for a, b in zip([start, *inside], [*inside, slot.offset + slot.nbytes], strict=True)]
            full = capacity // row * row
            assert all(piece == full for piece in pieces[:-2])
            room_last = (capacity - tail) // row * row
            assert len(pieces) == 1 + -(-max(0, slot.nbytes - room_last) // full)
    # packs are greedy: a pack is closed only when the next small tensor does not fit in it
    small_at = {s.offset: extent_end(s) for s in layout.slots if s.nbytes and extent_end(s) - s.offset <= capacity}
    for a, b in zip(chunks, chunks[1:], strict=False):
        same_group = any(g.start <= a.start and b.end <= g.end for g in layout.groups)
        if same_group and a.start in small_at and b.start in small_at:
            assert (a.end - a.start) + (small_at[b.start] - b.start) > capacity


def test_chunks_cover_every_group_without_crossing_dtypes():
    tensors = [
        torch.zeros(3_000_000, dtype=torch.float32),  # 12 MB: several chunks
        torch.zeros(5, dtype=torch.int64),
        torch.zeros(7, dtype=torch.float32),  # packed with the first group
        torch.zeros(1000, dtype=torch.bfloat16),
    ]
    layout = plan_layout(tensors)
    chunks = plan_chunks(layout, 4 << 20)
    check_alignment(layout, chunks, 4 << 20)
    # the small float32 tensor sits in the float32 group, right after the big one, in a chunk of its own
    assert layout.slots[2].offset < layout.groups[0].end
    assert ChunkPlan(layout.slots[2].offset, layout.groups[0].end, 4) in chunks


def test_a_large_tensor_is_cut_on_row_boundaries_into_full_chunks():
    # 1000 rows of 1200 bytes: 3 rows per 4 KiB chunk at most
    tensors = [torch.zeros(10, dtype=torch.float32), torch.zeros(1000, 300, dtype=torch.float32)]
    layout = plan_layout(tensors)
    chunks = plan_chunks(layout, 4096)
    check_alignment(layout, chunks, 4096)
    big = layout.slots[1]
    own = [c for c in chunks if big.offset <= c.start < big.offset + big.nbytes]
    assert own[0].start == big.offset
    assert [c.end - c.start for c in own] == [3600] * 333 + [1200]
    assert chunks[0] == ChunkPlan(0, 64, 4)  # the small tensor before it is not merged into it


def test_small_tensors_are_packed_up_to_the_chunk_size_and_never_split():
    tensors = [torch.zeros(250, dtype=torch.float32) for _ in range(10)]  # 1000 bytes, 1024 with padding
    layout = plan_layout(tensors)
    chunks = plan_chunks(layout, 4096)
    check_alignment(layout, chunks, 4096)
    assert [(c.start, c.end) for c in chunks] == [(0, 4096), (4096, 8192), (8192, 10240)]


def test_a_row_larger_than_a_chunk_is_cut_on_element_boundaries():
    tensors = [torch.zeros(3, 5000, dtype=torch.bfloat16)]  # rows of 10000 bytes
    layout = plan_layout(tensors)
    chunks = plan_chunks(layout, 4096)
    check_alignment(layout, chunks, 4096)
    assert {10000, 20000} <= {c.start for c in chunks}  # rows still start chunks
    assert all(c.start % 2 == 0 and c.group == 2 for c in chunks)


def test_padding_never_pushes_a_chunk_over_the_chunk_size():
    # 4 rows of 1020 bytes: two rows fit a 2048-byte chunk, but the last one carries 32 bytes of padding
    tensors = [torch.zeros(4, 255, dtype=torch.float32)]
    layout = plan_layout(tensors)
    chunks = plan_chunks(layout, 2048)
    check_alignment(layout, chunks, 2048)
    assert max(c.end - c.start for c in chunks) <= 2048


_DTYPES = [torch.float32, torch.bfloat16, torch.float64, torch.int64, torch.uint8, torch.bool, torch.complex64]
_tensor = st.tuples(
    st.sampled_from(_DTYPES),
    st.lists(st.integers(0, 24), min_size=0, max_size=3),
)


@settings(max_examples=300, deadline=None)
@given(specs=st.lists(_tensor, max_size=12), chunk_size=st.sampled_from([64, 128, 192, 320, 1024, 4096]))
def test_chunks_follow_tensors_for_any_layout(specs, chunk_size):
    tensors = [torch.zeros(shape, dtype=dtype) for dtype, shape in specs]
    layout = plan_layout(tensors)
    check_alignment(layout, plan_chunks(layout, chunk_size), chunk_size)


def test_a_piece_cut_for_resharding_gets_chunks_of_its_own_starting_at_its_cuts():
    # a 1 MiB piece of 1024 rows between two small tensors, cut at rows 256, 512 and 768
    tensors = [torch.zeros(10), torch.zeros(1024, 256), torch.zeros(10)]
    layout = plan_layout(tensors)
    piece = layout.slots[1]
    row = 256 * 4
    chunks = plan_chunks(layout, 4 << 20, {1: [256, 512, 768]})
    assert [(c.start, c.end) for c in chunks] == [
        (0, piece.offset),
        *[(piece.offset + i * 256 * row, piece.offset + (i + 1) * 256 * row) for i in range(4)],
        (piece.offset + piece.nbytes, layout.total),
    ]
    # the same tensor, not cut: packed whole with its neighbours into one chunk
    assert [(c.start, c.end) for c in plan_chunks(layout, 4 << 20)] == [(0, layout.total)]
    # chunks smaller than a range: each range is cut on rows, and the cuts still start chunks
    small = plan_chunks(layout, 100 << 10, {1: [256, 512, 768]})
    assert {piece.offset + i * 256 * row for i in range(4)} <= {c.start for c in small}
    assert max(c.end - c.start for c in small) <= 100 << 10


def _fsdp_starts(total: int, world: int) -> set[int]:
    per = -(-total // world)
    return set(range(per, total, per))


@pytest.mark.parametrize(
    ("total", "world", "row"),
    # pieces of 16 MiB or so: every factor's share and every shard hold 1 MiB at least
    [(4096, 2, 8192), (4098, 2, 8192), (1001, 2, 32768), (50257, 8, 3072), (4100, 4, 16384), (3000, 3, 16384)],
)
def test_reshard_cuts_put_every_fsdp2_shard_start_of_the_power_of_two_reshards_on_a_cut(total, world, row):
    """Each piece of an FSDP2 save at ``world`` ranks is cut exactly where the shards of the whole
    tensor start at 2, 4 and 8 times the ranks (and a half, a quarter, an eighth of them), for
    each factor whose share of the piece holds at least MIN_RESHARD_PART bytes; nowhere else."""
    per = -(-total // world)
    for first in range(0, total, per):
        rows = min(per, total - first)
        cuts = reshard_cuts(first, rows, total, row, world)
        expected: set[int] = set()
        for factor in (2, 4, 8):
            if rows * row // factor < MIN_RESHARD_PART:
                break
            starts = _fsdp_starts(total, world * factor)
            if world % factor == 0 and world > factor:
                starts |= _fsdp_starts(total, world // factor)
            expected |= {s - first for s in starts if first < s < first + rows}
        assert cuts == sorted(expected), (first, rows)
        assert all(0 < c < rows for c in cuts)
        # independently of the rule's form: every shard start of 2, 4 and 8 times the ranks
        # inside the piece is a cut
        for factor in (2, 4, 8):
            starts = {s - first for s in _fsdp_starts(total, world * factor) if first < s < first + rows}
            assert starts <= set(cuts), (factor, first, sorted(starts - set(cuts)))
    assert len(reshard_cuts(0, per, total, row, world)) >= 7  # the first piece: cut for every factor


def test_reshard_cuts_of_a_whole_replicated_tensor_at_many_ranks_stay_a_mebibyte_apart():
    """A DDP row piece or a replicated DTensor may hold a whole tensor: cut at every shard start of
    1024 or 8192 ranks, it would be thousands of slivers."""
    row = 2048  # an 8 MiB tensor of 4096 rows
    for world in (64, 1024):
        cuts = reshard_cuts(0, 4096, 4096, row, world)
        bounds = [0, *cuts, 4096]
        assert all((b - a) * row >= MIN_RESHARD_PART for a, b in zip(bounds, bounds[1:], strict=False)), cuts


def test_a_replicated_tensor_s_row_piece_is_cut_where_fsdp2_s_shards_start_at_the_same_count():
    """DDP's row pieces are spread over the ranks by bytes: a DDP checkpoint restored under FSDP2
    at the same world size wants the shards' starts, which fall inside them."""
    cuts = reshard_cuts(100, 2900, 4098, 8192, 2)  # rows [100, 3000) of 4098, saved by 2 ranks
    assert 2049 - 100 in cuts  # ceil(4098 / 2): no start of 4, 8 or 16 shards falls there


def test_piece_cuts_follow_each_piece_s_shard_count_and_skip_pieces_of_partial_rows():
    from asyncckpt.format import GlobalEntry, PieceEntry

    layout = plan_layout([torch.zeros(2049, 1024), torch.zeros(4096, 512), torch.zeros(8)])
    globals_ = [
        GlobalEntry("float32", (4098, 1024)),
        GlobalEntry("float32", (4096, 1024)),
        GlobalEntry("float32", (8,)),
    ]
    pieces = [
        PieceEntry(0, 0, (2049, 0)),  # rows 2049.. of 4098: a shard of 2 (HSDP on a world of 4)
        PieceEntry(1, 1, (0, 512)),  # columns 512..: a Shard(1) piece
        PieceEntry(2, 2, (0,)),  # too small to cut
    ]
    cuts = piece_cuts(layout.slots, pieces, globals_, [2, 4, 4])
    assert cuts == {0: reshard_cuts(2049, 2049, 4098, 4096, 2)}
    assert 3075 - 2049 in cuts[0]  # where the third of 4 FSDP2 shards starts (ceil(4098 / 4) = 1025)


def test_a_piece_too_small_to_cut_still_gets_a_chunk_of_its_own():
    from asyncckpt.format import GlobalEntry, PieceEntry

    rows = MIN_RESHARD_PART // 1024 + 8  # just over 1 MiB: under two shares' worth, so no cut
    layout = plan_layout([torch.zeros(()), torch.zeros(rows, 256), torch.zeros(())])
    globals_ = [GlobalEntry("float32", ()), GlobalEntry("float32", (4 * rows, 256)), GlobalEntry("float32", ())]
    pieces = [PieceEntry(0, 0, ()), PieceEntry(1, 1, (rows, 0)), PieceEntry(2, 2, ())]  # AdamW steps around a shard
    cuts = piece_cuts(layout.slots, pieces, globals_, [4, 4, 4])
    assert cuts == {1: []}
    chunks = plan_chunks(layout, 4 << 20, cuts)
    check_cover(layout, chunks, 4 << 20)
    piece = layout.slots[1]
    # a rank that reads a scalar (every rank does, at any world size) decodes only the scalars' packs
    assert [c for c in chunks if c.start < extent_end(piece) and piece.offset < c.end] == [
        ChunkPlan(piece.offset, extent_end(piece), bytegroup_size(torch.float32))
    ]
    assert len(chunks) == 3


def test_reshard_cuts_leave_a_small_piece_whole():
    rows = 2 * MIN_RESHARD_PART // 1024
    assert reshard_cuts(0, rows - 1, 2 * rows, 1024, 2) == []  # under two shares' worth: whole
    assert reshard_cuts(0, rows, 2 * rows, 1024, 2) == [rows // 2]  # two shares: the 4-rank start only


@settings(max_examples=200, deadline=None)
@given(
    specs=st.lists(_tensor, max_size=8),
    chosen=st.lists(st.lists(st.integers(1, 24), max_size=4), min_size=8, max_size=8),
    chunk_size=st.sampled_from([64, 320, 4096]),
)
def test_cut_tensors_start_chunks_at_their_cuts_for_any_layout(specs, chosen, chunk_size):
    tensors = [torch.zeros(shape, dtype=dtype) for dtype, shape in specs]
    layout = plan_layout(tensors)
    cuts = {}
    for i, slot in enumerate(layout.slots):
        rows = slot.shape[0] if slot.shape else 1
        inside = sorted({c for c in chosen[i] if c < rows})
        if slot.nbytes and inside:
            cuts[i] = inside
    chunks = plan_chunks(layout, chunk_size, cuts)
    check_cover(layout, chunks, chunk_size)
    bounds = {c.start for c in chunks} | {layout.total}
    for i, rows in cuts.items():
        slot = layout.slots[i]
        row = slot.nbytes // slot.shape[0]
        assert {slot.offset + r * row for r in [0, *rows]} | {extent_end(slot)} <= bounds  # chunks of its own


def _two_layer(width: int) -> torch.nn.Module:
    # 60x50 and 50x70 float32 weights: 12000 and 14000 bytes, no multiple of a 4 KiB chunk
    return torch.nn.Sequential(torch.nn.Linear(60, 50, bias=False), torch.nn.Linear(50, width, bias=False))


@pytest.fixture
def decoded(monkeypatch) -> list[int]:
    """The decoded length of every chunk the reader decodes from now on."""
    lengths: list[int] = []
    real = codec.decode_chunk

    def counting(source, codecs, crc32, raw_length, *args, **kwargs):
        lengths.append(raw_length)
        return real(source, codecs, crc32, raw_length, *args, **kwargs)

    monkeypatch.setattr(codec, "decode_chunk", counting)
    return lengths


def test_loading_one_models_weights_decodes_only_their_chunks(tmp_path, decoded):
    torch.manual_seed(0)
    model, ema = _two_layer(70), _two_layer(70)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 60)).sum().backward()
    optimizer.step()  # momentum buffers: more float32 tensors after the ema's
    with asyncckpt.CheckpointManager(tmp_path, chunk_size=4096) as mgr:
        mgr.save(1, {"model": model, "ema": ema, "optimizer": optimizer}).wait()
    assert not decoded  # saving decodes nothing

    fresh = _two_layer(70)
    asyncckpt.load_weights(tmp_path, fresh, key="ema")
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), ema.state_dict().values(), strict=True))
    # exactly the ema's two weights with their padding: 12032 + 14016 bytes, nothing of its neighbours
    assert sum(decoded) == 12032 + 14016
    assert len(decoded) == 3 + 4  # 50 rows of 240 bytes: 17 + 17 + 16; 70 rows of 200 bytes: 20 + 20 + 20 + 10


def test_a_partial_read_of_a_small_tensor_decodes_only_its_pack(tmp_path, decoded):
    from asyncckpt.engine.reader import read_checkpoint, read_manifest

    state = {"big": torch.randn(5000), "small": torch.arange(10.0), "after": torch.randn(5000)}
    with asyncckpt.CheckpointManager(tmp_path, chunk_size=4096) as mgr:
        mgr.save(1, state).wait()
    path = tmp_path / "step-000000000001"
    manifest = read_manifest(path)
    (index,) = [i for i, t in enumerate(manifest.tensors) if t.shape == (10,)]
    loaded = read_checkpoint(path, manifest=manifest, only={index})
    assert torch.equal(loaded.tensors[index], state["small"])
    assert decoded == [64]  # the small tensor's 40 bytes and their padding: one chunk of its own
