"""The command line as a first-time user meets it: --version, help for every option, usage errors,
diff's exit status, ls's units and times, export's format and file, strict JSON everywhere."""

from __future__ import annotations

import argparse
import io
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _cli import cli, strict_json
from asyncckpt import CheckpointManager
from asyncckpt.cli.commands import build_parser, main
from asyncckpt.format import step_dir_name

ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


@pytest.fixture
def root(tmp_path) -> Path:
    """Steps 1 and 2 of a small model; step 2's metrics include NaN and infinities."""
    root = tmp_path / "ckpts"
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    with CheckpointManager(root, keep_last=None, workers=1) as mgr:
        mgr.save(1, {"model": model, "step": 1}, metrics={"loss": 0.5}).wait()
        with torch.no_grad():
            model.weight.add_(1.0)
        metrics = {"loss": float("nan"), "grad_norm": float("inf"), "low": float("-inf")}
        mgr.save(2, {"model": model, "step": 2}, metrics=metrics).wait()
    return root


def ckpt(root: Path, step: int) -> Path:
    return root / step_dir_name(step)


# ----------------------------------------------------------------------------------- the parser


def test_version(capsys):
    from importlib.metadata import version

    code, out, _ = cli(capsys, "--version")
    assert code == 0 and out.strip() == f"asyncckpt {version('asyncckpt')}"


def test_every_option_of_every_command_has_help():
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = []
    for name, sub in commands.choices.items():
        for action in sub._actions:
            if not isinstance(action, argparse._HelpAction) and not action.help:
                missing.append(f"{name} {action.dest}")
    assert missing == []
    assert len(commands.choices) == 8


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["nosuch"],
        ["ls"],
        ["demo", "--seconds", "0"],
        ["demo", "--width", "x"],
        ["demo", "--adaptive", "5"],
        ["export", "a"],
        ["prune", "r", "--keep-last", "many"],
    ],
)
def test_usage_errors_exit_2_with_asyncckpt_error(capsys, argv):
    code, _, err = cli(capsys, *argv)
    assert code == 2
    assert "asyncckpt: error:" in err and "Traceback" not in err


def test_the_installed_command_reports_usage_errors_the_same_way(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "asyncckpt.cli", "demo", "--device", "cuda:99"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("asyncckpt: error:") and "Traceback" not in result.stderr


# ------------------------------------------------------------------------------------------ diff


def test_diff_exits_0_when_equal_and_1_when_different(root, capsys):
    code, out, _ = cli(capsys, "diff", ckpt(root, 1), ckpt(root, 1))
    assert code == 0 and "the checkpoints are equal" in out
    assert "equal   " not in out  # equal leaves are not listed by default
    code, out, _ = cli(capsys, "diff", ckpt(root, 1), ckpt(root, 2))
    assert code == 1 and "the checkpoints differ" in out
    assert "state['model'].state_dict()['weight']" in out
    assert "state['model'].state_dict()['bias']" not in out  # equal: only with --all
    code, out, _ = cli(capsys, "diff", ckpt(root, 1), ckpt(root, 2), "--all")
    assert code == 1 and "state['model'].state_dict()['bias']" in out
    code, out, _ = cli(capsys, "diff", ckpt(root, 1), ckpt(root, 2), "--json")
    result = strict_json(out)
    assert code == 1 and {row["status"] for row in result["leaves"]} == {"different"}
    assert result["counts"] == {"different": 2, "equal": 1}


def test_diff_progress_on_stderr(root, capsys, monkeypatch):
    code, out, err = cli(capsys, "diff", ckpt(root, 1), ckpt(root, 2), "--progress")
    assert code == 1 and "diff [####################] 100%" in err and "[" not in out.splitlines()[0]

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    for extra, shown in (([], True), (["--no-progress"], False)):
        terminal = Terminal()
        monkeypatch.setattr(sys, "stderr", terminal)
        assert main(["diff", str(ckpt(root, 1)), str(ckpt(root, 2)), *extra]) == 1
        assert ("100%" in terminal.getvalue()) is shown


# -------------------------------------------------------------------------------------------- ls


def test_ls_shows_sizes_in_units_and_the_creation_time(root, capsys):
    code, out, _ = cli(capsys, "ls", root)
    assert code == 0
    header, *rows = out.splitlines()
    assert "created (UTC)" in header and "stored" in header
    assert len(rows) == 2
    for row in rows:
        fields = row.split()
        assert ISO_UTC.match(fields[1]), row
        assert re.fullmatch(r"\d+", fields[2]) and fields[3] in ("B", "kB", "MB", "GB", "TB"), row


# ------------------------------------------------------------------------------------------ json


def test_every_json_output_parses_strictly_and_created_is_iso_utc(root, capsys):
    code, out, _ = cli(capsys, "ls", root, "--json")
    rows = strict_json(out)
    assert code == 0 and [r["step"] for r in rows] == [1, 2]
    assert rows[1]["metrics"] == {"loss": "nan", "grad_norm": "inf", "low": "-inf"}
    assert all(ISO_UTC.match(r["created"]) for r in rows)
    code, out, _ = cli(capsys, "inspect", ckpt(root, 2), "--json")
    info = strict_json(out)
    assert code == 0 and info["metrics"]["loss"] == "nan" and ISO_UTC.match(info["created"])
    code, out, _ = cli(capsys, "inspect", ckpt(root, 2))
    assert re.search(r"^created     \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$", out, re.M)
    assert rows[1]["created"] in out
    for argv in (
        ["verify", root, "--json"],
        ["diff", ckpt(root, 1), ckpt(root, 2), "--json"],
        ["stats", root, "--json"],
    ):
        code, out, _ = cli(capsys, *argv)
        assert code in (0, 1) and strict_json(out) is not None


# ---------------------------------------------------------------------------------------- export


@pytest.mark.parametrize("name", ["model.pt", "model.pth", "pytorch_model.bin"])
def test_export_takes_the_torch_format_from_the_extension(root, tmp_path, capsys, name):
    out = tmp_path / name
    code, text, _ = cli(capsys, "export", ckpt(root, 1), "-o", out)
    assert code == 0 and "as pt" in text
    flat = torch.load(out, weights_only=True)
    assert set(flat) == {"weight", "bias"}


def test_export_safetensors_by_extension_and_explicit_format(root, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    assert cli(capsys, "export", ckpt(root, 1), "-o", out)[0] == 0
    assert out.read_bytes()[8:9] == b"{"  # a safetensors header, not a zip
    odd = tmp_path / "weights.ckpt"
    assert cli(capsys, "export", ckpt(root, 1), "-o", odd, "--format", "pt")[0] == 0
    assert set(torch.load(odd, weights_only=True)) == {"weight", "bias"}


@pytest.mark.parametrize(
    ("name", "extra", "message"),
    [
        ("weights.ckpt", [], "give --format"),
        ("noext", [], "give --format"),
        ("model.pt", ["--format", "safetensors"], "does not match"),
        ("model.safetensors", ["--format", "pt"], "does not match"),
    ],
)
def test_export_format_errors_write_nothing(root, tmp_path, capsys, name, extra, message):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, out, err = cli(capsys, "export", ckpt(root, 1), "-o", out_dir / name, *extra)
    assert code == 2 and err.startswith("asyncckpt: error:") and message in err, err
    assert list(out_dir.iterdir()) == []


def test_export_into_a_missing_directory_is_an_error(root, tmp_path, capsys):
    out = tmp_path / "nowhere" / "deeper" / "model.safetensors"
    code, _, err = cli(capsys, "export", ckpt(root, 1), "-o", out)
    assert code == 2 and "does not exist" in err and str(out.parent) in err
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_export_file_mode_follows_the_umask(root, tmp_path, capsys, umask, mode):
    out = tmp_path / "model.safetensors"
    old = os.umask(umask)
    try:
        assert cli(capsys, "export", ckpt(root, 1), "-o", out)[0] == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == mode


def test_export_fsyncs_the_directory_after_the_rename(root, tmp_path, capsys, monkeypatch):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    synced: list[tuple[str, bool]] = []  # (path fsynced, whether OUT existed by then)
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), (out_dir / "m.safetensors").exists()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    assert cli(capsys, "export", ckpt(root, 1), "-o", out_dir / "m.safetensors")[0] == 0
    assert (str(out_dir), True) in synced


def test_diff_reads_in_batches_and_its_progress_sums_to_the_total(tmp_path, monkeypatch):
    from asyncckpt.cli import tools

    a = {f"t{i}": torch.full((1024,), float(i)) for i in range(6)}  # 4 KiB each
    b = {**{k: v.clone() for k, v in a.items()}, "t5": torch.zeros(1024), "only_b": torch.ones(1024)}
    b.pop("t0")
    a["tied"] = a["t1"]  # one storage under two names
    for name, state in (("a", a), ("b", b)):
        with CheckpointManager(tmp_path / name, workers=1) as mgr:
            mgr.save(1, state).wait()
    pa, pb = ckpt(tmp_path / "a", 1), ckpt(tmp_path / "b", 1)
    monkeypatch.setattr(tools, "DIFF_BATCH_BYTES", 8192)  # two tensors of A per batch
    reads: list[int] = []
    real_read = tools.read_checkpoint

    def counting_read(path, *args, only=None, **kwargs):
        assert only is not None  # never the whole checkpoint at once
        reads.append(len(only))
        return real_read(path, *args, only=only, **kwargs)

    monkeypatch.setattr(tools, "read_checkpoint", counting_read)
    calls: list[int] = []
    result = tools.diff_checkpoints(pa, pb, progress=calls.append)
    assert sum(calls) == tools.diff_total_bytes(pa, pb) == (6 + 6) * 4096
    assert len(calls) >= 3 and max(reads) <= 3
    status = {row["path"]: row["status"] for row in result["leaves"]}
    assert status["state['t0']"] == "missing" and status["state['only_b']"] == "extra"
    assert status["state['t5']"] == "different" and status["state['t1']"] == "equal"
    assert status["state['tied']"] == "missing"


def test_output_cut_short_by_the_reader_is_no_traceback(tmp_path):
    root = tmp_path / "big"
    with CheckpointManager(root, workers=1) as mgr:
        mgr.save(1, {f"tensor_{i}": torch.zeros(1) for i in range(3000)}).wait()
    proc = subprocess.Popen(
        [sys.executable, "-m", "asyncckpt.cli", "inspect", str(ckpt(root, 1)), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.read(10)  # like `| head -c 10`
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_python_dash_m_asyncckpt_is_the_command(tmp_path):
    done = subprocess.run([sys.executable, "-m", "asyncckpt", "ls", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 2 and "is not a checkpoint root" in done.stderr, done.stderr
    done = subprocess.run([sys.executable, "-m", "asyncckpt", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("asyncckpt "), done.stdout
