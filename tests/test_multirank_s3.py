"""Multi-rank checkpoints on an object-store root: every rank writes its own objects, rank 0 holds
the lease and publishes the manifest last, and a resharding restore reads ranged pieces."""

from __future__ import annotations

import torch

import _dist_models as dm
import asyncckpt
from _dist import run_ranks
from asyncckpt.loading import open_target
from asyncckpt.storage.commit import published_checkpoints


def _save_fsdp2(rank: int, world: int, url: str) -> dict:
    model, optim = dm.make_fsdp2(seed=7)
    dm.train_steps(model, optim, 0, 2, rank)
    with asyncckpt.CheckpointManager(url, keep_last=1) as mgr:
        mgr.save(2, {"model": model, "optim": optim, "rng": asyncckpt.RNGState()}).wait()
        dm.train_steps(model, optim, 2, 1, rank)
        mgr.save(3, {"model": model, "optim": optim, "rng": asyncckpt.RNGState()}).wait()
    torch.distributed.barrier()  # rank 0 closed its manager: its retention is done
    steps = [c.step for c in published_checkpoints(open_target(url)[0])]
    return {"steps": steps, "full": dm.full_state(model, optim)}


def _restore_fsdp2(rank: int, world: int, url: str) -> dict:
    model, optim = dm.make_fsdp2(seed=99)
    with asyncckpt.CheckpointManager(url, per_rank="rank0") as mgr:
        step = mgr.restore({"model": model, "optim": optim, "rng": asyncckpt.RNGState()})
    return {"step": step, "full": dm.full_state(model, optim)}


def test_fsdp2_on_s3_saves_from_every_rank_and_restores_at_another_world_size(s3_env, s3_url):
    saved = run_ranks(_save_fsdp2, 2, s3_url, timeout=240, env=dict(s3_env))
    assert [r["steps"] for r in saved] == [[3], [3]]  # retention ran once, on rank 0
    restored = run_ranks(_restore_fsdp2, 4, s3_url, timeout=240, env=dict(s3_env))
    assert {r["step"] for r in restored} == {3}
    for r in restored:
        assert dm.state_diff(saved[0]["full"], r["full"]) == []
    # one process, no group: the consolidated tensors
    loaded = asyncckpt.load(s3_url, per_rank="rank0")
    weight = loaded["model"]["layers.0.weight"]
    assert torch.equal(weight, saved[0]["full"]["param.layers.0.weight"])
