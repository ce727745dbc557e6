"""flatten_rank and assign_rows on plain states, in one process (no process group needed)."""

from __future__ import annotations

import math
import re

import pytest
import torch

from _trees import NoMemory
from asyncckpt.state.rng import RNGState
from asyncckpt.state.shards import RankInfo, assign_rows, flatten_rank
from asyncckpt.state.skeleton import Kind, walk


def _loads(sizes, world):
    plan = assign_rows(sizes, world)
    load = [0] * world
    for (rows, row), pieces in zip(sizes, plan, strict=True):
        at = 0
        for rank, first, end in pieces:
            assert first == at and end > first, (sizes, plan)  # contiguous, in row order, no empty piece
            assert 0 <= rank < world
            load[rank] += (end - first) * row
            at = end
        assert at == rows, "every row assigned exactly once"
    return load


@pytest.mark.parametrize("world", [2, 4, 8])
@pytest.mark.parametrize(
    "sizes",
    [
        [(33, 32), (1, 4), (0, 16), (17, 132), (1, 8)],
        [(1, 8)] * 3,  # 0-dim tensors only (one row each)
        [(1000, 4)],
        [(0, 4), (0, 0)],  # empty tensors only
        [(7, 1 << 20), (3, 4), (1, 4)],  # one big row dominates
        [(5, 12), (1, 4), (64, 256), (9, 36), (2, 8), (1, 4)],
    ],
)
def test_assign_rows_balance(sizes, world):
    load = _loads(sizes, world)
    total = sum(r * b for r, b in sizes)
    biggest_row = max((b for r, b in sizes if r), default=0)
    assert sum(load) == total
    assert max(load) <= total / world + biggest_row, (load, total / world, biggest_row)


def test_assign_rows_rank_order():
    # pieces along the concatenation never go back to a lower rank
    plan = assign_rows([(10, 4), (3, 4), (20, 4)], 4)
    ranks = [rank for pieces in plan for rank, _, _ in pieces]
    assert ranks == sorted(ranks) and set(ranks) == {0, 1, 2, 3}


def test_assign_rows_takes_any_pairs_and_returns_fresh_lists():
    plan = assign_rows([[4, 16], [2, 8]], 2)
    assert plan == [[(0, 0, 2), (1, 2, 4)], [(1, 0, 2)]]
    plan[0].clear()  # the caller's to change: the next answer is whole
    assert assign_rows([(4, 16), (2, 8)], 2) == [[(0, 0, 2), (1, 2, 4)], [(1, 0, 2)]]


def _state(rank):
    torch.manual_seed(0)
    weights = {"w": torch.randn(33, 4), "b": torch.randn(33), "step": torch.tensor(5.0), "empty": torch.zeros(0, 3)}
    torch.manual_seed(100 + rank)
    return {"model": weights, "mine": torch.randn(3), "rng": RNGState(), "epoch": 2}


def _leaves(skeleton):
    return {v.path: (v.kind, v.node[v.kind]) for v in walk(skeleton) if v.kind in (Kind.TENSOR, Kind.GLOBAL)}


@pytest.mark.parametrize("world", [2, 4])
def test_flatten_rank_replicated_key(world):
    flats = [flatten_rank(_state(r), RankInfo(r, world), replicated=("model",)) for r in range(world)]
    assert len({f.fingerprint for f in flats}) == 1
    globals_ = flats[0].globals
    assert [f.globals for f in flats] == [globals_] * world
    assert sorted(tuple(g.shape) for g in globals_) == sorted([(33, 4), (33,), (), (0, 3)])
    for f in flats:
        leaves = _leaves(f.skeleton)
        kinds = {path.split(".")[-1].strip("[]'\""): kind for path, (kind, _) in leaves.items()}
        model = {p: k for p, (k, _) in leaves.items() if "model" in p}
        assert model and all(k == Kind.GLOBAL for k in model.values()), leaves
        per_rank = {p: k for p, (k, _) in leaves.items() if "model" not in p}
        assert per_rank and all(k == Kind.TENSOR for k in per_rank.values()), leaves
        del kinds
    # the pieces tile every global tensor exactly, over all ranks, each rank writing its rows
    for index, g in enumerate(globals_):
        covered = 0
        for f in flats:
            for piece in f.pieces:
                if piece.index == index:
                    t = f.tensors[piece.tensor]
                    assert tuple(t.shape[1:]) == tuple(g.shape[1:])
                    whole = flats[0].live[index]
                    if t.dim():
                        assert torch.equal(t, whole[piece.offsets[0] : piece.offsets[0] + t.shape[0]])
                    else:
                        assert torch.equal(t, whole)
                    covered += math.prod(t.shape)
        assert covered == math.prod(g.shape), (index, g)
    # the replicated bytes are spread: no rank writes more than its share plus one row
    volumes = [sum(f.tensors[p.tensor].nbytes for p in f.pieces) for f in flats]
    total = sum(g.nbytes for g in globals_)
    assert sum(volumes) == total
    assert max(volumes) <= total / world + 4 * 4


def test_flatten_rank_without_replicated_is_per_rank():
    flat = flatten_rank(_state(1), RankInfo(1, 2))
    assert flat.globals == [] and flat.pieces == []
    assert all(kind == Kind.TENSOR for kind, _ in _leaves(flat.skeleton).values())


def test_flatten_rank_fingerprint_differs_on_other_model():
    a = flatten_rank(_state(0), RankInfo(0, 2), replicated=("model",))
    other = _state(1)
    other["model"]["w"] = torch.zeros(34, 4)
    b = flatten_rank(other, RankInfo(1, 2), replicated=("model",))
    assert a.fingerprint != b.fingerprint


def test_flatten_rank_tied_tensors_once():
    torch.manual_seed(0)
    w = torch.randn(16, 4)
    for world in (2, 4):
        flats = []
        for r in range(world):
            state = {"model": {"embed": w, "head": w, "view": w[2:5]}, "own": w}
            flats.append(flatten_rank(state, RankInfo(r, world), replicated=("model",)))
        f = flats[0]
        assert [tuple(g.shape) for g in f.globals] == [(16, 4), (3, 4)]
        leaves = _leaves(f.skeleton)
        g = {p: v for p, (k, v) in leaves.items() if k == Kind.GLOBAL}
        embed = next(v for p, v in g.items() if "embed" in p)
        head = next(v for p, v in g.items() if "head" in p)
        assert embed == head
        # the tie is stored once over all ranks
        stored = sum(flat.tensors[p.tensor].numel() for flat in flats for p in flat.pieces if p.index == embed)
        assert stored == 16 * 4
        # a per-rank reference to the same storage outside the replicated key stays a T leaf
        assert any(k == Kind.TENSOR and "own" in p for p, (k, _) in leaves.items())


def test_a_compiled_ddp_model_and_its_optimizer_are_replicated_as_under_ddp_alone():
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        torch.manual_seed(0)
        ddp = torch.nn.parallel.DistributedDataParallel(
            torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
        )
        opt = torch.optim.AdamW(ddp.parameters(), lr=0.1)
        ddp(torch.randn(4, 8)).sum().backward()
        opt.step()
        me = RankInfo(1, 2)
        plain = flatten_rank({"model": ddp, "opt": opt}, me)
        wrapped = flatten_rank({"model": torch.compile(ddp), "opt": opt}, me)
    finally:
        dist.destroy_process_group()
    assert plain.global_paths == wrapped.global_paths and len(plain.global_paths) == 16  # 4 params, 3 states each
    assert [(p.index, p.offsets) for p in plain.pieces] == [(p.index, p.offsets) for p in wrapped.pieces]
    assert plain.skeleton == wrapped.skeleton


def test_a_replicated_tensor_with_no_memory_of_its_own_is_rejected_naming_the_path():
    message = re.escape("state['model']['w']: the memory of this ") + ".*NoMemory cannot be read"
    with pytest.raises(TypeError, match=message):
        flatten_rank({"model": {"w": NoMemory((3,), 0)}}, RankInfo(0, 2), replicated=("model",))


def test_a_dtensor_whose_local_tensor_has_no_memory_is_rejected_naming_the_path():
    """FSDP2 over a wrapper subclass (a float8 or NF4 weight): its shard cannot be read."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        mesh = init_device_mesh("cpu", (1,))
        spec = DTensorSpec(mesh, (Shard(0),), TensorMeta(torch.Size((4,)), (1,), torch.float32))
        weight = DTensor(NoMemory((4,), 0), spec, requires_grad=False)
        message = re.escape("state['model']['w']: the memory of this ") + ".*NoMemory cannot be read"
        with pytest.raises(TypeError, match=message):
            flatten_rank({"model": {"w": weight}}, RankInfo(0, 1))
    finally:
        dist.destroy_process_group()
