"""The main job (`asyncckpt demo`): train a small model, checkpoint it asynchronously, and report.

It measures, in one run on the same state, what a user cares about first: how long training
stalls per checkpoint with asyncckpt versus a plain ``torch.save``, how much smaller the
checkpoints are, and that restoring reproduces the saved weights bit for bit.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .manager import CheckpointManager
from .metrics import fence_cost_s
from .policy import Adaptive, EverySteps, SavePolicy


@dataclass
class DemoReport:
    device: str
    parameters: int
    state_bytes: int
    steps: int
    step_time_s: float
    asyncckpt_stalls: list[float]
    torch_save_stalls: list[float]
    compression_ratio: float
    persist_p50_s: float
    restored_step: int
    restore_exact: bool
    snapshot: str = "blocking"
    fence_waits: list[float] | None = None  # overlap mode: per save, at the next optimizer step

    def render(self) -> str:
        a = statistics.median(self.asyncckpt_stalls)
        t = statistics.median(self.torch_save_stalls)
        lines = [
            "asyncckpt demo",
            f"  device {self.device}; model {self.parameters / 1e6:.1f}M parameters; "
            f"state {self.state_bytes / 1e6:.1f} MB (model + AdamW)",
            f"  trained {self.steps} steps, {self.step_time_s * 1e3:.1f} ms per step",
            "",
            "  | saver | checkpoints | stall per checkpoint (median) | max |",
            "  |---|---|---|---|",
            f"  | asyncckpt ({self.snapshot} snapshot) | {len(self.asyncckpt_stalls)} | {a * 1e3:.1f} ms "
            f"| {max(self.asyncckpt_stalls) * 1e3:.1f} ms |",
            f"  | torch.save + fsync | {len(self.torch_save_stalls)} | {t * 1e3:.1f} ms "
            f"| {max(self.torch_save_stalls) * 1e3:.1f} ms |",
            "",
            f"  asyncckpt stalls training {t / a:.0f}x less than torch.save per checkpoint",
            *(
                [
                    "  overlap: the next optimizer step waited "
                    f"{statistics.median(self.fence_waits) * 1e3:.2f} ms (median) for the background copy"
                ]
                if self.fence_waits
                else []
            ),
            f"  background persist (compress + write + fsync + commit): {self.persist_p50_s * 1e3:.0f} ms median",
            f"  compression ratio (zstd-1, byte-grouped floats): {self.compression_ratio:.3f}",
            f"  restore of step {self.restored_step} into a fresh model and optimizer: "
            + ("bit-exact" if self.restore_exact else "MISMATCH"),
        ]
        return "\n".join(lines)


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
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, opt = _fresh(width, depth, dev)
    state = {"model": model, "optimizer": opt, "step": 0}
    workdir = Path(root) if root else Path(tempfile.mkdtemp(prefix="asyncckpt-demo-"))
    generator = torch.Generator(device="cpu").manual_seed(0)

    def train_step() -> torch.Tensor:
        x = torch.randn(64, width, generator=generator).to(dev)
        y = x[:, :1].sin()
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    # warm up (allocates optimizer state) and time a step to pick the checkpoint interval
    for _ in range(3):
        train_step()
    began = time.perf_counter()
    for _ in range(3):
        train_step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    step_time = (time.perf_counter() - began) / 3
    every = every or max(2, int(1.5 / step_time))  # about one checkpoint every 1.5 s
    policy: SavePolicy = Adaptive(max_overhead=adaptive) if adaptive else EverySteps(every)
    out(f"training on {dev} for ~{seconds:.0f} s, checkpoints by {policy!r} into {workdir}")

    step = 0
    saved_copy: dict[str, torch.Tensor] = {}
    ckpt_root = workdir / "asyncckpt"
    try:
        with CheckpointManager(ckpt_root, keep_last=2, policy=policy, snapshot=snapshot) as mgr:
            mgr.prepare(state).result()
            deadline = time.perf_counter() + seconds * 0.7
            while time.perf_counter() < deadline or not mgr.stats.records:
                step += 1
                loss = train_step()
                state["step"] = step
                if mgr.maybe_save(step, state, metrics={"loss": loss.item()}):
                    saved_copy = {k: v.detach().clone() for k, v in model.state_dict().items()}
                    saved_step = step
            mgr.wait()
            summary = mgr.stats.summary()
            if isinstance(policy, Adaptive):
                out(f"Adaptive chose: {policy.explain()}")
            out(f"training-loop overhead fraction (stall / loop time): {summary['overhead_fraction']:.2%}")
            stalls = [r.stall_s for r in mgr.stats.records]
            # the host's wait, and on GPU the compute stream's (the host does not block there)
            fence_waits = [fence_cost_s(r) for r in mgr.stats.records] if snapshot == "overlap" else None

        torch_stalls = []
        torch_path = workdir / "torch_save.pt"
        deadline = time.perf_counter() + seconds * 0.3
        while time.perf_counter() < deadline or len(torch_stalls) < 2:
            step += 1
            train_step()
            if step % every == 0:
                began = time.perf_counter()
                with open(torch_path, "wb") as f:
                    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step}, f)
                    f.flush()
                    os.fsync(f.fileno())
                torch_stalls.append(time.perf_counter() - began)

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
        step_time_s=step_time,
        asyncckpt_stalls=stalls,
        torch_save_stalls=torch_stalls,
        compression_ratio=summary["compression_ratio"],
        persist_p50_s=summary["persist_p50_s"],
        restored_step=restored or -1,
        restore_exact=exact,
        snapshot=snapshot,
        fence_waits=fence_waits,
    )
    out(report.render())
    return report
