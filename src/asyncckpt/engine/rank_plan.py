"""A manager on one rank of a multi-rank job: joining the job, opening the shared root, planning a save.

Rank 0 owns the root: it takes the writer lock (or lease), sweeps what crashed saves left, publishes
and applies retention. The other ranks open the root without a lock and only ever write their own
data files and rank tables into a save's staging place. Every rank plans each save on its own
thread (``flatten_rank``) and the ranks confirm the plan with one tiny collective
(:meth:`RankGroup.agree`), which also gives them the save's attempt token; the writer waits for
it, not ``save``.
"""

from __future__ import annotations

import os
from typing import Any

from asyncckpt.engine.admission import SavePlanner
from asyncckpt.engine.pipeline import RankSave
from asyncckpt.engine.ranks import RankGroup
from asyncckpt.errors import CheckpointError
from asyncckpt.state.shards import RankFlatState, RankInfo, dtensor_type, flatten_rank
from asyncckpt.storage.backend import Backend, open_backend
from asyncckpt.storage.commit import CommitProtocol, choose_protocol, open_storage


def join_ranks(process_group: Any, timeout: float) -> RankGroup | None:
    """This process's rank group: of ``process_group``, else of the default group when
    torch.distributed is initialized; None for a process on its own (no group)."""
    if process_group is None:
        try:
            import torch.distributed as dist
        except ImportError:
            return None
        if not dist.is_available() or not dist.is_initialized():
            return None
    return RankGroup(process_group, timeout)


def open_rank_storage(
    root: str | os.PathLike | Backend, storage_options: dict | None, ranks: RankGroup | None
) -> CommitProtocol:
    """The root's commit protocol: locked and swept on rank 0 (or a process on its own), opened
    without a lock on the other ranks once rank 0 has it (so no rank writes before the sweep).

    Raises:
        RootInUseError, CheckpointError: As ``open_storage``, on rank 0; on the others, rank 0
            could not open the root; on every rank, a rank late to or gone from the ranks' vote
            (rank 0 then lets the root go).
    """
    if ranks is None:
        return open_storage(root, storage_options)
    protocol: CommitProtocol | None = None
    failure: BaseException | None = None
    try:
        if ranks.rank == 0:
            protocol = open_storage(root, storage_options)
        else:
            protocol = choose_protocol(open_backend(root, storage_options=storage_options))
    except BaseException as exc:  # noqa: BLE001 - every rank must take part in the vote below
        failure = exc
    vote_error: BaseException | None = None
    try:
        everyone = ranks.all_ok(failure is None, "open the checkpoint root together")
    except BaseException as exc:  # a rank late or gone: the manager fails on every rank, the root let go
        everyone, vote_error = False, exc
    if not everyone:
        if protocol is not None:
            protocol.close()
        ranks.close()
        if failure is not None:
            raise failure  # this rank's own failure says more than the vote's
        if vote_error is not None:
            raise vote_error
        raise CheckpointError(f"another rank could not open the checkpoint root {root} (it says why)")
    assert protocol is not None
    return protocol


class RankPlanner(SavePlanner):
    """Plans one rank's part of each save and agrees on it with the other ranks."""

    def __init__(self, ranks: RankGroup, replicated: tuple[str, ...]) -> None:
        super().__init__()
        self._ranks = ranks
        self._me = RankInfo(ranks.rank, ranks.world_size)
        self._replicated = replicated
        self.turns = 0
        dtensor_type()  # imported now, not in the first save's stall

    def refuse(self, step: int) -> None:
        self.turns += 1
        try:  # taken part in even when this rank's save cannot be made: no rank waits for its vote
            self._ranks.refuse(step)
        except CheckpointError:
            pass  # this rank's own error says more

    def flatten(self, state: Any) -> RankFlatState:
        return flatten_rank(state, self._me, self._replicated, self.nodes)

    def plan(self, state: Any, step: int) -> tuple[RankFlatState, RankSave]:
        try:
            flat = self.flatten(state)
        except BaseException:
            self.refuse(step)
            raise
        self.turns += 1
        agreement = self._ranks.agree(step, flat.fingerprint, failed=False)
        return flat, RankSave(self._ranks, agreement, flat.globals, flat.pieces, flat.rows_parts)
