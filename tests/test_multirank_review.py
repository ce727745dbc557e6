"""Review of the multi-rank code: edge cases of save, restore, consolidation and the per-rank check.

In-process where the code under test needs no process group (the format's checks and comparisons
on hand-built rank tables); one spawned 2-rank job for what needs real DTensors and a real group:
a tensor-parallel ``Shard(1)`` state (also bf16), ``strict=False`` restores, a DDP model restored
into a fresh optimizer, a state with no tensors at all, and ``replicated=`` naming a missing key.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

import asyncckpt
from _dist import run_ranks
from asyncckpt import format as fmt
from asyncckpt.errors import CheckpointDamagedError
from asyncckpt.format import GlobalEntry, MultiRankManifest, PieceEntry, RankTable, TensorEntry

# ------------------------------------------------------------------------------------- in-process


def _table(rank: int, tree: dict, tensors: list[TensorEntry] = (), pieces: list[PieceEntry] = ()) -> RankTable:
    return RankTable(
        step=1,
        created=0.0,
        tree=tree,
        tensors=list(tensors),
        chunks=[],
        raw_bytes=0,
        stored_bytes=0,
        rank=rank,
        world_size=2,
        pieces=list(pieces),
    )


def _view(tables: list[RankTable], globals_: list[GlobalEntry] = ()) -> MultiRankManifest:
    return MultiRankManifest(
        step=1,
        created=0.0,
        tree={"d": []},
        tensors=[],
        chunks=[],
        raw_bytes=0,
        stored_bytes=0,
        world_size=len(tables),
        globals=list(globals_),
        ranks=[],
        tables=tables,
    )


def test_per_rank_differences_global_on_one_rank_value_on_another():
    """A path that is a global tensor on rank 0 but a plain value on rank 1 differs between ranks."""
    g = [GlobalEntry("float32", (2,))]
    a = _table(0, {"d": [["x", {"G": 0}], ["y", {"v": None}]]})
    b = _table(1, {"d": [["x", {"v": None}], ["y", {"G": 0}]]})
    assert fmt.per_rank_differences(_view([a, b], g)) == ["state['x']", "state['y']"]


def test_per_rank_differences_value_on_one_rank_only():
    a = _table(0, {"d": [["x", {"v": 1}], ["e", {"d": []}]]})
    b = _table(1, {"d": [["x", {"v": 2}], ["e", {"d": []}]]})
    assert fmt.per_rank_differences(_view([a, b])) == ["state['x']"]
    c = _table(1, {"d": [["x", {"v": 1}], ["e", {"d": [["k", {"v": 0}]]}]]})
    assert fmt.per_rank_differences(_view([a, c])) == ["state['e']"]
    same = _table(1, {"d": [["x", {"v": 1}], ["e", {"d": []}]]})
    assert fmt.per_rank_differences(_view([a, same])) == []


def test_check_coverage_column_pieces_is_not_quadratic():
    """Many column pieces of one global (tensor parallel Shard(1) at a large world): the overlap
    check must not compare every pair (all of them start at row 0)."""
    n = 6000
    tensors = [TensorEntry("float32", (4, 1), 64 * i, 16) for i in range(n)]
    pieces = [PieceEntry(0, i, (0, i)) for i in range(n)]
    view = _view([_table(0, {"d": []}, tensors, pieces)], [GlobalEntry("float32", (4, n))])
    began = time.perf_counter()
    fmt.check_coverage(view)
    assert time.perf_counter() - began < 2.0
    # and overlapping column pieces are still found
    tensors2 = tensors[:-2] + [TensorEntry("float32", (4, 2), 64 * (n - 2), 32), TensorEntry("float32", (4, 0), 0, 0)]
    pieces2 = pieces[:-2] + [PieceEntry(0, n - 2, (0, n - 3)), PieceEntry(0, n - 1, (0, 0))]
    # volumes: n-2 single columns + one of 2 = n columns, but column n-3 twice and n-1 never
    bad = _view([_table(0, {"d": []}, tensors2, pieces2)], [GlobalEntry("float32", (4, n))])
    with pytest.raises(CheckpointDamagedError, match="overlap"):
        fmt.check_coverage(bad)


# ---------------------------------------------------------------------------------------- spawned


def _tp_state(rank: int, dtype: torch.dtype):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2,))
    torch.manual_seed(11)
    full = torch.randn(5, 8).to(dtype)
    col = torch.randn(3, 6, 4).to(dtype)
    return {
        "w": distribute_tensor(full, mesh, [Shard(1)]),
        "c": distribute_tensor(col, mesh, [Shard(2)]),
        "n": 3,
    }, {"w": full, "c": col}


def _job(rank: int, world: int, tmp: str) -> dict:
    from torch.distributed.tensor import Shard

    from _dist_models import full_state, make_ddp, state_diff, train_steps

    root = Path(tmp)
    out: dict = {}
    # tensor parallel Shard(1) / Shard(2), float32 and bf16: saved at 2, restored at 2 bit-exact
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).split(".")[-1]
        state, full = _tp_state(rank, dtype)
        with asyncckpt.CheckpointManager(root / f"tp-{name}", keep_last=None) as mgr:
            mgr.save(1, state)
            mgr.wait()
        out[name] = full
        fresh, _ = _tp_state(rank, dtype)
        for t in (fresh["w"], fresh["c"]):
            t.to_local().zero_()
        with asyncckpt.CheckpointManager(root / f"tp-{name}", keep_last=None) as mgr:
            assert mgr.restore(fresh) == 1
        assert fresh["w"].placements == (Shard(1),)
        assert torch.equal(fresh["w"].full_tensor(), full["w"]), name
        assert torch.equal(fresh["c"].full_tensor(), full["c"]), name
    # DDP: saved, restored into a fresh optimizer (no state yet); then strict=False on every rank
    model, optim = make_ddp(5)
    train_steps(model, optim, 0, 2, rank)
    saved = full_state(model, optim)
    with asyncckpt.CheckpointManager(root / "ddp", keep_last=None) as mgr:
        mgr.save(2, {"model": model, "optim": optim})
        mgr.wait()
    model2, optim2 = make_ddp(6)
    with asyncckpt.CheckpointManager(root / "ddp", keep_last=None) as mgr:
        assert mgr.restore({"model": model2, "optim": optim2}) == 2
    assert state_diff(saved, full_state(model2, optim2)) == []
    model3, optim3 = make_ddp(6)
    with asyncckpt.CheckpointManager(root / "ddp", keep_last=None) as mgr:
        result = mgr.restore({"model": model3, "optim": optim3, "extra": torch.zeros(3)}, strict=False)
    assert result.step == 2, result
    assert state_diff(saved, full_state(model3, optim3)) == []
    out["strict_false_missing"] = sorted(result.missing)
    # no tensors at all, on every rank
    with asyncckpt.CheckpointManager(root / "empty", keep_last=None) as mgr:
        mgr.save(1, {"epoch": 4, "name": "x"})
        mgr.wait()
        got = {"epoch": 0, "name": ""}
        assert mgr.restore(got) == 1
    assert got == {"epoch": 4, "name": "x"}
    return out


@pytest.fixture(scope="module")
def spawned(tmp_path_factory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("review")
    return root, run_ranks(_job, 2, str(root), timeout=300)


def test_spawned_job_ran(spawned):
    _, out = spawned
    assert out[0]["strict_false_missing"] == out[1]["strict_false_missing"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tensor_parallel_loads_whole_in_one_process(spawned, dtype):
    root, out = spawned
    loaded = asyncckpt.load(root / f"tp-{dtype}")
    assert torch.equal(loaded["w"], out[0][dtype]["w"])
    assert torch.equal(loaded["c"], out[0][dtype]["c"])
    assert loaded["n"] == 3


def test_empty_state_loads(spawned):
    root, _ = spawned
    assert asyncckpt.load(root / "empty") == {"epoch": 4, "name": "x"}
