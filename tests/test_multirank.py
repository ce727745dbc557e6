"""Multi-rank save and restore on spawned gloo ranks (CPU): FSDP2, DDP and HSDP, bit-exact, at the
same and at other world sizes, per-rank state, many saves in flight, and how much a reshard decodes.

Three spawned jobs, in order (each later one reads what the earlier ones wrote), share one root
directory per scenario:

* job A, 2 ranks: FSDP2 (saved while training goes on), DDP, per-rank RNG/sampler, 20 saves with
  ``max_pending`` 1 and 2, a big FSDP2 model for the decode measurement; restores at 2 ranks.
* job B, 4 ranks: restores A's FSDP2 and DDP checkpoints into FSDP2 at 4 (reshard), writes a 4-rank
  FSDP2 checkpoint, an optimizer without its model (numbered by position), an HSDP (2 x 2) one,
  restored bit-exact; per-rank state at another world size.
* job C, 2 ranks: restores B's 4-rank checkpoint at 2 (FSDP2, FSDP2 with the optimizer's
  parameters listed backwards, and DDP) and its optimizer numbered by position, per-rank "same".

The parent checks what needs one process: consolidated ``load`` against the saved full state, the
stored volume of the HSDP checkpoint, and the bytes a 2 -> 4 reshard decodes.
"""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path

import pytest
import torch

import asyncckpt
from _dist import run_ranks
from _dist_models import LR, full_state, make_ddp, make_fsdp2, make_hsdp, state_diff, train_steps
from asyncckpt import format as fmt
from asyncckpt.engine.pieces import Box, read_boxes
from asyncckpt.engine.reader import read_manifest
from asyncckpt.errors import CheckpointError

SEED = 7
BIG = (256, 4098, 256)  # two 4 MiB weights; at 2 ranks pieces of 2049 rows: 4 ranks' shards are not halves


def _mgr(root: Path, **kw) -> asyncckpt.CheckpointManager:
    return asyncckpt.CheckpointManager(root, keep_last=None, **kw)


def _save_fsdp_while_training(rank: int, root: Path, make) -> dict:
    model, optim = make(SEED)
    train_steps(model, optim, 0, 3, rank)
    saved = full_state(model, optim)
    with _mgr(root) as mgr:
        mgr.save(3, {"model": model, "optim": optim})
        train_steps(model, optim, 3, 2, rank)  # training goes on while the save persists
        mgr.wait()
    return saved


def _restore(root: Path, make, step: int | None = None) -> dict:
    model, optim = make(SEED + 1)  # other weights, and AdamW state not created yet
    with _mgr(root) as mgr:
        got = mgr.restore({"model": model, "optim": optim}, step)
    assert got == (step if step is not None else got)
    return full_state(model, optim)


def _per_rank_state(rank: int):
    sampler = asyncckpt.ResumableSampler(50, seed=3)
    return {"rng": asyncckpt.RNGState(), "sampler": sampler, "w": torch.ones(4)}, sampler


def _draw(sampler, n: int = 5) -> tuple[list[int], torch.Tensor]:
    it = iter(sampler)
    return [next(it) for _ in range(n)], torch.rand(3)


def _job_a(rank: int, world: int, tmp: str) -> dict:
    tmp_path = Path(tmp)
    out: dict = {}
    # FSDP2 saved while training continues, restored fresh at 2: model and optimizer bit-exact
    out["fsdp2"] = _save_fsdp_while_training(rank, tmp_path / "fsdp2", make_fsdp2)
    assert state_diff(out["fsdp2"], _restore(tmp_path / "fsdp2", make_fsdp2)) == []
    # DDP at 2, and DDP restored from the FSDP2 checkpoint
    out["ddp"] = _save_fsdp_while_training(rank, tmp_path / "ddp", make_ddp)
    assert state_diff(out["fsdp2"], _restore(tmp_path / "fsdp2", make_ddp)) == []
    assert state_diff(out["ddp"], _restore(tmp_path / "ddp", make_fsdp2)) == []

    # per-rank RNG and sampler: each rank resumes exactly its own
    torch.manual_seed(1000 + rank)
    state, sampler = _per_rank_state(rank)
    _draw(sampler, 7 + rank)
    with _mgr(tmp_path / "rng2") as mgr:
        mgr.save(1, state)
        mgr.wait()
    expected = _draw(sampler)
    torch.manual_seed(0)
    state, sampler = _per_rank_state(rank)
    with _mgr(tmp_path / "rng2") as mgr:
        assert mgr.restore(state) == 1
    got = _draw(sampler)
    assert got[0] == expected[0] and torch.equal(got[1], expected[1]), (got, expected)
    out["rng_draw"] = expected

    # 20 saves while FSDP2 trains, max_pending 1 and 2: all commit, the newest restores
    for pending in (1, 2):
        model, optim = make_fsdp2(SEED)
        root = tmp_path / f"many{pending}"
        with _mgr(root, max_pending=pending, policy=asyncckpt.EverySteps(1), compression=None) as mgr:
            for step in range(1, 21):
                train_steps(model, optim, step, 1, rank)
                if step == 7:
                    at_7 = full_state(model, optim)
                mgr.maybe_save(step, {"model": model, "optim": optim})
            mgr.wait()
            assert mgr.steps() == list(range(1, 21)), mgr.steps()
        last = full_state(model, optim)
        assert state_diff(last, _restore(root, make_fsdp2, None)) == []
        # a step named: that one on every rank; a step not there: an error on every rank
        assert state_diff(at_7, _restore(root, make_fsdp2, 7)) == []
        with pytest.raises(asyncckpt.CheckpointNotFoundError, match="no checkpoint for step 99"):
            _restore(root, make_fsdp2, 99)

    # a big FSDP2 model for the parent's decode measurement (no optimizer state)
    model, _ = make_fsdp2(SEED, dims=BIG)
    with _mgr(tmp_path / "big") as mgr:  # the default chunk size and compression
        mgr.save(1, {"model": model})
        mgr.wait()
    return out


def _job_b(rank: int, world: int, tmp: str, saved: dict) -> dict:
    tmp_path = Path(tmp)
    out: dict = {}
    # reshard 2 -> 4: FSDP2 and DDP checkpoints into FSDP2 at 4 (uneven 33 rows, empty shards)
    assert state_diff(saved["fsdp2"], _restore(tmp_path / "fsdp2", make_fsdp2)) == []
    assert state_diff(saved["ddp"], _restore(tmp_path / "ddp", make_fsdp2)) == []
    # a 4-rank FSDP2 checkpoint, for job C and the parent
    out["fsdp4"] = _save_fsdp_while_training(rank, tmp_path / "fsdp4", make_fsdp2)
    assert state_diff(out["fsdp4"], _restore(tmp_path / "fsdp4", make_fsdp2)) == []
    # an optimizer saved without its model: its state numbered by position (as in checkpoints
    # written before names were), for job C to restore resharded
    model, optim = make_fsdp2(SEED)
    train_steps(model, optim, 0, 2, rank)
    out["optim_only"] = {k: v for k, v in full_state(model, optim).items() if k.startswith("exp_avg")}
    with _mgr(tmp_path / "optim-only") as mgr:
        mgr.save(1, {"optim": optim})
        mgr.wait()
    # HSDP (replicate 2 x shard 2): saved once per replica group, restored bit-exact
    out["hsdp"] = _save_fsdp_while_training(rank, tmp_path / "hsdp", make_hsdp)
    assert state_diff(out["hsdp"], _restore(tmp_path / "hsdp", make_hsdp)) == []

    # per-rank state saved at 2, read at 4: refused naming the path unless per_rank says whose
    state, _ = _per_rank_state(rank)
    with _mgr(tmp_path / "rng2") as mgr:
        with pytest.raises(CheckpointError) as info:
            mgr.restore(state)
    if rank == 0:
        out["rng_error"] = str(info.value)
    with _mgr(tmp_path / "rng2", per_rank="same") as mgr:
        with pytest.raises(CheckpointError):  # ranks 2 and 3 have no rank of their own there
            mgr.restore(state)
    state, sampler = _per_rank_state(rank)
    with _mgr(tmp_path / "rng2", per_rank="rank0") as mgr:
        assert mgr.restore(state) == 1
    out["rank0_draw"] = _draw(sampler)
    # a 4-rank per-rank checkpoint, for job C
    torch.manual_seed(2000 + rank)
    state, sampler = _per_rank_state(rank)
    _draw(sampler, rank)
    with _mgr(tmp_path / "rng4") as mgr:
        mgr.save(1, state)
        mgr.wait()
    out["rng4_draw"] = _draw(sampler)
    # a big HSDP model (rows split in 2 on a world of 4) for the parent's decode measurement
    model, _ = make_hsdp(SEED, dims=BIG)
    with _mgr(tmp_path / "big-hsdp") as mgr:
        mgr.save(1, {"model": model})
        mgr.wait()
    return out


def _make_fsdp2_backwards(seed: int):
    """FSDP2 with an AdamW that lists the parameters backwards: by position, each parameter's
    state would land on another one."""
    model, _ = make_fsdp2(seed)
    return model, torch.optim.AdamW(list(model.parameters())[::-1], lr=LR, weight_decay=0.01)


def _job_c(rank: int, world: int, tmp: str, saved: dict) -> dict:
    tmp_path = Path(tmp)
    assert state_diff(saved["fsdp4"], _restore(tmp_path / "fsdp4", make_fsdp2)) == []
    assert state_diff(saved["fsdp4"], _restore(tmp_path / "fsdp4", _make_fsdp2_backwards)) == []
    model, optim = make_fsdp2(SEED + 1)  # no optimizer state yet: each entry follows its parameter's shard
    with _mgr(tmp_path / "optim-only") as mgr:
        assert mgr.restore({"optim": optim}) == 1
    got = full_state(model, optim)
    assert state_diff(saved["optim_only"], {k: v for k, v in got.items() if k.startswith("exp_avg")}) == []
    assert state_diff(saved["fsdp4"], _restore(tmp_path / "fsdp4", make_ddp)) == []
    state, sampler = _per_rank_state(rank)
    with _mgr(tmp_path / "rng4") as mgr:
        with pytest.raises(CheckpointError) as info:
            mgr.restore(state)
    assert "rng4" in str(info.value) and "per_rank" in str(info.value)
    state, sampler = _per_rank_state(rank)
    with _mgr(tmp_path / "rng4", per_rank="same") as mgr:
        assert mgr.restore(state) == 1
    return {"same_draw": _draw(sampler)}


def _managers_in_turn(rank: int, world: int, tmp: str) -> list[int]:
    state = {"model": {"w": torch.arange(12.0).view(6, 2)}, "own": torch.full((2,), float(rank))}
    steps = []
    for step in (1, 2, 3):  # each manager closed before the next is made, in one process
        if rank == 0:
            time.sleep(1.0)  # rank 1 makes its group first
        with _mgr(Path(tmp), replicated=("model",)) as mgr:
            if step > 1:
                steps.append(mgr.restore(state))
            mgr.save(step, state)
            mgr.wait()
    return steps


def test_managers_one_after_another(tmp_path):
    # a closed manager's group, destroyed, gave the next group its name: the next one hung
    assert run_ranks(_managers_in_turn, 2, str(tmp_path), timeout=90) == [[1, 2], [1, 2]]


def _tags_and_retention(rank: int, world: int, tmp: str) -> dict:
    """Every rank tags and untags as it saves; rank 0 applies retention, slowly here (a slow
    store's deletes), before any rank's save resolves: each lists the root right after its
    ``wait``. Rank 0 records each save's slowest rank."""
    import torch.distributed as dist

    losses = {1: 3.0, 2: 1.0, 3: 2.0, 4: 2.5, 5: 2.8}
    out: dict = {}
    state = {"w": torch.full((64,), float(rank))}
    with asyncckpt.CheckpointManager(tmp, keep_last=1, keep_best=1, best_metric="loss") as mgr:
        if rank == 0:
            apply = mgr._retainer.apply
            mgr._retainer.apply = lambda protect: (time.sleep(0.5), apply(protect))  # type: ignore[method-assign]
        for step in (1, 2, 3, 4):
            mgr.save(step, state, metrics={"loss": losses[step]}).wait()
            if step == 1:
                out["tagged"] = mgr.tag(1, "golden")
        out["kept"] = mgr.steps()
        dist.barrier()  # every rank's untag before the next save
        out["untagged"] = mgr.untag(1)
        mgr.save(5, state, metrics={"loss": losses[5]}).wait()
        out["after_untag"] = mgr.steps()
        out["records"] = [(r.step, r.stall_s, r.max_rank_stall_s) for r in mgr.stats.records]
        out["summary"] = mgr.stats.summary()
    # rank 0's retention slower than rank_timeout: the step is committed, so every rank's save
    # still succeeds; the others warn that their listing may be ahead of rank 0's deletes
    with asyncckpt.CheckpointManager(Path(tmp) / "slow", keep_last=1, rank_timeout=4) as mgr:
        if rank == 0:
            apply = mgr._retainer.apply
            mgr._retainer.apply = lambda protect: (time.sleep(6), apply(protect))  # type: ignore[method-assign]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mgr.save(1, state).wait()
        out["slow_warnings"] = [str(w.message) for w in caught if "retention was done" in str(w.message)]
        out["slow_steps"] = mgr.steps()
    return out


def test_tags_retention_and_the_slowest_rank_s_stall_on_many_ranks(tmp_path):
    got = run_ranks(_tags_and_retention, 2, str(tmp_path), timeout=120)
    for rank in got:
        assert rank["tagged"] == ["golden"] and rank["untagged"] == []
        # kept: the tagged step 1, the best (step 2, loss 1.0) and the newest; then step 1 goes
        assert rank["kept"] == [1, 2, 4] and rank["after_untag"] == [2, 5]
    assert read_manifest(tmp_path / fmt.step_dir_name(2)).tags == []
    # rank 0 records, for each save, the stall of its slowest rank; the others only their own
    stalls = {r: {step: stall for step, stall, _ in got[r]["records"]} for r in range(2)}
    for step, _, slowest in got[0]["records"]:
        assert slowest == max(stalls[0][step], stalls[1][step]), (step, slowest, stalls)
    assert all(slowest is None for _, _, slowest in got[1]["records"])
    assert got[0]["summary"]["rank_stall_max_s"] == max(max(s.values()) for s in stalls.values())
    assert "rank_stall_max_s" not in got[1]["summary"]
    assert got[0]["slow_warnings"] == [] and got[0]["slow_steps"] == [1]
    assert got[1]["slow_steps"] == [1] and len(got[1]["slow_warnings"]) == 1, got[1]["slow_warnings"]
    assert (
        "step 1 is committed, but rank 0 did not say its retention was done (not within 4 s)"
        in got[1]["slow_warnings"][0]
    )


def _consolidated(loaded: dict, make) -> dict:
    """A consolidated ``load`` of {"model", "optim"} in ``full_state``'s keys."""
    out: dict = {}
    names = list(loaded["model"].keys())
    params = [n for n in names if n != "out_scale"]
    for n, value in loaded["model"].items():
        out[("buffer." if n == "out_scale" else "param.") + n] = value
    for name, entry in loaded["optim"]["state"].items():
        assert name in params, name  # keyed by the parameter's name
        for key, value in entry.items():
            out[f"{key}.{name}"] = value
    return out


def _stored_volume(view: fmt.MultiRankManifest) -> tuple[int, int]:
    assert view.tables is not None
    stored = sum(math.prod(t.tensors[p.tensor].shape) for t in view.tables for p in t.pieces)
    return stored, sum(math.prod(g.shape) for g in view.globals)


def test_multirank_end_to_end(tmp_path):
    tmp = str(tmp_path)
    a = run_ranks(_job_a, 2, tmp, timeout=300)
    assert a[0]["fsdp2"].keys() == a[1]["fsdp2"].keys()
    assert a[0]["rng_draw"] != a[1]["rng_draw"]  # the ranks' own states really differ

    # 2 -> 1 process: consolidated load == the full state
    loaded = asyncckpt.load(tmp_path / "fsdp2")
    assert state_diff(a[0]["fsdp2"], _consolidated(loaded, make_fsdp2)) == []
    loaded = asyncckpt.load(tmp_path / "ddp")
    assert state_diff(a[0]["ddp"], _consolidated(loaded, make_ddp)) == []
    for name in ("fsdp2", "ddp"):
        stored, volume = _stored_volume(read_manifest(tmp_path / name / fmt.step_dir_name(3)))
        assert stored == volume, name

    _check_reshard_decode(tmp_path / "big" / fmt.step_dir_name(1), 2)

    b = run_ranks(_job_b, 4, tmp, a[0], timeout=400)
    assert "rng2" in b[0]["rng_error"] and "per_rank" in b[0]["rng_error"], b[0]["rng_error"]
    assert all(r["rank0_draw"][0] == b[0]["rank0_draw"][0] for r in b)  # every rank took rank 0's
    numbered = asyncckpt.load(tmp_path / "optim-only")["optim"]["state"]
    assert numbered and all(type(key) is int for key in numbered)  # no module in the state: no names
    hsdp = read_manifest(tmp_path / "hsdp" / fmt.step_dir_name(3))
    assert hsdp.world_size == 4
    stored, volume = _stored_volume(hsdp)
    assert stored == volume  # the replicated shards are stored once
    assert state_diff(b[0]["hsdp"], _consolidated(asyncckpt.load(tmp_path / "hsdp"), make_hsdp)) == []
    # HSDP splits the rows in 2, not in the world's 4: cut for 4 FSDP2 ranks all the same
    _check_reshard_decode(tmp_path / "big-hsdp" / fmt.step_dir_name(1), 4)

    c = run_ranks(_job_c, 2, tmp, b[0], timeout=300)
    for rank in range(2):
        got, expected = c[rank]["same_draw"], b[rank]["rng4_draw"]
        assert got[0] == expected[0] and torch.equal(got[1], expected[1])


def _check_reshard_decode(step_dir: Path, world: int) -> None:
    """-> 4 FSDP2 ranks: each new rank decodes at most 1.1x the bytes of its shards, at the
    default chunk size (its pieces of 2 MiB fit a 4 MiB chunk whole: uncut, each new rank
    would decode the whole piece, 2x; cut in halves of the pieces, 4098 rows would miss the new
    shards' starts)."""
    view = read_manifest(step_dir)
    assert isinstance(view, fmt.MultiRankManifest) and view.world_size == world
    assert sum(g.nbytes for g in view.globals) > 6 << 20
    for r in range(4):
        boxes = []
        for index, g in enumerate(view.globals):
            rows = g.shape[0] if g.shape else 1
            per = -(-rows // 4)
            first, end = min(rows, r * per), min(rows, (r + 1) * per)
            if g.shape and end > first:
                boxes.append(Box(index, (first,) + (0,) * (len(g.shape) - 1), (end - first, *g.shape[1:])))
        tensors, decoded = read_boxes(step_dir, view, boxes, 1)
        needed = sum(t.nbytes for t in tensors)
        assert needed <= decoded <= 1.1 * needed, (r, needed, decoded)
        for box, tensor in zip(boxes, tensors, strict=True):  # and each large tensor on its own
            if view.globals[box.index].nbytes >= 1 << 20:
                (_,), alone = read_boxes(step_dir, view, [box], 1)
                assert tensor.nbytes <= alone <= 1.1 * tensor.nbytes, (r, box, tensor.nbytes, alone)


def _subgroup_job(rank: int, world: int, tmp: str) -> dict:
    """Ranks 1 and 2 of a world of 3 save together through ``process_group``; rank 0 trains alone."""
    import torch.distributed as dist

    sub = dist.new_group([1, 2])  # every rank of the world makes the group, as torch requires
    if rank == 0:
        dist.barrier()  # rank 0 hosts the job's store: it stays until the others are done
        return {"world": _world_after_a_subgroup(rank, tmp)}
    torch.manual_seed(0)  # the same weights on both ranks: declared replicated, stored once
    weights = torch.nn.Linear(5, 3)
    state = {"model": weights, "mine": torch.tensor([float(rank)])}
    with asyncckpt.CheckpointManager(tmp, process_group=sub, replicated=("model",)) as mgr:
        mgr.save(1, state).wait()
        saved = {k: v.clone() for k, v in weights.state_dict().items()}
        with torch.no_grad():
            weights.weight.zero_()
        state["mine"] = torch.zeros(1)
        assert mgr.restore(state) == 1
    dist.barrier()
    out = {"saved": saved, "restored": weights.state_dict(), "mine": state["mine"]}
    return out | {"world": _world_after_a_subgroup(rank, tmp)}


def _world_after_a_subgroup(rank: int, tmp: str) -> list[int]:
    """A manager of the whole world, on ranks that belong to different groups (rank 0 is not in
    the subgroup): torch's own naming of a group made by its members differs between such ranks."""
    with asyncckpt.CheckpointManager(Path(tmp) / "world", rank_timeout=20.0) as mgr:
        mgr.save(7, {"mine": torch.tensor([float(rank)])}).wait()
        return mgr.steps()


def test_a_subgroup_saves_and_restores_on_its_own_ranks_and_then_the_whole_world(tmp_path):
    got = run_ranks(_subgroup_job, 3, str(tmp_path), timeout=180)
    # the group's ranks 0 and 1 are the world's 1 and 2: per-rank state by group rank
    assert [float(got[r]["mine"]) for r in (1, 2)] == [1.0, 2.0]
    assert [got[r]["world"] for r in (0, 1, 2)] == [[7], [7], [7]]
    for r in (1, 2):
        assert state_diff(got[r]["saved"], got[r]["restored"]) == []
    view = read_manifest(tmp_path / "step-000000000001")
    assert view.world_size == 2
    loaded = asyncckpt.load(tmp_path, per_rank="rank0")
    assert torch.equal(loaded["model"]["weight"], got[1]["saved"]["weight"])


def _save_once(root: Path, step: int, rank: int, **options) -> list[int]:
    with asyncckpt.CheckpointManager(root, **options) as mgr:
        mgr.save(step, {"mine": torch.tensor([float(rank)])}).wait()
        return mgr.steps()


def _remade_groups_job(rank: int, world: int, tmp: str) -> dict:
    """Checkpoint groups meet whenever the ranks make them in step: for timeouts that print alike,
    and after one rank started torch.distributed anew (its own groups counted again from 0)."""
    import os
    from datetime import timedelta

    import torch.distributed as dist

    root = Path(tmp)
    out: dict = {}
    out["close"] = [_save_once(root / "a", 1, rank, rank_timeout=20.0)]
    out["close"].append(_save_once(root / "b", 1, rank, rank_timeout=20.0000001))
    dist.destroy_process_group()
    if rank == 0:  # a job of its own first, in this process
        dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
        out["solo"] = _save_once(root / "solo", 1, rank, rank_timeout=5.0)
        dist.destroy_process_group()
    store = dist.FileStore(os.path.join(tmp, "store"), world)
    dist.init_process_group("gloo", rank=rank, world_size=world, store=store, timeout=timedelta(seconds=60))
    out["pair"] = _save_once(root / "pair", 1, rank, rank_timeout=5.0)
    dist.barrier()
    return out


def test_checkpoint_groups_meet_for_close_timeouts_and_after_a_rank_restarted_torch_distributed(tmp_path):
    got = run_ranks(_remade_groups_job, 2, str(tmp_path), timeout=120)
    for rank in got:
        assert rank["close"] == [[1], [1]] and rank["pair"] == [1]
    assert got[0]["solo"] == [1]


def _dead_store_job(rank: int, world: int, tmp: str) -> str:
    """A store that stops answering (its host, rank 0, died) while a rank makes a checkpoint group."""
    import torch.distributed as dist

    from asyncckpt.engine.ranks import RankGroup

    class Killable(dist.Store):
        def __init__(self) -> None:
            super().__init__()
            self.inner, self.dead = dist.HashStore(), False

        def _check(self) -> None:
            if self.dead:
                raise dist.DistNetworkError("the store's server is gone")

        def set(self, key, value):
            self._check()
            self.inner.set(key, value)

        def get(self, key):
            self._check()
            return self.inner.get(key)

        def add(self, key, amount):
            self._check()
            return self.inner.add(key, amount)

        def compare_set(self, key, expected, desired):
            self._check()
            return self.inner.compare_set(key, expected, desired)

        def check(self, keys):
            self._check()
            return self.inner.check(keys)

        def wait(self, keys, timeout=None):
            self._check()
            return self.inner.wait(keys) if timeout is None else self.inner.wait(keys, timeout)

        def delete_key(self, key):
            self._check()
            return self.inner.delete_key(key)

        def set_timeout(self, timeout):
            pass

    dist.destroy_process_group()
    store = Killable()
    dist.init_process_group("gloo", rank=0, world_size=1, store=store)
    RankGroup(None, 3.0)
    store.dead = True
    try:
        RankGroup(None, 4.0)  # a group not made yet: its name is counted in the store
    except CheckpointError as exc:
        return f"CheckpointError: {exc}"
    except Exception as exc:  # noqa: BLE001 - what the test is about
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def test_a_store_gone_while_making_a_checkpoint_group_is_a_checkpoint_error(tmp_path):
    (got,) = run_ranks(_dead_store_job, 1, str(tmp_path), timeout=60)
    assert got.startswith("CheckpointError: rank 0 could not make the checkpoint group"), got
    assert "the store's server is gone" in got
