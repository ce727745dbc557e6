"""The JSON skeleton of a saved state: its node kinds, named once, and the one walker over it.

A checkpoint's manifest holds the state's structure as plain JSON (never pickle), so reading it
cannot execute code. Every node is a JSON object with exactly one *kind* key, whose value is the
node's content, plus at most one extra key:

    {"d": [[key, node], ...], "m": {...}?}   dict (str or int keys), optional module _metadata
    {"l": [node, ...]}  {"t": [node, ...]}     list, tuple
    {"T": i}   {"N": i}   {"S": i}             torch tensor, numpy array, numpy scalar (index i)
    {"v": value}                               None, bool, int, float, str
    {"dt": "float32"}   {"dev": "cuda:0"}      torch.dtype, torch.device
    {"o": node, "cls": "AdamW"}                object with state_dict()/load_state_dict()
    {"G": i}   a tensor of a multi-rank checkpoint, stored in pieces across ranks (global index i);
               only in the rank tables of a multi-rank checkpoint, never in a version-1 manifest

Those letters are :class:`Kind`; everything that reads a skeleton asks :func:`kind_of` and walks
it with :func:`walk` (the save side, ``state.tree.flatten``, builds nodes from :class:`Kind`). A
path names a node the way error messages, ``inspect`` and ``diff`` do:
``state['model'].state_dict()['0.weight']``. A *key* names it the way a user types it for
``load_weights(key=...)`` and ``export --key``: ``"models.0"``, ``"ema.model"``.

The walker is iterative, so a hostile skeleton nested thousands of levels deep costs no recursion;
:func:`validate` is the check a reader runs on an untrusted one before anything else touches it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

import torch

from asyncckpt.errors import CheckpointError

MAX_TREE_DEPTH = 64  # levels of nesting in a state; JSON and the recursive walks stay far from limits


class Kind:
    """The kinds of skeleton node: the one key (besides :data:`META` or :data:`CLASS_NAME`) a node holds.

    The values are what the manifest stores, so they never change. Plain strings rather than an
    Enum: they are the keys of the nodes ``flatten`` builds and of those JSON parsing makes, and
    every walk compares one on every node.
    """

    DICT: Final = "d"
    LIST: Final = "l"
    TUPLE: Final = "t"
    TENSOR: Final = "T"
    NDARRAY: Final = "N"
    NUMPY_SCALAR: Final = "S"
    VALUE: Final = "v"
    DTYPE: Final = "dt"
    DEVICE: Final = "dev"
    OBJECT: Final = "o"
    GLOBAL: Final = "G"  # a multi-rank checkpoint's tensor stored as pieces across ranks (index i)


KINDS: Final = frozenset(value for name, value in vars(Kind).items() if name.isupper())
META = "m"  # on a dict node: the module state dict's ``_metadata``
CLASS_NAME = "cls"  # on an object node: the saved object's class name (shown, never imported)
_EXTRAS = (META, CLASS_NAME)

TENSOR_KINDS = frozenset({Kind.TENSOR, Kind.NDARRAY, Kind.NUMPY_SCALAR})  # content: a tensor index
CONTAINER_KINDS = frozenset({Kind.DICT, Kind.LIST, Kind.TUPLE})
_EMPTY = {Kind.DICT: "{}", Kind.LIST: "[]", Kind.TUPLE: "()"}
_NOT_NUMPY = {"bfloat16", "complex32"}  # torch dtypes with no NumPy equivalent


def kind_of(node: dict) -> str:
    """The kind of a node of a skeleton made by ``flatten`` or passed by :func:`validate`.

    Args:
        node: one skeleton node.

    Returns:
        Its kind, one of the :class:`Kind` values.

    Raises:
        CheckpointError: the node's key is no kind (only a skeleton that skipped validation has one).
    """
    for key in node:
        if key != META and key != CLASS_NAME:
            if key in KINDS:
                return key
            break
    else:
        key = None
    raise CheckpointError(f"unknown skeleton node kind {key!r}")


# ------------------------------------------------------------------------------------------ paths


def child_path(path: str, key: Any) -> str:
    """The path of entry ``key`` (a dict key or a list index) of the container at ``path``.

    Args:
        path: the container's path, e.g. ``state['model']``.
        key: the entry's key or index.

    Returns:
        ``path[key]``, the key as Python writes it: ``state['model'][0]``.
    """
    return f"{path}[{key!r}]"


def object_path(path: str) -> str:
    """The path of the state dict of the stateful object at ``path``.

    Args:
        path: the object's path.

    Returns:
        ``path.state_dict()``.
    """
    return f"{path}.state_dict()"


@dataclass(frozen=True)
class Spelling:
    """How :func:`walk` spells the path of a child from its parent's.

    Attributes:
        item: the path of entry ``key`` of a dict, list or tuple at ``path``.
        inner: the path of the state dict of an object at ``path``.
    """

    item: Callable[[str, Any], str]
    inner: Callable[[str], str]


STATE_PATHS = Spelling(child_path, object_path)
"""``state['model'].state_dict()['0.weight']``: how messages, ``inspect`` and ``diff`` name a node."""

DOTTED = Spelling(lambda path, key: f"{path}.{key}" if path else str(key), lambda path: path)
"""``model.0.weight``: keys joined with dots, a saved object standing for its state dict (the
tensor names ``export`` writes)."""


# ----------------------------------------------------------------------------------------- walker


class Visit(NamedTuple):
    """One node met by :func:`walk`.

    Attributes:
        node: the node itself.
        kind: its kind.
        path: its path, spelled as the walk was asked to ("" when paths are not built).
        depth: levels below the walk's root (an object's state dict is one level below it).
    """

    node: dict
    kind: str
    path: str
    depth: int


def walk(
    root: dict,
    path: str | None = "state",
    spelling: Spelling = STATE_PATHS,
    check: Callable[[Any, int], str] | None = None,
) -> Iterator[Visit]:
    """Every node of a skeleton, parents before children, children in their saved order.

    Iterative (no recursion), so any depth is safe to walk.

    Args:
        root: the skeleton (or a node of it) to walk.
        path: the root's path; None builds no paths (each visit's path is ""), which is faster.
        spelling: how a child's path follows from its parent's.
        check: called as ``check(node, depth)`` on every node before anything reads it, returns
            the node's kind; an untrusted skeleton's walk passes one that raises on a malformed node.

    Yields:
        A :class:`Visit` for each node.

    Raises:
        CheckpointError: a node of an unknown kind (never in a validated skeleton).
    """
    build = path is not None
    item, inner = spelling.item, spelling.inner
    stack: list[tuple[Any, str, int]] = [(root, path or "", 0)]
    pop, push, extend = stack.pop, stack.append, stack.extend
    make = tuple.__new__  # a Visit without NamedTuple's Python-level __new__ (a quarter of a walk)
    dict_kind, list_kind, tuple_kind, object_kind = Kind.DICT, Kind.LIST, Kind.TUPLE, Kind.OBJECT  # locals: faster
    while stack:
        node, where, depth = pop()
        kind = kind_of(node) if check is None else check(node, depth)
        yield make(Visit, (node, kind, where, depth))
        value = node[kind]
        below = depth + 1
        if kind == dict_kind:
            if build:
                extend([(child, item(where, key), below) for key, child in reversed(value)])
            else:
                extend([(child, "", below) for _, child in reversed(value)])
        elif kind == list_kind or kind == tuple_kind:
            if build:
                extend([(value[i], item(where, i), below) for i in range(len(value) - 1, -1, -1)])
            else:
                extend([(child, "", below) for child in reversed(value)])
        elif kind == object_kind:
            push((value, inner(where) if build else "", below))


def leaves(root: dict, path: str = "state", spelling: Spelling = STATE_PATHS) -> Iterator[Visit]:
    """The leaves of a skeleton in order: tensors, values, dtypes, devices and empty containers.

    Args:
        root: the skeleton.
        path: the root's path.
        spelling: how paths are spelled.

    Yields:
        A :class:`Visit` for each leaf.
    """
    for visit in walk(root, path, spelling):
        if visit.kind == Kind.OBJECT or (visit.kind in CONTAINER_KINDS and visit.node[visit.kind]):
            continue
        yield visit


def empty_text(kind: str) -> str:
    """How an empty container is shown: ``{}``, ``[]`` or ``()``.

    Args:
        kind: a container kind.

    Returns:
        The container's empty literal.
    """
    return _EMPTY[kind]


def tensor_paths(root: dict, path: str = "state") -> dict[int, str]:
    """The path of the first occurrence of every tensor index (a tied tensor is saved once).

    Args:
        root: the skeleton.
        path: the root's path.

    Returns:
        Tensor index to path, e.g. ``{0: "state['model'].state_dict()['0.weight']"}``.
    """
    out: dict[int, str] = {}
    for visit in walk(root, path):
        if visit.kind in TENSOR_KINDS:
            out.setdefault(visit.node[visit.kind], visit.path)
    return out


def tensor_indices(node: dict) -> set[int]:
    """The indices of every tensor under a node (its own, if it is one).

    Args:
        node: a skeleton node.

    Returns:
        The tensor indices, each once.
    """
    return {visit.node[visit.kind] for visit in walk(node, None) if visit.kind in TENSOR_KINDS}


# ------------------------------------------------------------------------------------------- keys


class NoEntryError(CheckpointError):
    """A key names nothing in the checkpoint: no older checkpoint of the same state would hold it
    either, so readers that fall back from damage do not fall back from this."""


def _unwrap(node: dict) -> dict:
    while kind_of(node) == Kind.OBJECT:  # a saved object stands for its state dict
        node = node[Kind.OBJECT]
    return node


def _number(part: str) -> int | None:
    """``part`` as an int, or None: ``isdigit`` also passes ``'²'`` (and ``lstrip`` ``'--1'``), which
    ``int`` refuses, as it refuses over 4300 digits."""
    if not part.lstrip("-").isdigit():
        return None
    try:
        return int(part)
    except ValueError:
        return None


def _entry(node: dict, part: str) -> dict | None:
    """The child of ``node`` that one dotted-key part names, or None."""
    kind = kind_of(node)
    if kind == Kind.DICT:
        pairs = node[kind]
        found = next((child for key, child in pairs if key == part), None)  # a str key first
        number = _number(part) if found is None else None
        if number is not None:  # then an int key written out
            found = next((child for key, child in pairs if key == number and not isinstance(key, str)), None)
        return found
    if kind == Kind.LIST or kind == Kind.TUPLE:
        items = node[kind]
        index = _number(part) if part.isdigit() else None
        return items[index] if index is not None and index < len(items) else None
    return None


_LISTED = 20  # keys named in a NoEntryError


def _holdings(node: dict, at: str | None) -> str:
    """What the node a search stopped at offers (``at``: its key; None at the top), for a NoEntryError."""
    kind = kind_of(node)
    name = "the top level" if at is None else repr(at)
    if kind == Kind.DICT and node[kind]:
        keys = [repr(key) for key, _ in node[kind]]
        more = f", ... ({len(keys)} in all)" if len(keys) > _LISTED else ""
        title = "top-level keys" if at is None else f"keys under {at!r}"
        return f"{title}: " + ", ".join(keys[:_LISTED]) + more
    if kind == Kind.DICT:
        return f"{name} is an empty dict"
    if kind == Kind.LIST or kind == Kind.TUPLE:
        n = len(node[kind])
        noun = "list" if kind == Kind.LIST else "tuple"
        return f"{name} is a {noun} of {n}" + (f": indices 0 to {n - 1}" if n else "")
    names = {Kind.TENSOR: "a tensor", Kind.NDARRAY: "a numpy array", Kind.NUMPY_SCALAR: "a numpy scalar"}
    return f"{name} is {names.get(kind, 'a value')}, with no entries"


def subtree(root: dict, key: str, where: str = "the checkpoint") -> dict:
    """The node a user's key names, as ``load_weights(key=...)`` and ``export --key`` read it.

    ``key`` is an entry of the top-level dict (dots and all), else a dotted path: each part is a
    dict's str key, else its int key written out (``"3"``, ``"-1"``), else a list or tuple index.
    A saved object stands for its state dict, so ``"ema.model"`` reaches into an object saved
    under ``"ema"``, and the node returned is never an object node.

    Args:
        root: the skeleton.
        key: the key, e.g. ``"model"``, ``"models.0"``, ``"ema.model"``, ``"optimizer.state.3"``.
        where: what the skeleton belongs to, for the error message (a checkpoint's path).

    Returns:
        The node ``key`` names.

    Raises:
        NoEntryError: ``key`` names nothing; the message lists what exists where the search stopped.
    """
    node = _unwrap(root)
    if kind_of(node) == Kind.DICT:
        whole = next((child for k, child in node[Kind.DICT] if k == key), None)
        if whole is not None:
            return _unwrap(whole)
    parts = key.split(".")
    for i, part in enumerate(parts):
        child = _entry(node, part)
        if child is None:
            at = ".".join(parts[:i]) if i else None
            raise NoEntryError(f"{where} has no entry {key!r} ({_holdings(node, at)})")
        node = _unwrap(child)
    return node


# ------------------------------------------------------------------------------------- validation

# torch's load options, which ``load_state_dict(assign=True)`` writes into the state dict it was given:
# never saved (flatten strips them), and refused in a manifest, where one would make load_state_dict
# assign the checkpoint's tensors in place of the module's parameters instead of copying into them.
MODULE_LOAD_OPTIONS = frozenset({"assign_to_params_buffers"})


def check_module_metadata(meta: Any, error: Callable[[str], Exception]) -> None:
    """Check a module state dict's ``_metadata`` as ``nn.Module.load_state_dict`` reads it.

    It looks up ``meta.get(prefix)`` and compares each entry's ``"version"`` with ints, so any other
    shape would fail inside ``load_state_dict``, after earlier objects were restored. The reader
    rejects it as damage (and falls back); the writer strips torch's load options, then refuses to
    write anything else malformed.

    Args:
        meta: the metadata to check.
        error: makes the exception to raise from a description of the fault.

    Raises:
        Exception: ``error(...)``, when ``meta`` is not an object of objects keyed by module prefix,
            holds a load option, or a version that is not an integer.
    """
    if not isinstance(meta, dict):
        raise error(f"module metadata must be an object, not {type(meta).__name__}")
    for prefix, local in meta.items():
        if not isinstance(prefix, str) or not isinstance(local, dict):
            raise error(f"module metadata for {str(prefix)[:80]!r} must be an object keyed by module prefix")
        for name in MODULE_LOAD_OPTIONS.intersection(local):
            raise error(f"module metadata for {prefix[:80]!r} holds the load option {name!r}")
        version = local.get("version")
        if version is not None and (isinstance(version, bool) or not isinstance(version, int)):
            raise error(f"module metadata {prefix[:80]!r}: version {str(version)[:20]!r} is not an integer")


def validate(
    root: Any,
    tensor_dtypes: Sequence[str],
    *,
    known_dtypes: Collection[str],
    error: Callable[[str, str], Exception],
    where: str = "tree",
    globals_count: int | None = None,
) -> None:
    """Check an untrusted skeleton node by node before anything else walks it.

    Checked: every node is an object of exactly one known kind, nesting stays within twice
    :data:`MAX_TREE_DEPTH` (an object's state dict adds a level), tensor indices lie within the
    tensor table, a numpy leaf's dtype exists in NumPy, value leaves are JSON scalars, dtype and
    device leaves name ones torch knows, dict entries are ``[str-or-int key, node]`` pairs with no
    key twice, and ``m`` and ``cls`` sit only on dict and object nodes and are well formed.

    Args:
        root: the parsed JSON of the skeleton.
        tensor_dtypes: the dtype name of each tensor of the tensor table, by index.
        known_dtypes: every dtype name the format knows.
        error: makes the exception to raise, as ``error(where, what)``.
        where: what the messages call the skeleton.
        globals_count: the size of a multi-rank checkpoint's global tensor table, whose ``G``
            leaves index it; None (a version-1 manifest) refuses ``G`` leaves as an unknown kind.

    Raises:
        Exception: ``error(...)``, at the first malformed node.
    """
    n_tensors = len(tensor_dtypes)
    # locals, not attribute lookups: this runs on every node of skeletons of a million nodes
    tensor_kinds, kinds_known, extras = TENSOR_KINDS, KINDS, _EXTRAS
    tensor, value_kind, dtype_kind, device = Kind.TENSOR, Kind.VALUE, Kind.DTYPE, Kind.DEVICE
    dict_kind, list_kind, tuple_kind, global_kind = Kind.DICT, Kind.LIST, Kind.TUPLE, Kind.GLOBAL

    def check(node: Any, depth: int) -> str:
        if depth > 2 * MAX_TREE_DEPTH:  # a stateful node adds a level
            raise error(where, "nested too deeply")
        if not isinstance(node, dict):
            raise error(where, f"node {str(node)[:80]!r} is not an object")
        kinds = [k for k in node if k not in extras]
        if len(kinds) != 1:
            raise error(where, f"node has keys {sorted(node)[:5]}, expected exactly one kind")
        name = kinds[0]
        if META in node or CLASS_NAME in node:
            _check_extras(node, name, lambda what: error(where, what))
        if name not in kinds_known or (name == global_kind and globals_count is None):
            raise error(where, f"unknown node kind {name[:20]!r}")
        kind = name
        value = node[name]
        if kind in tensor_kinds:
            high = n_tensors - 1
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
                raise error(f"{where} tensor index", f"expected an integer in [0, {high}], got {value!r}"[:200])
            dtype = tensor_dtypes[value]
            if kind != tensor and (dtype in _NOT_NUMPY or dtype.startswith(("float8", "float4"))):
                raise error(where, f"a numpy leaf cannot hold {dtype}")
        elif kind == global_kind:
            high = (globals_count or 0) - 1
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
                raise error(f"{where} global tensor index", f"expected an integer in [0, {high}], got {value!r}"[:200])
        elif kind == value_kind:
            if value is not None and not isinstance(value, (bool, int, float, str)):
                raise error(where, "a value leaf must be null, bool, number or string")
        elif kind == dtype_kind:
            if not isinstance(value, str) or value not in known_dtypes:
                raise error(where, f"unknown dtype leaf {str(value)[:40]!r}")
        elif kind == device:
            if not isinstance(value, str) or not re.fullmatch(r"[a-z_]{1,16}(:[0-9]{1,4})?", value):
                raise error(where, f"bad device leaf {str(value)[:40]!r}")
            try:
                torch.device(value)
            except RuntimeError:
                raise error(where, f"unknown device {value!r}") from None
        elif kind == dict_kind:
            if not isinstance(value, list):
                raise error(where, "dict node must hold a list of pairs")
            keys = set()
            for pair in value:
                if (
                    not isinstance(pair, list)
                    or len(pair) != 2
                    or isinstance(pair[0], bool)
                    or not isinstance(pair[0], (str, int))
                ):
                    raise error(where, "dict entries must be [str-or-int key, node] pairs")
                if pair[0] in keys:  # a dict cannot hold a key twice: one of the two would be lost
                    raise error(where, f"duplicate key {str(pair[0])[:80]!r} in a dict node")
                keys.add(pair[0])
        elif kind == list_kind or kind == tuple_kind:
            if not isinstance(value, list):
                raise error(where, "list/tuple node must hold a list")
        return kind

    for _ in walk(root, None, check=check):
        pass


def _check_extras(node: dict, kind: str, error: Callable[[str], Exception]) -> None:
    """``m`` (module metadata) belongs to dict nodes, ``cls`` (a class name) to object nodes."""
    if META in node:
        if kind != Kind.DICT:
            raise error(f"module metadata on a {kind[:20]!r} node (only dict nodes carry it)")
        check_module_metadata(node[META], error)
    if CLASS_NAME in node:
        cls = node[CLASS_NAME]
        if kind != Kind.OBJECT or not isinstance(cls, str) or not 0 < len(cls) <= 256 or not cls.isprintable():
            raise error("'cls' must be a printable class name on an object node")
