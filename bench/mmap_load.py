"""Zero-copy load of a raw checkpoint: ``asyncckpt.load`` through the mapping vs the read path.

One ``compression=None`` checkpoint of a model + AdamW state (0.40 GB by default) is loaded with
``asyncckpt.load`` in a fresh subprocess per measurement (so each starts from the same memory):

- mapped: the opt-in ``asyncckpt.load(path, mmap=True)``: a private mapping of the data file, every
  chunk's CRC32 verified over the mapped pages, tensors as views of the mapping.
- read: the default read path (``asyncckpt.load(path)``): each chunk read in pieces straight into
  its tensor's own memory, verified.

Warm: the data file is in the page cache. Cold: its pages are evicted first with
``posix_fadvise(POSIX_FADV_DONTNEED)`` on that one file (no root needed, other processes' cache
untouched; the file is fsynced, so its pages are clean and do go), and the eviction is checked
with mincore via ``fincore`` when that tool exists. Memory is measured in separate runs (a thread
samples /proc/self/status every 2 ms, off the timed runs): peak RSS growth, and the anonymous /
file-backed split of the RSS once the tensors are loaded and held.

    python bench/mmap_load.py --json bench/results/mmap_load.json     # ~1 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODES = ("mapped", "read")


def status() -> dict[str, int]:
    """VmRSS, RssAnon, RssFile of this process in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0]) * 1024
    return out


def evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def cached_fraction(path: Path) -> float | None:
    """Share of the file's pages in the page cache (mincore, via util-linux fincore)."""
    if shutil.which("fincore") is None:
        return None
    try:
        out = subprocess.run(
            ["fincore", "--bytes", "--noheadings", "--output", "RES,SIZE", str(path)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        return int(out[0]) / max(1, int(out[1]))
    except (subprocess.CalledProcessError, ValueError, IndexError):
        return None


def child(mode: str, cache: str, ckpt: Path, sample: bool) -> dict:
    """One load in this (fresh) process: its time, or its memory."""
    import torch  # noqa: F401 - imported before the baseline, as a training process would have it

    import asyncckpt

    data = ckpt / "data-00000.bin"
    if cache == "cold":
        evict(data)
    else:
        data.read_bytes()  # warm, whatever ran before
    cached = cached_fraction(data)
    before = status()
    peak = dict(before)
    stop = threading.Event()

    def sampler() -> None:
        while not stop.is_set():
            now = status()
            for key, value in now.items():
                peak[key] = max(peak[key], value)
            time.sleep(0.002)

    thread = threading.Thread(target=sampler, daemon=True)
    if sample:
        thread.start()
    began = time.perf_counter()
    tree = asyncckpt.load(ckpt, mmap=mode == "mapped")
    seconds = time.perf_counter() - began
    stop.set()
    if sample:
        thread.join()
    after = status()
    for key, value in after.items():
        peak[key] = max(peak[key], value)
    n = sum(t.numel() for t in tree["model"].values())
    del tree
    return {
        "seconds": seconds,
        "cached_before": cached,
        "peak_rss_growth": peak["VmRSS"] - before["VmRSS"],
        "peak_anon_growth": peak["RssAnon"] - before["RssAnon"],
        "anon_growth_held": after["RssAnon"] - before["RssAnon"],
        "file_growth_held": after["RssFile"] - before["RssFile"],
        "model_params": n,
    }


def run_child(mode: str, cache: str, ckpt: Path, sample: bool) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, cache, str(ckpt)] + (["--sample"] if sample else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", nargs=3, metavar=("MODE", "CACHE", "CKPT"), help=argparse.SUPPRESS)
    ap.add_argument("--sample", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        mode, cache, ckpt = args.child
        print(json.dumps(child(mode, cache, Path(ckpt), args.sample)))
        return

    sys.path.insert(0, str(HERE))
    import torch

    import asyncckpt
    from _common import machine, median, state_bytes, trained_state, write_json

    model, opt = trained_state(args.width, args.depth, "cpu")
    nbytes = state_bytes(model, opt)
    base = Path(tempfile.mkdtemp(prefix="asyncckpt-mmap-"))
    try:
        with asyncckpt.CheckpointManager(base, compression=None) as mgr:
            ckpt = mgr.save(1, {"model": model, "optimizer": opt}).wait()
        del model, opt
        size = (ckpt / "data-00000.bin").stat().st_size
        runs: dict[str, list[dict]] = {f"{m} {c}": [] for c in ("warm", "cold") for m in MODES}
        memory: dict[str, dict] = {}
        began = time.perf_counter()
        for _ in range(args.repeats):  # interleaved: a noisy neighbour hits every variant alike
            for key in runs:
                mode, cache = key.split()
                runs[key].append(run_child(mode, cache, ckpt, sample=False))
        for key in runs:
            mode, cache = key.split()
            memory[key] = run_child(mode, cache, ckpt, sample=True)
        elapsed = time.perf_counter() - began
    finally:
        shutil.rmtree(base, ignore_errors=True)

    rows = {}
    for key, results in runs.items():
        seconds = [r["seconds"] for r in results]
        cached = [r["cached_before"] for r in results if r["cached_before"] is not None]
        mem = memory[key]
        rows[key] = {
            "median_s": median(seconds),
            "all_s": seconds,
            "gb_per_s": size / median(seconds) / 1e9,
            "cached_before_max": max(cached) if cached else None,
            "peak_rss_growth_mb": mem["peak_rss_growth"] / 1e6,
            "peak_anon_growth_mb": mem["peak_anon_growth"] / 1e6,
            "anon_growth_held_mb": mem["anon_growth_held"] / 1e6,
            "file_growth_held_mb": mem["file_growth_held"] / 1e6,
        }

    print(
        f"\nasyncckpt.load of a compression=None checkpoint: state {nbytes / 1e9:.3f} GB, data file "
        f"{size / 1e6:.0f} MB, torch {torch.__version__}, {os.cpu_count()} cores, "
        f"median of {args.repeats} (fresh process each)\n"
    )
    print("| path | page cache | load time | GB/s | peak RSS growth | anon RSS held | file RSS held |")
    print("|---|---|---|---|---|---|---|")
    for key, row in rows.items():
        mode, cache = key.split()
        note = "" if row["cached_before_max"] is None else f" ({row['cached_before_max']:.0%} cached before)"
        print(
            f"| {mode} | {cache}{note} | {row['median_s']:.3f} s | {row['gb_per_s']:.2f} | "
            f"{row['peak_rss_growth_mb']:.0f} MB | {row['anon_growth_held_mb']:.0f} MB | "
            f"{row['file_growth_held_mb']:.0f} MB |"
        )
    print(f"\n(bench took {elapsed:.0f} s; cold = posix_fadvise(DONTNEED) on the data file, checked with fincore)")
    write_json(
        args.json,
        {
            "machine": machine(),
            "state_bytes": nbytes,
            "data_file_bytes": size,
            "repeats": args.repeats,
            "cold_method": "posix_fadvise(POSIX_FADV_DONTNEED) on the data file; residency checked with fincore",
            "results": rows,
        },
    )


if __name__ == "__main__":
    main()
