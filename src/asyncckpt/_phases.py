"""Test seam: pause inside a named phase of a save, so crash tests can kill there on purpose.

``ASYNCCKPT_PHASE_DELAY="write=0.5,rename=0.5"`` makes a save sleep that long on entering those
phases; with ``ASYNCCKPT_PHASE_MARK=FILE`` it first appends the phase name to FILE (flushed), so a
parent process knows the child is inside the phase when it sends SIGKILL. Unset (always, outside
tests) a phase costs one dict lookup.
"""

from __future__ import annotations

import os
import time

PHASES = ("snapshot", "compress", "write", "fsync", "manifest", "rename", "replace", "retention")
# Phases only overlap mode has (the torture test kills in every PHASES entry, in blocking mode).
OVERLAP_PHASES = ("lazy_copy", "verdict")
# Phases only a multi-rank save has (a rank's table is durable, its vote not yet cast).
RANK_PHASES = ("vote",)


def _parse(spec: str) -> dict[str, float]:
    delays = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, seconds = item.partition("=")
        if name not in PHASES + OVERLAP_PHASES + RANK_PHASES:
            known = ", ".join(PHASES + OVERLAP_PHASES + RANK_PHASES)
            raise ValueError(f"ASYNCCKPT_PHASE_DELAY: unknown phase {name!r} (phases: {known})")
        delays[name] = float(seconds)
    return delays


_DELAYS = _parse(os.environ.get("ASYNCCKPT_PHASE_DELAY", ""))
_MARK = os.environ.get("ASYNCCKPT_PHASE_MARK")


def pause(phase: str) -> None:
    delay = _DELAYS.get(phase)
    if not delay:
        return
    if _MARK:
        with open(_MARK, "a") as mark:
            mark.write(phase + "\n")
            mark.flush()
    time.sleep(delay)
