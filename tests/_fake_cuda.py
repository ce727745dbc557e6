"""A stand-in for torch.cuda's host-memory calls, for testing the pinned-arena code without a GPU."""

from __future__ import annotations

import threading

import pytest
import torch


class FakeCudart:
    """Stands in for ``torch.cuda.cudart()`` on a machine without CUDA: records (un)registrations."""

    def __init__(self, error: int = 0) -> None:
        self.error = error
        self.registered: list[tuple[int, int, int]] = []
        self.unregistered: list[int] = []

        self.threads: list[int] = []  # which threads made the calls
        self.devices: list[int] = []  # the current device of each call

    def install(self, patch: pytest.MonkeyPatch, device: int = 0) -> None:
        current = threading.local()
        patch.setattr(torch.cuda, "cudart", lambda: self)
        patch.setattr(torch.cuda, "current_device", lambda: getattr(current, "device", device))
        patch.setattr(torch.cuda, "set_device", lambda d: setattr(current, "device", d))

    def _called(self) -> None:
        self.threads.append(threading.get_ident())
        self.devices.append(torch.cuda.current_device())

    def cudaHostRegister(self, address: int, size: int, flags: int) -> int:  # noqa: N802 (CUDA's name)
        self._called()
        self.registered.append((address, size, flags))
        return self.error

    def cudaHostUnregister(self, address: int) -> int:  # noqa: N802
        self._called()
        self.unregistered.append(address)
        return 0
