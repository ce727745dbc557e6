"""Small things a first-time user tripped on: one rendering of NaN, option names in errors, options
that only go with another, paths checked before output, plurals, what a diff's kind change was."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

from _cli import cli, strict_json
from asyncckpt import CheckpointManager
from asyncckpt.cli.commands import build_parser
from asyncckpt.format import step_dir_name


@pytest.fixture
def root(tmp_path) -> Path:
    root = tmp_path / "ckpts"
    with CheckpointManager(root, keep_last=None, workers=1) as mgr:
        mgr.save(1, {"w": torch.zeros(2), "x": 1}, metrics={"loss": float("nan"), "acc": 0.5}).wait()
        mgr.save(2, {"w": 3, "x": torch.ones(1)}, metrics={"loss": float("inf")}).wait()
    return root


def test_inspect_and_ls_render_nan_alike(root, capsys):
    _, listed, _ = cli(capsys, "ls", root)
    _, inspected, _ = cli(capsys, "inspect", root / step_dir_name(1))
    assert '"loss": "nan"' in listed and '"loss": "nan"' in inspected
    assert "NaN" not in inspected and "NaN" not in listed


def test_one_chunk_is_singular(root, capsys):
    _, out, _ = cli(capsys, "verify", root)
    assert "(1 chunk verified)" in out and "1 chunks" not in out
    _, out, _ = cli(capsys, "inspect", root / step_dir_name(1))
    assert "1 tensor in 1 chunk" in out


def test_diff_kind_changed_says_from_what_to_what(root, capsys):
    code, out, _ = cli(capsys, "diff", root / step_dir_name(1), root / step_dir_name(2))
    assert code == 1
    lines = [line for line in out.splitlines() if "kind changed" in line]
    assert any("state['w']" in line and "tensor -> value 3" in line for line in lines), out
    assert any("state['x']" in line and "value 1 -> tensor" in line for line in lines), out
    _, out, _ = cli(capsys, "diff", root / step_dir_name(1), root / step_dir_name(2), "--json")
    rows = {row["path"]: row for row in strict_json(out)["leaves"]}
    assert rows["state['w']"]["a"] == {"kind": "tensor"} and rows["state['w']"]["b"] == {"kind": "value", "value": 3}


@pytest.mark.parametrize("option", ["--keep-last", "--keep-best", "--keep-every"])
def test_prune_counts_must_be_positive_and_the_error_names_the_option(root, capsys, option):
    extra = ["--metric", "acc"] if option == "--keep-best" else []
    code, _, err = cli(capsys, "prune", root, option, "0", *extra)
    assert code == 2 and f"argument {option}" in err and "positive" in err and "keep_" not in err
    assert sorted(p.name for p in root.glob("step-*")) == [step_dir_name(1), step_dir_name(2)]


@pytest.mark.parametrize("extra", [["--metric", "acc"], ["--mode", "max"], ["--metric", "acc", "--mode", "min"]])
def test_metric_and_mode_without_keep_best_are_usage_errors(root, capsys, extra):
    code, _, err = cli(capsys, "prune", root, "--keep-last", "1", *extra)
    assert code == 2 and "--keep-best" in err and err.startswith("asyncckpt: error:")
    assert len(list(root.glob("step-*"))) == 2


def test_prune_help_says_tagged_checkpoints_are_kept():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    text = sub.choices["prune"].format_help() + " ".join(c.help for c in sub._choices_actions if c.dest == "prune")
    assert "tagged" in text


@pytest.mark.parametrize("seconds", ["inf", "nan", "-1", "0"])
def test_demo_seconds_must_be_a_finite_positive_number(tmp_path, capsys, seconds):
    code, _, err = cli(capsys, "demo", "--seconds", seconds, "--root", tmp_path / "d")
    assert code == 2 and "--seconds" in err
    assert not (tmp_path / "d").exists()


def test_stats_plot_path_is_checked_before_anything_is_printed(root, tmp_path, capsys):
    code, out, err = cli(capsys, "stats", root, "--plot", tmp_path / "nonexist" / "p.png")
    assert code == 2 and out == "" and "asyncckpt: error:" in err and "nonexist" in err


def test_stats_plot_without_matplotlib_is_an_asyncckpt_error(root, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    code, out, err = cli(capsys, "stats", root, "--plot", tmp_path / "p.png")
    assert code == 2 and out == "" and err.startswith("asyncckpt: error:") and "matplotlib" in err


def test_stats_json_started_is_iso_and_nan_is_null_in_records_and_summary(root, capsys):
    code, out, _ = cli(capsys, "stats", root, "--json")
    data = strict_json(out)
    assert code == 0
    for record in data["records"]:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", record["started"]), record["started"]
    values = [v for r in data["records"] for v in r.values()] + list(data["summary"].values())
    assert not any(isinstance(v, str) and v in ("nan", "inf", "-inf") for v in values)
