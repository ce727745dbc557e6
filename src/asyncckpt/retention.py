"""Which committed checkpoints to keep. A pure function of the committed list, so it is testable
without files, and it never picks the newest checkpoint (nothing newer supersedes it yet)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RetentionPolicy:
    keep_last: int | None = 3
    keep_best: int | None = None
    best_metric: str | None = None
    best_mode: str = "min"
    keep_every: int | None = None

    def __post_init__(self) -> None:
        for name in ("keep_last", "keep_best", "keep_every"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if self.keep_best is not None and not self.best_metric:
            raise ValueError("keep_best needs best_metric (the name of a metric passed to save)")
        if self.best_mode not in ("min", "max"):
            raise ValueError(f"best_mode must be 'min' or 'max', got {self.best_mode!r}")


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    metrics: dict[str, Any]
    tags: tuple[str, ...] = ()
    unreadable: str | None = None  # why its manifest could not be read: then its tags are unknown


def _metric(info: CheckpointInfo, name: str) -> float | None:
    value = info.metrics.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        value = float(value)
    except OverflowError:
        return None
    return None if math.isnan(value) else value


def best_metric_missing(committed: list[CheckpointInfo], policy: RetentionPolicy) -> bool:
    """``keep_best`` is set and no committed checkpoint carries a number (not NaN) for its metric."""
    if policy.keep_best is None or not policy.best_metric:
        return False
    return all(_metric(c, policy.best_metric) is None for c in committed)


def missing_metric_text(committed: list[CheckpointInfo], policy: RetentionPolicy) -> str:
    """What is wrong with ``keep_best``'s metric when ``best_metric_missing``, to follow
    "no checkpoint in ROOT ": a name no checkpoint carries (a misspelling, say), or one carried
    only as NaN, a string or null, which cannot be ranked."""
    name = policy.best_metric
    carrying = sum(1 for c in committed if name in c.metrics)
    if carrying:
        return (
            f"has a finite numeric value for the metric {name!r} (it is NaN or not a number in all "
            f"{carrying} checkpoint{'s' if carrying != 1 else ''} that carry it)"
        )
    present = sorted({key for c in committed for key in c.metrics})
    return f"has the metric {name!r} (metrics there: {', '.join(present) or 'none'})"


def steps_to_delete(committed: list[CheckpointInfo], policy: RetentionPolicy) -> list[int]:
    """Steps that no rule keeps. Rules are a union: a checkpoint kept by any rule stays, and a
    tagged checkpoint is kept by its tags.

    A checkpoint whose manifest cannot be read is never deleted (it may be tagged, and a person
    should look at it) and never counts as one of the newest: ``keep_last`` keeps the newest that
    can be read, so a damaged newer checkpoint never costs the last good one.

    While ``keep_best`` has nothing to rank (no checkpoint carries its metric: a misspelt name, or a
    metric not passed yet), nothing is deleted: the best may be among them, unknown.
    """
    if not committed or best_metric_missing(committed, policy):
        return []
    ordered = sorted(committed, key=lambda c: c.step)
    keep = {ordered[-1].step} | {c.step for c in ordered if c.tags}  # tagged: kept until untagged
    keep.update(c.step for c in ordered if c.unreadable is not None)
    readable = [c for c in ordered if c.unreadable is None]
    if policy.keep_last is None:
        keep.update(c.step for c in ordered)
    else:
        keep.update(c.step for c in readable[-policy.keep_last :])
    if policy.keep_every is not None:
        keep.update(c.step for c in ordered if c.step % policy.keep_every == 0)
    if policy.keep_best is not None and policy.best_metric:
        scored = [(m, c.step) for c in ordered if (m := _metric(c, policy.best_metric)) is not None]
        # ties go to the newer checkpoint
        scored.sort(key=lambda p: (p[0] if policy.best_mode == "min" else -p[0], -p[1]))
        keep.update(step for _, step in scored[: policy.keep_best])
    return [c.step for c in ordered if c.step not in keep]


def tagged_above(tiers: dict[str, list[CheckpointInfo]], step: int) -> str:
    """The checkpoints above ``step`` in each tier that may be tagged, said for a rollback that
    refuses them ("step 40 in the root (best); ..."), or "" when there are none. One whose manifest
    cannot be read counts: its tags are unknown, and retention keeps such a checkpoint too."""
    return "; ".join(
        f"step {info.step} in the {tier} "
        + (
            "(its manifest cannot be read: its tags are unknown)"
            if info.unreadable is not None
            else f"({', '.join(info.tags)})"
        )
        for tier, infos in tiers.items()
        for info in infos
        if info.step > step and (info.tags or info.unreadable is not None)
    )
