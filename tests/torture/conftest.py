"""Options and fixtures of the SIGKILL torture test.

Kills per run: 50 by default (CI); 1000 with ``--torture-long`` or ``ASYNCCKPT_TORTURE=long``;
any number with ``--torture-kills N`` or ``ASYNCCKPT_TORTURE_KILLS=N``. ``--torture-seed`` /
``ASYNCCKPT_TORTURE_SEED`` replays a run (the seed is printed and in every failure message).
``-m slow`` runs the separate 1000-kill test. The options are registered here, so they are known
when pytest is pointed at this directory (``pytest tests/torture --torture-long``); the environment
variables work from anywhere. With ``ASYNCCKPT_TORTURE_REPORT=FILE`` a JSON summary of the run
(kills per phase, checkpoints verified, losses) is written to FILE.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import pytest

from ._spawn import ExecSpawner, ForkServer

CI_KILLS = 50
LONG_KILLS = 1000

_SUMMARIES = pytest.StashKey[list]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("torture", "asyncckpt SIGKILL torture test")
    group.addoption("--torture-long", action="store_true", help=f"kill {LONG_KILLS} times instead of {CI_KILLS}")
    group.addoption("--torture-kills", type=int, default=None, help="number of kills (overrides --torture-long)")
    group.addoption("--torture-seed", type=int, default=None, help="seed of the trial plan (default: random)")


def _option(config: pytest.Config, name: str):
    try:
        return config.getoption(name)
    except ValueError:  # this conftest was not an initial one: its options were never parsed
        return None


@dataclass(frozen=True)
class TortureConfig:
    kills: int
    seed: int | None
    mode: str
    long_kills: int = LONG_KILLS


@pytest.fixture
def torture_config(request: pytest.FixtureRequest) -> TortureConfig:
    config = request.config
    long = bool(_option(config, "--torture-long")) or os.environ.get("ASYNCCKPT_TORTURE", "") == "long"
    kills = _option(config, "--torture-kills") or int(os.environ.get("ASYNCCKPT_TORTURE_KILLS", "0") or 0)
    if not kills:
        kills = LONG_KILLS if long else CI_KILLS
    seed = _option(config, "--torture-seed")
    if seed is None and os.environ.get("ASYNCCKPT_TORTURE_SEED"):
        seed = int(os.environ["ASYNCCKPT_TORTURE_SEED"])
    return TortureConfig(kills=kills, seed=seed, mode="long" if long else "ci")


@pytest.fixture
def spawner(tmp_path):
    """Starts savers: a fork server by default, fresh interpreters with ASYNCCKPT_TORTURE_SPAWN=exec."""
    kind = ExecSpawner if os.environ.get("ASYNCCKPT_TORTURE_SPAWN") == "exec" else ForkServer
    server = kind(tmp_path)
    yield server
    server.close()


@pytest.fixture
def torture_report(request: pytest.FixtureRequest):
    """``torture_report(summary)``: keep it for the terminal summary, write it to the report file."""
    summaries = request.config.stash.setdefault(_SUMMARIES, [])

    def record(summary: dict) -> None:
        summaries.append(summary)
        path = os.environ.get("ASYNCCKPT_TORTURE_REPORT")
        if path:
            data = summaries[0] if len(summaries) == 1 else summaries
            with open(path, "w") as f:
                json.dump(data, f, indent=2, sort_keys=True)
                f.write("\n")

    return record


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    for summary in config.stash.get(_SUMMARIES, []):
        terminalreporter.section("asyncckpt torture")
        per_phase = ", ".join(f"{phase} {n}" for phase, n in summary["kills_per_phase"].items())
        terminalreporter.write_line(
            f"{summary['test']}: {summary['kills']} SIGKILLs ({per_phase}); "
            f"{summary['checkpoints_verified']} checkpoints verified, {summary['restores_verified']} restores, "
            f"losses {summary['losses']}; seed {summary['seed']}, {summary['seconds']:.1f} s"
            + ("" if summary["ok"] else f"; FAILED: {summary['failure']}")
        )
