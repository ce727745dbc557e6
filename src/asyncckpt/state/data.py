"""ResumableSampler: a DataLoader sampler whose place in the data is part of the checkpoint.

Exact resume needs the data order too: after a restore the loop must see exactly the samples the
uninterrupted run would have seen next, in the same order. Put the sampler in the state
(``state["sampler"] = sampler``); ``restore`` puts it back where the checkpoint left it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Sampler

_SEED_MIX = 1_000_003
_U64 = (1 << 64) - 1


def _check_int(value: Any, name: str, low: int = 0, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


class ResumableSampler(Sampler[int]):
    """Indices ``0..length-1``, reshuffled every epoch, that continue exactly after a restore.

    Epoch ``e`` is the permutation drawn by a private ``torch.Generator`` seeded with
    ``seed * 1_000_003 + e``: the same for every run with that seed, different from epoch to epoch,
    and independent of the global RNG (``torch.manual_seed`` and dropout never change it). With
    ``shuffle=False`` every epoch is ``0, 1, ..., length - 1``.

    The sampler counts the indices it has handed out in the current epoch (``position``).
    ``iter(sampler)`` yields the rest of the epoch, from ``position`` to the end; once it is
    exhausted, ``epoch`` advances and ``position`` goes back to 0, so a loop that calls
    ``iter`` again (a new ``for batch in loader``) gets the next epoch. ``len(sampler)`` is what
    is left of the current epoch. ``state_dict()`` records ``epoch`` and ``position`` (plus
    ``seed``, ``length`` and ``shuffle``, which ``load_state_dict`` checks against its own).

    **Exactness.** With ``DataLoader(num_workers=0)`` the loader draws each batch's indices from
    the sampler only when the loop asks for that batch, so at a batch boundary (where a training
    loop saves) ``position`` is exactly the number of samples of this epoch the loop consumed, and
    a checkpoint taken there resumes exactly. Use it like this::

        sampler = ResumableSampler(len(dataset), seed=0)
        loader = DataLoader(dataset, batch_size=32, sampler=sampler, generator=torch.Generator())
        state = {"model": model, "optimizer": opt, "sampler": sampler, "rng": asyncckpt.RNGState()}
        last = mgr.restore(state)               # the sampler continues mid-epoch

    Pass ``generator=`` to the ``DataLoader``: without it, every ``iter(loader)`` draws a worker
    base seed from the *global* torch RNG, even with ``num_workers=0``. A resumed run calls
    ``iter(loader)`` at a point where the uninterrupted run did not, so that extra draw would shift
    every later dropout mask and random augmentation drawn from the (restored) global RNG.

    With worker processes (``num_workers > 0``) the loader draws indices ahead of the loop
    (``prefetch_factor * num_workers`` batches), so ``position`` runs ahead of what the loop has
    consumed (by then the sampler may even have moved on to the next epoch). To stay exact, count
    the samples the loop has consumed in the current epoch and report them just before each
    save with ``set_position``; the checkpoint then records that count, while the live iterator
    carries on undisturbed::

        while step < total_steps:
            consumed = sampler.position          # read before iter(loader): where this pass starts
            for x, y in loader:
                consumed += len(x)
                ...                              # train on the batch, step += 1
                sampler.set_position(consumed)   # what the loop really consumed, not what was prefetched
                mgr.maybe_save(step, state)

    ``set_position`` only affects what ``state_dict`` reports, until the sampler next hands out an
    index, so call it before every save. Random augmentations done *inside* worker processes draw
    from per-worker generators that are re-seeded for every ``iter(loader)``; this sampler does not
    make those continue exactly.

    Only one iterator is live at a time: starting a new one (or ``load_state_dict``) makes an older
    one raise ``RuntimeError`` if it is advanced again.

    Args:
        length: how many samples the dataset holds (indices ``0..length-1``).
        seed: the seed of every epoch's permutation.
        shuffle: False yields ``0, 1, ..., length - 1`` every epoch.

    Raises:
        TypeError: ``length`` or ``seed`` is not an integer, or ``shuffle`` not a bool.
        ValueError: ``length`` is negative.
    """

    def __init__(self, length: int, *, seed: int = 0, shuffle: bool = True) -> None:
        self.length = _check_int(length, "length")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an integer, got {seed!r}")
        if not isinstance(shuffle, bool):
            raise TypeError(f"shuffle must be a bool, got {shuffle!r}")
        self.seed = seed
        self.shuffle = shuffle
        self._epoch = 0
        self._position = 0
        self._iter_epoch = 0  # the epoch of the newest iterator (what the loop is consuming)
        self._reported: tuple[int, int] | None = None  # set_position's record, until the next draw
        self._generation = 0  # bumped by __iter__ and load_state_dict; older iterators go stale

    @property
    def epoch(self) -> int:
        """The epoch the next index comes from."""
        return self._epoch

    @property
    def position(self) -> int:
        """How many indices of the current epoch have been handed out."""
        return self._position

    def order(self, epoch: int) -> list[int]:
        """The full index order of ``epoch``.

        Args:
            epoch: any epoch, past or future.

        Returns:
            The permutation of ``0..length-1`` that epoch yields.

        Raises:
            TypeError: ``epoch`` is not an integer.
            ValueError: ``epoch`` is negative.
        """
        _check_int(epoch, "epoch")
        if not self.shuffle:
            return list(range(self.length))
        gen = torch.Generator()
        gen.manual_seed((self.seed * _SEED_MIX + epoch) & _U64)
        return torch.randperm(self.length, generator=gen).tolist()

    def __iter__(self) -> Iterator[int]:
        self._generation += 1
        self._iter_epoch = self._epoch
        self._reported = None
        return self._run(self._generation, self._epoch, self._position)

    def _run(self, generation: int, epoch: int, start: int) -> Iterator[int]:
        order = self.order(epoch)
        for pos in range(start, self.length):
            self._check_current(generation)
            self._position = pos + 1
            self._reported = None
            yield order[pos]
        self._check_current(generation)
        self._epoch = epoch + 1
        self._position = 0
        self._reported = None

    def _check_current(self, generation: int) -> None:
        if generation != self._generation:
            raise RuntimeError(
                "this ResumableSampler iterator is stale: a newer iterator was started or the "
                "sampler's state was loaded since; call iter() again"
            )

    def __len__(self) -> int:
        return self.length - self._position

    def set_position(self, consumed: int) -> None:
        """Record that the loop has consumed ``consumed`` samples of the epoch it is iterating.

        For loaders with worker processes, which draw indices ahead of the loop: call it just
        before each save. The next ``state_dict`` reports (the newest iterator's epoch,
        ``consumed``) instead of the sampler's own, prefetched-ahead count; the live iterator is not
        moved. The record lasts until the sampler hands out another index or starts a new iterator.
        ``consumed`` counts from the start of the epoch, including samples consumed before a resume.

        Args:
            consumed: samples of the current epoch the loop has consumed, in ``[0, length]``.

        Raises:
            TypeError: ``consumed`` is not an integer.
            ValueError: it is outside ``[0, length]``.
        """
        self._reported = (self._iter_epoch, _check_int(consumed, "consumed", 0, self.length))

    def state_dict(self) -> dict[str, Any]:
        """Where the sampler is, for a checkpoint.

        Returns:
            ``epoch`` and ``position`` (what ``set_position`` reported, if it was called since the
            last index was handed out), plus ``seed``, ``length`` and ``shuffle``.
        """
        epoch, position = self._reported if self._reported is not None else (self._epoch, self._position)
        return {
            "epoch": epoch,
            "position": position,
            "seed": self.seed,
            "length": self.length,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``: the next iterator starts at its epoch and position.

        Args:
            state: what :meth:`state_dict` returned.

        Raises:
            ValueError: a key is missing, ``seed``, ``length`` or ``shuffle`` differ from this
                sampler's, or ``epoch`` or ``position`` is out of range.
            TypeError: ``epoch`` or ``position`` is not an integer.
        """
        missing = [k for k in ("epoch", "position", "seed", "length", "shuffle") if k not in state]
        if missing:
            raise ValueError(f"ResumableSampler state is missing {', '.join(missing)}")
        for field in ("length", "seed", "shuffle"):
            if state[field] != getattr(self, field) or type(state[field]) is not type(getattr(self, field)):
                raise ValueError(
                    f"ResumableSampler {field} mismatch: the state has {field}={state[field]!r}, "
                    f"this sampler has {field}={getattr(self, field)!r}"
                )
        epoch = _check_int(state["epoch"], "epoch")
        position = _check_int(state["position"], "position", 0, self.length)
        self._epoch = epoch
        self._position = position
        self._iter_epoch = epoch
        self._reported = None
        self._generation += 1

    def __repr__(self) -> str:
        return (
            f"ResumableSampler(length={self.length}, seed={self.seed}, shuffle={self.shuffle}, "
            f"epoch={self._epoch}, position={self._position})"
        )
