"""CUDA paths end to end (skipped without a GPU; `bench/gpu_check.sh` runs them on one).

- the copy stream is ordered after work still *queued* on the compute stream at save() (no
  torch.cuda.synchronize() before save, GPU kept busy with torch.cuda._sleep), blocking and overlap;
- dtypes / non-contiguous / strided CUDA tensors land bit-exact in the pinned arena;
- eager (unowned) tensors changed right after save() keep their saved value (compute waits eager_done);
- foreach AdamW (the CUDA default) and GradScaler("cuda") + fp16 autocast in overlap mode;
- the compute stream's wait at the overlap fence, timed on the device with CUDA events;
- restore into a live CUDA model + optimizer (tensors keep their device);
- the asyncio façade saving while training runs on a side stream;
- the staging arena is page-locked at exactly its size, outside PyTorch's power-of-two pinned cache.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

import asyncckpt
from _overlap_state import plain, to_cpu
from _trees import assert_same_tree
from asyncckpt import AsyncCheckpointManager, CheckpointManager

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

BUSY = 200_000_000  # torch.cuda._sleep cycles: ~0.1 s of queued GPU work on an H100


@pytest.mark.parametrize("snapshot", ["blocking", "overlap"])
def test_copy_sees_queued_work_and_odd_layouts(tmp_path, snapshot):
    g = torch.Generator(device="cuda").manual_seed(0)
    big = torch.zeros(32 << 20, device="cuda")  # 128 MB, no optimizer: copied eagerly in overlap mode
    state = {
        "big": big,
        "bf16_t": torch.randn(512, 384, device="cuda", generator=g).to(torch.bfloat16).t(),
        "i64_strided": torch.arange(3000, device="cuda")[::3],
        "bool": torch.rand(777, device="cuda", generator=g) > 0.5,
        "c64": torch.randn(100, dtype=torch.complex64, device="cuda", generator=g),
        "f16_expanded": torch.randn(1, 64, device="cuda", generator=g).half().expand(32, 64),
    }
    torch.cuda.synchronize()
    expected = {k: v.cpu().clone() for k, v in state.items()}
    expected["big"] = torch.full((32 << 20,), 3.0)
    with CheckpointManager(tmp_path, snapshot=snapshot, compression=None) as mgr:
        mgr.prepare(state).result()  # pin the arena now: no cudaHostAlloc inside the timed window
        torch.cuda._sleep(BUSY)  # the compute stream is busy ...
        big.fill_(3.0)  # ... so this is still queued when save() starts copying
        mgr.save(1, state)
        big.fill_(4.0)  # right after save returns, no sync: must not reach the checkpoint
        mgr.wait()
    assert_same_tree(expected, asyncckpt.load(tmp_path))


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(2048, 2048), torch.nn.BatchNorm1d(2048), torch.nn.ReLU(), torch.nn.Linear(2048, 2048)
    ).cuda()


def test_overlap_foreach_adamw_step_queued_at_save(tmp_path):
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=True)

    def step() -> None:  # no host sync anywhere in here
        model(torch.randn(256, 2048, device="cuda")).square().mean().backward()
        opt.step()
        opt.zero_grad()

    step()
    state = {"model": model, "optimizer": opt}
    with CheckpointManager(tmp_path, snapshot="overlap") as mgr:
        mgr.prepare(state).result()
        torch.cuda._sleep(BUSY)
        step()  # queued behind the sleep when save() runs
        expected = plain(state)  # clones queued on the compute stream, after that step
        mgr.save(2, state)
        step()
        step()  # the first of these is fenced on the lazy copy
        mgr.wait()
        assert mgr.stats.records[0].ok
    assert_same_tree(to_cpu(expected), asyncckpt.load(tmp_path))


def test_overlap_grad_scaler_cuda_fp16(tmp_path):
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**12)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.float16):
            loss = model(torch.randn(256, 2048, device="cuda")).float().square().mean()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()

    step()
    step()
    state = {"model": model, "optimizer": opt, "scaler": scaler}
    with CheckpointManager(tmp_path, snapshot="overlap") as mgr:
        expected = plain(state)
        mgr.save(2, state)
        step()
        step()
        mgr.wait()
        assert mgr.stats.records[0].ok
    assert_same_tree(to_cpu(expected), asyncckpt.load(tmp_path))


@pytest.mark.parametrize("compression", ["zstd", None])
def test_restore_into_live_cuda_state(tmp_path, compression):
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)  # fused: 'step' lives on the GPU

    def step() -> None:
        model(torch.randn(64, 2048, device="cuda")).square().mean().backward()
        opt.step()
        opt.zero_grad()

    step()
    state = {"model": model, "optimizer": opt}
    with CheckpointManager(tmp_path, compression=compression) as mgr:
        torch.cuda.synchronize()
        expected = to_cpu(plain(state))
        mgr.save(1, state).wait()
        step()
        step()
        assert mgr.restore(state) == 1
    assert_same_tree(expected, to_cpu(plain(state)))
    assert all(p.is_cuda for p in model.parameters())
    assert all(v.is_cuda for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    step()  # and training goes on from the restored state


@pytest.mark.parametrize("snapshot", ["blocking", "overlap"])
def test_asyncio_save_while_training_runs_on_a_side_stream(tmp_path, snapshot):
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    side = torch.cuda.Stream()

    def step() -> None:
        model(torch.randn(256, 2048, device="cuda")).square().mean().backward()
        opt.step()
        opt.zero_grad()

    async def run() -> dict:
        state = {"model": model, "optimizer": opt}
        with torch.cuda.stream(side):
            step()
            async with await AsyncCheckpointManager.open(tmp_path, snapshot=snapshot) as mgr:
                await mgr.prepare(state)
                torch.cuda._sleep(BUSY)
                step()  # still queued on the side stream when the executor thread copies
                expected = plain(state)
                handle = await mgr.save(1, state)
                step()  # overlap: fenced on the copy through the caller's stream
                step()
                await handle
            return expected

    expected = asyncio.run(run())
    torch.cuda.synchronize()
    assert_same_tree(to_cpu(expected), asyncckpt.load(tmp_path))


def test_the_staging_arena_is_pinned_at_exactly_its_size(tmp_path):
    state = {"w": torch.randn(3_000_001, device="cuda")}  # 12 MB: no power of two
    before = torch.cuda.host_memory_stats().get("allocated_bytes.current", 0)
    with CheckpointManager(tmp_path) as mgr:
        nbytes = mgr.prepare(state).result()
        arena = mgr._admission.arenas._free[0]
        assert arena.buffer.is_pinned()
        assert arena.capacity == nbytes < 16 << 20
        # registered memory, not a block of PyTorch's pinned cache (which would round to 16 MiB)
        assert torch.cuda.host_memory_stats().get("allocated_bytes.current", 0) - before < 1 << 20
        mgr.save(1, state).wait()
    assert_same_tree({"w": state["w"].cpu()}, asyncckpt.load(tmp_path))


def test_the_compute_streams_wait_at_the_fence_is_timed_on_the_device(tmp_path):
    # 0.5 GB of parameters + Adam moments: the lazy copy takes milliseconds, and the optimizer step
    # right after save() reaches the fence on the compute stream while it still runs. The host does
    # not block there, so only CUDA events can see how long training's stream waited.
    model = torch.nn.Linear(8192, 8192, bias=False).cuda()  # 256 MB
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    model.weight.grad = torch.randn_like(model.weight)
    opt.step()  # Adam moments exist: 768 MB copied lazily
    state = {"model": model, "optimizer": opt}
    with CheckpointManager(tmp_path, snapshot="overlap") as mgr:
        mgr.prepare(state).result()
        torch.cuda.synchronize()
        expected = plain(state)
        torch.cuda.synchronize()
        mgr.save(1, state)
        opt.step()  # the fence: the compute stream waits for the copy
        mgr.wait()
        (record,) = mgr.stats.records
    assert record.ok
    # The stream began waiting after save() and stopped when the copy was done, which the writer
    # saw no earlier: the device's wait lies within the copy's span as the host measured it.
    assert 0 < record.fence_gpu_wait_s <= record.lazy_copy_s + 1e-3
    assert_same_tree(to_cpu(expected), asyncckpt.load(tmp_path))


def test_a_copy_that_ends_while_training_computes_costs_no_gpu_fence_wait(tmp_path):
    # The measured interval is the stream's wait, not the copy's duration: with ~0.1 s of work
    # queued on the compute stream after save(), the copy (~20 ms) is over before the stream reaches
    # the fence, so the events around the wait are microseconds apart.
    model = torch.nn.Linear(8192, 8192, bias=False).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    model.weight.grad = torch.randn_like(model.weight)
    opt.step()
    state = {"model": model, "optimizer": opt}
    with CheckpointManager(tmp_path, snapshot="overlap") as mgr:
        mgr.prepare(state).result()
        torch.cuda.synchronize()
        mgr.save(1, state)
        torch.cuda._sleep(BUSY)  # "forward and backward", queued after save()
        opt.step()
        mgr.wait()
        (record,) = mgr.stats.records
    assert record.ok and record.lazy_copy_s > 0
    # a wait that had nothing left to wait for (microseconds), not the copy's span (tens of ms)
    assert record.fence_gpu_wait_s < record.lazy_copy_s / 10
