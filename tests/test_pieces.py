"""Boxes of global tensors read from the ranks' pieces (``engine.pieces``), and the consolidated
load built on them.

One real 2-rank checkpoint (a spawned gloo job) holds pieces of every kind: FSDP2-like row shards
(uneven), column shards, replicated tensors cut in row pieces over the ranks, and a replicated
scalar, in several dtypes, at a small chunk size so pieces span several chunks. Rows that fill a
box whole are decoded into the box itself; other cuts are decoded apart and copied in.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import asyncckpt
from _dist import run_ranks
from _trees import same_tensor
from asyncckpt import format as fmt
from asyncckpt.engine import pieces
from asyncckpt.engine.pieces import Box, read_boxes, whole
from asyncckpt.engine.reader import read_checkpoint, read_manifest
from asyncckpt.errors import CheckpointDamagedError

ROW_SHARDED = ("rows", "half", "ids", "wide", "c128")


def _full() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "rows": torch.randn(7, 5, generator=gen),  # 4 + 3 rows
        "half": torch.randn(9, 3, generator=gen).to(torch.bfloat16),
        "ids": torch.randint(-(2**40), 2**40, (5,), generator=gen),
        "wide": torch.randn(6, 300, generator=gen).to(torch.complex64),  # rows over several chunks
        "c128": torch.randn(6, 40, generator=gen).to(torch.complex128),  # byte-grouped, not planes
        "cols": torch.randn(4, 6, generator=gen),  # Shard(1): column pieces
        "w": torch.randn(33, 8, generator=gen),  # replicated: row pieces spread over the ranks
        "s": torch.tensor(2.5),
    }


def _save(rank: int, world: int, root: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    full = _full()
    state = {name: distribute_tensor(full[name], mesh, [Shard(0)]) for name in ROW_SHARDED}
    state["cols"] = distribute_tensor(full["cols"], mesh, [Shard(1)])
    state["model"] = {"w": full["w"], "s": full["s"]}
    state["own"] = torch.full((3,), float(rank))
    with asyncckpt.CheckpointManager(root, replicated=("model",), chunk_size=4096) as mgr:
        mgr.save(1, state).wait()


@pytest.fixture(scope="module")
def step_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pieces") / "root"
    run_ranks(_save, 2, str(root), timeout=180)
    return root / fmt.step_dir_name(1)


@pytest.fixture(scope="module")
def view(step_dir):
    manifest = read_manifest(step_dir)
    assert isinstance(manifest, fmt.MultiRankManifest) and manifest.world_size == 2
    return manifest


def _global_index(view, full: dict[str, torch.Tensor]) -> dict[str, int]:
    """Each name's global tensor, found by its shape and dtype (all differ)."""
    out = {}
    for name, tensor in full.items():
        (index,) = [
            i
            for i, g in enumerate(view.globals)
            if g.shape == tuple(tensor.shape) and g.dtype == str(tensor.dtype).removeprefix("torch.")
        ]
        out[name] = index
    return out


@pytest.fixture
def copies(monkeypatch):
    """The boxes copied into after a separate decode, by global index."""
    copied: list[int] = []
    real = pieces._place

    def place(target, box, rows, cut):
        copied.append(box.index)
        real(target, box, rows, cut)

    monkeypatch.setattr(pieces, "_place", place)
    return copied


def test_consolidated_load_is_the_saved_state(step_dir):
    full = _full()
    state = asyncckpt.load(step_dir, per_rank="rank0")
    for name in (*ROW_SHARDED, "cols"):
        assert same_tensor(state[name], full[name]), name
    assert same_tensor(state["model"]["w"], full["w"]) and same_tensor(state["model"]["s"], full["s"])
    assert state["own"].tolist() == [0.0] * 3


def test_whole_rows_are_decoded_into_the_box_other_cuts_copied(step_dir, view, copies):
    full = _full()
    index = _global_index(view, full)
    names = sorted(index)
    tensors, _ = read_boxes(step_dir, view, [whole(view, index[n]) for n in names], 2)
    for name, tensor in zip(names, tensors, strict=True):
        assert same_tensor(tensor, full[name]), name
    assert set(copies) == {index["cols"]}  # the column pieces only: every other piece is whole rows


def test_boxes_of_some_rows_or_columns(step_dir, view, copies):
    """A reshard's boxes: rows across both ranks' pieces, rows inside one piece, columns of row
    pieces (copied), and rows of column pieces (copied)."""
    full = _full()
    index = _global_index(view, full)
    asked = [
        ("rows", (2, 0), (4, 5)),  # rows 2-5: rank 0's rows 2-3, rank 1's 4-5
        ("rows", (5, 0), (1, 5)),  # one row inside rank 1's piece
        ("wide", (1, 0), (4, 300)),
        ("w", (10, 0), (20, 8)),  # replicated row pieces
        ("w", (3, 2), (25, 4)),  # part of each row, across both ranks' pieces: copied
        ("cols", (1, 1), (2, 4)),  # across both column pieces
        ("ids", (0,), (5,)),
        ("ids", (3,), (0,)),  # empty
    ]
    boxes = [Box(index[name], offsets, shape) for name, offsets, shape in asked]
    tensors, _ = read_boxes(step_dir, view, boxes, 1)
    for (name, offsets, shape), tensor in zip(asked, tensors, strict=True):
        expected = full[name][tuple(slice(o, o + s) for o, s in zip(offsets, shape, strict=True))]
        assert same_tensor(tensor, expected.contiguous()), (name, offsets, shape)
    assert sorted(set(copies)) == sorted({index["w"], index["cols"]})
    assert copies.count(index["w"]) == 2  # the box of part rows only, once per rank's piece


def test_a_whole_load_reads_no_piece_on_its_own(step_dir, view):
    """Rank 0's table lists its pieces as tensors of its own; the consolidated tree names only the
    whole tensors, so the pieces are decoded once, as parts of those."""
    loaded = read_checkpoint(step_dir)
    pieces_of_rank0 = {piece.tensor for piece in view.tables[0].pieces}
    assert pieces_of_rank0 and all(loaded.tensors[i] is None for i in pieces_of_rank0)
    full = _full()
    for name, g in _global_index(view, full).items():
        assert same_tensor(loaded.tensors[view.local_count + g], full[name]), name


def test_a_whole_load_onto_another_device(step_dir):
    state = asyncckpt.load(step_dir, per_rank="rank0", map_location="meta")
    assert state["wide"].device.type == "meta" and tuple(state["wide"].shape) == (6, 300)
    assert state["model"]["w"].device.type == "meta"


def test_damage_in_rows_decoded_into_a_box_is_named_and_nothing_is_returned(step_dir, view, tmp_path):
    """A flipped byte in a chunk of rank 1's rows of ``wide``, decoded straight into the box."""
    copy = tmp_path / step_dir.name
    shutil.copytree(step_dir, copy)
    full = _full()
    g = _global_index(view, full)["wide"]
    ((_, piece),) = [(rank, p) for rank, p in view.pieces_of(g) if rank == 1]
    table = view.tables[1]
    entry = table.tensors[piece.tensor]
    chunk = next(c for c in table.chunks if c.raw_offset < entry.offset + entry.nbytes <= c.raw_offset + c.raw_length)
    data = copy / chunk.file
    raw = bytearray(data.read_bytes())
    raw[chunk.offset + chunk.length // 2] ^= 0x10
    data.write_bytes(bytes(raw))
    with pytest.raises(CheckpointDamagedError, match="rank 1's pieces of global tensors complex64"):
        read_boxes(copy, read_manifest(copy), [whole(view, g)], 2)
    with pytest.raises(CheckpointDamagedError, match="checksum mismatch"):
        asyncckpt.load(copy, per_rank="rank0")
