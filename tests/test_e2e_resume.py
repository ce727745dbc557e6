"""Exact resume end to end: SIGKILL a training run, restart it from its checkpoints, and check that
it continues bit for bit as if it had never stopped.

A small model with dropout trains on a shuffled synthetic dataset (ResumableSampler in a
DataLoader) with AdamW and a OneCycle LR schedule; the state holds the model, optimizer,
scheduler, sampler and every RNG. The training script runs as a real subprocess that logs each
step's loss (as float.hex(), so the comparison is exact) and is killed with SIGKILL once its log
reaches a chosen step. The restarted run must log, for every step after the one it restored, the
very loss the uninterrupted run logged, and must end with identical weights, optimizer state,
LR, sampler position and RNG state.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

TOTAL = 60  # training steps
EVERY = 5  # checkpoint every EVERY steps
LENGTH, BATCH = 42, 4  # 11 batches an epoch, the last one short: epochs end at steps 11, 22, ...

TRAINER = r"""
import hashlib, json, pathlib, sys, time
import torch
from torch.utils.data import DataLoader, TensorDataset
import asyncckpt

root, log_path, out_path = sys.argv[1], sys.argv[2], sys.argv[3]
total, every, length, batch, stop_after = (int(a) for a in sys.argv[4:9])
torch.set_num_threads(1)

gen = torch.Generator().manual_seed(1234)  # the data never depends on the run
x_all = torch.randn(length, 6, generator=gen)
y_all = torch.cat([x_all[:, :2].sin(), x_all[:, 2:3] * x_all[:, 3:4]], dim=1)
y_all += 0.05 * torch.randn(length, 3, generator=gen)
sampler = asyncckpt.ResumableSampler(length, seed=7)
# generator=: a DataLoader iterator otherwise draws its base seed from the global RNG (see data.py)
loader = DataLoader(TensorDataset(x_all, y_all), batch_size=batch, sampler=sampler, num_workers=0,
                    generator=torch.Generator())

torch.manual_seed(0)
model = torch.nn.Sequential(
    torch.nn.Linear(6, 32), torch.nn.Tanh(), torch.nn.Dropout(0.3),
    torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Dropout(0.2),
    torch.nn.Linear(32, 3),
)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.05, total_steps=total)
state = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "sampler": sampler,
         "rng": asyncckpt.RNGState(), "step": 0}

def batches():
    while True:
        yield from loader

def sha(tensors):
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()

with asyncckpt.CheckpointManager(root, keep_last=2, policy=asyncckpt.EverySteps(every)) as mgr:
    start = mgr.restore(state)
    assert state["step"] == (start or 0), (state["step"], start)
    log = open(log_path, "w")
    log.write(f"start {start}\n")
    log.flush()
    it = batches()
    for step in range(1 if start is None else start + 1, total + 1):
        x, y = next(it)
        model.train()
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        state["step"] = step
        mgr.maybe_save(step, state)  # a checkpoint of step N holds the state after step N
        log.write(f"{step} {loss.item().hex()} {sha([x])[:12]}\n")
        log.flush()
        if step == stop_after:
            while True:  # wait here for the SIGKILL
                time.sleep(1)

opt_tensors = [v for s in optimizer.state_dict()["state"].values() for v in s.values() if torch.is_tensor(v)]
pathlib.Path(out_path).write_text(json.dumps({
    "model": sha(model.state_dict().values()),
    "optimizer": sha(opt_tensors),
    "lr": scheduler.get_last_lr()[0].hex(),
    "sampler": sampler.state_dict(),
    "rng": sha([torch.get_rng_state()]),
}, sort_keys=True))
"""


def parse_log(path: Path) -> tuple[int | None, dict[int, str]]:
    """The step a run restored (None: it started fresh) and its complete step lines."""
    lines = path.read_text().splitlines(keepends=True)
    head = lines[0].split()
    assert head[0] == "start", lines[0]
    steps = {}
    for line in lines[1:]:
        if line.endswith("\n"):  # a kill may cut the last line short
            steps[int(line.split()[0])] = line.rstrip("\n")
    return None if head[1] == "None" else int(head[1]), steps


def logged_steps(path: Path) -> dict[int, str]:
    """The complete step lines a running trainer logged so far (none before its first line is whole)."""
    return parse_log(path)[1] if path.exists() and "\n" in path.read_text() else {}


def trainer(script: Path, root: Path, log: Path, out: Path, stop_after: int, stderr) -> subprocess.Popen:
    args = [str(a) for a in (script, root, log, out, TOTAL, EVERY, LENGTH, BATCH, stop_after)]
    return subprocess.Popen([sys.executable, *args], stdout=stderr, stderr=stderr)


def run_to_end(script: Path, root: Path, log: Path, out: Path, where: str) -> dict:
    errors = log.with_suffix(".err")
    with open(errors, "w") as stderr:
        proc = trainer(script, root, log, out, 0, stderr)
        try:
            rc = proc.wait(240)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert rc == 0, f"{where}: the trainer failed ({rc}): {errors.read_text()}"
    return json.loads(out.read_text())


def run_and_kill(script: Path, root: Path, log: Path, kill_step: int, where: str) -> None:
    """Start the trainer and SIGKILL it once its log shows ``kill_step`` (it waits there)."""
    errors = log.with_suffix(".err")
    with open(errors, "w") as stderr:
        proc = trainer(script, root, log, log.with_suffix(".json"), kill_step, stderr)
        try:
            deadline = time.monotonic() + 240
            while kill_step not in logged_steps(log):
                assert proc.poll() is None, f"{where}: the trainer exited ({proc.returncode}): {errors.read_text()}"
                assert time.monotonic() < deadline, f"{where}: step {kill_step} never logged"
                time.sleep(0.005)
            os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait(60) == -signal.SIGKILL, f"{where}: {errors.read_text()}"
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def check_against_reference(log: Path, reference: dict[int, str], last_step: int, where: str) -> int | None:
    """Every step the run logged equals the uninterrupted run's line; returns the restored step."""
    start, steps = parse_log(log)
    first = 1 if start is None else start + 1
    assert sorted(steps) == list(range(first, last_step + 1)), f"{where}: restored {start}, logged {sorted(steps)}"
    for step, line in steps.items():
        assert line == reference[step], (
            f"{where}: restored step {start}, step {step} differs from the uninterrupted run\n"
            f"  resumed:   {line}\n  reference: {reference[step]}\n(fields: step, loss.hex(), batch digest)"
        )
    return start


def restorable(kill_step: int) -> set[int | None]:
    """What a run killed after logging ``kill_step`` may resume from: its newest save, or the one
    before if that save had not committed yet (one save is in flight at a time)."""
    newest = kill_step - kill_step % EVERY
    return {newest, newest - EVERY or None}


def run_scenario(script: Path, tmp: Path, number: int, kills: list[int], where: str) -> dict:
    """One run killed at each of ``kills`` in turn, each resuming the last, then one to the end."""
    root = tmp / f"ckpts-{number}"
    for run, kill_step in enumerate(kills):
        run_and_kill(script, root, tmp / f"run-{number}-{run}.log", kill_step, f"{where}, run {run}")
    return run_to_end(script, root, tmp / f"run-{number}-final.log", tmp / f"run-{number}.json", f"{where}, final run")


def test_killed_and_resumed_training_matches_the_uninterrupted_run_bit_for_bit(tmp_path):
    seed = int(os.environ.get("ASYNCCKPT_E2E_SEED") or int.from_bytes(os.urandom(4), "little"))
    rng = random.Random(seed)
    script = tmp_path / "train.py"
    script.write_text(TRAINER)
    # one run killed once, one killed twice (a resumed run is killed and resumed again)
    scenarios = [sorted(rng.sample(range(EVERY + 1, TOTAL), n)) for n in (1, 2)]
    wheres = [f"seed {seed} (rerun with ASYNCCKPT_E2E_SEED={seed}), kill steps {kills}" for kills in scenarios]

    ref_log, ref_out = tmp_path / "reference.log", tmp_path / "reference.json"
    # the three runs are independent processes, mostly starting up: run them side by side
    with ThreadPoolExecutor(3) as pool:
        ref_root = tmp_path / "reference-ckpts"
        ref_run = pool.submit(run_to_end, script, ref_root, ref_log, ref_out, f"seed {seed}, reference")
        runs = [pool.submit(run_scenario, script, tmp_path, n, kills, wheres[n]) for n, kills in enumerate(scenarios)]
        reference_final, finals = ref_run.result(), [run.result() for run in runs]
    ref_start, reference = parse_log(ref_log)
    assert ref_start is None and sorted(reference) == list(range(1, TOTAL + 1))
    assert len({line.split()[1] for line in reference.values()}) > TOTAL // 2, "the losses do not change"

    for number, (kills, where, final) in enumerate(zip(scenarios, wheres, finals, strict=True)):
        for run, kill_step in enumerate(kills):
            log = tmp_path / f"run-{number}-{run}.log"
            start = check_against_reference(log, reference, kill_step, f"{where}, killed run {run}")
            if run > 0:
                assert start in restorable(kills[run - 1]), f"{where}: run {run} restored step {start}"
        log = tmp_path / f"run-{number}-final.log"
        start = check_against_reference(log, reference, TOTAL, f"{where}, final run")
        assert start in restorable(kills[-1]), f"{where}: the final run restored step {start}"
        assert final == reference_final, (
            f"{where}: restored step {start}; final state differs: {final} != {reference_final}"
        )
