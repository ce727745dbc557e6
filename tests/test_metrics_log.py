"""The metrics log: the writer never appends through a link or to a non-regular file, and
`asyncckpt stats` reads it as a regular file only, in bounded memory, printing no control characters."""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys

import pytest
import torch

from _waiting import run_with_timeout
from asyncckpt import CheckpointError, CheckpointManager
from asyncckpt import metrics as metrics_mod
from asyncckpt.cli.commands import main
from asyncckpt.metrics import METRICS_LOG, SaveRecord, read_log

STATE = {"w": torch.arange(100, dtype=torch.float32)}


def record_line(step: int, **fields) -> bytes:
    return json.dumps({"step": step, "ok": True, "stall_s": 0.01, **fields}).encode() + b"\n"


def unblock(fifo) -> None:
    """Should a writer be stuck opening ``fifo`` (the bug), give it a reader so the test can end."""
    try:
        os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))
    except OSError:
        pass


# ---- the writer ------------------------------------------------------------------------------


def test_a_manager_refuses_a_metrics_log_that_is_a_symlink(tmp_path):
    root = tmp_path / "ckpts"
    root.mkdir()
    outside = tmp_path / "precious.txt"
    outside.write_bytes(b"mine\n")
    os.symlink(outside, root / METRICS_LOG)
    with pytest.raises(CheckpointError, match="symbolic link") as excinfo:
        CheckpointManager(root)
    assert str(root / METRICS_LOG) in str(excinfo.value)
    assert outside.read_bytes() == b"mine\n"
    os.unlink(root / METRICS_LOG)
    with CheckpointManager(root) as mgr:  # the refused manager did not keep the root locked
        mgr.save(1, STATE).wait()


def test_a_metrics_log_linked_after_the_manager_opened_is_never_appended_to(tmp_path, caplog):
    root = tmp_path / "ckpts"
    outside = tmp_path / "precious.txt"
    outside.write_bytes(b"mine\n")
    with CheckpointManager(root, keep_last=None) as mgr:
        mgr.save(1, STATE).wait()
        os.replace(root / METRICS_LOG, tmp_path / "moved.jsonl")
        os.symlink(outside, root / METRICS_LOG)
        with caplog.at_level(logging.WARNING, logger="asyncckpt"):
            assert mgr.save(2, STATE).wait().name == "step-000000000002"  # the checkpoint still commits
            mgr.save(3, STATE).wait()
    assert outside.read_bytes() == b"mine\n"
    warned = [r.getMessage() for r in caplog.records if "symbolic link" in r.getMessage()]
    assert len(warned) == 1 and str(root / METRICS_LOG) in warned[0], warned  # said once, not per save


def test_a_metrics_log_that_is_a_fifo_is_refused_without_hanging(tmp_path):
    root = tmp_path / "ckpts"
    root.mkdir()
    os.mkfifo(root / METRICS_LOG)
    try:
        with pytest.raises(CheckpointError, match=r"not a regular file \(a FIFO\)"):
            run_with_timeout(lambda: CheckpointManager(root), timeout=60)
    finally:
        unblock(root / METRICS_LOG)


def test_a_fifo_planted_at_the_metrics_log_never_blocks_a_save(tmp_path):
    root = tmp_path / "ckpts"
    with CheckpointManager(root) as mgr:
        os.mkfifo(root / METRICS_LOG)
        try:
            assert run_with_timeout(lambda: mgr.save(1, STATE).wait(), timeout=60).name == "step-000000000001"
        finally:
            unblock(root / METRICS_LOG)
    assert stat.S_ISFIFO(os.lstat(root / METRICS_LOG).st_mode)


# ---- the reader ------------------------------------------------------------------------------


def stats_in_a_subprocess(root, *args: str) -> subprocess.CompletedProcess:
    """`asyncckpt stats` with 4 GiB of address space and 120 s, so a reader that follows a log into
    /dev/zero or waits on a FIFO fails the test instead of taking the machine down."""
    code = (
        "import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30)); "
        "from asyncckpt.cli.commands import main; sys.exit(main(sys.argv[1:]))"
    )
    try:
        return subprocess.run(
            [sys.executable, "-c", code, "stats", str(root), *args], capture_output=True, text=True, timeout=120
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError("asyncckpt stats hung") from exc


def test_stats_refuses_a_log_that_is_a_symlink(tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / METRICS_LOG).write_bytes(record_line(1, error="not yours"))
    root = tmp_path / "ckpts"
    root.mkdir()
    os.symlink(elsewhere / METRICS_LOG, root / METRICS_LOG)
    assert main(["stats", str(root)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and f"{root / METRICS_LOG} is a symbolic link" in err


def test_stats_on_a_log_linked_to_dev_zero_stops_at_once(tmp_path):
    root = tmp_path / "ckpts"
    root.mkdir()
    os.symlink("/dev/zero", root / METRICS_LOG)
    done = stats_in_a_subprocess(root)
    assert done.returncode == 2 and "is a symbolic link" in done.stderr, done.stderr


def test_stats_on_a_log_that_is_a_character_device_stops_at_once(tmp_path):
    root = tmp_path / "ckpts"
    root.mkdir()
    os.mknod(root / METRICS_LOG, stat.S_IFCHR | 0o600, os.makedev(1, 5))  # what /dev/zero is
    done = stats_in_a_subprocess(root)
    assert done.returncode == 2 and "not a regular file (a character device)" in done.stderr, done.stderr


def test_stats_on_a_log_that_is_a_fifo_does_not_wait_for_a_writer(tmp_path):
    root = tmp_path / "ckpts"
    root.mkdir()
    os.mkfifo(root / METRICS_LOG)
    done = stats_in_a_subprocess(root, "--json")
    assert done.returncode == 2 and "not a regular file (a FIFO)" in done.stderr, done.stderr


def test_only_the_tail_of_a_huge_log_is_read(tmp_path, capsys, monkeypatch):
    lines = [record_line(step) for step in range(1, 201)]
    (tmp_path / METRICS_LOG).write_bytes(b"".join(lines))
    tail = sum(len(line) for line in lines[-50:]) + len(lines[-51]) // 2  # cuts record 150 in half
    records = read_log(tmp_path, max_bytes=tail)
    assert [r.step for r in records] == list(range(151, 201))  # whole records only, the cut one dropped
    assert records.skipped == []
    assert records.omitted_bytes == sum(len(line) for line in lines[:150])

    monkeypatch.setattr(metrics_mod, "MAX_LOG_BYTES", tail)
    assert main(["stats", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert f"read only the end of {tmp_path / METRICS_LOG} (at most {tail} bytes" in err
    assert f"its first {records.omitted_bytes} bytes, older saves, are left out" in err
    assert "saves        50 (50 committed" in out
    assert main(["stats", str(tmp_path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["omitted_bytes"] == records.omitted_bytes and len(data["records"]) == 50


def test_at_most_max_log_records_lines_are_parsed(tmp_path, monkeypatch):
    """Tiny hostile records must not turn 16 MiB into millions of objects."""
    lines = [b'{"step": %d}\n' % step for step in range(1, 101)]
    (tmp_path / METRICS_LOG).write_bytes(b"".join(lines))
    monkeypatch.setattr(metrics_mod, "MAX_LOG_RECORDS", 30)
    records = read_log(tmp_path)
    assert [r.step for r in records] == list(range(71, 101))
    assert records.omitted_bytes == sum(len(line) for line in lines[:70])


def test_an_overlong_line_is_skipped_not_parsed(tmp_path):
    huge = b'{"step": 2, "error": "' + b"x" * (metrics_mod.MAX_LINE_BYTES + 1) + b'"}\n'
    (tmp_path / METRICS_LOG).write_bytes(record_line(1) + huge + record_line(3))
    records = read_log(tmp_path)
    assert [r.step for r in records] == [1, 3]
    assert records.skipped == [(2, f"line longer than {metrics_mod.MAX_LINE_BYTES} bytes")]


@pytest.mark.parametrize("field", ["raw_bytes", "persist_s"])
def test_a_number_no_float_holds_is_a_skipped_line_not_a_crash(tmp_path, capsys, field):
    """Valid JSON, a non-negative number, but one no summary can divide: the line is skipped, named,
    and the other records are summarized."""
    (tmp_path / METRICS_LOG).write_bytes(
        record_line(1, raw_bytes=1000, stored_bytes=500, persist_s=1.0)
        + record_line(2, **{field: 10**400})
        + record_line(3, raw_bytes=1000, stored_bytes=500, persist_s=1.0)
    )
    records = read_log(tmp_path)
    assert [r.step for r in records] == [1, 3]
    [(line, reason)] = records.skipped
    assert line == 2 and reason.startswith(f"ValueError: bad value for '{field}'"), reason
    assert len(reason) < 200  # the huge value is cut, not printed whole
    assert main(["stats", str(tmp_path)]) == 0
    assert "saves" in capsys.readouterr().out


def test_stats_never_prints_control_characters_from_the_log(tmp_path, capsys):
    hostile = "disk \x1b[2J\x1b]0;pwned\x07 full\r\n\u202egnp.exe"
    (tmp_path / METRICS_LOG).write_bytes(
        record_line(1) + json.dumps({"step": 2, "ok": False, "error": hostile}).encode() + b"\n"
    )
    assert read_log(tmp_path)[1] == SaveRecord(step=2, ok=False, error=hostile)  # the data itself is kept
    assert main(["stats", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    for text in (out, err):
        assert not any(ord(c) < 32 and c != "\n" or ord(c) == 127 or c == "\u202e" for c in text), repr(text)
    assert "step 2 failed: disk \\x1b[2J\\x1b]0;pwned\\x07 full\\r\\n\\u202egnp.exe" in out
    assert main(["stats", str(tmp_path), "--json"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and json.loads(out)["records"][1]["error"] == hostile


def test_skipped_line_numbers_count_from_the_first_line_read_when_the_record_cap_cuts(tmp_path, capsys, monkeypatch):
    lines = [b'{"step": %d}\n' % step for step in range(1, 101)]
    lines[79] = b"not a record\n"  # line 80 of the file, all of which is read
    (tmp_path / METRICS_LOG).write_bytes(b"".join(lines))
    monkeypatch.setattr(metrics_mod, "MAX_LOG_RECORDS", 30)
    records = read_log(tmp_path)
    assert [number for number, _ in records.skipped] == [80]
    assert main(["stats", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "line numbers count from the first line read" in err
    assert f"skipped line 80 of {tmp_path / METRICS_LOG}" in err
