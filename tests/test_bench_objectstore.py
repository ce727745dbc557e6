"""bench/objectstore.py, run tiny against the real local S3 server: the script must not rot between
the rare runs that fill docs/performance.md. Structure only; timings never decide a test."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from _s3server import weed_binary

pytestmark = pytest.mark.bench

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "objectstore.py"
TINY = ["--state", "mlp", "--width", "64", "--depth", "2", "--repeats", "1", "--saves", "1"]


def _savers() -> list[str]:
    savers = ["asyncckpt-local-zstd", "asyncckpt-local-raw", "floor-put-zstd-size", "floor-put-raw-size"]
    savers.append("torch.save+put")
    if importlib.util.find_spec("asyncckpt.storage.objectstore") is not None:
        savers[:0] = ["asyncckpt-s3-zstd", "asyncckpt-s3-raw"]
    if importlib.util.find_spec("s3fs") is not None:  # DCP's FsspecWriter on S3 needs it (the bench extra)
        savers.append("dcp-fsspec")
    return savers


@pytest.mark.skipif(weed_binary() is None or importlib.util.find_spec("obstore") is None, reason="needs weed, obstore")
def test_every_saver_reports_its_figures_and_restores_the_saved_state(tmp_path):
    savers = _savers()
    out = tmp_path / "objectstore.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *TINY, "--savers", ",".join(savers), "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(out.read_text())["summary"]
    assert list(summary) == savers
    for name, row in summary.items():
        assert "error" not in row, (name, row.get("error"), done.stderr[-3000:])  # a failed restore check too
        assert row["rounds"] == 1 and row["bytes"] > 0 and row["durable_s"] > 0, name
        if not name.startswith("floor"):
            assert row["restore_s"] > 0 and row["stall_s"] >= 0, name
    for name in savers:
        assert f"| {name} |" in done.stdout


def test_an_unknown_saver_is_refused_by_name():
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *TINY, "--savers", "asyncckpt-s3-zstd,s4"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "unknown savers ['s4']" in done.stderr
