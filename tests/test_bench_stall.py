"""bench/stall.py, run tiny: the GPU runs it rarely and under a device time limit, so it must not
reach that machine broken. Structure only; timings never decide a test."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

STALL = Path(__file__).resolve().parents[1] / "bench" / "stall.py"
TINY = ["--device", "cpu", "--width", "64", "--depth", "2", "--batch", "4", "--iters", "4", "--every", "2"]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(STALL), *args], capture_output=True, text=True, timeout=120)


def test_stall_reports_every_saver_paired_by_round_and_the_encoders_cpu(tmp_path):
    out = tmp_path / "stall.json"
    savers = "none,asyncckpt,asyncckpt-overlap,torch.save"
    done = run(*TINY, "--repeats", "2", "--cpu-saves", "1", "--savers", savers, "--json", str(out))
    assert done.returncode == 0, done.stderr
    data = json.loads(out.read_text())
    assert set(data["savers"]) == {"asyncckpt", "asyncckpt-overlap", "torch.save"}
    for name, row in data["savers"].items():
        assert len(row["overhead_per_round_s"]) == 2, name  # one per round, each against its own baseline
        assert row["bytes"] > 0 and row["stall_s"] >= 0
    for name in ("asyncckpt", "asyncckpt-overlap"):
        assert data["savers"][name]["encoder_cpu_s"] > 0
    assert math.isnan(data["savers"]["torch.save"]["encoder_cpu_s"])  # not asyncckpt: no encoder threads
    assert data["rounds"]["none"]["round"] == [0, 1]
    assert "| asyncckpt-overlap |" in done.stdout and "(encoders " in done.stdout

    again = run("--from-json", str(out))  # a finished run's JSON prints the same table
    assert again.returncode == 0, again.stderr
    table = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert [line for line in again.stdout.splitlines() if line.startswith("| ")] == table


def test_a_run_cut_short_still_prints_what_it_measured(tmp_path):
    out = tmp_path / "stall.json"
    done = run(*TINY, "--repeats", "1", "--cpu-saves", "0", "--savers", "none,asyncckpt", "--json", str(out))
    assert done.returncode == 0, done.stderr
    data = json.loads(out.read_text())
    partial = {  # what the JSON looks like after the first saver, when a time limit stops the run
        "partial": True,
        "machine": data["machine"],
        "args": data["args"] | {"savers": "none,asyncckpt,dcp"},
        "state_bytes": data["state_bytes"],
        "floors_s": data["floors_s"],
        "savers": data["rounds"] | {"dcp": {"loop": [], "round": [], "stall": [], "fence": [], "cpu": []}},
    }
    cut = tmp_path / "cut.json"
    cut.write_text(json.dumps(partial))
    shown = run("--from-json", str(cut))
    assert shown.returncode == 0, shown.stderr
    assert "| dcp | failed: not run (the run was cut short) |" in shown.stdout
    assert "| asyncckpt |" in shown.stdout


def test_from_json_refuses_an_older_summary_with_a_clear_message(tmp_path):
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"floor_s": 0.1, "savers": {"asyncckpt": {"stall_s": 0.02}}}))
    shown = run("--from-json", str(old))
    assert shown.returncode != 0
    assert f"{old}: a finished run's summary from an older stall.py" in shown.stderr
