"""The asyncio façade mirrors the manager: every public method of CheckpointManager exists on
AsyncCheckpointManager with the same parameters (names, kinds, defaults), so a feature added to
one cannot be forgotten on the other."""

from __future__ import annotations

import inspect
import typing

import pytest

from asyncckpt import AsyncCheckpointManager, CheckpointManager

# Plain methods on the façade too: they do no I/O, or must run on the loop's own thread.
NOT_COROUTINES = {"due", "install_signal_handlers"}


def public_methods(cls: type) -> list[str]:
    return sorted(name for name, value in vars(cls).items() if not name.startswith("_") and callable(value))


def parameters(fn: typing.Callable) -> list[tuple[str, inspect._ParameterKind, object]]:
    """(name, kind, default) of every parameter but ``self``."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values() if p.name != "self"]


def test_the_manager_has_the_methods_this_test_knows_of():
    """Guards the enumeration itself: an empty list would make every check below pass."""
    assert {"save", "maybe_save", "restore", "wait", "close", "tag", "untag", "due", "steps"} <= set(
        public_methods(CheckpointManager)
    )


@pytest.mark.parametrize("name", public_methods(CheckpointManager))
def test_every_manager_method_is_on_the_facade_with_the_same_parameters(name):
    facade = getattr(AsyncCheckpointManager, name, None)
    assert facade is not None, f"AsyncCheckpointManager has no {name}()"
    assert parameters(facade) == parameters(getattr(CheckpointManager, name))
    assert inspect.iscoroutinefunction(facade) == (name not in NOT_COROUTINES), name


@pytest.mark.skipif(not hasattr(typing, "get_overloads"), reason="typing.get_overloads is Python 3.11+")
@pytest.mark.parametrize("name", public_methods(CheckpointManager))
def test_overloads_match(name):
    """``restore``'s overloads tell type checkers what ``strict`` returns: the façade says the same."""
    ours = [parameters(f) for f in typing.get_overloads(getattr(CheckpointManager, name))]
    facade = getattr(AsyncCheckpointManager, name, None)  # a missing method fails the test above
    theirs = [parameters(f) for f in typing.get_overloads(facade)] if facade is not None else ours
    assert theirs == ours
    if name == "restore":  # the registry works here: the comparison is not of two empty lists
        assert len(ours) == 3


def test_the_facade_opens_and_exits_as_the_manager_does():
    assert parameters(AsyncCheckpointManager.__aexit__) == parameters(CheckpointManager.__exit__)
    assert inspect.iscoroutinefunction(AsyncCheckpointManager.__aenter__)
