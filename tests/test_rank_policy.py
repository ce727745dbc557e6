"""Time-based policies and preemption across ranks: every rank saves the same steps.

Each rank "trains" in lockstep (one all_reduce per step, as a gradient all-reduce would) but takes a
different time per step, so each rank's own clock would pick different steps.
"""

from __future__ import annotations

import os
import signal
import time

import torch

import asyncckpt
from _dist import run_ranks
from asyncckpt.engine.rank_policy import Target
from asyncckpt.errors import CheckpointError


class Preempted(Exception):
    pass


def _on_term(signum, frame):  # the handler found at install: the re-raised signal lands here
    raise Preempted(signum)


def _train(rank, mgr, steps, *, kill_at=None, ask_due=False):
    import torch.distributed as dist

    state = {"w": torch.zeros(1000), "step": 0}
    saved, handles, said_due = [], [], []
    try:
        for step in range(1, steps + 1):
            time.sleep(0.01 * (1 + 2 * rank))  # rank 1 is three times slower than rank 0
            dist.all_reduce(torch.ones(1))  # lockstep
            state["w"] += 1
            state["step"] = step
            if kill_at is not None and step == kill_at:
                os.kill(os.getpid(), signal.SIGTERM)
            if ask_due and mgr.due(step):
                said_due.append(step)
            handle = mgr.maybe_save(step, state)
            if handle is not None:
                saved.append(step)
                handles.append(handle)
    except Preempted:
        return saved, said_due, "preempted", step
    for handle in handles:
        handle.wait()
    return saved, said_due, "done", step


def _policies(rank, world_size, root):
    out = {}
    for name, policy in (
        ("seconds", asyncckpt.EverySeconds(0.15)),
        ("adaptive", asyncckpt.Adaptive(max_overhead=0.5)),
    ):
        mgr = asyncckpt.CheckpointManager(f"{root}/{name}", policy=policy, keep_last=None)
        saved, said_due, how, _ = _train(rank, mgr, 40, ask_due=True)
        committed = mgr.steps()
        mgr.close()
        out[name] = (saved, said_due, how, committed)
    return out


def test_clock_policies_save_the_same_steps_on_every_rank(tmp_path):
    began = time.monotonic()
    by_rank = run_ranks(_policies, 2, str(tmp_path), timeout=200)
    for name in ("seconds", "adaptive"):
        (saved0, due0, how0, committed0), (saved1, due1, how1, committed1) = (r[name] for r in by_rank)
        assert how0 == how1 == "done"
        assert len(saved0) >= 2, (name, saved0)
        assert saved0 == saved1, (name, saved0, saved1)
        assert committed0 == committed1 == saved0, (name, committed0, committed1)
        assert set(due0) <= set(saved0) and set(due1) <= set(saved1), (name, due0, due1)
    assert time.monotonic() - began < 200


def _preempt(rank, world_size, root):
    signal.signal(signal.SIGTERM, _on_term)
    mgr = asyncckpt.CheckpointManager(f"{root}/term", policy=asyncckpt.EverySteps(10_000), keep_last=None)
    mgr.install_signal_handlers((signal.SIGTERM,))
    saved, _, how, last = _train(rank, mgr, 40, kill_at=5 if rank == 1 else None)
    committed = mgr.steps()
    handler_back = signal.getsignal(signal.SIGTERM) is _on_term
    mgr.close()
    return saved, how, last, committed, handler_back


def test_sigterm_on_one_rank_makes_every_rank_save_the_same_final_step(tmp_path):
    term0, term1 = run_ranks(_preempt, 2, str(tmp_path), timeout=200)
    # SIGTERM reached rank 1 at step 5: both ranks save step 5 + lead, commit it, then the signal acts
    assert term0[:3] == term1[:3] == ([], "preempted", 7), (term0, term1)  # maybe_save raised: no handle
    assert term0[3] == term1[3] == [7]
    assert term0[4] and term1[4]  # the handlers found at install were put back before the signal


def _late(rank, world_size, root):
    import torch.distributed as dist

    # An announcement for a step rank 1 has passed: rank 1 raises, naming both steps.
    mgr = asyncckpt.CheckpointManager(f"{root}/late", policy=asyncckpt.EverySeconds(3600), policy_lead=2)
    state = {"w": torch.zeros(10)}
    for step in range(1, 6):
        mgr.maybe_save(step, state)
    dist.barrier()
    if rank == 0:
        mgr._schedule._announce(Target(3, 0))  # as if rank 0's announcement were very late
    dist.barrier()
    error = None
    if rank == 1:
        deadline = time.monotonic() + 30
        while error is None and time.monotonic() < deadline:
            time.sleep(0.05)
            try:
                mgr.maybe_save(6, state)
            except CheckpointError as exc:
                error = str(exc)
    dist.barrier()
    mgr.close()
    return error


def test_an_announcement_for_a_passed_step_raises(tmp_path):
    late0, late1 = run_ranks(_late, 2, str(tmp_path), timeout=200)
    assert late0 is None
    assert late1 is not None and "step 3" in late1 and "step 5" in late1, late1
