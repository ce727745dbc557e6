"""Canonical parameter names: what a checkpoint keys an optimizer's state by.

torch keys an optimizer's state by each parameter's position in its param groups. Restored by
position, a state lands on the wrong parameters when the order differs (a layer moved in the
model's code, param groups built in another order), silently so when the shapes agree. A
checkpoint keys it by name instead, as DCP's ``get_optimizer_state_dict`` does: each parameter's
name in the module of the same state that holds it (the prefixes of DDP, torch.compile and the
activation checkpoint wrapper left out, so DDP, FSDP2, a compiled and a bare model agree),
prefixed with that module's key in the state (``"gen.fc.weight"``) when one optimizer's
parameters come from several modules. A restore matches the names, so order no longer matters
and a parameter one side lacks is reported by name.

A parameter with several names (tied, or in a module registered at two places) is stored under
one of them and found by any of them, so the modules may be defined in another order.

Naming walks every module's parameters (what ``named_parameters()`` does), on the training
thread, at every save. The walk is therefore kept per module, holding the modules weakly, and
used while no module it met gained or lost an entry, every child module is still where it met
it, and, for each parameter a save asks about, the slot of its first name still holds it: the
name stored is always one the parameter has. Anything else walks the module again, and a restore
always walks afresh, to know every name. ``bench/flatten.py`` measures what keeping it saves.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

# name segments left out of names: the activation checkpoint wrapper's (its state dict hook
# leaves it out too) and torch.compile's, of a submodule compiled on its own (DCP leaves both out)
_COMPILED = "_orig_mod"
_WRAPPER_SEGMENTS = frozenset({"_checkpoint_wrapped_module", _COMPILED})
_MAX_DEPTH = 64  # containers searched for modules, as deep as a state may nest


def _compiled_module_type() -> type[Any] | None:
    """torch.compile's module wrapper class; None while dynamo is not loaded (no module is
    compiled then), so that looking does not load it."""
    return getattr(sys.modules.get("torch._dynamo.eval_frame"), "OptimizedModule", None)


def wrapped_modules(obj: Any) -> list[Any]:
    """``obj``, then the module each wrapper in turn holds (DistributedDataParallel,
    DataParallel, torch.compile's), the bare module last (``obj`` alone when it wraps nothing)."""
    chain: list[Any] = [obj]
    compiled = _compiled_module_type()
    while True:
        last = chain[-1]
        if isinstance(last, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            chain.append(last.module)
        elif compiled is not None and isinstance(last, compiled):
            chain.append(last._orig_mod)
        else:
            return chain


def unwrap_module(obj: Any) -> Any:
    """The bare module ``obj`` wraps (itself when it wraps nothing).

    A wrapper's state dict prefixes every key (``module.``, ``_orig_mod.``); the bare module's
    keeps the canonical parameter names, so a checkpoint saved under DDP, FSDP2, compiled or not
    restores into any of them, as with DCP's state dict helpers.
    """
    return wrapped_modules(obj)[-1]


@dataclass
class _ModuleWalk:
    """One walk of a module's parameters, holding the modules weakly (a cache must not keep a
    model alive). It walks a module shared at several places once per place, as ``state_dict()``
    does, so a parameter has every name its module gives it.

    Attributes:
        modules: Each module met (once), with its numbers of child and parameter entries.
        edges: (parent, key, child) of every child module entry of those modules.
        names: ``id(parameter) -> its names``, the first as ``named_parameters()`` gives it.
        slots: ``id(parameter) -> (owner, attribute)`` of its first name: a save checks it, so
            the name it stores is one the parameter has now.
    """

    modules: list[tuple[weakref.ref, int, int]]
    edges: list[tuple[weakref.ref, str, weakref.ref | None]]
    names: dict[int, list[str]]
    slots: dict[int, tuple[weakref.ref, str]]

    def holds(self) -> bool:
        """Whether no module met gained or lost a child or parameter entry and every child
        module is still where the walk met it."""
        for ref, children, params in self.modules:
            module = ref()
            if module is None or len(module._modules) != children or len(module._parameters) != params:
                return False
        for parent_ref, key, child_ref in self.edges:
            parent = parent_ref()
            if parent is None or parent._modules.get(key) is not (child_ref() if child_ref is not None else None):
                return False
        return True

    def anywhere(self, param: torch.Tensor) -> bool:
        """Whether any module met holds ``param`` (in a slot the walk may not know by it)."""
        for ref, _, _ in self.modules:
            module = ref()
            if module is not None and any(p is param for p in module._parameters.values()):
                return True
        return False

    def names_of(self, param: torch.Tensor) -> list[str] | None:
        """The parameter's names while the slot of its first name still holds it (the others
        may have changed since: a restore walks afresh)."""
        slot = self.slots.get(id(param))
        return self.names[id(param)] if slot is not None and _holds(slot, param) else None


def _holds(slot: tuple[weakref.ref, str], param: torch.Tensor) -> bool:
    owner = slot[0]()
    return owner is not None and owner._parameters.get(slot[1]) is param


_WALKS: weakref.WeakKeyDictionary[torch.nn.Module, _ModuleWalk] = weakref.WeakKeyDictionary()
_UNNAMED: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()  # in no module, as last found


def _walk(module: torch.nn.Module) -> _ModuleWalk:
    modules: list[tuple[weakref.ref, int, int]] = []
    edges: list[tuple[weakref.ref, str, weakref.ref | None]] = []
    names: dict[int, list[str]] = {}
    slots: dict[int, tuple[weakref.ref, str]] = {}
    met: set[int] = set()
    for prefix, owner in module.named_modules(remove_duplicate=False):
        held = weakref.ref(owner)
        if id(owner) not in met:  # a shared module is checked once, named at each place
            met.add(id(owner))
            modules.append((held, len(owner._modules), len(owner._parameters)))
            edges += [(held, key, None if c is None else weakref.ref(c)) for key, c in owner._modules.items()]
        for attr, param in owner._parameters.items():
            if param is None:
                continue
            names.setdefault(id(param), []).append(_without_wrappers(f"{prefix}.{attr}" if prefix else attr))
            slots.setdefault(id(param), (held, attr))
    walk = _ModuleWalk(modules, edges, names, slots)
    _WALKS[module] = walk
    return walk


def _without_wrappers(name: str) -> str:
    """``name`` without the segments of :data:`_WRAPPER_SEGMENTS`."""
    if not any(segment in name for segment in _WRAPPER_SEGMENTS):
        return name
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_SEGMENTS)


def saved_name_forms(name: str) -> list[str]:
    """A parameter name as a checkpoint holds it, then what it stands for now, most likely first.

    Earlier versions kept torch.compile's ``_orig_mod`` segments in the names of a compiled
    model's parameters: such a name is followed by itself without them, then also without the
    ``module`` that followed one (``_orig_mod.module.``: a compiled DDP wrapper), where that
    differs. Any other name is the only form of itself.
    """
    parts = name.split(".")
    if _COMPILED not in parts:
        return [name]
    bare: list[str] = []
    after_compiled = False
    for part in parts:
        if part != _COMPILED and not (after_compiled and part == "module"):
            bare.append(part)
        after_compiled = part == _COMPILED
    forms = [name, ".".join(p for p in parts if p != _COMPILED)]
    return forms if ".".join(bare) == forms[1] else [*forms, ".".join(bare)]


def _kept_walk(module: torch.nn.Module) -> _ModuleWalk:
    walk = _WALKS.get(module)
    return walk if walk is not None and walk.holds() else _walk(module)


def module_parameter_names(module: torch.nn.Module) -> dict[int, list[str]]:
    """``id(parameter) -> its names`` for a module's parameters, as a fresh walk finds them: the
    first is the name ``named_parameters()`` gives, the others a tied or shared parameter's other
    names; wrapper prefixes left out. The walk is kept for the saves that follow.

    Args:
        module: the module (a wrapper is the caller's to unwrap: :func:`unwrap_module`).
    """
    return dict(_walk(module).names)


def _modules_in(state: Any) -> Iterator[tuple[str, torch.nn.Module]]:
    """(dotted key, module) of each module the state's dicts, lists and tuples hold, in order; a
    wrapper gives its bare module. Stateful objects of other kinds are not searched."""
    stack: list[tuple[Any, str, int]] = [(state, "", 0)]
    while stack:
        obj, key, depth = stack.pop()
        if isinstance(obj, torch.nn.Module):
            yield key, unwrap_module(obj)
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
        self._walks: list[tuple[str, _ModuleWalk]] | None = None
        self._fresh = False

    def _walk_modules(self, fresh: bool) -> list[tuple[str, _ModuleWalk]]:
        """The state's modules' walks (kept ones where they hold, or all fresh), by module key."""
        self._fresh = self._fresh or fresh
        self._walks = [(key, (_walk if fresh else _kept_walk)(module)) for key, module in _modules_in(self._state)]
        return self._walks

    def _owners(self, optimizer: torch.optim.Optimizer) -> list[tuple[str, list[str]]] | None:
        """Per parameter, its module's key and its names there; None if one is in no module."""
        walks = self._walks if self._walks is not None else self._walk_modules(fresh=False)
        owners = []
        for group in optimizer.param_groups:
            for p in group["params"]:
                owner = None
                if len(walks) == 1:  # the common case, inlined: a save asks of every parameter
                    key, walk = walks[0]
                    slot = walk.slots.get(id(p))
                    if slot is not None and (held := slot[0]()) is not None and held._parameters.get(slot[1]) is p:
                        owner = key, walk.names[id(p)]
                else:
                    owner = self._find(p)
                if owner is None and not self._fresh and not self._known_loose(p):
                    # a parameter put in a slot since a kept walk: walk every module again
                    walks = self._walk_modules(fresh=True)
                    owner = self._find(p)
                if owner is None:
                    _UNNAMED[id(p)] = p  # not walked for again while no module met holds it
                    return None
                owners.append(owner)
        return owners

    def _known_loose(self, param: torch.Tensor) -> bool:
        """Found in no module before, and still in none of the modules met (a scan of their
        parameter entries, cheaper than walking them again)."""
        return _UNNAMED.get(id(param)) is param and not any(walk.anywhere(param) for _, walk in self._walks or ())

    def _find(self, param: torch.Tensor) -> tuple[str, list[str]] | None:
        """The key of the first module naming ``param``, and its names there."""
        for key, walk in self._walks or ():
            names = walk.names_of(param)
            if names is not None:
                return key, names
        return None

    def aliases(self, optimizer: torch.optim.Optimizer) -> list[list[str]] | None:
        """Every name of each of the optimizer's parameters, in param group order (a tied or
        shared parameter has several), from fresh walks: a restore asks, once, and must know
        every name a checkpoint may have been saved under; None as for :meth:`of`."""
        if not self._fresh:
            self._walk_modules(fresh=True)
        return self._qualified(optimizer)

    def of(self, optimizer: torch.optim.Optimizer) -> list[str] | None:
        """The names of the optimizer's parameters, in param group order (a tied parameter's
        first, as ``named_parameters()`` gives it); None when one of them is in no module of the
        state (the optimizer's state then stays keyed by position)."""
        every = self._qualified(optimizer)
        if every is None:
            return None
        names = [names[0] for names in every]
        return names if len(set(names)) == len(names) else None

    def _qualified(self, optimizer: torch.optim.Optimizer) -> list[list[str]] | None:
        """Each parameter's names, prefixed with its module's key when the optimizer's
        parameters come from several modules."""
        owners = self._owners(optimizer)
        if owners is None:
            return None
        if len({key for key, _ in owners}) == 1:
            return [names for _, names in owners]
        return [[f"{key}.{name}" for name in names] for key, names in owners]


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
