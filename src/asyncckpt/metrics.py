"""Per-save timing and size records, their summary, and the JSON-lines log in the root.

Stall is the time the caller of ``save`` was blocked; everything else happens on background
threads and is recorded so users can see where a save's time went.
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

METRICS_LOG = "asyncckpt-metrics.jsonl"


@dataclass
class SaveRecord:
    step: int
    started: float = 0.0  # wall clock (time.time) when save was called
    # caller-blocked time, split up
    wait_prev_s: float = 0.0  # waiting for an earlier save (max_pending)
    snapshot_s: float = 0.0  # copying tensors into the host arena
    bookkeeping_s: float = 0.0  # flattening the state, planning, enqueueing
    stall_s: float = 0.0  # all of the above
    fence_wait_s: float = 0.0  # overlap mode: training waiting for the copy at later fences
    # overlap mode on GPU: training's stream waiting for the copy at the fence (device time; the
    # host does not block there, so fence_wait_s does not see it)
    fence_gpu_wait_s: float = 0.0
    # background time
    lazy_copy_s: float = 0.0  # overlap mode: save() to the last lazily copied byte in the arena
    compress_s: float = 0.0  # summed over worker threads
    # those threads' own CPU time for it (0 in logs written before it was recorded); below
    # compress_s when they waited: for a core, or for helper threads of their own
    compress_cpu_s: float = 0.0
    write_s: float = 0.0
    fsync_s: float = 0.0
    commit_s: float = 0.0
    persist_s: float = 0.0  # from save() returning to the commit being durable
    raw_bytes: int = 0
    stored_bytes: int = 0
    ok: bool | None = None
    error: str | None = None


def fence_cost_s(record: Any) -> float:
    """Training's time lost at a save's fences, overlap mode: the longer of the host's wait and the
    GPU stream's, not their sum. They overlap in time (with lazy tensors on both, the host waits for
    the CPU copy while the stream waits for the GPU's). On a loop bound by the host's kernel
    launches the stream's wait is an upper bound: the host may stay ahead of it. Any object with
    the two fields (a SaveRecord, or a record read back without the GPU one)."""
    return max(getattr(record, "fence_wait_s", 0.0), getattr(record, "fence_gpu_wait_s", 0.0))


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
    return ordered[index]


class SaveStats:
    """Thread-safe collection of SaveRecords; appended to the JSONL log as each save ends."""

    def __init__(self, log_path: Path | None = None) -> None:
        self._records: list[SaveRecord] = []
        self._lock = threading.Lock()
        self._log_path = log_path
        self._first_step: float | None = None  # perf_counter of the first and last maybe_save
        self._last_step: float | None = None
        self.deferred_saves = 0  # saves the policy put off because one was still in flight

    def step_seen(self, now: float) -> None:
        """Called by maybe_save on every training step: the loop's wall time for the overhead."""
        if self._first_step is None:
            self._first_step = now
        self._last_step = now

    def add(self, record: SaveRecord) -> None:
        with self._lock:
            self._records.append(record)

    def finished(self, record: SaveRecord) -> None:
        """Called on the writer thread once a save committed or failed."""
        if self._log_path is None:
            return
        line = json.dumps(asdict(record)) + "\n"
        try:
            with open(self._log_path, "a") as log:
                log.write(line)
        except OSError:
            pass  # metrics must never fail a checkpoint

    @property
    def records(self) -> list[SaveRecord]:
        with self._lock:
            return list(self._records)

    def summary(self) -> dict[str, Any]:
        """summarize() of the records, plus what only the live loop knows: the overhead fraction
        (total stall / wall time between the first and last maybe_save) and deferred saves."""
        records = self.records
        out = summarize(records)
        wall = (self._last_step or 0.0) - (self._first_step or 0.0)
        out["loop_wall_s"] = wall
        blocked = sum(r.stall_s + fence_cost_s(r) for r in records)
        out["overhead_fraction"] = blocked / wall if wall > 0 else math.nan
        out["deferred_saves"] = self.deferred_saves
        return out


def summarize(records: list[SaveRecord]) -> dict[str, Any]:
    """Stall percentiles, throughput and compression ratio over ``records`` (NaN where undefined).

    Stall statistics cover every save (a failed save stalled its caller too); sizes, persist time
    and throughput cover only the committed ones.
    """
    done = [r for r in records if r.ok]
    stalls = [r.stall_s for r in records]
    raw = sum(r.raw_bytes for r in done)
    stored = sum(r.stored_bytes for r in done)
    persist = sum(r.persist_s for r in done)
    timed = [r for r in done if r.compress_cpu_s > 0]  # older logs did not record the CPU time
    encoding = sum(r.compress_s for r in timed)
    return {
        "saves": len(records),
        "committed": len(done),
        "failed": sum(1 for r in records if r.ok is False),
        "stall_p50_s": _percentile(stalls, 0.50),
        "stall_p95_s": _percentile(stalls, 0.95),
        "stall_max_s": max(stalls) if stalls else math.nan,
        "snapshot_p50_s": _percentile([r.snapshot_s for r in records], 0.50),
        "fence_wait_p50_s": _percentile([r.fence_wait_s for r in records], 0.50),
        "fence_gpu_wait_p50_s": _percentile([r.fence_gpu_wait_s for r in records], 0.50),
        "persist_p50_s": _percentile([r.persist_s for r in done], 0.50),
        "throughput_bytes_per_s": raw / persist if persist > 0 else math.nan,
        "compression_ratio": raw / stored if stored else math.nan,
        # share of the encoder threads' time spent on a CPU: low when training leaves them no core
        "encoder_cpu_fraction": sum(r.compress_cpu_s for r in timed) / encoding if encoding > 0 else math.nan,
        "raw_bytes": raw,
        "stored_bytes": stored,
    }


class SaveLog(list[SaveRecord]):
    """The records read from a metrics log (a plain list of SaveRecord), plus the lines skipped.

    ``skipped`` holds ``(line_number, reason)`` for every non-empty line that is not a valid record:
    typically one truncated last line after a crash mid-append.
    """

    def __init__(self, records: Iterable[SaveRecord] = (), skipped: Iterable[tuple[int, str]] = ()) -> None:
        super().__init__(records)
        self.skipped: list[tuple[int, str]] = list(skipped)


_FIELDS = {f.name: f for f in fields(SaveRecord)}
_FLOAT_FIELDS = frozenset(name for name, f in _FIELDS.items() if f.type in ("float", float))
_INT_FIELDS = frozenset(name for name, f in _FIELDS.items() if f.type in ("int", int))


def record_from_json(obj: Any) -> SaveRecord:
    """A SaveRecord from one decoded log line; ValueError if it is not one.

    Unknown keys are ignored (a newer writer may add fields); missing keys take their defaults,
    except ``step``, which every record has.
    """
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if "step" not in obj:
        raise ValueError("no 'step'")
    values: dict[str, Any] = {}
    for name, value in obj.items():
        if name not in _FIELDS:
            continue
        if name in _INT_FIELDS:
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
        elif name in _FLOAT_FIELDS:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        elif name == "ok":
            ok = value is None or isinstance(value, bool)
        else:  # error
            ok = value is None or isinstance(value, str)
        if not ok:
            raise ValueError(f"bad value for {name!r}: {value!r}")
        values[name] = float(value) if name in _FLOAT_FIELDS else value
    return SaveRecord(**values)


def read_log(root: str | os.PathLike) -> SaveLog:
    """The save records in ``root``'s metrics log, oldest first.

    Lines that are not valid records are skipped and listed in the result's ``skipped``: a crash
    while appending leaves a truncated last line, and that must not hide the rest of the log.
    Raises FileNotFoundError if there is no log (OSError for other failures to read it).
    """
    log = SaveLog()
    with open(Path(root) / METRICS_LOG, "rb") as file:
        for number, raw in enumerate(file, start=1):
            if not raw.strip():
                continue
            try:
                log.append(record_from_json(json.loads(raw)))
            except (ValueError, TypeError, OverflowError, RecursionError) as exc:  # incl. JSON/Unicode errors
                log.skipped.append((number, f"{type(exc).__name__}: {exc}"))
    return log
