"""`asyncckpt stats ROOT`: the per-save metrics log as a table, as JSON and as a timeline plot."""

from __future__ import annotations

import errno
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import asyncckpt
from _overlap_state import CommitGate
from asyncckpt import CheckpointError, CheckpointManager, EverySteps
from asyncckpt.cli.commands import PLOT_NEEDS_MATPLOTLIB, main
from asyncckpt.metrics import METRICS_LOG, SaveRecord, SaveStats, read_log, summarize
from asyncckpt.storage.local import DataFileWriter

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STEPS = [10, 20, 30, 40]
FAILED_STEP = 30


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@dataclass
class Written:
    root: Path
    summary: dict  # the manager's own SaveStats.summary() at the end of the run


@pytest.fixture
def written(tmp_path, monkeypatch) -> Written:
    """A root written by a real manager: saves at STEPS, the one at FAILED_STEP out of disk space."""
    root = tmp_path / "ckpts"
    gen = torch.Generator().manual_seed(0)
    state = {"w": torch.randn(50_000, generator=gen), "zeros": torch.zeros(100_000), "step": 0}
    with CheckpointManager(root, keep_last=None, workers=2) as mgr:
        for step in STEPS:
            state["step"] = step
            if step == FAILED_STEP:
                with monkeypatch.context() as patch:
                    patch.setattr(DataFileWriter, "append", _enospc)
                    mgr.save(step, state)
                    with pytest.raises(CheckpointError, match="No space left"):
                        mgr.wait()
            else:
                mgr.save(step, state).wait()
        summary = summarize(mgr.stats.records)
    assert _nan_equal(mgr.stats.summary(), summary)
    assert mgr.steps() == [s for s in STEPS if s != FAILED_STEP]
    return Written(root, summary)


def run_stats(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["stats", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def rows_by_step(out: str) -> dict[int, list[str]]:
    rows = {}
    for line in out.splitlines():
        fields = line.split()
        if fields and fields[0].isdigit() and len(fields) >= 14:
            rows[int(fields[0])] = fields
    return rows


def _strict_json(text: str):
    def no_constants(name):
        raise AssertionError(f"{name} is not JSON")

    return json.loads(text, parse_constant=no_constants)


def test_table_has_a_row_per_save_and_marks_the_failed_one(written, capsys):
    code, out, err = run_stats(capsys, str(written.root))
    assert code == 0, err
    assert err == ""
    rows = rows_by_step(out)
    assert sorted(rows) == STEPS
    for step, fields in rows.items():
        assert fields[1] == ("FAILED" if step == FAILED_STEP else "ok")
        stall, wait_prev, snapshot, bookkeeping = (float(v) for v in fields[2:6])
        assert stall > 0 and stall == pytest.approx(wait_prev + snapshot + bookkeeping, abs=0.25)
        if step != FAILED_STEP:
            assert float(fields[6]) > 0  # persist ms
            assert float(fields[11]) == pytest.approx(0.6, abs=0.01)  # raw MB: 150,000 float32
            assert 1.0 < float(fields[13])  # the zeros compress
    assert rows[FAILED_STEP][6] == "-" and rows[FAILED_STEP][11:] == ["-", "-", "-"]
    assert f"step {FAILED_STEP} failed: OSError: [Errno {errno.ENOSPC}] No space left on device" in out
    summary = out.split("\n\n", 1)[1]
    assert "saves        4 (3 committed, 1 failed)" in summary
    for word in ("p50", "p95", "max", "MB/s", "compression", "failures     1"):
        assert word in summary
    share = written.summary["encoder_cpu_fraction"]
    assert f"encoder      {share:.0%} of the compress threads' time was their own CPU" in summary


def test_encoder_cpu_is_the_compress_threads_own_cpu_time(written):
    records = [r for r in read_log(written.root) if r.ok]
    for r in records:  # a thread's CPU time cannot exceed the wall time it was measured over
        assert 0 < r.compress_cpu_s <= r.compress_s + 1e-3
    share = written.summary["encoder_cpu_fraction"]
    assert share == pytest.approx(sum(r.compress_cpu_s for r in records) / sum(r.compress_s for r in records))
    # at most the wall time, within the per-record clock slack above (encodes of these small
    # chunks take microseconds, where the two clocks differ by a visible share)
    wall = sum(r.compress_s for r in records)
    assert 0 < share <= (wall + 1e-3 * len(records)) / wall


def test_records_from_before_the_encoder_cpu_was_logged_do_not_count_as_zero(tmp_path, capsys):
    stats = SaveStats(tmp_path / METRICS_LOG)
    common = {"stall_s": 0.01, "ok": True, "raw_bytes": 8, "stored_bytes": 4, "persist_s": 0.1}
    stats.finished(SaveRecord(step=1, compress_s=0.5, **common))  # an older writer: no compress_cpu_s
    code, out, _ = run_stats(capsys, str(tmp_path))
    assert code == 0 and "compress threads' time" not in out
    stats.finished(SaveRecord(step=2, compress_s=0.4, compress_cpu_s=0.3, **common))
    assert summarize(read_log(tmp_path))["encoder_cpu_fraction"] == pytest.approx(0.75)


def test_the_encoder_line_is_left_out_when_nothing_was_encoded(tmp_path, capsys):
    stats = SaveStats(tmp_path / METRICS_LOG)
    stats.finished(SaveRecord(step=1, stall_s=0.01, ok=True, raw_bytes=8, stored_bytes=8, persist_s=0.1))
    code, out, _ = run_stats(capsys, str(tmp_path))
    assert code == 0 and "compress threads' time" not in out
    assert math.isnan(summarize(read_log(tmp_path))["encoder_cpu_fraction"])


def test_json_has_every_record_and_the_managers_summary(written, capsys):
    code, out, err = run_stats(capsys, str(written.root), "--json")
    assert code == 0, err
    data = _strict_json(out)
    assert [r["step"] for r in data["records"]] == STEPS
    assert [r["ok"] for r in data["records"]] == [s != FAILED_STEP for s in STEPS]
    assert "No space left" in data["records"][STEPS.index(FAILED_STEP)]["error"]
    assert data["summary"] == written.summary  # the log summarizes exactly like SaveStats.summary()
    assert data["skipped_lines"] == []


def test_a_truncated_last_line_is_skipped_and_reported(written, capsys):
    log = written.root / METRICS_LOG
    lines = log.read_bytes().splitlines(keepends=True)
    assert len(lines) == len(STEPS)
    with open(log, "ab") as f:
        f.write(lines[-1][: len(lines[-1]) // 2])  # a crash in the middle of appending a fifth record

    records = read_log(written.root)
    assert [r.step for r in records] == STEPS
    assert [number for number, _ in records.skipped] == [len(STEPS) + 1]

    code, out, err = run_stats(capsys, str(written.root))
    assert code == 0
    assert sorted(rows_by_step(out)) == STEPS
    assert f"skipped line {len(STEPS) + 1} of" in err

    code, out, _ = run_stats(capsys, str(written.root), "--json")
    assert code == 0
    data = _strict_json(out)
    assert [r["step"] for r in data["records"]] == STEPS
    assert [entry["line"] for entry in data["skipped_lines"]] == [len(STEPS) + 1]


def test_read_log_skips_and_counts_lines_that_are_not_records(tmp_path):
    good = {"step": 5, "stall_s": 0.25, "ok": True, "raw_bytes": 10, "stored_bytes": 5, "future_field": 1}
    lines = [
        json.dumps(good).encode(),
        b"",  # blank lines are not counted
        b"not json",
        b"[1, 2]",
        b'{"stall_s": 0.1}',  # no step
        b'{"step": "7"}',
        b'{"step": -1}',
        b'{"step": true}',
        b'{"step": 8, "stall_s": NaN}',
        b'{"step": 9, "ok": "yes"}',
        b'{"step": 10, "raw_bytes": 1.5}',
        b'{"step": 11, "error": 3}',
        b'{"step": 12, "stall_s": 1' + b"0" * 400 + b"}",  # an int too large for a float
        b'{"step": 13, "error": "\xff\xfe"}',  # not UTF-8
        json.dumps({"step": 6}).encode(),  # every other field has its default
    ]
    (tmp_path / METRICS_LOG).write_bytes(b"\n".join(lines) + b"\n")
    records = read_log(tmp_path)
    assert isinstance(records, list)
    assert records == [SaveRecord(step=5, stall_s=0.25, ok=True, raw_bytes=10, stored_bytes=5), SaveRecord(step=6)]
    assert [number for number, _ in records.skipped] == list(range(3, 15))


def test_missing_root_or_log_exits_2(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    code, out, err = run_stats(capsys, str(missing))
    assert code == 2 and out == ""
    assert f"no metrics log in {missing}" in err

    empty_root = tmp_path / "empty"
    empty_root.mkdir()
    code, out, err = run_stats(capsys, str(empty_root), "--json")
    assert code == 2 and out == ""
    assert f"no metrics log in {empty_root}" in err

    a_file = tmp_path / "file"
    a_file.write_text("x")
    code, _, err = run_stats(capsys, str(a_file))
    assert code == 2 and f"no metrics log in {a_file}" in err

    (empty_root / METRICS_LOG).write_bytes(b'{"step": 1, "stall')  # only a truncated line
    code, out, err = run_stats(capsys, str(empty_root))
    assert code == 2 and out == ""
    assert "no save records" in err and "skipped line 1" in err


def test_json_with_no_committed_save_has_null_not_nan(tmp_path, capsys):
    stats = SaveStats(tmp_path / METRICS_LOG)
    stats.finished(SaveRecord(step=1, stall_s=0.01, ok=False, error="OSError: disk full"))
    code, out, _ = run_stats(capsys, str(tmp_path), "--json")
    assert code == 0
    summary = _strict_json(out)["summary"]
    assert summary["failed"] == 1 and summary["committed"] == 0
    assert summary["throughput_bytes_per_s"] is None and summary["compression_ratio"] is None
    assert summary["encoder_cpu_fraction"] is None
    assert summary["stall_max_s"] == pytest.approx(0.01)

    code, out, _ = run_stats(capsys, str(tmp_path))
    assert code == 0 and "throughput   - MB/s" in out


def test_summary_of_no_records_is_nan():
    summary = summarize([])
    assert summary["saves"] == 0
    assert math.isnan(summary["stall_p50_s"]) and math.isnan(summary["compression_ratio"])
    assert SaveStats().summary().keys() >= summary.keys()
    assert {"overhead_fraction", "deferred_saves", "loop_wall_s"} <= SaveStats().summary().keys()


def test_plot_writes_a_png(written, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "timeline.png"
    code, out, err = run_stats(capsys, str(written.root), "--plot", str(png))
    assert code == 0, err
    assert sorted(rows_by_step(out)) == STEPS  # the table is still printed
    assert f"wrote {png}" in err
    data = png.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000


def test_plot_without_matplotlib_says_how_to_install_it(written, tmp_path, capsys, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib...` raise ImportError
    png = tmp_path / "timeline.png"
    code, out, err = run_stats(capsys, str(written.root), "--plot", str(png))
    assert code == 2
    assert out == ""
    assert err.strip() == f"asyncckpt: error: {PLOT_NEEDS_MATPLOTLIB}"
    assert PLOT_NEEDS_MATPLOTLIB == "asyncckpt stats --plot needs matplotlib: pip install 'asyncckpt[plot]'"
    assert not png.exists()


def _nan_equal(live: dict, logged: dict) -> bool:
    """The live summary holds every logged key with the same value (NaN equal to NaN)."""
    for key, value in logged.items():
        other = live[key]
        if not (other == value or (isinstance(value, float) and math.isnan(value) and math.isnan(other))):
            return False
    return True


def test_overlap_runs_show_the_fence_wait(tmp_path, capsys, monkeypatch):
    from asyncckpt import _phases

    monkeypatch.setitem(_phases._DELAYS, "lazy_copy", 0.2)
    model = torch.nn.Linear(256, 256)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gate = CommitGate(monkeypatch)  # the fence comes before the commit, however loaded the machine
    with CheckpointManager(tmp_path, snapshot="overlap") as mgr:
        gate.close()
        mgr.save(1, {"model": model, "optimizer": opt})
        model(torch.randn(4, 256)).sum().backward()
        opt.step()  # the fence: waits for the (slowed) copy
        gate.open()
        mgr.wait()
    code, out, _ = run_stats(capsys, str(tmp_path))
    assert code == 0
    (line,) = [x for x in out.splitlines() if x.startswith("fence wait")]
    assert float(line.split()[3]) > 0  # p50 in ms
    code, out, _ = run_stats(capsys, str(tmp_path), "--json")
    record = json.loads(out)["records"][0]
    assert record["fence_wait_s"] > 0 and record["lazy_copy_s"] > 0


def test_blocking_runs_show_no_fence_line(written, capsys):
    code, out, _ = run_stats(capsys, str(written.root))
    assert code == 0 and "fence wait" not in out


def test_the_gpu_streams_fence_wait_reaches_the_log_the_summary_and_stats(tmp_path, capsys, monkeypatch):
    # The CUDA-event timing itself is faked here (tests/test_staging.py; on a GPU,
    # tests/test_cuda_paths.py): this checks where the writer puts what it reads.
    from asyncckpt.engine.overlap import LazyCopy

    monkeypatch.setattr(LazyCopy, "gpu_fence_wait", lambda self, timeout: 0.025)
    model = torch.nn.Linear(256, 256)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with CheckpointManager(tmp_path, snapshot="overlap", policy=EverySteps(1)) as mgr:
        mgr.maybe_save(1, {"model": model, "optimizer": opt})  # maybe_save: the summary's loop clock
        model(torch.randn(4, 256)).sum().backward()
        opt.step()
        mgr.wait()
        mgr.maybe_save(2, {"model": model, "optimizer": opt})
        opt.step()
        mgr.wait()
        live = mgr.stats.summary()
        (first, second) = mgr.stats.records
    assert first.fence_gpu_wait_s == 0.025 and second.fence_gpu_wait_s == 0.025
    assert live["fence_gpu_wait_p50_s"] == 0.025
    # the longer of the host's wait and the stream's, which overlap in time
    blocked = sum(r.stall_s + max(r.fence_wait_s, 0.025) for r in (first, second))
    assert live["overhead_fraction"] == pytest.approx(blocked / live["loop_wall_s"])
    code, out, _ = run_stats(capsys, str(tmp_path))
    assert code == 0
    (line,) = [x for x in out.splitlines() if x.startswith("fence (GPU)")]
    assert line.split()[3] == "25.0" and line.split()[6] == "50.0"  # p50 and total, in ms
    code, out, _ = run_stats(capsys, str(tmp_path), "--json")
    assert [r["fence_gpu_wait_s"] for r in json.loads(out)["records"]] == [0.025, 0.025]


def test_logs_without_the_gpu_fence_field_read_as_zero_and_show_no_gpu_line(tmp_path, capsys):
    record = SaveRecord(1, stall_s=0.01, fence_wait_s=0.002, lazy_copy_s=0.01, ok=True, raw_bytes=8, stored_bytes=8)
    fields_before = {k: v for k, v in record.__dict__.items() if k != "fence_gpu_wait_s"}
    (tmp_path / METRICS_LOG).write_text(json.dumps(fields_before) + "\n")
    (read,) = read_log(tmp_path)
    assert read.fence_gpu_wait_s == 0.0
    code, out, _ = run_stats(capsys, str(tmp_path))
    assert code == 0 and "fence wait" in out and "fence (GPU)" not in out


def _broken_read(self, timeout):
    raise RuntimeError("CUDA error: an illegal memory access was encountered")


@pytest.mark.parametrize(
    "read, warning",
    [
        (_broken_read, "GPU fence wait of step 1 could not be timed: CUDA error"),
        (lambda self, timeout: None, "GPU wait was not timed .* had not reached the fence"),  # a stuck stream
    ],
)
def test_a_gpu_fence_wait_that_cannot_be_read_still_commits_the_checkpoint(tmp_path, monkeypatch, read, warning):
    from asyncckpt.engine.overlap import LazyCopy

    monkeypatch.setattr(LazyCopy, "gpu_fence_wait", read)
    model = torch.nn.Linear(64, 64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with CheckpointManager(tmp_path, snapshot="overlap") as mgr:
        # around save too: the writer thread may warn before handle.wait() is reached
        with pytest.warns(UserWarning, match=warning):
            handle = mgr.save(1, {"model": model, "optimizer": opt})
            opt.step()
            path = handle.wait()
        assert mgr.steps() == [1] and mgr.stats.records[0].fence_gpu_wait_s == 0.0
    assert path.name == "step-000000000001" and asyncckpt.load(path)["model"]["weight"].equal(model.weight)


def test_warnings_as_errors_never_fail_a_committed_checkpoint_or_stop_the_writer(tmp_path, monkeypatch, caplog):
    # Under -W error a warning raised on the writer thread would report a committed checkpoint as
    # failed, or kill the writer with saves waiting on it: the writer logs those messages instead.
    import warnings

    from asyncckpt.engine.overlap import LazyCopy
    from asyncckpt.engine.retain import Retainer

    def retention_fails(self, protect):
        raise OSError("retention could not list the root")

    monkeypatch.setattr(LazyCopy, "gpu_fence_wait", lambda self, timeout: None)
    monkeypatch.setattr(Retainer, "apply", retention_fails)
    model = torch.nn.Linear(64, 64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings(), caplog.at_level("WARNING", logger="asyncckpt"):
        warnings.simplefilter("error")
        with CheckpointManager(tmp_path, snapshot="overlap") as mgr:
            handle = mgr.save(1, {"model": model, "optimizer": opt})
            opt.step()
            path = handle.wait(timeout=60)
            assert mgr.stats.records[0].ok and mgr.steps() == [1]
            mgr.save(2, {"model": model, "optimizer": opt})  # the writer is still there
            opt.step()
            mgr.wait()
    assert path.name == "step-000000000001" and mgr.steps() == [1, 2]
    assert "GPU wait was not timed" in caplog.text and "bookkeeping after step 2 failed" in caplog.text
