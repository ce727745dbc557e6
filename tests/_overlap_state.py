"""Helpers shared by the overlap-mode tests: snapshot a live state, compare trees bit for bit."""

from __future__ import annotations

import copy
import threading

import torch


def plain(state: dict) -> dict:
    """A deep copy of the state as plain state dicts: what the checkpoint must hold."""
    return {k: copy.deepcopy(v.state_dict() if hasattr(v, "state_dict") else v) for k, v in state.items()}


def to_cpu(tree):
    """The tree with every tensor copied to the host (to compare a CUDA state with a loaded one)."""
    if isinstance(tree, torch.Tensor):
        return tree.cpu()
    if isinstance(tree, dict):
        return {k: to_cpu(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(to_cpu(v) for v in tree)
    return tree


def assert_same(expected, got, where: str = "state") -> None:
    """Equal trees, tensors compared as raw bytes (so NaN payloads and -0.0 count)."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(got, torch.Tensor), where
        assert expected.dtype == got.dtype and expected.shape == got.shape, where
        assert torch.equal(expected.reshape(-1).view(torch.uint8), got.reshape(-1).view(torch.uint8)), where
    elif isinstance(expected, dict):
        assert set(map(str, expected)) == set(map(str, got)), where
        lookup = {str(k): v for k, v in got.items()}
        for key, value in expected.items():
            assert_same(value, lookup[str(key)], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert len(expected) == len(got), where
        for i, (a, b) in enumerate(zip(expected, got, strict=True)):
            assert_same(a, b, f"{where}[{i}]")
    else:
        assert expected == got, where


class CommitGate:
    """Holds the writer before it writes the manifest (and so before it settles the overlap guard)
    while closed, so a test decides what comes first: the fence or an in-place update, or the
    commit. Overlap mode commits as soon as the copy is done and nothing changed, so without it a
    slow training thread (a loaded machine) could see its checkpoint commit before it gets there."""

    def __init__(self, monkeypatch) -> None:
        from asyncckpt import _phases

        self._open = threading.Event()
        self._open.set()
        real = _phases.pause

        def pause(phase: str) -> None:
            if phase == "manifest":
                assert self._open.wait(60), "CommitGate never opened"
            real(phase)

        monkeypatch.setattr(_phases, "pause", pause)

    def close(self) -> None:
        self._open.clear()

    def open(self) -> None:
        self._open.set()
