"""Failures inside the multi-rank two-phase commit, on spawned gloo ranks (2 ranks).

A rank that raises, or dies, while writing or before voting, and rank 0 dying before publishing:
nothing is committed, every surviving rank's save fails within ``rank_timeout`` naming the rank,
a reader listing the root meanwhile never sees a partial step, and a new job restores the earlier
steps bit-exact and sweeps the leftovers. Overlap mode's guard refusing on one rank refuses for all.
A training job killed mid-run resumes to the same losses and weights as an uninterrupted one.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from _cli import cli, remaining
from _dist import die_at_phase, run_ranks, slowed, start_ranks
from asyncckpt import CheckpointError, load
from asyncckpt.format import step_dir_name

RANK_TIMEOUT = 8.0


def _errors(save) -> str:
    """The failure ``save().wait()`` raises, as text (with its cause); "" when it committed. A
    failure fast enough is raised by ``save`` itself (the next call into the manager)."""
    from asyncckpt.errors import CheckpointError

    try:
        save().wait()
    except CheckpointError as exc:
        return f"{type(exc).__name__}: {exc} <- {exc.__cause__!r}"
    return ""


# ---- a rank that raises ----------------------------------------------------------------------


def _raising_rank(rank: int, world_size: int, root: str, overlap_root: str) -> dict:
    from _dist_models import full_state, make_ddp, train_steps
    from asyncckpt import CheckpointManager
    from asyncckpt.storage.local import LocalBackend

    out: dict = {}
    model, optim = make_ddp(seed=0)
    state = {"model": model, "optim": optim, "rank": torch.tensor([rank])}
    mgr = CheckpointManager(root, keep_last=None, rank_timeout=RANK_TIMEOUT)
    train_steps(model, optim, 1, 1, rank)
    mgr.save(1, state).wait()
    out["full1"] = full_state(model, optim)
    real_open = LocalBackend.open_write

    def on_fire(self, name, size_hint=None):
        raise OSError(28, "disk on fire")

    # step 2: rank 1's data file cannot be opened; step 3: rank 0's
    for step, failing in ((2, 1), (3, 0)):
        train_steps(model, optim, step, 1, rank)
        if rank == failing:
            LocalBackend.open_write = on_fire
        began = time.monotonic()
        out[f"error{step}"] = _errors(lambda step=step: mgr.save(step, state))
        out[f"took{step}"] = time.monotonic() - began
        LocalBackend.open_write = real_open
    # step 4: rank 1's state cannot be flattened (an unsupported leaf on that rank only)
    bad = dict(state, extra=object()) if rank == 1 else state
    try:
        mgr.save(4, bad).wait()
        out["error4"] = ""
    except Exception as exc:  # noqa: BLE001
        out["error4"] = f"{type(exc).__name__}: {exc}"
    # steps 6 / 7: the ranks save different steps; then step 8 without the optimizer on rank 1 (its
    # replicated tensors differ): refused on every rank, nothing written (the writer waits for the
    # agreement before it writes)
    began = time.monotonic()
    out["error_steps"] = _errors(lambda: mgr.save(6 + rank, state))
    bad = {key: value for key, value in state.items() if key != "optim" or rank == 0}
    out["error_shapes"] = _errors(lambda: mgr.save(8, bad))
    out["took_disagree"] = time.monotonic() - began
    # two models of one shape, listed in another order on rank 1 (a dict built from a set): their
    # rows were matched by position and mixed, the save committing without a word
    twins = [make_ddp(seed=1)[0], make_ddp(seed=2)[0]]
    named = {"x": twins[0], "y": twins[1]} if rank == 0 else {"y": twins[1], "x": twins[0]}
    out["error_order"] = _errors(lambda: mgr.save(8, named))
    # step 9: rank 1's metadata cannot be saved: it raises at once, the others' save fails as fast
    began = time.monotonic()
    try:
        mgr.save(9, state, metadata={"bad": object()} if rank == 1 else {"ok": 1}).wait()
        out["error9"] = ""
    except (TypeError, CheckpointError) as exc:
        out["error9"] = f"{type(exc).__name__}: {exc}"
    out["took9"] = time.monotonic() - began
    # steps 10 / 11: the snapshot copy raises on rank 1, then on rank 0, after the agreement was
    # issued: that rank raises, its writer still reports the part failed, so the other rank's save
    # fails at once naming it, and the ranks stay in step for the saves after
    from asyncckpt.engine.staging import CopyEngine

    real_copy = CopyEngine.copy

    def broken_copy(self, tensors, layout, arena):
        raise RuntimeError(f"copy failed on rank {rank}")

    for step, failing in ((10, 1), (11, 0)):
        if rank == failing:
            CopyEngine.copy = broken_copy
        began = time.monotonic()
        try:
            mgr.save(step, state).wait()
            out[f"error{step}"] = ""
        except (RuntimeError, CheckpointError) as exc:
            out[f"error{step}"] = f"{type(exc).__name__}: {exc}"
        out[f"took{step}"] = time.monotonic() - began
        CopyEngine.copy = real_copy
    # step 12: rank 1 passes a step out of range: it raises ValueError before planning, yet takes
    # its turn in the agreement, so rank 0's save of 12 fails at once and the ranks stay in step
    began = time.monotonic()
    try:
        mgr.save(12 if rank == 0 else -1, state).wait()
        out["error12"] = ""
    except (ValueError, CheckpointError) as exc:
        out["error12"] = f"{type(exc).__name__}: {exc}"
    out["took12"] = time.monotonic() - began
    train_steps(model, optim, 5, 1, rank)
    mgr.save(5, state).wait()
    out["full5"] = full_state(model, optim)
    out["steps"] = mgr.steps()
    mgr.close()

    # overlap mode: rank 1 changes a tensor in place before its fence; no rank commits the step
    from asyncckpt import _phases

    torch.manual_seed(0)
    net = torch.nn.Linear(256, 256)  # 256 KB of optimizer-owned params: copied lazily
    ostate = {"net": net, "opt": torch.optim.SGD(net.parameters(), lr=0.1)}
    omgr = CheckpointManager(overlap_root, snapshot="overlap", rank_timeout=RANK_TIMEOUT)
    omgr.save(1, ostate).wait()
    _phases._DELAYS["lazy_copy"] = 1.0  # the copy runs late on every rank
    handle = omgr.save(2, ostate)
    if rank == 1:
        with torch.no_grad():
            net.weight.mul_(2.0)  # before the copy, on rank 1 only
    with torch.no_grad():
        deadline = time.monotonic() + 3 * RANK_TIMEOUT
        while not handle.done() and time.monotonic() < deadline:
            net(torch.randn(2, 256))  # settle points: each rank's verdict
            time.sleep(0.01)
    out["overlap_error"] = _errors(lambda: handle)
    _phases._DELAYS.pop("lazy_copy")
    omgr.save(3, ostate).wait()
    out["overlap_steps"] = omgr.steps()
    omgr.close()
    return out


@pytest.fixture(scope="module")
def raised(tmp_path_factory):
    base = tmp_path_factory.mktemp("mr-raise")
    results = run_ranks(_raising_rank, 2, str(base / "ckpt"), str(base / "overlap"), timeout=240)
    return base, results


def test_a_rank_that_raises_commits_nothing_and_every_rank_names_it(raised):
    base, results = raised
    root = base / "ckpt"
    for rank, out in enumerate(results):
        # the failing rank raises its own error; the other names it, with the cause
        assert "disk on fire" in out["error2"] and ("rank 1" in out["error2"] or rank == 1), (rank, out["error2"])
        assert "disk on fire" in out["error3"] and ("rank 0" in out["error3"] or rank == 0), (rank, out["error3"])
        assert out["took2"] < RANK_TIMEOUT + 5 and out["took3"] < RANK_TIMEOUT + 5
        assert out["error4"] and ("rank 1" in out["error4"] or rank == 1), (rank, out["error4"])
        assert "the ranks save different steps (from 6 to 7)" in out["error_steps"], (rank, out["error_steps"])
        assert "differ in their sharded or replicated tensors" in out["error_shapes"], (rank, out["error_shapes"])
        assert "(paths, dtypes, shapes or placements, or their order)" in out["error_order"], (rank, out["error_order"])
        assert out["took_disagree"] < RANK_TIMEOUT, out["took_disagree"]  # no rank waited for a vote
        for step, failing in ((10, 1), (11, 0)):
            want = f"copy failed on rank {failing}"
            got = out[f"error{step}"]
            assert want in got and (rank == failing or f"rank {failing} failed" in got), (rank, got)
            assert out[f"took{step}"] < RANK_TIMEOUT, (rank, step, out[f"took{step}"])
        want12 = "ValueError: step must be" if rank == 1 else "rank 1 could not plan its save of step 12"
        assert want12 in out["error12"] and out["took12"] < RANK_TIMEOUT, (rank, out["error12"], out["took12"])
        want9 = "TypeError: metadata" if rank == 1 else "rank 1 could not plan its save of step 9"
        assert want9 in out["error9"] and out["took9"] < RANK_TIMEOUT, (rank, out["error9"], out["took9"])
        assert out["steps"] == [1, 5]
    assert remaining(root) == [1, 5]  # nothing of steps 6, 7 and 8 either
    assert not [p.name for p in root.iterdir() if p.name.startswith(".tmp")]
    for step in (1, 5):
        loaded = load(root, step=step, per_rank="rank0")
        want = results[0][f"full{step}"]
        assert torch.equal(loaded["model"]["layers.0.weight"], want["param.layers.0.weight"])
        assert torch.equal(loaded["optim"]["state"]["layers.0.weight"]["exp_avg"], want["exp_avg.layers.0.weight"])


def test_overlap_guard_rejected_on_one_rank_commits_on_none(raised):
    base, results = raised
    for rank, out in enumerate(results):
        assert out["overlap_error"], (rank, [(o["overlap_error"], o["overlap_steps"]) for o in results])
        assert "changed in place" in out["overlap_error"], (rank, out["overlap_error"])
        assert out["overlap_steps"] == [1, 3]
    assert remaining(base / "overlap") == [1, 3]


def test_a_flipped_byte_in_one_rank_data_file(raised, tmp_path, capsys):
    import shutil

    root = tmp_path / "ckpt"
    shutil.copytree(raised[0] / "ckpt", root)
    data = sorted((root / step_dir_name(5)).glob("data-00001*"))
    assert data, list((root / step_dir_name(5)).iterdir())
    raw = bytearray(data[0].read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data[0].write_bytes(bytes(raw))
    code, out, err = cli(capsys, "verify", root)
    assert code != 0
    assert data[0].name in out + err, out + err
    with pytest.warns(UserWarning):
        state = load(root, per_rank="rank0")
    assert torch.equal(state["model"]["layers.0.weight"], raised[1][0]["full1"]["param.layers.0.weight"])


# ---- a rank that dies ----------------------------------------------------------------------------


def _dying_rank(rank: int, world_size: int, root: str, victim: int, phase: str) -> dict:
    from _dist_models import full_state, make_ddp, train_steps
    from asyncckpt import CheckpointError, CheckpointManager

    model, optim = make_ddp(seed=0)
    state = {"model": model, "optim": optim}
    mgr = CheckpointManager(root, keep_last=None, rank_timeout=RANK_TIMEOUT)
    train_steps(model, optim, 1, 1, rank)
    mgr.save(1, state).wait()
    full = full_state(model, optim)
    train_steps(model, optim, 2, 1, rank)
    if rank == victim:
        die_at_phase(phase, mark=str(Path(root, f".died-{rank}")))
    began = time.monotonic()
    error = _errors(lambda: mgr.save(2, state))
    took = time.monotonic() - began
    reopen, reopen_took = "", 0.0
    if victim == 0:  # the store's host is gone: a new manager must not wait the store's 30 minutes
        began = time.monotonic()
        try:
            CheckpointManager(root, keep_last=None, rank_timeout=RANK_TIMEOUT)
        except CheckpointError as exc:
            reopen = str(exc)
        reopen_took = time.monotonic() - began
    return {"error": error, "took": took, "full1": full, "reopen": reopen, "reopen_took": reopen_took}


def _watch(root: Path, stop: threading.Event, seen: list, bad: list) -> None:
    """List the root over and over and load every step it shows: never a partial one."""
    while not stop.is_set():
        for path in sorted(root.glob("step-*")):
            try:
                load(path, per_rank="rank0")
                seen.append(path.name)
            except Exception as exc:  # noqa: BLE001
                if path.exists():
                    bad.append(f"{path.name}: {exc!r}")
        time.sleep(0.02)


KILLS = [(1, "write"), (1, "vote"), (0, "rename")]


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """The three jobs run at once: each mostly waits out ``rank_timeout``."""
    base = tmp_path_factory.mktemp("mr-kill")
    runs, jobs = {}, []
    try:
        for victim, phase in KILLS:
            root = base / f"{phase}-{victim}"
            root.mkdir()
            job = start_ranks(_dying_rank, 2, str(root), victim, phase, timeout=180)
            stop, seen, bad = threading.Event(), [], []
            watcher = threading.Thread(target=_watch, args=(root, stop, seen, bad), daemon=True)
            jobs.append(((victim, phase), root, (stop, watcher, seen, bad), job))
            watcher.start()
        for key, root, (stop, watcher, seen, bad), job in jobs:
            outcomes = job.outcomes(grace=4 * RANK_TIMEOUT)
            stop.set()
            watcher.join(30)
            runs[key] = (root, outcomes, seen, bad)
    finally:
        for *_, (stop, _, _, _), job in jobs:
            stop.set()
            job.close()
    return runs


@pytest.mark.parametrize(("victim", "phase"), KILLS)
def test_a_dead_rank_fails_the_survivor_in_time(killed, victim, phase):
    root, outcomes, seen, bad = killed[(victim, phase)]
    assert outcomes[victim].status == "died", outcomes[victim].describe()
    survivor = outcomes[1 - victim]
    assert survivor.status == "ok", survivor.describe()
    assert f"rank {victim}" in survivor.value["error"], survivor.value["error"]
    assert survivor.value["took"] < RANK_TIMEOUT + 10
    if victim == 0:
        assert "could not connect to the job's store" in survivor.value["reopen"], survivor.value
        assert survivor.value["reopen_took"] < RANK_TIMEOUT + 10
    assert not bad, bad
    assert set(seen) <= {step_dir_name(1)}
    assert remaining(root) == [1]


def _restart(rank: int, world_size: int, roots: list[str]) -> list[dict]:
    from _dist_models import full_state, make_ddp
    from asyncckpt import CheckpointManager

    fulls = []
    for root in roots:
        model, optim = make_ddp(seed=1)  # other weights: the restore must replace them all
        mgr = CheckpointManager(root, keep_last=None, rank_timeout=RANK_TIMEOUT)
        assert mgr.restore({"model": model, "optim": optim}) == 1
        fulls.append(full_state(model, optim))
        mgr.close()
    return fulls


def test_after_a_restart_the_earlier_step_restores_and_leftovers_go(killed):
    roots = [killed[k][0] for k in KILLS]
    results = run_ranks(_restart, 2, [str(r) for r in roots], timeout=180)
    for i, key in enumerate(KILLS):
        root, outcomes, _, _ = killed[key]
        want = outcomes[1 - key[0]].value["full1"]
        for rank in range(2):
            got = results[rank][i]
            assert set(got) == set(want)
            for name in want:
                assert torch.equal(got[name], want[name]), (key, rank, name)
        assert [p.name for p in root.iterdir() if p.name.startswith(".tmp")] == [], key


# ---- a training job killed mid-run, resumed ----------------------------------------------------------

TOTAL = 6


def _train(rank: int, world_size: int, root: str, kill_at: int | None, resume: bool) -> dict:
    from _dist_models import full_state, make_ddp, train_steps
    from asyncckpt import CheckpointManager

    model, optim = make_ddp(seed=0)
    state = {"model": model, "optim": optim}
    mgr = CheckpointManager(root, keep_last=2, rank_timeout=30.0)
    start = (mgr.restore(state) or 0) + 1 if resume else 1
    losses = {}
    for step in range(start, TOTAL + 1):
        if step == kill_at:  # the save of the step before may still be in flight: wait to be killed
            Path(f"{root}.at-kill-{rank}").touch()
            time.sleep(600)
        losses[step] = train_steps(model, optim, step, 1, rank)[0]
        if step % 2 == 0:
            mgr.save(step, state)
    mgr.close()
    return {"start": start, "losses": losses, "full": full_state(model, optim)}


def test_a_killed_training_job_resumes_to_the_same_result(tmp_path):
    root = tmp_path / "train"
    with start_ranks(_train, 2, str(root), 5, False, timeout=180) as job:
        # both killed at once: a rank that killed itself could take the store (rank 0's) down before
        # the other rank's writer read the outcome of an earlier save, which then fails it instead
        markers = [Path(f"{root}.at-kill-{rank}") for rank in range(2)]
        job.wait_until(lambda: all(m.exists() for m in markers), "step 5 on both ranks")
        for rank in range(2):
            job.kill(rank)
        outcomes = job.outcomes()
    assert [o.status for o in outcomes] == ["died", "died"], [o.describe() for o in outcomes]
    resumed = run_ranks(_train, 2, str(root), None, True, timeout=180)
    straight = run_ranks(_train, 2, str(tmp_path / "straight"), None, False, timeout=180)
    for rank in range(2):
        assert resumed[rank]["start"] in (3, 5)  # step 4's save was in flight at the kill
        for step, loss in resumed[rank]["losses"].items():
            assert loss == straight[rank]["losses"][step], step
        for name, value in straight[rank]["full"].items():
            assert torch.equal(resumed[rank]["full"][name], value), name


def test_the_vote_phase_can_be_delayed_from_the_environment():
    """``_phases.pause("vote")`` is a mark of multi-rank saves; naming it in ASYNCCKPT_PHASE_DELAY
    made every import of asyncckpt fail ("unknown phase")."""
    import subprocess
    import sys

    env = {**os.environ, "ASYNCCKPT_PHASE_DELAY": "vote=0.01"}
    done = subprocess.run(
        [sys.executable, "-c", "import asyncckpt._phases as p; print(p._DELAYS)"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "'vote': 0.01" in done.stdout


def _two_managers(rank: int, world_size: int, root: str) -> list[int]:
    from asyncckpt import CheckpointManager

    first = CheckpointManager(Path(root, "a"), rank_timeout=RANK_TIMEOUT)
    first.save(1, {"x": torch.ones(2)}).wait()
    if rank == 1:
        time.sleep(2)  # rank 0 closes and opens the next manager first
    first.close()
    second = CheckpointManager(Path(root, "b"), rank_timeout=RANK_TIMEOUT)
    second.save(1, {"x": torch.ones(2)}).wait()
    steps = second.steps()
    second.close()
    return steps


def test_a_second_manager_after_ranks_closed_the_first_at_different_times(tmp_path):
    """The checkpoint group was destroyed at close and the next one reused its name and store keys:
    the rank that closed first connected to the other's dead group and both hung."""
    assert run_ranks(_two_managers, 2, str(tmp_path), timeout=60) == [[1], [1]]


def _slow_store_connection(rank: int, world: int, root: str) -> list[str]:
    """Rank 1's connection to the job's store takes longer than rank_timeout, once."""
    import torch.distributed as dist

    from asyncckpt import CheckpointError, CheckpointManager

    timeout = 3.0
    store_class = type(dist.distributed_c10d._get_default_store())
    real = store_class.clone
    slow = [rank == 1]

    def clone(self):
        if slow[0]:
            slow[0] = False
            time.sleep(timeout + 1)
        return real(self)

    store_class.clone = clone
    got = []
    for attempt in range(3):
        try:
            with CheckpointManager(root, keep_last=None, rank_timeout=timeout) as mgr:
                mgr.save(attempt, {"x": torch.full((4,), float(attempt))}).wait()
            got.append("saved")
        except CheckpointError as exc:
            got.append(str(exc))
            time.sleep(timeout + 2)  # the abandoned connection comes in; the next attempt starts together
    return got


def test_a_rank_whose_store_connection_times_out_fails_that_manager_on_every_rank_and_the_next_ones_work(waited):
    """The rank that could not connect still takes its part in opening the root, so the ranks stay
    in step: the other rank fails there too, and the managers after it open and save."""
    tmp_path, got = _joined(waited, _slow_store_connection)
    assert "could not connect to the job's store within 3 s" in got[1][0], got
    # rank 0 gave up waiting for rank 1, or saw rank 1's failure flag: which comes first is a race
    assert any(m in got[0][0] for m in ("could not open the checkpoint root together", "rank 1 could not connect")), got
    assert [g[1:] for g in got] == [["saved", "saved"]] * 2, got
    assert remaining(tmp_path) == [1, 2]


def _group_made_on_rank_0_only(rank: int, world: int, root: str) -> list[str]:
    """Making the checkpoint group fails on rank 1 after rank 0 made its end of it, as when rank 1's
    rendezvous times out on a loaded machine: rank 1's end is gone, so rank 0's group is broken."""
    import torch.distributed as dist

    from asyncckpt import CheckpointError, CheckpointManager

    real = dist.ProcessGroupGloo
    fail = [rank == 1]

    def made(*args, **kwargs):
        group = real(*args, **kwargs)
        if fail[0]:
            fail[0] = False
            time.sleep(1.0)  # rank 0 finishes making its end
            del group  # closes this rank's connections to the others
            raise dist.DistStoreError("wait timeout after 3000ms (this rank's end of the group is gone)")
        return group

    dist.ProcessGroupGloo = made
    got = []
    try:
        for attempt in range(3):  # a third when a first connection to the store is slow here (see _first_manager)
            try:
                with CheckpointManager(root, keep_last=None, rank_timeout=3.0) as mgr:
                    mgr.save(attempt, {"x": torch.full((4,), float(attempt))}).wait()
                got.append("saved")
                break
            except CheckpointError as exc:
                got.append(str(exc))
                time.sleep(5.0)  # an abandoned connection comes in
            dist.barrier()
    finally:
        dist.ProcessGroupGloo = real
    return got


def _late_to_open(rank: int, world: int, root: str) -> dict:
    """A rank more than ``rank_timeout`` late to creating the job's first manager."""
    import time as _time

    import torch.distributed as dist

    from asyncckpt import CheckpointManager

    timeout = 3.0
    if rank == 1:
        _time.sleep(timeout + 1.5)
    began = _time.monotonic()
    try:
        CheckpointManager(root, keep_last=None, rank_timeout=timeout).close()
        first = ""
    except CheckpointError as exc:
        first = str(exc)
    took = _time.monotonic() - began
    _time.sleep(2.0)  # the abandoned connections come in
    dist.barrier()
    with _first_manager(root, timeout) as mgr:
        mgr.save(1, {"w": torch.ones(4)}).wait()
        steps = mgr.steps()
    return {"first": first, "took": took, "steps": steps}


def test_a_rank_late_to_open_fails_within_rank_timeout_and_the_next_manager_works(waited):
    """gloo retries connecting to a rank that gave up on the group for several times the timeout:
    the late rank waited 5x ``rank_timeout``."""
    _, got = _joined(waited, _late_to_open)
    for rank in got:
        assert rank["first"].startswith(f"rank {got.index(rank)} could not "), got
        assert rank["took"] < 2 * 3.0 + 1.0, got  # not 5 x 3 s
        assert rank["steps"] == [1], got


def test_a_checkpoint_group_made_on_some_ranks_only_is_made_anew_by_the_next_manager(waited):
    """The ranks that made their end of a group the others failed to make drop it with the manager
    they failed to open: every rank makes the next manager's group afresh, so the ranks meet again
    (a rank that kept the broken group failed every later manager, while the others waited for it to
    make a new one)."""
    tmp_path, got = _joined(waited, _group_made_on_rank_0_only)
    assert "rank 1 could not make the checkpoint group" in got[1][0], got
    # rank 0 failed on its broken group, or on a connection to the store slow on this loaded machine
    first = ("rank 0 could not open the checkpoint root", "could not connect to the job")
    assert any(m in got[0][0] for m in first), got
    assert len(got[0]) == len(got[1]) <= 3 and got[0][-1] == got[1][-1] == "saved", got
    assert remaining(tmp_path) == [len(got[0]) - 1]


def _roots_not_shared(rank: int, world: int, root: str) -> dict:
    """Each rank's root is a directory of its own (a node-local path, an NFS mount missing on some
    node): rank 0 committed steps naming files it could not see, which no reader could open, and
    which retention took for the newest, deleting the good ones."""
    import os as _os

    from asyncckpt import CheckpointManager

    own = f"{root}/node{rank}"
    _os.makedirs(own, exist_ok=True)
    with CheckpointManager(own, keep_last=1, rank_timeout=60) as mgr:
        return {"save": _errors(lambda: mgr.save(1, {"w": torch.full((4,), float(rank))})), "steps": mgr.steps()}


def test_ranks_that_do_not_share_the_root_commit_nothing(worked):
    tmp_path, got = _joined(worked, _roots_not_shared)
    for rank in got:
        assert "step 1 was not committed: rank 1's rank-00001.json is not in rank 0's" in rank["save"], got
        assert "every rank must save to the same root" in rank["save"] and rank["steps"] == []
    assert sorted(p.name for p in (tmp_path / "node0").glob("step-*")) == []


def _batchnorm_buffers(rank: int, world: int, root: str) -> dict:
    """A DDP model with BatchNorm: each rank's running stats move with its own batch after DDP
    broadcast rank 0's at the forward's start. They were stored as row pieces of several ranks, and
    came back as a tensor no rank held (not even rank 0, whose buffers training goes on with)."""
    from asyncckpt import CheckpointManager

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.BatchNorm1d(64))
    model = torch.nn.parallel.DistributedDataParallel(net)
    model(torch.randn(16, 8, generator=torch.Generator().manual_seed(rank))).sum().backward()
    saved = {name: b.clone() for name, b in net.named_buffers()}
    with CheckpointManager(root, keep_last=None, rank_timeout=60) as mgr:
        mgr.save(1, {"model": model}).wait()
        for b in net.buffers():
            b.zero_()
        mgr.restore({"model": model})
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, saved)
    rank0 = gathered[0]
    return {
        "differ_between_ranks": any(not torch.equal(rank0[k], gathered[1][k]) for k in rank0 if k.startswith("1.run")),
        "restored_is_rank0s": all(torch.equal(b, rank0[name]) for name, b in net.named_buffers()),
    }


def test_a_ddp_model_s_buffers_restore_as_rank_0_held_them(worked):
    _, got = _joined(worked, _batchnorm_buffers)
    assert got[0]["differ_between_ranks"], got  # the case is real: the ranks' running stats differ
    assert [rank["restored_is_rank0s"] for rank in got] == [True, True], got


def _rollback_with_a_rank0_policy(rank: int, world: int, root: str) -> dict:
    """A policy asked on rank 0 only (as a clock is) announced targets before the ranks restored an
    earlier step: a target heard after the rollback suppressed the policy's new due steps until
    training reached it again, or was "passed" on a rank, which then raised at every step after."""
    import torch.distributed as dist

    from asyncckpt import CheckpointManager
    from asyncckpt.policy import SavePolicy

    class EverySixthCall(SavePolicy):  # a clock's stand-in: due by calls, asked on rank 0 only
        def __init__(self) -> None:
            self.calls = 0

        def due(self, step: int) -> bool:
            self.calls += 1
            return self.calls % 6 == 0

        def peek(self, step: int) -> bool:
            return (self.calls + 1) % 6 == 0

    policy = EverySixthCall()
    out: dict = {"before": [], "after": [], "due_after": [], "raised": []}
    state = {"x": torch.zeros(4)}
    with CheckpointManager(root, keep_last=None, policy=policy, rank_timeout=30) as mgr:

        def train(first: int, last: int, key: str) -> None:
            for step in range(first, last):
                dist.all_reduce(torch.ones(1))  # lockstep, as a gradient all-reduce keeps them
                time.sleep(0.1 if rank == 1 else 0.01)
                state["x"].fill_(step)
                calls = policy.calls
                try:
                    if mgr.maybe_save(step, state) is not None:
                        out[key].append(step)
                except CheckpointError as exc:
                    out["raised"].append((step, str(exc)[:120]))
                if rank == 0 and key == "after" and policy.calls != calls and policy.calls % 6 == 0:
                    out["due_after"].append(step)

        train(0, 17, "before")  # due at 5 and 11: every rank saves 7 and 13
        mgr.wait()
        out["restored"] = mgr.restore(state, step=7)  # every rank goes back
        train(8, 30, "after")
        mgr.wait()
    return out


def test_a_rollback_starts_the_ranks_schedule_afresh(worked):
    _, got = _joined(worked, _rollback_with_a_rank0_policy)
    due = got[0]["due_after"]
    assert due and got[0]["restored"] == 7, got[0]
    for rank in got:
        assert rank["before"] == [7, 13] and rank["raised"] == [], rank
        assert rank["after"] == [step + 2 for step in due if step + 2 < 30], (rank["after"], due)


def _refused_policy_connection(rank: int, world: int, root: str) -> list[str]:
    """Rank 1's third connection to the job's store (the policy's second) is refused, once."""
    import torch.distributed as dist

    from asyncckpt import CheckpointError, CheckpointManager

    store_class = type(dist.distributed_c10d._get_default_store())
    real = store_class.clone
    calls = [0]

    def clone(self):
        calls[0] += 1
        if rank == 1 and calls[0] == 3:
            raise dist.DistError("connection refused (a test)")
        return real(self)

    store_class.clone = clone
    got = []
    for attempt in range(3):
        try:
            with CheckpointManager(root, keep_last=None, rank_timeout=20.0) as mgr:
                mgr.save(attempt, {"x": torch.full((4,), float(attempt))}).wait()
            got.append("saved")
        except CheckpointError as exc:
            got.append(str(exc))
    return got


def test_a_refused_policy_connection_on_one_rank_fails_that_manager_on_every_rank_and_the_next_ones_work(waited):
    """Every store connection a manager uses is made before the ranks open the root together: one
    refused on one rank only, after that, left its next manager out of step with the others."""
    tmp_path, got = _joined(waited, _refused_policy_connection)
    assert got[1][0] == "rank 1 could not connect to the job's store: connection refused (a test)", got
    assert got[0][0] == "rank 1 could not connect to the job's store, so no rank opens the root", got
    assert [g[1:] for g in got] == [["saved", "saved"]] * 2, got
    assert remaining(tmp_path) == [1, 2]


def _restore_with_a_bug_on_rank_1(rank: int, world: int, root: str) -> dict:
    import time as _time

    import asyncckpt
    from asyncckpt.engine import rank_restore

    state = {"w": torch.full((4,), float(rank))}
    with asyncckpt.CheckpointManager(root, rank_timeout=60.0) as mgr:
        mgr.save(1, state).wait()
        if rank == 1:

            def broken(*args, **kwargs):
                raise RuntimeError("a bug while reading")

            rank_restore._read_for_rank = broken  # type: ignore[assignment]
        began = _time.monotonic()
        try:
            mgr.restore(state)
        except Exception as exc:  # noqa: BLE001 - the test looks at what each rank raised
            return {"error": f"{type(exc).__name__}: {exc}", "seconds": _time.monotonic() - began}
    return {"error": None}


def test_an_unexpected_error_on_one_rank_fails_every_rank_s_restore_at_once(waited):
    _, got = _joined(waited, _restore_with_a_bug_on_rank_1)
    assert got[1]["error"] == "RuntimeError: a bug while reading"
    assert got[0]["error"].startswith("CheckpointError") and "another rank" in got[0]["error"]
    assert max(r["seconds"] for r in got) < 30  # not the 60 s rank_timeout: nobody waited for a vote


# ---- a rank that comes late ------------------------------------------------------------------


def _first_manager(root: str, timeout: float) -> Any:
    """A job's first manager with a short ``rank_timeout``, made again when connecting to the job's
    store or making the checkpoint group took longer than that: these jobs start together, a dozen
    processes on two cores, and a first connection has taken 3-5 s there. Every rank fails such a
    manager together, so every rank makes the next one, in step; what the jobs test comes after."""
    import torch.distributed as dist

    from asyncckpt import CheckpointManager

    slow = ("could not connect to the job's store", "could not make the checkpoint group", "could not open the")
    for attempt in range(3):
        try:
            return CheckpointManager(root, keep_last=None, rank_timeout=timeout)
        except CheckpointError as exc:
            if not any(m in str(exc) for m in slow) or attempt == 2:
                raise
            time.sleep(timeout + 2)  # the abandoned connection comes in
            dist.barrier()  # the next attempt starts together
    raise AssertionError("unreachable")


def _late_rank(rank: int, world: int, root: str) -> dict:
    import time as _time

    import torch.distributed as dist

    timeout = 3.0
    state = {"w": torch.full((4,), float(rank))}
    out: dict = {}
    with _first_manager(root, timeout) as mgr:
        mgr.save(1, state).wait()
        dist.barrier()
        if rank == 1:
            _time.sleep(timeout + 3.0)  # a long evaluation on one rank, past rank_timeout
        began = _time.monotonic()
        out["late"] = _errors(lambda: mgr.save(2, state))
        out["late_s"] = _time.monotonic() - began
        dist.barrier()  # training's next collective brings the ranks together again
        out["after"] = [_errors(lambda step=step: mgr.save(step, state)) for step in (3, 4)]
        out["steps"] = mgr.steps()
        # the ranks ask for different steps (one read a resume step from a file, the other did
        # not): rank 0 silently got another step than it asked for
        state["w"].fill_(-1.0)
        try:
            mgr.restore(state, step=3 if rank == 0 else None)
            out["asked"] = ""
        except CheckpointError as exc:
            out["asked"] = str(exc)
        out["w_after_asked"] = state["w"].tolist()
    return out


def test_a_rank_late_past_rank_timeout_fails_that_save_only(waited):
    """The save the late rank missed fails on every rank, within rank_timeout, and commits nothing;
    the next saves commit (a gloo timeout used to close the checkpoint group for good: every later
    save of the job failed)."""
    tmp_path, got = _joined(waited, _late_rank)
    assert "a rank did not take part within 3 s" in got[0]["late"]
    assert "a rank came to it more than 3 s after another" in got[1]["late"] and got[1]["late_s"] < 2.0
    assert got[0]["late_s"] < 3.0 + 2.0
    for rank in got:
        assert rank["after"] == ["", ""] and rank["steps"] == [1, 3, 4]
    assert sorted(p.name for p in tmp_path.glob("step-*")) == [step_dir_name(s) for s in (1, 3, 4)]


def test_ranks_asking_to_restore_different_steps_restore_nothing(waited):
    _, got = _joined(waited, _late_rank)
    for rank in got:
        assert "the ranks asked to restore different steps (the newest and step 3, at least)" in rank["asked"], got
        assert rank["w_after_asked"] == [-1.0] * 4  # nothing changed


def _late_to_restore(rank: int, world: int, root: str) -> dict:
    import time as _time

    import torch.distributed as dist

    from asyncckpt import CheckpointManager

    state = {"w": torch.full((4,), float(rank))}
    out: dict = {}
    with _first_manager(root, 3.0) as mgr:
        mgr.save(1, state).wait()
        dist.barrier()
        if rank == 1:
            _time.sleep(6.0)
        try:
            mgr.restore(state)
            out["restore"] = ""
        except CheckpointError as exc:
            out["restore"] = str(exc)
        dist.barrier()
        out["saves"] = []
        for step in (2, 3):
            out["saves"].append(_errors(lambda step=step: mgr.save(step, state)))
            dist.barrier()
    # late to opening a manager: fails on every rank, and the next manager works
    if rank == 1:
        _time.sleep(6.0)
    try:
        CheckpointManager(root, keep_last=None, rank_timeout=3.0).close()
        out["open"] = ""
    except CheckpointError as exc:
        out["open"] = str(exc)
    dist.barrier()
    with CheckpointManager(root, keep_last=None, rank_timeout=3.0) as mgr:
        out["reopened"] = _errors(lambda: mgr.save(4, state))
    # rank 0 slow to open the root (its lock, its sweep) past rank_timeout: it must let the root go
    from asyncckpt.engine import rank_plan

    opener = rank_plan.open_storage
    if rank == 0:
        rank_plan.open_storage = lambda *args, **kwargs: (_time.sleep(6.0), opener(*args, **kwargs))[1]
    try:
        CheckpointManager(root, keep_last=None, rank_timeout=3.0).close()
        out["slow_open"] = ""
    except CheckpointError as exc:
        out["slow_open"] = str(exc)
    finally:
        rank_plan.open_storage = opener
    dist.barrier()
    with CheckpointManager(root, keep_last=None, rank_timeout=3.0) as mgr:
        out["after_slow_open"] = _errors(lambda: mgr.save(5, state))
        out["steps"] = mgr.steps()
    return out


def test_a_rank_late_to_a_restore_or_an_open_fails_it_on_every_rank_and_the_next_saves_commit(waited):
    """Restore takes several collectives, and so does opening a manager. The rank that gave up on
    one skips those after it; the late rank's call completes the one given up on and must fail
    there too, not go on to collectives the other never makes (which paired them out of step: every
    later save failed until a restart). Rank 0, which holds the root's lock once it opened it, lets
    it go when opening fails."""
    tmp_path, got = _joined(waited, _late_to_restore)
    assert "did not answer within 3 s" in got[0]["restore"], got[0]["restore"]
    assert "rank 1 could not plan the restore together: a rank came to it more than 3 s" in got[1]["restore"]
    assert "did not answer within 3 s" in got[0]["open"], got[0]["open"]
    opening = "rank 1 could not open the checkpoint root together (every rank constructs the manager)"
    assert f"{opening}: a rank came to it more than 3 s" in got[1]["open"], got[1]["open"]
    assert "rank 0 could not open the checkpoint root together: a rank came to it more than 3 s" in got[0]["slow_open"]
    assert "did not answer within 3 s" in got[1]["slow_open"], got[1]["slow_open"]
    for rank in got:
        assert rank["saves"] == ["", ""] and rank["reopened"] == "" and rank["after_slow_open"] == ""
        assert rank["steps"] == [1, 2, 3, 4, 5]
    assert sorted(p.name for p in tmp_path.glob("step-*")) == [step_dir_name(s) for s in (1, 2, 3, 4, 5)]


def _all_at_once(base: Path, fns: list) -> dict:
    """Each job in ``fns`` on 2 ranks and a root of its own, all started at once: ``{job function:
    (root, each rank's return value, or the AssertionError its test raises)}``."""
    roots = {fn: base / fn.__name__ for fn in fns}
    jobs = {}
    try:
        for fn, root in roots.items():
            root.mkdir()
            jobs[fn] = start_ranks(fn, 2, str(root), timeout=180)
        results = {}
        for fn, job in jobs.items():
            try:
                results[fn] = (roots[fn], job.join())
            except AssertionError as exc:  # raised again by that job's test only
                results[fn] = (roots[fn], exc)
        return results
    finally:
        for job in jobs.values():
            job.close()


@pytest.fixture(scope="module")
def waited(tmp_path_factory):
    """The jobs above that mostly wait (out ``rank_timeout``, or a late rank's sleep) run at once:
    ``{job function: (root, each rank's return value)}`` through ``_joined``."""
    fns = [_slow_store_connection, _refused_policy_connection, _restore_with_a_bug_on_rank_1, _late_rank]
    fns += [_late_to_restore, _group_made_on_rank_0_only, _late_to_open]
    return _all_at_once(tmp_path_factory.mktemp("mr-wait"), fns)


@pytest.fixture(scope="module")
def worked(tmp_path_factory):
    """The jobs above that train and save rather than wait, at once, apart from ``waited``'s: their
    work must not make a rank there late by seconds."""
    fns = [_roots_not_shared, _batchnorm_buffers, _rollback_with_a_rank0_policy]
    return _all_at_once(tmp_path_factory.mktemp("mr-work"), fns)


def _joined(results: dict, fn) -> tuple[Path, list]:
    root, values = results[fn]
    if isinstance(values, AssertionError):
        raise values
    return root, values


# ---- rank 0 leaving first ----------------------------------------------------------------------


def _leave_first(rank: int, world_size: int, root: str, last: str) -> dict:
    """Rank 0 hosts the job's store and leaves as soon as its manager is closed; rank 1 is slow to
    its last store calls of the job's last ``save`` or ``restore``."""
    import warnings

    from _dist_models import make_ddp
    from asyncckpt import CheckpointManager
    from asyncckpt.engine.ranks import RankGroup

    model, optim = make_ddp(seed=0)
    state = {"model": model, "optim": optim}
    out: dict = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if last == "restore":
            with CheckpointManager(root, keep_last=None, rank_timeout=RANK_TIMEOUT) as mgr:
                mgr.save(1, state)
        timeout = 2.0 if last == "too late" else RANK_TIMEOUT
        if rank == 1 and last == "too late":  # later than rank 0 waits for it
            slowed(RankGroup, ["heard_settled"], 3.0)
        elif rank == 1:
            slowed(RankGroup, ["decide", "outcome", "heard_settled"], 0.5)
        if rank == 0 and last == "failed":  # rank 0's part of the save fails: the others must hear why
            from asyncckpt.storage.local import LocalBackend

            def on_fire(self, name, size_hint=None):
                raise OSError(28, "disk on fire")

            LocalBackend.open_write = on_fire
        with CheckpointManager(root, keep_last=None, rank_timeout=timeout) as mgr:
            if last in ("save", "too late"):
                mgr.save(1, state)
            elif last == "failed":
                out["error"] = _errors(lambda: mgr.save(1, state))
            else:
                out["restored"] = mgr.restore(state)
        # nothing of the job's after the close: rank 0 leaves at once (a collective would hold it)
    out["warnings"] = [str(w.message) for w in caught]
    return out


@pytest.mark.parametrize("last", ["save", "restore", "too late", "failed"])
def test_rank_0_leaving_first_fails_no_other_rank(tmp_path, last):
    root = tmp_path / "root"
    results = run_ranks(_leave_first, 2, str(root), last, timeout=120)
    if last == "too late":  # rank 0 waited its rank_timeout, then said so and left
        assert results[0]["warnings"] == [
            "asyncckpt: rank 0 goes on without word that 1 other rank(s) heard how the last save went (none "
            "within 2 s); if its process hosts the job's store and ends now, that may fail them"
        ]
        assert (
            len(results[1]["warnings"]) == 1
            and "rank 0 did not say its retention was done (the job's store stopped answering"
            in results[1]["warnings"][0]
        )
        return
    for rank in range(2):
        assert results[rank]["warnings"] == [], (rank, results[rank]["warnings"])
        if last == "restore":
            assert results[rank]["restored"] == 1
    if last == "failed":  # rank 1 got the reason, not a store gone
        assert "step 1 was not committed: rank 0 failed" in results[1]["error"], results[1]["error"]
        assert "disk on fire" in results[1]["error"] and "disk on fire" in results[0]["error"], results
        assert not any(p.name.startswith("step-") for p in root.iterdir())
        return
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("step-")) == [step_dir_name(1)]
    assert load(root)  # the step both ranks saved, whole
