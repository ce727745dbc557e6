"""One call per item, several at once where each waits on a network: the results in the items'
order, and the error a one-after-another loop would raise.

Readers of an object store make requests that each cost a round trip (a checkpoint's rank tables,
the manifests of a listing, each rank's pieces); made one after another, a root of many ranks or
steps waits for all of those round trips in turn.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

_T = TypeVar("_T")
_R = TypeVar("_R")


def in_order(call: Callable[[_T], _R], items: Sequence[_T], at_once: int, name: str) -> list[_R]:
    """``call`` of each item, at most ``at_once`` at a time (1: one after another, stopping at the
    first failure), on threads named ``name``.

    Returns:
        The results, in the items' order.

    Raises:
        The error of the first item that failed, in the items' order (once the calls in flight end).
    """
    if at_once <= 1 or len(items) <= 1:
        return [call(item) for item in items]
    with ThreadPoolExecutor(min(len(items), at_once), name) as pool:
        return list(pool.map(call, items))
