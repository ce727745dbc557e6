"""A real :class:`ObjectStoreBackend` that counts the requests it sends to the store (by client
call: ``head``, ``get``, ``list_dir``...), to bound what a save or a load costs in requests. Every
call still goes to the real server; nothing is mocked."""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

from asyncckpt.storage.objectstore import ObjectStoreBackend

# The client calls that read what a root holds (the lease's own renewals are left out).
READS = ("head", "get", "list_dir", "any_under", "find", "list_named")


class _CountingClient:
    def __init__(self, client: Any, counts: Counter, lock: threading.Lock) -> None:
        self._client = client
        self._counts = counts
        self._lock = lock

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def counted(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                self._counts[name] += 1
            return attr(*args, **kwargs)

        return counted


class CountingBackend(ObjectStoreBackend):
    """An ObjectStoreBackend whose client calls are counted in ``counts`` (reset with ``reset``)."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        super().__init__(url, storage_options)
        self.counts: Counter = Counter()
        self._count_lock = threading.Lock()
        self._client = _CountingClient(self._client, self.counts, self._count_lock)  # type: ignore[assignment]

    def reset(self) -> None:
        with self._count_lock:
            self.counts.clear()

    def reads(self) -> int:
        """The requests that read the root (HEADs, GETs, LISTs) since the last reset."""
        with self._count_lock:
            return sum(self.counts[name] for name in READS)
