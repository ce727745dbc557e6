"""Restore on every rank of a multi-rank job, at the same or another world size and sharding.

Each rank reads only what it needs: the manifest and rank tables, its own per-rank tensors, and
for each global tensor the box the live state holds (a DTensor's local shard, or the whole tensor
for a replicated plain one), decoded from the pieces overlapping it. The ranks agree, with tiny
collectives on the checkpoint group, on which step they read and on whether every rank's read and
check succeeded, before any rank changes its state: either every rank restores the same step, or
none changes anything.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from asyncckpt.engine.pieces import Box, read_boxes, whole
from asyncckpt.engine.ranks import RankGroup
from asyncckpt.engine.reader import _read_checkpoint, directory_identity, read_manifest
from asyncckpt.errors import CheckpointDamagedError, CheckpointError, CheckpointNotFoundError, StateMismatchError
from asyncckpt.format import MultiRankManifest, RankTable, per_rank_differences, rewrite_globals
from asyncckpt.state import skeleton
from asyncckpt.state.shards import RankInfo, dtensor_box, flatten_rank, is_dtensor
from asyncckpt.state.tree import RestoreResult, check_compatible, restore_into
from asyncckpt.storage.backend import Backend, CheckpointRef
from asyncckpt.storage.commit import published_checkpoints

PER_RANK_CHOICES = ("error", "same", "rank0")


def check_per_rank(per_rank: Any) -> str:
    """Refuse a per-rank choice that is not one of :data:`PER_RANK_CHOICES`."""
    if per_rank not in PER_RANK_CHOICES:
        raise ValueError(f"per_rank must be one of {PER_RANK_CHOICES}, got {per_rank!r}")
    return per_rank


def choose_table(view: MultiRankManifest, rank: int, world_size: int, per_rank: str, where: str) -> RankTable:
    """The rank table whose per-rank state rank ``rank`` of ``world_size`` restores.

    The same world size restores each rank's own. Another one needs the ranks' own state to be
    equal (values only, no per-rank tensors), or the explicit choice ``per_rank``: ``"same"``
    (the same rank's, where it exists) or ``"rank0"`` (rank 0's for every rank).

    Raises:
        CheckpointError: The choice is "error" (the default) and the ranks' own states differ, or
            "same" and the checkpoint has no such rank.
    """
    assert view.tables is not None
    if view.world_size == world_size:
        return view.tables[rank]
    differ = per_rank_differences(view)
    if not differ or per_rank == "rank0":
        return view.tables[0]
    if per_rank == "same":
        if rank < view.world_size:
            return view.tables[rank]
        raise CheckpointError(
            f"{where} was saved by {view.world_size} ranks: it holds no per-rank state for rank {rank} "
            "(per_rank='same'); pass per_rank='rank0' to give every rank rank 0's"
        )
    shown = ", ".join(differ[:5]) + (f" and {len(differ) - 5} more" if len(differ) > 5 else "")
    raise CheckpointError(
        f"{where} was saved by {view.world_size} ranks and is read by {world_size}: its per-rank state "
        f"({shown}) has no owner at this world size. Pass per_rank='same' (each rank takes the same "
        "rank's, where it exists) or per_rank='rank0' (every rank takes rank 0's)"
    )


class _Targets:
    """What the live state holds at each global tensor's path: a DTensor (read its local box) or a
    plain tensor (read it whole); an optimizer state entry not created yet follows its parameter."""

    def __init__(self, state: Any, me: RankInfo, replicated: Any) -> None:
        flat = flatten_rank(state, me, replicated)
        self.by_path = {path: t for path, t in zip(flat.global_paths, flat.live, strict=True)}
        self.entries = flat.optimizer_entries

    def of(self, path: str, shape: tuple[int, ...]) -> Any:
        found = self._at(path, shape)
        for legacy in ("['_orig_mod.", "['_orig_mod.module."):  # a compiled model's keys as earlier versions saved them
            if found is None and legacy in path:
                found = self._at(path.replace(legacy, "['"), shape)
        return found

    def _at(self, path: str, shape: tuple[int, ...]) -> Any:
        live = self.by_path.get(path)
        if live is not None:
            return live
        end = path.find("]")
        while end >= 0:  # an optimizer state entry's path, by name or by position, is a prefix
            param = self.entries.get(path[: end + 1])
            if param is not None:
                return param if is_dtensor(param) and tuple(param.shape) == shape else None
            end = path.find("]", end + 1)
        return None


def _read_for_rank(
    ref: CheckpointRef, view: MultiRankManifest, table: RankTable, targets: _Targets, workers: int
) -> tuple[dict, list[torch.Tensor]]:
    """The tree this rank restores and its tensors: the table's own, then one per global tensor
    (a DTensor shaped like the live one, or a whole tensor); globals not in the tree stay empty."""
    from torch.distributed.tensor import DTensor

    own_indices = skeleton.tensor_indices(table.tree)
    own = _read_checkpoint(ref, workers, table, own_indices, False, None).tensors if own_indices else []
    tensors: list[Any] = list(own) + [None] * len(view.globals)
    wanted: list[tuple[int, Box, Any]] = []
    for visit in skeleton.walk(table.tree):
        if visit.kind != skeleton.Kind.GLOBAL:
            continue
        g = visit.node[visit.kind]
        target = targets.of(visit.path, view.globals[g].shape)
        if is_dtensor(target) and tuple(target.shape) == view.globals[g].shape:
            offsets, shape = dtensor_box(target)
            wanted.append((g, Box(g, offsets, shape), target))
        else:
            wanted.append((g, whole(view, g), None))
    seen: set[int] = set()
    unique = [(g, box, t) for g, box, t in wanted if not (g in seen or seen.add(g))]  # type: ignore[func-returns-value]
    read, _ = read_boxes(ref, view, [box for _, box, _ in unique], workers)
    for (g, _, target), tensor in zip(unique, read, strict=True):
        if target is not None:
            tensor = DTensor.from_local(
                tensor.to(target.to_local().device),
                target.device_mesh,
                target.placements,
                run_check=False,
                shape=target.shape,
                stride=target.stride(),
            )
        tensors[len(own) + g] = tensor
    return rewrite_globals(table.tree, len(own)), tensors


def restore_ranks(
    state: Any,
    backend: Backend,
    group: RankGroup,
    step: int | None,
    *,
    strict: bool,
    per_rank: str,
    replicated: Any,
    workers: int,
) -> int | RestoreResult | None:
    """``CheckpointManager.restore`` on every rank of a multi-rank job (see the module docstring).

    Returns:
        As ``restore``: the step (strict), a RestoreResult, or None when the root holds none.

    Raises:
        StateMismatchError: This rank's state does not fit the checkpoint; CheckpointError: another
            rank's does not, or no checkpoint verifies on every rank.
    """
    me = RankInfo(group.rank, group.world_size)
    failed: dict[int, str] = {}

    def newest_listed() -> int:
        return max((s for s in listed if s not in failed and (step is None or s == step)), default=-1)

    # one round for all: every rank planned (1 where it could not), the newest step any lists, and
    # the step each asked for (-1: the newest), as its largest and its smallest
    asked = -1 if step is None else step
    try:  # every rank takes part in the vote below, whatever fails here
        listed = {c.step: c for c in published_checkpoints(backend)}
        targets = _Targets(state, me, replicated)
    except BaseException as exc:
        group.all_max_each([1, -1, asked, -asked], "plan the restore together")
        raise exc
    cannot_plan, candidate, highest, lowest = group.all_max_each(
        [0, newest_listed(), asked, -asked], "plan the restore together"
    )
    if cannot_plan:
        raise CheckpointError("another rank could not list the root or plan its restore (it says why); nothing changed")
    if highest != -lowest:

        def named(s: int) -> str:
            return "the newest" if s < 0 else f"step {s}"

        raise CheckpointError(
            f"the ranks asked to restore different steps ({named(-lowest)} and {named(highest)}, at least): every "
            "rank must pass the same step to restore; nothing changed"
        )
    if step is not None and candidate < 0:
        raise CheckpointNotFoundError(f"no checkpoint for step {step} in {backend.location}")
    while True:
        if candidate < 0:
            if not failed:
                return None if strict else RestoreResult(None)
            raise CheckpointDamagedError(f"no valid checkpoint in {backend.location}: " + "; ".join(failed.values()))
        ref = CheckpointRef(backend, f"step-{candidate:012d}")
        where = f"checkpoint step {candidate} ({ref})"
        error: BaseException | None = None
        mismatch: BaseException | None = None
        try:
            if directory_identity(ref) is None:
                raise CheckpointNotFoundError(f"{ref} is not on this rank's view of the root")
            view = read_manifest(ref)
            if not isinstance(view, MultiRankManifest):
                tree, tensors = view.tree, _read_checkpoint(ref, workers, view, None, False, None).tensors
            else:
                try:
                    table = choose_table(view, me.rank, me.world_size, per_rank, where)
                except CheckpointError as exc:
                    mismatch = exc
                    raise
                tree, tensors = _read_for_rank(ref, view, table, targets, workers)
            try:
                plan = check_compatible(state, tree, tensors, strict=strict, where=where)
            except (StateMismatchError, CheckpointError) as exc:
                mismatch = exc
                raise
        except (CheckpointError, OSError, MemoryError, ValueError) as exc:
            error = exc
        except Exception as exc:  # noqa: BLE001 - anything else (a bug, torch refusing): every rank must still vote
            error = mismatch = exc
        misfit, unread = group.all_max_each(
            [int(mismatch is not None), int(error is not None and mismatch is None)],
            "check the checkpoint to restore fits and was read on every rank",
        )
        fits, readable = not misfit, not unread
        if not fits:
            if mismatch is not None:
                raise mismatch
            raise CheckpointError(
                f"{where}: another rank's state does not fit it, or it failed to read it (that rank says why); "
                "nothing changed"
            )
        if not readable or error is not None:
            reason = str(error) if error is not None else "another rank could not read it"
            failed[candidate] = f"step {candidate}: {reason}"
            if step is not None:
                raise CheckpointDamagedError(f"{where} cannot be read on every rank: {reason}")
            warnings.warn(
                f"asyncckpt: {where} cannot be read on every rank ({reason}); falling back to the next older one",
                stacklevel=3,
            )
            candidate = group.all_max(newest_listed(), "choose the checkpoint to restore")
            continue
        if restore_into(state, tree, tensors, plan) is not state:
            raise CheckpointError("unreachable: the root was checked to be updatable in place")
        return candidate if strict else plan.result(candidate)
