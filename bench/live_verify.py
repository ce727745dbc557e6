"""False alarms of readers on a live root: ``asyncckpt verify ROOT`` and ``asyncckpt.load(ROOT)``
while a writer process saves continuously with ``keep_last=1`` (each commit deletes the previous
checkpoint, so readers keep racing the deletion).

Every checkpoint the writer commits is healthy, so any DAMAGED line, non-zero exit status,
exception or damage warning is a false alarm; the count must be 0. Also reported: how many
checkpoints verify found deleted under it ("gone" rows: the race really ran) and how many saves the
writer committed meanwhile. The root is on tmpfs where there is one (fsync costs nothing there, so
the writer commits many times per verify).

    python bench/live_verify.py --runs 2000 --json bench/results/live-verify-cpu.json   # ~1 min on 2 cores
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import asyncckpt
from asyncckpt.cli.commands import main as cli_main

WRITER = r"""
import sys, torch, asyncckpt
from pathlib import Path
root, stop = Path(sys.argv[1]), Path(sys.argv[2])
torch.manual_seed(0)
state = {"w": torch.randn(64, 1024), "b": torch.randn(4096).bfloat16(), "i": torch.arange(3000), "step": 0}
with asyncckpt.CheckpointManager(root, keep_last=1, chunk_size=16384, workers=1) as mgr:
    step = 0
    while not stop.exists():
        step += 1
        state["step"] = step
        mgr.save(step, state).wait()
print(step)
"""


def run(base: Path, runs: int) -> dict:
    root, stop = base / "root", base / "stop"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(root), str(stop)], stdout=subprocess.PIPE, text=True)
    while not any(root.glob("step-*")):
        if writer.poll() is not None:
            raise SystemExit("the writer died before its first commit")
        time.sleep(0.01)
    counts = {"verify_runs": 0, "load_runs": 0, "false_alarms": 0, "gone_rows": 0, "verified_rows": 0}
    examples: list[str] = []
    start = time.perf_counter()
    try:
        for _ in range(runs):
            out = io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
                status = cli_main(["verify", str(root), "--no-progress"])
            text = out.getvalue()
            counts["verify_runs"] += 1
            counts["gone_rows"] += text.count("gone ")
            counts["verified_rows"] += text.count("ok ")
            if status != 0 or "DAMAGED" in text:
                examples.append(f"verify exit {status}: {text[-300:]}")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    asyncckpt.load(root)
                except Exception as exc:  # noqa: BLE001 - every failure is a false alarm
                    examples.append(f"load: {type(exc).__name__}: {str(exc)[:300]}")
            counts["load_runs"] += 1
            examples += [f"load warned: {str(w.message)[:300]}" for w in caught]
    finally:
        stop.touch()
        out_text, _ = writer.communicate(timeout=120)
    counts["false_alarms"] = len(examples)
    counts["writer_saves"] = int(out_text.split()[-1]) if out_text.strip() else None
    counts["seconds"] = round(time.perf_counter() - start, 1)
    counts["examples"] = examples[:5]
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=2000, help="verify + load rounds")
    parser.add_argument("--dir", help="where the root goes (default: /dev/shm if writable, else the temp dir)")
    parser.add_argument("--json", help="write the counts here")
    args = parser.parse_args()
    where = args.dir or ("/dev/shm" if os.access("/dev/shm", os.W_OK) else None)
    with tempfile.TemporaryDirectory(dir=where, prefix="asyncckpt-live-") as tmp:
        counts = run(Path(tmp), args.runs)
    print(json.dumps(counts, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(counts, indent=2) + "\n")


if __name__ == "__main__":
    main()
