"""Two versions of asyncckpt side by side: a benchmark script run under each, alternately.

A refactor must not cost speed, and the machines here are noisy, so "before" and "after" are
measured in one run, interleaved round by round (before, after, before, after...), each round a
fresh process with that version's ``src`` first on ``sys.path`` and that version's copy of the
script. The table gives the median of each figure over the rounds and the ratio after / before.

    git worktree add /tmp/before <commit>
    python bench/versions.py --before /tmp/before --after . --rounds 3 stall -- --savers none,asyncckpt
    python bench/versions.py --before /tmp/before --after . --rounds 3 codec
    python bench/versions.py --before /tmp/before --after . --rounds 3 codec -- --planes-only
    python bench/versions.py --before /tmp/before --after . --rounds 4 gc_pauses
    python bench/versions.py --before /tmp/before --after . --rounds 10 flatten -- --rounds 5
    python bench/versions.py --before /tmp/before --after . --rounds 6 consolidate -- --root /tmp/c
    python bench/versions.py --before /tmp/before --after . --rounds 4 multirank -- --savers asyncckpt
    python bench/versions.py --before /tmp/before --after . --rounds 4 remote_reads -- --ranks 8

A script the older checkout does not have (a benchmark added with the change it measures) runs
from the newer checkout, on each version's ``src``.

Figures taken: stall.py, per saver: stall, loop overhead, CPU per checkpoint, save -> durable and
bytes on disk; codec.py: ratio and MB/s of asyncckpt's encode per data kind at level 1, the
encoder pool's rates, and a whole save's ratio and persist rate (where chunking shows); with
``--planes-only``, the planes table's ratio and encode and decode MB/s per data kind; gc_pauses.py:
the collections of each generation per 100 saves, their time per save and the longest, and the
stall's median, p95 and max; flatten.py: the median flatten of each way it times; consolidate.py:
the median time of a multi-rank checkpoint's whole load and the first load's peak RSS growth, and
of a restore at --restore-world ranks when asked; multirank.py, per setup and saver: the stall's
max over ranks, time to durable and CPU per rank, and each restore's time; remote_reads.py: one
GET, the listing, a manifest with its rank tables and the catalog of the root, each through the
delaying proxy.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run_once(tree: Path, script: str, extra: list[str], out: Path, newer: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree / "src"))
    path = tree / "bench" / f"{script}.py"
    if not path.exists():  # a benchmark added with the change it measures: the newer copy, on the older src
        path = newer / "bench" / f"{script}.py"
    cmd = [sys.executable, str(path), *extra, "--json", str(out)]
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def stall_figures(data: dict) -> dict[str, float]:
    figures = {}
    for saver, r in data["savers"].items():
        if "error" in r:
            continue
        for key, label in (("stall_s", "stall ms"), ("overhead_s", "overhead ms"), ("cpu_s", "CPU ms")):
            if r.get(key) is not None:
                figures[f"{saver}: {label}"] = r[key] * 1e3
        if r.get("durable_s") is not None:
            figures[f"{saver}: durable s"] = r["durable_s"]
        figures[f"{saver}: MB on disk"] = r["bytes"] / 1e6
    return figures


def codec_figures(data: dict) -> dict[str, float]:
    figures = {}
    for row in data.get("codec", []):
        if row["level"] == 1:
            figures[f"{row['data']}: ratio"] = row["asyncckpt"]["ratio"]
            figures[f"{row['data']}: MB/s"] = row["asyncckpt"]["MBps"]
    for row in data.get("planes", []):  # the planes table (all of --planes-only)
        figures[f"{row['data']}: planes ratio"] = row["planes"]["ratio"]
        figures[f"{row['data']}: planes encode MB/s"] = row["planes"]["MBps"]
        figures[f"{row['data']}: planes decode MB/s"] = row["planes"]["decode_MBps"]
    for threads, rate in data.get("encoder_pool_MBps", {}).items():
        figures[f"encoder pool, {threads} thread(s): MB/s"] = rate
    for workers, r in data.get("persist", {}).items():
        figures[f"whole save, {workers} worker(s): ratio"] = r["ratio"]
        figures[f"whole save, {workers} worker(s): persist MB/s"] = r["MBps"]
    return figures


def gc_figures(data: dict) -> dict[str, float]:
    figures = {f"stall {q} ms": data[f"stall_{q}_s"] * 1e3 for q in ("p50", "p95", "max")}
    for generation in (0, 1, 2):
        g = data[f"gen{generation}"]
        figures[f"generation {generation} collections per 100 saves"] = g["per_100_saves"]
        figures[f"generation {generation} ms per save"] = g["ms_per_save"]
        figures[f"generation {generation} longest ms"] = g["max_ms"]
    figures["run s"] = data["elapsed_s"]
    return figures


def flatten_figures(data: dict) -> dict[str, float]:
    return {f"{way}: flatten ms": seconds * 1e3 for way, seconds in data["median_s"].items()}


def consolidate_figures(data: dict) -> dict[str, float]:
    figures = {"load ms": data["load_s"] * 1e3, "peak RSS growth MB": data["peak_rss_growth_mb"]}
    if "restore_s" in data:
        figures["restore ms"] = data["restore_s"] * 1e3
    return figures


def multirank_figures(data: dict) -> dict[str, float]:
    figures = {}
    for setup, run in data["runs"].items():
        for saver, r in run.get("savers", {}).items():
            figures[f"{setup}, {saver}: stall max ms"] = r["stall_max_s"] * 1e3
            figures[f"{setup}, {saver}: durable s"] = r["durable_s"]
            figures[f"{setup}, {saver}: CPU s per rank"] = r["cpu_mean_s"]
        for key, seconds in run.get("restore_s", {}).items():
            figures[f"{setup}: restore {key} s"] = seconds
    return figures


def remote_reads_figures(data: dict) -> dict[str, float]:
    return {
        label: data[key] * 1e3
        for key, label in (
            ("one_get_s", "one GET ms"),
            ("listing_s", "listing ms"),
            ("read_manifest_s", "manifest + rank tables ms"),
            ("catalog_s", "catalog of the root ms"),
            ("load_s", "load of the root ms"),
        )
        if key in data
    }


FIGURES = {
    "stall": stall_figures,
    "codec": codec_figures,
    "gc_pauses": gc_figures,
    "flatten": flatten_figures,
    "consolidate": consolidate_figures,
    "multirank": multirank_figures,
    "remote_reads": remote_reads_figures,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", type=Path, required=True, help="a checkout of the older version")
    ap.add_argument("--after", type=Path, required=True, help="a checkout of the newer version")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=None, help="write every round's figures here")
    ap.add_argument("script", choices=sorted(FIGURES))
    ap.add_argument("extra", nargs="*", help="arguments for the script (after --)")
    args = ap.parse_args()
    rounds: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            for side in ("before", "after") if i % 2 == 0 else ("after", "before"):
                tree = args.before if side == "before" else args.after
                out = Path(tmp) / f"{side}-{i}.json"
                data = run_once(tree.resolve(), args.script, args.extra, out, args.after.resolve())
                rounds[side].append(FIGURES[args.script](data))
                print(f"round {i + 1}/{args.rounds}: {side} done", file=sys.stderr)
    keys = [k for k in rounds["before"][0] if all(k in r for r in rounds["before"] + rounds["after"])]
    print(f"| {args.script}.py figure (median of {args.rounds} rounds) | before | after | after / before |")
    print("|---|---|---|---|")
    for key in keys:
        before = statistics.median(r[key] for r in rounds["before"])
        after = statistics.median(r[key] for r in rounds["after"])
        ratio = f"{after / before:.3f}" if before else "-"
        print(f"| {key} | {before:.4g} | {after:.4g} | {ratio} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rounds, indent=1))


if __name__ == "__main__":
    main()
