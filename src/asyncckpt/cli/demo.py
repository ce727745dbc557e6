"""The main job (`asyncckpt demo`): train a small model, checkpoint it asynchronously, and report.

It measures, in one run on the same state, what a user cares about first: how long training
stalls per checkpoint with asyncckpt versus a plain ``torch.save``, how much smaller the
checkpoints are, and that restoring reproduces the saved weights bit for bit.

Every figure comes from the run it reports. Checkpoints are taken by the clock (every 1.5 s), not
by a step count estimated from a few early steps, and the two savers take turns within one loop (a
``torch.save`` half an interval after each asyncckpt save), so a machine that gets busier or
quieter mid-run weighs on both alike. The headline compares them only when the numbers support
it (``headline``).

asyncckpt's cost per checkpoint is not only the time ``save()`` blocks: its background persist
(and in overlap mode the copy) competes with training for the cores. So every training step is
timed and marked by whether a save was in flight when it began; the steps that ran beside a save,
less the median step with none in flight, are that save's background cost, counted in the verdict.
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from asyncckpt.errors import CheckpointError
from asyncckpt.manager import CheckpointManager
from asyncckpt.metrics import fence_cost_s
from asyncckpt.policy import Adaptive, EverySeconds, EverySteps, SavePolicy
from asyncckpt.storage.local import list_checkpoints

WARMUP_STEPS = 3
INTERVAL_S = 1.5  # one checkpoint per saver every 1.5 s
PERCENTILE_SAMPLES = 20  # fewer timings than this get their min-max range, not p5-p95
MIN_CHECKPOINTS_FOR_VERDICT = 5  # fewer per saver: the medians are printed, no comparison claimed
MIN_STEPS_FOR_BACKGROUND = 5  # steps with and without a save in flight needed to measure its cost


@dataclass(frozen=True)
class Spread:
    """Median and range of some timings (seconds): the 5th-95th percentiles from
    PERCENTILE_SAMPLES timings up, below that the minimum and maximum (percentiles of a handful of
    samples would be the extremes dressed up)."""

    median: float
    low: float
    high: float
    count: int

    @classmethod
    def of(cls, values: list[float]) -> Spread:
        if not values:
            raise ValueError("no timings")
        if len(values) < PERCENTILE_SAMPLES:
            return cls(statistics.median(values), min(values), max(values), len(values))
        cuts = statistics.quantiles(values, n=20, method="inclusive")
        return cls(statistics.median(values), cuts[0], cuts[-1], len(values))

    @property
    def kind(self) -> str:
        return "p5-p95" if self.count >= PERCENTILE_SAMPLES else "min-max"

    def range_text(self) -> str:
        return f"{self.kind} {self.low * 1e3:.1f}-{self.high * 1e3:.1f} ms of {self.count}"

    def text(self) -> str:
        return f"{self.median * 1e3:.1f} ms ({self.range_text()})"


def headline(asyncckpt: Spread, torch_save: Spread, what: str = "cost training") -> str:
    """The one-line verdict, claiming only what the two ranges show.

    Below MIN_CHECKPOINTS_FOR_VERDICT timings on either side nothing is compared. A ratio is printed
    only when asyncckpt's whole range lies below torch.save's (so its median is lower too);
    overlapping ranges are said to be no clear difference, and the reverse is said plainly.
    ``what`` names what was compared (the time lost in all, or only the time blocked).
    """
    kinds = asyncckpt.kind if asyncckpt.kind == torch_save.kind else f"{asyncckpt.kind} and {torch_save.kind}"
    if min(asyncckpt.count, torch_save.count) < MIN_CHECKPOINTS_FOR_VERDICT:
        return (
            f"too few checkpoints for a verdict ({asyncckpt.count} by asyncckpt, {torch_save.count} by torch.save; "
            f"at least {MIN_CHECKPOINTS_FOR_VERDICT} each): median {asyncckpt.median * 1e3:.1f} ms vs "
            f"{torch_save.median * 1e3:.1f} ms; run longer"
        )
    if asyncckpt.high < torch_save.low:
        ratio = torch_save.median / asyncckpt.median if asyncckpt.median > 0 else float("inf")
        times = "over 1000" if ratio > 1000 else f"{ratio:.0f}" if ratio >= 10 else f"{ratio:.1f}"
        return (
            f"asyncckpt {what} {times}x less time per checkpoint than torch.save "
            f"(median {asyncckpt.median * 1e3:.1f} ms vs {torch_save.median * 1e3:.1f} ms; "
            f"the {kinds} ranges do not overlap)"
        )
    if torch_save.high < asyncckpt.low:
        return (
            f"asyncckpt {what} MORE time per checkpoint than torch.save in this run "
            f"(median {asyncckpt.median * 1e3:.1f} ms vs {torch_save.median * 1e3:.1f} ms)"
        )
    return (
        f"no clear difference between asyncckpt and torch.save in this run: their {kinds} ranges overlap "
        f"({asyncckpt.low * 1e3:.1f}-{asyncckpt.high * 1e3:.1f} ms vs "
        f"{torch_save.low * 1e3:.1f}-{torch_save.high * 1e3:.1f} ms); "
        "a busy machine blurs it: run longer, or when the cores are free"
    )


@dataclass
class DemoReport:
    device: str
    parameters: int
    state_bytes: int
    steps: int  # every training step, the untimed warm-up included
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
    warmup_steps: int = WARMUP_STEPS
    busy_step_times: list[float] = field(default_factory=list)  # steps begun while a save was in flight
    idle_step_times: list[float] = field(default_factory=list)  # steps begun with none in flight
    # per save: its steps' time beyond the median idle step; empty when too few steps to measure it
    background_costs: list[float] = field(default_factory=list)
    restore_checked: str = "the model's weights"

    @property
    def background_measured(self) -> bool:
        return len(self.background_costs) == len(self.asyncckpt_stalls) > 0

    @property
    def asyncckpt_costs(self) -> list[float]:
        """Training time lost per asyncckpt checkpoint: the stall, plus the steps slowed while the save
        was in flight (in overlap mode the fence wait happens inside those steps, so it is counted
        there). Where that was not measured, the stall plus the fence wait."""
        if self.background_measured:
            return [s + b for s, b in zip(self.asyncckpt_stalls, self.background_costs, strict=True)]
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
                f"  | {name} | {s.count} | {s.median * 1e3:.1f} ms | {s.kind} {s.low * 1e3:.1f}-{s.high * 1e3:.1f} ms "
                f"| {worst * 1e3:.1f} ms |"
            )

        rows = [row(f"asyncckpt ({self.snapshot} snapshot): blocked in save()", stall, max(self.asyncckpt_stalls))]
        if self.fence_waits:
            fence = Spread.of(self.fence_waits)
            inside = " (part of the slower steps)" if self.background_measured else ""
            rows.append(row(f"asyncckpt: fence wait at the next optimizer step{inside}", fence, max(self.fence_waits)))
        if self.background_measured:
            bg = Spread.of(self.background_costs)
            rows.append(row("asyncckpt: steps slowed while the save was in flight", bg, max(self.background_costs)))
        if len(rows) > 1:
            rows.append(row("asyncckpt: in all (training time lost)", cost, max(self.asyncckpt_costs)))
        rows.append(row("torch.save + fsync (blocked)", plain, max(self.torch_save_stalls)))
        lines = [
            "asyncckpt demo",
            f"  device {self.device}; model {self.parameters / 1e6:.1f}M parameters; "
            f"state {self.state_bytes / 1e6:.1f} MB (model + AdamW)",
            f"  trained {self.steps} steps: {self.warmup_steps} untimed warm-up steps, then {len(self.step_times)} "
            f"timed at {steps.text()} per step; checkpoints by {self.policy}, torch.save in between",
            "",
            "  | training time per checkpoint | checkpoints | median | range | max |",
            "  |---|---|---|---|---|",
            *rows,
            "",
        ]
        if self.background_measured:
            busy, idle = Spread.of(self.busy_step_times), Spread.of(self.idle_step_times)
            lines.append(
                f"  steps begun while a save was in flight: {busy.text()}; with none in flight: {idle.text()} "
                f"({busy.median / idle.median - 1:+.0%} median)"
            )
        else:
            lines.append(
                "  the background persist's cost to training was not measured: too few steps ran with and "
                "without a save in flight (run longer); the figures below count only the time blocked"
            )
        if self.snapshot == "overlap" and not self.device.startswith("cuda"):
            lines.append(
                "  overlap mode on CPU: the background copy competes for the cores, so it shows as slower "
                "steps rather than as fence wait"
            )
        what = "cost training" if self.background_measured else "blocked training"
        share = "blocked in save() + slower steps" if self.background_measured else "blocked in save() only"
        lines += [
            f"  {headline(cost, plain, what)}",
            f"  asyncckpt's share of the training loop's time ({share}): {self.overhead_fraction:.2%}",
            f"  background persist (compress + write + fsync + commit): {self.persist_p50_s * 1e3:.0f} ms median",
            f"  compression ratio (zstd-1, floats as byte planes): {self.compression_ratio:.3f}",
            f"  restore of step {self.restored_step} into a fresh model and optimizer, {self.restore_checked} "
            "compared: " + ("bit-exact" if self.restore_exact else "MISMATCH"),
        ]
        return "\n".join(lines)


def _same(a: Any, b: Any) -> bool:
    """Bit-for-bit equality of two state trees (tensors by dtype, shape and bytes)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        flat_a, flat_b = a.detach().cpu().contiguous().reshape(-1), b.detach().cpu().contiguous().reshape(-1)
        return bool(torch.equal(flat_a.view(torch.uint8), flat_b.view(torch.uint8)))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


RESTORE_CHECKED = "model weights, optimizer state (moments, step counts, hyperparameters) and step number"


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
    if root is not None and list_checkpoints(Path(root) / "asyncckpt"):
        # its steps would outrank this run's (retention keeps the newest), and the check at the end
        # would restore one of them
        raise CheckpointError(
            f"{Path(root) / 'asyncckpt'} holds checkpoints of an earlier run: give the demo an empty --root"
        )
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

    saved_copy: dict[str, Any] = {}
    saved_step = -1
    handles: list = []  # every asyncckpt save, in order
    step_owner: list[int | None] = []  # per timed step: the save in flight when it began, if any
    in_flight: list[int] = []  # indexes into handles of the saves not yet done
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
                in_flight = [i for i in in_flight if not handles[i].done()]
                step_owner.append(in_flight[0] if in_flight else None)
                loss = train_step()
                state["step"] = step
                handle = mgr.maybe_save(step, state, metrics={"loss": loss.item()})
                if handle is not None:
                    in_flight.append(len(handles))
                    handles.append(handle)
                    # what the checkpoint must hold: the whole state as it was at save()
                    saved_copy = copy.deepcopy({"model": model.state_dict(), "optimizer": opt.state_dict()})
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
        idle = [t for t, owner in zip(step_times, step_owner, strict=True) if owner is None]
        busy = [t for t, owner in zip(step_times, step_owner, strict=True) if owner is not None]
        background: list[float] = []
        if min(len(idle), len(busy)) >= MIN_STEPS_FOR_BACKGROUND and len(handles) == len(stalls):
            reference = statistics.median(idle)
            background = [0.0] * len(handles)
            for t, owner in zip(step_times, step_owner, strict=True):
                if owner is not None:
                    background[owner] += max(0.0, t - reference)  # a step faster than the median costs none
        lost = sum(stalls) + (sum(background) if background else sum(fence_waits))
        overhead = lost / max(1e-9, loop_s - sum(torch_stalls))

        fresh_model, fresh_opt = _fresh(width, depth, dev)
        fresh_state = {"model": fresh_model, "optimizer": fresh_opt, "step": 0}
        with CheckpointManager(ckpt_root) as reader:
            restored = reader.restore(fresh_state)
        exact = (
            restored == saved_step
            and fresh_state["step"] == saved_step
            and _same(saved_copy, {"model": fresh_model.state_dict(), "optimizer": fresh_opt.state_dict()})
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
        warmup_steps=WARMUP_STEPS,
        busy_step_times=busy,
        idle_step_times=idle,
        background_costs=background,
        restore_checked=RESTORE_CHECKED,
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
