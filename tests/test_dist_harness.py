"""The gloo-ranks harness (``_dist``), the crash tests' ``kill_when`` (``_kill``) and the FSDP2 / HSDP /
DDP fixtures (``_dist_models``) themselves."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

import _dist_models as M
from _dist import run_ranks, start_ranks
from _kill import kill_when

# -- rank functions (module level: the spawned ranks import them by name) --------------------------


def _whoami(rank: int, world_size: int, tag: str) -> dict:
    return {
        "rank": rank,
        "world_size": world_size,
        "tag": tag,
        "dist": (dist.get_rank(), dist.get_world_size(), dist.get_backend()),
        "env": [os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")],
        "threads": torch.get_num_threads(),
        "extra": os.environ.get("DIST_TEST_EXTRA"),
        "later": os.environ.get("DIST_TEST_LATER"),
        "tensor": torch.arange(3) * rank,
    }


def _raise_on_one(rank: int, world_size: int) -> int:
    if rank == 1:
        raise ValueError("rank one says no")
    return rank


def _hang_on_one(rank: int, world_size: int, marker: str) -> int:
    if rank == 1:
        open(marker, "w").close()
        time.sleep(3600)
    return rank


def _sleep_after_marker(rank: int, world_size: int, marker: str) -> None:
    if rank == 1:
        open(marker, "w").close()
    time.sleep(3600)


def _barrier_after_marker(rank: int, world_size: int, marker: str) -> None:
    if rank == 1:
        open(marker, "w").close()
        time.sleep(3600)
    dist.barrier()


def _train(rank: int, world_size: int, kinds: tuple[str, ...], steps: int) -> dict:
    """For each fixture kind: its full state at the start and after ``steps`` steps, and the losses."""
    out = {}
    for kind in kinds:
        model, optim = {"ddp": M.make_ddp, "fsdp2": M.make_fsdp2, "hsdp": M.make_hsdp}[kind](7)
        start = M.full_state(model, optim)
        losses = M.train_steps(model, optim, 0, steps, rank)
        out[kind] = (start, M.full_state(model, optim), losses)
    return out


# -- the harness --------------------------------------------------------------------------------


def test_results_come_back_in_rank_order_with_the_rank_environment(monkeypatch):
    run_ranks(_whoami, 2, "t")  # the fork server is running before the variable is set
    monkeypatch.setenv("DIST_TEST_LATER", "y")
    got = run_ranks(_whoami, 2, "t", env={"DIST_TEST_EXTRA": "x"})
    for rank, r in enumerate(got):
        assert (r["rank"], r["world_size"], r["tag"], r["dist"]) == (rank, 2, "t", (rank, 2, "gloo"))
        assert r["env"] == [str(rank), "2", str(rank), "127.0.0.1"]
        assert r["threads"] == 1 and r["extra"] == "x" and r["later"] == "y"
        assert torch.equal(r["tensor"], torch.arange(3) * rank)


def test_a_rank_that_raises_fails_the_run_with_its_traceback():
    with pytest.raises(AssertionError) as info:
        run_ranks(_raise_on_one, 2)
    text = str(info.value)
    assert "1 of 2 ranks failed" in text and "rank 1 raised" in text
    assert "ValueError: rank one says no" in text and "in _raise_on_one" in text
    assert "rank 0" not in text


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_a_hung_rank_is_named_with_its_stack_and_every_child_is_reaped(tmp_path):
    marker = str(tmp_path / "reached")
    job = start_ranks(_hang_on_one, 2, marker, timeout=60)
    pids = [p.pid for p in job.procs]
    job.wait_until(lambda: os.path.exists(marker), "rank 1's marker")  # spawning takes 3-25 s here
    with pytest.raises(AssertionError) as info:
        job.join(timeout=3)
    text = str(info.value)
    assert "1 of 2 ranks failed" in text and "rank 1 hung" in text
    assert "in _hang_on_one" in text  # faulthandler's dump of the hung rank
    assert all(_gone(pid) for pid in pids)


def test_a_rank_exits_by_itself_once_its_parent_is_gone(tmp_path):
    """A rank's parent is the fork server, which outlives a killed test process: the rank watches
    the test process's end of a pipe instead, which closes when that process dies."""
    marker = str(tmp_path / "reached")
    with start_ranks(_sleep_after_marker, 2, marker, timeout=60) as job:
        job.wait_until(lambda: os.path.exists(marker), "rank 1's marker")
        for lifeline in job._lifelines:  # what the kernel does to them when the test process dies
            lifeline.close()
        for proc in job.procs:
            proc.join(30)
        assert [p.exitcode for p in job.procs] == [70, 70]


def test_a_rank_killed_mid_way_is_reported_dead(tmp_path):
    marker = str(tmp_path / "reached")
    with start_ranks(_barrier_after_marker, 2, marker, timeout=60) as job:
        job.wait_until(lambda: os.path.exists(marker), "rank 1's marker")
        job.kill(1)
        outcomes = job.outcomes()
    assert (outcomes[1].status, outcomes[1].exitcode) == ("died", -9)
    assert outcomes[0].status == "raised", outcomes[0].describe()  # its barrier lost its peer
    assert all(_gone(p.pid) for p in job.procs)


def test_kill_when_runs_the_code_with_its_arguments_and_environment_and_kills_it_at_the_point(tmp_path, monkeypatch):
    monkeypatch.setenv("KILL_TEST_LATER", "y")
    code = "import os, sys, time\nseen = os.environ['KILL_TEST'] + os.environ['KILL_TEST_LATER']"
    code += "\nopen(sys.argv[1] + '.tmp', 'w').write(seen)"
    code += "\nos.rename(sys.argv[1] + '.tmp', sys.argv[1])"  # the mark appears whole
    mark = tmp_path / "mark"
    late = "\ntime.sleep(5)\nopen(sys.argv[1] + '.late', 'w').close()"
    kill_when([code + late, str(mark)], mark.exists, "the mark", {"KILL_TEST": "x"})
    assert mark.read_text() == "xy"
    assert not (tmp_path / "mark.late").exists()  # killed (and reaped) at the mark, not 5 s later


def test_kill_when_fails_the_test_with_the_output_of_a_child_that_exits_first(tmp_path):
    code = "import sys\nprint('about to fail', flush=True)\nsys.exit(3)"
    with pytest.raises(pytest.fail.Exception, match=r"(?s)the saver exited \(3\) before the mark: about to fail"):
        kill_when([code], lambda: False, "the mark")


# -- the fixtures ---------------------------------------------------------------------------------


def _assert_same(a: dict, b: dict, exact: bool = True) -> None:
    assert not M.state_diff(a, b, exact), M.state_diff(a, b, exact)


def _one_rank_start() -> dict:
    """What one rank starts from at world size 1: an unwrapped Net (no process group needed)."""
    torch.manual_seed(7)
    net = M.Net()
    params = {f"param.{n}": p.detach() for n, p in net.named_parameters()}
    return params | {f"buffer.{n}": b for n, b in net.named_buffers()}


def test_fsdp2_and_ddp_start_equal_and_train_bit_exactly_alike_at_two_ranks():
    ranks = run_ranks(_train, 2, ("ddp", "fsdp2"), 2)
    for got in ranks:  # every rank sees the same full state
        _assert_same(got["ddp"][1], ranks[0]["ddp"][1])
        _assert_same(got["fsdp2"][1], ranks[0]["fsdp2"][1])
    ddp_start, ddp_end, ddp_losses = ranks[0]["ddp"]
    fsdp_start, fsdp_end, fsdp_losses = ranks[0]["fsdp2"]
    assert not any(k.startswith(("exp_avg", "step")) for k in ddp_start)  # AdamW state appears at step 1
    _assert_same(ddp_start, fsdp_start)
    _assert_same(ddp_end, fsdp_end)
    assert ddp_losses == fsdp_losses and ddp_losses[1] < ddp_losses[0]
    assert {k for k in ddp_end if k.startswith("step.")} and all(
        ddp_end[k].item() == 2 for k in ddp_end if k.startswith("step.")
    )
    _assert_same(ddp_start, _one_rank_start())


@pytest.mark.slow  # four spawned ranks on two cores: 8-40 s
def test_at_four_ranks_fsdp2_hsdp_and_ddp_start_equal_and_train_alike():
    ranks = run_ranks(_train, 4, ("ddp", "fsdp2", "hsdp"), 2)
    got = ranks[0]
    for other in ranks[1:]:
        _assert_same(other["fsdp2"][1], got["fsdp2"][1])
        _assert_same(other["hsdp"][1], got["hsdp"][1])
    _assert_same(got["ddp"][0], _one_rank_start())
    _assert_same(got["ddp"][0], got["fsdp2"][0])
    _assert_same(got["ddp"][0], got["hsdp"][0])
    # 4-way sums are rounded in a different order by DDP's all-reduce and FSDP2's reduce-scatter
    _assert_same(got["ddp"][1], got["fsdp2"][1], exact=False)
    _assert_same(got["ddp"][1], got["hsdp"][1], exact=False)
    # the global batch is split over the ranks, so two ranks follow the same trajectory as four
    two = run_ranks(_train, 2, ("fsdp2",), 2)[0]["fsdp2"]
    _assert_same(two[0], got["fsdp2"][0])
    _assert_same(two[1], got["fsdp2"][1], exact=False)
    assert two[2] == pytest.approx(got["fsdp2"][2], rel=1e-6)
