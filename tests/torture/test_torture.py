"""SIGKILL a saving process inside every phase of a save, many times over; nothing committed is lost.

Each trial starts a saver (child.py) on one shared root with the phase seam set to pause in one
target phase (snapshot, compress, write, fsync, manifest, rename, replace, retention, in turn),
waits until the mark file shows the saver entered that phase (sometimes the Nth time, to land in
a later save or chunk), sleeps a random part of the pause, and SIGKILLs it. Every ninth trial
instead kills at a random instant with no pause anywhere. After every kill a new manager opens the
root, and the root must hold:

* no ``.tmp-*`` or ``.replaced-*`` entry once the manager has swept;
* only checkpoints that verify and hold exactly ``content(step)`` (and the ledger's hash for it);
* every step the saver was told had committed (a line in its ledger), unless ``keep_last``
  retention removed it in favour of two newer ones: zero losses;
* a newest step that is the ledger's last step or one past it (a commit may land before its ledger
  line), and never older than the newest before the trial; ``restore`` returns it, bit for bit.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

import asyncckpt
from asyncckpt import CheckpointError, CheckpointManager
from asyncckpt._phases import PHASES

from .child import KEEP_LAST, content, digest

RANDOM = "random timing"
TARGETS = (*PHASES, RANDOM)
PER_CHUNK = frozenset({"compress", "write"})  # entered once per chunk (five per save); the rest once per save
TIMEOUT = 120.0  # for a saver to reach its phase: only a hung or crashed saver gets near it


@dataclass(frozen=True)
class Trial:
    index: int
    target: str
    nth: int  # kill on the nth entry into the target phase
    delay: float  # the pause in the target phase
    wait: float  # seconds between the mark (or "ready") and the kill
    compression: str
    repeat: float  # probability that a save repeats the previous step (a replace)
    child_seed: int

    def describe(self) -> str:
        if self.target == RANDOM:
            return f"random timing: kill {self.wait:.3f} s after ready, compression {self.compression}"
        return (
            f"{self.target} entry #{self.nth}, pause {self.delay:.3f} s, kill {self.wait:.3f} s in, "
            f"compression {self.compression}, repeat {self.repeat}"
        )


def plan_trial(rng: random.Random, index: int) -> Trial:
    target = TARGETS[index % len(TARGETS)]
    compression = rng.choice(["zstd", "none"])
    repeat = 0.6 if target == "replace" else 0.2
    child_seed = rng.getrandbits(32)
    if target == RANDOM:
        return Trial(index, target, 0, 0.0, rng.uniform(0.0, 0.8), compression, repeat, child_seed)
    delay = rng.uniform(0.2, 0.5)
    nth = rng.randint(1, 7) if target in PER_CHUNK else rng.choice((1, 1, 2, 3))
    return Trial(index, target, nth, delay, delay * rng.uniform(0.05, 0.9), compression, repeat, child_seed)


def read_ledger(path: Path) -> list[tuple[int, str]]:
    """The ledger's complete lines; a line cut short by the kill is dropped from the file too."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    complete = raw[: raw.rfind(b"\n") + 1]
    if len(complete) != len(raw):
        with open(path, "r+b") as f:  # the next saver appends: keep its first line whole
            f.truncate(len(complete))
    return [(int(step), sha) for step, sha in (line.split() for line in complete.decode().splitlines())]


def mark_lines(path: Path) -> list[str]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return text[: text.rfind("\n") + 1].splitlines()


def wait_for_mark(saver, mark: Path, phase: str, count: int, where: str) -> list[str]:
    """Poll the mark file until ``phase`` appears ``count`` times; fail if the saver dies first."""
    deadline = time.monotonic() + TIMEOUT
    next_check = 0.0
    while True:
        lines = mark_lines(mark)
        if lines.count(phase) >= count:
            return lines
        now = time.monotonic()
        if now >= next_check:
            if not saver.alive():
                pytest.fail(f"{where}: the saver exited ({saver.returncode}) before the kill:\n{saver.output()}")
            assert now < deadline, f"{where}: no {phase!r} #{count} within {TIMEOUT} s; marks {lines[-10:]}"
            next_check = now + 0.05
        time.sleep(0.002)


def blank_state() -> dict:
    state = content(0)
    for tensor in (state["x"], state["aux"]["w"], state["aux"]["ids"]):
        tensor.zero_()
    state["step"], state["name"] = -1, ""
    return state


@dataclass
class Tally:
    kills: Counter = field(default_factory=lambda: Counter({target: 0 for target in TARGETS}))
    verified: int = 0
    restores: int = 0
    acknowledged: int = 0  # ledger lines: saves the saver was told had committed
    retention_deleted: int = 0  # acknowledged steps gone because two newer ones are kept
    tmp_swept: Counter = field(default_factory=Counter)
    replaced_swept: Counter = field(default_factory=Counter)
    replaces_undone: Counter = field(default_factory=Counter)
    over_kept: Counter = field(default_factory=Counter)
    compression: Counter = field(default_factory=Counter)
    seconds: Counter = field(default_factory=Counter)  # per target: start to kill, and the check


def check_root(root: Path, ledger: Path, prev_newest: int, target: str, tally: Tally, where: str) -> int:
    """Everything the module docstring promises after a kill; returns the newest committed step."""
    records = read_ledger(ledger)
    recorded = dict(records)
    before = os.listdir(root)
    tally.tmp_swept[target] += sum(name.startswith(".tmp-") for name in before)
    for name in before:
        if name.startswith(".replaced-"):
            tally.replaced_swept[target] += 1
            if name[len(".replaced-") :].rsplit(".", 1)[0] not in before:  # killed between the two renames
                tally.replaces_undone[target] += 1
    if sum(name.startswith("step-") for name in before) > KEEP_LAST:
        tally.over_kept[target] += 1  # killed before retention deleted the old ones

    with CheckpointManager(root, keep_last=KEEP_LAST) as mgr:  # opening it sweeps
        leftovers = sorted(n for n in os.listdir(root) if n.startswith((".tmp-", ".replaced-")))
        assert leftovers == [], f"{where}: left after the sweep: {leftovers} (before it: {sorted(before)})"

        steps = mgr.steps()
        for step in steps:
            try:
                tree = asyncckpt.load(root, step=step)  # verifies every chunk's checksum
            except CheckpointError as exc:
                pytest.fail(f"{where}: committed step-{step} does not load: {exc}")
            assert tree["step"] == step, f"{where}: step-{step} holds step {tree['step']}"
            expected = digest(content(step))
            assert digest(tree) == expected, f"{where}: step-{step} does not hold content({step})"
            if step in recorded:
                assert recorded[step] == expected, f"{where}: the ledger's hash for step {step} is not content({step})"
            tally.verified += 1

        newest = steps[-1] if steps else 0
        last = records[-1][0] if records else 0
        floor = max(last, prev_newest)
        assert newest in (floor, floor + 1), (
            f"{where}: newest committed step {newest}, but the ledger ends at {last} and step {prev_newest} "
            f"was committed before the trial (steps {steps})"
        )
        lost = [r for r in sorted(recorded) if r not in steps and sum(s > r for s in steps) < KEEP_LAST]
        assert lost == [], f"{where}: acknowledged steps lost: {lost} (committed {steps}, ledger ends {records[-3:]})"
        tally.retention_deleted = sum(r not in steps for r in recorded)

        live = blank_state()
        restored = mgr.restore(live)
        if steps:
            assert restored == newest, f"{where}: restore gave {restored}, newest committed is {newest}"
            assert digest(live) == digest(content(newest)), f"{where}: restored state is not content({newest})"
            tally.restores += 1
        else:
            assert restored is None, f"{where}: restore gave {restored} from an empty root"
    tally.acknowledged = len(records)
    return newest


def _tensors(tree: dict) -> list[torch.Tensor]:
    return [tree["x"], tree["aux"]["w"], tree["aux"]["ids"]]


def run_torture(kills: int, seed: int | None, mode: str, workdir: Path, spawner, report, test: str) -> None:
    seed = int.from_bytes(os.urandom(4), "little") if seed is None else seed
    rng = random.Random(seed)
    root, ledger, marks, logs = (workdir / name for name in ("ckpts", "ledger.txt", "marks", "logs"))
    root.mkdir()
    marks.mkdir()
    logs.mkdir()
    tally = Tally()
    newest = 0
    began = time.monotonic()
    failure = None
    try:
        for index in range(kills):
            trial = plan_trial(rng, index)
            where = f"seed {seed}, trial {index}: {trial.describe()}"
            mark = marks / f"{index:05d}"
            env = {"ASYNCCKPT_PHASE_MARK": str(mark)}
            env["ASYNCCKPT_PHASE_DELAY"] = "" if trial.target == RANDOM else f"{trial.target}={trial.delay:.3f}"
            argv = [str(root), str(ledger), trial.compression, repr(trial.repeat), str(trial.child_seed)]
            started = time.monotonic()
            saver = spawner.spawn(argv, env, logs / f"{index:05d}.log")
            try:
                if trial.target == RANDOM:
                    wait_for_mark(saver, mark, "ready", 1, where)
                else:
                    wait_for_mark(saver, mark, trial.target, trial.nth, where)
                time.sleep(trial.wait)
                shown = mark_lines(mark)  # what the saver had entered when it was killed
            finally:
                saver.kill()
                returncode = saver.wait()
            ended = f"{where}: the saver ended by itself ({returncode}):\n{saver.output()}"
            assert returncode == -signal.SIGKILL, ended
            if trial.target != RANDOM:  # the kill came after the nth entry into the phase, as planned
                assert shown.count(trial.target) >= trial.nth, f"{where}: marks {shown}"
                assert set(shown) <= {"ready", trial.target}, f"{where}: paused outside the target: {shown}"
            killed = time.monotonic()
            tally.kills[trial.target] += 1
            tally.compression[trial.compression] += 1
            newest = check_root(root, ledger, newest, trial.target, tally, where)
            tally.seconds[trial.target] += killed - started
            tally.seconds["check"] += time.monotonic() - killed
    except BaseException as exc:
        failure = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        raise
    finally:
        total = sum(tally.kills.values())
        report(
            {
                "test": test,
                "mode": mode,
                "seed": seed,
                "spawner": spawner.name,
                "kills": total,
                "kills_per_phase": dict(tally.kills),
                "checkpoints_verified": tally.verified,
                "restores_verified": tally.restores,
                "saves_acknowledged": tally.acknowledged,
                "acknowledged_then_retired_by_retention": tally.retention_deleted,
                "losses": 0 if failure is None else None,  # None: see failure
                "newest_step": newest,
                "before_sweep": {
                    "tmp_dirs": dict(tally.tmp_swept),
                    "replaced_dirs": dict(tally.replaced_swept),
                    "replaces_undone": dict(tally.replaces_undone),
                    "more_than_keep_last": dict(tally.over_kept),
                },
                "compression_per_kill": dict(tally.compression),
                "state_bytes": sum(t.numel() * t.element_size() for t in _tensors(content(0))),
                "seconds": round(time.monotonic() - began, 1),
                "seconds_per_phase": {k: round(v, 1) for k, v in tally.seconds.items()},
                "ok": failure is None,
                "failure": failure,
            }
        )
    if kills >= len(TARGETS):
        assert newest > 0, f"seed {seed}: no checkpoint ever committed"
    for target in TARGETS:
        assert tally.kills[target] >= kills // len(TARGETS), (target, dict(tally.kills))


def test_sigkill_in_every_phase_loses_nothing(tmp_path, spawner, torture_config, torture_report):
    """50 kills by default; 1000 with ASYNCCKPT_TORTURE=long (see conftest.py)."""
    cfg = torture_config
    run_torture(cfg.kills, cfg.seed, cfg.mode, tmp_path, spawner, torture_report, "default")


@pytest.mark.slow
def test_sigkill_in_every_phase_loses_nothing_long(tmp_path, spawner, torture_config, torture_report):
    cfg = torture_config
    run_torture(max(cfg.kills, cfg.long_kills), cfg.seed, "long", tmp_path, spawner, torture_report, "long")
