"""bench/stall.py, run tiny: the GPU runs it rarely and under a device time limit, so it must not
reach that machine broken. Structure only; timings never decide a test."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.bench

STALL = Path(__file__).resolve().parents[1] / "bench" / "stall.py"
TINY = ["--device", "cpu", "--width", "64", "--depth", "2", "--batch", "4", "--iters", "4", "--every", "2"]


def _load_stall():
    spec = importlib.util.spec_from_file_location("bench_stall", STALL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


stall = _load_stall()


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
        phases = data["savers"][name]["persist_phases_s"]
        assert set(phases) == {"compress", "write", "fsync", "commit"} and phases["compress"] > 0
    assert data["savers"]["torch.save"]["encoder_cpu_s"] is None  # not asyncckpt: no encoder threads, null
    assert data["savers"]["torch.save"]["persist_phases_s"] is None
    assert "(persist medians: compress " in done.stderr
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


def _result(loops: list[float], rounds: list[int] | None = None, **extra) -> dict:
    r = {"loop": loops, "stall": [0.01], "fence": [], "cpu": [None], "durable": [1.0], "bytes": 10} | extra
    if rounds is not None:
        r["round"] = rounds
    return r


def test_overhead_is_paired_with_the_same_rounds_baseline():
    results = {
        "none": _result([10.0, 12.0, 20.0], [0, 1, 2]),  # the machine drifts between rounds
        "a": _result([11.0, 13.0, 21.0], [0, 1, 2]),  # +1 s in every round: 0.5 s per checkpoint
        "b": _result([12.0, 22.0], [0, 2]),  # +2 s in the rounds it ran; failed in round 1
    }
    summary, floor, base = stall.summarize(results, [0.1, 0.3], n_ckpt=2)
    assert summary["a"]["overhead_per_round_s"] == [0.5, 0.5, 0.5]
    assert summary["b"]["overhead_per_round_s"] == [1.0, 1.0]
    assert summary["a"]["overhead_s"] == 0.5
    assert summary["b"]["overhead_s"] == 1.0  # unpaired: (median 17 - median 12) / 2 = 2.5
    assert floor == pytest.approx(0.2) and base == 12.0
    assert math.isnan(summary["a"]["cpu_s"])  # a null in the JSON reads back as not measured


def test_a_baseline_missing_a_round_leaves_that_round_unpaired():
    results = {"none": _result([10.0, 14.0], [0, 2]), "a": _result([11.0, 100.0, 15.5], [0, 1, 2])}
    summary, _, _ = stall.summarize(results, [0.1], n_ckpt=1)
    assert summary["a"]["overhead_per_round_s"] == [1.0, 1.5]
    assert summary["a"]["overhead_s"] == pytest.approx(1.25)


def test_json_from_before_rounds_were_recorded_pairs_loop_i_with_round_i():
    results = {"none": _result([10.0, 20.0]), "a": _result([10.5, 22.0])}  # no "round" lists
    summary, _, _ = stall.summarize(results, [0.1], n_ckpt=1)
    assert summary["a"]["overhead_per_round_s"] == [0.5, 2.0]


def test_a_saver_that_failed_in_one_round_says_so_in_the_table(capsys):
    results = {"none": _result([10.0, 10.0], [0, 1]), "a": _result([11.0], [1], error="OSError: disk full")}
    summary, floor, _ = stall.summarize(results, [0.1], n_ckpt=1)
    stall.print_table(summary, floor)
    assert "| a (failed in a round: OSError: disk full) | 10.0 ms |" in capsys.readouterr().out


def test_the_one_openmp_thread_saver_narrows_its_encoders_and_nothing_else(tmp_path):
    import torch

    from _threads import torch_threads_in_a_new_thread as in_new_thread

    main_threads, new_threads = torch.get_num_threads(), in_new_thread()
    if min(main_threads, new_threads) < 2:
        pytest.skip("torch runs one thread here: a narrowed team could not be told apart")
    model, opt = stall.trained_state(16, 1, "cpu")
    saver = stall.SAVERS["asyncckpt-overlap-omp1"](tmp_path / "omp1", model, opt)
    plain = stall.SAVERS["asyncckpt-overlap"](tmp_path / "plain", model, opt)
    try:
        saver.save(1)
        saver.drain()
        assert saver.mgr.steps() == [1]
        assert saver.mgr._pipeline._pool.submit(torch.get_num_threads).result() == 1
        assert plain.mgr._pipeline._pool.submit(torch.get_num_threads).result() == new_threads  # class restored
    finally:
        saver.close()
        plain.close()
    assert torch.get_num_threads() == main_threads and in_new_thread() == new_threads  # process-wide: untouched
