"""Canonical parameter names: what a checkpoint keys an optimizer's state by.

torch keys an optimizer's state by each parameter's position in its param groups. Restored by
position, a state lands on the wrong parameters when the order differs (a layer moved in the
model's code, param groups built in another order), silently so when the shapes agree. A
checkpoint keys it by name instead, as DCP's ``get_optimizer_state_dict`` does: each parameter's
name in the module of the same state that holds it (a DDP wrapper's ``module.`` and an activation
checkpoint wrapper's prefix left out, so DDP, FSDP2 and a bare model agree), prefixed with that
module's key in the state (``"gen.fc.weight"``) when one optimizer's parameters come from several
modules. A restore matches the names, so order no longer matters and a parameter one side lacks
is reported by name.

A tied parameter is stored under one of its names (the first ``named_parameters()`` gives) and
found by any of them, so the tied modules may be defined in another order.

Naming walks every module's parameters (what ``named_parameters()`` does), on the training
thread, at every save. The walk is therefore kept per module, holding the modules weakly, and
used while every child module is still where it met it and, for each parameter asked about, the
slot it named still holds that parameter; anything else (a parameter added, replaced or moved)
walks the module again. ``bench/flatten.py`` measures what that saves.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.",)  # left out of the state dict by its own hook
_MAX_DEPTH = 64  # containers searched for modules, as deep as a state may nest


@dataclass
class _ModuleWalk:
    """One walk of a module's parameters, holding the modules weakly (a cache must not keep a
    model alive).

    Attributes:
        edges: (parent, key, child) of every child module entry met; all must still hold for the
            walk to be used (a child replaced, moved or gone makes it stale).
        names: ``id(parameter) -> its names``, the first as ``named_parameters()`` gave it.
        slots: ``id(parameter) -> (owner, attribute)`` of its first name: a parameter is named
            only while that slot still holds it.
    """

    edges: list[tuple[weakref.ref, str, weakref.ref | None]]
    names: dict[int, list[str]]
    slots: dict[int, tuple[weakref.ref, str]]

    def holds(self) -> bool:
        """Whether every child module is still where the walk met it."""
        for parent_ref, key, child_ref in self.edges:
            parent = parent_ref()
            if parent is None or parent._modules.get(key) is not (child_ref() if child_ref is not None else None):
                return False
        return True

    def names_of(self, param: torch.Tensor) -> list[str] | None:
        """The parameter's names, while the slot of its first name still holds it."""
        slot = self.slots.get(id(param))
        if slot is None:
            return None
        owner = slot[0]()
        return self.names[id(param)] if owner is not None and owner._parameters.get(slot[1]) is param else None


_WALKS: weakref.WeakKeyDictionary[torch.nn.Module, _ModuleWalk] = weakref.WeakKeyDictionary()


def _walk(module: torch.nn.Module) -> _ModuleWalk:
    edges: list[tuple[weakref.ref, str, weakref.ref | None]] = []
    names: dict[int, list[str]] = {}
    slots: dict[int, tuple[weakref.ref, str]] = {}
    for prefix, owner in module.named_modules():
        held = weakref.ref(owner)
        edges += [(held, key, None if child is None else weakref.ref(child)) for key, child in owner._modules.items()]
        for attr, param in owner._parameters.items():
            if param is None:
                continue
            name = f"{prefix}.{attr}" if prefix else attr
            for wrapper in _WRAPPER_PREFIXES:
                name = name.replace(wrapper, "")
            if id(param) not in names:
                slots[id(param)] = (held, attr)
            names.setdefault(id(param), []).append(name)
    walk = _ModuleWalk(edges, names, slots)
    _WALKS[module] = walk
    return walk


def _kept_walk(module: torch.nn.Module) -> _ModuleWalk:
    walk = _WALKS.get(module)
    return walk if walk is not None and walk.holds() else _walk(module)


def module_parameter_names(module: torch.nn.Module) -> dict[int, list[str]]:
    """``id(parameter) -> its names`` for a module's parameters: the first is the name
    ``named_parameters()`` gives (when the module was walked), the others a tied parameter's
    other names; wrapper prefixes left out.

    Args:
        module: the module (a DDP wrapper is the caller's to unwrap).
    """
    walk = _kept_walk(module)
    if not all(walk.names_of(p) is not None for p in module.parameters()):
        walk = _walk(module)
    return {id(p): walk.names[id(p)] for p in module.parameters()}


def _modules_in(state: Any) -> Iterator[tuple[str, torch.nn.Module]]:
    """(dotted key, module) of each module the state's dicts, lists and tuples hold, in order; a
    DDP wrapper gives its module. Stateful objects of other kinds are not searched."""
    stack: list[tuple[Any, str, int]] = [(state, "", 0)]
    while stack:
        obj, key, depth = stack.pop()
        if isinstance(obj, torch.nn.Module):
            while isinstance(obj, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
                obj = obj.module
            yield key, obj
        elif depth < _MAX_DEPTH and isinstance(obj, dict):
            stack += [(v, f"{key}.{k}" if key else str(k), depth + 1) for k, v in reversed(obj.items())]
        elif depth < _MAX_DEPTH and isinstance(obj, (list, tuple)):
            stack += [(v, f"{key}.{i}" if key else str(i), depth + 1) for i, v in reversed(list(enumerate(obj)))]


class ParameterNames:
    """The names of the parameters of the modules one state holds, for its optimizers.

    Made per save and per restore; the modules are looked for when the first optimizer asks.
    """

    def __init__(self, state: Any) -> None:
        self._state = state
        self._walks: list[tuple[str, torch.nn.Module, _ModuleWalk]] | None = None
        self._fresh = False

    def _owners(self, optimizer: torch.optim.Optimizer) -> list[tuple[str, list[str]]] | None:
        """Per parameter, its module's key and its names there; None if one is in no module."""
        if self._walks is None:
            self._walks = [(key, module, _kept_walk(module)) for key, module in _modules_in(self._state)]
        owners = []
        walks = self._walks
        for group in optimizer.param_groups:
            for p in group["params"]:
                owner = None
                if len(walks) == 1:  # the common case, inlined: a save asks of every parameter
                    key, _, walk = walks[0]
                    slot = walk.slots.get(id(p))
                    if slot is not None and (held := slot[0]()) is not None and held._parameters.get(slot[1]) is p:
                        owner = key, walk.names[id(p)]
                else:
                    owner = self._find(p)
                if owner is None and not self._fresh:  # a parameter added or moved since a kept walk
                    self._walks = walks = [(key, module, _walk(module)) for key, module, _ in walks]
                    self._fresh = True
                    owner = self._find(p)
                if owner is None:
                    return None
                owners.append(owner)
        return owners

    def _find(self, param: torch.Tensor) -> tuple[str, list[str]] | None:
        """The first module's key and names of ``param`` (``_ModuleWalk.names_of``, inlined)."""
        pid = id(param)
        for key, _, walk in self._walks or ():
            slot = walk.slots.get(pid)
            if slot is not None:
                owner = slot[0]()
                if owner is not None and owner._parameters.get(slot[1]) is param:
                    return key, walk.names[pid]
        return None

    def aliases(self, optimizer: torch.optim.Optimizer) -> list[list[str]] | None:
        """Every name of each of the optimizer's parameters, in param group order, the one
        :meth:`of` gives first (a tied parameter has several); None as for :meth:`of`."""
        owners = self._owners(optimizer)
        if owners is None:
            return None
        if len({key for key, _ in owners}) == 1:
            return [names for _, names in owners]
        return [[f"{key}.{name}" for name in names] for key, names in owners]

    def of(self, optimizer: torch.optim.Optimizer) -> list[str] | None:
        """The names of the optimizer's parameters, in param group order (a tied parameter's
        first, as ``named_parameters()`` gives it); None when one of them is in no module of the
        state (the optimizer's state then stays keyed by position)."""
        owners = self._owners(optimizer)
        if owners is None:
            return None
        if len({key for key, _ in owners}) == 1:
            names = [names[0] for _, names in owners]
        else:
            names = [f"{key}.{names[0]}" for key, names in owners]
        return names if len(set(names)) == len(names) else None


def keyed_by_name(state_dict: Any, names: list[str]) -> Any:
    """An optimizer's ``state_dict()`` with its parameters named: the ``state`` keys and each
    group's ``params`` become the names (``names``: by position, as :meth:`ParameterNames.of`).

    A state dict not laid out as torch's (``params`` not the positions 0..n-1 in order, a
    ``state`` key that is no position: an optimizer of its own making) is returned as it is.
    """
    if not isinstance(state_dict, dict):
        return state_dict
    groups, state = state_dict.get("param_groups"), state_dict.get("state")
    if not isinstance(groups, list) or not isinstance(state, dict):
        return state_dict
    if not all(isinstance(group, dict) and isinstance(group.get("params"), list) for group in groups):
        return state_dict
    if [i for group in groups for i in group["params"]] != list(range(len(names))):
        return state_dict
    if not all(type(key) is int and 0 <= key < len(names) for key in state):
        return state_dict
    out = dict(state_dict)
    out["state"] = {names[key]: value for key, value in state.items()}
    out["param_groups"] = [{**group, "params": [names[i] for i in group["params"]]} for group in groups]
    return out
