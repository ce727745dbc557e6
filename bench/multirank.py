"""Many ranks: asyncckpt vs torch.distributed.checkpoint (DCP) at 2 and 4 gloo ranks on CPU.

Each configuration (FSDP2 or DDP, at each world size) is one set of spawned rank processes. Every
rank builds the same MLP + AdamW (one step taken, so the moments exist), of about --size MB in all
(parameters + two AdamW moments), and every saver saves that same state. Savers:

  floor                the bare copy of each rank's write set (the tensors asyncckpt writes on that
                       rank: its per-rank tensors and its pieces) into reused host buffers
  asyncckpt            CheckpointManager(root, snapshot="blocking", keep_last=2) on every rank
  asyncckpt-overlap    the same with snapshot="overlap"
  dcp                  dcp.async_save (thread) on a dedicated gloo group, get_state_dict each save
  dcp-stager           the same with one DefaultStager reused across saves (staging in a thread;
                       pinned, non-blocking copies only where there is an accelerator)
  dcp-zstd             the same as dcp, FileSystemWriter(..., _extensions=[ZStandard()])
  dcp-process          the same as dcp, async_checkpointer_type=AsyncCheckpointerType.PROCESS

A warm-up save of every saver comes first (discarded), then --rounds rounds, every saver once per
round, the order rotating by one each round. Per save, on every rank, after a barrier:
  stall      time the save call blocks the training thread (for DCP: get_state_dict + async_save)
  durable    from the save call to handle.wait() / future.result() returning; the max over ranks
  CPU        time.process_time() delta around save + completion (all threads of the rank), also
             getrusage(RUSAGE_SELF) and the CPU of the rank's child processes (DCP process mode)
  peak       the rank's RSS sampled every 2 ms during the save, minus the RSS before it
  bytes      what the rank wrote (its data file), and the whole checkpoint on disk
Loop overhead: after the save rounds, --rounds more rounds (no warm-up) of a training loop on
every rank (forward, backward, AdamW step on a batch of --loop-batch rows), saving every
--loop-every steps --loop-saves times, with --loop-every more steps after the last save, then a wait for
it; the same loop without saving ("none") runs in every round, in the rotation. Per save:
(loop time with the saver - loop time of that round's "none") / saves, the max over ranks, median
over rounds. DCP waits for the previous save's future before the next save; asyncckpt's manager
does the same (max_pending=1); in overlap mode the next optimizer step waits at the fence.
Restore N->N: asyncckpt ``restore`` into the live objects vs ``dcp.load`` + ``set_state_dict``.
N->M: the checkpoints of the 2-rank run are restored at 4 ranks, then those of the 4-rank run at 2.
N->1: ``asyncckpt.load(root)`` vs DCP's own full load (``_load_state_dict`` with
``_EmptyStateDictLoadPlanner``, what ``dcp_to_torch_save`` does), each in a fresh process.
Decoded vs needed bytes for an FSDP2 reshard: asyncckpt ``pieces.read_boxes`` over every target
rank's dim-0 shard; DCP reads each stored chunk overlapping a shard whole (computed from its
metadata).

    python bench/multirank.py --json bench/results/multirank-cpu.json      # ~150 MB state
    python bench/multirank.py --size 4 --rounds 1 --worlds 2                # a quick look
    python bench/multirank.py --loop-saves 0 ...                            # no loop rounds
    python bench/multirank.py --from-json bench/results/multirank-cpu.json  # the tables again
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import math
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, median, write_json  # noqa: E402

SAVERS = ("floor", "asyncckpt", "asyncckpt-overlap", "dcp", "dcp-stager", "dcp-zstd", "dcp-process")
MODES = ("fsdp2", "ddp")
DEPTH = 8


def width_for(size_mb: float) -> int:
    """The width of DEPTH square layers whose params + two AdamW moments come to about size_mb."""
    params = size_mb * 1e6 / 4 / 3
    return max(8, int(math.sqrt(params / DEPTH)) // 8 * 8)


def dir_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _children_cpu() -> float:
    """User + system seconds of this process's live descendants (DCP's process mode)."""
    tick = os.sysconf("SC_CLK_TCK")
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry)] = int(fields[1])
        cpu[int(entry)] = (int(fields[11]) + int(fields[12])) / tick
    total, mine = 0.0, {os.getpid()}
    grew = True
    while grew:
        grew = False
        for pid, ppid in parents.items():
            if ppid in mine and pid not in mine:
                mine.add(pid)
                total += cpu[pid]
                grew = True
    return total


class _PeakRss:
    """Samples this process's RSS in a thread; ``peak`` - ``start`` is the growth during the block."""

    def __enter__(self) -> _PeakRss:
        self.start = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


# ---------------------------------------------------------------------------------------------
# inside a rank


def build(mode: str, width: int, world: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model: torch.nn.Module = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(DEPTH)])
    if mode == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in list(model.children()):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    else:
        model = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    torch.manual_seed(1 + torch.distributed.get_rank())
    model(torch.randn(8, width)).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()
    return model, opt


class Saver:
    name = ""

    def __init__(self, ctx: dict) -> None:
        self.ctx = ctx
        self.root: Path = ctx["root"] / self.name
        self.rank, self.world = ctx["rank"], ctx["world"]

    def save(self, step: int) -> None:
        raise NotImplementedError

    def wait(self) -> None:
        pass

    def rank_bytes(self) -> int:
        return 0

    def disk_bytes(self) -> int:
        return 0

    def close(self) -> None:
        pass


class Floor(Saver):
    name = "floor"

    def __init__(self, ctx: dict) -> None:
        super().__init__(ctx)
        from asyncckpt.state.shards import RankInfo, flatten_rank

        flat = flatten_rank(ctx["state"](), RankInfo(self.rank, self.world))
        self.sources = list(flat.tensors)
        self.buffers = [torch.empty_like(t) for t in self.sources]
        self.nbytes = sum(t.numel() * t.element_size() for t in self.sources)

    def save(self, step: int) -> None:
        for b, t in zip(self.buffers, self.sources, strict=True):
            b.copy_(t)

    def rank_bytes(self) -> int:
        return self.nbytes


class AsyncCkpt(Saver):
    name = "asyncckpt"
    snapshot = "blocking"

    def __init__(self, ctx: dict) -> None:
        super().__init__(ctx)
        import asyncckpt

        self.mgr = asyncckpt.CheckpointManager(self.root, snapshot=self.snapshot, keep_last=2)
        self.handle: Any = None

    def save(self, step: int) -> None:
        self.handle = self.mgr.save(step, self.ctx["state"]())

    def wait(self) -> None:
        self.handle.wait()

    def _newest(self) -> Path:
        return max(self.root.rglob("rank-00000.json"), key=lambda p: p.stat().st_mtime).parent

    def rank_bytes(self) -> int:
        return (self._newest() / f"data-{self.rank:05d}.bin").stat().st_size

    def disk_bytes(self) -> int:
        return dir_bytes(self._newest())

    def close(self) -> None:
        self.mgr.close()


class AsyncCkptOverlap(AsyncCkpt):
    name = "asyncckpt-overlap"
    snapshot = "overlap"


class Dcp(Saver):
    name = "dcp"

    def __init__(self, ctx: dict) -> None:
        super().__init__(ctx)
        self.future: Any = None
        self.step = -1

    def _dcp_state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(self.ctx["model"], self.ctx["opt"])
        return {"model": msd, "optim": osd}

    def _kwargs(self, path: Path) -> dict:
        return {"checkpoint_id": str(path)}

    def save(self, step: int) -> None:
        import torch.distributed.checkpoint as dcp

        if self.future is not None:  # never two in flight
            self.future.result()
        if self.rank == 0 and self.step >= 0:  # keep the newest two (as keep_last=2): the loop saves many
            for old in self.root.glob("step-*"):
                if int(old.name.split("-")[1]) < self.step:
                    shutil.rmtree(old, ignore_errors=True)
        self.step = step
        out = dcp.async_save(self._dcp_state(), process_group=self.ctx["dcp_pg"], **self._kwargs(self.path(step)))
        self.future = getattr(out, "upload_completion", out)

    def path(self, step: int) -> Path:
        return self.root / f"step-{step}"

    def wait(self) -> None:
        self.future.result()
        self.future = None

    def rank_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.path(self.step).glob(f"__{self.rank}_*.distcp"))

    def disk_bytes(self) -> int:
        return dir_bytes(self.path(self.step))


class DcpStager(Dcp):
    name = "dcp-stager"

    def __init__(self, ctx: dict) -> None:
        super().__init__(ctx)
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        gpu = torch.cuda.is_available()  # pinned memory and non-blocking copies need an accelerator
        self.stager = DefaultStager(StagingOptions(gpu, False, True, gpu))

    def _kwargs(self, path: Path) -> dict:
        return {"checkpoint_id": str(path), "async_stager": self.stager}

    def close(self) -> None:
        self.stager.close()


class DcpZstd(Dcp):
    name = "dcp-zstd"

    def _kwargs(self, path: Path) -> dict:
        from torch.distributed.checkpoint import FileSystemWriter
        from torch.distributed.checkpoint._extension import ZStandard

        return {"storage_writer": FileSystemWriter(str(path), _extensions=[ZStandard()])}


class DcpProcess(Dcp):
    name = "dcp-process"

    def _kwargs(self, path: Path) -> dict:
        from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

        return {"checkpoint_id": str(path), "async_checkpointer_type": AsyncCheckpointerType.PROCESS}


SAVER_CLASSES: dict[str, type[Saver]] = {
    c.name: c for c in (Floor, AsyncCkpt, AsyncCkptOverlap, Dcp, DcpStager, DcpZstd, DcpProcess)
}


def _cpu() -> tuple[float, float, float]:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return time.process_time(), ru.ru_utime + ru.ru_stime, _children_cpu()


def _measure_save(saver: Saver, step: int, pg: Any) -> dict:
    import torch.distributed as dist

    dist.barrier(group=pg)
    with _PeakRss() as peak:
        pt0, ru0, ch0 = _cpu()
        t0 = time.perf_counter()
        saver.save(step)
        t1 = time.perf_counter()
        saver.wait()
        t2 = time.perf_counter()
        pt1, ru1, ch1 = _cpu()
    dist.barrier(group=pg)
    return {
        "stall_s": t1 - t0,
        "durable_s": t2 - t0,
        "cpu_s": pt1 - pt0,
        "cpu_rusage_s": ru1 - ru0,
        "cpu_children_s": max(0.0, ch1 - ch0),
        "peak_rss_growth": peak.peak - peak.start,
        "rank_bytes": saver.rank_bytes(),
        "disk_bytes": saver.disk_bytes() if saver.rank == 0 else 0,
    }


def _train_step(model: Any, opt: Any, x: torch.Tensor) -> None:
    model(x).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()


def _measure_loop(saver: Saver | None, first_step: int, cfg: dict, ctx: dict, x: torch.Tensor, pg: Any) -> float:
    """Seconds for (saves + 1) * every training steps, saving after every ``every``-th step but the
    last ``every`` ones, and then waiting for the last save."""
    import torch.distributed as dist

    every, saves = cfg["loop_every"], cfg["loop_saves"]
    dist.barrier(group=pg)
    t0 = time.perf_counter()
    for i in range(1, (saves + 1) * every + 1):
        _train_step(ctx["model"], ctx["opt"], x)
        if saver is not None and i % every == 0 and i <= saves * every:
            saver.save(first_step + i)
    if saver is not None:
        saver.wait()
    t = time.perf_counter() - t0
    dist.barrier(group=pg)
    return t


def _timed(fn: Any, pg: Any) -> float:
    import torch.distributed as dist

    dist.barrier(group=pg)
    t0 = time.perf_counter()
    fn()
    t = time.perf_counter() - t0
    dist.barrier(group=pg)
    return t


def _restore_asyncckpt(root: Path, model: Any, opt: Any) -> None:
    import asyncckpt

    mgr = asyncckpt.CheckpointManager(root, keep_last=2)
    try:
        if mgr.restore({"model": model, "optimizer": opt}) is None:
            raise RuntimeError(f"nothing restored from {root}")
    finally:
        mgr.close()


def _restore_dcp(path: Path, model: Any, opt: Any, pg: Any) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(path), process_group=pg)
    set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)  # loaded in place


def _newest_dcp(root: Path) -> Path:
    return max(root.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))


def rank_main(rank: int, world: int, cfg: dict) -> None:
    """One rank: build, save with every saver over the rounds, restore; results to a JSON file."""
    import torch.distributed as dist

    out: dict[str, Any] = {"rank": rank, "saves": {}, "loop": {}, "restore": {}}
    stacks = open(Path(cfg["out"], f"stacks-{rank}.txt"), "w")  # noqa: SIM115
    faulthandler.dump_traceback_later(cfg["timeout"] - 5, file=stacks)  # where a stuck rank was
    os.environ["LOCAL_WORLD_SIZE"] = str(world)  # as torchrun sets it: the ranks on this host
    try:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        dist.init_process_group("gloo", init_method=f"file://{cfg['store']}", rank=rank, world_size=world)
        bench_pg = dist.new_group(backend="gloo")
        dcp_pg = dist.new_group(backend="gloo")
        model, opt = build(cfg["mode"], cfg["width"], world)
        ctx = {
            "root": Path(cfg["root"]),
            "rank": rank,
            "world": world,
            "model": model,
            "opt": opt,
            "dcp_pg": dcp_pg,
            "state": lambda: {"model": model, "optimizer": opt},
        }
        savers = [SAVER_CLASSES[n](ctx) for n in cfg["savers"]]
        step = 0
        for rnd in range(cfg["rounds"] + 1):  # round 0: warm-up, discarded
            shift = rnd % max(1, len(savers))
            for saver in savers[shift:] + savers[:shift]:
                step += 1
                m = _measure_save(saver, step, bench_pg)
                m["round"] = rnd
                if rnd:
                    out["saves"].setdefault(saver.name, []).append(m)
        if cfg.get("loop_saves", 0) > 0 and savers:
            torch.manual_seed(100 + rank)
            x = torch.randn(cfg["loop_batch"], cfg["width"])
            loop: list[Saver | None] = [None, *savers]
            span = (cfg["loop_saves"] + 1) * cfg["loop_every"]
            out["loop_saves"], out["loop_steps"] = cfg["loop_saves"], span
            for rnd in range(cfg["rounds"]):  # no warm-up: every saver has saved by now
                shift = rnd % len(loop)
                for s in loop[shift:] + loop[:shift]:
                    t = _measure_loop(s, step, cfg, ctx, x, bench_pg)
                    step += span
                    out["loop"].setdefault(s.name if s else "none", []).append(t)
        for saver in savers:
            saver.close()
        root = Path(cfg["root"])
        restore: dict[str, list[float]] = {}
        sources = [("nn", root)] + ([("nm", Path(cfg["restore_from"]))] if cfg.get("restore_from") else [])
        for kind, src in sources:
            for _ in range(cfg["restore_repeats"]):
                if (src / "asyncckpt").exists():
                    t = _timed(lambda s=src: _restore_asyncckpt(s / "asyncckpt", model, opt), bench_pg)
                    restore.setdefault(f"{kind}:asyncckpt", []).append(t)
                if (src / "dcp").exists():
                    t = _timed(lambda s=src: _restore_dcp(_newest_dcp(s / "dcp"), model, opt, dcp_pg), bench_pg)
                    restore.setdefault(f"{kind}:dcp", []).append(t)
        out["restore"] = restore
        out["maxrss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # since the spawn's fork
        dist.barrier(group=bench_pg)
        dist.destroy_process_group()
    except BaseException:
        out["error"] = traceback.format_exc()
    Path(cfg["out"], f"rank-{rank}.json").write_text(json.dumps(out))


def _rank_entry(rank: int, world: int, cfg: dict) -> None:
    rank_main(rank, world, cfg)


def run_world(mode: str, world: int, cfg: dict, timeout: float) -> list[dict]:
    """Spawn ``world`` ranks running rank_main; their results, by rank."""
    import multiprocessing

    out = Path(tempfile.mkdtemp(prefix="mr-out-"))
    store = Path(tempfile.mkdtemp(prefix="mr-store-")) / "store"
    cfg = {**cfg, "mode": mode, "out": str(out), "store": str(store), "timeout": timeout}
    spawn = multiprocessing.get_context("spawn")
    procs = [spawn.Process(target=_rank_entry, args=(r, world, cfg)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(1.0, deadline - time.monotonic()))
    stuck = [p for p in procs if p.is_alive()]
    if stuck:
        for f in sorted(out.glob("stacks-*.txt")):
            print(f"--- {f.name}\n{f.read_text()[-6000:]}", file=sys.stderr)
    for p in stuck:
        p.kill()
        p.join()
    results = []
    for r in range(world):
        f = out / f"rank-{r}.json"
        if not f.exists():
            raise RuntimeError(f"{mode} x{world}: rank {r} left no result (timed out: {bool(stuck)})")
        results.append(json.loads(f.read_text()))
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(store.parent, ignore_errors=True)
    errors = [f"rank {r['rank']}:\n{r['error']}" for r in results if "error" in r]
    if errors:
        raise RuntimeError(f"{mode} x{world} failed:\n" + "\n".join(errors))
    return results


# ---------------------------------------------------------------------------------------------
# in one process: N->1 loads and reshard reads


def _load_one(kind: str, path: str, out: str) -> None:
    # RSS sampled, not ru_maxrss: a spawned child starts with its parent's high-water mark
    with _PeakRss() as peak:
        t0 = time.perf_counter()
        if kind == "asyncckpt":
            import asyncckpt

            state = asyncckpt.load(path)
        else:
            from torch.distributed.checkpoint import FileSystemReader
            from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
            from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

            state = {}
            reader = FileSystemReader(path)
            _load_state_dict(state, storage_reader=reader, planner=_EmptyStateDictLoadPlanner(), no_dist=True)
        t = time.perf_counter() - t0
    del state
    Path(out).write_text(json.dumps({"s": t, "peak_rss_growth": peak.peak - peak.start}))


def load_one(kind: str, path: Path) -> dict:
    import multiprocessing

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        p = multiprocessing.get_context("spawn").Process(target=_load_one, args=(kind, str(path), str(out)))
        p.start()
        p.join(600)
        if not out.exists():
            raise RuntimeError(f"N->1 load by {kind} of {path} failed")
        return json.loads(out.read_text())


def _rows_boxes(shape: tuple[int, ...], world: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """FSDP2's dim-0 shards of a tensor of ``shape`` at ``world`` ranks (whole for 0-d tensors)."""
    if not shape:
        return [((), ())] * world
    chunk = math.ceil(shape[0] / world)
    boxes = []
    for r in range(world):
        start = min(shape[0], r * chunk)
        rows = max(0, min(shape[0] - start, chunk))
        boxes.append(((start, *(0,) * (len(shape) - 1)), (rows, *shape[1:])))
    return boxes


def reshard_bytes(ackpt_root: Path, dcp_dir: Path, world: int) -> dict:
    """Bytes decoded vs needed to give every one of ``world`` FSDP2 ranks its shards, summed over
    the ranks (each rank reads on its own: a chunk two ranks need is decoded twice, on both)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from asyncckpt.engine import pieces
    from asyncckpt.engine.reader import read_manifest
    from asyncckpt.format import DTYPES

    step_dir = max(ackpt_root.rglob("rank-00000.json"), key=lambda p: p.stat().st_mtime).parent
    view: Any = read_manifest(step_dir)
    by_rank: list[list[Any]] = [[] for _ in range(world)]
    needed = decoded = 0
    for i, g in enumerate(view.globals):
        size = torch.empty((), dtype=DTYPES[g.dtype]).element_size()
        for rank, (off, shp) in enumerate(_rows_boxes(tuple(g.shape), world)):
            by_rank[rank].append(pieces.Box(i, off, shp))
            needed += math.prod(shp) * size
    for boxes in by_rank:
        decoded += pieces.read_boxes(step_dir, view, boxes, 2)[1]
    meta = FileSystemReader(str(dcp_dir)).read_metadata()
    d_needed = d_read = 0
    for md in meta.state_dict_metadata.values():
        if not isinstance(md, TensorStorageMetadata):
            continue
        size = torch.empty((), dtype=md.properties.dtype).element_size()
        for off, shp in _rows_boxes(tuple(md.size), world):
            d_needed += math.prod(shp) * size
            if not math.prod(shp) and shp:
                continue
            for c in md.chunks:
                if all(o < co + cs and co < o + s for o, s, co, cs in zip(off, shp, c.offsets, c.sizes, strict=True)):
                    d_read += math.prod(c.sizes) * size
    return {"asyncckpt": {"decoded": decoded, "needed": needed}, "dcp": {"decoded": d_read, "needed": d_needed}}


# ---------------------------------------------------------------------------------------------
# summary and tables


def summarize(results: list[dict]) -> dict:
    """Per saver: medians over rounds of the per-round max / median / mean over ranks."""
    out: dict[str, Any] = {}
    names = sorted(results[0]["saves"], key=SAVERS.index)
    rounds = len(results[0]["saves"][names[0]])
    for name in names:
        per_round: dict[str, list[float]] = {}
        for i in range(rounds):
            ms = [r["saves"][name][i] for r in results]
            row = {
                "stall_max_s": max(m["stall_s"] for m in ms),
                "stall_median_s": median([m["stall_s"] for m in ms]),
                "durable_s": max(m["durable_s"] for m in ms),
                "cpu_mean_s": sum(m["cpu_s"] + m["cpu_children_s"] for m in ms) / len(ms),
                "cpu_max_s": max(m["cpu_s"] + m["cpu_children_s"] for m in ms),
                "cpu_rusage_mean_s": sum(m["cpu_rusage_s"] + m["cpu_children_s"] for m in ms) / len(ms),
                "cpu_children_mean_s": sum(m["cpu_children_s"] for m in ms) / len(ms),
                "peak_rss_growth_max": max(m["peak_rss_growth"] for m in ms),
                "rank_bytes_max": max(m["rank_bytes"] for m in ms),
                "rank_bytes_mean": sum(m["rank_bytes"] for m in ms) / len(ms),
                "disk_bytes": max(m["disk_bytes"] for m in ms),
            }
            for k, v in row.items():
                per_round.setdefault(k, []).append(v)
        out[name] = {k: median(v) for k, v in per_round.items()} | {"rounds": per_round}
    loop_step_s = None
    if results[0].get("loop", {}).get("none"):
        nloop = len(results[0]["loop"]["none"])
        saves = results[0]["loop_saves"]
        for name in names:
            over = [max((r["loop"][name][i] - r["loop"]["none"][i]) / saves for r in results) for i in range(nloop)]
            out[name]["loop_overhead_s"] = median(over)
            out[name]["rounds"]["loop_overhead_s"] = over
        loop_step_s = median(
            [max(r["loop"]["none"][i] for r in results) / results[0]["loop_steps"] for i in range(nloop)]
        )
    restore: dict[str, float] = {}
    for key in results[0]["restore"]:
        times = [max(r["restore"][key][i] for r in results) for i in range(len(results[0]["restore"][key]))]
        restore[key] = median(times)
    return {
        "savers": out,
        "restore_s": restore,
        "loop_step_s": loop_step_s,
        "maxrss_max": max(r.get("maxrss_bytes", 0) for r in results),
    }


def _mb(b: float) -> str:
    return f"{b / 1e6:.1f}"


def tables(payload: dict) -> str:
    lines = []
    cfg = payload["config"]
    lines.append(
        f"State: {DEPTH} x Linear({cfg['width']}) + AdamW after one step, {_mb(cfg['state_bytes'])} MB in all; "
        f"{cfg['rounds']} interleaved rounds, medians; load average {payload.get('load_before', '?')} before, "
        f"{payload.get('load_after', '?')} after."
    )
    if cfg.get("loop_saves"):
        steps = ", ".join(
            f"{k} {r['loop_step_s'] * 1e3:.0f} ms" for k, r in payload["runs"].items() if r.get("loop_step_s")
        )
        lines.append(
            f"Loop: batch {cfg['loop_batch']}, a save every {cfg['loop_every']} steps, {cfg['loop_saves']} saves "
            f"and {cfg['loop_every']} more steps per loop; a step without saving: {steps}."
        )
    lines.append("")
    lines.append(
        "| setup | saver | stall max / median over ranks (ms) | durable (s) | CPU s per rank mean / max | "
        "written per rank max / mean (MB) | on disk (MB) | RSS growth during save, max rank (MB) | "
        "loop overhead per save (ms) |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for key, res in payload["runs"].items():
        for name, s in res["savers"].items():
            lines.append(
                f"| {key} | {name} | {s['stall_max_s'] * 1e3:.1f} / {s['stall_median_s'] * 1e3:.1f} | "
                f"{s['durable_s']:.2f} | {s['cpu_mean_s']:.2f} / {s['cpu_max_s']:.2f} | "
                f"{_mb(s['rank_bytes_max'])} / {_mb(s['rank_bytes_mean'])} | "
                f"{_mb(s['disk_bytes']) if s['disk_bytes'] else '-'} | {_mb(s['peak_rss_growth_max'])} | "
                + (f"{s['loop_overhead_s'] * 1e3:.0f} |" if "loop_overhead_s" in s else "- |")
            )
    lines.append("")
    lines.append("Targets (asyncckpt overlap / blocking against DCP async_save default and with a reused stager):")
    lines.append("")
    lines.append(
        "| setup | against | stall ratio (target <= 0.2) | durable ratio (<= 1.0) | on disk ratio (<= 0.85) | "
        "CPU per rank ratio (<= 1.1) | loop overhead per save, ms (ours / theirs) |"
    )
    lines.append("|---|---|---|---|---|---|---|")
    for key, res in payload["runs"].items():
        sv = res["savers"]
        for ours in ("asyncckpt-overlap", "asyncckpt"):
            for theirs in ("dcp", "dcp-stager"):
                if ours not in sv or theirs not in sv:
                    continue
                a, b = sv[ours], sv[theirs]

                def r(x: float, y: float, limit: float) -> str:
                    v = x / y if y else float("nan")
                    return f"{v:.2f} {'yes' if v <= limit else 'NO'}"

                lines.append(
                    f"| {key} | {ours} vs {theirs} | {r(a['stall_max_s'], b['stall_max_s'], 0.2)} | "
                    f"{r(a['durable_s'], b['durable_s'], 1.0)} | {r(a['disk_bytes'], b['disk_bytes'], 0.85)} | "
                    f"{r(a['cpu_mean_s'], b['cpu_mean_s'], 1.1)} | "
                    + (
                        f"{a['loop_overhead_s'] * 1e3:.0f} / {b['loop_overhead_s'] * 1e3:.0f} |"
                        if "loop_overhead_s" in a and "loop_overhead_s" in b
                        else "- |"
                    )
                )
    lines.append("")
    lines.append("Restore, max over ranks, medians (s); N->1: one process, peak RSS growth in MB:")
    lines.append("")
    lines.append("| setup | N->N asyncckpt / DCP | N->M asyncckpt / DCP | N->1 asyncckpt / DCP (s) | N->1 RSS (MB) |")
    lines.append("|---|---|---|---|---|")
    for key, res in payload["runs"].items():
        rs = res["restore_s"]
        one = res.get("to_one", {})

        def pair(a: str, b: str, d: dict = rs) -> str:
            return f"{d[a]:.2f} / {d[b]:.2f}" if a in d and b in d else "-"

        nm = pair("nm:asyncckpt", "nm:dcp")
        if nm != "-":
            nm += f" (from {res.get('restore_from_world')} ranks)"
        n1 = f"{one['asyncckpt']['s']:.2f} / {one['dcp']['s']:.2f}" if one else "-"
        rss = f"{_mb(one['asyncckpt']['peak_rss_growth'])} / {_mb(one['dcp']['peak_rss_growth'])}" if one else "-"
        lines.append(f"| {key} | {pair('nn:asyncckpt', 'nn:dcp')} | {nm} | {n1} | {rss} |")
    if payload.get("reshard"):
        lines.append("")
        lines.append("FSDP2 reshard, bytes decoded (asyncckpt) or read (DCP) / bytes the target ranks need:")
        lines.append("")
        lines.append("| reshard | asyncckpt decoded / needed (MB) | DCP read / needed (MB) |")
        lines.append("|---|---|---|")
        for key, rb in payload["reshard"].items():
            a, d = rb["asyncckpt"], rb["dcp"]
            lines.append(
                f"| {key} | {_mb(a['decoded'])} / {_mb(a['needed'])} ({a['decoded'] / a['needed']:.3f}) | "
                f"{_mb(d['decoded'])} / {_mb(d['needed'])} ({d['decoded'] / d['needed']:.3f}) |"
            )
    return "\n".join(lines)


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=float, default=150.0, help="state MB: params + AdamW moments (default 150)")
    p.add_argument("--worlds", default="2,4")
    p.add_argument("--modes", default="fsdp2,ddp")
    p.add_argument("--savers", default=",".join(SAVERS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--restore-repeats", type=int, default=2)
    p.add_argument("--loop-saves", type=int, default=2, help="saves per training loop; 0: no loop rounds")
    p.add_argument("--loop-every", type=int, default=3, help="training steps between saves in the loop")
    p.add_argument("--loop-batch", type=int, default=8, help="rows per training step in the loop")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per spawned world")
    p.add_argument("--root", help="where checkpoints go (default: a temporary directory, removed)")
    p.add_argument("--json")
    p.add_argument("--from-json", help="print the tables of a results file and stop")
    args = p.parse_args(argv)
    if args.from_json:
        stored: dict = json.loads(Path(args.from_json).read_text())
        print(tables(stored))
        return stored
    savers = [s for s in args.savers.split(",") if s]
    unknown = set(savers) - set(SAVERS)
    if unknown:
        p.error(f"unknown savers {sorted(unknown)}; known: {', '.join(SAVERS)}")
    worlds = [int(w) for w in args.worlds.split(",")]
    width = width_for(args.size)
    state_bytes = DEPTH * (width * width + width) * 4 * 3
    base = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="multirank-"))
    payload: dict[str, Any] = {
        "machine": machine() | {"backend": "gloo", "device": "cpu"},
        "config": {
            "size_mb": args.size,
            "width": width,
            "depth": DEPTH,
            "state_bytes": state_bytes,
            "rounds": args.rounds,
            "restore_repeats": args.restore_repeats,
            "loop_saves": args.loop_saves,
            "loop_every": args.loop_every,
            "loop_batch": args.loop_batch,
            "savers": savers,
            "worlds": worlds,
        },
        "load_before": _load(),
        "runs": {},
        "reshard": {},
    }
    common = {
        "width": width,
        "savers": savers,
        "rounds": args.rounds,
        "restore_repeats": args.restore_repeats,
        "loop_saves": args.loop_saves,
        "loop_every": args.loop_every,
        "loop_batch": args.loop_batch,
    }
    try:
        for mode in args.modes.split(","):
            previous: tuple[int, Path] | None = None
            for world in worlds:
                root = base / f"{mode}-{world}"
                cfg = common | {"root": str(root), "restore_from": str(previous[1]) if previous else None}
                t0 = time.perf_counter()
                res = summarize(run_world(mode, world, cfg, args.timeout))
                key = f"{mode} x{world}"
                res["wall_s"] = time.perf_counter() - t0
                if previous:
                    res["restore_from_world"] = previous[0]
                    if mode == "fsdp2":
                        payload["reshard"][f"{previous[0]}->{world}"] = reshard_bytes(
                            previous[1] / "asyncckpt", _newest_dcp(previous[1] / "dcp"), world
                        )
                if (root / "asyncckpt").exists() and (root / "dcp").exists():
                    res["to_one"] = {
                        "asyncckpt": load_one("asyncckpt", root / "asyncckpt"),
                        "dcp": load_one("dcp", _newest_dcp(root / "dcp")),
                    }
                payload["runs"][key] = res
                print(f"{key}: {res['wall_s']:.0f} s", file=sys.stderr, flush=True)
                previous = (world, root)
            if len(worlds) > 1 and previous is not None:
                # the reverse reshard: the last world's checkpoints restored at the first world size
                first, last_root = worlds[0], previous[1]
                cfg = common | {
                    "root": str(base / f"{mode}-{first}-back"),
                    "savers": [],
                    "rounds": 0,
                    "restore_from": str(last_root),
                }
                back = run_world(mode, first, cfg, args.timeout)
                restore = {
                    k: median([max(r["restore"][k][i] for r in back) for i in range(len(back[0]["restore"][k]))])
                    for k in back[0]["restore"]
                }
                payload["runs"][f"{mode} x{first} (from x{previous[0]})"] = {
                    "savers": {},
                    "restore_s": restore,
                    "restore_from_world": previous[0],
                }
                if mode == "fsdp2":
                    payload["reshard"][f"{previous[0]}->{first}"] = reshard_bytes(
                        last_root / "asyncckpt", _newest_dcp(last_root / "dcp"), first
                    )
    finally:
        if not args.root:
            shutil.rmtree(base, ignore_errors=True)
    payload["load_after"] = _load()
    write_json(args.json, payload)
    print(tables(payload))
    return payload


if __name__ == "__main__":
    main()
