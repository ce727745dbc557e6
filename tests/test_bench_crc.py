"""bench/crc.py runs on a tiny state (so the script cannot rot) and compares the two CRC32s."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.bench

pytest.importorskip("isal")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import crc as bench_crc  # noqa: E402


def test_bench_crc_measures_both_checksums(tmp_path):
    out = tmp_path / "crc.json"
    payload = bench_crc.main(["--size", "4", "--rounds", "1", "--json", str(out)])
    for name in ("isal", "zlib"):
        row = payload["medians"][name]
        assert row["crc_gb_s"] > 0 and row["save_cpu_s_per_gb"] > 0 and row["load_s"] > 0
    assert json.loads(out.read_text())["medians"].keys() == {"isal", "zlib"}
