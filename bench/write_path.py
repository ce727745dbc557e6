"""Writing a data file: O_DIRECT from the staging buffer against the kernel's buffered path.

The local backend's :class:`~asyncckpt.storage.local.DataFileWriter` either way (``direct=True``,
``direct=False``), fed the same bytes as a save feeds it: chunks of about the default chunk size
(4 MiB) whose lengths are not multiples of 4096 (as encoded chunks are), random so nothing
compresses or dedups underneath. Rounds interleave the two (the order alternating), each round a
new file, unlinked afterwards. Per round and writer:

* wall time from open to the end of ``finish`` (fsync and close included);
* CPU seconds of this process (user + sys, ``getrusage``) per GB written. Buffered writes leave
  part of their cost to the kernel's writeback threads, which no process is charged for, so the
  CPU of the kernel's own threads (kworkers, from ``/proc``) and the whole machine's busy CPU
  (``/proc/stat``, every core) per GB are reported beside it: on a shared machine the last carries
  other work's noise too, and both count in 10 ms ticks;
* the longest single ``append``, and the ``finish`` (tail, truncate, fsync) on its own.

``--saves`` adds whole saves through ``CheckpointManager`` (``compression=None``: the writing is
then most of a save's CPU) of a state of random tensors of the same size, each writer in a fresh
process (``ASYNCCKPT_DIRECT_IO=1`` or ``0``), one warm save then a measured one: the save's wall
time (call to durable commit) and its process CPU, then ``asyncckpt.load`` at once: with direct
writes the data is not left in the page cache, so that load reads the disk.

    python bench/write_path.py --mib 400 --rounds 7 --json bench/results/write-path-cpu.json

``--dir`` picks the filesystem (default: a temporary directory under the system's temp dir).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, median, write_json  # noqa: E402
from asyncckpt.storage.local import DataFileWriter  # noqa: E402

MiB = 1024 * 1024
WRITERS = {"buffered": False, "o_direct": True}


def make_chunks(total: int, chunk: int, seed: int = 0) -> list[bytes]:
    """Random chunks of ``chunk`` minus up to 64 KiB (never a multiple of 4096), ``total`` bytes
    in all; 16 distinct contents, reused, so the bench holds 64 MiB whatever ``total`` is."""
    rng = random.Random(seed)
    sizes: list[int] = []
    left = total
    while left > 0:
        size = min(left, chunk - rng.randrange(1, 64 * 1024))
        if size % 4096 == 0:
            size -= 1
        sizes.append(max(size, 1))
        left -= sizes[-1]
    pool = [rng.randbytes(chunk) for _ in range(min(16, len(sizes)))]
    return [pool[i % len(pool)][:size] for i, size in enumerate(sizes)]


def _process_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _machine_busy_s() -> float | None:
    """Busy CPU seconds of the whole machine so far (every core), or None without /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _kernel_threads_cpu_s() -> float | None:
    """CPU seconds so far of the kernel's own threads (kworkers: writeback, block completions
    deferred to a thread), the children of kthreadd (pid 2); None without /proc. Threads that
    ended meanwhile are missed, so this is a floor."""
    total = 0
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return None
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == "2":  # ppid: a kernel thread
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def write_once(path: Path, chunks: list[bytes], direct: bool) -> dict[str, Any]:
    """One file through one writer; the figures of that round."""
    nbytes = sum(len(c) for c in chunks)
    began_kernel = _kernel_threads_cpu_s()
    began_busy = _machine_busy_s()
    began_cpu = _process_cpu()
    began = time.perf_counter()
    writer = DataFileWriter(path, direct=direct)
    used_direct = writer.direct
    longest = 0.0
    try:
        for chunk in chunks:
            t = time.perf_counter()
            writer.append(chunk)
            longest = max(longest, time.perf_counter() - t)
        t = time.perf_counter()
        still_direct = writer.direct
        writer.finish()
        finish_s = time.perf_counter() - t
    except BaseException:
        writer.abort()
        raise
    wall = time.perf_counter() - began
    cpu = _process_cpu() - began_cpu
    ended_busy = _machine_busy_s()
    ended_kernel = _kernel_threads_cpu_s()
    gb = nbytes / 1e9
    return {
        "direct": used_direct and still_direct,
        "bytes": nbytes,
        "wall_s": wall,
        "mb_s": nbytes / 1e6 / wall,
        "cpu_s_per_gb": cpu / gb,
        "machine_cpu_s_per_gb": None if began_busy is None or ended_busy is None else (ended_busy - began_busy) / gb,
        "kernel_threads_cpu_s_per_gb": (
            None if began_kernel is None or ended_kernel is None else (ended_kernel - began_kernel) / gb
        ),
        "max_append_s": longest,
        "finish_s": finish_s,
        "max_append_or_finish_s": max(longest, finish_s),
    }


_SAVE_CHILD = """
import json, resource, sys, time, torch
import asyncckpt
from asyncckpt.storage.local import DataFileWriter
g = torch.Generator().manual_seed(0)
state = {{f"t{{i}}": torch.randn({per} // 4, generator=g) for i in range({tensors})}}
seen = []
real_finish = DataFileWriter.finish
def finish(self):
    seen.append(self.direct)
    real_finish(self)
DataFileWriter.finish = finish
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
with asyncckpt.CheckpointManager({root!r}, keep_last=1, compression=None) as mgr:
    mgr.save(0, state).wait()  # warm: the arena and the threads exist
    began, began_cpu = time.perf_counter(), cpu()
    mgr.save(1, state).wait()
    save_s, save_cpu = time.perf_counter() - began, cpu() - began_cpu
began = time.perf_counter()
asyncckpt.load({root!r})
load_s = time.perf_counter() - began
print(json.dumps({{"direct": all(seen), "save_s": save_s, "save_cpu_s": save_cpu, "load_s": load_s}}))
"""


def save_once(root: str, total: int, direct: bool) -> dict[str, Any]:
    """One warm save and one measured save of ``total`` bytes of tensors, in a fresh process."""
    tensors = max(1, total // (64 * MiB))
    code = _SAVE_CHILD.format(root=root, per=total // tensors, tensors=tensors)
    env = dict(os.environ, ASYNCCKPT_DIRECT_IO="1" if direct else "0")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=600, env=env)
    row: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    row["save_cpu_s_per_gb"] = row["save_cpu_s"] / (total / 1e9)
    return row


def summarize(rounds: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name in WRITERS:
        rows = [r[name] for r in rounds]
        med: dict[str, Any] = {
            key: median([row[key] for row in rows if row[key] is not None])
            for key in (
                "wall_s",
                "mb_s",
                "cpu_s_per_gb",
                "machine_cpu_s_per_gb",
                "kernel_threads_cpu_s_per_gb",
                "max_append_s",
                "finish_s",
                "max_append_or_finish_s",
            )
        }
        med["worst_append_s"] = max(row["max_append_s"] for row in rows)
        med["direct"] = all(row["direct"] for row in rows)
        out[name] = med
    return out


def print_table(medians: dict[str, dict[str, Any]], mib: int, rounds: int) -> None:
    print(f"\n{mib} MiB per file, {rounds} rounds, medians (worst append: over all rounds)")
    print(
        "| writer | wall s | MB/s | process CPU-s/GB | kernel threads CPU-s/GB | machine CPU-s/GB | max append ms "
        "| worst append ms | finish (fsync) ms |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, m in medians.items():
        label = name if name != "o_direct" or m["direct"] else "o_direct (fell back: buffered)"
        print(
            f"| {label} | {m['wall_s']:.2f} | {m['mb_s']:.0f} | {m['cpu_s_per_gb']:.3f} "
            f"| {m['kernel_threads_cpu_s_per_gb']:.3f} | {m['machine_cpu_s_per_gb']:.3f} "
            f"| {m['max_append_s'] * 1e3:.1f} | {m['worst_append_s'] * 1e3:.1f} "
            f"| {m['finish_s'] * 1e3:.1f} |"
        )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=400, help="bytes per file, MiB (default 400)")
    parser.add_argument("--chunk-mib", type=int, default=4, help="largest chunk, MiB (default 4)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--dir", help="where the files go (default: a new directory in the temp dir)")
    parser.add_argument("--saves", type=int, default=0, help="rounds of whole saves too (default 0: none)")
    parser.add_argument("--json", help="write the rounds and medians here")
    args = parser.parse_args(argv)

    chunks = make_chunks(args.mib * MiB, args.chunk_mib * MiB)
    rounds: list[dict[str, dict[str, Any]]] = []
    with tempfile.TemporaryDirectory(prefix="asyncckpt-write-path-", dir=args.dir) as where:
        for i in range(args.rounds):
            order = list(WRITERS) if i % 2 == 0 else list(reversed(WRITERS))
            row: dict[str, dict[str, Any]] = {}
            for name in order:
                path = Path(where) / f"{name}-{i}.bin"
                row[name] = write_once(path, chunks, WRITERS[name])
                path.unlink()
            rounds.append(row)
            print(
                f"round {i + 1}/{args.rounds}: "
                + ", ".join(f"{n} {r['wall_s']:.2f} s, {r['cpu_s_per_gb']:.3f} CPU-s/GB" for n, r in row.items()),
                flush=True,
            )
        saves: list[dict[str, dict[str, Any]]] = []
        for i in range(args.saves):
            order = list(WRITERS) if i % 2 == 0 else list(reversed(WRITERS))
            saves.append({name: save_once(str(Path(where) / name), args.mib * MiB, WRITERS[name]) for name in order})
            print(f"save round {i + 1}/{args.saves}: {saves[-1]}", flush=True)
        st = os.statvfs(where)
        target = {"dir": str(Path(where).parent), "f_bsize": st.f_bsize}
    medians = summarize(rounds)
    print_table(medians, args.mib, args.rounds)
    save_medians: dict[str, dict[str, Any]] = {}
    if saves:
        print(f"\nwhole saves, compression=None, {args.mib} MiB of tensors, {args.saves} rounds, medians")
        print("| writer | save s | save CPU-s | save CPU-s/GB | load right after s |")
        print("|---|---|---|---|---|")
        for name in WRITERS:
            rows = [r[name] for r in saves]
            m = {k: median([row[k] for row in rows]) for k in ("save_s", "save_cpu_s", "save_cpu_s_per_gb", "load_s")}
            m["direct"] = all(row["direct"] for row in rows)
            save_medians[name] = m
            print(
                f"| {name} | {m['save_s']:.2f} | {m['save_cpu_s']:.3f} | {m['save_cpu_s_per_gb']:.3f} "
                f"| {m['load_s']:.2f} |"
            )
    payload = {
        "machine": machine(),
        "target": target,
        "mib": args.mib,
        "chunks": len(chunks),
        "rounds": rounds,
        "medians": medians,
        "saves": saves,
        "save_medians": save_medians,
    }
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
