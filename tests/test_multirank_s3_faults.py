"""Failures of multi-rank saves on an object-store root (the real S3 server, 2 spawned gloo ranks).

The commit there is manifest-last: every rank puts ``data-RRRRR-<attempt>.bin`` and
``rank-RRRRR-<attempt>.json`` straight into ``step-N/``; rank 0 checks its lease and puts
``manifest-<gen>.json`` last. Killed: rank 1 while writing its data and before voting, rank 0 after
every vote, before its manifest put (and rank 0 that lost its lease there publishes nothing).
The survivor fails within ``rank_timeout`` naming the dead rank; a reader loading the root
meanwhile never gets step 2; a new job (once the dead writer's lease ran out) restores step 1
bit-exact and its sweep leaves no object of the dead attempt. A rank whose
store requests fail fails the save on every rank, nothing is published, and the next save works.
The three killed jobs run side by side: one spawn's wait, one lease expiry.
"""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch

from _dist import RankOutcome, die_at_phase, run_ranks, start_ranks
from _s3bucket import get_object, objects
from asyncckpt import load
from asyncckpt.errors import CheckpointNotFoundError
from asyncckpt.format import parse_manifest, step_dir_name
from asyncckpt.storage.objectstore import LEASE_NAME
from conftest import fresh_s3_url

RANK_TIMEOUT = 10.0
LEASE_SECONDS = 4.0
OPTIONS = {"lease_seconds": LEASE_SECONDS}
# (victim, the phase it dies in): rank 0's "manifest" is the one after its vote (the publish's,
# before the lease check and the manifest put), not the one before its own rank table
KILLS = [(1, "write"), (1, "vote"), (0, "manifest")]


def _errors(save) -> str:
    """The failure ``save().wait()`` raises, as text with its cause; "" when it committed."""
    from asyncckpt.errors import CheckpointError

    try:
        save().wait()
    except CheckpointError as exc:
        return f"{type(exc).__name__}: {exc} <- {exc.__cause__!r}"
    return ""


def _manager(url: str):
    from asyncckpt import CheckpointManager

    return CheckpointManager(url, keep_last=None, rank_timeout=RANK_TIMEOUT, storage_options=OPTIONS)


# ---- ranks that die ------------------------------------------------------------------------------


def _dying_rank(rank: int, world_size: int, url: str, victim: int, phase: str) -> dict:
    from _dist_models import full_state, make_ddp, train_steps

    model, optim = make_ddp(seed=0)
    state = {"model": model, "optim": optim, "step": 1}
    mgr = _manager(url)
    train_steps(model, optim, 1, 1, rank)
    mgr.save(1, state).wait()
    full = full_state(model, optim)
    train_steps(model, optim, 2, 1, rank)
    state["step"] = 2
    if rank == victim:
        # rank 0 passes a "manifest" mark before its own rank table too: die at the one after the vote
        die_at_phase(phase, after="vote" if phase == "manifest" else None)
    began = time.monotonic()
    error = _errors(lambda: mgr.save(2, state))
    return {"error": error, "took": time.monotonic() - began, "full1": full}


def _watch(url: str, stop: threading.Event, seen: dict, bad: list) -> None:
    """Load the root's newest checkpoint over and over: only a complete step, or none."""
    while not stop.is_set():
        try:
            tree = load(url, per_rank="rank0")
            seen[tree["step"]] = tree["model"]["layers.0.weight"]
        except CheckpointNotFoundError:
            seen.setdefault(None, None)
        except Exception as exc:  # noqa: BLE001
            bad.append(repr(exc))
        time.sleep(0.05)


def _watching(url: str) -> tuple[threading.Event, threading.Thread, dict, list]:
    stop, seen, bad = threading.Event(), {}, []
    watcher = threading.Thread(target=_watch, args=(url, stop, seen, bad), daemon=True)
    watcher.start()
    return stop, watcher, seen, bad


def _wait_out_the_lease(server, url: str) -> None:
    """Until the root's lease (if any) can be taken over: its expiry plus a quarter of its life."""
    try:
        record = json.loads(get_object(server, url, LEASE_NAME))
    except Exception:  # noqa: BLE001 - released: nothing to wait for
        return
    time.sleep(max(0.0, float(record["expires"]) + float(record["ttl"]) / 4 + 0.5 - time.time()))


def _named(server, url: str, step: int) -> set[str]:
    """The objects step ``step``'s newest manifest names: itself, every rank's table and data."""
    step_dir = step_dir_name(step)
    manifests = sorted(n for n in objects(server, url) if n.startswith(step_dir + "/manifest-"))
    manifest = parse_manifest(get_object(server, url, manifests[-1]), manifests[-1])
    return {manifests[-1]} | {f"{step_dir}/{name}" for name in manifest.data_files()}


def _attempt_objects(names, step: int) -> set[str]:
    return {n for n in names if n.startswith(step_dir_name(step) + "/") and "manifest-" not in n}


@pytest.fixture(scope="module")
def killed(s3_server):
    with pytest.MonkeyPatch.context() as mp:
        for key, value in s3_server.env.items():
            mp.setenv(key, value)
        runs: dict[tuple[int, str], dict] = {}
        jobs = []
        try:
            for victim, phase in KILLS:
                url = fresh_s3_url()
                watch = _watching(url)
                job = start_ranks(_dying_rank, 2, url, victim, phase, timeout=180, env=dict(s3_server.env))
                jobs.append(((victim, phase), url, watch, job))
            for key, url, (stop, watcher, seen, bad), job in jobs:
                outcomes = job.outcomes(grace=3 * RANK_TIMEOUT)
                stop.set()
                watcher.join(30)
                runs[key] = {"url": url, "outcomes": outcomes, "seen": seen, "bad": bad}
        finally:
            for *_, (stop, _, _, _), job in jobs:
                stop.set()
                job.close()
        for run in runs.values():
            run["before"] = objects(s3_server, run["url"])
        yield runs


@pytest.mark.parametrize(("victim", "phase"), KILLS)
def test_a_dead_rank_fails_the_survivor_in_time_and_readers_never_see_the_step(killed, victim, phase):
    run = killed[(victim, phase)]
    outcomes: list[RankOutcome] = run["outcomes"]
    assert outcomes[victim].status == "died", outcomes[victim].describe()
    survivor = outcomes[1 - victim]
    assert survivor.status == "ok", survivor.describe()
    assert f"rank {victim}" in survivor.value["error"], survivor.value["error"]
    assert survivor.value["took"] < RANK_TIMEOUT + 10, survivor.value["took"]
    assert not run["bad"], run["bad"][:3]
    assert set(run["seen"]) <= {None, 1}, sorted(map(str, run["seen"]))
    assert 1 in run["seen"]  # the watcher did read while the job ran
    want = survivor.value["full1"]["param.layers.0.weight"]
    assert torch.equal(run["seen"][1], want)
    # nothing of step 2 is published: no manifest object
    assert not [n for n in run["before"] if n.startswith(step_dir_name(2) + "/manifest-")]
    if victim == 1:  # rank 0 lived to abort the attempt: it removed every object of it it could list
        assert not _attempt_objects(run["before"], 2), sorted(run["before"])


def test_rank0_dead_before_its_manifest_put_left_every_rank_objects_of_the_attempt(killed):
    """What the restart's sweep must remove: both ranks' data and rank tables (complete objects)."""
    names = _attempt_objects(killed[(0, "manifest")]["before"], 2)
    assert sorted(n.split("/")[1][:10] for n in names) == ["data-00000", "data-00001", "rank-00000", "rank-00001"]


# ---- the restart, and a rank whose store requests fail -------------------------------------------------


def _restart(rank: int, world_size: int, urls: list[str], fault_url: str, lease_url: str) -> dict:
    from _dist_models import full_state, make_ddp, train_steps
    from asyncckpt.errors import StorageError
    from asyncckpt.storage.objectstore import ObjectStoreBackend

    out: dict = {"fulls": []}
    for url in urls:
        model, optim = make_ddp(seed=1)  # other weights: the restore must replace them all
        state = {"model": model, "optim": optim, "step": -1}
        mgr = _manager(url)
        assert mgr.restore(state) == 1 and state["step"] == 1
        out["fulls"].append(full_state(model, optim))
        mgr.close()

    # a rank whose object-store requests fail: step 3 on rank 1, step 4 on rank 0; step 5 commits
    model, optim = make_ddp(seed=0)
    state = {"model": model, "optim": optim, "step": 0}
    mgr = _manager(fault_url)
    real_open = ObjectStoreBackend.open_write

    def refused(self, name, size_hint=None):
        raise StorageError(f"cannot upload {name}: the store is on fire")

    for step, failing in ((3, 1), (4, 0)):
        train_steps(model, optim, step, 1, rank)
        state["step"] = step
        if rank == failing:
            ObjectStoreBackend.open_write = refused
        began = time.monotonic()
        out[f"error{step}"] = _errors(lambda step=step: mgr.save(step, state))
        out[f"took{step}"] = time.monotonic() - began
        ObjectStoreBackend.open_write = real_open
    train_steps(model, optim, 5, 1, rank)
    state["step"] = 5
    mgr.save(5, state).wait()
    out["full5"] = full_state(model, optim)
    out["steps"] = mgr.steps()
    mgr.close()

    # rank 0 lost its lease (deleted behind its back) after every vote: it must not publish
    from asyncckpt import _phases
    from asyncckpt.storage.backend import open_backend

    mgr = _manager(lease_url)
    state["step"] = 1
    mgr.save(1, state).wait()
    state["step"] = 2
    if rank == 0:
        real, seen = _phases.pause, set()

        def pause(name: str) -> None:
            seen.add(name)
            if name == "manifest" and "vote" in seen:
                open_backend(lease_url).delete(LEASE_NAME)
            real(name)

        _phases.pause = pause
    out["lease_error"] = _errors(lambda: mgr.save(2, state))
    if rank == 0:
        _phases.pause = real
    try:
        mgr.close()
    except Exception:  # noqa: BLE001, S110 - closing a root whose lease is lost may complain
        pass
    return out


@pytest.fixture(scope="module")
def restarted(killed, s3_server):
    urls = [killed[key]["url"] for key in KILLS]
    fault_url, lease_url = fresh_s3_url(), fresh_s3_url()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in s3_server.env.items():
            mp.setenv(key, value)
        for url in urls:
            _wait_out_the_lease(s3_server, url)
        stop, watcher, seen, bad = _watching(fault_url)
        try:
            for attempt in range(3):  # a loaded machine may reach a root before its dead writer's lease lapsed
                try:
                    results = run_ranks(_restart, 2, urls, fault_url, lease_url, timeout=240, env=dict(s3_server.env))
                    break
                except AssertionError as exc:
                    if "RootInUseError" not in str(exc) or attempt == 2:
                        raise
                    for url in urls:
                        _wait_out_the_lease(s3_server, url)
        finally:
            stop.set()
            watcher.join(30)
    return {"results": results, "fault_url": fault_url, "lease_url": lease_url, "seen": seen, "bad": bad}


@pytest.mark.parametrize(("victim", "phase"), KILLS)
def test_after_a_restart_step1_restores_bit_exact_and_the_dead_attempt_is_swept(
    killed, restarted, s3_server, victim, phase
):
    i = KILLS.index((victim, phase))
    run = killed[(victim, phase)]
    want = run["outcomes"][1 - victim].value["full1"]
    for rank in range(2):
        got = restarted["results"][rank]["fulls"][i]
        assert set(got) == set(want)
        for name in want:
            assert torch.equal(got[name], want[name]), (rank, name)
    after = objects(s3_server, run["url"])
    assert not _attempt_objects(after, 2), sorted(after)  # nothing of the dead attempt
    assert not [n for n in after if n.startswith(step_dir_name(2) + "/")], sorted(after)
    step1 = {n for n in after if n.startswith(step_dir_name(1) + "/")}
    assert step1 == _named(s3_server, run["url"], 1)
    assert len(step1) == 5  # the manifest, two rank tables, two data objects


def test_a_rank_whose_store_requests_fail_fails_the_save_everywhere_and_the_next_save_works(
    restarted, s3_server, s3_env
):
    results = restarted["results"]
    for rank, out in enumerate(results):
        for step, failing in ((3, 1), (4, 0)):
            error = out[f"error{step}"]
            assert "the store is on fire" in error, (rank, step, error)
            assert rank == failing or f"rank {failing}" in error, (rank, step, error)
            assert out[f"took{step}"] < RANK_TIMEOUT + 5, (rank, step, out[f"took{step}"])
        assert out["steps"] == [5]
    url = restarted["fault_url"]
    stored = objects(s3_server, url)
    assert sorted({n.split("/")[0] for n in stored if "/" in n}) == [step_dir_name(5)], sorted(stored)
    assert {n for n in stored if "/" in n} == _named(s3_server, url, 5)
    assert not restarted["bad"], restarted["bad"][:3]
    assert set(restarted["seen"]) <= {None, 5}
    loaded = load(url, per_rank="rank0")
    assert loaded["step"] == 5
    assert torch.equal(loaded["model"]["layers.0.weight"], results[0]["full5"]["param.layers.0.weight"])


def test_rank0_that_lost_its_lease_publishes_nothing_and_every_rank_fails(restarted, s3_server, s3_env):
    for rank, out in enumerate(restarted["results"]):
        error = out["lease_error"]
        assert error and "lease" in error, (rank, error)
        assert rank == 0 or "rank 0" in error, (rank, error)
    stored = objects(s3_server, restarted["lease_url"])
    assert not [n for n in stored if n.startswith(step_dir_name(2) + "/")], sorted(stored)
    assert load(restarted["lease_url"], per_rank="rank0")["step"] == 1
