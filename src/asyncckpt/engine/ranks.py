"""The ranks of a multi-rank job agreeing on a save and committing it together.

Two rules learned from other checkpointers' failures shape this module:

* **Collectives only on the calling thread, on a group of our own.** Planning a save is one
  ``all_reduce`` of a few integers over a gloo group made for checkpoints only
  (:meth:`RankGroup.agree`), issued on the training thread inside ``save``: background threads
  never issue collectives, so they can never collide with training's. ``save`` does not wait for
  it: the writer thread does (:class:`Agreement`), before it writes anything, so a rank's stall
  never includes the other ranks' planning.
* **Votes through the c10d store, on a connection of our own.** Each rank's writer thread, once
  its data and rank table are durable, sets its vote in the store; rank 0's writer waits for
  every vote, publishes, and sets the outcome, which the other writers wait for. A ``wait`` on the
  store client training shares would block training's own store calls, so the store is cloned.

A rank that comes late to a collective never breaks the group. Each collective is issued with a
long gloo timeout (:data:`LATE_LIMIT`) and waited for with ``timeout`` of our own: a rank that gives
up raises, and leaves its part in flight, where the late rank's call of the same collective, in the
same order on every rank, completes it. For every collective the ranks also settle, in the store,
whether it was given up (:meth:`RankGroup.decide`), so a late rank fails where the others did: it
never writes a save the others abandoned, never goes on with a restore the others gave up, and the
next collective finds the ranks in step again. (A gloo timeout closes the group's
connections for good: every later save of the process would fail.)

A rank that fails votes "failed" with its reason; one that dies never votes, and rank 0 stops
waiting after ``timeout`` seconds. Either way nothing is published and every surviving rank's save
fails with an error naming the rank and the cause; rank 0 dying leaves the others waiting for the
outcome just as long, never longer.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from asyncckpt.errors import CheckpointError

_POLL_S = 0.005
_FIRST_POLL_S = 0.0005  # waiting for a collective: polls from this, doubling up to _POLL_S
# How late a rank may come to a collective before gloo gives up on it and closes the group's
# connections (every later save then fails until a restart): waits for a late rank end after
# ``timeout`` (ours), so this only bounds how long a part given up on stays in flight.
LATE_LIMIT = timedelta(hours=24)
# The checkpoint-only gloo group of each set of ranks, made once per process and kept (with the
# default store it was made on: a job that starts torch.distributed anew gets a new one). Made by
# this module, not by ``new_group``: torch names a group made by its members only after how many
# groups the process knows, which differs between ranks that belong to different groups (a
# subgroup of the training's), and ranks whose names differ wait for each other in vain. Each is
# named by its ranks, its exact timeout and its generation: how many groups of that name this rank
# made on that store (counted in the store, so a process that started torch.distributed anew
# counts from 0 on a new store, as a new process does), so ranks that make them in step meet.
#
# Each also counts the collectives this process issued on it, whichever manager issued them. gloo
# pairs the ranks' collectives by the order they are issued, so the n-th of one rank completes with
# the n-th of every other: n names the collective in the store (RankGroup.decide). Every collective
# also carries its kind, so ranks whose calls pair out of step (one gave up waiting for a
# collective, then went on without the ones after it that a late rank still makes) raise instead of
# mixing values; and has the same size, so such a pairing is never gloo's size mismatch (which
# aborts).


@dataclass
class _Group:
    """A checkpoint group this process made: the gloo group, the store it was made on, its name,
    and how many collectives this process issued on it (the next one's number)."""

    gloo: Any
    store: Any
    name: str
    issued: int = 0


_GROUPS: dict[tuple[tuple[int, ...] | None, float], _Group] = {}  # by (ranks, timeout)
# Groups dropped from _GROUPS when opening a manager on them failed (on every rank, as opening
# fails): the next manager makes a new generation on every rank, so ranks meet again even when one
# rank's end of the old group is gone (it failed to make it after the others made theirs). Kept,
# never destroyed: gloo's destructor waits for the collectives in flight, and one given up on is
# completed only by a late rank, if ever.
_RETIRED: list[_Group] = []
_AGREE, _OPEN, _ALL_OK, _ALL_MAX, _ALL_MAX_EACH = 1, 2, 3, 4, 5  # a collective's kind
_WIDTH = 6  # values a collective carries (an agreement's six), after its kind


@dataclass(frozen=True)
class Vote:
    """What one rank reports once its part of a save is durable (or failed)."""

    rank: int
    ok: bool
    error: str = ""
    table: str = ""  # its rank table's name
    data: str = ""  # its data file's name
    crc32: int = 0  # its rank table's seal
    stored_bytes: int = 0
    raw_bytes: int = 0
    stall_s: float = 0.0

    def encode(self) -> bytes:
        return json.dumps(self.__dict__).encode()

    @classmethod
    def decode(cls, raw: bytes, rank: int) -> Vote:
        try:
            fields = json.loads(raw)
            vote = cls(**fields)
        except (ValueError, TypeError) as exc:
            return cls(rank, False, f"its vote is unreadable ({exc})")
        return vote if vote.rank == rank else cls(rank, False, "its vote names another rank")


_GIVEN_UP, _AGREED = "given up", "agreed"  # a collective, as the ranks settle it
# Keys of each numbered kind kept in the store (settled collectives, save outcomes, policy targets):
# a long run must not grow the store's memory with every save, and no rank lags this far behind.
KEPT_IN_STORE = 1024
_SPARE_CONNECTIONS = 2  # store connections made with a group for its manager (the policy's two)


def forget(store: Any, keys: list[str]) -> bool:
    """Delete ``keys`` from ``store``: whether it answered. Housekeeping that never fails the
    caller, whose own work (an outcome announced, a collective settled) is done by then: a store
    that does not answer leaves a few small keys behind, no more."""
    try:
        for key in keys:
            store.delete_key(key)
    except Exception:  # noqa: BLE001 - a lost connection; the caller's next store call reports it
        return False
    return True


def _completed_by(work: Any, deadline: float) -> bool:
    """Whether ``work`` completed (or failed) by ``deadline`` (``time.monotonic()``): polled, since
    gloo's own timeout would close the group's connections."""
    pause = _FIRST_POLL_S
    while not work.is_completed():
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(pause, left))
        pause = min(2 * pause, _POLL_S)
    return True


def _collective_error(group: RankGroup, what: str, exc: Exception) -> CheckpointError:
    return CheckpointError(
        f"rank {group.rank} could not {what} with the other {group.world_size - 1} ranks "
        f"(one died or did not answer within {group.timeout:g} s?): {type(exc).__name__}: {exc}"
    )


class Agreement:
    """One save's agreement of the ranks, issued by ``RankGroup.agree`` on the calling thread and
    settled by the writer thread, before it writes anything (:meth:`attempt`)."""

    def __init__(self, group: RankGroup, step: int, number: int, data: torch.Tensor, work: Any) -> None:
        self._group = group
        self._step = step
        self.number = number
        self._data = data
        self._work = work
        self._deadline = time.monotonic() + group.timeout
        self._attempt: str | None = None
        self._error: CheckpointError | None = None

    def attempt(self) -> str:
        """The save's attempt token (rank 0's, 16 hex digits), once every rank agreed; waits for
        the collective at most the group's timeout.

        Raises:
            CheckpointError: A rank could not plan its save, the ranks save different steps or
                states, or a rank did not take part in time. Nothing of the save may be written.
        """
        if self._attempt is None and self._error is None:
            self._settle()
        if self._error is not None:
            raise self._error
        assert self._attempt is not None
        return self._attempt

    def _settle(self) -> None:
        step, group = self._step, self._group
        what = f"agree on saving step {step}"
        timed_out = CheckpointError(
            f"rank {group.rank} could not {what}: a rank did not take part within {group.timeout:g} s "
            "(late, or hung); nothing is saved"
        )
        try:
            values = group.settle(
                self.number, self._data, self._work, self._deadline, what, timed_out, "nothing is saved"
            )
        except CheckpointError as exc:
            self._error = exc
            return
        high, low = values[0], -values[1]
        if values[5] > 0:
            self._error = CheckpointError(
                f"rank {values[5] - 1} could not plan its save of step {step} (a state or an argument it cannot "
                "save, or a step it had passed: its own error says which); nothing is saved"
            )
        elif high != low:
            self._error = CheckpointError(
                f"the ranks save different steps (from {low} to {high}): every rank must save the same steps; "
                "nothing is saved"
            )
        elif values[2] != -values[3]:
            self._error = CheckpointError(
                f"the ranks' states at step {step} differ in their sharded or replicated tensors (paths, dtypes, "
                "shapes or placements, or their order): every rank must save the same model and optimizer, in "
                "the same order; nothing is saved"
            )
        else:
            self._attempt = f"{values[4]:016x}"


class RankGroup:
    """This process's place in a multi-rank job, with the checkpoint-only group and store.

    Created by every rank of ``process_group`` (a collective: ``CheckpointManager`` is constructed
    on every rank), after ``torch.distributed.init_process_group``.

    Args:
        process_group: The ranks saving together (default: the default group).
        timeout: Seconds a rank waits for the others' votes, for the outcome of a save, and then
            for rank 0's word that its retention is done.
    """

    def __init__(self, process_group: Any = None, timeout: float = 300.0) -> None:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise CheckpointError("process_group given, but torch.distributed is not initialized")
        ranks = dist.get_process_group_ranks(process_group) if process_group is not None else None
        self.rank: int = dist.get_rank(process_group)
        self.world_size: int = dist.get_world_size(process_group)
        self.timeout = float(timeout)
        self._dist = dist
        # made on the job's store, so that every rank counts the group's generation even when its
        # own connection, made next, fails (a rank that did not count would never meet the others)
        self._made = self._checkpoint_group(ranks)
        self.group = self._made.gloo
        # every connection this manager uses is made now, before the opening collective: one that
        # fails later, on one rank only, would leave that rank's next manager out of step
        try:
            self._own_store, *self._spares = self._clone_store(1 + _SPARE_CONNECTIONS)
            unconnected: CheckpointError | None = None
        except CheckpointError as exc:  # still takes its part in the opening below, to stay in step
            self._own_store, self._spares, unconnected = None, [], exc
        # the collectives' decisions, by number: collectives are numbered per group, whatever
        # manager issued them, and the first (opening this manager) comes before the run's prefix;
        # a rank without a connection decides alone (it fails this manager whatever the others do)
        self._decisions = (
            None
            if self._own_store is None
            else dist.PrefixStore(f"asyncckpt/collectives/{self._made.name}/", self._own_store)
        )
        # rank 0: what the other ranks still read from the store when it is done (see ``close``)
        self._last_agreed = -1  # the number of the last collective settled as agreed
        # the last save attempt whose outcome rank 0 announced, and how many other ranks read it
        self._last_heard: tuple[str, int] | None = None
        self._voters = 0  # the other ranks whose vote rank 0 collected for the attempt it announces next
        token = secrets.randbits(62) if self.rank == 0 else 0
        opening = "open the checkpoint root together (every rank constructs the manager)"
        try:
            run, failed = self._all_reduce(_OPEN, [token, 0 if unconnected is None else self.rank + 1], opening)[:2]
        except CheckpointError:
            self._retire()
            if unconnected is not None:
                raise unconnected from None
            raise
        if unconnected is not None or failed:
            self._retire()
        if unconnected is not None:
            raise unconnected
        if failed:
            raise CheckpointError(f"rank {failed - 1} could not connect to the job's store, so no rank opens the root")
        self.run = f"{run:016x}"
        self.store = dist.PrefixStore(f"asyncckpt/{self.run}/", self._own_store)
        self._announced: deque[str] = deque()  # rank 0: the attempts it announced, oldest first

    def _checkpoint_group(self, ranks: list[int] | None) -> _Group:
        """This set of ranks' gloo group for checkpoints (see ``_GROUPS``): planning
        collectives never share a queue with training's (NCCL) collectives, and only the member
        ranks take part in making it, on the job's store under a name of ours.

        Raises:
            CheckpointError: The group could not be made (a rank did not come within ``timeout``).
        """
        key = (tuple(ranks) if ranks is not None else None, self.timeout)
        store = self._dist.distributed_c10d._get_default_store()
        made = _GROUPS.get(key)
        if made is not None and made.store is store:
            return made
        label = f"{'world' if ranks is None else '_'.join(map(str, ranks))}/{self.timeout!r}"  # exact
        what = "make the checkpoint group (every rank constructs the manager)"
        try:  # the store gone (rank 0 died), or a rank that does not come
            generation = store.add(f"asyncckpt/made/{label}/{self.rank}", 1) - 1
            name = f"{label}/{generation}"
            rendezvous = self._dist.PrefixStore(f"asyncckpt/group/{name}/", store)
            group = self._within_timeout(
                lambda: self._dist.ProcessGroupGloo(
                    rendezvous, self.rank, self.world_size, timedelta(seconds=self.timeout)
                )
            )
        except Exception as exc:  # noqa: BLE001 - the store and gloo raise RuntimeError subclasses
            raise _collective_error(self, what, exc) from exc
        _GROUPS[key] = made = _Group(group, store, name)
        return made

    def _within_timeout(self, make: Callable[[], Any]) -> Any:
        """``make()``, run on a thread of its own and given up on after ``timeout`` (it goes on,
        unused, in the background): gloo retries connecting to a rank that already gave up for
        several times its timeout, so a late rank would otherwise wait that long.

        Raises:
            TimeoutError: ``make`` did not return within ``timeout``.
        """
        done: list[Any] = []

        def run() -> None:
            try:
                done.append((make(), None))
            except Exception as exc:  # noqa: BLE001 - handed to the caller below
                done.append((None, exc))

        thread = threading.Thread(target=run, name="asyncckpt-group-connect", daemon=True)
        thread.start()
        thread.join(self.timeout)
        if not done:
            raise TimeoutError(f"no answer within {self.timeout:g} s")
        made, exc = done[0]
        if exc is not None:
            raise exc
        return made

    def _retire(self) -> None:
        """This manager's group, no longer handed to the next manager of these ranks (see
        ``_RETIRED``): its opening failed, so it fails on every rank, and every rank retires it."""
        for key, made in list(_GROUPS.items()):
            if made is self._made:
                del _GROUPS[key]
                _RETIRED.append(made)

    def _clone_store(self, count: int) -> list[Any]:
        """``count`` clients of the job's store of our own: a ``wait`` on one never blocks
        training's store calls, nor another connection's. Connecting is bounded by our ``timeout``:
        a clone connects with the job store's own timeout (30 minutes by default), so with the
        store's host gone a new manager would otherwise hang that long.

        Raises:
            CheckpointError: The store did not answer within ``timeout``, or refused a connection.
        """
        base = self._dist.distributed_c10d._get_default_store()
        if not hasattr(base, "clone"):  # a torch without Store.clone
            return [base] * count
        connected: list[Any] = []

        def connect() -> None:  # on a thread of its own: clone() cannot be given a deadline
            try:
                for _ in range(count):
                    connected.append(base.clone())
            except Exception as exc:  # noqa: BLE001 - handed to the caller below
                connected.append(exc)

        thread = threading.Thread(target=connect, name="asyncckpt-store-connect", daemon=True)
        thread.start()
        thread.join(self.timeout)
        clones = list(connected)  # a snapshot: the thread may still be connecting
        connected.clear()  # the clones made before a failure are not kept alive by its traceback
        failure = clones[-1] if clones and isinstance(clones[-1], Exception) else None
        if failure is not None and len(clones) == 1 and not isinstance(failure, self._dist.DistError):
            return [base] * count  # a store that cannot be cloned (not a TCPStore)
        if failure is not None:
            raise CheckpointError(f"rank {self.rank} could not connect to the job's store: {failure}") from failure
        if len(clones) < count:
            raise CheckpointError(
                f"rank {self.rank} could not connect to the job's store within {self.timeout:g} s (is its host gone?)"
            )
        return clones

    def connection(self, prefix: str = "") -> Any:
        """A store connection of our own (a clone of the job's store client, made with this
        group), under this group's run prefix plus ``prefix``: a ``wait`` on it never blocks
        training's store calls, nor another connection's.

        Raises:
            RuntimeError: More than :data:`_SPARE_CONNECTIONS` were asked for (a programming error:
                one made now could fail on this rank alone, out of step with the others).
        """
        if not self._spares:
            raise RuntimeError(f"a rank group holds {_SPARE_CONNECTIONS} spare store connections; all are taken")
        return self._dist.PrefixStore(f"asyncckpt/{self.run}/{prefix}", self._spares.pop())

    def agree(self, step: int, fingerprint: int, failed: bool) -> Agreement:
        """Start, on the calling thread, the check that every rank saves ``step`` of the same plan:
        one all_reduce of 6 integers, issued here and waited for by the writer (``Agreement.attempt``),
        so a save's stall never includes the other ranks' planning or the group's latency.

        Args:
            step: The step this rank saves.
            fingerprint: Its plan's fingerprint (``RankFlatState.fingerprint``).
            failed: This rank could not plan its save: every rank's save then fails.

        Raises:
            CheckpointError: The collective could not be issued (the group is gone).
        """
        token = secrets.randbits(62) if self.rank == 0 else 0
        values = [step, -step, fingerprint, -fingerprint, token, (self.rank + 1) if failed else 0]
        number, data, work = self._issue(_AGREE, values, f"agree on saving step {step}")
        return Agreement(self, step, number, data, work)

    def refuse(self, step: int) -> None:
        """This rank's turn in the agreement on saving ``step``, refused: every rank's save of it
        fails. This rank reads nothing of it from the store, so it counts itself done with it at
        once (see :meth:`let_others_finish`); rank 0 does not wait for the others' count of it, since
        they may never make it (a rank that refuses a step it heard of too late)."""
        agreement = self.agree(step, 0, failed=True)
        if self.rank != 0:
            self._done_with(agreement.number)

    def decide(self, number: int, proposal: str) -> str:
        """What the ranks settle for collective ``number`` of the group, given up or agreed: the
        first rank to settle it sets it (in the store, atomically), and every rank gets that
        (``proposal`` or the other). So every rank fails at the same collective, and skips the same
        ones after it: a late rank whose call completed a collective the others gave up on fails
        there too, instead of going on to collectives the others never make."""
        if self._decisions is None:  # no connection of its own: this rank fails its manager anyway
            return proposal
        settled = self._decisions.compare_set(str(number), "", proposal).decode()
        if self.rank == 0 and number >= KEPT_IN_STORE:  # keep the store small over a long run
            forget(self._decisions, [str(number - KEPT_IN_STORE), f"{number - KEPT_IN_STORE}/done"])
        return settled

    def _done_with(self, number: int) -> None:
        """This rank read all it reads of collective ``number`` from the store: counted there for
        rank 0 (see :meth:`let_others_finish`)."""
        if self._decisions is None:
            return
        if self.rank != 0:
            self._decisions.add(f"{number}/done", 1)
        else:
            self._last_agreed = max(self._last_agreed, number)

    def _issue(self, kind: int, values: list[int], what: str) -> tuple[int, torch.Tensor, Any]:
        """Start the MAX over the ranks of ``values`` (at most :data:`_WIDTH`), with its ``kind`` in
        front and gloo's timeout at :data:`LATE_LIMIT`: its number (see ``_GROUPS``), the tensor
        the result lands in, and the work to wait for."""
        number = self._made.issued
        self._made.issued = number + 1
        data = torch.tensor([kind, -kind, *values, *[0] * (_WIDTH - len(values))], dtype=torch.int64)
        options = self._dist.AllreduceOptions()
        options.reduceOp = self._dist.ReduceOp(self._dist.ReduceOp.MAX)
        options.timeout = LATE_LIMIT
        try:
            return number, data, self.group.allreduce([data], options)
        except Exception as exc:  # noqa: BLE001 - gloo raises RuntimeError subclasses
            raise _collective_error(self, what, exc) from exc

    def in_step(self, data: torch.Tensor, what: str) -> list[int]:
        """The values of a completed collective (``data`` from :meth:`_issue`).

        Raises:
            CheckpointError: The ranks paired different collectives: they are out of step.
        """
        if int(data[0]) != -int(data[1]):
            raise CheckpointError(
                f"rank {self.rank} could not {what}: the ranks' checkpoint collectives are out of step (a rank "
                "skipped a checkpoint call the others made, such as a save after it left its manager, or gave up "
                "waiting for one that another came to late, then went on without the ones after it); the calls "
                "after it fail until the ranks' collectives pair again (each failed call of the rank behind "
                "takes up one the others gave up on), or the job restarts"
            )
        return [int(v) for v in data[2:]]

    def all_ok(self, ok: bool, what: str = "agree") -> bool:
        """Whether every rank says ``ok`` (one all_reduce, on the calling thread); ``what`` the
        ranks do together, for an error."""
        return self._all_reduce(_ALL_OK, [0 if ok else 1], what)[0] == 0

    def all_max(self, value: int, what: str = "agree") -> int:
        """The largest ``value`` over the ranks (one all_reduce, on the calling thread); ``what``
        the ranks do together, for an error."""
        return self._all_reduce(_ALL_MAX, [value], what)[0]

    def all_max_each(self, values: list[int], what: str = "agree") -> list[int]:
        """The largest of each of ``values`` (at most six) over the ranks, in one all_reduce on the
        calling thread: two questions the ranks answer at one point cost one round, not two."""
        if len(values) > _WIDTH:
            raise ValueError(f"a collective carries at most {_WIDTH} values, not {len(values)}")
        return self._all_reduce(_ALL_MAX_EACH, values, what)[: len(values)]

    def _all_reduce(self, kind: int, values: list[int], what: str) -> list[int]:
        """MAX over the ranks; a rank that died or does not take part within ``timeout`` is a
        CheckpointError, never a hang or a backend's bare error (a late rank's call still completes
        this one: see the module's docstring)."""
        number, data, work = self._issue(kind, values, what)
        timed_out = _collective_error(self, what, TimeoutError(f"no answer within {self.timeout:g} s"))
        deadline = time.monotonic() + self.timeout
        return self.settle(number, data, work, deadline, what, timed_out, "it fails on every rank")

    def settle(
        self,
        number: int,
        data: torch.Tensor,
        work: Any,
        deadline: float,
        what: str,
        timed_out: CheckpointError,
        outcome: str,
    ) -> list[int]:
        """The values of collective ``number`` (``data`` and ``work`` from :meth:`_issue`), once the
        ranks settled it in the store (:meth:`decide`): waited for until ``deadline``
        (``time.monotonic()``), then given up unless another rank saw it complete.

        Args:
            what: What the ranks do together, for an error.
            timed_out: The error of a collective given up on.
            outcome: What failing means, for the error of a rank that came to it after another gave up.

        Raises:
            CheckpointError: ``timed_out``; this rank came after another gave up; the ranks are out
                of step; or gloo or the store failed (a rank or the store's host died).
        """
        try:
            if not _completed_by(work, deadline) and self.decide(number, _GIVEN_UP) == _GIVEN_UP:
                raise timed_out
            work.wait()  # complete, or completing: another rank saw it complete
            values = self.in_step(data, what)
            late = self.decide(number, _AGREED) == _GIVEN_UP
            if not late:
                self._done_with(number)
        except CheckpointError:
            raise
        except Exception as exc:  # noqa: BLE001 - gloo and the store raise RuntimeError subclasses
            raise _collective_error(self, what, exc) from exc
        if late:
            raise CheckpointError(
                f"rank {self.rank} could not {what}: a rank came to it more than {self.timeout:g} s after "
                f"another, which gave up waiting, so {outcome}"
            )
        return values

    def barrier(self) -> None:
        """Every rank reached this point (on the calling thread)."""
        self.all_ok(True)

    # ---- votes (writer threads) -----------------------------------------------------------------

    def vote(self, attempt: str, vote: Vote) -> None:
        """Set this rank's vote for a save attempt."""
        self.store.set(f"vote/{attempt}/{vote.rank}", vote.encode().decode())

    def collect(self, attempt: str, step: int) -> list[Vote]:
        """Rank 0: every rank's vote, waiting at most ``timeout`` seconds in all.

        Every rank votes once, failed or not, after it stopped writing; so waiting for all votes,
        even after a failed one, means the attempt's files are complete when rank 0 removes them.

        Returns:
            The votes by rank; a rank that never voted gets a failed vote saying so.
        """
        deadline = time.monotonic() + self.timeout
        votes: dict[int, Vote] = {}
        while len(votes) < self.world_size:
            for rank in range(self.world_size):
                key = f"vote/{attempt}/{rank}"
                if rank not in votes and self.store.check([key]):
                    votes[rank] = Vote.decode(self.store.get(key), rank)
                    self.store.delete_key(key)
            if len(votes) < self.world_size:
                if time.monotonic() > deadline:
                    break
                time.sleep(_POLL_S)
        self._voters = len(votes) - (0 in votes)  # those that read the outcome (the others may be gone)
        for rank in range(self.world_size):
            if rank not in votes:
                votes[rank] = Vote(
                    rank, False, f"rank {rank} did not report its part of step {step} within {self.timeout:g} s"
                )
        return [votes[r] for r in range(self.world_size)]

    def announce(self, attempt: str, outcome: str) -> None:
        """Rank 0: the outcome of a save attempt ("committed", or the reason it was not). The
        outcome and settled keys of the attempt announced :data:`KEPT_IN_STORE` attempts earlier
        are deleted: every rank has long read them."""
        self.store.set(f"outcome/{attempt}", outcome)
        if outcome != "committed":  # the others read it and go (after "committed" they read "settled")
            self._last_heard = (attempt, self._voters)
        self._announced.append(attempt)
        while len(self._announced) > KEPT_IN_STORE:
            old = self._announced[0]
            if not forget(self.store, [f"outcome/{old}", f"settled/{old}", f"heard/{old}"]):
                break  # tried again at the next announcement
            self._announced.popleft()

    def announce_settled(self, attempt: str) -> None:
        """Rank 0: its bookkeeping after committing the attempt's step (tags, retention, the log)
        is done."""
        self.store.set(f"settled/{attempt}", "1")
        self._last_heard = (attempt, self.world_size - 1)

    def heard_settled(self, attempt: str) -> str | None:
        """A rank other than 0, after "committed": None once rank 0 said its bookkeeping is done,
        else why it was not heard (the step is committed either way); waits at most ``timeout``
        seconds. Then counted as heard, for rank 0 (see :meth:`close`): this rank reads nothing
        more of the attempt from the store."""
        try:
            self.store.wait([f"settled/{attempt}"], timedelta(seconds=self.timeout))
        except Exception as exc:  # noqa: BLE001 - a store timeout or a lost connection
            return self._why_unheard(exc)
        self._heard(attempt)
        return None

    def _heard(self, attempt: str) -> None:
        """Count, for rank 0, that this rank read all it reads of ``attempt`` (see
        :meth:`let_others_finish`); a store gone by now has no one left to count for."""
        try:
            self.store.add(f"heard/{attempt}", 1)
        except Exception:  # noqa: BLE001 - a lost connection: rank 0 is gone already
            pass

    def _why_unheard(self, exc: Exception) -> str:
        """Why a store wait for rank 0's word failed: the time ran out, or the store went away."""
        if isinstance(exc, self._dist.DistNetworkError):
            return f"the job's store stopped answering (rank 0's process gone?): {exc}"
        return f"not within {self.timeout:g} s"

    def outcome(self, attempt: str, step: int) -> str:
        """A rank other than 0: the outcome rank 0 announced, waiting at most ``timeout`` seconds.

        Raises:
            CheckpointError: No outcome in time (rank 0 died or hangs).
        """
        key = f"outcome/{attempt}"
        try:
            self.store.wait([key], timedelta(seconds=self.timeout))
            outcome = self.store.get(key).decode()
        except Exception as exc:  # noqa: BLE001 - a store timeout or a lost connection
            raise CheckpointError(
                f"rank 0 did not say it committed step {step}: {self._why_unheard(exc)}; "
                "nothing of this save is known to be committed"
            ) from None
        if outcome != "committed":  # nothing more of it to read (after "committed": "settled")
            self._heard(attempt)
        return outcome

    def close(self) -> None:
        """The spare store connections a manager did not take, closed now; the group stays for the
        next manager of these ranks (see ``_GROUPS``), and the connections taken close once
        unreferenced. Rank 0 first lets the other ranks finish (:meth:`let_others_finish`).
        """
        self._spares.clear()
        self.let_others_finish()

    def let_others_finish(self) -> None:
        """Rank 0, before its process may end: wait, at most ``timeout`` seconds, until every other
        rank has read what it reads from the store of the last collective and of the last save
        whose outcome it announced (nothing on the other ranks). Many launchers (``mp.spawn``,
        ``init_process_group`` with a ``MASTER_PORT``) host the job's store in rank 0's process: a
        rank 0 that left at once would take the store down while another rank still waits there for
        the outcome of a save, and that rank would report a committed save failed, or a failure
        without its reason."""
        if self.rank != 0 or self._decisions is None or self.world_size == 1:
            return
        counters = []
        if self._last_agreed >= 0 and self._last_agreed == self._made.issued - 1:  # none failed since
            counters.append((self._decisions, f"{self._last_agreed}/done", self.world_size - 1, "collective"))
        if self._last_heard is not None:
            attempt, readers = self._last_heard
            counters.append((self.store, f"heard/{attempt}", readers, "save"))
        deadline = time.monotonic() + self.timeout
        for store, key, readers, what in counters:
            try:
                while (count := int(store.add(key, 0))) < readers:
                    if time.monotonic() > deadline:
                        warnings.warn(
                            f"asyncckpt: rank 0 goes on without word that {readers - count} other rank(s) heard "
                            f"how the last {what} went (none within {self.timeout:g} s); if its process hosts "
                            "the job's store and ends now, that may fail them",
                            stacklevel=4,
                        )
                        return
                    time.sleep(_POLL_S)
            except Exception:  # noqa: BLE001 - the store is gone: nothing to keep up for anyone
                return
