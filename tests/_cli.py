"""Helpers the command-line tests share: run ``asyncckpt`` in-process, parse its JSON strictly,
list the steps left in a root."""

from __future__ import annotations

import json
from pathlib import Path

from asyncckpt.cli.commands import main


def cli(capsys, *argv) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of ``asyncckpt ARGV`` run in this process."""
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def strict_json(text: str):
    """Parse as a strict parser would: NaN and Infinity are not JSON."""

    def refuse(name):
        raise AssertionError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def remaining(root: Path) -> list[int]:
    """The committed steps in ``root``, read from the directory names."""
    return sorted(int(p.name.removeprefix("step-")) for p in root.glob("step-*"))
