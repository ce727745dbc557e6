"""bench/multirank.py runs every saver once, and once in a training loop, on a tiny state at 2 ranks
(so the script cannot rot), and a second CheckpointManager of the same ranks in one job does not
hang (found by that script)."""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import pytest

from _dist import rank_context

pytest.importorskip("torch.distributed")

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import multirank  # noqa: E402


@pytest.mark.bench
def test_every_saver_once_at_two_ranks(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    payload = multirank.main(
        ["--size", "1", "--rounds", "1", "--restore-repeats", "1", "--worlds", "2", "--modes", "fsdp2"]
        + ["--loop-saves", "1", "--loop-every", "2", "--timeout", "240", "--json", str(out)]
    )
    run = payload["runs"]["fsdp2 x2"]
    assert set(run["savers"]) == set(multirank.SAVERS)
    for name, s in run["savers"].items():
        assert s["durable_s"] >= s["stall_max_s"] > 0, name
        assert s["rank_bytes_max"] > 0, name
        assert name == "floor" or s["disk_bytes"] > 0, name
        assert isinstance(s["loop_overhead_s"], float), name  # may be < 0: noise around a small cost
    assert run["loop_step_s"] > 0
    assert set(run["restore_s"]) == {"nn:asyncckpt", "nn:dcp"}
    assert run["to_one"]["asyncckpt"]["s"] > 0 and run["to_one"]["dcp"]["s"] > 0
    saved = json.loads(out.read_text())
    text = multirank.tables(saved)
    assert "| fsdp2 x2 | asyncckpt-overlap |" in text and "loop overhead per save (ms)" in text


def test_reshard_boxes_cover_each_tensor() -> None:
    for shape in [(33, 8), (3,), (1, 3), ()]:
        for world in (1, 2, 4):
            boxes = multirank._rows_boxes(shape, world)
            assert len(boxes) == world
            if shape:
                assert sum(s[0] for _, s in boxes) == shape[0]


def _managers_in_turn(rank: int, world: int, store: str, root: str, out: str) -> None:
    import torch
    import torch.distributed as dist

    import asyncckpt

    try:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
        state = {"w": torch.full((8,), float(rank))}
        first = asyncckpt.CheckpointManager(Path(root) / "a", keep_last=2)
        second = asyncckpt.CheckpointManager(Path(root) / "b", keep_last=2)  # both open at once
        first.save(1, state).wait()
        second.save(1, state).wait()
        first.close()
        second.close()
        third = asyncckpt.CheckpointManager(Path(root) / "a", keep_last=2)  # after the others closed
        third.save(2, state).wait()
        assert third.restore(state) == 2
        third.close()
        dist.destroy_process_group()
        Path(out, f"ok-{rank}").write_text("ok")
    except BaseException as e:  # noqa: BLE001  # the parent reads the file
        Path(out, f"error-{rank}").write_text(repr(e))


def test_managers_of_the_same_ranks_one_after_another(tmp_path: Path) -> None:
    """Each manager's gloo group once had the name every group of the same ranks gets (a hash of
    them): the second one's rendezvous met the first one's keys in the store and hung at 4 ranks."""
    world = 4
    store = Path(tempfile.mkdtemp(dir=tmp_path)) / "store"
    ctx = rank_context()
    procs = [
        ctx.Process(target=_managers_in_turn, args=(r, world, str(store), str(tmp_path), str(tmp_path)))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 120
    for p in procs:
        p.join(max(0.1, deadline - time.monotonic()))
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
        p.join()
    errors = [f.read_text() for f in tmp_path.glob("error-*")]
    assert not hung, f"{len(hung)} ranks hung"
    assert not errors, errors
    assert len(list(tmp_path.glob("ok-*"))) == world
