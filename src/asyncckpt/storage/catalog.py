"""What retention knows about each committed checkpoint: its step, metrics and tags, read from its
manifest. The manager and ``asyncckpt prune`` both read it here, so a rule (tags protect a
checkpoint, say) cannot hold for one and not for the other."""

from __future__ import annotations

from collections.abc import Iterable

from asyncckpt.engine.reader import read_manifest
from asyncckpt.errors import CheckpointError
from asyncckpt.retention import CheckpointInfo
from asyncckpt.storage.local import CommittedCheckpoint


def checkpoint_info(checkpoint: CommittedCheckpoint) -> CheckpointInfo:
    """A checkpoint whose manifest cannot be read is marked so, with the reason: its tags are
    unknown, so retention keeps it rather than guess."""
    try:
        manifest = read_manifest(checkpoint.path)
    except CheckpointError as exc:
        return CheckpointInfo(checkpoint.step, {}, unreadable=str(exc))
    return CheckpointInfo(checkpoint.step, manifest.metrics, tuple(manifest.tags))


def checkpoint_infos(checkpoints: Iterable[CommittedCheckpoint]) -> list[CheckpointInfo]:
    return [checkpoint_info(c) for c in checkpoints]
