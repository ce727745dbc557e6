"""Helpers shared by the overlap-mode tests: snapshot a live state, hold the writer before its commit."""

from __future__ import annotations

import copy
import threading

import torch


def plain(state: dict) -> dict:
    """A deep copy of the state as plain state dicts: what the checkpoint must hold (a wrapped
    model's bare module's, an optimizer's state keyed by its parameters' names in the state's
    modules)."""
    return {k: copy.deepcopy(_state_dict(v, state) if hasattr(v, "state_dict") else v) for k, v in state.items()}


def named_optimizer_state(optimizer: torch.optim.Optimizer, modules: list[torch.nn.Module]) -> dict:
    """``optimizer.state_dict()`` keyed by parameter name, as a checkpoint keys it: the names are
    the modules' own ``named_parameters()`` (one module's, unprefixed)."""
    names = {id(p): n for m in modules for n, p in bare(m).named_parameters()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    by_position = [names[id(p)] for p in params]
    sd = optimizer.state_dict()
    return {
        "state": {by_position[i]: v for i, v in sd["state"].items()},
        "param_groups": [{**g, "params": [by_position[i] for i in g["params"]]} for g in sd["param_groups"]],
    }


def bare(module: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP and torch.compile wrappers: a checkpoint holds its state dict."""
    while True:
        if isinstance(module, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            module = module.module
        elif isinstance(getattr(module, "_orig_mod", None), torch.nn.Module):
            module = module._orig_mod
        else:
            return module


def _state_dict(obj, state: dict):
    if isinstance(obj, torch.optim.Optimizer):
        modules = [v for v in state.values() if isinstance(v, torch.nn.Module)]
        return named_optimizer_state(obj, modules)
    return bare(obj).state_dict() if isinstance(obj, torch.nn.Module) else obj.state_dict()


def to_cpu(tree):
    """The tree with every tensor copied to the host (to compare a CUDA state with a loaded one)."""
    if isinstance(tree, torch.Tensor):
        return tree.cpu()
    if isinstance(tree, dict):
        return {k: to_cpu(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(to_cpu(v) for v in tree)
    return tree


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
