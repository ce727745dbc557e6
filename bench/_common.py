"""Shared bench helpers: a model + AdamW state of a chosen size, result output, and a per-thread
OpenMP limit for the encoder-thread variants."""

from __future__ import annotations

import ctypes
import functools
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def build_state(width: int, depth: int, device: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return model, opt


def trained_state(width: int, depth: int, device: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """build_state plus one optimizer step, so the AdamW moments exist (the state's full size)."""
    model, opt = build_state(width, depth, device)
    model(torch.randn(8, width, device=device)).pow(2).mean().backward()
    opt.step()
    return model, opt


def state_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    for per_param in opt.state_dict()["state"].values():
        total += sum(v.numel() * v.element_size() for v in per_param.values() if isinstance(v, torch.Tensor))
    return total


def machine() -> dict:
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d"),
        # OpenMP settings change what CPU threads cost (bench/encoder_threads.py): record them
        "openmp_env": {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "GOMP_", "KMP_"))},
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _json_safe(value):
    """NaN (a figure not measured) as null: strict JSON readers (jq, JavaScript) reject NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_json(path: str | None, payload: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(_json_safe(payload), indent=2, allow_nan=False))


@functools.cache
def _omp_set_num_threads():
    """The ``omp_set_num_threads`` torch's own kernels obey, or None where it cannot be found.

    Looked up through libtorch_cpu's handle: dlsym searches a library's dependencies too, so this
    finds the OpenMP runtime torch links, not some other one in the process.
    """
    if not torch.backends.openmp.is_available():
        return None
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib"):
        path = Path(torch.__file__).parent / "lib" / name
        if path.exists():
            try:
                function = ctypes.CDLL(str(path)).omp_set_num_threads
            except (OSError, AttributeError):
                return None
            function.argtypes = [ctypes.c_int]
            function.restype = None
            return function
    return None


def limit_openmp_this_thread(count: int) -> bool:
    """At most ``count`` OpenMP threads for torch kernels called from this thread, and no other.

    Unlike torch.set_num_threads, omp_set_num_threads leaves the count that threads created later
    start from alone. False where torch has no OpenMP runtime this can reach.
    """
    set_count = _omp_set_num_threads()
    if set_count is None:
        return False
    torch.get_num_threads()  # torch's lazy per-thread init first, or it would undo the next line
    set_count(count)
    return torch.get_num_threads() == count


def openmp_limited_init(default: Callable[[Any], None], count: int) -> Callable[[Any], None]:
    """An encoder-worker initializer: asyncckpt's own (``default``), then at most ``count`` OpenMP
    threads for that worker thread alone."""

    def init(pipeline: Any) -> None:
        default(pipeline)
        if not limit_openmp_this_thread(count):
            raise RuntimeError("this torch has no OpenMP runtime the bench can reach")

    return init


def spawn_ranks(target: Callable[..., None], world: int, cfg: dict, timeout: float = 600.0) -> None:
    """``target(rank, world, cfg)`` in ``world`` spawned processes, joined; SystemExit naming the
    exit codes when any rank failed."""
    import multiprocessing

    spawn = multiprocessing.get_context("spawn")
    procs = [spawn.Process(target=target, args=(r, world, cfg)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    if any(p.exitcode != 0 for p in procs):
        raise SystemExit(f"{world} ranks failed: exit codes {[p.exitcode for p in procs]}")
