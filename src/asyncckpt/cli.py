"""The ``asyncckpt`` command. Each subcommand is a thin layer over the library."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import CheckpointError
from .format import MANIFEST_NAME
from .reader import read_checkpoint, read_manifest
from .storage import list_checkpoints


def _checkpoint_dirs(path: Path) -> list[Path]:
    if (path / MANIFEST_NAME).exists():
        return [path]
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint root or checkpoint directory")
    return [c.path for c in list_checkpoints(path)]


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    report = run_demo(seconds=args.seconds, width=args.width, depth=args.depth, root=args.root, device=args.device)
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
                    "manifest": "ok",
                }
            )
        except CheckpointError as exc:
            rows.append({"path": str(path), "manifest": f"invalid: {exc}"})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'step':>12}  {'stored':>12}  {'ratio':>6}  metrics")
    for row in rows:
        if row["manifest"] != "ok":
            print(f"{'?':>12}  {row['path']}: {row['manifest']}")
            continue
        ratio = f"{row['ratio']:.3f}" if row["ratio"] else "-"
        print(f"{row['step']:>12}  {row['stored_bytes']:>12}  {ratio:>6}  {json.dumps(row['metrics'])}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    bad = 0
    dirs = _checkpoint_dirs(Path(args.path))
    if not dirs:
        print(f"no checkpoints in {args.path}", file=sys.stderr)
        return 1
    for path in dirs:
        try:
            loaded = read_checkpoint(path)
            print(f"ok       {path} ({len(loaded.manifest.chunks)} chunks verified)")
        except CheckpointError as exc:
            bad += 1
            print(f"DAMAGED  {path}: {exc}")
    return 1 if bad else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="asyncckpt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a small model with async checkpoints and report stalls")
    demo.add_argument("--seconds", type=float, default=30.0, help="training time (default 30)")
    demo.add_argument("--width", type=int, default=1024)
    demo.add_argument("--depth", type=int, default=6)
    demo.add_argument("--root", help="keep checkpoints here (default: a temp dir, removed)")
    demo.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    demo.set_defaults(func=_cmd_demo)
    ls = sub.add_parser("ls", help="list the checkpoints in a root")
    ls.add_argument("root")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=_cmd_ls)
    verify = sub.add_parser("verify", help="verify every checksum of a root or one checkpoint")
    verify.add_argument("path")
    verify.set_defaults(func=_cmd_verify)
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
