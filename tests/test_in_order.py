"""in_order: results in the items' order, calls at once when asked, the first failing item's error."""

from __future__ import annotations

import threading

import pytest

from asyncckpt._in_order import in_order


def test_several_at_once_answer_in_the_items_order():
    barrier = threading.Barrier(3, timeout=20)  # only opens with three calls in flight together

    def call(n: int) -> int:
        barrier.wait()
        return n * n

    assert in_order(call, [3, 1, 2], 3, "test") == [9, 1, 4]


def test_the_first_failing_item_names_the_error_at_once_or_one_after_another():
    called: list[int] = []

    def call(n: int) -> int:
        called.append(n)
        if n in (1, 2):
            raise ValueError(f"item {n}")
        return n

    with pytest.raises(ValueError, match="item 1"):
        in_order(call, [0, 1, 2, 3], 4, "test")
    called.clear()
    with pytest.raises(ValueError, match="item 1"):
        in_order(call, [0, 1, 2, 3], 1, "test")
    assert called == [0, 1]  # one after another: nothing after the failure
