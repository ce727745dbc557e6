"""Host memory across consecutive saves of the same state: staging must not grow.

Reports RSS and the bytes held in staging arenas (pinned on GPU) after 1, 10, 50 and 100 saves,
against the state's size; on GPU also what PyTorch's own pinned-memory cache holds (the arenas
are registered with CUDA directly, so it should stay near zero). Steady-state staging should be
~1.0x the state (one arena per pending save), and RSS should not grow after the first save.

    python bench/memory.py --json bench/results/memory-cpu.json     # ~1-2 min with 0.1 GB
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import asyncckpt  # noqa: E402
from _common import machine, state_bytes, trained_state, write_json  # noqa: E402


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--depth", type=int, default=8, help="1024 x 8 + AdamW = 0.10 GB")
    ap.add_argument("--saves", type=int, default=100)
    ap.add_argument("--max-pending", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, opt = trained_state(args.width, args.depth, device)
    nbytes = state_bytes(model, opt)
    state = {"model": model, "optimizer": opt}
    rows = []

    def pinned_cache() -> int:
        """Bytes held by PyTorch's pinned-memory cache (power-of-two blocks); arenas bypass it."""
        return torch.cuda.host_memory_stats().get("allocated_bytes.current", 0) if device == "cuda" else 0

    with tempfile.TemporaryDirectory() as root:
        with asyncckpt.CheckpointManager(root, keep_last=2, max_pending=args.max_pending) as mgr:
            before = rss_bytes()
            print(
                f"state {nbytes / 1e6:.1f} MB on {device}, max_pending={args.max_pending}; "
                f"RSS before saving {before / 1e6:.0f} MB\n"
            )
            print(
                "| after saves | RSS | growth since save 1 | staging arenas | staging / state | PyTorch pinned cache |"
            )
            print("|---|---|---|---|---|---|")
            for i in range(1, args.saves + 1):
                with torch.no_grad():
                    for p in model.parameters():
                        p.add_(1e-3)  # the state changes between saves, its shape does not
                mgr.save(i, state)
                if i in (1, 10, 50, args.saves):
                    mgr.wait()
                    staged = mgr._admission.arenas.held_bytes()
                    r = {
                        "saves": i,
                        "rss": rss_bytes(),
                        "staging": staged,
                        "arenas": mgr._admission.arenas.allocations,
                        "pinned_cache": pinned_cache(),
                    }
                    rows.append(r)
                    print(  # as measured: a run cut short still shows its rows
                        f"| {i} | {r['rss'] / 1e6:.0f} MB | {(r['rss'] - rows[0]['rss']) / 1e6:+.1f} MB | "
                        f"{r['arenas']} ({staged / 1e6:.1f} MB) | {staged / nbytes:.3f}x | "
                        f"{r['pinned_cache'] / 1e6:.1f} MB |"
                    )
    write_json(args.json, {"machine": machine(), "state_bytes": nbytes, "rss_before": before, "rows": rows})


if __name__ == "__main__":
    main()
