"""Retention applied after each commit: the checkpoints the policy no longer keeps are deleted."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Iterator
from pathlib import Path

from asyncckpt import _phases
from asyncckpt.engine.pipeline import _warn_from_writer
from asyncckpt.engine.tags import Tags
from asyncckpt.retention import (
    RetentionPolicy,
    best_metric_missing,
    missing_metric_text,
    steps_to_delete,
)


class Retainer:
    """Deletes what ``policy`` no longer keeps, deciding on the metrics and tags ``tags`` records.

    Args:
        tags: The committed steps' metrics and tags, in its catalog (its lock is held while
            deleting through the catalog).
        policy: What to keep.
        root: The root (for messages).
        pinned: The steps never to delete now, whatever the policy (a mirror's uploads: waiting,
            or being read); None: none.
    """

    def __init__(
        self,
        tags: Tags,
        policy: RetentionPolicy,
        root: Path | str,
        pinned: Callable[[], Collection[int]] | None = None,
    ) -> None:
        self._tags = tags
        self._pinned = pinned
        self._policy = policy
        self._root = root
        self._warned_no_best = False
        self._floor: int | None = None  # a rollback to this step is under way (``holding``)

    @contextlib.contextmanager
    def holding(self, step: int) -> Iterator[None]:
        """A rollback to ``step`` is under way: retention deletes nothing at or below it, since the
        saves the rollback waits for would otherwise count the steps it is about to delete.

        Args:
            step: The step rolled back to.
        """
        self._floor = step
        try:
            yield
        finally:
            self._floor = None

    def apply(self, protect: int) -> None:
        """Writer thread, after a commit: delete the checkpoints no longer kept, never ``protect``.

        Warns once when ``keep_best`` has no checkpoint with its metric (nothing is deleted then).

        Args:
            protect: The step just committed.

        Raises:
            OSError: Listing or deleting failed (the writer warns; the commit stands).
        """
        with self._tags.lock:
            entries = self._tags.catalog.entries()
            committed = {c.step: c for c, _ in entries}
            infos = [info for _, info in entries]
            if not self._warned_no_best and best_metric_missing(infos, self._policy):
                self._warned_no_best = True
                _warn_from_writer(
                    f"asyncckpt: keep_best: no committed checkpoint in {self._root} "
                    f"{missing_metric_text(infos, self._policy)}; retention deletes nothing until one does "
                    "(pass it to save(metrics=...))"
                )
            pinned = self._pinned() if self._pinned is not None else ()
            floor = self._floor
            for step in steps_to_delete(infos, self._policy):
                if step != protect and step not in pinned and (floor is None or step > floor):
                    _phases.pause("retention")
                    self._tags.catalog.delete(committed[step])
