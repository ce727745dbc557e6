"""bench/gc_pauses.py runs on a tiny model (so the script cannot rot) and records what it says."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.bench

BENCH = Path(__file__).resolve().parents[1] / "bench" / "gc_pauses.py"


def test_gc_pauses_counts_every_save_and_each_generation(tmp_path):
    out = tmp_path / "gc.json"
    args = ["--layers", "2", "--width", "32", "--steps", "30", "--every", "5", "--json", str(out)]
    done = subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert result["saves"] == 5 and result["tensors"] == 4 * 2 * 12  # steps 5, 10, ..., 25
    assert 0 < result["stall_p50_s"] <= result["stall_p95_s"] <= result["stall_max_s"]
    for generation in (0, 1, 2):
        g = result[f"gen{generation}"]
        assert g["count"] >= g["on_training_thread"] >= 0 and g["per_100_saves"] == 100 * g["count"] / 5
    assert "| generation 2 |" in done.stdout
