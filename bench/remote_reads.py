"""What reading a multi-rank root on an object store costs when every request has a round trip.

A restore, and a writer opening a root (its catalog, on rank 0), read each checkpoint's manifest
and its N rank tables before they can plan; ``asyncckpt ls`` of a bucket reads every manifest.
On a local S3 server a GET answers in a millisecond or two, so this puts a proxy in front of it
that holds each request for --latency-ms before passing it on (the responses pass at once), as a
network to a region's endpoint would, and times, through it:

- ``read_manifest`` of the newest checkpoint with its rank tables (a restore's first reads);
- ``Catalog.infos()`` of the whole root, rank tables checked (what rank 0 reads at open);
- the root's listing alone (``published_checkpoints``), for reference;
- ``asyncckpt.load`` of the root in one process: the newest checkpoint, every rank's pieces.

The root: --steps checkpoints of --ranks spawned gloo ranks (a small replicated state), saved
straight to the bucket (not through the proxy), as a job on an object store writes them.
Medians of --repeats. ``bench/versions.py remote_reads`` runs it under two checkouts.

    python bench/remote_reads.py --ranks 8 --steps 4 --latency-ms 20
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import _s3server  # noqa: E402
from _common import machine, spawn_ranks, write_json  # noqa: E402


class DelayProxy:
    """A TCP proxy on 127.0.0.1 that holds each piece a client sends for ``delay`` seconds before
    passing it to ``target``; what the server sends back passes at once."""

    def __init__(self, target: tuple[str, int], delay: float) -> None:
        self.target, self.delay = target, delay
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.port = 0

        async def serve() -> None:
            server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
            self.port = server.sockets[0].getsockname()[1]
            ready.set()
            async with server:
                await server.serve_forever()

        self.thread = threading.Thread(target=lambda: self.loop.run_until_complete(serve()), daemon=True)
        self.thread.start()
        ready.wait(10)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, delay: float) -> None:
            try:
                while data := await src.read(1 << 16):
                    if delay:
                        await asyncio.sleep(delay)
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pump(reader, up_writer, self.delay), pump(up_reader, writer, 0.0))


def _save_rank(rank: int, world: int, cfg: dict) -> None:
    import torch
    import torch.distributed as dist

    import asyncckpt

    os.environ.update(cfg["env"])
    dist.init_process_group("gloo", init_method=f"file://{cfg['store']}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = {f"layer{i}": torch.randn(64, 64) for i in range(16)}
    with asyncckpt.CheckpointManager(cfg["root"], keep_last=None, replicated=("model",)) as mgr:
        for step in range(1, cfg["steps"] + 1):
            mgr.save(step, {"model": model, "own": torch.full((4,), float(rank))}).wait()
    dist.barrier()
    dist.destroy_process_group()


def _objects(server: _s3server.S3Server, prefix: str) -> int:
    import obstore

    return sum(len(page) for page in obstore.list(server.store("ckpt"), prefix + "/"))


def _timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--latency-ms", type=float, default=20.0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        server = _s3server.start(Path(tmp) / "s3")
        try:
            cfg = {"root": "s3://ckpt/bench", "store": f"{tmp}/store", "steps": args.steps, "env": server.env}
            spawn_ranks(_save_rank, args.ranks, cfg)
            objects = _objects(server, "bench")
            host, port = server.endpoint.removeprefix("http://").rsplit(":", 1)
            proxy = DelayProxy((host, int(port)), args.latency_ms / 1e3)
            os.environ.update(server.env)
            os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{proxy.port}"
            from asyncckpt.engine.reader import read_manifest
            from asyncckpt.storage.backend import CheckpointRef, open_backend
            from asyncckpt.storage.catalog import Catalog
            from asyncckpt.storage.commit import published_checkpoints

            backend = open_backend("s3://ckpt/bench")
            newest = f"step-{args.steps:012d}"
            manifest = next(f"{newest}/{e.name}" for e in backend.list(newest) if e.name.startswith("manifest"))
            one_get = _timed(lambda: backend.read_small(manifest, 1 << 20), args.repeats)
            listing = _timed(lambda: published_checkpoints(backend), args.repeats)
            tables = _timed(lambda: read_manifest(CheckpointRef(backend, newest)), args.repeats)
            listed = published_checkpoints(backend)
            catalog = _timed(lambda: Catalog(lambda: listed).infos(), args.repeats)
            import asyncckpt

            load = _timed(lambda: asyncckpt.load("s3://ckpt/bench", per_rank="rank0"), args.repeats)
            assert len(listed) == args.steps
        finally:
            server.stop()
    payload = {
        "machine": machine(),
        "ranks": args.ranks,
        "steps": args.steps,
        "objects": objects,
        "latency_ms": args.latency_ms,
        "one_get_s": one_get,
        "listing_s": listing,
        "read_manifest_s": tables,
        "catalog_s": catalog,
        "load_s": load,
    }
    print(
        f"{args.ranks} ranks, {args.steps} checkpoints, {args.latency_ms:g} ms added per request: "
        f"one GET {one_get * 1e3:.1f} ms, listing {listing * 1e3:.1f} ms, "
        f"manifest + {args.ranks} tables {tables * 1e3:.1f} ms, catalog of {args.steps} {catalog * 1e3:.1f} ms, "
        f"load {load * 1e3:.1f} ms"
    )
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
