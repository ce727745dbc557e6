"""Which S3 client the object-store backend is built on: obstore against fsspec/s3fs, on the same
local S3 server (SeaweedFS ``weed mini`` on 127.0.0.1), interleaved, several repeats, medians.

Measured per client: one large ``put`` of the payload, a multipart upload fed in 8 MiB pieces
(as a checkpoint's writer streams it), the parallel ranged read of the whole object in 8 MiB
ranges, and the latency of a small put+get (a manifest).

    python bench/object_clients.py --mib 256 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import _s3server  # noqa: E402

PIECE = 8 << 20


def _obstore_ops(server: _s3server.S3Server, bucket: str):
    import obstore

    store = server.store(bucket)

    def put(name: str, data: bytes) -> None:
        obstore.put(store, name, data)

    def multipart(name: str, data: memoryview) -> None:
        with obstore.open_writer(store, name, buffer_size=PIECE, max_concurrency=8) as w:
            for i in range(0, len(data), PIECE):
                w.write(data[i : i + PIECE])

    def ranged(name: str, size: int) -> int:
        starts = list(range(0, size, PIECE))
        ends = [min(s + PIECE, size) for s in starts]
        got = obstore.get_ranges(store, name, starts=starts, ends=ends)
        return sum(len(g) for g in got)

    def small(name: str) -> None:
        obstore.put(store, name, b"x" * 4096)
        bytes(obstore.get(store, name).bytes())

    return put, multipart, ranged, small


def _s3fs_ops(server: _s3server.S3Server, bucket: str):
    import s3fs

    fs = s3fs.S3FileSystem(
        key=_s3server.ACCESS_KEY,
        secret=_s3server.SECRET_KEY,
        endpoint_url=server.endpoint,
        client_kwargs={"region_name": _s3server.REGION},
        skip_instance_cache=True,
    )

    def put(name: str, data: bytes) -> None:
        fs.pipe_file(f"{bucket}/{name}", data)

    def multipart(name: str, data: memoryview) -> None:
        with fs.open(f"{bucket}/{name}", "wb", block_size=PIECE) as f:
            for i in range(0, len(data), PIECE):
                f.write(data[i : i + PIECE])

    def ranged(name: str, size: int) -> int:
        starts = list(range(0, size, PIECE))
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda s: fs.cat_file(f"{bucket}/{name}", start=s, end=min(s + PIECE, size)), starts))
        return sum(len(g) for g in got)

    def small(name: str) -> None:
        fs.pipe_file(f"{bucket}/{name}", b"x" * 4096)
        fs.cat_file(f"{bucket}/{name}")

    return put, multipart, ranged, small


def _twenty(small, name: str) -> None:
    for i in range(20):
        small(f"{name}/small-{i}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    payload = os.urandom(args.mib << 20)
    with tempfile.TemporaryDirectory() as tmp:
        server = _s3server.start(Path(tmp) / "s3", buckets=("bench",))
        try:
            clients = {"obstore": _obstore_ops(server, "bench"), "s3fs": _s3fs_ops(server, "bench")}
            times: dict[tuple[str, str], list[float]] = {}
            for r in range(args.repeats):
                for name, (put, multipart, ranged, small) in clients.items():
                    ops = {
                        "put": (put, (f"{name}/put-{r}", payload)),
                        "multipart": (multipart, (f"{name}/mp-{r}", memoryview(payload))),
                        "ranged read": (ranged, (f"{name}/put-{r}", len(payload))),
                        "small put+get x20": (_twenty, (small, name)),
                    }
                    for op, (fn, fn_args) in ops.items():
                        t = time.perf_counter()
                        fn(*fn_args)
                        times.setdefault((name, op), []).append(time.perf_counter() - t)
        finally:
            server.stop()
    print(f"# {args.mib} MiB payload, {args.repeats} repeats, medians; weed mini on 127.0.0.1, {os.cpu_count()} cores")
    print(f"{'operation':<20} {'obstore':>14} {'s3fs':>14} {'obstore/s3fs':>13}")
    for op in ("put", "multipart", "ranged read", "small put+get x20"):
        cells = []
        for name in ("obstore", "s3fs"):
            med = statistics.median(times[(name, op)])
            cells.append(med)
        fmt = [f"{args.mib / c:9.0f} MiB/s" if op != "small put+get x20" else f"{c * 1000:11.1f} ms" for c in cells]
        print(f"{op:<20} {fmt[0]:>14} {fmt[1]:>14} {cells[1] / cells[0]:12.2f}x")


if __name__ == "__main__":
    main()
