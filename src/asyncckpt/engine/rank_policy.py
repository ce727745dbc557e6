"""Save policies and preemption that every rank of a multi-rank job follows alike.

Every rank must save the same steps (:meth:`RankGroup.agree` fails a save otherwise). A policy that
answers from the step alone (``EverySteps``: ``SavePolicy.same_on_every_rank``) is asked on every
rank. A policy that reads a clock (``EverySeconds``, ``Adaptive``) would answer differently on each
rank, so only rank 0 asks it; when it says step ``s`` is due, rank 0 announces the target
``t = s + lead`` through the c10d store, and every rank (rank 0 too) saves at ``t``. A preemption
signal is announced the same way by whichever rank receives it (the first announcement wins), and
every rank makes the final checkpoint at that target and then raises the signal.

No step waits on the network: a daemon thread per manager waits for announcements on a store
connection of its own and hands them to the training thread in memory. The training thread only
talks to the store when it announces (once per save). Ranks that train in lockstep (a gradient
all-reduce per step) are at most a step apart, so a ``lead`` of 2 steps lets every rank hear of a
target before it reaches it, as long as a step takes longer than the store's round trip (well under
a millisecond on a LAN). A rank that hears of a target it has already passed raises a
``CheckpointError`` naming both steps: it never skips a save silently.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from asyncckpt.engine import ranks as _ranks
from asyncckpt.engine.ranks import RankGroup
from asyncckpt.errors import CheckpointError
from asyncckpt.policy import SavePolicy

DEFAULT_LEAD = 2
_WAIT = timedelta(hours=24)  # one store wait of the watcher (a timed-out wait logs a c10d warning)
_RETRY_S = 1.0  # after a store error (the store went away), before the watcher tries again


class MissedFinalError(CheckpointError):
    """This rank heard of the final checkpoint of a preemption only after it had passed its step:
    no rank makes that checkpoint, and this rank raises ``signum`` all the same."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


@dataclass(frozen=True)
class Target:
    """A step every rank saves: announced by ``rank`` (0 for the policy's saves), ``signum`` > 0 for
    the final checkpoint before that signal."""

    step: int
    rank: int
    signum: int = 0
    epoch: int = 0  # how many restores the ranks had made when it was announced (see ``RankSchedule.reset``)
    finals: int = 0  # a final target: how many final checkpoints the ranks had made before it

    def encode(self) -> str:
        fields = {"step": self.step, "rank": self.rank, "signum": self.signum, "epoch": self.epoch}
        return json.dumps({**fields, "finals": self.finals})

    @classmethod
    def decode(cls, raw: bytes | str) -> Target:
        fields = json.loads(raw)
        return cls(
            int(fields["step"]),
            int(fields["rank"]),
            int(fields["signum"]),
            int(fields.get("epoch", 0)),
            int(fields.get("finals", 0)),
        )


class RankSchedule:
    """The steps this rank saves at, agreed with the other ranks through the store.

    Args:
        ranks: This process's rank group.
        policy: The manager's policy. Asked on every rank when ``policy.same_on_every_rank``,
            otherwise only on rank 0, whose due steps become announced targets ``lead`` steps later.
        lead: Steps between the step rank 0's policy found due (or a rank got a signal at) and the
            step every rank saves; at least 1.
        take_turn: Takes this rank's turn, refused, in the agreement on saving a step (the
            planner's ``refuse``): for a target heard after this rank passed it, so that the other
            ranks' agreement on it completes (failed), and the ranks' next collectives pair.

    Raises:
        ValueError: ``lead`` is not a positive integer.
    """

    def __init__(
        self, ranks: RankGroup, policy: SavePolicy, lead: int = DEFAULT_LEAD, *, take_turn: Callable[[int], None]
    ) -> None:
        if isinstance(lead, bool) or not isinstance(lead, int) or lead < 1:
            raise ValueError(f"policy_lead must be a positive integer (steps), got {lead!r}")
        self.rank = ranks.rank
        self.lead = lead
        self._policy = policy
        self._take_turn = take_turn
        self._local = bool(getattr(policy, "same_on_every_rank", False))
        self._store = ranks.connection("policy/")  # the training thread's: announcements only
        self._watch_store = ranks.connection("policy/")  # the watcher's: it waits on it
        self._lock = threading.Lock()
        self._inbox: list[Target] = []  # heard by the watcher, not yet taken by the training thread
        self._targets: list[Target] = []  # taken, not yet saved
        self._final: Target | None = None  # the preemption target, once known, until reached
        self._finals = 0  # final checkpoints made (in step on every rank: each reaches every final target)
        self._last_step: int | None = None  # the step of the last maybe_save
        self._epoch = 0  # restores made (in step on every rank: restore is a collective)
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="asyncckpt-rank-policy", daemon=True)
        self._watcher.start()

    # ---- the watcher (a daemon thread) ----------------------------------------------------------

    def _watch(self) -> None:
        n = 0
        while not self._stop.is_set():
            key = f"due/{n}"
            try:
                self._watch_store.wait([key], _WAIT)
                raw = self._watch_store.get(key)
            except Exception:  # noqa: BLE001 - a wait that timed out, or a store that went away
                self._stop.wait(_RETRY_S)
                continue
            n += 1
            try:
                target = Target.decode(raw)
            except (ValueError, KeyError, TypeError):  # pragma: no cover - not ours
                continue
            if target.step >= 0 and target.rank != self.rank:  # ours are known already; < 0: a wake-up
                with self._lock:
                    self._inbox.append(target)

    # ---- the training thread --------------------------------------------------------------------

    def _announce(self, target: Target) -> None:
        """Announce ``target`` as the next numbered key, and delete the one announced
        ``KEPT_IN_STORE`` before it, which every watcher has long read."""
        n = int(self._store.add("seq", 1)) - 1
        self._store.set(f"due/{n}", target.encode())
        if n >= _ranks.KEPT_IN_STORE:
            _ranks.forget(self._store, [f"due/{n - _ranks.KEPT_IN_STORE}"])

    def _take(self, step: int) -> None:
        """Move what the watcher heard to the targets; raise for a target this rank already passed."""
        with self._lock:
            heard, self._inbox = self._inbox, []
        for target in heard:
            if target.epoch < self._epoch:
                continue  # announced before the ranks restored an earlier step: another timeline's
            if target.signum and self._final is None and target.finals == self._finals:
                self._final = target
            elif target.signum:
                continue  # one final target per preemption (compare_set); never two, nor an earlier one
            self._targets.append(target)
        last = self._last_step
        passed = [t for t in self._targets if last is not None and t.step <= last]
        if not passed:
            return
        self._targets = [t for t in self._targets if t not in passed]  # raised once, not at every step from now on
        for target in passed:  # the others' agreement on it completes, failed: the ranks stay in step
            self._take_turn(target.step)
        final = next((t for t in passed if t.signum), None)
        first = final or passed[0]
        message = (
            f"rank {self.rank} heard that every rank saves step {first.step} (announced by rank "
            f"{first.rank}) only after it had passed it (its last maybe_save was step {last}, "
            f"now {step}), so no rank saves it: the ranks are more than policy_lead={self.lead} steps apart, "
            "or a step is shorter than the store's round trip; raise policy_lead"
        )
        if final is None:
            raise CheckpointError(message)
        self._final = None  # this preemption is over here too: the next signal is a new one
        self._finals += 1
        raise MissedFinalError(message, final.signum)

    def _preempt(self, step: int, signum: int) -> None:
        """This rank got ``signum``: announce the final target, unless another rank's came first."""
        mine = Target(step + self.lead, self.rank, signum, self._epoch, self._finals)
        current = self._store.compare_set(f"final/{self._epoch}/{self._finals}", "", mine.encode())
        winner = Target.decode(current) if current else mine
        if winner == mine:
            self._announce(mine)
        if self._final is None:
            self._final = winner
            self._targets.append(winner)

    def decide(self, step: int, signum: int | None, asked: tuple[int, bool] | None) -> tuple[bool, int | None]:
        """What ``maybe_save(step)`` does: whether it saves, and the signal to raise after it.

        Args:
            step: The step of this ``maybe_save``.
            signum: The preemption signal this rank received and has not acted on, or None.
            asked: The last ``due`` answer ``(step, answer)``, which an every-rank policy follows.

        Returns:
            ``(save, signal)``: signal is set for the final checkpoint (save is then True).

        Raises:
            CheckpointError: A target announced for a step this rank already passed.
        """
        self._take(step)
        if signum is not None and self._final is None:
            self._preempt(step, signum)
        is_due = self._policy.due(step) if (self._local or self.rank == 0) else False  # it counts every call
        if self._local:
            if asked is not None and asked[0] == step:
                is_due = asked[1]
        elif is_due and not any(t.signum == 0 for t in self._targets):
            target = Target(step + self.lead, 0, epoch=self._epoch)
            self._announce(target)
            self._targets.append(target)
            is_due = False
        elif is_due:
            is_due = False  # a target is on its way already: that save restarts the policy's interval
        reached = [t for t in self._targets if t.step <= step]
        self._targets = [t for t in self._targets if t.step > step]
        self._last_step = step
        final = next((t.signum for t in reached if t.signum), None)
        if final is not None:  # a later signal (one whose handler let the process go on) is a new preemption
            self._final = None
            self._finals += 1
        return bool(reached) or is_due or final is not None, final

    def reset(self) -> None:
        """Every rank restored a checkpoint (a collective: every rank calls this at the same point),
        which may be an earlier step: the targets announced before belong to the steps given up,
        and one still on its way would be heard after the rollback, suppressing the policy's new
        due steps or passed already. Targets carry the epoch they were announced in; the older
        ones are dropped, here and when heard later. The step restarts from the restored one."""
        with self._lock:
            self._epoch += 1
            self._inbox = [t for t in self._inbox if t.epoch >= self._epoch]
        self._targets = [t for t in self._targets if t.epoch >= self._epoch]
        self._last_step = None
        self._final = None  # a preemption still to come is announced anew, in this epoch (its own keys)
        self._finals = 0

    def peek(self, step: int) -> bool:
        """What ``decide(step, ...)`` would answer for saving, changing nothing the policy keeps.

        Announcements heard so far count; one heard after this and before ``maybe_save(step)``
        still makes that ``maybe_save`` save (every rank must).

        Raises:
            CheckpointError: A target announced for a step this rank already passed.
        """
        self._take(step)
        if any(t.step <= step for t in self._targets):
            return True
        return self._local and self._policy.peek(step)

    def close(self) -> None:
        """Stop the watcher: a wake-up (step -1) in the sequence ends its wait; every rank skips it."""
        self._stop.set()
        try:
            self._announce(Target(-1, self.rank))
        except Exception:  # noqa: BLE001 - the store is gone (at exit): the daemon thread goes with the process
            return
        if self._watcher is not threading.current_thread():
            self._watcher.join(5.0)
