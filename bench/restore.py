"""Time to get back to training: from "start restoring" to "state on the device".

Savers: asyncckpt (zstd and compression=None), torch.load, and DCP load, each restoring the same
model + AdamW state into live objects, in interleaved rounds: each with the page cache dropped
(needs root and a writable /proc/sys/vm/drop_caches; the table says whether it was), then again
warm. Floors measured in the same run: reading the raw data file (disk or page cache), decoding
the compressed chunks on all cores, and the host->device copy (a memcpy on CPU).

    python bench/restore.py --json bench/results/restore-cpu.json     # ~2 min, 0.40 GB state
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import asyncckpt  # noqa: E402
from _common import machine, median, state_bytes, trained_state, write_json  # noqa: E402
from asyncckpt import codec  # noqa: E402
from asyncckpt.engine.reader import read_manifest  # noqa: E402


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def timed(fn, repeats: int, name: str) -> tuple[float, bool]:
    times, dropped = [], True
    for _ in range(repeats):
        dropped &= drop_caches()
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    # as measured, so that a run cut short by a time limit still shows what it got
    print(f"  {name}: {', '.join(f'{t:.3f}' for t in times)} s (page cache dropped: {dropped})", file=sys.stderr)
    return median(times), dropped


def interleaved(restores: dict, repeats: int) -> dict[str, dict]:
    """Each restore timed with the page cache dropped, then warm (right after a read of the same
    files), round by round in turn, so machine noise hits all alike: medians per restore."""
    cold: dict[str, list[float]] = {name: [] for name in restores}
    warm: dict[str, list[float]] = {name: [] for name in restores}
    dropped = True
    for _ in range(repeats):
        for name, fn in restores.items():
            dropped &= drop_caches()
            began = time.perf_counter()
            fn()
            cold[name].append(time.perf_counter() - began)
            began = time.perf_counter()
            fn()
            warm[name].append(time.perf_counter() - began)
    for name in restores:
        print(
            f"  {name}: cold {', '.join(f'{t:.3f}' for t in cold[name])} s; "
            f"warm {', '.join(f'{t:.3f}' for t in warm[name])} s",
            file=sys.stderr,
        )
    return {name: {"cold_s": median(cold[name]), "warm_s": median(warm[name]), "dropped": dropped} for name in restores}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, opt = trained_state(args.width, args.depth, device)
    nbytes = state_bytes(model, opt)
    live = {"model": model, "optimizer": opt}
    base = Path(tempfile.mkdtemp(prefix="asyncckpt-restore-"))
    results = {}

    managers = {}
    restores = {}
    for name, compression in (("asyncckpt zstd-1", "zstd"), ("asyncckpt compression=None", None)):
        root = base / name.replace(" ", "_")
        mgr = managers[name] = asyncckpt.CheckpointManager(root, compression=compression)
        mgr.save(1, live).wait()
        restores[name] = lambda mgr=mgr: mgr.restore(live)

    path = base / "torch.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)

    def torch_restore() -> None:
        sd = torch.load(path, map_location=device)
        model.load_state_dict(sd["model"])
        opt.load_state_dict(sd["optimizer"])

    restores["torch.load"] = torch_restore

    try:
        import torch.distributed.checkpoint as dcp

        dcp_dir = str(base / "dcp")
        dcp.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, checkpoint_id=dcp_dir)

        def dcp_restore() -> None:
            sd = {"model": model.state_dict(), "optimizer": opt.state_dict()}
            dcp.load(sd, checkpoint_id=dcp_dir)
            model.load_state_dict(sd["model"])
            opt.load_state_dict(sd["optimizer"])

        restores["DCP load"] = dcp_restore
    except Exception as exc:  # noqa: BLE001 - a failed alternative is a result
        print(f"DCP save failed: {exc!r}", file=sys.stderr)
    results = interleaved(restores, args.repeats)
    for mgr in managers.values():
        mgr.close()

    # floors
    raw_ckpt = base / "asyncckpt_compression=None" / "step-000000000001"
    data_file = raw_ckpt / "data-00000.bin"
    size = data_file.stat().st_size

    def read_file() -> None:
        buf = bytearray(size)
        with open(data_file, "rb", buffering=0) as f:
            f.readinto(buf)

    read_floor, _ = timed(read_file, args.repeats, "floor: read the raw data file")
    zckpt = base / "asyncckpt_zstd-1" / "step-000000000001"
    manifest = read_manifest(zckpt)
    blob = (zckpt / "data-00000.bin").read_bytes()
    stored = [blob[c.offset : c.offset + c.length] for c in manifest.chunks]

    def decode_all() -> None:
        def one(i: int) -> None:
            c = manifest.chunks[i]
            codec.decode(stored[i], c.codecs, c.crc32, torch.empty(c.raw_length, dtype=torch.uint8), "bench")

        with ThreadPoolExecutor(os.cpu_count()) as pool:
            list(pool.map(one, range(len(stored))))

    decode_floor, _ = timed(decode_all, args.repeats, "floor: decode the zstd chunks")
    host = [torch.empty(t.shape, dtype=t.dtype) for t in model.state_dict().values()]
    targets = list(model.state_dict().values())

    def copy_all() -> None:
        for h, t in zip(host, targets, strict=True):
            t.copy_(h)
        if device == "cuda":
            torch.cuda.synchronize()

    copy_floor, _ = timed(copy_all, args.repeats, "floor: host->device copy")
    copy_floor *= nbytes / sum(t.numel() * t.element_size() for t in targets)  # scale to the whole state

    print(f"\nstate {nbytes / 1e9:.3f} GB, device {device}, torch {torch.__version__}, {os.cpu_count()} cores\n")
    dropped = all(r["dropped"] for r in results.values())
    cold = "page cache dropped" if dropped else "page cache (could not drop it: warm)"
    print(f"| restore | {cold} | vs torch.load | warm | vs torch.load |")
    print("|---|---|---|---|---|")
    ref = results["torch.load"]
    for name, r in results.items():
        print(
            f"| {name} | {r['cold_s']:.3f} s | {r['cold_s'] / ref['cold_s']:.2f}x "
            f"| {r['warm_s']:.3f} s | {r['warm_s'] / ref['warm_s']:.2f}x |"
        )
    print(f"| floor: read {size / 1e6:.0f} MB raw data file | {read_floor:.2f} s | | |")
    print(f"| floor: decode the zstd chunks on {os.cpu_count()} cores | {decode_floor:.2f} s | | |")
    print(f"| floor: host->device copy | {copy_floor:.2f} s | | |")
    write_json(
        args.json,
        {
            "machine": machine(),
            "state_bytes": nbytes,
            "results": results,
            "floors_s": {"read": read_floor, "decode": decode_floor, "copy": copy_floor},
        },
    )
    shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
