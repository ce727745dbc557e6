"""The ``asyncckpt`` command. Each subcommand is a thin layer over the library."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from asyncckpt._progress import format_bytes, progress_bar
from asyncckpt.engine.reader import (
    CheckpointGoneError,
    DirIdentity,
    Where,
    directory_identity,
    read_manifest,
    verify_checkpoint,
)
from asyncckpt.errors import CheckpointError, CheckpointNotFoundError
from asyncckpt.format import MANIFEST_NAME, MAX_STEP, Manifest, parse_step_dir
from asyncckpt.metrics import METRICS_LOG, SaveRecord, read_log, summarize
from asyncckpt.policy import Adaptive
from asyncckpt.retention import RetentionPolicy
from asyncckpt.storage.backend import CheckpointRef, is_object_store_url


def _root_arg(text: str) -> Path | str:
    """A root or checkpoint named on the command line: a URL stays text, anything else is a path."""
    return text if is_object_store_url(text) else Path(text)


class UsageError(Exception):
    """A command line that cannot run as given: ``asyncckpt: error: ...``, exit status 2."""


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: such a float becomes the string "nan", "inf" or "-inf"."""
    from asyncckpt.cli.tools import json_ready

    return json_ready(value)


def _dump_json(value: Any) -> str:
    """Strict JSON for every ``--json``: a parser that refuses NaN reads it."""
    return json.dumps(_finite(value), indent=2, allow_nan=False)


def _checkpoint_dirs(path: Path | str) -> list[Where]:
    """One checkpoint directory, or a root's committed checkpoints (none: an empty list). A path
    that does not exist, or a folder that is not a checkpoint root, is a CheckpointError (exit 2).
    A URL (``s3://bucket/prefix``) is a root, or one checkpoint when it ends in ``step-N``."""
    from asyncckpt.cli.tools import root_checkpoints
    from asyncckpt.loading import open_target

    if is_object_store_url(path):
        backend, single = open_target(path)
        if single is not None:
            return [CheckpointRef(backend, single)]
        return [c.ref for c in root_checkpoints(str(path))]
    path = Path(path)
    if not os.path.lexists(path):
        raise CheckpointError(f"{path} does not exist")
    if (path / MANIFEST_NAME).exists():
        return [path]
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint root or checkpoint directory")
    if parse_step_dir(path.name) is not None and not any(c.is_dir() for c in path.iterdir()):
        return [path]  # a checkpoint directory that lost its manifest: damaged, not a folder of another kind
    return [c.path for c in root_checkpoints(path)]


def _names_one_checkpoint(root: Path | str) -> bool:
    """Whether a command was pointed at one checkpoint rather than at a root."""
    if isinstance(root, Path):
        return (root / MANIFEST_NAME).exists()
    from asyncckpt.loading import open_target

    return open_target(root)[1] is not None


def _cmd_demo(args: argparse.Namespace) -> int:
    from asyncckpt.cli.demo import resolve_device, run_demo

    try:
        resolve_device(args.device)
        if args.adaptive is not None:
            Adaptive(max_overhead=args.adaptive)
    except ValueError as exc:
        raise UsageError(f"{exc}" if args.adaptive is None else f"--adaptive: {exc}") from None
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


def _ls_row(path: Where, where: str | None) -> dict[str, Any]:
    from asyncckpt.cli.tools import format_created

    row: dict[str, Any] = {"path": str(path)}
    if where is not None:
        row["where"] = where
    try:
        m = read_manifest(path)
    except CheckpointError as exc:
        return {**row, "manifest": f"invalid: {exc}"}
    return {
        "step": m.step,
        **row,
        "created": format_created(m.created),
        "raw_bytes": m.raw_bytes,
        "stored_bytes": m.stored_bytes,
        "ratio": m.raw_bytes / m.stored_bytes if m.stored_bytes else None,
        "metrics": m.metrics,
        "tags": m.tags,
        "metadata": m.metadata,
        "manifest": "ok",
    }


def _ls_mirror(args: argparse.Namespace, root: Path) -> str | None:
    """The mirror ``ls`` also lists: ``--mirror``, else the one a manager recorded in the root."""
    from asyncckpt.engine.mirror import read_mirror_file

    if args.mirror is not None:
        return args.mirror
    return read_mirror_file(root) if root.is_dir() else None


def _cmd_ls(args: argparse.Namespace) -> int:
    from asyncckpt.cli.tools import mirror_checkpoints

    root = _root_arg(args.root)
    if isinstance(root, Path):
        # a node's local root may be gone altogether: with --mirror, the mirror is still listed
        local = [] if args.mirror is not None and not os.path.lexists(root) else _checkpoint_dirs(root)
        mirror = _ls_mirror(args, root) if not (root / MANIFEST_NAME).exists() else None
    else:
        local = _checkpoint_dirs(root)
        mirror = args.mirror if not _names_one_checkpoint(root) else None
    rows: list[dict[str, Any]] = []
    if mirror is None:
        rows = [_ls_row(path, None) for path in local]
    else:
        remote = {c.step: c for c in mirror_checkpoints(mirror)}
        mine = {parse_step_dir(path.name): path for path in local}
        for step in sorted(set(remote) | {s for s in mine if s is not None}):
            if step in mine:
                rows.append(_ls_row(mine[step], "both" if step in remote else "local"))
            else:
                rows.append(_ls_row(remote[step].ref, "mirror"))
        rows += [_ls_row(path, "local") for step, path in mine.items() if step is None]
    if not rows:  # as verify: a root with no checkpoint is said so, exit status 1
        if args.json:
            print("[]")
        print(f"no checkpoints in {args.root}" + (f" or its mirror {mirror}" if mirror else ""), file=sys.stderr)
        return 1
    if args.json:
        print(_dump_json(rows))
        return 0
    if mirror is not None:
        print(f"mirror: {mirror}")
    where = f"  {'where':<6}" if mirror is not None else ""
    print(f"{'step':>12}{where}  {'created (UTC)':<20}  {'stored':>9}  {'raw':>9}  {'ratio':>6}  {'tags':<16}  metrics")
    for row in rows:
        place = f"  {row['where']:<6}" if mirror is not None else ""
        if row["manifest"] != "ok":
            print(f"{'?':>12}{place}  {row['path']}: {row['manifest']}")
            continue
        ratio = f"{row['ratio']:.3f}" if row["ratio"] else "-"
        tags = ",".join(row["tags"]) or "-"
        print(
            f"{row['step']:>12}{place}  {row['created']:<20}  {format_bytes(row['stored_bytes']):>9}  "
            f"{format_bytes(row['raw_bytes']):>9}  {ratio:>6}  {tags:<16}  {json.dumps(_finite(row['metrics']))}"
        )
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    root = _root_arg(args.path)
    dirs = _checkpoint_dirs(root)
    single = _names_one_checkpoint(root)
    if not dirs:
        if args.json:
            print("[]")
        print(f"no checkpoints in {args.path}", file=sys.stderr)
        return 1
    rows: list[dict] = []
    seen: set[Where] = set()
    with progress_bar(0, "verify", args.progress) as bar:
        # A live root changes while it is verified: a checkpoint its writer's retention deletes
        # meanwhile is gone, not damaged. Then the root is listed again, and what is new verified.
        for _ in range(_VERIFY_ROUNDS):
            todo = [path for path in dirs if path not in seen]
            seen.update(todo)
            gone = _verify_round(todo, bar, rows, args.json)
            if not gone:
                break
            # replaced: verify the new one
            seen.difference_update(path for path in gone if directory_identity(path) is not None)
            dirs = dirs if single else _checkpoint_dirs(root)
    if args.json:
        print(json.dumps(rows, indent=2))
    if any(row["status"] == "damaged" for row in rows):
        return 1
    if not any(row["status"] == "ok" for row in rows):
        # a live root whose writer deleted every checkpoint listed, each time it was listed again
        print(f"nothing verified: every checkpoint of {args.path} was deleted while being verified", file=sys.stderr)
        return 1
    return 0


_VERIFY_ROUNDS = 8


def _verify_round(dirs: list[Where], bar, rows: list[dict], quiet: bool) -> list[Where]:
    """Verify ``dirs`` (the bar's total grows by their stored bytes); those found gone."""
    manifests: dict[Where, Manifest] = {}
    identities: dict[Where, DirIdentity | None] = {}
    errors: dict[Where, CheckpointError] = {}
    for path in dirs:  # manifests first: the bar's total is every stored byte to be checked
        # the directory as listed, held through both reads: a step re-saved in between is gone, not damaged
        identities[path] = directory_identity(path)
        try:
            if identities[path] is None:
                raise CheckpointGoneError(f"{path} was deleted since the root was listed")
            manifests[path] = read_manifest(path, identity=identities[path])
        except CheckpointError as exc:
            errors[path] = exc
    bar.total += sum(m.stored_bytes for m in manifests.values())
    gone = []
    for path in dirs:
        row: dict = {"path": str(path), "status": "ok"}
        try:
            if path in errors:
                raise errors[path]
            manifest = verify_checkpoint(path, bar.advance, manifests[path], identity=identities[path])
            row.update(step=manifest.step, chunks=len(manifest.chunks), stored_bytes=manifest.stored_bytes)
            chunks = len(manifest.chunks)
            line = f"ok       {path} ({chunks} chunk{'' if chunks == 1 else 's'} verified)"
        except CheckpointNotFoundError as exc:  # deleted (retention) since the root was listed
            gone.append(path)
            row.update(status="gone", error=str(exc))
            line = f"gone     {path}: deleted or replaced while being verified"
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


def _printable(text: str) -> str:
    """Text from a log, safe for a terminal: control and other invisible characters are shown
    escaped (``\\x1b``), so a log can neither move the cursor nor retitle the window."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _status(record: SaveRecord) -> str:
    return "?" if record.ok is None else "ok" if record.ok else "FAILED"


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
            print(f"step {r.step} failed: {_printable(r.error or 'no error recorded')}")
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
    if is_object_store_url(args.root):
        raise CheckpointError(
            f"no metrics log in {args.root}: a manager writing to an object store keeps its save records in "
            "memory (mgr.stats); a local root with mirror= keeps the log in the local root"
        )
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
    if records.omitted_bytes:
        from asyncckpt.metrics import MAX_LOG_BYTES, MAX_LOG_RECORDS  # read now: tests lower them

        print(
            f"asyncckpt: read only the end of {root / METRICS_LOG} (at most {MAX_LOG_BYTES} bytes and "
            f"{MAX_LOG_RECORDS} lines): its first {records.omitted_bytes} bytes, older saves, are left out; "
            "line numbers count from the first line read",
            file=sys.stderr,
        )
    for number, reason in records.skipped:
        print(f"asyncckpt: skipped line {number} of {root / METRICS_LOG}: {_printable(reason)}", file=sys.stderr)
    if not records:
        raise CheckpointError(f"no save records in {root / METRICS_LOG}")
    figure_cls = None
    if args.plot:  # checked before anything is printed: a wrong path or a missing extra prints no table
        plot_dir = Path(args.plot).parent
        if not plot_dir.is_dir():
            reason = "is not a directory" if plot_dir.exists() else "does not exist"
            raise CheckpointError(f"cannot write plot {args.plot}: its directory {plot_dir} {reason}")
        try:
            from matplotlib.figure import Figure  # the optional extra, imported only when asked for

            figure_cls = Figure
        except ImportError:
            raise UsageError(PLOT_NEEDS_MATPLOTLIB) from None
    summary = summarize(records)
    if args.json:
        from asyncckpt.cli.tools import format_created

        out = {
            "records": [
                {key: _no_nan(value) for key, value in {**asdict(r), "started": format_created(r.started)}.items()}
                for r in records
            ],
            "summary": {key: _no_nan(value) for key, value in summary.items()},
            "skipped_lines": [{"line": number, "reason": reason} for number, reason in records.skipped],
            "omitted_bytes": records.omitted_bytes,
        }
        print(_dump_json(out))
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
    from asyncckpt.cli import tools

    info = tools.inspect_checkpoint(tools.resolve_checkpoint(args.ckpt))
    if args.json:
        print(_dump_json({**info, "created": tools.format_created(info["created"])}))
    else:
        print(tools.format_inspect(info))
    return 0


def _cmd_diff(args: argparse.Namespace) -> int:
    from asyncckpt.cli import tools

    a, b = tools.resolve_checkpoint(args.ckpt_a), tools.resolve_checkpoint(args.ckpt_b)
    with progress_bar(tools.diff_total_bytes(a, b), "diff", args.progress) as bar:
        result = tools.diff_checkpoints(a, b, progress=bar.advance)
    if args.json:
        shown = result if args.all else {**result, "leaves": [r for r in result["leaves"] if r["status"] != "equal"]}
        print(_dump_json(shown))
    else:
        print(tools.format_diff(result, all_leaves=args.all))
    return 1 if tools.differs(result) else 0


def _cmd_export(args: argparse.Namespace) -> int:
    from asyncckpt.cli import tools

    if "://" in str(args.output):  # Path() would fold s3://b/x to s3:/b/x and blame a missing directory
        raise UsageError(f"-o {args.output} is a URL: export writes a local file; name a path")
    out = Path(args.output)
    try:
        fmt = tools.export_format(out, args.format)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    ckpt = tools.resolve_checkpoint(args.ckpt)
    existed = tools.check_export_target(out, overwrite=args.force)  # before the checkpoint is read
    step, flat, skipped = tools.flat_export_dict(ckpt, args.key, args.dtype, args.per_rank or "error")
    with progress_bar(tools.exported_bytes(flat), "export", args.progress) as bar:
        nbytes = tools.write_export(out, step, flat, key=args.key, fmt=fmt, progress=bar.advance, overwrite=args.force)
    if skipped:
        print(
            f"asyncckpt: left out {len(skipped)} non-tensor leaves: {', '.join(skipped[:5])}"
            + (" ..." if len(skipped) > 5 else ""),
            file=sys.stderr,
        )
    verb = "replaced" if existed else "wrote"
    tensors = tools.plural(len(flat), "tensor")
    print(f"{verb} {out}: {tensors}, {format_bytes(nbytes)} as {fmt}, step {step} key {args.key!r}")
    return 0


def _cmd_prune(args: argparse.Namespace) -> int:
    from asyncckpt.cli import tools

    if args.after is not None:
        return _prune_after(args)
    if args.mirror is not None or args.local_only or args.include_tagged:
        raise UsageError("--mirror, --local-only and --include-tagged only go with --after N")
    if args.keep_last is None and args.keep_best is None and args.keep_every is None:
        raise UsageError("prune needs a rule: --keep-last N, --keep-best K --metric M, --keep-every S, or --after N")
    if args.keep_best is not None and not args.metric:
        raise UsageError("--keep-best needs --metric (the name of a metric passed to save)")
    if args.keep_best is None and (args.metric is not None or args.mode is not None):
        given = " and ".join(flag for flag, value in (("--metric", args.metric), ("--mode", args.mode)) if value)
        raise UsageError(f"{given} only go{'es' if ' and ' not in given else ''} with --keep-best K")
    keep_last = 1 if args.keep_last is None else args.keep_last  # the newest is always kept
    try:
        policy = RetentionPolicy(keep_last, args.keep_best, args.metric, args.mode or "min", args.keep_every)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    result = tools.prune(_root_arg(args.root), policy, dry_run=args.dry_run)
    for step, reason in sorted(result.unreadable.items()):
        print(
            f"asyncckpt: kept step {step}: its manifest cannot be read ({_printable(reason)}); prune never "
            "deletes what it cannot read, nor counts it among the newest: check it with asyncckpt verify",
            file=sys.stderr,
        )
    for step, reason in sorted(result.damaged.items()):
        print(
            f"asyncckpt: kept step {step}: it does not verify ({_printable(reason)}); prune keeps the newest "
            "checkpoint that verifies and every newer one: check it with asyncckpt verify",
            file=sys.stderr,
        )
    verb = "would delete" if args.dry_run else "deleted"
    for step in result.deleted:
        print(f"{verb} step {step}")
    print(f"{verb} {len(result.deleted)}, kept {len(result.kept)}: {result.kept}")
    return 0


def _prune_after(args: argparse.Namespace) -> int:
    from asyncckpt.cli import tools
    from asyncckpt.engine.mirror import read_mirror_file

    rules = [
        flag
        for flag, value in (
            ("--keep-last", args.keep_last),
            ("--keep-best", args.keep_best),
            ("--metric", args.metric),
            ("--mode", args.mode),
            ("--keep-every", args.keep_every),
        )
        if value is not None
    ]
    if rules:
        raise UsageError(f"--after N deletes every step above N; it takes no retention rule ({', '.join(rules)})")
    if args.local_only and args.mirror is not None:
        raise UsageError("--local-only and --mirror exclude each other")
    root = _root_arg(args.root)
    recorded = read_mirror_file(root) if isinstance(root, Path) and root.is_dir() else None
    notes = []
    if recorded is not None and not is_object_store_url(recorded) and not os.path.isdir(recorded):
        notes.append(f"the mirror recorded in the root, {_printable(recorded)}, does not exist: nothing to prune there")
        recorded = None
    mirror = None if args.local_only else (args.mirror if args.mirror is not None else recorded)
    named_another = args.mirror is not None and _mirror_location(args.mirror) != recorded
    result = tools.prune_after(
        root,
        args.after,
        mirror=mirror,
        mirror_must_hold_step=named_another,
        include_tagged=args.include_tagged,
        dry_run=args.dry_run,
    )
    verb = "would delete" if args.dry_run else "deleted"
    for tier, steps in (("mirror", result.mirror), ("root", result.root)):
        for step in reversed(steps):
            print(f"{verb} step {step} from the {tier}")
    skipped = args.local_only or named_another  # the recorded mirror is not pruned
    left_behind = _left_in_mirror(recorded, args.after) if recorded is not None and skipped else []
    where = f" and its mirror {_printable(mirror)}" if mirror is not None else ""
    count = len(result.root) + len(result.mirror)
    print(f"{verb} {count}: the newest step is now {args.after} in {args.root}{where}")
    if left_behind:
        print(
            f"asyncckpt: the mirror recorded in the root, {_printable(str(recorded))}, still holds steps "
            f"{left_behind} above {args.after}: a restore with that mirror resumes them (prune it too"
            + (", without --local-only)" if args.local_only else ")"),
            file=sys.stderr,
        )
    for note in notes:
        print(note)
    if mirror is None and recorded is None and not notes:
        print("no mirror is recorded in the root; --mirror URL names one")
    return 0


def _mirror_location(named: str) -> str:
    """A ``--mirror`` as a manager records it: an absolute path, or a URL without credentials."""
    from asyncckpt.engine.mirror import safe_location

    return safe_location(named) if is_object_store_url(named) else os.path.abspath(named)


def _left_in_mirror(mirror: str, step: int) -> list[int]:
    """The steps above ``step`` the mirror still holds (none when it cannot be listed: said on stderr)."""
    from asyncckpt.cli.tools import mirror_checkpoints

    try:
        return [c.step for c in mirror_checkpoints(mirror) if c.step > step]
    except CheckpointError as exc:
        print(f"asyncckpt: the mirror {_printable(mirror)} could not be listed ({exc})", file=sys.stderr)
        return []


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


def _step_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a step (an int), got {text!r}") from None
    if not 0 <= value <= MAX_STEP:
        raise argparse.ArgumentTypeError(f"a step is in [0, {MAX_STEP}], got {text}")
    return value


def _path(text: str) -> str:
    """A path or URL argument; an empty one (an unset shell variable) is refused, never taken for
    the working directory (where ``prune`` would delete)."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path (an unset variable?); name the path")
    return text


_path.__name__ = "path"


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if not value > 0 or (isinstance(value, float) and not math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
        return value

    parse.__name__ = f"positive {kind.__name__}"
    return parse


class _Parser(argparse.ArgumentParser):
    """Usage errors as every other error: ``asyncckpt: error: ...`` on stderr, exit status 2."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(2, f"asyncckpt: error: {message}\n")


def _version() -> str:
    try:
        return version("asyncckpt")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="asyncckpt",
        description="Look after asyncckpt checkpoints: list, inspect, verify, compare, export and prune "
        "them, read a root's save statistics, or run the demo. Exit status 2: a usage or checkpoint error.",
        epilog="asyncckpt COMMAND --help describes each command's options.",
    )
    parser.add_argument("--version", action="version", version=f"asyncckpt {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser("demo", help="train a small model with async checkpoints and report stalls")
    demo.add_argument(
        "--seconds", type=_positive(float), default=30.0, help="how long to train, warm-up included (default 30)"
    )
    demo.add_argument("--width", type=_positive(int), default=1024, help="units per hidden layer (default 1024)")
    demo.add_argument("--depth", type=_positive(int), default=6, help="hidden layers (default 6)")
    demo.add_argument(
        "--root", type=_path, help="keep checkpoints here: a new or empty folder (default: a temp dir, removed)"
    )
    demo.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    demo.add_argument(
        "--snapshot", choices=["blocking", "overlap"], default="blocking", help="snapshot mode (default: blocking)"
    )
    demo.add_argument(
        "--adaptive",
        type=_positive(float),
        metavar="MAX_OVERHEAD",
        help="checkpoint by Adaptive(max_overhead=...), e.g. 0.01, instead of about every 1.5 s",
    )
    demo.set_defaults(func=_cmd_demo)
    ls = sub.add_parser("ls", help="list the checkpoints in a root")
    ls.add_argument("root", type=_path, help="a checkpoint root (or one checkpoint directory)")
    ls.add_argument("--json", action="store_true", help="print one object per checkpoint as JSON")
    ls.add_argument(
        "--mirror",
        type=_path,
        metavar="URL",
        help="also list this mirror of the root (default: the mirror a manager recorded in the root); "
        "a 'where' column says local, mirror or both",
    )
    ls.set_defaults(func=_cmd_ls)
    verify = sub.add_parser("verify", help="verify every checksum of a root or one checkpoint")
    verify.add_argument("path", type=_path, help="a checkpoint root or one checkpoint directory")
    verify.add_argument("--json", action="store_true", help="print one {path, status, ...} per checkpoint")
    _add_progress_flags(verify)
    verify.set_defaults(func=_cmd_verify)
    stats = sub.add_parser("stats", help=f"per-save stall and persist times from a root's {METRICS_LOG}")
    stats.add_argument("root", type=_path, help="a checkpoint root")
    stats.add_argument("--json", action="store_true", help="print {records, summary} as JSON")
    stats.add_argument(
        "--plot", type=_path, metavar="FILE.png", help="draw stall and persist per checkpoint (needs matplotlib)"
    )
    stats.set_defaults(func=_cmd_stats)
    inspect = sub.add_parser("inspect", help="one checkpoint's step, sizes, metrics and tree (manifest only)")
    inspect.add_argument("ckpt", type=_path, help="one checkpoint directory (ROOT/step-...)")
    inspect.add_argument("--json", action="store_true", help="print the description as JSON")
    inspect.set_defaults(func=_cmd_inspect)
    diff = sub.add_parser(
        "diff", help="per-tensor differences between two checkpoints (exit status 1 when they differ)"
    )
    diff.add_argument("ckpt_a", type=_path, help="checkpoint A (a checkpoint directory)")
    diff.add_argument("ckpt_b", type=_path, help="checkpoint B, compared with A")
    diff.add_argument("--all", action="store_true", help="list equal leaves too (default: only differences)")
    diff.add_argument("--json", action="store_true", help="print {a, b, counts, leaves} as JSON")
    _add_progress_flags(diff)
    diff.set_defaults(func=_cmd_diff)
    export = sub.add_parser("export", help="write a subtree's tensors as safetensors or a flat torch.save dict")
    export.add_argument("ckpt", type=_path, help="one checkpoint directory (ROOT/step-...)")
    export.add_argument(
        "-o",
        "--output",
        type=_path,
        required=True,
        metavar="OUT",
        help="the file to write (.safetensors, or .pt/.pth/.bin for torch.save); its directory must exist, "
        "outside any checkpoint root",
    )
    export.add_argument("--force", action="store_true", help="replace OUT if it exists (default: refuse)")
    export.add_argument("--key", default="model", help="subtree to export (default: model); dots go deeper")
    export.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="cast floating-point tensors")
    export.add_argument(
        "--per-rank",
        choices=["rank0"],
        help="a checkpoint of several ranks whose ranks each kept tensors of their own under KEY: export rank 0's "
        "(default: refuse)",
    )
    export.add_argument(
        "--format",
        choices=["safetensors", "pt"],
        help="the file format (default: from OUT's extension; must agree with it)",
    )
    _add_progress_flags(export)
    export.set_defaults(func=_cmd_export)
    prune = sub.add_parser(
        "prune",
        help="delete the checkpoints a retention policy does not keep (the newest, tagged checkpoints and "
        "those whose manifest cannot be read are always kept)",
        description="Delete the checkpoints no rule keeps. Always kept: the newest checkpoint that verifies "
        "(every chunk's checksum) and any newer one (reported), tagged checkpoints (untag them first), and "
        "checkpoints whose manifest cannot be read (reported).",
    )
    prune.add_argument("root", type=_path, help="a checkpoint root")
    prune.add_argument("--keep-last", type=_positive(int), metavar="N", help="keep the newest N")
    prune.add_argument("--keep-best", type=_positive(int), metavar="K", help="keep the K best by --metric")
    prune.add_argument("--metric", metavar="M", help="the metric --keep-best ranks by (a name passed to save)")
    prune.add_argument(
        "--mode", choices=["min", "max"], help="with --keep-best: best is the lowest (min, default) or highest"
    )
    prune.add_argument("--keep-every", type=_positive(int), metavar="S", help="keep the steps that are multiples of S")
    prune.add_argument(
        "--after",
        type=_step_number,
        metavar="N",
        help="roll back: delete every checkpoint above step N from the root and its mirror, so that a "
        "restore resumes from N (N must verify; refused while a manager writes to the root)",
    )
    prune.add_argument(
        "--mirror",
        type=_path,
        metavar="URL",
        help="with --after: the mirror to prune too (default: the one recorded in the root)",
    )
    prune.add_argument("--local-only", action="store_true", help="with --after: leave the mirror alone")
    prune.add_argument(
        "--include-tagged", action="store_true", help="with --after: delete tagged checkpoints above N too"
    )
    prune.add_argument("--dry-run", action="store_true", help="list what would be deleted; delete nothing")
    prune.set_defaults(func=_cmd_prune)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status (2: usage or checkpoint error)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error already printed
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return args.func(args)
    except (CheckpointError, UsageError) as exc:
        print(f"asyncckpt: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `asyncckpt ls ROOT | head`: the reader has gone, not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
