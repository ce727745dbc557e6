"""Per-save timing and size records, their summary, and the JSON-lines log in the root.

Stall is the time the caller of ``save`` was blocked; everything else happens on background
threads and is recorded so users can see where a save's time went.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import stat
import threading
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from asyncckpt.errors import CheckpointError
from asyncckpt.storage.local import describe_file_kind, open_regular_no_follow

METRICS_LOG = "asyncckpt-metrics.jsonl"
# `read_log` reads at most the last MAX_LOG_BYTES (about 37,000 saves at ~450 bytes a record) and
# parses at most the last MAX_LOG_RECORDS lines of them, so a huge or hostile log costs bounded
# memory (under 100 MB); a line longer than MAX_LINE_BYTES is skipped unparsed.
MAX_LOG_BYTES = 16 << 20
MAX_LOG_RECORDS = 100_000
MAX_LINE_BYTES = 64 << 10

_log = logging.getLogger("asyncckpt")


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
    raw_bytes: int = 0  # several ranks: rank 0's record holds the whole checkpoint's
    stored_bytes: int = 0
    # several ranks, on rank 0: the longest stall_s of any rank for this step (each rank's own
    # record holds its own stall_s); None for a single-process save
    max_rank_stall_s: float | None = None
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
        self._log_refused = False  # warned once that the log cannot be appended to
        if log_path is not None:
            _check_log(log_path)
        self._first_step: float | None = None  # perf_counter of the first and last maybe_save
        self._last_step: float | None = None
        self.deferred_saves = 0  # saves the policy put off because one was still in flight
        # with a mirror: its counters (mirror_behind, mirror_skipped, mirror_uploaded) for summary()
        self.mirror_status: Callable[[], dict[str, int]] | None = None

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
        line = (json.dumps(asdict(record)) + "\n").encode()
        try:
            fd = open_regular_no_follow(self._log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        except (CheckpointError, OSError) as exc:  # a link or a FIFO planted at its name: never followed
            if not self._log_refused:  # metrics must never fail a checkpoint: say it once, go on
                self._log_refused = True
                _log.warning("asyncckpt: save records are not logged: %s", exc)
            return
        try:
            os.write(fd, line)  # one append of under a page: whole, or (disk full) nothing worth keeping
        except OSError:
            pass
        finally:
            os.close(fd)

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
        if self.mirror_status is not None:
            out.update(self.mirror_status())
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
    # several ranks, on rank 0: the stall of each save's slowest rank (absent for one process)
    ranked = [r.max_rank_stall_s for r in done if r.max_rank_stall_s is not None]
    extra = {"rank_stall_max_p50_s": _percentile(ranked, 0.5), "rank_stall_max_s": max(ranked)} if ranked else {}
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
    } | extra


def _check_log(path: Path) -> None:
    """At open: a log that is a link or not a regular file is an error naming it, before any save."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise CheckpointError(f"cannot check the metrics log {path}: {exc.strerror}") from exc
    if stat.S_ISLNK(mode):
        raise CheckpointError(f"{path} is a symbolic link; asyncckpt never follows links in a root (remove it)")
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{path} is not a regular file ({describe_file_kind(mode)}); remove it")


class SaveLog(list[SaveRecord]):
    """The records read from a metrics log (a plain list of SaveRecord), plus the lines skipped.

    ``skipped`` holds ``(line_number, reason)`` for every non-empty line that is not a valid record:
    typically one truncated last line after a crash mid-append. ``omitted_bytes`` counts the bytes
    at the start of a log longer than the read limit that were not read or parsed (line numbers
    count from the first line read, also when the record cap leaves its oldest lines unparsed).
    """

    def __init__(
        self, records: Iterable[SaveRecord] = (), skipped: Iterable[tuple[int, str]] = (), omitted_bytes: int = 0
    ) -> None:
        super().__init__(records)
        self.skipped: list[tuple[int, str]] = list(skipped)
        self.omitted_bytes = omitted_bytes


_FIELDS = {f.name: f for f in fields(SaveRecord)}
_FLOAT_FIELDS = frozenset(name for name, f in _FIELDS.items() if f.type in ("float", float))
_INT_FIELDS = frozenset(name for name, f in _FIELDS.items() if f.type in ("int", int))
# Floats only some saves have (None elsewhere): ``max_rank_stall_s``, a multi-rank save's.
_OPTIONAL_FLOAT_FIELDS = frozenset(name for name, f in _FIELDS.items() if f.type in ("float | None", float | None))


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
        if name in _INT_FIELDS:  # a count or a byte size: one a float can hold, as summaries divide
            ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 63
        elif name in _FLOAT_FIELDS or name in _OPTIONAL_FLOAT_FIELDS:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) < 1e300
            ok = ok or (value is None and name in _OPTIONAL_FLOAT_FIELDS)
        elif name == "ok":
            ok = value is None or isinstance(value, bool)
        else:  # error
            ok = value is None or isinstance(value, str)
        if not ok:
            raise ValueError(f"bad value for {name!r}: {repr(value)[:80]}")
        values[name] = (
            float(value) if name in _FLOAT_FIELDS or (name in _OPTIONAL_FLOAT_FIELDS and value is not None) else value
        )
    return SaveRecord(**values)


def read_log(root: str | os.PathLike, max_bytes: int | None = None) -> SaveLog:
    """The save records in ``root``'s metrics log, oldest first.

    Lines that are not valid records are skipped and listed in the result's ``skipped``: a crash
    while appending leaves a truncated last line, and that must not hide the rest of the log.
    Only a regular file is read, never through a link, and only its last ``max_bytes`` (default
    MAX_LOG_BYTES) and MAX_LOG_RECORDS lines: a log that is a FIFO, a device or enormous costs
    nothing unbounded.
    Raises FileNotFoundError if there is no log, CheckpointError if it is not a regular file
    (OSError for other failures to read it).
    """
    limit = MAX_LOG_BYTES if max_bytes is None else max_bytes
    path = Path(root) / METRICS_LOG
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise CheckpointError(f"{path} is a symbolic link; asyncckpt stats never follows links") from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise CheckpointError(f"{path} is not a regular file ({describe_file_kind(info.st_mode)})")
        start = max(0, info.st_size - limit)
        # the first line read is whole only if the byte before it ends a line
        whole_first_line = start == 0 or os.pread(fd, 1, start - 1) == b"\n"
        parts, got = [], 0
        while got < limit:
            part = os.pread(fd, min(limit - got, 1 << 20), start + got)
            if not part:
                break
            parts.append(part)
            got += len(part)
    finally:
        os.close(fd)
    data = b"".join(parts)
    del parts
    log = SaveLog(omitted_bytes=start)
    if not whole_first_line:  # the end of an older record: not a record
        cut = data.find(b"\n") + 1 or len(data)
        log.omitted_bytes += cut
        data = data[cut:]
    lines = data.split(b"\n")
    del data
    first, kept = len(lines), 0
    while first > 0 and kept < MAX_LOG_RECORDS:
        first -= 1
        kept += bool(lines[first].strip())
    if first > 0:
        log.omitted_bytes += sum(len(line) + 1 for line in lines[:first])
        del lines[:first]
    for number, raw in enumerate(lines, start=first + 1):  # counted from the first line read, as stats says
        if not raw.strip():
            continue
        if len(raw) > MAX_LINE_BYTES:
            log.skipped.append((number, f"line longer than {MAX_LINE_BYTES} bytes"))
            continue
        try:
            log.append(record_from_json(json.loads(raw)))
        except (ValueError, TypeError, OverflowError, RecursionError) as exc:  # incl. JSON/Unicode errors
            log.skipped.append((number, f"{type(exc).__name__}: {exc}"))
    return log
