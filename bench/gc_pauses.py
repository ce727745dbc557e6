"""What CPython's cyclic garbage collector costs a training loop that checkpoints.

A save makes objects that live as long as it does (its skeleton, its manifest entries), so the
collector promotes them to its oldest generation, and once the objects promoted since its last
full collection reach a quarter of those it kept then, it collects the whole process: a pause as
long as the program's heap is large, on whichever thread allocates (training's, mostly inside
``save``). Training alone makes next to no such objects. This trains --layers transformer layers
+ AdamW on the CPU (24 layers: 1,152 tensors), saving every --every steps, and records every
collection with ``gc.callbacks`` (generation, duration, thread) and each save's stall.

    python bench/gc_pauses.py                                   # 400 steps, a save every 10
    python bench/versions.py --before /tmp/before --after . --rounds 4 gc_pauses   # two versions side by side
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from asyncckpt import CheckpointManager
from asyncckpt.state.tree import flatten


def make_state(layers: int, width: int) -> dict:
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.TransformerEncoderLayer(width, 4, 2 * width) for _ in range(layers)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return {"model": model, "optimizer": opt, "step": 0}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--every", type=int, default=10, help="steps between saves")
    ap.add_argument("--snapshot", default="overlap", choices=["overlap", "blocking"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)  # the encoder threads get the other core
    state = make_state(args.layers, args.width)
    model, opt = state["model"], state["optimizer"]
    batch = torch.randn(4, 2, args.width)
    seen: list[tuple[int, float, bool]] = []  # each collection: generation, seconds, on the training thread
    began: dict[int, float] = {}
    training = threading.main_thread()

    def on_collection(phase: str, info: dict) -> None:
        me = threading.get_ident()
        if phase == "start":
            began[me] = time.perf_counter()
        elif me in began:
            on_training = threading.current_thread() is training
            seen.append((info["generation"], time.perf_counter() - began.pop(me), on_training))

    with tempfile.TemporaryDirectory() as root:
        mgr = CheckpointManager(root, keep_last=2, snapshot=args.snapshot)
        for step in range(3):  # warm-up: the arena, the encoders, the first skeleton
            model(batch).square().mean().backward()
            opt.step()
            opt.zero_grad()
            mgr.save(step, state).wait()
        gc.collect()
        heap = len(gc.get_objects())
        stalls: list[float] = []
        gc.callbacks.append(on_collection)
        started = time.perf_counter()
        for step in range(3, args.steps):
            model(batch).square().mean().backward()
            opt.step()
            opt.zero_grad()
            state["step"] = step
            if step % args.every == 0:
                t = time.perf_counter()
                mgr.save(step, state)
                stalls.append(time.perf_counter() - t)
        mgr.close()
        elapsed = time.perf_counter() - started
        gc.callbacks.remove(on_collection)
    saves = len(stalls)
    result: dict = {
        "tensors": len(flatten(state).tensors),
        "heap_objects": heap,
        "saves": saves,
        "steps": args.steps - 3,
        "elapsed_s": elapsed,
        "stall_p50_s": statistics.median(stalls),
        "stall_p95_s": percentile(stalls, 0.95),
        "stall_max_s": max(stalls),
        "python": sys.version.split()[0],
    }
    for generation in (0, 1, 2):
        times = [s for g, s, _ in seen if g == generation]
        on_training = [s for g, s, t in seen if g == generation and t]
        result[f"gen{generation}"] = {
            "per_100_saves": 100 * len(times) / saves,
            "ms_per_save": 1e3 * sum(times) / saves,
            "max_ms": 1e3 * max(times, default=0.0),
            "on_training_thread": len(on_training),
            "count": len(times),
        }
    print(
        f"{result['tensors']} tensors, {heap} objects tracked by the collector, {saves} saves in "
        f"{result['steps']} steps ({args.snapshot}), python {result['python']}"
    )
    print("| collection | per 100 saves | ms per save | longest ms | on the training thread |")
    print("|---|---|---|---|---|")
    for generation in (0, 1, 2):
        g = result[f"gen{generation}"]
        print(
            f"| generation {generation} | {g['per_100_saves']:.0f} | {g['ms_per_save']:.2f} | {g['max_ms']:.1f} | "
            f"{g['on_training_thread']} of {g['count']} |"
        )
    print(
        f"stall per save: median {result['stall_p50_s'] * 1e3:.1f} ms, p95 {result['stall_p95_s'] * 1e3:.1f} ms, "
        f"max {result['stall_max_s'] * 1e3:.1f} ms"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
