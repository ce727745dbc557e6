"""Per-checkpoint training-loop overhead: asyncckpt vs the savers users would pick instead.

One model + AdamW state, one training loop with a checkpoint every --every iterations, run once
without checkpoints and once per saver, interleaved over --repeats rounds so machine noise hits
all alike. Reported per saver (medians over rounds):
  stall      time the training thread spent inside the save call
  fence      overlap mode: training waiting for the copy at its next optimizer step; the host's
             wait or, on GPU, the compute stream's (CUDA events: the host does not block there)
  overhead   (loop time with saves - loop time without) / checkpoints: stall plus the slowdown
             background work causes (on 2 cores the encoder threads compete with training)
  CPU        process CPU time (all threads, user + system; the kernel's writeback threads aside)
             per checkpoint, measured after the loop with training stopped: --cpu-saves saves,
             each drained. Inside the loop it cannot be separated from training's own CPU time,
             which varies by seconds between rounds (spinning worker threads count as busy).
  durable    from the save call to the checkpoint being durable on disk; for asyncckpt also the
             medians of its persist phases (compress, summed over the encoder threads; write;
             fsync; commit), which say whether the encoders or the disk bound it
  on disk    bytes of one checkpoint
The floor is a bare copy of the state into a reused buffer (pinned on GPU), measured in the run.

    python bench/stall.py                      # ~0.4 GB state on CPU, a few minutes
    python bench/stall.py --width 1024 --depth 4 --iters 40 --repeats 2   # quick look
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
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
from asyncckpt.metrics import fence_cost_s  # noqa: E402


def dir_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


PERSIST_PHASES = ("compress", "write", "fsync", "commit")  # SaveRecord's {phase}_s fields


class Saver:
    """One way to checkpoint. ``save`` is what the training thread pays; ``drain`` waits the rest."""

    name = ""

    def __init__(self, root: Path, model, opt) -> None:
        self.root, self.model, self.opt = root, model, opt
        self.durable: list[float] = []
        self.fence_waits: list[float] = []  # overlap mode: training waiting at the next optimizer step
        self.encoder_cpu: list[float] = []  # asyncckpt: its encoder threads' own CPU seconds per save
        self.phases: dict[str, list[float]] = {}  # asyncckpt: persist time by phase, per save

    def save(self, step: int) -> None:
        raise NotImplementedError

    def drain(self) -> None:
        pass

    def close(self) -> None:
        self.drain()

    def bytes_on_disk(self) -> int:
        return 0


class NoSave(Saver):
    name = "no checkpoints"

    def save(self, step: int) -> None:
        pass


class AsyncCkpt(Saver):
    name = "asyncckpt blocking"
    compression: str | None = "zstd"
    snapshot = "blocking"

    def __init__(self, root, model, opt) -> None:
        super().__init__(root, model, opt)
        self.mgr = asyncckpt.CheckpointManager(root, keep_last=2, compression=self.compression, snapshot=self.snapshot)
        self.state = {"model": model, "optimizer": opt}
        self.mgr.prepare(self.state).result()

    def save(self, step: int) -> None:
        self.mgr.save(step, self.state)

    def drain(self) -> None:
        self.mgr.wait()
        records = self.mgr.stats.records
        self.durable = [r.stall_s + r.persist_s for r in records]
        self.encoder_cpu = [r.compress_cpu_s for r in records]
        self.fence_waits = [fence_cost_s(r) for r in records]
        # what bounds save -> durable: the encoders (summed over threads), the writes or fsync
        self.phases = {phase: [getattr(r, f"{phase}_s") for r in records] for phase in PERSIST_PHASES}

    def close(self) -> None:
        self.mgr.close()

    def bytes_on_disk(self) -> int:
        steps = self.mgr.steps()
        return dir_bytes(self.root / f"step-{steps[-1]:012d}") if steps else 0


class AsyncCkptRaw(AsyncCkpt):
    name = "asyncckpt blocking, compression=None"
    compression = None


class AsyncCkptOverlap(AsyncCkpt):
    name = "asyncckpt overlap"
    snapshot = "overlap"


class AsyncCkptOverlapOneOmp(AsyncCkptOverlap):
    """Overlap mode with each encoder thread limited to one OpenMP thread (that thread only): on a
    many-core GPU host each of the 8 workers otherwise runs OpenMP teams as wide as the machine for
    its byte grouping, next to the training thread that launches the kernels."""

    name = "asyncckpt overlap, one OpenMP thread per encoder"

    def __init__(self, root, model, opt) -> None:
        default = pipeline.Pipeline._init_worker
        pipeline.Pipeline._init_worker = openmp_limited_init(default, 1)  # bound into this manager's pool, below
        try:
            super().__init__(root, model, opt)
        finally:
            pipeline.Pipeline._init_worker = default


class TorchSave(Saver):
    name = "torch.save + fsync (synchronous)"

    def save(self, step: int) -> None:
        began = time.perf_counter()
        path = self.root / "ckpt.pt"
        with open(path, "wb") as f:
            torch.save({"model": self.model.state_dict(), "optimizer": self.opt.state_dict()}, f)
            f.flush()
            os.fsync(f.fileno())
        self.durable.append(time.perf_counter() - began)

    def bytes_on_disk(self) -> int:
        return dir_bytes(self.root / "ckpt.pt")


class TorchSaveThread(Saver):
    name = ".cpu() copy + torch.save in a thread"

    def __init__(self, root, model, opt) -> None:
        super().__init__(root, model, opt)
        self.thread: threading.Thread | None = None

    def save(self, step: int) -> None:
        began = time.perf_counter()
        self.drain()
        # the copy must happen before returning, like any correct async saver
        sd = {
            "model": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
            "optimizer": _clone_tree(self.opt.state_dict()),
        }

        def write() -> None:
            with open(self.root / "ckpt.pt", "wb") as f:
                torch.save(sd, f)
                f.flush()
                os.fsync(f.fileno())
            self.durable.append(time.perf_counter() - began)

        self.thread = threading.Thread(target=write)
        self.thread.start()

    def drain(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None

    def bytes_on_disk(self) -> int:
        return dir_bytes(self.root / "ckpt.pt")


def _clone_tree(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _clone_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone_tree(v) for v in obj)
    return obj


class DcpAsync(Saver):
    name = "torch.distributed.checkpoint.async_save (default)"

    def __init__(self, root, model, opt) -> None:
        super().__init__(root, model, opt)
        import torch.distributed.checkpoint as dcp

        self.dcp = dcp
        self.future = None
        self.began = 0.0

    def save(self, step: int) -> None:
        self.drain()
        self.began = time.perf_counter()
        state = {"model": self.model.state_dict(), "optimizer": self.opt.state_dict()}
        self.future = self.dcp.async_save(state, checkpoint_id=str(self.root / f"step-{step}"))

    def drain(self) -> None:
        if self.future is not None:
            self.future.result()
            self.durable.append(time.perf_counter() - self.began)
            self.future = None

    def bytes_on_disk(self) -> int:
        dirs = sorted(self.root.glob("step-*"))
        return dir_bytes(dirs[-1]) if dirs else 0


class DcpCachedStager(DcpAsync):
    name = "DCP async_save, DefaultStager(StagingOptions(True, False, True, True)) reused"

    def __init__(self, root, model, opt) -> None:
        super().__init__(root, model, opt)
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        self.stager = DefaultStager(StagingOptions(True, False, True, True))

    def save(self, step: int) -> None:
        self.drain()
        self.began = time.perf_counter()
        state = {"model": self.model.state_dict(), "optimizer": self.opt.state_dict()}
        response = self.dcp.async_save(state, checkpoint_id=str(self.root / f"step-{step}"), async_stager=self.stager)
        # with an async stager DCP answers with a response holding the upload future
        self.future = getattr(response, "upload_completion", response)

    def close(self) -> None:
        super().close()
        self.stager.close()


SAVERS = {
    "none": NoSave,
    "asyncckpt": AsyncCkpt,
    "asyncckpt-raw": AsyncCkptRaw,
    "asyncckpt-overlap": AsyncCkptOverlap,
    "asyncckpt-overlap-omp1": AsyncCkptOverlapOneOmp,  # not in the default set: gpu_check.sh's overlap step
    "torch.save": TorchSave,
    "torch.save-thread": TorchSaveThread,
    "dcp": DcpAsync,
    "dcp-stager": DcpCachedStager,  # GPU only by default (a pinned, reused stager is a GPU feature)
}


def bare_copy_floor(model, opt, device: str, repeats: int = 5) -> float:
    tensors = list(model.state_dict().values())
    for per_param in opt.state_dict()["state"].values():
        tensors += [v for v in per_param.values() if isinstance(v, torch.Tensor)]
    pinned = device.startswith("cuda")
    buffers = [torch.empty(t.shape, dtype=t.dtype, pin_memory=pinned) for t in tensors]
    times = []
    for _ in range(repeats + 1):
        began = time.perf_counter()
        for buf, t in zip(buffers, tensors, strict=True):
            buf.copy_(t, non_blocking=pinned)
        if pinned:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - began)
    return median(times[1:])


def run_loop(
    saver: Saver, model, opt, iters: int, every: int, batch: int, width: int, device: str, host_data: bool = False
):
    """Train ``iters`` steps, saving every ``every``. The batch is made on ``device`` unless
    ``host_data``: a training thread that spends most of each step generating 0.25 GB on the CPU
    (the first GPU runs did) measures CPU contention with the encoder, not what the GPU loses."""
    data_device = "cpu" if host_data else device
    gen = torch.Generator(device=data_device).manual_seed(0)
    stalls = []
    began = time.perf_counter()
    for it in range(1, iters + 1):
        x = torch.randn(batch, width, generator=gen, device=data_device).to(device)
        loss = model(x).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if it % every == 0:
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            s = time.perf_counter()
            saver.save(it)
            stalls.append(time.perf_counter() - s)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    loop = time.perf_counter() - began
    s = time.perf_counter()
    saver.drain()
    drain = time.perf_counter() - s
    return loop, stalls, drain


def cpu_per_checkpoint(saver: Saver, first_step: int, saves: int) -> tuple[float, float]:
    """Process CPU seconds per save + drain, with no training running (see the module docstring),
    and of it the asyncckpt encoder threads' own CPU (NaN for other savers). The rest is the
    writer, the kernel's write path, and helper threads such as the encoders' OpenMP teams."""
    if saves <= 0:
        return float("nan"), float("nan")
    began = time.process_time()
    for step in range(first_step, first_step + saves):
        saver.save(step)
        saver.drain()
    cpu = (time.process_time() - began) / saves
    encoder = sum(saver.encoder_cpu[-saves:]) / saves if len(saver.encoder_cpu) >= saves else float("nan")
    return cpu, encoder


def _rounds(r: dict) -> list[int]:
    """The round of each loop time (JSON written before rounds were recorded: one loop a round)."""
    return r.get("round") or list(range(len(r["loop"])))


def _values(r: dict, key: str) -> list[float]:
    """A measured list as numbers: JSON holds null where a figure was not measured (NaN)."""
    return [math.nan if v is None else v for v in r.get(key, [])]


def summarize(results: dict[str, dict], floors: list[float], n_ckpt: int) -> tuple[dict, float, float]:
    """Medians per saver. Overhead is also paired by round (each round's loop minus that round's
    loop without saves), which cancels drift of the machine between rounds."""
    base = results.get("none", {"loop": [], "round": []})
    base_loop = median(base["loop"])
    base_by_round = dict(zip(_rounds(base), base["loop"], strict=True))
    floor = median(floors)
    summary = {}
    for name, r in results.items():
        if name == "none":
            continue
        if not r["loop"]:
            summary[name] = {"error": r.get("error", "not run (the run was cut short)")}
            continue
        paired = [
            (loop - base_by_round[rnd]) / n_ckpt
            for loop, rnd in zip(r["loop"], _rounds(r), strict=True)
            if rnd in base_by_round
        ]
        summary[name] = {
            "stall_s": median(r["stall"]),
            "fence_wait_s": median(r["fence"]) if r["fence"] else None,
            # the median of the paired figures where there are any: they cancel drift between rounds
            "overhead_s": median(paired) if paired else (median(r["loop"]) - base_loop) / n_ckpt,
            "overhead_per_round_s": paired,
            "cpu_s": median(_values(r, "cpu")),
            "encoder_cpu_s": median(_values(r, "encoder_cpu")),
            "cpus_s": r["cpu"],
            "durable_s": median(r["durable"]),
            # asyncckpt: medians of its persist phases (compress summed over the encoder threads)
            "persist_phases_s": {k: median(v) for k, v in r.get("phases", {}).items()} or None,
            "bytes": r["bytes"],
            "loops_s": r["loop"],
        }
        if "error" in r:  # it failed in some round but not all
            summary[name]["failed_rounds"] = r["error"]
    return summary, floor, base_loop


def _missing(value: float | None) -> bool:
    return value is None or math.isnan(value)


def print_table(summary: dict, floor: float) -> None:
    print(
        "| saver | median stall / ckpt | fence wait / ckpt | loop overhead / ckpt (per round) | CPU / ckpt "
        "| save -> durable | on disk | vs floor (overhead) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, r in summary.items():
        if "error" in r:
            print(f"| {name} | failed: {r['error']} | | | | | | |")
            continue
        fence = "-" if r["fence_wait_s"] is None else f"{r['fence_wait_s'] * 1e3:.1f} ms"
        durable = "-" if _missing(r["durable_s"]) else f"{r['durable_s']:.2f} s"
        if "failed_rounds" in r:
            name = f"{name} (failed in a round: {r['failed_rounds']})"
        rounds = " / ".join(f"{o * 1e3:.0f}" for o in r["overhead_per_round_s"])
        cpu = "-" if _missing(r["cpu_s"]) else f"{r['cpu_s'] * 1e3:.0f} ms"
        if not _missing(r.get("encoder_cpu_s")):
            cpu += f" (encoders {r['encoder_cpu_s'] * 1e3:.0f})"
        print(
            f"| {name} | {r['stall_s'] * 1e3:.1f} ms | {fence} | {r['overhead_s'] * 1e3:.0f} ms ({rounds}) | "
            f"{cpu} | {durable} | {r['bytes'] / 1e6:.0f} MB | {r['overhead_s'] / floor:.1f}x |"
        )
    print(f"| bare copy into a reused buffer (floor) | {floor * 1e3:.1f} ms | | | | | | 1.0x |")


def report(results: dict, floors: list[float], nbytes: int, args: dict, machine_info: dict, out: str | None) -> None:
    n_ckpt = args["iters"] // args["every"]
    summary, floor, base_loop = summarize(results, floors, n_ckpt)
    print(
        f"\nstate {nbytes / 1e9:.3f} GB, device {args['device']}, torch {machine_info.get('torch', '?')}, "
        f"{machine_info.get('cores', '?')} cores; bare copy floor {floor * 1e3:.1f} ms; loop without checkpoints "
        f"{base_loop:.2f} s for {args['iters']} iterations\n"
    )
    print_table(summary, floor)
    payload = {"machine": machine_info, "args": args, "state_bytes": nbytes, "floor_s": floor, "floors_s": floors}
    write_json(out, payload | {"baseline_loop_s": base_loop, "savers": summary, "rounds": results})


def record_run(r: dict, round_: int, loop, stalls, drain, durable, fence_waits, cpu, encoder_cpu, phases) -> None:
    r["loop"].append(loop)
    r["round"].append(round_)
    r["cpu"].append(cpu)
    r["encoder_cpu"].append(encoder_cpu)
    r["stall"] += stalls
    r["drain"].append(drain)
    r["durable"] += durable
    r["fence"] += fence_waits
    for phase, values in phases.items():
        r.setdefault("phases", {}).setdefault(phase, []).extend(values)


def print_run(name: str, round_: int, r: dict, loop, stalls, durable, fence_waits, cpu, encoder_cpu, phases) -> None:
    """Everything the table needs, as measured: a run cut short still shows it."""
    print(
        f"  round {round_} {name}: loop {loop:.2f} s, stall median {median(stalls) * 1e3:.1f} ms"
        + (f", fence median {median(fence_waits) * 1e3:.2f} ms" if fence_waits else "")
        + (f", durable median {median(durable):.2f} s" if durable else "")
        + (
            " (persist medians: " + ", ".join(f"{k} {median(v):.2f} s" for k, v in phases.items()) + ")"
            if phases and all(phases.values())
            else ""
        )
        + ("" if math.isnan(cpu) else f", CPU {cpu * 1e3:.0f} ms per checkpoint")
        + ("" if math.isnan(encoder_cpu) else f" (encoder threads' own {encoder_cpu * 1e3:.0f} ms)")
        + f", {r['bytes'] / 1e6:.0f} MB on disk",
        file=sys.stderr,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--depth", type=int, default=8, help="2048 x 8 layers + AdamW = 0.40 GB of state")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--iters", type=int, default=None, help="training steps per run (default 100)")
    ap.add_argument("--every", type=int, default=None, help="steps between checkpoints (default 25)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default=None, help="default: cuda where available, else cpu")
    ap.add_argument("--host-data", action="store_true", help="make each batch on the CPU (a host-bound loop)")
    ap.add_argument("--cpu-saves", type=int, default=2, help="saves per saver for the CPU figure, training stopped")
    ap.add_argument("--savers", default=None, help="comma list; default: all (dcp-stager on GPU only)")
    ap.add_argument("--json", default=None, help="write results here")
    ap.add_argument("--dir", default=None, help="where checkpoints go (default: a temp dir)")
    ap.add_argument(
        "--from-json",
        default=None,
        help="print the table of an earlier run's JSON, also one cut short (partial); a JSON that does "
        "not record its run's settings needs --iters, --every and --device",
    )
    args = ap.parse_args()

    if args.from_json:
        data = json.loads(Path(args.from_json).read_text())
        if "floors_s" not in data:
            sys.exit(f"{args.from_json}: a finished run's summary from an older stall.py; its log has the table")
        results = data.get("rounds") or data["savers"]
        run_args = data.get("args")
        if run_args is None:  # written before stall.py recorded its settings: the caller must say
            if None in (args.iters, args.every, args.device):
                sys.exit(f"{args.from_json} does not record its run's settings: give --iters, --every and --device")
            run_args = vars(args)
        report(results, data["floors_s"], data["state_bytes"], run_args, data.get("machine", {}), args.json)
        return
    args.iters = 100 if args.iters is None else args.iters
    args.every = 25 if args.every is None else args.every
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")

    model, opt = trained_state(args.width, args.depth, args.device)
    nbytes = state_bytes(model, opt)
    default = "none,asyncckpt,asyncckpt-overlap,asyncckpt-raw,torch.save,torch.save-thread,dcp"
    if args.device.startswith("cuda"):
        default += ",dcp-stager"
    names = (args.savers or default).split(",")
    base = Path(args.dir or tempfile.mkdtemp(prefix="asyncckpt-bench-"))
    results: dict[str, dict] = {
        n: {
            "loop": [],
            "round": [],
            "cpu": [],
            "encoder_cpu": [],
            "stall": [],
            "fence": [],
            "drain": [],
            "durable": [],
            "bytes": 0,
        }
        for n in names
    }
    floors: list[float] = []
    machine_info = machine()
    print(
        f"state {nbytes / 1e9:.3f} GB on {args.device}; {args.iters} iters, checkpoint every {args.every}; "
        f"{args.repeats} rounds; batch made on {'the CPU' if args.host_data else args.device}",
        file=sys.stderr,
    )
    for round_ in range(args.repeats):
        floors.append(bare_copy_floor(model, opt, args.device))
        for name in names:
            root = base / f"{name}-{round_}"
            root.mkdir(parents=True)
            try:
                saver = SAVERS[name](root, model, opt)
                loop, stalls, drain = run_loop(
                    saver, model, opt, args.iters, args.every, args.batch, args.width, args.device, args.host_data
                )
                durable, fence_waits = list(saver.durable), list(saver.fence_waits)  # the loop's saves
                phases = dict(saver.phases)
                cpu, encoder_cpu = cpu_per_checkpoint(saver, args.iters + 1, args.cpu_saves if name != "none" else 0)
                saver.close()
            except Exception as exc:  # noqa: BLE001 - a saver that fails is a result, recorded
                results[name]["error"] = f"{type(exc).__name__}: {exc}"[:300]
                print(f"  {name}: failed: {results[name]['error']}", file=sys.stderr)
            else:
                record_run(results[name], round_, loop, stalls, drain, durable, fence_waits, cpu, encoder_cpu, phases)
                results[name]["bytes"] = saver.bytes_on_disk()
                print_run(name, round_, results[name], loop, stalls, durable, fence_waits, cpu, encoder_cpu, phases)
            write_json(  # a run stopped at a time limit leaves this; --from-json prints its table
                args.json,
                {
                    "partial": True,
                    "machine": machine_info,
                    "args": vars(args),
                    "state_bytes": nbytes,
                    "floors_s": floors,
                    "savers": results,
                },
            )
            shutil.rmtree(root, ignore_errors=True)
    report(results, floors, nbytes, vars(args), machine_info, args.json)
    if not args.dir:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
