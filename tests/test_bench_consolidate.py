"""bench/consolidate.py saves a tiny state at 2 ranks, loads it whole and restores it at 2 ranks
(so the script cannot rot), and bench/versions.py takes its figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import versions  # noqa: E402


@pytest.mark.bench
def test_save_load_and_restore_of_a_tiny_state(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    root = tmp_path / "root"
    args = ["--root", str(root), "--world", "2", "--mode", "fsdp2", "--size", "1", "--repeats", "2"]
    env = dict(os.environ, PYTHONPATH=str(BENCH.parent / "src"))
    subprocess.run(
        [sys.executable, str(BENCH / "consolidate.py"), *args, "--restore-world", "2", "--json", str(out)],
        check=True,
        env=env,
        timeout=300,
    )
    data = json.loads(out.read_text())
    assert 0.8 < data["state_mb"] < 1.2  # params + two AdamW moments of about 1 MB
    assert data["load_s"] > 0 and data["restore_s"] > 0 and data["peak_rss_growth_mb"] >= 0
    (step,) = root.glob("step-*")
    saved = step.stat().st_mtime_ns
    subprocess.run([sys.executable, str(BENCH / "consolidate.py"), *args], check=True, env=env, timeout=300)
    assert list(root.glob("step-*")) == [step] and step.stat().st_mtime_ns == saved  # saved once, then reused
    figures = versions.consolidate_figures(data)
    assert set(figures) == {"load ms", "peak RSS growth MB", "restore ms"}
