"""CRC32 through ISA-L (the ``isal`` package) against zlib's, side by side in one run.

Two measurements, interleaved, medians:

* the checksum alone, one thread, over 4 MiB chunks (the default chunk size) of random bytes
  (GB/s);
* a whole save and a whole load of the same state (an MLP + AdamW after one step), each in a fresh
  process, one with ``isal`` importable and one where it is hidden (zlib is used): CPU seconds of
  the process per GB of state (all threads: snapshot, encode, CRC, write, fsync, commit), and the
  load's wall time.

    python bench/crc.py --size 256 --rounds 5 --json bench/results/crc-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, median, write_json  # noqa: E402

_HIDE_ISAL = "import sys; sys.modules['isal'] = None; sys.modules['isal.isal_zlib'] = None\n"

_CHILD = """
import json, os, resource, sys, time, torch
sys.path.insert(0, {bench!r})
import asyncckpt
from asyncckpt.codec import crc
from _common import state_bytes, trained_state
torch.manual_seed(0)
model, opt = trained_state({width}, 4, "cpu")
state = {{"model": model, "optimizer": opt}}
nbytes = state_bytes(model, opt)
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
with asyncckpt.CheckpointManager({root!r}, keep_last=1) as mgr:
    mgr.save(0, state).wait()  # warm: the arena and the threads exist
    began = cpu()
    mgr.save(1, state).wait()
    save_cpu = cpu() - began
began, began_cpu = time.perf_counter(), cpu()
asyncckpt.load({root!r})
load_s, load_cpu = time.perf_counter() - began, cpu() - began_cpu
print(json.dumps({{"provider": crc.PROVIDER, "bytes": nbytes, "save_cpu_s": save_cpu,
                   "load_s": load_s, "load_cpu_s": load_cpu}}))
"""


def crc_throughput(fn, chunks: list[bytes]) -> float:
    began = time.perf_counter()
    for chunk in chunks:
        fn(chunk)
    return sum(len(c) for c in chunks) / (time.perf_counter() - began) / 1e9


def save_and_load(width: int, hide_isal: bool) -> dict:
    with tempfile.TemporaryDirectory() as root:
        code = (_HIDE_ISAL if hide_isal else "") + _CHILD.format(
            bench=str(Path(__file__).resolve().parent), width=width, root=root
        )
        out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=600)
        return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=float, default=256, help="state size in MB (model + AdamW)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    try:
        from isal import isal_zlib
    except ImportError:
        sys.exit("bench/crc.py compares ISA-L's CRC32 with zlib's: pip install isal")
    # 4 linear layers of width^2 floats, times 3 (weights, exp_avg, exp_avg_sq)
    width = max(64, int((args.size * 1e6 / (4 * 4 * 3)) ** 0.5))
    chunks = [os.urandom(4 << 20) for _ in range(32)]
    rows: dict[str, dict[str, list[float]]] = {"isal": {}, "zlib": {}}
    for round_ in range(args.rounds):
        order = [("isal", isal_zlib.crc32, False), ("zlib", zlib.crc32, True)]
        for name, fn, hide in order if round_ % 2 == 0 else order[::-1]:
            got = save_and_load(width, hide)
            assert got["provider"] == name, got
            row = rows[name]
            row.setdefault("crc_gb_s", []).append(crc_throughput(fn, chunks))
            row.setdefault("save_cpu_s_per_gb", []).append(got["save_cpu_s"] / (got["bytes"] / 1e9))
            row.setdefault("load_s", []).append(got["load_s"])
            row.setdefault("load_cpu_s_per_gb", []).append(got["load_cpu_s"] / (got["bytes"] / 1e9))
            row.setdefault("bytes", []).append(got["bytes"])
    summary = {name: {key: median(values) for key, values in row.items()} for name, row in rows.items()}
    payload = {"machine": machine(), "args": vars(args), "rounds": rows, "medians": summary}
    print(f"{'':6} {'CRC GB/s':>9} {'save CPU s/GB':>14} {'load s':>7} {'load CPU s/GB':>14}")
    for name, row in summary.items():
        print(
            f"{name:6} {row['crc_gb_s']:9.2f} {row['save_cpu_s_per_gb']:14.3f} {row['load_s']:7.3f} "
            f"{row['load_cpu_s_per_gb']:14.3f}"
        )
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
