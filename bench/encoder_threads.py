"""Encoder threads at torch's default thread count (asyncckpt) vs one thread each, set two ways
(and, where the cores outnumber the workers, the cores split among them).

One thread per worker looks right on paper: the pool is the parallelism, and a worker's byte
grouping need not start an OpenMP team of its own. Variants, rounds interleaving them:

  torch's default            what asyncckpt does: workers niced, torch's thread count left alone
  one torch thread           torch.set_num_threads(1) in each worker (which also moves the count
                             threads created later start from: reset between runs here)
  one OpenMP thread          omp_set_num_threads(1) in each worker, through torch's own OpenMP
                             runtime: that thread only, nothing process-wide

Measured for each:

  alone        process CPU time per save + wait of the state, nothing else running
  training     a training loop (the MLP of stall.py) saving every --every iterations: loop
               time and the median persist time (encode + write + fsync + commit)

libgomp spin-waits at the end of a parallel region only while it manages no more threads than
there are cores; the workers' own teams change that count, so the training thread's OpenMP
helpers spin or sleep depending on the variant. GOMP_SPINCOUNT=1000 (near the 100 libgomp uses
once oversubscribed) takes most of that effect out, to compare the encoders alone:

    python bench/encoder_threads.py --json bench/results/encoder-threads-cpu.json   # ~2 min on 2 cores
    GOMP_SPINCOUNT=1000 python bench/encoder_threads.py --json bench/results/encoder-threads-spin1000-cpu.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import asyncckpt  # noqa: E402
from _common import machine, median, openmp_limited_init, state_bytes, trained_state, write_json  # noqa: E402
from asyncckpt.engine import pipeline  # noqa: E402

DEFAULT = pipeline.Pipeline._init_worker


def torch_threads_per_worker(count: int):
    """The alternatives: asyncckpt's worker set-up, then ``count`` torch threads in the worker."""

    def init(self: pipeline.Pipeline) -> None:
        DEFAULT(self)
        torch.get_num_threads()  # torch's lazy per-thread init first, or it would undo the next line
        torch.set_num_threads(count)

    return init


def reset_new_thread_default(threads: int) -> None:
    """set_num_threads also moves the count later threads start from: put it back between runs."""
    thread = threading.Thread(target=torch.set_num_threads, args=(threads,))
    thread.start()
    thread.join()


VARIANTS = {
    "torch's default per worker (asyncckpt)": DEFAULT,
    "one torch thread per worker": torch_threads_per_worker(1),
    "one OpenMP thread per worker (that thread only)": openmp_limited_init(DEFAULT, 1),
}
SHARE = (os.cpu_count() or 1) // max(1, min(8, os.cpu_count() or 1))  # cores / CheckpointManager's default workers
if SHARE > 1:  # the middle way, where it differs from one thread each: 2 for 8 workers on 16 cores
    VARIANTS[f"{SHARE} torch threads per worker (cores / workers)"] = torch_threads_per_worker(SHARE)


def alone(state: dict, saves: int) -> float:
    with tempfile.TemporaryDirectory() as root, asyncckpt.CheckpointManager(root, keep_last=1) as mgr:
        mgr.save(0, state).wait()  # arena and threads warm
        began = time.process_time()
        for step in range(1, saves + 1):
            mgr.save(step, state).wait()
        return (time.process_time() - began) / saves


def training(model, opt, iters: int, every: int, width: int) -> tuple[float, float]:
    state = {"model": model, "optimizer": opt}
    gen = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as root, asyncckpt.CheckpointManager(root, keep_last=1) as mgr:
        mgr.prepare(state).result()
        began = time.perf_counter()
        for it in range(1, iters + 1):
            loss = model(torch.randn(32, width, generator=gen)).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if it % every == 0:
                mgr.save(it, state)
        loop = time.perf_counter() - began
        mgr.wait()
        return loop, median([r.persist_s for r in mgr.stats.records])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--depth", type=int, default=8, help="2048 x 8 + AdamW = 0.40 GB")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--saves", type=int, default=3, help="saves per variant per round, alone")
    ap.add_argument("--iters", type=int, default=45)
    ap.add_argument("--every", type=int, default=15)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    model, opt = trained_state(args.width, args.depth, "cpu")
    nbytes = state_bytes(model, opt)
    state = {"model": model, "optimizer": opt}
    results = {name: {"cpu_alone_s": [], "loop_s": [], "persist_s": []} for name in VARIANTS}
    threads = torch.get_num_threads()
    try:
        for round_ in range(args.rounds):
            order = list(VARIANTS.items()) if round_ % 2 == 0 else list(VARIANTS.items())[::-1]
            for name, init in order:
                pipeline.Pipeline._init_worker = init
                cpu = alone(state, args.saves)
                reset_new_thread_default(threads)
                loop, persist = training(model, opt, args.iters, args.every, args.width)
                reset_new_thread_default(threads)
                r = results[name]
                r["cpu_alone_s"].append(cpu)
                r["loop_s"].append(loop)
                r["persist_s"].append(persist)
                print(
                    f"  round {round_} {name}: CPU per save alone {cpu:.3f} s; training: loop {loop:.2f} s, "
                    f"persist {persist:.2f} s",
                    file=sys.stderr,
                )
    finally:
        pipeline.Pipeline._init_worker = DEFAULT
    openmp = machine()["openmp_env"] or "OpenMP environment unset"
    cores = os.cpu_count()
    print(f"\nstate {nbytes / 1e9:.3f} GB on cpu, {cores} cores, torch {torch.__version__}, {openmp}; medians\n")
    print("| encoder workers | CPU per save, alone | training loop | persist under training |")
    print("|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {median(r['cpu_alone_s']):.3f} s | {median(r['loop_s']):.2f} s | "
            f"{median(r['persist_s']):.2f} s |"
        )
    write_json(args.json, {"machine": machine(), "args": vars(args), "state_bytes": nbytes, "results": results})


if __name__ == "__main__":
    main()
