"""Flatten a training state into a JSON skeleton plus a list of tensors, and back.

The skeleton is what makes loading safe: it is plain JSON (never pickle), so reading a
checkpoint cannot execute code. Its node kinds and the paths that name nodes are defined in
``asyncckpt.state.skeleton``; this module builds skeletons from live objects (``flatten``),
rebuilds plain trees (``unflatten``), and restores into live objects in place.
"""

from __future__ import annotations

import collections
import json
import sys
import warnings
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import torch

from asyncckpt.errors import CheckpointError, StateMismatchError
from asyncckpt.format import dtype_name
from asyncckpt.state.names import ParameterNames, keyed_by_name, saved_name_forms, unwrap_module
from asyncckpt.state.skeleton import (
    CLASS_NAME,
    MAX_TREE_DEPTH,
    META,
    MODULE_LOAD_OPTIONS,
    TENSOR_KINDS,
    Kind,
    check_module_metadata,
    child_path,
    kind_of,
    object_path,
)

_MISSING = object()
_EXTRA_STATE = torch.nn.modules.module._EXTRA_STATE_KEY_SUFFIX
MAX_DEPTH = MAX_TREE_DEPTH


@dataclass
class FlatState:
    """What a save hands to staging: the skeleton and the unique tensors it indexes.

    Attributes:
        skeleton: the state's structure as plain JSON (see ``asyncckpt.state.skeleton``).
        tensors: each unique tensor once (tied ones share an index), detached.
        paths: the path of each tensor's first occurrence, for messages.
    """

    skeleton: dict
    tensors: list[torch.Tensor] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)


def is_stateful(obj: Any) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))


def _numpy_module():
    return sys.modules.get("numpy")


PLAIN_VALUES = frozenset({type(None), bool, int, float, str})  # stored as they are, by exact type


def check_dense(t: torch.Tensor, path: str) -> None:
    """Raise unless ``t`` is a dense tensor with data (what the format stores)."""
    if t.layout != torch.strided:
        raise TypeError(f"{path}: tensors with layout {t.layout} are not supported (dense only)")
    if t.is_nested:  # strided layout, but no strides of its own to read
        raise TypeError(f"{path}: nested tensors are not supported (dense only)")
    if t.is_quantized:
        raise TypeError(f"{path}: quantized tensors are not supported")
    if t.is_meta:  # not t.device.type: making the device object costs more than the rest of this
        raise TypeError(f"{path}: a meta tensor has no data to save")


def storage_address(t: torch.Tensor, path: str) -> int:
    """The address of ``t``'s storage.

    Raises:
        TypeError: ``t``'s memory cannot be read (a wrapper subclass, which has none of its own);
            the message names ``path``.
    """
    try:
        return t.untyped_storage().data_ptr()
    except RuntimeError as exc:
        kind = f"{type(t).__module__}.{type(t).__qualname__}"
        raise TypeError(f"{path}: the memory of this {kind} cannot be read ({exc})") from None


def tie_key(t: torch.Tensor, address: int, offset: Any, stride: tuple[Any, ...]) -> tuple:
    """What makes two non-empty tensors the same stored tensor: one memory viewed the same way.
    The storage's address, offset and stride are the caller's, read once for this and its other uses."""
    # t.shape as it is: a torch.Size hashes and compares as the tuple it is
    return (address, offset, t.shape, stride, t.dtype, t.device, t.is_conj(), t.is_neg())


_LEAF_KINDS = frozenset({Kind.TENSOR, Kind.NDARRAY, Kind.NUMPY_SCALAR, Kind.GLOBAL, Kind.DTYPE, Kind.DEVICE})


def _add_token(parts: list, node: dict) -> None:
    """Append to ``parts`` three items that tell ``node`` apart from every other, for
    :class:`NodeCache`: a leaf's kind and content, a value's with its exact type too (``1``,
    ``1.0`` and ``True`` are equal in Python, and so are ``0.0`` and ``-0.0``: a float, numpy's
    float64 included, is taken as ``float.hex``), a container's identity (it is a cached node).

    A key is one flat tuple of such items: the collector stops tracking a tuple of untracked
    items in the pass that finds it so, but it meets nested tuples outside in, so keys of tuples
    inside tuples would be promoted along with the nodes they save."""
    if len(node) == 1:
        for kind, content in node.items():
            if kind == Kind.VALUE:
                parts += (kind, type(content), float.hex(content) if isinstance(content, float) else content)
                return
            if kind in _LEAF_KINDS:
                parts += (kind, content, None)
                return
    parts += (None, id(node), None)


class NodeCache:
    """The container nodes of the last save's skeleton, for the next save to take again where
    they hold the same: a save of an unchanged model makes no new skeleton containers.

    Why: a skeleton lives as long as its save (through the writer, seconds), so CPython's cyclic
    collector promotes every new one to its oldest generation, and the objects promoted there
    trigger a full collection of the whole process every so often: on a large program hundreds
    of milliseconds, spent on whichever thread allocates (training's, mostly inside ``save``).
    Taken again, a skeleton's containers are promoted once.

    A node is looked up before it is made, by its kind and its children's tokens (``_add_token``);
    the lookup keys are flat tuples of plain values, which the collector stops tracking. Cached nodes
    are shared by the saves that take them, so nothing may change a skeleton once made (none of
    asyncckpt's code does: the writer only serialises it). Only the nodes of the last completed
    flatten are kept.
    """

    def __init__(self) -> None:
        self._last: dict[tuple, dict] = {}

    def find(self, key: tuple) -> dict | None:
        """The last completed flatten's node of ``key``, if it had one."""
        return self._last.get(key)

    def keep(self, taken: dict[tuple, dict]) -> None:
        """A flatten completed, having taken or made these nodes: the next one finds them."""
        self._last = taken


class _Flattener:
    # tensors of these exact types are leaves ``node`` would store as they are: a dict's are
    # added without the call (a subclass that stores some tensors otherwise leaves it empty)
    _leaf_tensor_types: frozenset[type] = frozenset({torch.Tensor, torch.nn.Parameter})

    def __init__(self, state: Any, nodes: NodeCache | None = None) -> None:
        self.tensors: list[torch.Tensor] = []
        self.paths: list[str] = []
        self._seen: dict[tuple, int] = {}
        self.names = ParameterNames(state)
        self._nodes = nodes
        self.taken: dict[tuple, dict] = {}  # the container nodes of this flatten, by NodeCache key

    def _take(self, key: tuple, make: Callable[[], dict]) -> dict:
        """The container node of ``key``: one this flatten or the last (``self._nodes``) took or
        made, else ``make()``."""
        node = self.taken.get(key)
        if node is None:
            node = self._nodes.find(key) if self._nodes is not None else None
            if node is None:
                node = make()
            self.taken[key] = node
        return node

    def optimizer_state(self, optimizer: torch.optim.Optimizer, path: str) -> Any:
        """The optimizer's state dict, keyed by its parameters' names where they all have one."""
        return self.named_state(optimizer)[0]

    def named_state(self, optimizer: torch.optim.Optimizer) -> tuple[Any, list[str] | None]:
        """The optimizer's state dict keyed by its parameters' names, and the names; its state
        dict as torch gives it and None where a parameter has no name or the layout is not
        torch's (``keyed_by_name``)."""
        state_dict = optimizer.state_dict()
        names = self.names.of(optimizer)
        if names is None:
            return state_dict, None
        keyed = keyed_by_name(state_dict, names)
        return (keyed, names) if keyed is not state_dict else (state_dict, None)

    def add_tensor(self, t: torch.Tensor, path: str) -> int:
        check_dense(t, path)
        # Tied tensors (one storage viewed identically under two names) are stored once.
        key = tie_key(t, storage_address(t, path), t.storage_offset(), t.stride()) if t.numel() else None
        return self.add_keyed(t, key, path)

    def add_keyed(self, t: torch.Tensor, key: tuple | None, path: str) -> int:
        """``add_tensor`` of a dense tensor whose :func:`tie_key` is known (None: never tied)."""
        if key is not None:
            index = self._seen.get(key)
            if index is not None:
                return index
            self._seen[key] = len(self.tensors)
        self.tensors.append(t.detach())
        self.paths.append(path)
        return len(self.tensors) - 1

    def node(self, obj: Any, path: str, depth: int) -> dict:
        if depth > MAX_DEPTH:
            raise ValueError(f"{path}: state is nested deeper than {MAX_DEPTH} levels")
        if type(obj) in PLAIN_VALUES:
            return {Kind.VALUE: obj}
        if isinstance(obj, torch.Tensor):
            return {Kind.TENSOR: self.add_tensor(obj, path)}
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return {Kind.VALUE: obj}
        if isinstance(obj, torch.dtype):
            try:
                return {Kind.DTYPE: dtype_name(obj)}
            except TypeError as exc:
                raise TypeError(f"{path}: {exc}") from None
        if isinstance(obj, torch.device):
            return {Kind.DEVICE: str(obj)}
        if isinstance(obj, dict):
            keys, children = [], []
            parts: list = [Kind.DICT, None]  # the NodeCache key; [1]: the metadata's token
            for key, value in obj.items():
                if type(key) is not str and (isinstance(key, bool) or not isinstance(key, (str, int))):
                    raise TypeError(
                        f"{path}: dict key {key!r} of type {type(key).__name__} is not supported "
                        "(keys must be str or int)"
                    )
                if type(value) in self._leaf_tensor_types and depth < MAX_DEPTH:  # the usual leaf, inline
                    index = self.add_tensor(value, child_path(path, key))
                    child = {Kind.TENSOR: index}
                    parts += (key, Kind.TENSOR, index, None)  # the key, then _add_token's leaf form
                else:
                    child = self.node(value, child_path(path, key), depth + 1)
                    parts.append(key)
                    _add_token(parts, child)
                keys.append(key)
                children.append(child)
            meta = getattr(obj, "_metadata", None)
            metadata = _module_metadata(meta, path) if isinstance(meta, dict) else None

            def make_dict() -> dict:
                out: dict = {Kind.DICT: [[key, child] for key, child in zip(keys, children, strict=True)]}
                if metadata is not None:
                    out[META] = metadata
                return out

            if self._nodes is None:
                return make_dict()
            parts[1] = _metadata_token(metadata)
            return self._take(tuple(parts), make_dict)
        if isinstance(obj, (list, tuple)):
            kind = Kind.LIST if isinstance(obj, list) else Kind.TUPLE
            items = [self.node(v, child_path(path, i), depth + 1) for i, v in enumerate(obj)]
            if self._nodes is None:
                return {kind: items}
            parts = [kind]
            for item in items:
                _add_token(parts, item)
            return self._take(tuple(parts), lambda: {kind: items})
        np = _numpy_module()
        if np is not None and isinstance(obj, np.ndarray):
            return {Kind.NDARRAY: self.add_tensor(_numpy_to_tensor(obj, path), path)}
        if np is not None and isinstance(obj, np.generic):
            return {Kind.NUMPY_SCALAR: self.add_tensor(_numpy_to_tensor(np.asarray(obj), path), path)}
        if is_stateful(obj):
            obj = unwrap_module(obj)
            inner = self.optimizer_state(obj, path) if isinstance(obj, torch.optim.Optimizer) else _state_dict_of(obj)
            child, name = self.node(inner, object_path(path), depth + 1), type(obj).__name__
            if self._nodes is None:
                return {Kind.OBJECT: child, CLASS_NAME: name}
            parts = [Kind.OBJECT, name]
            _add_token(parts, child)
            return self._take(tuple(parts), lambda: {Kind.OBJECT: child, CLASS_NAME: name})
        raise TypeError(
            f"{path}: cannot checkpoint a {type(obj).__module__}.{type(obj).__qualname__}; "
            "supported leaves are tensors, numpy arrays, None, bool, int, float, str, "
            "torch.dtype, torch.device and objects with state_dict()/load_state_dict()"
        )


def _module_metadata(meta: dict, path: str) -> dict:
    """A module state dict's ``_metadata`` as the skeleton keeps it (plain JSON, without how the
    dict was last loaded, which is not what it holds).

    Raises:
        TypeError: It is not plain JSON, or not the metadata a module writes.
    """
    metadata = _plain_json(meta, f"{path}._metadata")
    for local in metadata.values():
        if isinstance(local, dict):
            for option in MODULE_LOAD_OPTIONS.intersection(local):
                del local[option]
    check_module_metadata(metadata, lambda what: TypeError(f"{path}._metadata: {what}"))
    return metadata


def _metadata_token(metadata: dict | None) -> str | None:
    """A dict node's metadata for :class:`NodeCache`: its JSON, which tells ``1`` from ``True``."""
    return None if metadata is None else json.dumps(metadata)


def _state_dict_of(obj: Any) -> Any:
    """``obj.state_dict()``; a module's without detaching its parameters when nothing but torch's
    own code sees them (torch's method, not replaced on the instance, no state-dict post-hook in
    the tree): the flattener detaches the tensors it keeps, and a DTensor parameter's detach goes
    through DTensor's dispatcher (tens of microseconds each, every save)."""
    if (
        isinstance(obj, torch.nn.Module)
        and type(obj).state_dict is torch.nn.Module.state_dict
        and "state_dict" not in obj.__dict__
        and not any(getattr(m, "_state_dict_hooks", True) for m in obj.modules())
    ):
        return obj.state_dict(keep_vars=True)
    return obj.state_dict()


def _plain_json(obj: Any, path: str) -> Any:
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, dict) and all(isinstance(k, str) for k in obj):
        # a value of a plain type as it is, without the call and its path (a module's metadata
        # is hundreds of {"version": 1}, read at every save)
        return {k: v if type(v) in PLAIN_VALUES else _plain_json(v, child_path(path, k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain_json(v, child_path(path, i)) for i, v in enumerate(obj)]
    raise TypeError(f"{path}: {type(obj).__name__} is not JSON-serialisable")


def _numpy_to_tensor(array: Any, path: str) -> torch.Tensor:
    np = _numpy_module()
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))  # values kept, stored little-endian
    if any(stride < 0 for stride in array.strides):
        array = np.ascontiguousarray(array)
    try:
        return torch.from_numpy(array)
    except (TypeError, RuntimeError, ValueError) as exc:
        raise TypeError(f"{path}: numpy array of dtype {array.dtype} is not supported ({exc})") from None


def flatten(state: Any, nodes: NodeCache | None = None) -> FlatState:
    """Split a state into a JSON skeleton and its unique tensors.

    Args:
        state: the state to save: dicts (str or int keys), lists, tuples, tensors, numpy arrays and
            scalars, None, bool, int, float, str, torch.dtype, torch.device, and objects with
            ``state_dict()``/``load_state_dict()``, nested up to ``MAX_DEPTH`` levels.
        nodes: the last save's skeleton nodes, taken again where they hold the same (a manager's
            saves); the skeleton may then share nodes with other saves' and must not be changed.

    Returns:
        The skeleton, the unique tensors (tied tensors once) and their paths.

    Raises:
        TypeError: a leaf of an unsupported type or dtype, a sparse, quantized or meta tensor, a
            dict key that is not str or int, or malformed module metadata; the message names its path.
        ValueError: the state is nested deeper than ``MAX_DEPTH``.
    """
    flattener = _Flattener(state, nodes)
    skeleton = flattener.node(state, "state", 0)
    if nodes is not None:
        nodes.keep(flattener.taken)
    return FlatState(skeleton, flattener.tensors, flattener.paths)


def _leaf_from_tensor(kind: str, tensor: torch.Tensor) -> Any:
    if kind == Kind.TENSOR:
        return tensor
    array = tensor.cpu().numpy().copy()
    return array if kind == Kind.NDARRAY else array[()]


def unflatten(node: dict, tensors: list[torch.Tensor]) -> Any:
    """Rebuild a plain tree from a skeleton and its tensors.

    Args:
        node: a skeleton (or a node of one) made by ``flatten`` or validated by the reader.
        tensors: the tensors its indices refer to.

    Returns:
        The tree: dicts (an ``OrderedDict`` with ``_metadata`` for a module state dict), lists,
        tuples, tensors, numpy arrays and scalars, and values; each saved object as its state dict.

    Raises:
        CheckpointError: a node of an unknown kind (an unvalidated skeleton).
    """
    kind = kind_of(node)
    value = node[kind]
    if kind in TENSOR_KINDS:
        return _leaf_from_tensor(kind, tensors[value])
    if kind == Kind.VALUE:
        return value
    if kind == Kind.DTYPE:
        return getattr(torch, value)
    if kind == Kind.DEVICE:
        return torch.device(value)
    if kind == Kind.DICT:
        out: dict = collections.OrderedDict() if META in node else {}
        for key, child in value:
            out[key] = unflatten(child, tensors)
        if META in node:
            out._metadata = node[META]  # type: ignore[attr-defined]
        return out
    if kind == Kind.LIST:
        return [unflatten(child, tensors) for child in value]
    if kind == Kind.TUPLE:
        return tuple(unflatten(child, tensors) for child in value)
    return unflatten(value, tensors)  # an object: its state dict


# ---- restoring in place -------------------------------------------------------------------------
#
# A restore first plans against the whole live state (check_compatible) and only then writes
# (restore_into), so a mismatch found anywhere leaves everything as it was. The plan compares the
# key sets of every dict, module and optimizer, every tensor's shape, and whether each live tensor
# can be written in place at all; it also records which leaves strict=False must leave alone.

_SHOWN = 10  # entries of each list named in an error message; the exception holds them all


@dataclass(frozen=True)
class RestoreResult:
    """What ``restore(..., strict=False)`` and ``load_weights(..., strict=False)`` found not to fit.

    Returned instead of the bare step when ``strict=False``, so a caller who opts in cannot
    overlook what was left out. Entries are paths in the state, as error messages name them
    (``state['model'].state_dict()['0.bias']``); ``load_weights`` gives the model's own keys
    (``'0.bias'``), as torch's ``load_state_dict`` does. Made by the library, never by callers.

    Attributes:
        step: the restored step; None when the root holds no checkpoint.
        missing_keys: in the live state but not in the checkpoint; left as they were.
        unexpected_keys: in the checkpoint but not in the live state. In a plain dict (one the
            state holds itself, a state dict held as a dict included) the key is inserted with the
            checkpoint's value (a saved object as its state dict), so no data is lost; in a
            module's state dict or an optimizer's state it is ignored, as torch's
            ``load_state_dict(strict=False)`` ignores it.
        skipped: live tensors that cannot take data in place (a meta tensor, an overlapping view
            such as ``expand()``, an inference tensor); left as they were.
    """

    step: int | None
    missing_keys: tuple[str, ...] = ()
    unexpected_keys: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()


@dataclass
class RestorePlan:
    """What ``check_compatible`` found; ``restore_into`` follows it.

    Attributes:
        missing: paths in the live state the checkpoint lacks.
        unexpected: paths in the checkpoint the live state lacks.
        skipped: (path, why) of live tensors that cannot be written in place.
        errors: what is fatal whatever ``strict`` says: shapes, structure.
        leave: paths ``restore_into`` must not touch.
        module_keys: each module's ``state_dict()`` keys, by path.
        objects: (path, object, saved node) of stateful objects other than modules and optimizers,
            loaded first.
        optimizer_matches: by path, how an optimizer whose checkpoint names its parameters maps
            onto the live one.
    """

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why it cannot be written)
    errors: list[str] = field(default_factory=list)  # fatal whatever ``strict`` says: shapes, structure
    leave: set[str] = field(default_factory=set)  # paths restore_into must not touch
    module_keys: dict[str, list[str]] = field(default_factory=dict)  # each module's state_dict() keys
    objects: list[tuple[str, Any, dict]] = field(default_factory=list)  # other stateful objects, loaded first
    optimizer_matches: dict[str, _OptimizerMatch] = field(default_factory=dict)  # by path: saved by name

    def result(self, step: int | None) -> RestoreResult:
        """What ``strict=False`` returns.

        Args:
            step: the restored step.

        Returns:
            The step with the missing, unexpected and skipped paths.
        """
        return RestoreResult(step, tuple(self.missing), tuple(self.unexpected), tuple(p for p, _ in self.skipped))

    def raise_if_unfit(self, strict: bool, where: str) -> None:
        """Raise if the plan may not be carried out.

        Args:
            strict: whether missing, unexpected and skipped entries are fatal too.
            where: what the message calls the checkpoint.

        Raises:
            StateMismatchError: a fatal error, or with ``strict`` any missing, unexpected or skipped
                entry; the message lists them, the exception holds them all.
        """
        if not self.errors and not (strict and (self.missing or self.unexpected or self.skipped)):
            return
        lines = [f"{where} does not fit the live state; nothing was changed:"]
        lines += [f"  {e}" for e in self.errors[:_SHOWN]]
        if len(self.errors) > _SHOWN:
            lines.append(f"  ... and {len(self.errors) - _SHOWN} more")
        for title, items in (
            ("missing from the checkpoint", self.missing),
            ("unexpected in the checkpoint", self.unexpected),
            ("cannot be restored in place", [f"{p}: {why}" for p, why in self.skipped]),
        ):
            if items:
                more = f" ... and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
                lines.append(f"  {title} ({len(items)}): " + "; ".join(items[:_SHOWN]) + more)  # reasons hold commas
        if strict and not self.errors:
            lines.append("  (strict=False restores the matching part and returns these lists)")
        raise StateMismatchError(
            "\n".join(lines),
            missing_keys=tuple(self.missing),
            unexpected_keys=tuple(self.unexpected),
            skipped=tuple(p for p, _ in self.skipped),
        )


def _cannot_write(t: torch.Tensor) -> str | None:
    """Why ``t.copy_(...)`` would not put the checkpoint's values into ``t``, if it would not."""
    if t.device.type == "meta":
        return "a meta tensor has no data to restore into"
    if t.is_inference() and not torch.is_inference_mode_enabled():
        return "an inference tensor cannot be written outside torch.inference_mode()"
    if torch._debug_has_internal_overlap(t) == 1:
        return "its elements overlap in memory (an expand() view?), so it cannot be written in place"
    return None


def _holds_live_data(obj: Any, depth: int = 0) -> bool:
    """Tensors, dicts and stateful objects are updated in place, never silently replaced."""
    if isinstance(obj, (torch.Tensor, dict)) or is_stateful(obj):
        return True
    if isinstance(obj, (list, tuple)) and depth < MAX_DEPTH:
        return any(_holds_live_data(v, depth + 1) for v in obj)
    return False


def _describe_live(obj: Any) -> str:
    if isinstance(obj, torch.Tensor):
        return "a tensor"
    if isinstance(obj, (list, tuple)):
        return f"a {type(obj).__name__} of {len(obj)}"
    return f"a {type(obj).__name__}"


def _describe_node(node: dict) -> str:
    kind = kind_of(node)
    value = node[kind]
    names = {
        Kind.TENSOR: "a tensor",
        Kind.NDARRAY: "a numpy array",
        Kind.NUMPY_SCALAR: "a numpy scalar",
        Kind.DICT: "a dict",
    }
    if kind in names:
        return names[kind]
    if kind == Kind.LIST or kind == Kind.TUPLE:
        return f"a {'list' if kind == Kind.LIST else 'tuple'} of {len(value)}"
    if kind == Kind.OBJECT:
        return f"the state of a {node.get(CLASS_NAME, 'stateful object')}"
    return f"the value {str(value)[:40]!r}"


class _Planner:
    def __init__(self, tensors: list[torch.Tensor], state: Any = None) -> None:
        self.tensors = tensors
        self.plan = RestorePlan()
        self.names = ParameterNames(state)

    def _unexpected(self, path: str) -> None:
        self.plan.unexpected.append(path)
        self.plan.leave.add(path)

    def _kind_error(self, path: str, live: Any, node: dict) -> None:
        self.plan.errors.append(
            f"{path}: the live state holds {_describe_live(live)}, the checkpoint {_describe_node(node)}"
        )

    def visit(self, live: Any, node: dict, path: str) -> None:
        kind = kind_of(node)
        value = node[kind]
        if isinstance(live, torch.Tensor):
            if kind == Kind.TENSOR:
                self.tensor(live, self.tensors[value], path)
            else:
                self._kind_error(path, live, node)
        elif is_stateful(live):
            live = unwrap_module(live)
            if kind != Kind.OBJECT:
                self._kind_error(path, live, node)
            elif isinstance(live, torch.nn.Module):
                self.module(live, value, path)
            elif isinstance(live, torch.optim.Optimizer):
                if self._same_optimizer_class(live, node.get(CLASS_NAME), path):
                    self.optimizer(live, value, path)
            else:
                self.plan.objects.append((path, live, value))  # its own load_state_dict decides what fits
        elif isinstance(live, dict):
            if kind == Kind.DICT:
                self.mapping(live, value, path)
            else:
                self._kind_error(path, live, node)
        elif isinstance(live, (list, tuple)) and _holds_live_data(live):
            if kind == (Kind.LIST if isinstance(live, list) else Kind.TUPLE) and len(value) == len(live):
                for i, child in enumerate(value):
                    self.visit(live[i], child, child_path(path, i))
            else:
                self._kind_error(path, live, node)
        # any other live leaf is a value: the checkpoint's value replaces it

    def _same_optimizer_class(self, live: torch.optim.Optimizer, saved: Any, path: str) -> bool:
        """Whether a torch optimizer's checkpoint is one of its own kind (else it is left out, which
        only ``strict=False`` accepts): torch's ``load_state_dict`` takes another class's state
        (SGD's into Adam) and fails, or its next ``step`` does, only once the state was changed.
        Adam and AdamW hold the same state, and a subclass its base's; an optimizer of the user's
        own class, or a checkpoint that records none, is not judged by name."""
        cls = type(live)
        saved_cls = getattr(torch.optim, saved, None) if isinstance(saved, str) else None
        if (
            not isinstance(saved_cls, type)
            or not cls.__module__.startswith("torch.optim")
            or issubclass(cls, saved_cls)
            or issubclass(saved_cls, cls)
            or {saved, cls.__name__} <= _SAME_STATE_OPTIMIZERS
        ):
            return True
        self.plan.skipped.append(
            (
                object_path(path),
                f"the checkpoint holds the state of a torch.optim.{saved}, not of a {cls.__name__}: create a "
                f"{saved} to restore it",
            )
        )
        self.plan.leave.add(path)
        return False

    def tensor(self, live: torch.Tensor, saved: torch.Tensor, path: str) -> bool:
        """Check one in-place copy; False if it is to be left out."""
        if torch.nn.parameter.is_lazy(live):
            return True  # a lazy module's parameter takes its shape from the checkpoint when loaded
        if tuple(live.shape) != tuple(saved.shape):
            self.plan.errors.append(_shape_mismatch(path, live, saved))
            return False
        why = _cannot_write(live)
        if why is not None:
            self.plan.skipped.append((path, why))
            self.plan.leave.add(path)
            return False
        return True

    def mapping(self, live: dict, pairs: list, path: str) -> None:
        saved = set()
        for key, child in pairs:
            saved.add(key)
            if key in live:
                self.visit(live[key], child, child_path(path, key))
            else:
                self.plan.unexpected.append(child_path(path, key))  # strict=False inserts it: nothing conflicts
        self.plan.missing += [child_path(path, key) for key in live if key not in saved]

    def module(self, live: torch.nn.Module, inner: dict, path: str, name: Callable[[Any], str] | None = None) -> None:
        """A module's state dict: the same keys, every tensor fits. ``name`` names a key in messages."""
        where = object_path(path) if path else "the entry"
        name = name or (lambda key: child_path(where, key))
        if kind_of(inner) != Kind.DICT:
            self.plan.errors.append(f"{where}: the checkpoint holds {_describe_node(inner)}, not a state dict")
            return
        inner = _keyed_as_bare(live, inner)
        live_sd = live.state_dict()
        self.plan.module_keys[path] = list(live_sd)
        saved = set()
        for key, child in inner[Kind.DICT]:
            saved.add(key)
            value = live_sd.get(key, _MISSING) if isinstance(key, str) else _MISSING
            if value is _MISSING:
                self._unexpected(name(key))
            elif key.endswith(_EXTRA_STATE):
                pass  # any object, of any size: load_state_dict hands it to set_extra_state
            elif isinstance(value, torch.Tensor):
                if kind_of(child) != Kind.TENSOR:
                    self._kind_error(name(key), value, child)
                else:
                    self.tensor(value, self.tensors[child[Kind.TENSOR]], name(key))
        self.plan.missing += [name(key) for key in live_sd if key not in saved]

    def optimizer(self, live: torch.optim.Optimizer, inner: dict, path: str) -> None:
        """What torch's Optimizer.load_state_dict checks (only after changing nothing, but raising
        inside a restore), plus state shapes and meta parameters. A checkpoint that names its
        parameters is matched by name (see ``asyncckpt.state.names``), an older one by position."""
        where = object_path(path)
        cls = type(live).__name__
        top = dict(inner[Kind.DICT]) if kind_of(inner) == Kind.DICT else {}
        groups, states = top.get("param_groups"), top.get("state")
        if groups is None or states is None or kind_of(groups) != Kind.LIST or kind_of(states) != Kind.DICT:
            self.plan.errors.append(f"{where}: the checkpoint holds no optimizer state ('state' and 'param_groups')")
            return
        live_top = live.state_dict()
        self.plan.missing += [child_path(where, k) for k in live_top if k not in top]
        for key in top:
            if key not in live_top:
                self._unexpected(child_path(where, key))
        saved: list[list[Any]] = []
        fatal = len(self.plan.errors)
        for i, group in enumerate(groups[Kind.LIST]):
            gpath = child_path(child_path(where, "param_groups"), i)
            entries = dict(group[Kind.DICT]) if kind_of(group) == Kind.DICT else {}
            ids_node = entries.get("params", {Kind.VALUE: None})
            ids = [_leaf_value(c) for c in ids_node[Kind.LIST]] if kind_of(ids_node) == Kind.LIST else None
            if ids is None or _id_kind(ids) is None:
                self.plan.errors.append(f"{gpath}['params']: not a list of parameter indices or names")
                continue
            saved.append(ids)
        kind = _id_kind([x for ids in saved for x in ids])
        if len(self.plan.errors) == fatal and kind is None:
            self.plan.errors.append(f"{where}['param_groups']: some groups name their parameters, others number them")
        if len(self.plan.errors) > fatal:
            return
        if kind == "name":
            params = self._match_names(live, saved, where, cls, path)
        else:
            params = self._match_positions(live, saved, where, cls)
        if params is None:
            return  # the parameters cannot be matched up: their states say nothing more
        for key, per_param in states[Kind.DICT]:
            spath = child_path(child_path(where, "state"), key)
            param = params.get(key)
            if param is None:
                if spath not in self.plan.leave:
                    self._unexpected(spath)
            elif param.device.type == "meta":
                self.plan.skipped.append((spath, "its parameter is a meta tensor"))
                self.plan.leave.add(spath)
            elif kind_of(per_param) == Kind.DICT:
                have = live.state.get(param) or {}
                shaped = _PARAM_SHAPED if type(live).__module__.startswith("torch.optim") else ()
                for skey, snode in per_param[Kind.DICT]:
                    current = have.get(skey)
                    if kind_of(snode) != Kind.TENSOR:
                        continue
                    found = self.tensors[snode[Kind.TENSOR]]
                    if isinstance(current, torch.Tensor):
                        if tuple(current.shape) != tuple(found.shape):
                            self.plan.errors.append(_shape_mismatch(child_path(spath, skey), current, found))
                    elif (
                        skey in shaped
                        and not torch.nn.parameter.is_lazy(param)  # takes its shape when loaded
                        and tuple(found.shape) != tuple(param.shape)
                    ):
                        # no state yet (a fresh optimizer): its parameter's shape is what it must fit
                        self.plan.errors.append(
                            f"{child_path(spath, skey)}: shape mismatch, the checkpoint holds {tuple(found.shape)} "
                            f"for a parameter of shape {tuple(param.shape)}"
                        )

    def _match_positions(
        self, live: torch.optim.Optimizer, saved: list[list[Any]], where: str, cls: str
    ) -> dict[Any, torch.Tensor] | None:
        """A checkpoint that numbers its parameters: group i is the live group i, one by one."""
        count = len(live.param_groups)
        if len(saved) != count:
            self.plan.errors.append(f"{where}: the checkpoint has {len(saved)} param groups, the {cls} {count}")
            return None
        params: dict[Any, torch.Tensor] = {}
        fits = True
        for i, (ids, live_group) in enumerate(zip(saved, live.param_groups, strict=True)):
            if len(ids) != len(live_group["params"]):
                self.plan.errors.append(
                    f"{where}: param group {i} holds {len(ids)} parameters in the checkpoint, "
                    f"{len(live_group['params'])} in the {cls}"
                )
                fits = False
                continue
            params.update(zip(ids, live_group["params"], strict=True))
            # Hyperparameter keys are no state keys (torch never compares them): a scheduler adds
            # 'initial_lr', a newer torch adds options; the load keeps the saved ones and the rest.
        return params if fits else None

    def _match_names(
        self, live: torch.optim.Optimizer, saved: list[list[Any]], where: str, cls: str, path: str
    ) -> dict[Any, torch.Tensor] | None:
        """A checkpoint that names its parameters: each live parameter takes the state saved
        under its name (a tied one's under any of its names), each live group the hyperparameters
        of the saved group holding its parameters. A parameter one side lacks is missing or
        unexpected; groups split or merged are fatal. Live parameters with no names (their
        modules are not in the state) are paired by position, as torch pairs them."""
        aliases = self.names.aliases(live)
        if aliases is None:
            params = self._match_positions(live, saved, where, cls)
            if params is not None:
                keys: list[str | None] = [key for ids in saved for key in ids]
                self.plan.optimizer_matches[path] = _OptimizerMatch(keys, list(range(len(saved))), [])
            return params
        group_of: dict[str, int] = {}
        for s, ids in enumerate(saved):
            for name in ids:
                if name in group_of:
                    self.plan.errors.append(f"{where}: the checkpoint lists parameter {name!r} twice")
                    return None
                group_of[name] = s
        resolved = _saved_names_of(aliases, group_of)
        state_path = child_path(where, "state")
        keys = []
        matched: list[int | None] = []
        taken: dict[int, int] = {}  # saved group -> the live group that takes it
        missing: list[torch.Tensor] = []
        at = 0
        for j, group in enumerate(live.param_groups):
            names = aliases[at : at + len(group["params"])]
            own = resolved[at : at + len(group["params"])]
            sources = sorted({group_of[n] for n in own if n is not None})
            if len(sources) > 1:
                shown = ", ".join(repr(n[0]) for n in names[:3]) + (", ..." if len(names) > 3 else "")
                self.plan.errors.append(
                    f"{where}: param group {j} of the {cls} holds parameters the checkpoint keeps in its groups "
                    f"{sources} ({shown})"
                )
                return None
            source = sources[0] if sources else None
            if source is not None and source in taken:
                self.plan.errors.append(
                    f"{where}: the checkpoint's param group {source} holds parameters of the {cls}'s groups "
                    f"{taken[source]} and {j}"
                )
                return None
            if source is not None:
                taken[source] = j
            for key, candidates, param in zip(own, names, group["params"], strict=True):
                if key is None:
                    self.plan.missing.append(child_path(state_path, candidates[0]))
                    missing.append(param)
            keys += own
            matched.append(source)
            at += len(group["params"])
        for j, source in enumerate(matched):  # a group no name places (empty, or all new) pairs by position
            if source is None and j < len(saved) and j not in taken:
                matched[j] = taken[j] = j
        used = {key for key in keys if key is not None}
        for name in group_of:
            if name not in used:
                self._unexpected(child_path(state_path, name))
        moved = [(s, j) for j, s in enumerate(matched) if s is not None and s != j]
        if moved:
            warnings.warn(
                f"asyncckpt: {where}: the {cls}'s param groups are in another order than in the checkpoint "
                f"({', '.join(f'saved group {s} is group {j} now' for s, j in moved)}); their state and "
                "hyperparameters follow the parameters' names, but an LR scheduler's per-group values "
                "(base_lrs, lr_lambdas) are restored by position",
                stacklevel=5,
            )
        self.plan.optimizer_matches[path] = _OptimizerMatch(keys, matched, missing)
        live_params = [p for group in live.param_groups for p in group["params"]]
        return {key: p for key, p in zip(keys, live_params, strict=True) if key is not None}


def _saved_names_of(aliases: list[list[str]], saved: Collection[str]) -> list[str | None]:
    """For each live parameter (its names, ``aliases``), the saved name whose state it takes.

    A saved name is taken by the parameter of that name. Earlier versions kept torch.compile's
    ``_orig_mod`` in names (``names.saved_name_forms``): such a name stands for the same name
    without it, or, where the compiled model was a DDP wrapper, also without the ``module`` that
    followed it. One reading holds for the whole optimizer (whichever places more parameters,
    the first on a tie), and a form two saved names give is no one's: a saved name goes to one
    parameter at most, and never by a guess between two.
    """
    exact: list[str | None] = [next((n for n in names if n in saved), None) for names in aliases]
    taken = {name for name in exact if name is not None}
    best = exact
    for reading in (1, 2):
        stands_for: dict[str, str | None] = {}
        for name in saved:
            forms = saved_name_forms(name)
            if name not in taken and len(forms) > 1:
                form = forms[min(reading, len(forms) - 1)]
                stands_for[form] = None if form in stands_for else name  # None: two names give it
        resolved = [
            found if found is not None else next((stands_for[n] for n in names if stands_for.get(n)), None)
            for found, names in zip(exact, aliases, strict=True)
        ]
        if sum(name is not None for name in resolved) > sum(name is not None for name in best):
            best = resolved
    return best


def _id_kind(ids: list[Any]) -> str | None:
    """How a saved param group lists its parameters: "position" (ints), "name" (strs; an empty
    list is either), or None (neither, or a mix)."""
    if all(isinstance(x, int) and not isinstance(x, bool) for x in ids):
        return "position"
    if all(isinstance(x, str) for x in ids):
        return "name"
    return None


@dataclass
class _OptimizerMatch:
    """How a checkpoint that names an optimizer's parameters maps onto the live optimizer.

    Attributes:
        keys: For each live parameter, in param group order, the saved name whose state it
            takes (None: the checkpoint does not hold it).
        groups: For each live group, the saved group whose hyperparameters it takes (None: it
            keeps its own).
        missing: Live parameters the checkpoint does not hold; their state is left as it is.
    """

    keys: list[str | None]
    groups: list[int | None]
    missing: list[torch.Tensor]

    def for_torch(self, plain: dict, live: torch.optim.Optimizer) -> dict:
        """The saved state dict as the live optimizer's own ``state_dict()`` would lay it out:
        numbered by position, group by group (an optimizer's ``load_state_dict`` may index by
        number), torch's ``param_names`` the live groups' own."""
        groups, state, at = [], {}, 0
        for live_group, source in zip(live.param_groups, self.groups, strict=True):
            if source is None:
                group = {k: v for k, v in live_group.items() if k != "params"}
            else:
                group = dict(plain["param_groups"][source])
            count = len(live_group["params"])
            group["params"] = list(range(at, at + count))
            group.pop("param_names", None)
            if "param_names" in live_group:
                group["param_names"] = live_group["param_names"]
            for i in range(at, at + count):
                key = self.keys[i]
                if key is not None and key in plain["state"]:
                    state[i] = plain["state"][key]
            at += count
            groups.append(group)
        return {**plain, "state": state, "param_groups": groups}


# The state entries torch's own optimizers make in their parameter's shape (``zeros_like(param)``):
# a fresh optimizer has none to compare with, so these are held to the parameter's shape instead
# (another optimizer's state may take any shape: Adafactor's factored moments, for one).
_PARAM_SHAPED = frozenset(
    {"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "exp_inf", "momentum_buffer", "square_avg", "grad_avg"}
    | {"acc_delta", "sum", "prev", "step_size", "ax"}
)


def _shape_mismatch(path: str, live: torch.Tensor, saved: torch.Tensor) -> str:
    return (
        f"{path}: shape mismatch, the live tensor is {tuple(live.shape)} but the checkpoint holds {tuple(saved.shape)}"
    )


def _leaf_value(node: Any) -> Any:
    return node.get(Kind.VALUE) if isinstance(node, dict) and kind_of(node) == Kind.VALUE else None


def check_compatible(
    live: Any, node: dict, tensors: list[torch.Tensor], *, strict: bool = True, where: str = "the checkpoint"
) -> RestorePlan:
    """Plan a restore of the checkpoint into ``live``; raise StateMismatchError before anything changes.

    Always fatal: a root that cannot be updated in place, a shape mismatch, a live tensor, dict,
    module or optimizer where the checkpoint holds something else, an optimizer with other param
    groups. With ``strict`` also missing and unexpected keys (of dicts, module state dicts, optimizer
    states) and live tensors that cannot be written in place; without it those are left out. An
    optimizer's param group hyperparameters are not keys: they load as torch loads them.

    Args:
        live: the live state, a dict or list updated in place.
        node: the checkpoint's skeleton.
        tensors: the checkpoint's tensors.
        strict: whether missing and unexpected keys and unwritable tensors are fatal.
        where: what messages call the checkpoint.

    Returns:
        The plan ``restore_into`` follows.

    Raises:
        StateMismatchError: the checkpoint does not fit ``live``; nothing was changed.
    """
    kind = kind_of(node)
    value = node[kind]
    root_ok = (
        (kind == Kind.DICT and isinstance(live, dict))
        or (kind == Kind.LIST and isinstance(live, list) and len(live) == len(value))
        or (kind == Kind.OBJECT and is_stateful(live))  # a model or optimizer saved on its own
        or (kind == Kind.TENSOR and isinstance(live, torch.Tensor))
    )
    if not root_ok:
        n = len(value) if kind == Kind.LIST else 0
        saved = {
            Kind.DICT: "a dict",
            Kind.LIST: f"a list of {n}",
            Kind.OBJECT: "a stateful object (a module, an optimizer...)",
        }.get(kind, "a tensor" if kind in TENSOR_KINDS else "a value (not a container)")
        have = f"a list of {len(live)}" if isinstance(live, list) else f"a {type(live).__name__}"
        raise StateMismatchError(
            f"cannot restore in place: the checkpoint's root is {saved}, the state is {have} (restore updates a "
            "dict, a list, a module, an optimizer or a tensor in place; asyncckpt.load reads any checkpoint)"
        )
    planner = _Planner(tensors, live)
    planner.visit(live, node, "state")
    planner.plan.raise_if_unfit(strict, where)
    return planner.plan


def _keyed_as_bare(live: torch.nn.Module, node: dict) -> dict:
    """A module's saved state dict node keyed as the bare module ``live`` keys it.

    A checkpoint written before compiled models were saved bare holds a torch.compile'd model's
    state dict: every key, and its ``_metadata``'s, under ``_orig_mod.`` (``_orig_mod.module.``
    for a compiled DDP wrapper). Such a node is read without the prefix, unless the live module
    has keys under it too.
    """
    if kind_of(node) != Kind.DICT:
        return node
    live_keys: list[str] | None = None
    for wrapper in ("_orig_mod", "module"):
        prefix = wrapper + "."
        pairs = node[Kind.DICT]
        if not pairs or not all(isinstance(key, str) and key.startswith(prefix) for key, _ in pairs):
            return node
        live_keys = list(live.state_dict()) if live_keys is None else live_keys
        if any(key.startswith(prefix) for key in live_keys):
            return node
        cut = len(prefix)
        bare: dict = {Kind.DICT: [[key[cut:], child] for key, child in pairs]}
        meta = node.get(META)
        if isinstance(meta, dict):  # "" is the wrapper's own entry, ``wrapper`` the module's it holds
            bare[META] = {
                "" if key == wrapper else key[cut:]: value
                for key, value in meta.items()
                if key == wrapper or key.startswith(prefix)
            }
        node = bare
    return node


def check_module(
    module: torch.nn.Module, node: dict, tensors: list[torch.Tensor], *, strict: bool, where: str
) -> RestorePlan:
    """``check_compatible`` for one module and its saved state dict, naming keys as torch does.

    Args:
        module: the live module.
        node: the saved state dict's node.
        tensors: the checkpoint's tensors.
        strict: whether missing and unexpected keys and unwritable tensors are fatal.
        where: what messages call the entry.

    Returns:
        The plan ``load_module`` follows.

    Raises:
        StateMismatchError: the saved state dict does not fit ``module``; nothing was changed.
    """
    planner = _Planner(tensors)
    planner.module(module, node, "", name=str)
    planner.plan.raise_if_unfit(strict, where)
    return planner.plan


def load_module(
    module: torch.nn.Module,
    node: dict,
    tensors: list[torch.Tensor],
    plan: RestorePlan,
    path: str = "",
    name: Callable[[Any], str] = str,
) -> None:
    """Load a module's saved state dict, minus what the plan leaves out.

    The plan enforced ``strict`` already, against the keys ``state_dict()`` showed, so torch's own
    strict check is off: state_dict or load hooks that change the key set (a frozen backbone left
    out of the saved state) would make it raise after other parts were restored. If torch counts
    other keys than the plan did, the difference is a warning.

    Args:
        module: the live module, loaded in place.
        node: the saved state dict's node.
        tensors: the checkpoint's tensors.
        plan: what ``check_module`` or ``check_compatible`` found.
        path: the module's path in the state ("" for ``load_weights``), the plan's key for it.
        name: how the plan names a key of this module.

    Raises:
        Exception: whatever ``module.load_state_dict`` raises.
    """
    plain = unflatten(_keyed_as_bare(module, node), tensors)
    _drop_left_out(plain, plan, name)
    shown = set(plan.module_keys.get(path, ()))
    result = module.load_state_dict(plain, strict=False)
    missing = [k for k in result.missing_keys if k not in shown]  # the plan counted the others
    unexpected = list(result.unexpected_keys)
    counted = [
        f"{what} keys {keys[:_SHOWN]}" for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys
    ]
    if counted:
        warnings.warn(
            f"asyncckpt: {path or type(module).__name__}: {type(module).__name__}.load_state_dict reports "
            f"{' and '.join(counted)} that its state_dict() did not show (hooks that change the key set?); "
            "they were left as they were",
            stacklevel=2,
        )


def _drop_left_out(plain: dict, plan: RestorePlan, name: Callable[[Any], str]) -> None:
    for key in [k for k in plain if name(k) in plan.leave]:
        del plain[key]


def _load_optimizer(
    live: torch.optim.Optimizer, node: dict, tensors: list[torch.Tensor], plan: RestorePlan, path: str
) -> None:
    where = object_path(path)
    plain = unflatten(node, tensors)
    _drop_left_out(plain, plan, lambda key: child_path(where, key))
    _drop_left_out(plain["state"], plan, lambda key: child_path(child_path(where, "state"), key))
    match = plan.optimizer_matches.get(path)
    kept: dict[torch.Tensor, Any] = {}
    if match is not None:
        plain = match.for_torch(plain, live)
        kept = {p: live.state[p] for p in match.missing if p in live.state}  # load_state_dict drops them
    for i, group in enumerate(plain["param_groups"]):
        for key, current in live.param_groups[i].items():
            group.setdefault(key, current)  # a hyperparameter the checkpoint lacks stays as it is
    live.load_state_dict(plain)
    for param, state in kept.items():
        live.state[param] = state


_SAME_STATE_OPTIMIZERS = frozenset({"Adam", "AdamW"})  # torch optimizers whose states are alike


class _Restorer:
    def __init__(self, tensors: list[torch.Tensor], plan: RestorePlan) -> None:
        self.tensors = tensors
        self.plan = plan

    def into(self, live: Any, node: dict, path: str) -> Any:
        kind = kind_of(node)
        value = node[kind]
        tensors = self.tensors
        if kind == Kind.TENSOR and isinstance(live, torch.Tensor):
            if path not in self.plan.leave:
                with torch.no_grad():
                    live.copy_(tensors[value])
            return live
        if kind == Kind.OBJECT and is_stateful(live):
            if path in self.plan.leave:  # an optimizer of another kind, under strict=False
                return live
            if isinstance(live, (torch.nn.Module, torch.optim.Optimizer)):  # others were loaded first
                try:
                    if isinstance(live, torch.nn.Module):
                        where = object_path(path)
                        load_module(
                            unwrap_module(live),
                            value,
                            tensors,
                            self.plan,
                            path,
                            lambda key: child_path(where, key),
                        )
                    else:
                        _load_optimizer(live, value, tensors, self.plan, path)
                except Exception as exc:
                    raise CheckpointError(
                        f"{path}: {type(live).__name__}.load_state_dict failed: {exc}; the state is partly restored "
                        "(loaded in place up to this failure, which no check ahead could see): restore again or "
                        "start afresh"
                    ) from exc
            return live
        if kind == Kind.DICT and isinstance(live, dict):
            for key, child in value:
                entry = child_path(path, key)
                if entry not in self.plan.leave:
                    live[key] = self.into(live[key], child, entry) if key in live else unflatten(child, tensors)
            return live
        if kind == Kind.LIST and isinstance(live, list):
            if len(live) != len(value):  # values only (the plan checked the rest): replaced in place,
                live[:] = unflatten(node, tensors)  # so the list the training loop holds is the one restored
                return live
            for i, child in enumerate(value):
                live[i] = self.into(live[i], child, child_path(path, i))
            return live
        if kind == Kind.TUPLE and isinstance(live, tuple):
            if len(live) != len(value):
                return _same_tuple_type(live, list(unflatten(node, tensors)))
            return _same_tuple_type(live, [self.into(live[i], c, child_path(path, i)) for i, c in enumerate(value)])
        return unflatten(node, tensors)


def _same_tuple_type(live: tuple, items: list) -> tuple:
    """``items`` as a tuple of ``live``'s type: a namedtuple stays one (code reads its fields by
    name), and so does another tuple subclass that takes its items (``torch.Size``)."""
    if type(live) is tuple:
        return tuple(items)
    make = getattr(type(live), "_make", None)  # a namedtuple's
    try:
        return make(items) if callable(make) else type(live)(items)
    except Exception:  # noqa: BLE001 - a subclass whose constructor takes something else
        return tuple(items)


def restore_into(
    live: Any, node: dict, tensors: list[torch.Tensor], plan: RestorePlan | None = None, path: str = "state"
) -> Any:
    """Load the checkpoint node into ``live`` in place, following ``plan``; return the new value.

    Without a plan, a strict one is made first (``check_compatible``). Tensors are copied into the
    live tensors (keeping device and dtype), stateful objects get ``load_state_dict``, containers are
    updated in place, and other leaves are replaced. Stateful objects other than modules and
    optimizers (schedulers, GradScaler, samplers...) decide for themselves what fits, so they are
    loaded first: if one raises, those loaded before it are put back from their own
    ``state_dict()`` taken just before, and no tensor has been touched yet.

    Args:
        live: the live state.
        node: the checkpoint's skeleton (or the node for ``live``).
        tensors: the checkpoint's tensors.
        plan: what ``check_compatible`` found; None makes a strict plan first.
        path: ``live``'s path, as the plan names it.

    Returns:
        ``live`` updated in place, or the new value where a leaf was replaced.

    Raises:
        StateMismatchError: without a plan, the checkpoint does not fit ``live``.
        CheckpointError: a stateful object's ``load_state_dict`` failed.
    """
    if plan is None:
        plan = check_compatible(live, node, tensors)
    loaded: list[tuple[str, Any, Any]] = []
    try:
        for where, obj, inner in plan.objects:
            loaded.append((where, obj, obj.state_dict()))
            try:
                obj.load_state_dict(unflatten(inner, tensors))
            except Exception as exc:
                raise CheckpointError(f"{where}: {type(obj).__name__}.load_state_dict failed: {exc}") from exc
        return _Restorer(tensors, plan).into(live, node, path)
    except BaseException:
        _put_back(loaded)
        raise


def _put_back(loaded: list[tuple[str, Any, Any]]) -> None:
    for where, obj, before in reversed(loaded):
        try:
            obj.load_state_dict(before)
        except Exception as exc:  # noqa: BLE001 - the first failure is the one to raise
            warnings.warn(f"asyncckpt: could not put {where} back after a failed restore: {exc}", stacklevel=4)
