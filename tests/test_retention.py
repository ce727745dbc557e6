"""retention.py: which committed checkpoints to delete."""

from __future__ import annotations

import pytest

from asyncckpt.retention import CheckpointInfo, RetentionPolicy, best_metric_missing, steps_to_delete

STEPS = [100, 200, 300, 400, 500, 600, 700, 800, 900, 1000]
LOSSES = [0.9, 0.4, 0.7, 0.2, 0.8, 0.3, 0.6, 0.5, 0.95, 0.99]  # best: 400, 600, 200; worst: 1000


def infos(metric="loss", values=LOSSES, steps=STEPS):
    return [CheckpointInfo(s, {metric: v}) for s, v in zip(steps, values, strict=True)]


def kept(committed, policy):
    doomed = steps_to_delete(committed, policy)
    assert doomed == sorted(doomed)  # oldest first
    return sorted(set(c.step for c in committed) - set(doomed))


def test_nothing_committed_nothing_to_delete():
    assert steps_to_delete([], RetentionPolicy(keep_last=1)) == []


def test_keep_last():
    assert steps_to_delete(infos(), RetentionPolicy(keep_last=3)) == STEPS[:7]
    assert kept(infos(), RetentionPolicy(keep_last=1)) == [1000]
    assert steps_to_delete(infos(), RetentionPolicy(keep_last=10)) == []
    assert steps_to_delete(infos(), RetentionPolicy(keep_last=50)) == []


def test_keep_last_none_keeps_everything():
    assert steps_to_delete(infos(), RetentionPolicy(keep_last=None)) == []
    policy = RetentionPolicy(keep_last=None, keep_best=1, best_metric="loss", keep_every=500)
    assert steps_to_delete(infos(), policy) == []


def test_keep_last_does_not_depend_on_input_order():
    shuffled = [infos()[i] for i in (3, 9, 0, 5, 1, 8, 2, 7, 4, 6)]
    assert steps_to_delete(shuffled, RetentionPolicy(keep_last=2)) == STEPS[:8]


def test_keep_best_min():
    policy = RetentionPolicy(keep_last=1, keep_best=2, best_metric="loss", best_mode="min")
    assert kept(infos(), policy) == [400, 600, 1000]


def test_keep_best_max():
    policy = RetentionPolicy(keep_last=1, keep_best=2, best_metric="acc", best_mode="max")
    assert kept(infos("acc"), policy) == [900, 1000]  # 1000 is best and newest
    policy = RetentionPolicy(keep_last=1, keep_best=3, best_metric="acc", best_mode="max")
    assert kept(infos("acc"), policy) == [100, 900, 1000]


def test_keep_best_ties_go_to_the_newer_checkpoint():
    committed = infos(values=[0.1, 0.5, 0.1, 0.5, 0.1, 0.9, 0.9, 0.9, 0.9, 0.9])
    policy = RetentionPolicy(keep_last=1, keep_best=2, best_metric="loss")
    assert kept(committed, policy) == [300, 500, 1000]


def test_keep_every():
    assert kept(infos(), RetentionPolicy(keep_last=1, keep_every=300)) == [300, 600, 900, 1000]
    assert kept(infos(), RetentionPolicy(keep_last=2, keep_every=1000)) == [900, 1000]
    assert kept(infos(), RetentionPolicy(keep_last=1, keep_every=7)) == [700, 1000]


def test_rules_are_a_union():
    policy = RetentionPolicy(keep_last=2, keep_best=2, best_metric="loss", keep_every=500)
    # last 2: 900, 1000; best 2: 400, 600; every 500: 500, 1000
    assert kept(infos(), policy) == [400, 500, 600, 900, 1000]


def test_nan_and_missing_metrics_never_count_as_best():
    committed = [
        CheckpointInfo(100, {"loss": float("nan")}),
        CheckpointInfo(200, {}),
        CheckpointInfo(300, {"loss": 0.5}),
        CheckpointInfo(400, {"other": 0.0}),
        CheckpointInfo(500, {"loss": "0.1"}),
        CheckpointInfo(600, {"loss": None}),
        CheckpointInfo(700, {"loss": True}),
        CheckpointInfo(800, {"loss": 0.7}),
        CheckpointInfo(900, {"loss": float("nan")}),
    ]
    policy = RetentionPolicy(keep_last=1, keep_best=2, best_metric="loss", best_mode="min")
    assert kept(committed, policy) == [300, 800, 900]
    policy = RetentionPolicy(keep_last=1, keep_best=5, best_metric="loss", best_mode="max")
    assert kept(committed, policy) == [300, 800, 900]


def test_infinite_metrics_are_ordinary_values():
    committed = [
        CheckpointInfo(1, {"loss": float("inf")}),
        CheckpointInfo(2, {"loss": 3}),
        CheckpointInfo(3, {"loss": float("-inf")}),
        CheckpointInfo(4, {"loss": 10}),
    ]
    policy = RetentionPolicy(keep_last=1, keep_best=2, best_metric="loss")
    assert kept(committed, policy) == [2, 3, 4]


def test_newest_is_always_kept_even_when_it_is_the_worst():
    policy = RetentionPolicy(keep_last=1, keep_best=1, best_metric="loss")
    committed = infos(values=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 99.0])
    assert kept(committed, policy) == [100, 1000]
    assert 1000 not in steps_to_delete(infos()[:1], policy)
    policy = RetentionPolicy(keep_last=1, keep_every=10_000)
    assert steps_to_delete([CheckpointInfo(7, {})], policy) == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"keep_last": 0}, "keep_last must be a positive integer"),
        ({"keep_last": -1}, "keep_last must be a positive integer"),
        ({"keep_last": 1.5}, "keep_last must be a positive integer"),
        ({"keep_last": True}, "keep_last must be a positive integer"),
        ({"keep_last": "3"}, "keep_last must be a positive integer"),
        ({"keep_best": 0, "best_metric": "loss"}, "keep_best must be a positive integer"),
        ({"keep_best": 2}, "keep_best needs best_metric"),
        ({"keep_best": 2, "best_metric": ""}, "keep_best needs best_metric"),
        ({"keep_best": 2, "best_metric": "loss", "best_mode": "median"}, "best_mode must be 'min' or 'max'"),
        ({"best_mode": "MIN"}, "best_mode must be 'min' or 'max'"),
        ({"keep_every": 0}, "keep_every must be a positive integer"),
        ({"keep_every": False}, "keep_every must be a positive integer"),
    ],
)
def test_invalid_policies_are_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RetentionPolicy(**kwargs)


def test_keep_best_deletes_nothing_while_no_checkpoint_carries_its_metric():
    committed = [CheckpointInfo(s, {"loss": 0.1 * s}) for s in (1, 2, 3, 4)]
    policy = RetentionPolicy(keep_last=1, keep_best=1, best_metric="val_loss")
    assert best_metric_missing(committed, policy)
    assert steps_to_delete(committed, policy) == []
    nan_only = [CheckpointInfo(s, {"val_loss": float("nan")}) for s in (1, 2, 3)]
    assert steps_to_delete(nan_only, policy) == []
    # once one checkpoint carries it, the rules apply as usual
    committed.append(CheckpointInfo(5, {"val_loss": 0.3}))
    assert not best_metric_missing(committed, policy)
    assert kept(committed, policy) == [5]
    assert not best_metric_missing(committed, RetentionPolicy(keep_last=1))
