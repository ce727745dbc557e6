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
from urllib.parse import urlparse

import torch

from asyncckpt.engine.mirror import safe_location
from asyncckpt.engine.rank_restore import check_per_rank, choose_table
from asyncckpt.engine.reader import (
    CheckpointGoneError,
    DirIdentity,
    LoadedCheckpoint,
    directory_identity,
    read_checkpoint,
    read_manifest,
)
from asyncckpt.errors import CheckpointDamagedError, CheckpointError, CheckpointNotFoundError
from asyncckpt.format import (
    MANIFEST_NAME,
    Manifest,
    ManifestTooLargeError,
    MultiRankManifest,
    parse_manifest_generation,
    parse_step_dir,
)
from asyncckpt.state import skeleton
from asyncckpt.state.names import unwrap_module
from asyncckpt.state.tree import RestoreResult, check_module, load_module, unflatten
from asyncckpt.storage.backend import Backend, CheckpointRef, is_object_store_url, open_backend
from asyncckpt.storage.commit import CommittedCheckpoint, published_checkpoints
from asyncckpt.storage.local import LocalBackend, list_checkpoints


def _candidates(root: Backend, step: int | None) -> list[CommittedCheckpoint]:
    committed = _listed(root)
    if step is None:
        return committed[::-1]
    chosen = [c for c in committed if c.step == step]
    if not chosen:
        have = [c.step for c in committed]
        raise CheckpointNotFoundError(
            f"no checkpoint for step {step} in {root.location} (committed steps: {have[-10:]})"
        )
    return chosen


def _listed(root: Backend) -> list[CommittedCheckpoint]:
    if isinstance(root, LocalBackend):
        return list_checkpoints(root.root)  # a plain file named as a root says so
    return published_checkpoints(root)


# How often a reader of a live root lists it again after the checkpoint it was reading vanished
# (pruned by the writer's retention): each round starts from the newest checkpoint again.
_RELIST_ROUNDS = 64


def _check_root(root: Backend) -> None:
    if not isinstance(root, LocalBackend):
        return  # an object store has no directories: an empty prefix is a root with no checkpoint
    if not root.root.exists():
        raise CheckpointNotFoundError(f"checkpoint root {root.root} does not exist")
    if not root.root.is_dir():
        raise CheckpointNotFoundError(f"checkpoint root {root.root} is not a directory")


def open_target(
    path: str | os.PathLike | Backend, storage_options: dict[str, Any] | None = None
) -> tuple[Backend, str | None]:
    """The root a reader was pointed at, and the checkpoint in it when it was pointed at one.

    A local directory holding ``manifest.json`` (or a ``step-N`` directory holding manifest
    generations) is one checkpoint; so is a URL whose last part is ``step-N``. Anything else is a
    root.

    Args:
        path: A local path, a URL (``s3://bucket/prefix``) or a Backend.
        storage_options: Options for an object store's client (credentials, endpoint, timeouts).

    Returns:
        The root's backend, and the checkpoint directory's name or None for a whole root.

    Raises:
        CheckpointError: No backend for the URL's scheme, or the store cannot be reached.
    """
    if isinstance(path, Backend):
        return path, None
    text = os.fspath(path)
    if is_object_store_url(text):
        head, _, last = text.rstrip("/").rpartition("/")
        if parse_step_dir(last) is not None and "://" in head:
            return open_backend(head, storage_options=storage_options), last
        return open_backend(text, storage_options=storage_options), None
    backend = open_backend(text, storage_options=storage_options)
    assert isinstance(backend, LocalBackend)
    local = backend.root
    if (local / MANIFEST_NAME).exists():
        return LocalBackend(local.parent), local.name
    if parse_step_dir(local.name) is not None and local.is_dir() and _has_generation(local):
        return LocalBackend(local.parent), local.name
    return backend, None


def _has_generation(directory: Path) -> bool:
    try:
        return any(parse_manifest_generation(p.name) is not None for p in directory.iterdir())
    except OSError:
        return False


# What one checkpoint's read may fail with (damage, a hostile manifest, memory, a file error, a
# decoding error); anything else is a bug and propagates instead of hiding behind a fallback.
_ONE_CHECKPOINT_FAILURES = (CheckpointError, OSError, MemoryError, ValueError)


def _newest_valid(
    root: Backend,
    step: int | None,
    read: Callable[[CheckpointRef, DirIdentity], Any],
    final: tuple[type[Exception], ...] = (),
) -> tuple[CheckpointRef, Any] | None:
    """``read(ref, identity)`` of the newest checkpoint it succeeds on (or exactly ``step``); warn
    about each one that fails. Any failure of one checkpoint (damage, a hostile manifest, memory)
    falls back to the next older one, except the ``final`` errors; a checkpoint deleted or replaced
    since the root was listed (retention or a re-save on a live root) is not a failure: the root is
    listed again and the newest one tried."""
    _check_root(root)
    failed: dict[int, str] = {}
    for _ in range(_RELIST_ROUNDS):
        candidates = [c for c in _candidates(root, step) if c.step not in failed]
        if not candidates and not failed:
            return None
        vanished = False
        for candidate in candidates:
            try:
                identity = directory_identity(candidate.ref)  # once: every read of it is held to it
                if identity is None:
                    raise CheckpointGoneError(f"{candidate.ref} was deleted since the root was listed")
                return candidate.ref, read(candidate.ref, identity)
            except CheckpointGoneError:
                vanished = True
                break
            except _ONE_CHECKPOINT_FAILURES as exc:
                if step is not None or isinstance(exc, final):
                    raise
                reason = str(exc) if isinstance(exc, CheckpointError) else f"{type(exc).__name__}: {exc}"
                failed[candidate.step] = f"step {candidate.step}: {reason}"
                what = "cannot be read" if isinstance(exc, ManifestTooLargeError) else "is damaged or cannot be read"
                warnings.warn(
                    f"asyncckpt: checkpoint {candidate.ref} {what} ({reason}); falling back to the next older one",
                    stacklevel=4,
                )
        if not vanished:
            break
    else:
        raise CheckpointNotFoundError(
            f"every checkpoint of {root.location} was deleted while it was being read, {_RELIST_ROUNDS} times over"
        )
    if not failed:
        return None
    raise CheckpointDamagedError(f"no valid checkpoint in {root.location}: " + "; ".join(failed.values()))


def read_newest_valid(
    root: str | os.PathLike | Backend, step: int | None, workers: int, mmap: bool = False
) -> LoadedCheckpoint | None:
    """Read the newest checkpoint of a root that verifies (or exactly ``step``), warning about each
    damaged one skipped.

    Args:
        root: the checkpoint root: a local path, a URL or its Backend.
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
    backend = root if isinstance(root, Backend) else open_target(root)[0]
    found = _newest_valid(
        backend, step, lambda ref, identity: read_checkpoint(ref, workers, mmap=mmap, identity=identity)
    )
    return None if found is None else found[1]


def load(
    path: str | os.PathLike,
    step: int | None = None,
    map_location: str | torch.device = "cpu",
    *,
    mmap: bool = False,
    storage_options: dict[str, Any] | None = None,
    mirror: str | os.PathLike | None = None,
    mirror_options: dict[str, Any] | None = None,
    per_rank: str = "error",
) -> Any:
    """Load a checkpoint as a plain nested tree (stateful objects become their state dicts).

    A checkpoint saved by several ranks loads consolidated: every sharded or replicated tensor
    whole. State each rank kept of its own (``RNGState``, a sampler's position) has no owner in
    one process: unless every rank saved equal values, ``per_rank`` must say whose to take.

    The tensors are read into memory of their own, every chunk verified first. ``mmap=True`` maps a
    raw (``compression=None``) checkpoint's data file instead: zero-copy, but the tensors then
    follow the file (see the README).

    Args:
        path: a checkpoint root (its newest valid checkpoint is read, damaged ones skipped with a
            warning) or one checkpoint directory: a local path or a URL (``s3://bucket/prefix``).
        step: read exactly this step of the root instead of the newest.
        map_location: the device the tensors are moved to.
        mmap: map the data file of a raw checkpoint instead of reading it.
        storage_options: options for an object store's client (credentials, endpoint, timeouts);
            by default they come from the environment.
        mirror: the root's mirror (``CheckpointManager(mirror=...)``): a step the root lacks, or
            cannot read, is read from there (with a warning).
        mirror_options: the mirror's client options, as ``storage_options`` are the root's (as
            ``CheckpointManager(mirror_options=...)``); by default from the environment.
        per_rank: for a checkpoint of several ranks whose per-rank state differs: ``"error"`` (the
            default: a CheckpointError naming that state), ``"rank0"`` or ``"same"`` (rank 0's,
            the rank of this one process).

    Returns:
        The saved state: dicts, lists, tuples, tensors, numpy arrays and plain values, each saved
        object (module, optimizer...) as its state dict.

    Raises:
        CheckpointNotFoundError: ``path`` holds no checkpoint, or none of ``step``.
        CheckpointDamagedError: the checkpoint (every checkpoint of a root) fails verification.
        CheckpointError: the checkpoint cannot be read.
    """
    root, single = open_target(path, storage_options)
    if single is not None and step is not None:  # a step asked of one checkpoint: its own, or an error
        own = read_manifest(CheckpointRef(root, single), rank_tables=False).step
        if own != step:
            raise CheckpointNotFoundError(
                f"{path} is the checkpoint of step {own}, not of step {step}: pass its root to choose a step"
            )
        step = None
    if single is not None:
        loaded = read_checkpoint(CheckpointRef(root, single), workers=os.cpu_count() or 1, mmap=mmap)
    elif mirror is not None:
        # opened now only to carry options: otherwise the tiers' reader opens it, and a mirror that
        # cannot be opened is warned about there while the local root is still read
        tier = open_backend(os.fspath(mirror), storage_options=mirror_options) if mirror_options else mirror
        shown = safe_location(os.fspath(mirror))  # a URL's user:password never reaches a message
        found = read_newest_valid_of_tiers(root, tier, step, os.cpu_count() or 1, shown)
        if found is None:
            raise CheckpointNotFoundError(f"no checkpoint in {path} or its mirror {shown}")
        loaded = found
    else:
        found = read_newest_valid(root, step, os.cpu_count() or 1, mmap)
        if found is None:
            raise CheckpointNotFoundError(f"no checkpoint in {path}")
        loaded = found
    check_per_rank(per_rank)
    if isinstance(loaded.manifest, MultiRankManifest) and loaded.manifest.world_size > 1:
        choose_table(loaded.manifest, 0, 1, per_rank, f"checkpoint step {loaded.manifest.step} ({loaded.path})")
    tensors = loaded.tensors
    if torch.device(map_location) != torch.device("cpu"):
        tensors = [t if t is None else t.to(map_location) for t in tensors]  # None: not in the tree
    return unflatten(loaded.manifest.tree, tensors)


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
    path: str | os.PathLike,
    model: torch.nn.Module,
    key: str = ...,
    strict: Literal[True] = ...,
    *,
    storage_options: dict[str, Any] | None = ...,
    per_rank: str = ...,
) -> int: ...
@overload
def load_weights(
    path: str | os.PathLike,
    model: torch.nn.Module,
    key: str,
    strict: Literal[False],
    *,
    storage_options: dict[str, Any] | None = ...,
    per_rank: str = ...,
) -> RestoreResult: ...
@overload
def load_weights(
    path: str | os.PathLike,
    model: torch.nn.Module,
    key: str = ...,
    *,
    strict: Literal[False],
    storage_options: dict[str, Any] | None = ...,
    per_rank: str = ...,
) -> RestoreResult: ...
@overload
def load_weights(
    path: str | os.PathLike,
    model: torch.nn.Module,
    key: str = ...,
    strict: bool = ...,
    *,
    storage_options: dict[str, Any] | None = ...,
    per_rank: str = ...,
) -> int | RestoreResult: ...
def load_weights(
    path: str | os.PathLike,
    model: torch.nn.Module,
    key: str = "model",
    strict: bool = True,
    *,
    storage_options: dict[str, Any] | None = None,
    per_rank: str = "error",
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
        storage_options: options for an object store's client, as for :func:`load`. Only the
            byte ranges of the chunks holding the model's weights are fetched.
        per_rank: for a checkpoint of several ranks whose model was saved per rank (neither
            DDP-wrapped nor sharded nor declared replicated): ``"error"`` (the default) or
            ``"rank0"``/``"same"`` (rank 0's). A DDP or FSDP2 model loads whole either way.

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
    root, single = open_target(path, storage_options)

    def read(candidate: CheckpointRef, identity: DirIdentity | None) -> tuple[Manifest, dict, LoadedCheckpoint]:
        # one identity for both reads: a step replaced between them is gone, not damaged
        manifest = read_manifest(candidate, identity=identity)
        node = skeleton.subtree(manifest.tree, key, str(candidate))
        wanted = skeleton.tensor_indices(node)
        return manifest, node, read_checkpoint(candidate, os.cpu_count() or 1, manifest, wanted, identity=identity)

    if single is not None:
        candidate = CheckpointRef(root, single)
        manifest, node, loaded = read(candidate, directory_identity(candidate))
    else:
        if isinstance(root, LocalBackend) and not root.root.is_dir():
            raise CheckpointNotFoundError(f"no checkpoint in {path}")
        found = _newest_valid(root, None, read, final=(skeleton.NoEntryError,))
        if found is None:
            raise CheckpointNotFoundError(f"no checkpoint in {path}")
        candidate, (manifest, node, loaded) = found
    check_per_rank(per_rank)
    if isinstance(manifest, MultiRankManifest) and manifest.world_size > 1 and per_rank == "error":
        own = [i for i in skeleton.tensor_indices(node) if i < manifest.local_count]
        if own:
            raise CheckpointError(
                f"{candidate}[{key!r}] was saved by each of its {manifest.world_size} ranks on its own "
                "(neither DDP-wrapped nor sharded nor declared replicated): pass per_rank='rank0' to load "
                "rank 0's weights"
            )
    return _load_model(model, node, loaded.tensors, strict, f"{candidate}[{key!r}]", manifest.step)


def _load_model(
    model: torch.nn.Module, node: dict, tensors: list, strict: bool, where: str, step: int
) -> int | RestoreResult:
    bare = unwrap_module(model)  # a compiled or DDP-wrapped model's keys are its bare module's
    plan = check_module(bare, node, tensors, strict=strict, where=f"{where} for {type(model).__name__}")
    try:
        load_module(bare, node, tensors, plan)
    except Exception as exc:
        raise CheckpointError(f"{where} does not fit {type(model).__name__}: {exc}") from exc
    return step if strict else plan.result(step)


def _tier_steps(root: str | os.PathLike | Backend) -> set[int]:
    """The committed steps of one tier's root; none when it does not exist."""
    backend = root if isinstance(root, Backend) else open_target(root)[0]
    if isinstance(backend, LocalBackend) and not backend.root.is_dir():
        return set()
    return {c.step for c in _listed(backend)}


def _mirror_steps(mirror: str | os.PathLike | Backend, mirror_name: str) -> tuple[set[int], str | None]:
    """The mirror's committed steps, or none and why it cannot be listed."""
    try:
        return _tier_steps(mirror), None
    except (CheckpointError, OSError) as exc:
        reason = str(exc)
        if not isinstance(mirror, Backend):  # the error may quote the location as given, credentials and all
            reason = reason.replace(os.fspath(mirror), mirror_name).replace(urlparse(os.fspath(mirror)).netloc, "")
        return set(), reason


def _local_only(mine: set[int], step: int | None, unlisted: str, local_name: str, mirror_name: str) -> None:
    """Go on with the local root alone, warned, when it holds what is asked for (it leads its
    mirror); else raise: with the mirror unlisted, "no checkpoint" would be a guess, and a job
    that took it would start over while its checkpoints sit in the mirror.

    Raises:
        CheckpointError: The local root holds no checkpoint (``step`` None) or not ``step``.
    """
    if (not mine) if step is None else (step not in mine):
        lacks = "holds no checkpoint" if step is None else f"has no step {step}"
        raise CheckpointError(
            f"the mirror {mirror_name} cannot be listed ({unlisted}) and the local root {local_name} {lacks}: "
            "whether the mirror holds one is unknown, so nothing was read; try again once the store answers"
        )
    warnings.warn(
        f"asyncckpt: the mirror {mirror_name} cannot be listed ({unlisted}); reading the local root only",
        stacklevel=4,
    )


def read_newest_valid_of_tiers(
    local: str | os.PathLike | Backend,
    mirror: str | os.PathLike | Backend,
    step: int | None,
    workers: int,
    mirror_name: str,
) -> LoadedCheckpoint | None:
    """Read the newest checkpoint (or exactly ``step``) that verifies in a local root or its mirror.

    Steps are tried newest first, each from the local root first, then from the mirror: a local
    root that is empty, deleted or whose newest checkpoint is damaged restores from the mirror.
    Each checkpoint skipped, and a checkpoint read from the mirror, is said in a warning.

    Args:
        local: The local root: a path or its Backend (it may not exist: a node that lost its disk).
        mirror: The mirror root: a path, a URL or its Backend.
        step: The step to read, or None for the newest valid one.
        workers: Threads reading chunks.
        mirror_name: The mirror's location, for messages (free of credentials).

    Returns:
        The checkpoint read and verified, or None when neither tier holds a checkpoint.

    Raises:
        CheckpointNotFoundError: Neither tier holds ``step``.
        CheckpointDamagedError: Every checkpoint tried failed (each one's reason listed).
        CheckpointError: The mirror cannot be listed and the local root lacks what is asked for.
    """
    local_name = local.location if isinstance(local, Backend) else os.fspath(local)
    failed: dict[tuple[int, str], str] = {}
    for _ in range(_RELIST_ROUNDS):
        mine, (theirs, unlisted) = _tier_steps(local), _mirror_steps(mirror, mirror_name)
        if unlisted is not None:
            _local_only(mine, step, unlisted, local_name, mirror_name)
        if step is not None and step not in mine | theirs:
            raise CheckpointNotFoundError(f"no checkpoint for step {step} in {local_name} or its mirror {mirror_name}")
        vanished = False
        for candidate in sorted(mine | theirs, reverse=True) if step is None else [step]:
            for tier, root, steps in (("local root", local, mine), ("mirror", mirror, theirs)):
                if candidate not in steps or (candidate, tier) in failed:
                    continue
                try:
                    loaded = read_newest_valid(root, candidate, workers)
                except CheckpointNotFoundError:
                    if step is not None:
                        raise
                    # deleted since the tiers were listed (a live writer's retention, its mirror's):
                    # no failure; both are listed again and the newest tried
                    vanished = True
                    break
                except _ONE_CHECKPOINT_FAILURES as exc:
                    failed[candidate, tier] = f"step {candidate} ({tier}): {exc}"
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
                        f"the local root {local_name} {why}",
                        stacklevel=3,
                    )
                return loaded
            if vanished:
                break
        if not vanished:
            break
    else:
        raise CheckpointNotFoundError(
            f"every checkpoint of {local_name} and its mirror was deleted while it was being read, "
            f"{_RELIST_ROUNDS} times over"
        )
    if not failed:
        return None
    what = f"step {step}" if step is not None else "no checkpoint"
    reasons = "; ".join(failed.values())
    raise CheckpointDamagedError(f"{what} of {local_name} or its mirror {mirror_name} verifies: " + reasons)
