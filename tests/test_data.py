"""data.py: ResumableSampler's epoch orders, and exact continuation after a checkpoint restore."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import asyncckpt
from asyncckpt import CheckpointManager, ResumableSampler


def epochs(sampler: ResumableSampler, n: int) -> list[list[int]]:
    return [list(sampler) for _ in range(n)]


def forever(loader: DataLoader):
    """Batches across epochs, as a step-based training loop draws them."""
    while True:
        yield from loader


def index_loader(length: int, sampler: ResumableSampler, **kwargs) -> DataLoader:
    """A loader whose samples are their own dataset indices, so batches show the order."""
    return DataLoader(TensorDataset(torch.arange(length)), sampler=sampler, generator=torch.Generator(), **kwargs)


def batch_list(batches, n: int) -> list[list[int]]:
    return [b[0].tolist() for b in itertools.islice(batches, n)]


def save_and_restore(tmp_path, sampler: ResumableSampler, fresh: ResumableSampler, step: int = 1) -> None:
    """Round trip through a real checkpoint: save ``sampler``, restore into ``fresh``."""
    with CheckpointManager(tmp_path / "ckpts", keep_last=None) as mgr:
        mgr.save(step, {"sampler": sampler}).wait()
        state = {"sampler": fresh}
        assert mgr.restore(state) == step
        assert state["sampler"] is fresh


# ---- the order of each epoch -----------------------------------------------------------------


def test_each_epoch_is_a_permutation_that_changes_with_epoch_and_seed():
    a = epochs(ResumableSampler(50, seed=1), 4)
    for order in a:
        assert sorted(order) == list(range(50))
    assert len({tuple(o) for o in a}) == 4, "epochs repeat an order"
    assert a != epochs(ResumableSampler(50, seed=2), 4)
    assert a == epochs(ResumableSampler(50, seed=1), 4), "not deterministic"
    assert a[2] == ResumableSampler(50, seed=1).order(2)


def test_order_ignores_the_global_rng():
    torch.manual_seed(0)
    first = epochs(ResumableSampler(30, seed=5), 2)
    torch.manual_seed(12345)
    torch.rand(100)
    assert epochs(ResumableSampler(30, seed=5), 2) == first


def test_shuffle_false_is_sequential_every_epoch():
    assert epochs(ResumableSampler(7, shuffle=False), 3) == [list(range(7))] * 3


def test_position_counts_yielded_indices_and_the_epoch_advances_when_exhausted():
    sampler = ResumableSampler(10, seed=3)
    full = sampler.order(0)
    it = iter(sampler)
    got = [next(it) for _ in range(4)]
    assert got == full[:4]
    assert (sampler.epoch, sampler.position, len(sampler)) == (0, 4, 6)
    assert list(it) == full[4:]
    assert (sampler.epoch, sampler.position, len(sampler)) == (1, 0, 10)
    assert list(sampler) == sampler.order(1)
    assert sampler.epoch == 2


def test_iter_after_an_abandoned_pass_continues_where_it_stopped():
    sampler = ResumableSampler(12, seed=9)
    it = iter(sampler)
    head = [next(it) for _ in range(5)]
    del it
    assert head + list(sampler) == sampler.order(0)
    assert sampler.epoch == 1


def test_a_stale_iterator_raises():
    sampler = ResumableSampler(8)
    old = iter(sampler)
    next(old)
    new = iter(sampler)
    assert next(new) == sampler.order(0)[1]
    with pytest.raises(RuntimeError, match="stale"):
        next(old)
    sampler.load_state_dict(sampler.state_dict())
    with pytest.raises(RuntimeError, match="stale"):
        next(new)


# ---- state -----------------------------------------------------------------------------------


def test_state_dict_is_plain_values():
    sampler = ResumableSampler(9, seed=4, shuffle=False)
    it = iter(sampler)
    next(it), next(it)
    assert sampler.state_dict() == {"epoch": 0, "position": 2, "seed": 4, "length": 9, "shuffle": False}


def test_checkpoint_round_trip_mid_epoch_continues_with_exactly_the_rest(tmp_path):
    sampler = ResumableSampler(20, seed=11)
    list(sampler)  # epoch 0 done
    it = iter(sampler)
    consumed = [next(it) for _ in range(7)]
    fresh = ResumableSampler(20, seed=11)
    save_and_restore(tmp_path, sampler, fresh)
    assert (fresh.epoch, fresh.position, len(fresh)) == (1, 7, 13)
    rest = list(fresh)
    assert rest == list(it)
    assert consumed + rest == sampler.order(1)
    assert list(fresh) == sampler.order(2) == list(sampler)


@pytest.mark.parametrize("length", [22, 24])  # 22: a short last batch; 24: batches fill the epoch
@pytest.mark.parametrize("cut", [0, 3, 6, 7, 13])
def test_dataloader_resumed_mid_epoch_yields_exactly_the_uninterrupted_batches(tmp_path, length, cut):
    total = 18  # three epochs of 6 batches
    reference = batch_list(forever(index_loader(length, ResumableSampler(length, seed=2), batch_size=4)), total)

    sampler = ResumableSampler(length, seed=2)
    first = batch_list(forever(index_loader(length, sampler, batch_size=4)), cut)
    fresh = ResumableSampler(length, seed=2)
    save_and_restore(tmp_path, sampler, fresh)
    rest = batch_list(forever(index_loader(length, fresh, batch_size=4)), total - cut)

    assert first + rest == reference, f"length {length}, interrupted after {cut} batches"


def test_recommended_loader_leaves_the_global_rng_alone():
    """iter(DataLoader) draws a seed from the global RNG unless the loader has its own generator."""
    loader = index_loader(10, ResumableSampler(10), batch_size=4)
    before = torch.get_rng_state()
    for _ in range(3):
        list(loader)
    assert torch.equal(torch.get_rng_state(), before)


def test_set_position_makes_prefetching_workers_exact(tmp_path):
    """With workers the sampler runs ahead; the loop reports what it consumed and resumes exactly."""
    length, bs, total, cut = 22, 2, 30, 9  # 11 batches an epoch; save 2 batches before its end
    reference = batch_list(forever(index_loader(length, ResumableSampler(length, seed=6), batch_size=bs)), total)

    sampler = ResumableSampler(length, seed=6)
    loader = index_loader(length, sampler, batch_size=bs, num_workers=2, prefetch_factor=2)
    seen = []
    consumed = sampler.position
    for (batch,) in loader:
        seen.append(batch.tolist())
        consumed += len(batch)
        if len(seen) == cut:
            break
    assert (sampler.epoch, sampler.position) == (1, 0), "the workers prefetched the whole epoch"
    sampler.set_position(consumed)
    assert sampler.state_dict()["epoch"] == 0 and sampler.state_dict()["position"] == cut * bs
    fresh = ResumableSampler(length, seed=6)
    save_and_restore(tmp_path, sampler, fresh)
    del loader

    rest = batch_list(forever(index_loader(length, fresh, batch_size=bs)), total - cut)
    assert seen + rest == reference


def test_set_position_lasts_until_the_next_draw():
    sampler = ResumableSampler(10, seed=1)
    it = iter(sampler)
    for _ in range(6):
        next(it)
    sampler.set_position(4)
    assert (sampler.state_dict()["position"], sampler.position) == (4, 6)
    next(it)
    assert sampler.state_dict()["position"] == 7
    with pytest.raises(ValueError, match="consumed"):
        sampler.set_position(11)


@pytest.mark.parametrize(
    ("field", "other"),
    [
        ("length", ResumableSampler(11, seed=3)),
        ("seed", ResumableSampler(10, seed=4)),
        ("shuffle", ResumableSampler(10, seed=3, shuffle=False)),
    ],
)
def test_load_state_dict_refuses_a_different_sampler(tmp_path, field, other):
    sampler = ResumableSampler(10, seed=3)
    state = sampler.state_dict()
    with pytest.raises(ValueError, match=field):
        other.load_state_dict(state)
    assert (other.epoch, other.position) == (0, 0)

    with CheckpointManager(tmp_path / "ckpts") as mgr:
        mgr.save(1, {"sampler": sampler}).wait()
        with pytest.raises(asyncckpt.CheckpointError, match=field):
            mgr.restore({"sampler": other})


def test_load_state_dict_refuses_bad_values():
    sampler = ResumableSampler(10)
    good = sampler.state_dict()
    with pytest.raises(ValueError, match="position"):
        sampler.load_state_dict({**good, "position": 11})
    with pytest.raises(ValueError, match="epoch"):
        sampler.load_state_dict({**good, "epoch": -1})
    with pytest.raises(ValueError, match="missing position"):
        sampler.load_state_dict({k: v for k, v in good.items() if k != "position"})
    with pytest.raises(ValueError, match="shuffle"):
        sampler.load_state_dict({**good, "shuffle": 1})


def test_constructor_validates():
    with pytest.raises(ValueError, match="length"):
        ResumableSampler(-1)
    with pytest.raises(TypeError, match="seed"):
        ResumableSampler(3, seed=1.5)
    with pytest.raises(TypeError, match="shuffle"):
        ResumableSampler(3, shuffle=None)
