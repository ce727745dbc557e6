"""What writing a save's manifest costs the writer thread, against building it with ``asdict``.

A save ends with its manifest: every tensor entry and every chunk entry turned into JSON, on the
writer thread, at every save. This saves a state once (24 transformer layers + a stepped AdamW by
default: 288 parameters, 1,152 tensors), reads its manifest back, then times ``to_json()`` two
ways, taking turns: as asyncckpt writes it (each entry's ``to_dict``), and with the entries made
by ``dataclasses.asdict`` (which copies each chunk's codec specs on the way), the same bytes
either way (checked). ``--chunk-size`` smaller than the default shows the cost per chunk. The
median of --repeats calls per round, then the median over --rounds rounds; beside it, the CPU of
a whole save of the same state (median of --saves), for scale.

    python bench/manifest.py
    python bench/manifest.py --chunk-size 262144    # 16x the chunks
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))

import asyncckpt  # noqa: E402
import flatten as flatten_bench  # noqa: E402 (the same state as bench/flatten.py)
from asyncckpt import format as fmt  # noqa: E402
from asyncckpt.engine.reader import read_manifest  # noqa: E402
from asyncckpt.manager import DEFAULT_CHUNK_SIZE  # noqa: E402


def _with_asdict(manifest: fmt.Manifest) -> bytes:
    """``to_json`` with the entries made by ``dataclasses.asdict``."""
    with (
        mock.patch.object(fmt.TensorEntry, "to_dict", dataclasses.asdict),
        mock.patch.object(fmt.ChunkEntry, "to_dict", dataclasses.asdict),
    ):
        return manifest.to_json()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE)
    ap.add_argument("--repeats", type=int, default=20, help="to_json calls per way per round")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--saves", type=int, default=5, help="whole saves timed for scale")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    state = flatten_bench.make_state(args.layers, args.width)
    with tempfile.TemporaryDirectory() as root:
        mgr = asyncckpt.CheckpointManager(root, chunk_size=args.chunk_size, keep_last=1)
        save_cpu = []
        for step in range(args.saves + 1):
            began = time.process_time()
            mgr.save(step, state).wait()
            if step:  # the first save sizes the staging buffers
                save_cpu.append(time.process_time() - began)
        mgr.close()
        manifest = read_manifest(max(Path(root).glob("step-*")))
    ways = {"to_dict (asyncckpt)": lambda: manifest.to_json(), "dataclasses.asdict": lambda: _with_asdict(manifest)}
    assert ways["to_dict (asyncckpt)"]() == ways["dataclasses.asdict"](), "the two ways wrote different bytes"
    results: dict[str, list[float]] = {way: [] for way in ways}
    for _ in range(args.rounds):
        per_call: dict[str, list[float]] = {way: [] for way in ways}
        for _ in range(args.repeats):
            for way, write in ways.items():  # taking turns call by call
                began = time.process_time()
                write()
                per_call[way].append(time.process_time() - began)
        for way in ways:
            results[way].append(statistics.median(per_call[way]))
    size = len(manifest.to_json())
    print(
        f"{len(manifest.tensors)} tensors, {len(manifest.chunks)} chunks, manifest {size / 1e3:.0f} kB; "
        f"a whole save {statistics.median(save_cpu) * 1e3:.0f} ms CPU ({manifest.raw_bytes / 1e6:.0f} MB)"
    )
    print("| manifest written with | CPU per save (ms), median | min / max over rounds |")
    print("|---|---|---|")
    for way, times in results.items():
        print(f"| {way} | {statistics.median(times) * 1e3:.2f} | {min(times) * 1e3:.2f} / {max(times) * 1e3:.2f} |")
    if args.json:
        out = {
            "args": vars(args),
            "tensors": len(manifest.tensors),
            "chunks": len(manifest.chunks),
            "manifest_bytes": size,
            "raw_bytes": manifest.raw_bytes,
            "save_cpu_s": save_cpu,
            "to_json_cpu_s": results,
        }
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
