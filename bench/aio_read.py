"""Reading + verifying a checkpoint from asyncio: the executor path vs aiofiles.

A: what AsyncCheckpointManager.restore does: ``read_checkpoint`` (pread of each chunk, zstd
   decode, CRC check, on a thread pool) run via ``loop.run_in_executor``.
B: aiofiles reads the whole data file into memory, then the chunks are decoded and verified on
   the event loop (the naive "async file I/O" version).
C: aiofiles read as in B, then the decode handed to the executor as in A (aiofiles plus the
   executor anyway).

For each: wall time (median of --repeats) and how the event loop fared meanwhile (1 ms ticks of a
concurrent task, and the longest gap between two). Warm page cache (the file was just written).

    python bench/aio_read.py            # ~0.2 GB model + AdamW state
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import aiofiles
import torch

sys.path.insert(0, str(Path(__file__).parent))
import asyncckpt  # noqa: E402
from _common import median, state_bytes, trained_state  # noqa: E402
from asyncckpt import codec  # noqa: E402
from asyncckpt.engine.reader import read_checkpoint, read_manifest  # noqa: E402


async def ticking(coro_fn) -> tuple[float, int, float]:
    """Run ``coro_fn()`` while a task ticks every 1 ms; (seconds, ticks, longest gap)."""
    ticks, gap, last = 0, 0.0, time.perf_counter()

    async def tick() -> None:
        nonlocal ticks, gap, last
        while True:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            ticks, gap = ticks + 1, max(gap, now - last)
            last = now

    task = asyncio.create_task(tick())
    await asyncio.sleep(0)
    last = began = time.perf_counter()
    await coro_fn()
    elapsed = time.perf_counter() - began
    gap = max(gap, time.perf_counter() - last)  # a stall at the very end is seen by no tick
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    return elapsed, ticks, gap


def decode_all(manifest, data: bytes, workers: int | None) -> torch.Tensor:
    """Decode and CRC-check every chunk of ``data`` into one raw buffer (serially or on a pool)."""
    out = torch.empty(manifest.raw_bytes, dtype=torch.uint8)
    view = memoryview(data)

    def one(index: int) -> None:
        c = manifest.chunks[index]
        target = out[c.raw_offset : c.raw_offset + c.raw_length]
        codec.decode(view[c.offset : c.offset + c.length], c.codecs, c.crc32, target, f"chunk {index}")

    if workers is None:
        for i in range(len(manifest.chunks)):
            one(i)
    else:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(one, range(len(manifest.chunks))))
    return out


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    workers = max(1, min(8, os.cpu_count() or 1))
    model, opt = trained_state(args.width, args.depth, "cpu")
    nbytes = state_bytes(model, opt)
    root = Path(tempfile.mkdtemp(prefix="asyncckpt-aio-read-"))
    with asyncckpt.CheckpointManager(root) as mgr:
        path = mgr.save(1, {"model": model, "optimizer": opt}).wait()
    manifest = read_manifest(path)
    data_file = path / manifest.chunks[0].file
    assert all(c.file == data_file.name for c in manifest.chunks)
    loop = asyncio.get_running_loop()

    async def executor_path() -> None:
        await loop.run_in_executor(None, read_checkpoint, path, workers)

    async def aiofiles_read() -> bytes:
        async with aiofiles.open(data_file, "rb") as f:
            return await f.read()

    async def aiofiles_then_decode_on_loop() -> None:
        decode_all(manifest, await aiofiles_read(), None)

    async def aiofiles_then_decode_in_executor() -> None:
        data = await aiofiles_read()
        await loop.run_in_executor(None, decode_all, manifest, data, workers)

    cases = {
        "A executor (read_checkpoint)": executor_path,
        "B aiofiles read + decode on loop": aiofiles_then_decode_on_loop,
        "C aiofiles read + decode in executor": aiofiles_then_decode_in_executor,
    }
    print(
        f"state {nbytes / 1e9:.3f} GB raw, {manifest.stored_bytes / 1e9:.3f} GB stored "
        f"({len(manifest.chunks)} chunks), {workers} decode threads, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, warm page cache, median of {args.repeats}"
    )
    for name, fn in cases.items():
        await fn()  # warm-up
        runs = [await ticking(fn) for _ in range(args.repeats)]
        secs = median([r[0] for r in runs])
        ticks = median([r[1] for r in runs])
        gap = median([r[2] for r in runs])
        print(
            f"{name:38s} {secs * 1e3:8.1f} ms  {nbytes / secs / 1e9:5.2f} GB/s  "
            f"loop ticks {ticks:6.0f}  longest loop stall {gap * 1e3:7.1f} ms"
        )


if __name__ == "__main__":
    asyncio.run(main())
