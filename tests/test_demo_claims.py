"""`asyncckpt demo` prints only what it measured: the restore check covers the whole state, the cost
per checkpoint includes the background's slowdown of training, and few samples get their min-max."""

from __future__ import annotations

import pytest
import torch

from _demo import report
from asyncckpt.cli import demo
from asyncckpt.cli.demo import Spread, headline, run_demo


def test_few_samples_get_their_min_max_and_count():
    s = Spread.of([0.005, 0.001, 0.003, 0.002, 0.004])
    assert (s.low, s.median, s.high, s.count) == (0.001, 0.003, 0.005, 5)
    assert "min-max 1.0-5.0 ms of 5" in s.text() and "p5" not in s.text()
    many = Spread.of([i / 1000 for i in range(1, 101)])
    assert many.kind == "p5-p95" and "of 100" in many.text() and 0.001 < many.low < many.high < 0.1


def test_the_verdict_counts_the_steps_slowed_by_the_background_persist():
    # save() blocks 1 ms, but training's steps lose 150 ms beside each persist: torch.save's 100 ms is no worse
    five = 5 * [0.0]
    text = report(
        [0.001] * 5,
        [0.10, 0.11, 0.12, 0.10, 0.11],
        background=[0.15 + x for x in five],
        busy=[0.04] * 9,
        idle=[0.01] * 9,
    ).render()
    assert "x less" not in text and "MORE" in text
    assert "steps slowed while the save was in flight" in text and "in all (training time lost)" in text
    assert "steps begun while a save was in flight" in text and "with none in flight" in text


def test_without_a_background_measurement_the_verdict_says_it_counts_only_blocked_time():
    text = report([0.001] * 5, [0.10, 0.11, 0.12, 0.10, 0.11]).render()
    assert "blocked training" in text and "not measured" in text and "blocked in save() only" in text
    assert "cost training" not in text


def test_too_few_checkpoints_for_a_verdict():
    line = headline(Spread.of([0.001] * 3), Spread.of([0.1] * 3))
    assert "x less" not in line and "MORE" not in line and "too few checkpoints" in line


def test_the_restore_check_compares_the_optimizer_state_too(tmp_path, monkeypatch):
    restore = demo.CheckpointManager.restore

    def restore_then_damage_the_optimizer(self, state, *args, **kwargs):
        result = restore(self, state, *args, **kwargs)
        opt = state["optimizer"]
        for per_param in opt.state.values():
            per_param["exp_avg"].add_(1.0)  # the weights stay exact; only the optimizer is off
        return result

    monkeypatch.setattr(demo.CheckpointManager, "restore", restore_then_damage_the_optimizer)
    lines: list[str] = []
    got = run_demo(seconds=0.5, width=16, depth=1, root=str(tmp_path / "d"), out=lines.append)
    assert not got.restore_exact and "MISMATCH" in lines[-1]


@pytest.mark.parametrize("snapshot", ["blocking", "overlap"])
def test_the_report_counts_what_it_timed(tmp_path, snapshot):
    lines: list[str] = []
    got = run_demo(seconds=0.5, width=16, depth=1, root=str(tmp_path / "d"), snapshot=snapshot, out=lines.append)
    text = lines[-1]
    assert got.restore_exact and "optimizer state" in text and "bit-exact" in text
    assert got.steps == got.warmup_steps + len(got.step_times)
    assert (
        f"trained {got.steps} steps: {got.warmup_steps} untimed warm-up steps, then {len(got.step_times)} timed" in text
    )
    assert sorted(got.busy_step_times + got.idle_step_times) == sorted(got.step_times)
    assert len(got.busy_step_times) > 0
    if got.background_measured:
        assert len(got.background_costs) == len(got.asyncckpt_stalls)
        assert got.asyncckpt_costs == [s + b for s, b in zip(got.asyncckpt_stalls, got.background_costs, strict=True)]
    assert ("slower steps rather than as fence wait" in text) == (snapshot == "overlap")
    assert torch.isfinite(torch.tensor(got.overhead_fraction))
