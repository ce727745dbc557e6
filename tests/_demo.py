"""A demo report made of chosen numbers, for the tests of what the demo claims from them."""

from __future__ import annotations

from asyncckpt.cli.demo import DemoReport


def report(stalls, torch_stalls, background=None, fence=None, busy=None, idle=None) -> DemoReport:
    return DemoReport(
        device="cpu",
        parameters=1000,
        state_bytes=12000,
        steps=93,
        step_times=[0.01] * 90,
        policy="EverySeconds(1.5)",
        asyncckpt_stalls=stalls,
        torch_save_stalls=torch_stalls,
        compression_ratio=1.2,
        persist_p50_s=0.05,
        restored_step=90,
        restore_exact=True,
        snapshot="overlap" if fence else "blocking",
        fence_waits=fence or [],
        overhead_fraction=0.01,
        busy_step_times=busy or [],
        idle_step_times=idle or [],
        background_costs=background or [],
    )
