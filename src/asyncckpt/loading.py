"""Reading checkpoints without a manager: ``load``, ``load_weights``, and the newest-valid search.

A root is read newest first: a checkpoint that fails (damage, a hostile manifest, memory) is
skipped with a warning and the next older one tried, and one deleted or replaced while it was read
(retention or a re-save on a live root) sends the reader back to list the root again.
``CheckpointManager.restore`` finds its checkpoint the same way (:func:`read_newest_valid`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, overload

import torch

from asyncckpt.engine.reader import (
    CheckpointGoneError,
    DirIdentity,
    LoadedCheckpoint,
    directory_identity,
    read_checkpoint,
    read_manifest,
)
from asyncckpt.errors import CheckpointDamagedError, CheckpointError, CheckpointNotFoundError
from asyncckpt.format import MANIFEST_NAME, Manifest, ManifestTooLargeError
from asyncckpt.state import skeleton
from asyncckpt.state.tree import RestoreResult, check_module, load_module, unflatten
from asyncckpt.storage.commit import CommittedCheckpoint
from asyncckpt.storage.local import list_checkpoints


def _candidates(root: Path, step: int | None) -> list[CommittedCheckpoint]:
    committed = list_checkpoints(root)
    if step is None:
        return committed[::-1]
    chosen = [c for c in committed if c.step == step]
    if not chosen:
        have = [c.step for c in committed]
        raise CheckpointNotFoundError(f"no checkpoint for step {step} in {root} (committed steps: {have[-10:]})")
    return chosen


# How often a reader of a live root lists it again after the checkpoint it was reading vanished
# (pruned by the writer's retention): each round starts from the newest checkpoint again.
_RELIST_ROUNDS = 64


def _check_root(root: Path) -> None:
    if not root.exists():
        raise CheckpointNotFoundError(f"checkpoint root {root} does not exist")
    if not root.is_dir():
        raise CheckpointNotFoundError(f"checkpoint root {root} is not a directory")


# What one checkpoint's read may fail with (damage, a hostile manifest, memory, a file error, a
# decoding error); anything else is a bug and propagates instead of hiding behind a fallback.
_ONE_CHECKPOINT_FAILURES = (CheckpointError, OSError, MemoryError, ValueError)


def _newest_valid(
    root: Path,
    step: int | None,
    read: Callable[[Path, DirIdentity], Any],
    final: tuple[type[Exception], ...] = (),
) -> tuple[Path, Any] | None:
    """``read(path, identity)`` of the newest checkpoint it succeeds on (or exactly ``step``); warn
    about each one that fails. Any failure of one checkpoint (damage, a hostile manifest, memory)
    falls back to the next older one, except the ``final`` errors; a checkpoint deleted or replaced
    since the root was listed (retention or a re-save on a live root) is not a failure: the root is
    listed again and the newest one tried."""
    _check_root(root)
    failed: dict[Path, str] = {}
    for _ in range(_RELIST_ROUNDS):
        candidates = [c for c in _candidates(root, step) if c.path not in failed]
        if not candidates and not failed:
            return None
        vanished = False
        for candidate in candidates:
            try:
                identity = directory_identity(candidate.path)  # once: every read of it is held to it
                if identity is None:
                    raise CheckpointGoneError(f"{candidate.path} was deleted since the root was listed")
                return candidate.path, read(candidate.path, identity)
            except CheckpointGoneError:
                vanished = True
                break
            except _ONE_CHECKPOINT_FAILURES as exc:
                if step is not None or isinstance(exc, final):
                    raise
                reason = str(exc) if isinstance(exc, CheckpointError) else f"{type(exc).__name__}: {exc}"
                failed[candidate.path] = f"step {candidate.step}: {reason}"
                what = "cannot be read" if isinstance(exc, ManifestTooLargeError) else "is damaged or cannot be read"
                warnings.warn(
                    f"asyncckpt: checkpoint {candidate.path} {what} ({reason}); falling back to the next older one",
                    stacklevel=4,
                )
        if not vanished:
            break
    else:
        raise CheckpointNotFoundError(
            f"every checkpoint of {root} was deleted while it was being read, {_RELIST_ROUNDS} times over"
        )
    if not failed:
        return None
    raise CheckpointDamagedError(f"no valid checkpoint in {root}: " + "; ".join(failed.values()))


def read_newest_valid(root: Path, step: int | None, workers: int, mmap: bool = False) -> LoadedCheckpoint | None:
    """Read the newest checkpoint of a root that verifies (or exactly ``step``), warning about each
    damaged one skipped.

    Args:
        root: the checkpoint root.
        step: the step to read, or None for the newest valid one.
        workers: threads reading chunks.
        mmap: map a raw checkpoint's data file instead of reading it (see ``read_checkpoint``).

    Returns:
        The checkpoint read and verified, or None when the root holds no checkpoint.

    Raises:
        CheckpointNotFoundError: the root does not exist, or holds no checkpoint of ``step``.
        CheckpointDamagedError: every checkpoint of the root failed (each one's reason listed).
        CheckpointError: checkpoint ``step`` cannot be read (a named step never falls back).
    """
    found = _newest_valid(
        root, step, lambda path, identity: read_checkpoint(path, workers, mmap=mmap, identity=identity)
    )
    return None if found is None else found[1]


def load(
    path: str | os.PathLike,
    step: int | None = None,
    map_location: str | torch.device = "cpu",
    *,
    mmap: bool = False,
    mirror: str | os.PathLike | None = None,
) -> Any:
    """Load a checkpoint as a plain nested tree (stateful objects become their state dicts).

    The tensors are read into memory of their own, every chunk verified first. ``mmap=True`` maps a
    raw (``compression=None``) checkpoint's data file instead: zero-copy, but the tensors then
    follow the file (see the README).

    Args:
        path: a checkpoint root (its newest valid checkpoint is read, damaged ones skipped with a
            warning) or one checkpoint directory.
        step: read exactly this step of the root instead of the newest.
        map_location: the device the tensors are moved to.
        mmap: map the data file of a raw checkpoint instead of reading it.
        mirror: the root's mirror (``CheckpointManager(mirror=...)``): a step the root lacks, or
            cannot read, is read from there (with a warning).

    Returns:
        The saved state: dicts, lists, tuples, tensors, numpy arrays and plain values, each saved
        object (module, optimizer...) as its state dict.

    Raises:
        CheckpointNotFoundError: ``path`` holds no checkpoint, or none of ``step``.
        CheckpointDamagedError: the checkpoint (every checkpoint of a root) fails verification.
        CheckpointError: the checkpoint cannot be read.
    """
    path = Path(path)
    if (path / MANIFEST_NAME).exists() and step is None:
        loaded = read_checkpoint(path, workers=os.cpu_count() or 1, mmap=mmap)
    elif mirror is not None:
        found = read_newest_valid_of_tiers(path, _mirror_root(mirror), step, os.cpu_count() or 1, str(mirror))
        if found is None:
            raise CheckpointNotFoundError(f"no checkpoint in {path} or its mirror {mirror}")
        loaded = found
    else:
        found = read_newest_valid(path, step, os.cpu_count() or 1, mmap)
        if found is None:
            raise CheckpointNotFoundError(f"no checkpoint in {path}")
        loaded = found
    tensors = loaded.tensors
    if torch.device(map_location) != torch.device("cpu"):
        tensors = [t.to(map_location) for t in tensors]
    return unflatten(loaded.manifest.tree, tensors)


def _mirror_root(mirror: str | os.PathLike) -> Any:
    """A mirror as the reader takes it: a URL as given, a path as a Path."""
    text = os.fspath(mirror)
    return text if isinstance(text, str) and "://" in text else Path(text)


def check_strict(strict: Any) -> None:
    """Refuse a ``strict`` that is not a bool: a truthy string or 0 would silently pick a mode.

    Args:
        strict: the value passed as ``strict``.

    Raises:
        TypeError: ``strict`` is not True or False.
    """
    if not isinstance(strict, bool):
        raise TypeError(f"strict must be True or False, got {strict!r}")


@overload
def load_weights(
    path: str | os.PathLike, model: torch.nn.Module, key: str = ..., strict: Literal[True] = ...
) -> int: ...
@overload
def load_weights(
    path: str | os.PathLike, model: torch.nn.Module, key: str, strict: Literal[False]
) -> RestoreResult: ...
@overload
def load_weights(
    path: str | os.PathLike, model: torch.nn.Module, key: str = ..., *, strict: Literal[False]
) -> RestoreResult: ...
@overload
def load_weights(
    path: str | os.PathLike, model: torch.nn.Module, key: str = ..., strict: bool = ...
) -> int | RestoreResult: ...
def load_weights(
    path: str | os.PathLike, model: torch.nn.Module, key: str = "model", strict: bool = True
) -> int | RestoreResult:
    """Load just a model's weights for inference: only the chunks holding them are read.

    Tensors land on the model's own device and dtype. Keys, shapes and writability are checked
    before any weight is copied, so a mismatch leaves the model untouched. With ``strict=False``
    the matching weights load and the rest is reported, as ``model.load_state_dict(strict=False)``
    does; a shape mismatch is an error either way.

    Args:
        path: a checkpoint root (its newest valid checkpoint is read, damaged ones skipped with a
            warning) or one checkpoint directory.
        model: the module to load into, in place.
        key: the model's entry in the saved state, resolved as ``asyncckpt export --key`` resolves
            it: a top-level key (``"model"``), or a dotted path through dicts, list indices and
            saved objects (``"ema.model"``, ``"models.0"``).
        strict: whether keys the model and the checkpoint do not share, or weights that cannot be
            written in place, are errors (True) or reported (False).

    Returns:
        The checkpoint's step with ``strict=True``; with ``strict=False`` a RestoreResult: ``.step``
        and the missing, unexpected and skipped keys as torch names them (``'0.bias'``).

    Raises:
        TypeError: ``strict`` is not a bool.
        CheckpointNotFoundError: ``path`` holds no checkpoint.
        CheckpointError: ``key`` names nothing in the newest valid checkpoint (the message lists
            what exists; no older checkpoint is tried), or the weights cannot be loaded.
        StateMismatchError: the saved weights do not fit ``model`` (missing or unexpected keys with
            ``strict=True``, a shape mismatch either way); the model is unchanged.
        CheckpointDamagedError: the checkpoint (every checkpoint of a root) fails verification.
    """
    check_strict(strict)
    path = Path(path)

    def read(candidate: Path, identity: DirIdentity | None) -> tuple[Manifest, dict, LoadedCheckpoint]:
        # one identity for both reads: a step replaced between them is gone, not damaged
        manifest = read_manifest(candidate, identity=identity)
        node = skeleton.subtree(manifest.tree, key, str(candidate))
        wanted = skeleton.tensor_indices(node)
        return manifest, node, read_checkpoint(candidate, os.cpu_count() or 1, manifest, wanted, identity=identity)

    if (path / MANIFEST_NAME).exists():
        candidate, (manifest, node, loaded) = path, read(path, directory_identity(path))
    else:
        if not path.is_dir():
            raise CheckpointNotFoundError(f"no checkpoint in {path}")
        found = _newest_valid(path, None, read, final=(skeleton.NoEntryError,))
        if found is None:
            raise CheckpointNotFoundError(f"no checkpoint in {path}")
        candidate, (manifest, node, loaded) = found
    return _load_model(model, node, loaded.tensors, strict, f"{candidate}[{key!r}]", manifest.step)


def _load_model(
    model: torch.nn.Module, node: dict, tensors: list, strict: bool, where: str, step: int
) -> int | RestoreResult:
    plan = check_module(model, node, tensors, strict=strict, where=f"{where} for {type(model).__name__}")
    try:
        load_module(model, node, tensors, plan)
    except Exception as exc:
        raise CheckpointError(f"{where} does not fit {type(model).__name__}: {exc}") from exc
    return step if strict else plan.result(step)


def _tier_steps(root: Any) -> set[int]:
    """The committed steps of one tier's root; none when it does not exist."""
    if isinstance(root, Path) and not root.exists():
        return set()
    return {c.step for c in list_checkpoints(root)}


def read_newest_valid_of_tiers(
    local: Path, mirror: Any, step: int | None, workers: int, mirror_name: str
) -> LoadedCheckpoint | None:
    """Read the newest checkpoint (or exactly ``step``) that verifies in a local root or its mirror.

    Steps are tried newest first, each from the local root first, then from the mirror: a local
    root that is empty, deleted or whose newest checkpoint is damaged restores from the mirror.
    Each checkpoint skipped, and a checkpoint read from the mirror, is said in a warning.

    Args:
        local: The local root (it may not exist: a node that lost its disk).
        mirror: The mirror root (a path; a URL or Backend where the reader takes one).
        step: The step to read, or None for the newest valid one.
        workers: Threads reading chunks.
        mirror_name: The mirror's location, for messages (free of credentials).

    Returns:
        The checkpoint read and verified, or None when neither tier holds a checkpoint.

    Raises:
        CheckpointNotFoundError: Neither tier holds ``step``.
        CheckpointDamagedError: Every checkpoint tried failed (each one's reason listed).
    """
    mine = _tier_steps(local)
    try:
        theirs = _tier_steps(mirror)
    except (CheckpointError, OSError) as exc:
        warnings.warn(
            f"asyncckpt: the mirror {mirror_name} cannot be listed ({exc}); reading the local root only", stacklevel=3
        )
        theirs = set()
    if step is not None and step not in mine | theirs:
        raise CheckpointNotFoundError(f"no checkpoint for step {step} in {local} or its mirror {mirror_name}")
    failed: list[str] = []
    for candidate in sorted(mine | theirs, reverse=True) if step is None else [step]:
        for tier, root, steps in (("local root", local, mine), ("mirror", mirror, theirs)):
            if candidate not in steps:
                continue
            try:
                loaded = read_newest_valid(root, candidate, workers)
            except _ONE_CHECKPOINT_FAILURES as exc:
                failed.append(f"step {candidate} ({tier}): {exc}")
                warnings.warn(
                    f"asyncckpt: checkpoint step {candidate} in the {tier} cannot be read ({exc})", stacklevel=3
                )
                continue
            if loaded is None:
                continue
            if tier == "mirror":
                why = "cannot read it" if candidate in mine else "does not have it"
                warnings.warn(
                    f"asyncckpt: restoring step {candidate} from the mirror {mirror_name}: "
                    f"the local root {local} {why}",
                    stacklevel=3,
                )
            return loaded
    if not failed:
        return None
    what = f"step {step}" if step is not None else "no checkpoint"
    raise CheckpointDamagedError(f"{what} of {local} or its mirror {mirror_name} verifies: " + "; ".join(failed))
