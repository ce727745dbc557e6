"""Time-based policies and preemption across ranks: every rank saves the same steps.

Each rank "trains" in lockstep (one all_reduce per step, as a gradient all-reduce would) but takes a
different time per step, so each rank's own clock would pick different steps.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import warnings

import torch

import asyncckpt
from _dist import run_ranks, slowed, start_ranks
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
    async_run, twice, missed = _preempt_async(rank, f"{root}/async"), _twice(rank, root), _missed_final(rank, root)
    return saved, how, last, committed, handler_back, async_run, twice, missed, _missed_final_async(rank, root)


def _missed_final_async(rank, root):
    """As ``_missed_final`` with the async manager, rank 1 stopping before the final step it
    announced (its signal then acts when it closes): rank 0's turn in that step's agreement is one
    rank 1 never makes, and rank 0 must not wait for rank 1 to count it."""
    import asyncio
    import warnings

    import torch.distributed as dist

    heard = []
    signal.signal(signal.SIGUSR1, lambda signum, frame: heard.append(signum))

    async def run():
        mgr = asyncckpt.AsyncCheckpointManager(
            f"{root}/missed-async", policy=asyncckpt.EverySteps(10_000), keep_last=None, rank_timeout=10
        )
        mgr.install_signal_handlers((signal.SIGUSR1,))
        state = {"w": torch.zeros(4)}
        dist.barrier()
        if rank == 0:
            for step in range(1, 11):
                await mgr.maybe_save(step, state)
        dist.barrier()
        if rank == 1:
            for step in range(1, 8):  # its signal's final step is 7 or 8: it stops first
                if step == 5:
                    os.kill(os.getpid(), signal.SIGUSR1)
                    await asyncio.sleep(0)  # the loop runs its handler
                await mgr.maybe_save(step, state)
        else:
            step, deadline = 11, time.monotonic() + 30
            while not heard and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                await mgr.maybe_save(step, state)
                step += 1
        await mgr.close()

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        asyncio.run(run())
    dist.barrier()
    return [str(w.message) for w in seen], len(heard)


def _missed_final(rank, root):
    """Rank 0 hears of the final checkpoint rank 1 announced only after it passed its step: no rank
    makes it, both raise the signal, and a later preemption works on both."""
    import warnings

    import torch.distributed as dist

    heard = []
    signal.signal(signal.SIGUSR1, lambda signum, frame: heard.append(signum))
    state = {"w": torch.zeros(4)}
    mgr = asyncckpt.CheckpointManager(
        f"{root}/missed", policy=asyncckpt.EverySteps(10_000), keep_last=None, rank_timeout=30
    )
    mgr.install_signal_handlers((signal.SIGUSR1,))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        dist.barrier()
        if rank == 0:  # far ahead of rank 1
            for step in range(1, 11):
                mgr.maybe_save(step, state)
        dist.barrier()
        if rank == 1:
            for step in range(1, 8):
                if step == 5:
                    os.kill(os.getpid(), signal.SIGUSR1)  # every rank is to save step 7
                mgr.maybe_save(step, state)
        else:
            step, deadline = 11, time.monotonic() + 30
            while not heard and time.monotonic() < deadline:
                time.sleep(0.05)
                mgr.maybe_save(step, state)
                step += 1
        first = [str(w.message) for w in seen]
    dist.barrier()
    signals_first = len(heard)
    mgr.install_signal_handlers((signal.SIGUSR1,))  # the process went on: a second preemption
    for step in range(20, 30):
        time.sleep(0.05)  # a step longer than the store's round trip under load (see rank_policy)
        dist.all_reduce(torch.ones(1))
        if rank == 0 and step == 22:
            os.kill(os.getpid(), signal.SIGUSR1)
        mgr.maybe_save(step, state)
    steps = mgr.steps()
    mgr.close()
    return first, signals_first, len(heard) - signals_first, steps


def _twice(rank, root):
    """SIGUSR1 as "checkpoint now" to a process that goes on (its own handler returns), twice: the
    handlers are installed again after the first."""
    import torch.distributed as dist

    heard = []
    signal.signal(signal.SIGUSR1, lambda signum, frame: heard.append(signum))
    with asyncckpt.CheckpointManager(
        f"{root}/twice", policy=asyncckpt.EverySteps(10_000), keep_last=None, rank_timeout=30
    ) as mgr:
        mgr.install_signal_handlers((signal.SIGUSR1,))
        for step in range(1, 31):
            time.sleep(0.05)  # a step longer than the store's round trip under load (see rank_policy)
            dist.all_reduce(torch.ones(1))  # lockstep
            if rank == 1 and step in (5, 15):
                os.kill(os.getpid(), signal.SIGUSR1)
            if step == 12:
                mgr.install_signal_handlers((signal.SIGUSR1,))
            mgr.maybe_save(step, {"w": torch.full((10,), float(step))})
        return mgr.steps(), len(heard)


def _preempt_async(rank, root):
    """The same with the async manager, whose handlers are its event loop's."""
    import asyncio

    import torch.distributed as dist

    async def train():
        mgr = asyncckpt.AsyncCheckpointManager(
            root, policy=asyncckpt.EverySteps(10_000), keep_last=None, rank_timeout=30
        )
        mgr.install_signal_handlers((signal.SIGTERM,))
        saved, step = [], 0
        try:
            for step in range(1, 41):
                await asyncio.sleep(0.05)  # a step longer than the store's round trip under load
                dist.all_reduce(torch.ones(1))  # lockstep
                if rank == 1 and step == 5:
                    os.kill(os.getpid(), signal.SIGTERM)
                    await asyncio.sleep(0)  # the loop runs its handler
                if await mgr.maybe_save(step, {"w": torch.full((1000,), float(step))}) is not None:
                    saved.append(step)
        except Preempted:
            how = "preempted"
        else:
            how = "done"
        committed = await mgr.steps()
        await mgr.close()
        return saved, how, step, committed, signal.getsignal(signal.SIGTERM) is _on_term

    return asyncio.run(train())


def test_sigterm_on_one_rank_makes_every_rank_save_the_same_final_step(tmp_path):
    term0, term1 = run_ranks(_preempt, 2, str(tmp_path), timeout=200)
    # SIGTERM reached rank 1 at step 5: both ranks save step 5 + lead, commit it, then the signal acts
    assert term0[:3] == term1[:3] == ([], "preempted", 7), (term0, term1)  # maybe_save raised: no handle
    assert term0[3] == term1[3] == [7]
    assert term0[4] and term1[4]  # the handlers found at install were put back before the signal
    # the async manager: the same final step on both ranks, committed, then the signal on both
    (saved0, how0, last0, committed0, back0), (saved1, how1, last1, committed1, back1) = term0[5], term1[5]
    assert how0 == how1 == "preempted" and saved0 == saved1 == [] and back0 and back1, (term0[5], term1[5])
    assert last0 == last1 and committed0 == committed1 == [last0] and last0 in (7, 8), (term0[5], term1[5])
    # a second signal to a process that went on is a second final checkpoint, on every rank
    assert term0[6] == term1[6] == ([7, 17], 2)
    # a final step rank 0 heard of after passing it: saved by no rank, the signal raised on both
    (first0, signals0, later0, steps0), (first1, signals1, later1, steps1) = term0[7], term1[7]
    assert len(first0) == 1 and first0[0].startswith(
        "asyncckpt: the final checkpoint before signal 10 failed: rank 0 heard that every rank saves step 7 "
        "(announced by rank 1) only after it had passed it"
    ), first0
    assert len(first1) == 1 and "rank 0 could not plan its save of step 7" in first1[0], first1
    assert signals0 == signals1 == 1
    # the next preemption: every rank's final checkpoint, then the signal on every rank
    assert later0 == later1 == 1 and steps0 == steps1 == [24], (term0[7], term1[7])
    # the async manager: rank 0 warns and raises the signal at once, with nothing to wait for
    (said0, signals0), (said1, signals1) = term0[8], term1[8]
    assert len(said0) == 1 and "rank 0 heard that every rank saves step" in said0[0], said0
    assert said1 == [] and signals0 == signals1 == 1, term1[8]


def _preempt_to_death(rank, world_size, root):
    """SIGTERM's default action, as a launcher's preemption: the final checkpoint, then the process
    ends, rank 0's (which hosts the job's store) as soon as the others heard its outcome. Rank 1 is
    slow to hear it; what it warns goes to a file (the process leaves no result)."""
    import warnings

    from asyncckpt.engine.ranks import RankGroup

    seen = open(f"{root}.warnings-{rank}", "w")  # noqa: SIM115 - open until the signal ends the process
    warnings.showwarning = lambda message, *args, **kwargs: (seen.write(f"{message}\n"), seen.flush())
    if rank == 1:
        slowed(RankGroup, ["outcome", "heard_settled"], 0.5)
    mgr = asyncckpt.CheckpointManager(root, policy=asyncckpt.EverySteps(10_000), keep_last=None, rank_timeout=30)
    mgr.install_signal_handlers((signal.SIGTERM,))
    _train(rank, mgr, 40, kill_at=5 if rank == 0 else None)
    return "not preempted"


def test_preemption_ending_the_processes_reports_the_final_checkpoint_committed_on_every_rank(tmp_path):
    root = tmp_path / "root"
    with start_ranks(_preempt_to_death, 2, str(root), timeout=120) as job:
        outcomes = job.outcomes()
    assert [(o.status, o.exitcode) for o in outcomes] == [("died", -signal.SIGTERM)] * 2, [
        o.describe() for o in outcomes
    ]
    assert [p.name for p in root.iterdir() if p.name.startswith("step-")] == ["step-000000000007"]
    for rank in range(2):
        assert (tmp_path / f"root.warnings-{rank}").read_text() == "", rank


def _late(rank, world_size, root):
    import torch.distributed as dist

    # An announcement for a step rank 1 has passed: rank 1 raises, naming both steps, and takes its
    # turn in the agreement on it, so that rank 0's save of it fails at once and the ranks' next
    # collectives pair.
    imported_before = "torch.distributed.tensor" in sys.modules
    mgr = asyncckpt.CheckpointManager(
        f"{root}/late", policy=asyncckpt.EverySeconds(3600), policy_lead=2, keep_last=None, rank_timeout=60
    )
    # DTensor's module (about 0.8 s to import) is imported by the opening, not inside the first save
    assert not imported_before and "torch.distributed.tensor" in sys.modules
    state = {"w": torch.zeros(10)}
    for step in range(1, 6):
        mgr.maybe_save(step, state)
    dist.barrier()
    handle = None
    if rank == 0:  # as if rank 0's announcement were very late: rank 0 saves the step it announced
        mgr._schedule._announce(Target(3, 0))
        handle = mgr.save(3, state)
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
    else:
        began = time.monotonic()
        try:
            handle.wait()
        except CheckpointError as exc:
            error = (str(exc), time.monotonic() - began)
    state["w"] += 1
    after = mgr.save(10, state).wait()  # the next save of both ranks pairs, and commits
    restored = mgr.restore(state)
    # the job's last collective a refused turn (rank 1 cannot save its state): rank 0's close has
    # nothing to wait for, since rank 1 reads nothing of it
    try:
        mgr.save(11, {"w": object()} if rank == 1 else state).wait()
    except (CheckpointError, TypeError):
        pass
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        mgr.close()
    closing = [str(w.message) for w in seen]
    return error, after is not None, restored, sorted(os.listdir(f"{root}/late")), closing


def test_an_announcement_for_a_passed_step_raises(tmp_path):
    (late0, saved0, restored0, names0, closing0), (late1, saved1, restored1, names1, closing1) = run_ranks(
        _late, 2, str(tmp_path), timeout=200
    )
    assert late1 is not None and "step 3" in late1 and "step 5" in late1 and "no rank saves it" in late1, late1
    reason, waited = late0
    assert (
        "rank 1 could not plan its save of step 3 (a state or an argument it cannot save, or a step it had passed"
        in reason
    ), reason
    assert waited < 30  # not rank_timeout (60 s): rank 1 took its turn
    assert saved0 and saved1 and restored0 == restored1 == 10
    assert [n for n in names0 if n.startswith("step-")] == ["step-000000000010"]
    assert closing0 == closing1 == []


def _long_run(rank, world_size, root):
    import torch.distributed as dist

    from asyncckpt.engine import ranks

    ranks.KEPT_IN_STORE = 4  # in this process only: what a run of thousands of saves would reach
    store = dist.distributed_c10d._get_default_store()
    mgr = asyncckpt.CheckpointManager(root, policy=asyncckpt.EverySeconds(1e-6), keep_last=2)
    state = {"w": torch.zeros(10)}
    counts = []
    for step in range(1, 41):
        time.sleep(0.01)  # a step longer than the store's round trip, as rank_policy asks
        dist.all_reduce(torch.ones(1))  # lockstep
        state["w"] += 1
        handle = mgr.maybe_save(step, state)
        if handle is not None:
            handle.wait()
            dist.barrier()  # every rank is done with this save (each saves the same steps)
            counts.append((step, store.num_keys()))
    committed = mgr.steps()
    mgr.close()
    return counts, committed


def test_a_long_run_does_not_grow_the_job_s_store(tmp_path):
    """The keys a save leaves in the c10d store (the ranks' decisions, the outcome, rank 0's word
    that retention is done, the policy's announced steps) are deleted once far enough behind."""
    by_rank = run_ranks(_long_run, 2, str(tmp_path), timeout=200)
    (counts0, committed0), (counts1, committed1) = by_rank
    assert [s for s, _ in counts0] == [s for s, _ in counts1] and len(counts0) >= 8, by_rank
    assert committed0 == committed1 == [s for s, _ in counts0][-2:]
    later = [n for _, n in counts0[len(counts0) // 2 :]]
    assert max(later) == min(later), counts0
