"""Review of the multi-rank code: edge cases of save, restore, consolidation and the per-rank check.

In-process where the code under test needs no process group (the format's checks and comparisons
on hand-built rank tables); one spawned 2-rank job for what needs real DTensors and a real group:
a tensor-parallel ``Shard(1)`` state (also bf16), ``strict=False`` restores, a DDP model restored
into a fresh optimizer, a state with no tensors at all, and ``replicated=`` naming a missing key.
"""

from __future__ import annotations

import time
import warnings
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


def test_replicated_key_holding_a_tensor_itself():
    """``replicated=("r",)`` where ``state["r"]`` is a tensor (not a dict of them)."""
    from asyncckpt.state.shards import RankInfo, flatten_rank

    with pytest.warns(UserWarning, match=r"replicated= names \['missing'\], which the state does not hold"):
        flat = flatten_rank({"r": torch.arange(6.0), "own": torch.ones(2)}, RankInfo(0, 2), ("r", "missing"))
    assert flat.global_paths == ["state['r']"]
    assert flat.skeleton["d"][0] == ["r", {"G": 0}]


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
    out["strict_false_missing"] = sorted(result.missing_keys)
    # strict=False on a DTensor state missing a saved entry, only on rank 1
    state, full = _tp_state(rank, torch.float32)
    if rank == 1:
        del state["c"]
    state["w"].to_local().zero_()
    with asyncckpt.CheckpointManager(root / "tp-float32", keep_last=None) as mgr:
        result = mgr.restore(state, strict=False)
    assert result.step == 1
    assert torch.equal(state["w"].full_tensor(), full["w"])
    out["tp_unexpected"] = sorted(result.unexpected_keys)
    # replicated= naming a key the state lacks: saved as if it were not named
    with asyncckpt.CheckpointManager(root / "repl", keep_last=None, replicated=("nope", "r")) as mgr:
        mgr.save(1, {"r": torch.arange(6.0), "own": torch.full((2,), float(rank))})
        mgr.wait()
    # tied weights under FSDP2: stored once, restored tied and bit-exact
    out["tied"] = _tied(rank, root / "tied")
    # a DTensor's placement facts are cached per spec: a spec changed in place is looked at anew
    from torch.distributed.tensor import Replicate

    from asyncckpt.state.shards import RankInfo, flatten_rank

    state, _ = _tp_state(rank, torch.float32)
    me = RankInfo(rank, 2)
    for _ in range(2):
        out["offsets"] = [p.offsets for p in flatten_rank({"w": state["w"]}, me).pieces]
    state["w"]._spec.placements = (Replicate(),)  # now it claims all of (5, 8) on each rank
    try:
        flatten_rank({"w": state["w"]}, me)
        out["respec"] = ""
    except TypeError as exc:
        out["respec"] = str(exc)
    # a Partial DTensor holds no value of its own: refused, naming where it is
    from torch.distributed.tensor import DTensor, Partial

    partial = DTensor.from_local(torch.ones(2, 3), state["w"].device_mesh, [Partial()])
    try:
        flatten_rank({"opt": {"sum": partial}}, me)
        out["partial"] = ""
    except TypeError as exc:
        out["partial"] = str(exc)
    # no tensors at all, on every rank
    with asyncckpt.CheckpointManager(root / "empty", keep_last=None) as mgr:
        mgr.save(1, {"epoch": 4, "name": "x"})
        mgr.wait()
        got = {"epoch": 0, "name": ""}
        assert mgr.restore(got) == 1
    assert got == {"epoch": 4, "name": "x"}
    # a rollback from the job: every rank calls discard_after, rank 0 deletes, none is left above
    with asyncckpt.CheckpointManager(root / "rollback", keep_last=None, rank_timeout=60) as mgr:
        for step in (1, 2, 3):  # the tags are rank 0's: rank 1's own, never written, keep nothing
            mgr.save(step, {"epoch": step, "name": "y"}, tags=["mine"] if rank == 1 and step == 3 else ())
        # a step that is not one on rank 1: both fail at once, nothing deleted, and the calls still pair
        started = time.monotonic()
        try:
            mgr.discard_after(-1 if rank == 1 else 1)
            out["bad_discard"] = ""
        except (ValueError, asyncckpt.CheckpointError) as exc:
            out["bad_discard"] = f"{type(exc).__name__}: {exc}"
        out["bad_discard_s"] = time.monotonic() - started
        out["after_bad_discard"] = mgr.steps()
        out["discarded"] = mgr.discard_after(1)
        out["after_discard"] = mgr.steps()
        got = {"epoch": 0, "name": ""}
        assert mgr.restore(got) == 1
        with warnings.catch_warnings(record=True) as seen:  # no rank still thinks step 3 is there
            warnings.simplefilter("always")
            mgr.save(2, {"epoch": 2, "name": "z"}).wait()
        out["warned_after_discard"] = [str(w.message) for w in seen]
    return out


def _tied_model(seed: int):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8, bias=False), torch.nn.Linear(8, 8, bias=False))
    model[1].weight = model[0].weight
    fully_shard(model)
    return model, torch.optim.AdamW(model.parameters(), lr=0.1)


def _tied(rank: int, root: Path) -> torch.Tensor:
    model, optim = _tied_model(1)
    model(torch.randn(2, 8)).sum().backward()
    optim.step()
    full = model[0].weight.full_tensor().clone()
    with asyncckpt.CheckpointManager(root, keep_last=None) as mgr:
        mgr.save(1, {"model": model, "optim": optim})
        mgr.wait()
    model2, optim2 = _tied_model(2)
    with asyncckpt.CheckpointManager(root, keep_last=None) as mgr:
        assert mgr.restore({"model": model2, "optim": optim2}) == 1
    assert model2[1].weight is model2[0].weight
    assert torch.equal(model2[0].weight.full_tensor(), full)
    exp = optim.state[model[0].weight]["exp_avg"].full_tensor()
    assert torch.equal(optim2.state[model2[0].weight]["exp_avg"].full_tensor(), exp)
    return full


@pytest.fixture(scope="module")
def spawned(tmp_path_factory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("review")
    return root, run_ranks(_job, 2, str(root), timeout=300)


def test_spawned_job_ran(spawned):
    root, out = spawned
    assert out[0]["bad_discard"] == (
        "CheckpointError: discard_after(1): another rank refused it (its error says why); nothing deleted"
    )
    assert out[1]["bad_discard"].startswith("ValueError: step must be an integer in [0, "), out[1]["bad_discard"]
    assert out[0]["bad_discard_s"] < 30 and out[1]["bad_discard_s"] < 30  # not rank_timeout
    assert out[0]["after_bad_discard"] == out[1]["after_bad_discard"] == [1, 2, 3]
    assert out[0]["discarded"] == out[1]["discarded"] == [2, 3]
    assert out[0]["after_discard"] == out[1]["after_discard"] == [1]
    assert out[0]["warned_after_discard"] == out[1]["warned_after_discard"] == []
    assert sorted(p.name for p in (root / "rollback").glob("step-*")) == ["step-000000000001", "step-000000000002"]
    assert out[0]["strict_false_missing"] == out[1]["strict_false_missing"] == ["state['extra']"]
    assert out[0]["tp_unexpected"] == []
    assert out[1]["tp_unexpected"] == ["state['c']"]


def test_a_dtensor_spec_changed_in_place_is_not_taken_from_the_cache(spawned):
    _, out = spawned
    for rank in (0, 1):
        assert out[rank]["offsets"] == [(0, 4 * rank)]
        assert "the DTensor's local tensor is (5, 4), its placements say (5, 8)" in out[rank]["respec"]


def test_a_partial_dtensor_is_refused_naming_its_path(spawned):
    _, out = spawned
    for rank in (0, 1):
        message = out[rank]["partial"]
        assert message.startswith("state['opt']['sum']: a DTensor placed as P(sum) cannot be checkpointed"), message
        assert "only Shard and Replicate" in message


def test_replicated_naming_a_missing_key(spawned):
    root, _ = spawned
    loaded = asyncckpt.load(root / "repl", per_rank="rank0")
    assert torch.equal(loaded["r"], torch.arange(6.0))
    view = fmt_read(root / "repl")
    assert len(view.globals) == 1


def fmt_read(root: Path):
    from asyncckpt.engine.reader import read_manifest

    return read_manifest(root / fmt.step_dir_name(1))


def test_tied_weights_load_whole(spawned):
    root, out = spawned
    loaded = asyncckpt.load(root / "tied")
    weights = loaded["model"]
    assert torch.equal(weights["0.weight"], out[0]["tied"])


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


# ------------------------------------------------------------------------------ overlap (one process)


class _Flat(torch.nn.Module):
    """A weight and a buffer in one flat storage (a contiguous parameter buffer): the weight is the
    optimizer's, the buffer (64 KiB and more: a lazy candidate) is not."""

    def __init__(self) -> None:
        super().__init__()
        flat = torch.zeros(2 * 128 * 128)
        self.weight = torch.nn.Parameter(flat[: 128 * 128].view(128, 128))
        self.register_buffer("stats", flat[128 * 128 :].view(128, 128))


@pytest.mark.parametrize("via_data", [False, True])
def test_overlap_buffer_sharing_storage_with_a_parameter(tmp_path, slow_copy, monkeypatch, via_data):
    """A buffer sharing its storage (not its bytes) with an optimizer's parameter, changed in place
    right after save: the checkpoint holds the buffer as saved, or is refused; never the new values."""
    from _overlap_state import CommitGate, plain

    model = _Flat()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = {"model": model, "optim": opt}
    gate = CommitGate(monkeypatch)
    with asyncckpt.CheckpointManager(tmp_path, snapshot="overlap", keep_last=None) as mgr:
        expected = plain(state)
        gate.close()
        handle = mgr.save(1, state)
        with torch.no_grad():
            (model.stats.data if via_data else model.stats).add_(1.0)  # not an optimizer step
        gate.open()
        try:
            handle.wait()
        except asyncckpt.CheckpointError:
            return  # refused: fine
    assert torch.equal(asyncckpt.load(tmp_path)["model"]["stats"], expected["model"]["stats"])
