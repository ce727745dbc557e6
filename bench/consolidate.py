"""Loading a multi-rank checkpoint whole in one process: time and peak memory.

``asyncckpt.load(root)`` of a checkpoint saved by N ranks assembles every global tensor from the
ranks' pieces (what ``export``, ``load_weights`` and the CLI do too). This times it and samples the
process's RSS while it runs, on the newest checkpoint under --root; a missing root is first saved
by --world spawned gloo ranks (bench/multirank.py's MLP + AdamW after one step, about --size MB,
FSDP2 or DDP), once, and reused by later runs. The page cache is warm: the figures are the
decoding and the assembly, not the disk.

Figures: the peak RSS growth of the first load (this process's first: later loads reuse memory
the allocator kept), the median time over --repeats loads, and the state's size. With
--restore-world M, also ``CheckpointManager.restore`` into M spawned ranks' live model and
optimizer (--mode, the same size): a restore at the same world size, or a resharding one, which
reads each rank's box through the same code; --repeats restores, the slowest rank's each time,
the median of those.

    python bench/consolidate.py --root /tmp/consolidate-fsdp2 --world 2 --mode fsdp2 --size 150
    python bench/versions.py --before /tmp/before --after . --rounds 6 consolidate -- --root /tmp/c
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import spawn_ranks  # noqa: E402
from multirank import _PeakRss, build, width_for  # noqa: E402


def _join_rank(rank: int, world: int, cfg: dict) -> tuple:
    """This spawned rank in the job's gloo group, as torchrun would start it, and its model and
    optimizer."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ["LOCAL_WORLD_SIZE"] = str(world)  # as torchrun sets it: the ranks on this host
    dist.init_process_group("gloo", init_method=f"file://{cfg['store']}", rank=rank, world_size=world)
    return build(cfg["mode"], cfg["width"], world)


def _save_rank(rank: int, world: int, cfg: dict) -> None:
    import torch.distributed as dist

    import asyncckpt

    model, opt = _join_rank(rank, world, cfg)
    with asyncckpt.CheckpointManager(cfg["root"]) as mgr:
        mgr.save(1, {"model": model, "optimizer": opt}).wait()
    dist.barrier()
    dist.destroy_process_group()


def _restore_rank(rank: int, world: int, cfg: dict) -> None:
    import torch.distributed as dist

    import asyncckpt

    model, opt = _join_rank(rank, world, cfg)
    times = []
    for _ in range(cfg["repeats"]):
        dist.barrier()
        t0 = time.perf_counter()
        with asyncckpt.CheckpointManager(cfg["root"]) as mgr:
            if mgr.restore({"model": model, "optimizer": opt}) is None:
                raise SystemExit(f"nothing restored from {cfg['root']}")
        times.append(time.perf_counter() - t0)
        dist.barrier()
    Path(cfg["out"], f"rank-{rank}.json").write_text(json.dumps(times))
    dist.destroy_process_group()


def restore(root: Path, world: int, mode: str, size: float, repeats: int) -> float:
    """The median over ``repeats`` restores of the slowest rank's time, at ``world`` ranks."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = {"root": str(root), "mode": mode, "width": width_for(size), "store": f"{tmp}/store"}
        spawn_ranks(_restore_rank, world, {**cfg, "out": tmp, "repeats": repeats})
        per_rank = [json.loads(Path(tmp, f"rank-{r}.json").read_text()) for r in range(world)]
    return statistics.median(max(ts) for ts in zip(*per_rank, strict=True))


def make(root: Path, world: int, mode: str, size: float) -> None:
    """Save the checkpoint at ``root`` from ``world`` spawned ranks."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = {"root": str(root), "mode": mode, "width": width_for(size), "store": f"{tmp}/store"}
        spawn_ranks(_save_rank, world, cfg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, required=True, help="the checkpoint root (saved first when missing)")
    ap.add_argument("--world", type=int, default=2, help="ranks that save a missing root")
    ap.add_argument("--mode", choices=("fsdp2", "ddp"), default="fsdp2")
    ap.add_argument("--size", type=float, default=150.0, help="MB of state (parameters + AdamW moments)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--restore-world", type=int, default=0, help="also restore into this many ranks (0: no)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if not args.root.exists():
        make(args.root, args.world, args.mode, args.size)

    import torch

    import asyncckpt

    times, growth, nbytes = [], None, 0
    for _ in range(args.repeats):
        gc.collect()
        with _PeakRss() as peak:
            t0 = time.perf_counter()
            state = asyncckpt.load(args.root)
            times.append(time.perf_counter() - t0)
        if growth is None:
            growth = peak.peak - peak.start
            nbytes = sum(t.nbytes for t in _tensors(state, torch.Tensor))
        del state
    result = {
        "load_s": statistics.median(times),
        "peak_rss_growth_mb": (growth or 0) / 1e6,
        "state_mb": nbytes / 1e6,
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
    }
    if args.restore_world:
        result["restore_s"] = restore(args.root, args.restore_world, args.mode, args.size, args.repeats)
        print(f"restore at {args.restore_world} ranks {result['restore_s'] * 1e3:.0f} ms (slowest rank, median)")
    print(
        f"load {result['load_s'] * 1e3:.0f} ms (median of {args.repeats}), peak RSS growth "
        f"{result['peak_rss_growth_mb']:.1f} MB for a {result['state_mb']:.1f} MB state"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


def _tensors(node: object, kind: type) -> list:
    if isinstance(node, kind):
        return [node]
    if isinstance(node, dict):
        return [t for v in node.values() for t in _tensors(v, kind)]
    if isinstance(node, (list, tuple)):
        return [t for v in node for t in _tensors(v, kind)]
    return []


if __name__ == "__main__":
    main()
