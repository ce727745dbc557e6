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

A tied parameter is named by its first name, as ``named_parameters()`` names it; a restore also
accepts its other names, so the tied modules may be defined in another order.

Naming walks every module's parameters (what ``named_parameters()`` does), on the training
thread, at every save. The walk is therefore kept per module, holding the modules weakly, and
checked at each use against the modules as they are (their child and parameter keys in order,
each child the same object): a fresh walk would give the same names exactly when that check
passes, and the check is tuple comparisons where the walk is a recursion through generators.
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
    """One walk of a module's parameters, in ``named_parameters()`` order, holding the modules
    weakly (the cache must not keep a model alive).

    Attributes:
        modules: For each module met: a weak reference to it, its child modules' keys and
            children (weakly; None for an empty entry), and its parameters' keys, in order. A
            fresh walk gives the same result exactly when every one of these is unchanged.
        slots: (name, index into ``modules`` of the owner, attribute) of every parameter entry.
    """

    modules: list[tuple[weakref.ref, tuple[str, ...], tuple[weakref.ref | None, ...], tuple[str, ...]]]
    slots: list[tuple[str, int, str]]


_WALKS: weakref.WeakKeyDictionary[torch.nn.Module, _ModuleWalk] = weakref.WeakKeyDictionary()


def _walk(module: torch.nn.Module) -> _ModuleWalk:
    modules: list = []
    slots: list[tuple[str, int, str]] = []
    for prefix, owner in module.named_modules():
        children = tuple(None if c is None else weakref.ref(c) for c in owner._modules.values())
        slots += [(f"{prefix}.{attr}" if prefix else attr, len(modules), attr) for attr in owner._parameters]
        modules.append((weakref.ref(owner), tuple(owner._modules), children, tuple(owner._parameters)))
    return _ModuleWalk(modules, slots)


def _live_modules(walk: _ModuleWalk) -> list[torch.nn.Module] | None:
    """The walk's modules, or None when a fresh walk could differ (a module gone, a child or a
    parameter entry added, removed, renamed, reordered, or a child replaced)."""
    out = []
    for ref, keys, children, params in walk.modules:
        module = ref()
        if module is None or tuple(module._modules) != keys or tuple(module._parameters) != params:
            return None
        for child, held in zip(module._modules.values(), children, strict=True):
            if child is not (held() if held is not None else None):
                return None
        out.append(module)
    return out


def module_parameter_names(module: torch.nn.Module) -> dict[int, list[str]]:
    """``id(parameter) -> its names`` for a module's parameters, in ``named_parameters()`` order:
    the first is the name ``named_parameters()`` gives, the others a tied parameter's other
    names; wrapper prefixes left out.

    Args:
        module: the module (a DDP wrapper is the caller's to unwrap).
    """
    walk = _WALKS.get(module)
    modules = _live_modules(walk) if walk is not None else None
    if walk is None or modules is None:
        walk = _walk(module)
        _WALKS[module] = walk
        modules = _live_modules(walk)
        assert modules is not None
    names: dict[int, list[str]] = {}
    for name, owner, attr in walk.slots:
        param = modules[owner]._parameters.get(attr)
        if param is not None:
            for prefix in _WRAPPER_PREFIXES:
                name = name.replace(prefix, "")
            names.setdefault(id(param), []).append(name)
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
        self._found: dict[int, tuple[str, list[str]]] | None = None

    def _owners(self, optimizer: torch.optim.Optimizer) -> list[tuple[str, list[str]]] | None:
        """Per parameter, its module's key and its names there; None if one is in no module."""
        if self._found is None:
            self._found = {}
            for key, module in _modules_in(self._state):
                for pid, names in module_parameter_names(module).items():
                    self._found.setdefault(pid, (key, names))
        owners = []
        for group in optimizer.param_groups:
            for p in group["params"]:
                owner = self._found.get(id(p))
                if owner is None:
                    return None
                owners.append(owner)
        return owners

    def aliases(self, optimizer: torch.optim.Optimizer) -> list[list[str]] | None:
        """Every name of each of the optimizer's parameters, in param group order, the one
        :meth:`of` gives first (a tied parameter has several); None as for :meth:`of`."""
        owners = self._owners(optimizer)
        if owners is None:
            return None
        several = len({key for key, _ in owners}) > 1
        return [[f"{key}.{name}" if several else name for name in names] for key, names in owners]

    def of(self, optimizer: torch.optim.Optimizer) -> list[str] | None:
        """The names of the optimizer's parameters, in param group order (a tied parameter's
        first, as ``named_parameters()`` gives it); None when one of them is in no module of the
        state (the optimizer's state then stays keyed by position)."""
        aliases = self.aliases(optimizer)
        if aliases is None:
            return None
        names = [names[0] for names in aliases]
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
