"""bench/remote_reads.py, run tiny against the real local S3 server behind its delaying proxy: the
script must not rot between the rare runs that fill docs/performance.md. Structure only; timings
never decide a test, but the proxy's delay must show in one GET (else the figures mean nothing)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from _s3server import weed_binary

pytestmark = pytest.mark.bench

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "remote_reads.py"


@pytest.mark.skipif(weed_binary() is None or importlib.util.find_spec("obstore") is None, reason="needs weed, obstore")
def test_the_reads_of_a_multi_rank_root_are_timed_through_the_delaying_proxy(tmp_path):
    out = tmp_path / "remote_reads.json"
    args = ["--ranks", "2", "--steps", "2", "--latency-ms", "50", "--repeats", "1", "--json", str(out)]
    done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    payload = json.loads(out.read_text())
    assert payload["ranks"] == 2 and payload["steps"] == 2 and payload["objects"] > 2 * 2
    assert payload["one_get_s"] >= 0.05  # every request waits at the proxy
    for key in ("listing_s", "read_manifest_s", "catalog_s", "load_s"):
        assert payload[key] >= 0.05, key
