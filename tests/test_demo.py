"""`asyncckpt demo`: figures from the run itself, and a headline that claims only what they show."""

from __future__ import annotations

import pytest
import torch

from _demo import report
from asyncckpt.cli.commands import main
from asyncckpt.cli.demo import Spread, headline, run_demo


def spread(median_ms: float, low_ms: float, high_ms: float, count: int = 10) -> Spread:
    return Spread(median_ms / 1e3, low_ms / 1e3, high_ms / 1e3, count)


def test_overlapping_ranges_make_no_ratio_claim():
    # the busy-machine case: medians 88 vs 120 ms, but the ranges overlap
    line = headline(spread(88, 40, 200), spread(120, 90, 150))
    assert "x less" not in line and "no clear difference" in line
    assert "40.0-200.0 ms" in line and "90.0-150.0 ms" in line


def test_separated_ranges_give_the_ratio_of_the_medians():
    line = headline(spread(88, 80, 95), spread(120, 110, 130))
    assert "1.4x less" in line and "88.0 ms vs 120.0 ms" in line
    assert "37x less" in headline(spread(3.1, 2.5, 5.9), spread(114.7, 110, 118.8))


def test_asyncckpt_slower_is_said_plainly():
    line = headline(spread(120, 110, 130), spread(88, 80, 95))
    assert "x less" not in line and "MORE" in line


def test_equal_timings_make_no_claim():
    same = Spread.of([0.01, 0.011, 0.012])
    assert "x less" not in headline(same, same)


def test_spread_of_timings():
    s = Spread.of([0.005, 0.001, 0.003, 0.002, 0.004])
    assert s.median == 0.003 and s.count == 5
    assert 0.001 <= s.low < s.median < s.high <= 0.005
    assert Spread.of([0.5]) == Spread(0.5, 0.5, 0.5, 1)
    with pytest.raises(ValueError):
        Spread.of([])


def test_render_claims_nothing_when_the_stalls_are_alike():
    text = report([0.09, 0.12, 0.10, 0.11, 0.10], [0.088, 0.13, 0.11, 0.1, 0.12]).render()
    assert "x less" not in text and "no clear difference" in text


def test_render_counts_the_fence_wait_in_overlap_mode():
    # save() returns at once, but the next optimizer step waits as long as torch.save takes: no win
    text = report([0.001, 0.001, 0.001], [0.10, 0.11, 0.12], fence=[0.10, 0.11, 0.12]).render()
    assert "x less" not in text
    assert "fence wait" in text and "training time lost" in text


def test_demo_reports_medians_and_ranges_of_its_own_run(tmp_path, capsys):
    lines: list[str] = []
    report = run_demo(seconds=1.0, width=32, depth=1, root=str(tmp_path / "demo"), out=lines.append)
    assert report.restore_exact and report.restored_step > 0
    assert len(report.asyncckpt_stalls) >= 2 and len(report.torch_save_stalls) >= 2
    assert len(report.step_times) > 0 and report.policy == "EverySeconds(1.5)"
    text = lines[-1]
    for values in (report.asyncckpt_stalls, report.torch_save_stalls):
        s = Spread.of(values)
        assert f"| {s.count} | {s.median * 1e3:.1f} ms | {s.kind} {s.low * 1e3:.1f}-{s.high * 1e3:.1f} ms |" in text
    what = "cost training" if report.background_measured else "blocked training"
    assert headline(Spread.of(report.asyncckpt_costs), Spread.of(report.torch_save_stalls), what) in text
    assert f"{Spread.of(report.step_times).median * 1e3:.1f} ms" in text
    assert all(cost >= 0 for cost in report.asyncckpt_costs)
    # again on the same root: its checkpoints would outrank the new run's, and its restore check
    # would read one of them (a false "MISMATCH"): refused before anything runs
    code = main(["demo", "--seconds", "1", "--root", str(tmp_path / "demo")])
    err = capsys.readouterr().err
    assert code == 2 and "holds checkpoints of an earlier run: give the demo an empty --root" in err, err


@pytest.mark.parametrize("device", ["cuda:99", "tpu", *([] if torch.cuda.is_available() else ["cuda"])])
def test_demo_on_a_device_it_cannot_use_is_a_usage_error(tmp_path, capsys, device):
    code = main(["demo", "--device", device, "--seconds", "1", "--root", str(tmp_path / "d")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("asyncckpt: error:") and device in err
    assert "Traceback" not in err
    assert not (tmp_path / "d").exists()
