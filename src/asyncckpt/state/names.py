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

Naming walks every module's parameters, which costs about as much as taking its state dict (near
a millisecond for 300 parameters on a slow core), on the training thread, at every save. The walk
is therefore kept per module and checked at each use with plain lookups along it (every child
module and every parameter slot still where it was, no module with more or fewer entries): tens
of microseconds unless the model changed, and then it is walked again.
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
    """One walk of a module's parameters, in ``named_parameters()`` order.

    Attributes:
        modules: (module, its number of child entries, of parameter entries): each checked to be
            unchanged at every use.
        edges: (parent, name, child) of every child module.
        slots: (name, owning module, attribute) of every parameter entry.
    """

    modules: list[tuple[torch.nn.Module, int, int]]
    edges: list[tuple[torch.nn.Module, str, torch.nn.Module]]
    slots: list[tuple[str, torch.nn.Module, str]]


_WALKS: weakref.WeakKeyDictionary[torch.nn.Module, _ModuleWalk] = weakref.WeakKeyDictionary()


def _walk(module: torch.nn.Module) -> _ModuleWalk:
    modules, edges, slots = [], [], []
    for prefix, owner in module.named_modules():
        modules.append((owner, len(owner._modules), len(owner._parameters)))
        edges += [(owner, name, child) for name, child in owner._modules.items() if child is not None]
        slots += [(f"{prefix}.{attr}" if prefix else attr, owner, attr) for attr in owner._parameters]
    return _ModuleWalk(modules, edges, slots)


def _still_valid(walk: _ModuleWalk) -> bool:
    return all(len(m._modules) == n and len(m._parameters) == p for m, n, p in walk.modules) and all(
        parent._modules.get(name) is child for parent, name, child in walk.edges
    )


def module_parameter_names(module: torch.nn.Module, fresh: bool = False) -> dict[int, str]:
    """``id(parameter) -> name`` for a module's parameters, as ``named_parameters()`` names them
    (a tied parameter by its first name), wrapper prefixes left out.

    Args:
        module: the module (a DDP wrapper is the caller's to unwrap).
        fresh: walk the module again even when the kept walk still looks valid.
    """
    walk = None if fresh else _WALKS.get(module)
    if walk is None or not _still_valid(walk):
        walk = _walk(module)
        _WALKS[module] = walk
    names: dict[int, str] = {}
    for name, owner, attr in walk.slots:
        param = owner._parameters.get(attr)
        if param is not None and id(param) not in names:
            for prefix in _WRAPPER_PREFIXES:
                name = name.replace(prefix, "")
            names[id(param)] = name
    return names


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
        self._found: dict[int, tuple[str, str]] | None = None

    def _find(self, fresh: bool) -> dict[int, tuple[str, str]]:
        found: dict[int, tuple[str, str]] = {}
        for key, module in _modules_in(self._state):
            for pid, name in module_parameter_names(module, fresh).items():
                found.setdefault(pid, (key, name))
        return found

    def of(self, optimizer: torch.optim.Optimizer) -> list[str] | None:
        """The names of the optimizer's parameters, in param group order; None when one of them
        is in no module of the state (the optimizer's state then stays keyed by position)."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if self._found is None:
            self._found = self._find(fresh=False)
        if any(id(p) not in self._found for p in params):
            self._found = self._find(fresh=True)  # a module changed in a way the kept walk missed
        owners: list[tuple[str, str]] = []
        for p in params:
            owner = self._found.get(id(p))
            if owner is None:
                return None
            owners.append(owner)
        several = len({key for key, _ in owners}) > 1
        names = [f"{key}.{name}" if several else name for key, name in owners]
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
