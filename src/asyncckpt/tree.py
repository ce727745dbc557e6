"""Flatten a training state into a JSON skeleton plus a list of tensors, and back.

The skeleton is what makes loading safe: it is plain JSON (never pickle), so reading a
checkpoint cannot execute code. Every node is a one-key dict whose key says its kind:

    {"d": [[key, node], ...], "m": {...}?}   dict (str or int keys), optional module _metadata
    {"l": [node, ...]}  {"t": [node, ...]}     list, tuple
    {"T": i}   {"N": i}   {"S": i}             torch tensor, numpy array, numpy scalar (index i)
    {"v": value}                               None, bool, int, float, str
    {"dt": "float32"}   {"dev": "cuda:0"}      torch.dtype, torch.device
    {"o": node, "cls": "AdamW"}                object with state_dict()/load_state_dict()
"""

from __future__ import annotations

import collections
import sys
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import CheckpointError
from .format import MAX_TREE_DEPTH, check_module_metadata, dtype_name

_MISSING = object()
MAX_DEPTH = MAX_TREE_DEPTH


@dataclass
class FlatState:
    """What a save hands to staging: the skeleton and the unique tensors it indexes."""

    skeleton: dict
    tensors: list[torch.Tensor] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)  # path of each tensor's first occurrence


def _is_stateful(obj: Any) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))


def _numpy_module():
    return sys.modules.get("numpy")


def _child(path: str, key: Any) -> str:
    return f"{path}[{key!r}]"


class _Flattener:
    def __init__(self) -> None:
        self.tensors: list[torch.Tensor] = []
        self.paths: list[str] = []
        self._seen: dict[tuple, int] = {}

    def add_tensor(self, t: torch.Tensor, path: str) -> int:
        if t.layout != torch.strided:
            raise TypeError(f"{path}: tensors with layout {t.layout} are not supported (dense only)")
        if t.is_quantized:
            raise TypeError(f"{path}: quantized tensors are not supported")
        if t.device.type == "meta":
            raise TypeError(f"{path}: a meta tensor has no data to save")
        if t.numel() > 0:
            # Tied tensors (one storage viewed identically under two names) are stored once.
            key = (
                t.untyped_storage().data_ptr(),
                t.storage_offset(),
                tuple(t.shape),
                t.stride(),
                t.dtype,
                t.device,
                t.is_conj(),
                t.is_neg(),
            )
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
        if isinstance(obj, torch.Tensor):
            return {"T": self.add_tensor(obj, path)}
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return {"v": obj}
        if isinstance(obj, torch.dtype):
            try:
                return {"dt": dtype_name(obj)}
            except TypeError as exc:
                raise TypeError(f"{path}: {exc}") from None
        if isinstance(obj, torch.device):
            return {"dev": str(obj)}
        if isinstance(obj, dict):
            items = []
            for key, value in obj.items():
                if isinstance(key, bool) or not isinstance(key, (str, int)):
                    raise TypeError(
                        f"{path}: dict key {key!r} of type {type(key).__name__} is not supported "
                        "(keys must be str or int)"
                    )
                items.append([key, self.node(value, _child(path, key), depth + 1)])
            out: dict = {"d": items}
            meta = getattr(obj, "_metadata", None)
            if isinstance(meta, dict):
                out["m"] = _plain_json(meta, f"{path}._metadata")
                check_module_metadata(out["m"], lambda what: TypeError(f"{path}._metadata: {what}"))
            return out
        if isinstance(obj, list):
            return {"l": [self.node(v, _child(path, i), depth + 1) for i, v in enumerate(obj)]}
        if isinstance(obj, tuple):
            return {"t": [self.node(v, _child(path, i), depth + 1) for i, v in enumerate(obj)]}
        np = _numpy_module()
        if np is not None and isinstance(obj, np.ndarray):
            return {"N": self.add_tensor(_numpy_to_tensor(obj, path), path)}
        if np is not None and isinstance(obj, np.generic):
            return {"S": self.add_tensor(_numpy_to_tensor(np.asarray(obj), path), path)}
        if _is_stateful(obj):
            inner = obj.state_dict()
            return {"o": self.node(inner, f"{path}.state_dict()", depth + 1), "cls": type(obj).__name__}
        raise TypeError(
            f"{path}: cannot checkpoint a {type(obj).__module__}.{type(obj).__qualname__}; "
            "supported leaves are tensors, numpy arrays, None, bool, int, float, str, "
            "torch.dtype, torch.device and objects with state_dict()/load_state_dict()"
        )


def _plain_json(obj: Any, path: str) -> Any:
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, dict) and all(isinstance(k, str) for k in obj):
        return {k: _plain_json(v, _child(path, k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain_json(v, _child(path, i)) for i, v in enumerate(obj)]
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


def flatten(state: Any) -> FlatState:
    """Split ``state`` into a JSON skeleton and its unique tensors; raise naming the bad path."""
    flattener = _Flattener()
    skeleton = flattener.node(state, "state", 0)
    return FlatState(skeleton, flattener.tensors, flattener.paths)


def _leaf_from_tensor(kind: str, tensor: torch.Tensor) -> Any:
    if kind == "T":
        return tensor
    array = tensor.cpu().numpy().copy()
    return array if kind == "N" else array[()]


def unflatten(node: dict, tensors: list[torch.Tensor]) -> Any:
    """Rebuild a plain tree (stateful objects become their state dicts)."""
    (kind,) = [k for k in node if k != "m" and k != "cls"]
    value = node[kind]
    if kind in ("T", "N", "S"):
        return _leaf_from_tensor(kind, tensors[value])
    if kind == "v":
        return value
    if kind == "dt":
        return getattr(torch, value)
    if kind == "dev":
        return torch.device(value)
    if kind == "d":
        out: dict = collections.OrderedDict() if "m" in node else {}
        for key, child in value:
            out[key] = unflatten(child, tensors)
        if "m" in node:
            out._metadata = node["m"]  # type: ignore[attr-defined]
        return out
    if kind == "l":
        return [unflatten(child, tensors) for child in value]
    if kind == "t":
        return tuple(unflatten(child, tensors) for child in value)
    if kind == "o":
        return unflatten(value, tensors)
    raise CheckpointError(f"unknown skeleton node kind {kind!r}")


def _node_kind(node: dict) -> str:
    return next(k for k in node if k not in ("m", "cls"))


def check_compatible(live: Any, node: dict, tensors: list[torch.Tensor]) -> None:
    """Raise before anything is modified if ``live`` cannot take the checkpoint in place.

    The root must be updatable in place (a dict, or a list of the checkpoint's length), and every
    live tensor must have the shape the checkpoint holds for it.
    """
    kind = _node_kind(node)
    value = node[kind]
    root_ok = (kind == "d" and isinstance(live, dict)) or (
        kind == "l" and isinstance(live, list) and len(live) == len(value)
    )
    if not root_ok:
        saved = {"d": "a dict", "l": f"a list of {len(value) if kind == 'l' else 0}"}.get(kind, f"a {kind!r} node")
        have = f"a list of {len(live)}" if isinstance(live, list) else f"a {type(live).__name__}"
        raise CheckpointError(f"cannot restore in place: the checkpoint's root is {saved}, the state is {have}")
    _check_shapes(live, node, tensors, "state")


def _check_shapes(live: Any, node: dict, tensors: list[torch.Tensor], path: str) -> None:
    kind = _node_kind(node)
    value = node[kind]
    if kind == "T" and isinstance(live, torch.Tensor):
        saved = tensors[value]
        if tuple(live.shape) != tuple(saved.shape):
            raise CheckpointError(
                f"{path}: shape mismatch, the live tensor is {tuple(live.shape)} but the "
                f"checkpoint holds {tuple(saved.shape)}"
            )
    elif kind == "o" and _is_stateful(live):
        _check_shapes(live.state_dict(), value, tensors, f"{path}.state_dict()")
    elif kind == "d" and isinstance(live, dict):
        for key, child in value:
            if key in live:
                _check_shapes(live[key], child, tensors, _child(path, key))
    elif kind in ("l", "t") and isinstance(live, (list, tuple)) and len(live) == len(value):
        for i, child in enumerate(value):
            _check_shapes(live[i], child, tensors, _child(path, i))


def restore_into(live: Any, node: dict, tensors: list[torch.Tensor], path: str = "state") -> Any:
    """Load the checkpoint node into ``live`` in place where possible; return the new value.

    Tensors are copied into the live tensor (keeping its device and dtype), stateful objects get
    ``load_state_dict``, containers are updated in place, and any other leaf is replaced.
    """
    kind = _node_kind(node)
    value = node[kind]
    if kind == "T" and isinstance(live, torch.Tensor):
        with torch.no_grad():
            live.copy_(tensors[value])
        return live
    if kind == "o" and _is_stateful(live):
        plain = unflatten(value, tensors)
        try:
            live.load_state_dict(plain)
        except Exception as exc:
            raise CheckpointError(f"{path}: {type(live).__name__}.load_state_dict failed: {exc}") from exc
        return live
    if kind == "d" and isinstance(live, dict):
        for key, child in value:
            live[key] = restore_into(live.get(key, _MISSING), child, tensors, _child(path, key))
        return live
    if kind == "l" and isinstance(live, list) and len(live) == len(value):
        for i, child in enumerate(value):
            live[i] = restore_into(live[i], child, tensors, _child(path, i))
        return live
    if kind == "t" and isinstance(live, tuple) and len(live) == len(value):
        return tuple(restore_into(live[i], c, tensors, _child(path, i)) for i, c in enumerate(value))
    return unflatten(node, tensors)
