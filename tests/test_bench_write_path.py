"""bench/write_path.py runs on a tiny file (so the script cannot rot) and measures both writers."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import write_path as bench_write_path  # noqa: E402


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this platform")
def test_bench_write_path_measures_both_writers(tmp_path):
    out = tmp_path / "write-path.json"
    args = ["--mib", "9", "--rounds", "2", "--saves", "1", "--dir", str(tmp_path), "--json", str(out)]
    payload = bench_write_path.main(args)
    for name in ("buffered", "o_direct"):
        row = payload["medians"][name]
        assert row["wall_s"] > 0 and row["cpu_s_per_gb"] >= 0 and row["max_append_or_finish_s"] > 0
    assert payload["medians"]["o_direct"]["direct"] and not payload["medians"]["buffered"]["direct"]
    saves = payload["save_medians"]
    assert saves["o_direct"]["direct"] and not saves["buffered"]["direct"]
    assert saves["o_direct"]["save_s"] > 0 and saves["buffered"]["load_s"] > 0
    assert json.loads(out.read_text())["medians"].keys() == {"buffered", "o_direct"}
    assert sorted(os.listdir(tmp_path)) == ["write-path.json"]  # the bench cleans up
