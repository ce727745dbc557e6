"""The ``asyncckpt`` command. Each subcommand is a thin layer over the library."""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict
from pathlib import Path

from ._progress import progress_bar
from .errors import CheckpointError, CheckpointNotFoundError
from .format import MANIFEST_NAME, Manifest
from .metrics import METRICS_LOG, SaveRecord, read_log, summarize
from .reader import read_manifest, verify_checkpoint
from .retention import RetentionPolicy
from .storage import list_checkpoints


def _checkpoint_dirs(path: Path) -> list[Path]:
    if (path / MANIFEST_NAME).exists():
        return [path]
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint root or checkpoint directory")
    return [c.path for c in list_checkpoints(path)]


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    report = run_demo(
        seconds=args.seconds,
        width=args.width,
        depth=args.depth,
        root=args.root,
        device=args.device,
        adaptive=args.adaptive,
        snapshot=args.snapshot,
    )
    return 0 if report.restore_exact else 1


def _cmd_ls(args: argparse.Namespace) -> int:
    rows = []
    for path in _checkpoint_dirs(Path(args.root)):
        try:
            m = read_manifest(path)
            rows.append(
                {
                    "step": m.step,
                    "path": str(path),
                    "created": m.created,
                    "raw_bytes": m.raw_bytes,
                    "stored_bytes": m.stored_bytes,
                    "ratio": m.raw_bytes / m.stored_bytes if m.stored_bytes else None,
                    "metrics": m.metrics,
                    "tags": m.tags,
                    "metadata": m.metadata,
                    "manifest": "ok",
                }
            )
        except CheckpointError as exc:
            rows.append({"path": str(path), "manifest": f"invalid: {exc}"})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'step':>12}  {'stored':>12}  {'ratio':>6}  {'tags':<16}  metrics")
    for row in rows:
        if row["manifest"] != "ok":
            print(f"{'?':>12}  {row['path']}: {row['manifest']}")
            continue
        ratio = f"{row['ratio']:.3f}" if row["ratio"] else "-"
        tags = ",".join(row["tags"]) or "-"
        print(f"{row['step']:>12}  {row['stored_bytes']:>12}  {ratio:>6}  {tags:<16}  {json.dumps(row['metrics'])}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    root = Path(args.path)
    dirs = _checkpoint_dirs(root)
    if not dirs:
        if args.json:
            print("[]")
        print(f"no checkpoints in {args.path}", file=sys.stderr)
        return 1
    rows: list[dict] = []
    seen: set[Path] = set()
    with progress_bar(0, "verify", args.progress) as bar:
        # A live root changes while it is verified: a checkpoint its writer's retention deletes
        # meanwhile is gone, not damaged. Then the root is listed again, and what is new verified.
        for _ in range(_VERIFY_ROUNDS):
            todo = [path for path in dirs if path not in seen]
            seen.update(todo)
            gone = _verify_round(todo, bar, rows, args.json)
            if not gone or (root / MANIFEST_NAME).exists():
                break
            seen.difference_update(path for path in gone if path.exists())  # replaced: verify the new one
            dirs = _checkpoint_dirs(root)
    if args.json:
        print(json.dumps(rows, indent=2))
    return 1 if any(row["status"] == "damaged" for row in rows) else 0


_VERIFY_ROUNDS = 8


def _verify_round(dirs: list[Path], bar, rows: list[dict], quiet: bool) -> list[Path]:
    """Verify ``dirs`` (the bar's total grows by their stored bytes); those found gone."""
    manifests: dict[Path, Manifest] = {}
    errors: dict[Path, CheckpointError] = {}
    for path in dirs:  # manifests first: the bar's total is every stored byte to be checked
        try:
            manifests[path] = read_manifest(path)
        except CheckpointError as exc:
            errors[path] = exc
    bar.total += sum(m.stored_bytes for m in manifests.values())
    gone = []
    for path in dirs:
        row: dict = {"path": str(path), "status": "ok"}
        try:
            if path in errors:
                raise errors[path]
            manifest = verify_checkpoint(path, bar.advance, manifests[path])
            row.update(step=manifest.step, chunks=len(manifest.chunks), stored_bytes=manifest.stored_bytes)
            line = f"ok       {path} ({len(manifest.chunks)} chunks verified)"
        except CheckpointNotFoundError as exc:  # deleted (retention) since the root was listed
            gone.append(path)
            row.update(status="gone", error=str(exc))
            line = f"gone     {path}: deleted while being verified"
        except CheckpointError as exc:
            row.update(status="damaged", error=str(exc))
            line = f"DAMAGED  {path}: {exc}"
        rows.append(row)
        if not quiet:
            bar.clear()  # the line goes above the bar, not through it
            print(line, flush=True)
    return gone


PLOT_NEEDS_MATPLOTLIB = "asyncckpt stats --plot needs matplotlib: pip install 'asyncckpt[plot]'"


def _ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1e3:.1f}"


def _mb(nbytes: float) -> str:
    return "-" if math.isnan(nbytes) else f"{nbytes / 1e6:.2f}"


def _no_nan(value):
    """JSON has no NaN: undefined statistics (say, no committed save) become null."""
    return None if isinstance(value, float) and math.isnan(value) else value


def _status(record: SaveRecord) -> str:
    return {True: "ok", False: "FAILED"}.get(record.ok, "?")


def _print_stats_table(records: list[SaveRecord], summary: dict) -> None:
    width = max(4, *(len(str(r.step)) for r in records))
    header = (
        f"{'step':>{width}}  {'status':<6}  {'stall':>8}  {'wait_prev':>9}  {'snapshot':>8}  {'bookkeep':>8}  "
        f"{'persist':>8}  {'compress':>8}  {'write':>8}  {'fsync':>8}  {'commit':>8}  "
        f"{'raw MB':>9}  {'stored MB':>9}  {'ratio':>6}"
    )
    print(header)
    for r in records:
        ok = r.ok is True
        ratio = f"{r.raw_bytes / r.stored_bytes:.3f}" if ok and r.stored_bytes else "-"
        print(
            f"{r.step:>{width}}  {_status(r):<6}  {_ms(r.stall_s):>8}  {_ms(r.wait_prev_s):>9}  "
            f"{_ms(r.snapshot_s):>8}  {_ms(r.bookkeeping_s):>8}  {_ms(r.persist_s) if ok else '-':>8}  "
            f"{_ms(r.compress_s):>8}  {_ms(r.write_s):>8}  {_ms(r.fsync_s):>8}  {_ms(r.commit_s):>8}  "
            f"{_mb(r.raw_bytes) if ok else '-':>9}  {_mb(r.stored_bytes) if ok else '-':>9}  {ratio:>6}"
        )
    print(
        "times in ms; stall = wait_prev + snapshot + bookkeep (the caller was blocked); "
        "persist ran in the background; compress is summed over encoder threads"
    )
    for r in records:
        if r.ok is False:
            print(f"step {r.step} failed: {r.error or 'no error recorded'}")
    print()
    s = summary
    ratio = s["compression_ratio"]
    throughput = s["throughput_bytes_per_s"]
    print(f"saves        {s['saves']} ({s['committed']} committed, {s['failed']} failed)")
    print(
        f"stall        p50 {_ms(s['stall_p50_s'])} ms   p95 {_ms(s['stall_p95_s'])} ms   max {_ms(s['stall_max_s'])} ms"
    )
    if any(r.fence_wait_s > 0 or r.lazy_copy_s > 0 for r in records):
        print(
            f"fence wait   p50 {_ms(s['fence_wait_p50_s'])} ms   total {_ms(sum(r.fence_wait_s for r in records))} ms "
            "(overlap mode: training waiting for the copy at its next optimizer step)"
        )
    if any(r.fence_gpu_wait_s > 0 for r in records):
        print(
            f"fence (GPU)  p50 {_ms(s['fence_gpu_wait_p50_s'])} ms   total "
            f"{_ms(sum(r.fence_gpu_wait_s for r in records))} ms "
            "(training's CUDA stream waiting for the copy there; the host did not block)"
        )
    print(f"persist      p50 {_ms(s['persist_p50_s'])} ms (committed saves)")
    print(f"throughput   {_mb(throughput)} MB/s (raw bytes / persist time, committed saves)")
    print(
        f"compression  {'-' if math.isnan(ratio) else f'{ratio:.3f}x'} "
        f"({_mb(s['raw_bytes'])} MB raw -> {_mb(s['stored_bytes'])} MB stored)"
    )
    cpu_fraction = s["encoder_cpu_fraction"]
    if not math.isnan(cpu_fraction):
        print(
            f"encoder      {cpu_fraction:.0%} of the compress threads' time was their own CPU "
            "(the rest: waiting for a core, or for helper threads)"
        )
    print(f"failures     {s['failed']}")


def _plot_stats(records: list[SaveRecord], path: Path, figure_cls, title: str) -> None:
    """Two panels over step: what each save cost the caller (stall) and in the background (persist)."""
    ordered = sorted(records, key=lambda r: r.step)  # stable: a step saved twice keeps log order
    steps = [r.step for r in ordered]
    fig = figure_cls(figsize=(11, 6.5), layout="constrained")
    stall_ax, persist_ax = fig.subplots(2, 1, sharex=True)
    stall_ax.plot(steps, [r.stall_s * 1e3 for r in ordered], "o-", color="C0", label="stall (total)")
    stall_ax.plot(steps, [r.snapshot_s * 1e3 for r in ordered], ".--", color="C1", label="snapshot copy")
    stall_ax.plot(steps, [r.wait_prev_s * 1e3 for r in ordered], ".--", color="C2", label="wait for previous save")
    stall_ax.set_ylabel("stall per checkpoint (ms)")
    stall_ax.set_title("caller blocked in save()")
    done = [r for r in ordered if r.ok]
    done_steps = [r.step for r in done]
    persist_ax.plot(done_steps, [r.persist_s * 1e3 for r in done], "o-", color="C3", label="persist (total)")
    persist_ax.plot(done_steps, [r.write_s * 1e3 for r in done], ".--", color="C4", label="write")
    persist_ax.plot(done_steps, [r.fsync_s * 1e3 for r in done], ".--", color="C5", label="fsync")
    persist_ax.set_ylabel("persist per checkpoint (ms)")
    persist_ax.set_title("background: from save() returning to the commit being durable (committed saves)")
    persist_ax.set_xlabel("training step")
    failed = [r for r in ordered if r.ok is False]
    if failed:
        stall_ax.plot(
            [r.step for r in failed],
            [r.stall_s * 1e3 for r in failed],
            "x",
            color="red",
            ms=10,
            mew=2,
            label="failed save",
        )
        for r in failed:
            persist_ax.axvline(r.step, color="red", lw=1, ls=":")
        persist_ax.plot([], [], color="red", lw=1, ls=":", label="failed save")
    for ax in (stall_ax, persist_ax):
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")  # outside: never on a point
    fig.suptitle(title)
    fig.savefig(path, format="png", dpi=100)


def _cmd_stats(args: argparse.Namespace) -> int:
    root = Path(args.root)
    if not root.is_dir():
        reason = "not a directory" if root.exists() else "it does not exist"
        raise CheckpointError(f"no metrics log in {root}: {reason}")
    try:
        records = read_log(root)
    except FileNotFoundError:
        raise CheckpointError(f"no metrics log in {root} (no {METRICS_LOG})") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read {root / METRICS_LOG}: {exc}") from None
    for number, reason in records.skipped:
        print(f"asyncckpt: skipped line {number} of {root / METRICS_LOG}: {reason}", file=sys.stderr)
    if not records:
        raise CheckpointError(f"no save records in {root / METRICS_LOG}")
    figure_cls = None
    if args.plot:
        try:
            from matplotlib.figure import Figure  # the optional extra, imported only when asked for

            figure_cls = Figure
        except ImportError:
            print(PLOT_NEEDS_MATPLOTLIB, file=sys.stderr)
            return 2
    summary = summarize(records)
    if args.json:
        out = {
            "records": [asdict(r) for r in records],
            "summary": {key: _no_nan(value) for key, value in summary.items()},
            "skipped_lines": [{"line": number, "reason": reason} for number, reason in records.skipped],
        }
        print(json.dumps(out, indent=2))
    else:
        _print_stats_table(records, summary)
    if figure_cls is not None:
        try:
            _plot_stats(records, Path(args.plot), figure_cls, f"asyncckpt saves in {root}")
        except OSError as exc:
            raise CheckpointError(f"cannot write plot {args.plot}: {exc}") from None
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from . import tools

    info = tools.inspect_checkpoint(tools.resolve_checkpoint(args.ckpt))
    print(json.dumps(info, indent=2) if args.json else tools.format_inspect(info))
    return 0


def _cmd_diff(args: argparse.Namespace) -> int:
    from . import tools

    result = tools.diff_checkpoints(tools.resolve_checkpoint(args.ckpt_a), tools.resolve_checkpoint(args.ckpt_b))
    print(json.dumps(result, indent=2) if args.json else tools.format_diff(result))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from . import tools

    out = Path(args.output)
    step, flat, skipped = tools.flat_export_dict(tools.resolve_checkpoint(args.ckpt), args.key, args.dtype)
    with progress_bar(tools.exported_bytes(flat), "export", args.progress) as bar:
        nbytes = tools.write_export(out, step, flat, key=args.key, fmt=args.format, progress=bar.advance)
    if skipped:
        print(
            f"asyncckpt: left out {len(skipped)} non-tensor leaves: {', '.join(skipped[:5])}"
            + (" ..." if len(skipped) > 5 else ""),
            file=sys.stderr,
        )
    print(f"wrote {out}: {len(flat)} tensors, {nbytes} bytes, step {step} key {args.key!r}")
    return 0


def _cmd_prune(args: argparse.Namespace) -> int:
    from . import tools

    if args.keep_best is not None and not args.metric:
        raise CheckpointError("--keep-best needs --metric (the name of a metric passed to save)")
    try:
        policy = RetentionPolicy(args.keep_last, args.keep_best, args.metric, args.mode, args.keep_every)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    result = tools.prune(Path(args.root), policy, dry_run=args.dry_run)
    verb = "would delete" if args.dry_run else "deleted"
    for step in result.deleted:
        print(f"{verb} step {step}")
    print(f"{verb} {len(result.deleted)}, kept {len(result.kept)}: {result.kept}")
    return 0


def _add_progress_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--progress",
        dest="progress",
        action="store_const",
        const=True,
        default=None,
        help="draw a progress bar on stderr (default: only when stderr is a terminal)",
    )
    group.add_argument("--no-progress", dest="progress", action="store_const", const=False, help="never draw one")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="asyncckpt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a small model with async checkpoints and report stalls")
    demo.add_argument("--seconds", type=float, default=30.0, help="training time (default 30)")
    demo.add_argument("--width", type=int, default=1024)
    demo.add_argument("--depth", type=int, default=6)
    demo.add_argument("--root", help="keep checkpoints here (default: a temp dir, removed)")
    demo.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    demo.add_argument(
        "--snapshot", choices=["blocking", "overlap"], default="blocking", help="snapshot mode (default: blocking)"
    )
    demo.add_argument(
        "--adaptive", type=float, metavar="MAX_OVERHEAD", help="use Adaptive(max_overhead=...) instead of every ~1.5 s"
    )
    demo.set_defaults(func=_cmd_demo)
    ls = sub.add_parser("ls", help="list the checkpoints in a root")
    ls.add_argument("root")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=_cmd_ls)
    verify = sub.add_parser("verify", help="verify every checksum of a root or one checkpoint")
    verify.add_argument("path")
    verify.add_argument("--json", action="store_true", help="print one {path, status, ...} per checkpoint")
    _add_progress_flags(verify)
    verify.set_defaults(func=_cmd_verify)
    stats = sub.add_parser("stats", help=f"per-save stall and persist times from a root's {METRICS_LOG}")
    stats.add_argument("root")
    stats.add_argument("--json", action="store_true", help="print {records, summary} as JSON")
    stats.add_argument("--plot", metavar="FILE.png", help="draw stall and persist per checkpoint (needs matplotlib)")
    stats.set_defaults(func=_cmd_stats)
    inspect = sub.add_parser("inspect", help="one checkpoint's step, sizes, metrics and tree (manifest only)")
    inspect.add_argument("ckpt")
    inspect.add_argument("--json", action="store_true")
    inspect.set_defaults(func=_cmd_inspect)
    diff = sub.add_parser("diff", help="per-tensor differences between two checkpoints")
    diff.add_argument("ckpt_a")
    diff.add_argument("ckpt_b")
    diff.add_argument("--json", action="store_true")
    diff.set_defaults(func=_cmd_diff)
    export = sub.add_parser("export", help="write a subtree's tensors as safetensors or a flat torch.save dict")
    export.add_argument("ckpt")
    export.add_argument("-o", "--output", required=True, metavar="OUT")
    export.add_argument("--key", default="model", help="subtree to export (default: model); dots go deeper")
    export.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="cast floating-point tensors")
    export.add_argument("--format", choices=["safetensors", "pt"], default="safetensors")
    _add_progress_flags(export)
    export.set_defaults(func=_cmd_export)
    prune = sub.add_parser("prune", help="delete the checkpoints a retention policy does not keep")
    prune.add_argument("root")
    prune.add_argument("--keep-last", type=int, required=True, metavar="N")
    prune.add_argument("--keep-best", type=int, metavar="K")
    prune.add_argument("--metric", metavar="M")
    prune.add_argument("--mode", choices=["min", "max"], default="min")
    prune.add_argument("--keep-every", type=int, metavar="S")
    prune.add_argument("--dry-run", action="store_true", help="list what would be deleted; delete nothing")
    prune.set_defaults(func=_cmd_prune)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CheckpointError as exc:
        print(f"asyncckpt: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
