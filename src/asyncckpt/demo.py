"""The main job (`asyncckpt demo`): train a small model, checkpoint it asynchronously, and report.

It measures, in one run on the same state, what a user cares about first: how long training
stalls per checkpoint with asyncckpt versus a plain ``torch.save``, how much smaller the
checkpoints are, and that restoring reproduces the saved weights bit for bit.

Every figure comes from the run it reports. Checkpoints are taken by the clock (every 1.5 s), not
by a step count estimated from a few early steps, and the two savers take turns within one loop (a
``torch.save`` half an interval after each asyncckpt save), so a machine that gets busier or
quieter mid-run weighs on both alike. The headline compares them only when the numbers support
it (``headline``).
"""

from __future__ import annotations

import math
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .manager import CheckpointManager
from .metrics import fence_cost_s
from .policy import Adaptive, EverySeconds, EverySteps, SavePolicy

WARMUP_STEPS = 3
INTERVAL_S = 1.5  # one checkpoint per saver every 1.5 s


@dataclass(frozen=True)
class Spread:
    """Median and the 5th-95th percentile range of a few timings (seconds)."""

    median: float
    low: float
    high: float
    count: int

    @classmethod
    def of(cls, values: list[float]) -> Spread:
        if not values:
            raise ValueError("no timings")
        if len(values) == 1:
            return cls(values[0], values[0], values[0], 1)
        cuts = statistics.quantiles(values, n=20, method="inclusive")
        return cls(statistics.median(values), cuts[0], cuts[-1], len(values))

    def text(self) -> str:
        return f"{self.median * 1e3:.1f} ms (p5-p95 {self.low * 1e3:.1f}-{self.high * 1e3:.1f})"


def headline(asyncckpt: Spread, torch_save: Spread) -> str:
    """The one-line verdict, claiming only what the two ranges show.

    A ratio is printed only when asyncckpt's whole range lies below torch.save's (so its median is
    lower too); overlapping ranges are said to be no clear difference, and the reverse is said plainly.
    """
    if asyncckpt.high < torch_save.low:
        ratio = torch_save.median / asyncckpt.median if asyncckpt.median > 0 else float("inf")
        times = "over 1000" if ratio > 1000 else f"{ratio:.0f}" if ratio >= 10 else f"{ratio:.1f}"
        return (
            f"asyncckpt cost training {times}x less time per checkpoint than torch.save "
            f"(median {asyncckpt.median * 1e3:.1f} ms vs {torch_save.median * 1e3:.1f} ms; "
            "the p5-p95 ranges do not overlap)"
        )
    if torch_save.high < asyncckpt.low:
        return (
            f"asyncckpt cost training MORE time per checkpoint than torch.save in this run "
            f"(median {asyncckpt.median * 1e3:.1f} ms vs {torch_save.median * 1e3:.1f} ms)"
        )
    return (
        "no clear difference between asyncckpt and torch.save in this run: their p5-p95 ranges overlap "
        f"({asyncckpt.low * 1e3:.1f}-{asyncckpt.high * 1e3:.1f} ms vs "
        f"{torch_save.low * 1e3:.1f}-{torch_save.high * 1e3:.1f} ms); "
        "a busy machine blurs it: run longer, or when the cores are free"
    )


@dataclass
class DemoReport:
    device: str
    parameters: int
    state_bytes: int
    steps: int
    step_times: list[float]  # every training step after the warm-up, saves excluded
    policy: str  # when asyncckpt saved
    asyncckpt_stalls: list[float]  # save() blocked the loop
    torch_save_stalls: list[float]
    compression_ratio: float
    persist_p50_s: float
    restored_step: int
    restore_exact: bool
    snapshot: str = "blocking"
    fence_waits: list[float] = field(default_factory=list)  # overlap mode: per save, at the next optimizer step
    overhead_fraction: float = float("nan")  # asyncckpt's lost time / the loop's time without torch.save

    @property
    def asyncckpt_costs(self) -> list[float]:
        """Training time lost per asyncckpt checkpoint: the stall, plus in overlap mode the fence wait."""
        if not self.fence_waits:
            return list(self.asyncckpt_stalls)
        return [s + f for s, f in zip(self.asyncckpt_stalls, self.fence_waits, strict=True)]

    def render(self) -> str:
        steps = Spread.of(self.step_times)
        cost = Spread.of(self.asyncckpt_costs)
        stall = Spread.of(self.asyncckpt_stalls)
        plain = Spread.of(self.torch_save_stalls)

        def row(name: str, s: Spread, worst: float) -> str:
            return (
                f"  | {name} | {s.count} | {s.median * 1e3:.1f} ms | {s.low * 1e3:.1f}-{s.high * 1e3:.1f} ms "
                f"| {worst * 1e3:.1f} ms |"
            )

        rows = [row(f"asyncckpt ({self.snapshot} snapshot): save()", stall, max(self.asyncckpt_stalls))]
        if self.fence_waits:
            fence = Spread.of(self.fence_waits)
            rows.append(row("asyncckpt: fence wait at the next optimizer step", fence, max(self.fence_waits)))
            rows.append(row("asyncckpt: both (training time lost)", cost, max(self.asyncckpt_costs)))
        rows.append(row("torch.save + fsync", plain, max(self.torch_save_stalls)))
        lines = [
            "asyncckpt demo",
            f"  device {self.device}; model {self.parameters / 1e6:.1f}M parameters; "
            f"state {self.state_bytes / 1e6:.1f} MB (model + AdamW)",
            f"  trained {self.steps} steps: {steps.text()} per step; checkpoints by {self.policy}, "
            "torch.save in between",
            "",
            "  | training blocked per checkpoint | checkpoints | median | p5-p95 | max |",
            "  |---|---|---|---|---|",
            *rows,
            "",
            f"  {headline(cost, plain)}",
            f"  asyncckpt's share of the training loop's time: {self.overhead_fraction:.2%}",
            f"  background persist (compress + write + fsync + commit): {self.persist_p50_s * 1e3:.0f} ms median",
            f"  compression ratio (zstd-1, byte-grouped floats): {self.compression_ratio:.3f}",
            f"  restore of step {self.restored_step} into a fresh model and optimizer: "
            + ("bit-exact" if self.restore_exact else "MISMATCH"),
        ]
        return "\n".join(lines)


def resolve_device(name: str | None) -> torch.device:
    """The device to train on; a ValueError saying why when ``name`` cannot be used here."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"unknown device {name!r} (use cpu, cuda or cuda:N): {exc}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available here; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise ValueError(f"--device {name}: the demo runs on cpu or cuda")
    return dev


def _model(width: int, depth: int) -> torch.nn.Module:
    layers: list[torch.nn.Module] = []
    for _ in range(depth):
        layers += [
            torch.nn.Linear(width, width),
            torch.nn.LayerNorm(width),
            torch.nn.GELU(),
            torch.nn.Dropout(0.1),
        ]
    layers.append(torch.nn.Linear(width, 1))
    return torch.nn.Sequential(*layers)


def _state_bytes(state: dict) -> int:
    total = sum(t.numel() * t.element_size() for t in state["model"].state_dict().values())
    for per_param in state["optimizer"].state_dict()["state"].values():
        total += sum(v.numel() * v.element_size() for v in per_param.values() if isinstance(v, torch.Tensor))
    return total


def _fresh(width: int, depth: int, device: torch.device) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(1234)
    model = _model(width, depth).to(device)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def run_demo(
    seconds: float = 30.0,
    width: int = 1024,
    depth: int = 6,
    every: int | None = None,
    adaptive: float | None = None,
    root: str | None = None,
    device: str | None = None,
    snapshot: str = "blocking",
    out=print,
) -> DemoReport:
    dev = resolve_device(device)
    model, opt = _fresh(width, depth, dev)
    state = {"model": model, "optimizer": opt, "step": 0}
    workdir = Path(root) if root else Path(tempfile.mkdtemp(prefix="asyncckpt-demo-"))
    generator = torch.Generator(device="cpu").manual_seed(0)
    step_times: list[float] = []

    def train_step() -> torch.Tensor:
        began = time.perf_counter()
        x = torch.randn(64, width, generator=generator).to(dev)
        y = x[:, :1].sin()
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss = loss.detach()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        step_times.append(time.perf_counter() - began)
        return loss

    run_began = time.perf_counter()
    for _ in range(WARMUP_STEPS):  # allocates the optimizer state; not timed
        train_step()
    del step_times[:]
    step = WARMUP_STEPS
    # By the clock, not by a step count guessed from a few early steps: a busy moment then would
    # set the interval for the whole run.
    policy: SavePolicy = (
        Adaptive(max_overhead=adaptive) if adaptive else EverySteps(every) if every else EverySeconds(INTERVAL_S)
    )
    out(
        f"training on {dev} for ~{seconds:g} s; checkpoints by {policy!r} and a torch.save + fsync every "
        f"{INTERVAL_S:g} s, half an interval apart, into {workdir}"
    )

    saved_copy: dict[str, torch.Tensor] = {}
    saved_step = -1
    torch_stalls: list[float] = []
    torch_path = workdir / "torch_save.pt"
    ckpt_root = workdir / "asyncckpt"
    try:
        with CheckpointManager(ckpt_root, keep_last=2, policy=policy, snapshot=snapshot) as mgr:
            mgr.prepare(state).result()
            loop_began = time.perf_counter()
            next_torch_save = loop_began + INTERVAL_S / 2
            deadline = run_began + seconds
            while time.perf_counter() < deadline or len(mgr.stats.records) < 2 or len(torch_stalls) < 2:
                step += 1
                loss = train_step()
                state["step"] = step
                if mgr.maybe_save(step, state, metrics={"loss": loss.item()}):
                    saved_copy = {k: v.detach().clone() for k, v in model.state_dict().items()}
                    saved_step = step
                if time.perf_counter() >= next_torch_save:
                    next_torch_save += INTERVAL_S * max(
                        1, math.ceil((time.perf_counter() - next_torch_save) / INTERVAL_S)
                    )
                    began = time.perf_counter()
                    with open(torch_path, "wb") as f:
                        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step}, f)
                        f.flush()
                        os.fsync(f.fileno())
                    torch_stalls.append(time.perf_counter() - began)
            mgr.wait()
            loop_s = time.perf_counter() - loop_began
            summary = mgr.stats.summary()
            records = mgr.stats.records
            if isinstance(policy, Adaptive):
                out(f"Adaptive chose: {policy.explain()}")
            stalls = [r.stall_s for r in records]
            # the host's wait, and on GPU the compute stream's (the host does not block there)
            fence_waits = [fence_cost_s(r) for r in records] if snapshot == "overlap" else []
        lost = sum(stalls) + sum(fence_waits)
        overhead = lost / max(1e-9, loop_s - sum(torch_stalls))

        fresh_model, fresh_opt = _fresh(width, depth, dev)
        fresh_state = {"model": fresh_model, "optimizer": fresh_opt, "step": 0}
        with CheckpointManager(ckpt_root) as reader:
            restored = reader.restore(fresh_state)
        exact = restored == saved_step and all(
            torch.equal(saved_copy[k], v) for k, v in fresh_model.state_dict().items()
        )
    finally:
        if root is None:
            shutil.rmtree(workdir, ignore_errors=True)

    report = DemoReport(
        device=str(dev),
        parameters=sum(p.numel() for p in model.parameters()),
        state_bytes=_state_bytes(state),
        steps=step,
        step_times=step_times,
        policy=repr(policy),
        asyncckpt_stalls=stalls,
        torch_save_stalls=torch_stalls,
        compression_ratio=summary["compression_ratio"],
        persist_p50_s=summary["persist_p50_s"],
        restored_step=-1 if restored is None else restored,
        restore_exact=exact,
        snapshot=snapshot,
        fence_waits=fence_waits,
        overhead_fraction=overhead,
    )
    out(report.render())
    return report
