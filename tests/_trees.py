"""Comparing trees of tensors and values in tests: tensors bit for bit, everything else exactly.

A checkpoint must give back what was saved: the same bytes (so NaN payloads and -0.0 count), the
same dtypes and shapes, the same keys in the same order with the same key types, lists as lists
and tuples as tuples, ints as ints. One comparison for every test, so a test that says "the same"
means the same thing everywhere.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch


def tensor_bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's elements as raw bytes (row-major), so NaN payloads and -0.0 compare exactly."""
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, same shape, same bytes."""
    return a.dtype == b.dtype and tuple(a.shape) == tuple(b.shape) and torch.equal(tensor_bytes(a), tensor_bytes(b))


def assert_same_tree(expected: Any, actual: Any, path: str = "state", *, exact_dict_types: bool = False) -> None:
    """Fail, naming the first differing path, unless ``actual`` is ``expected`` bit for bit.

    Tensors: dtype, shape and bytes (any device: compared on the host). Numpy arrays and scalars:
    type, dtype, shape and bytes; an ``np.float64`` may come back as the Python float it subclasses
    (it is stored as a JSON number). Floats: their bit pattern. Dicts (any Mapping): keys in the
    same order with the same types; with ``exact_dict_types`` the same class too (an OrderedDict
    stays one). Lists and tuples: the same type and length. Anything else: the same type and ``==``.
    """
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), f"{path}: {type(actual).__name__} instead of a tensor"
        assert actual.dtype == expected.dtype, f"{path}: dtype {actual.dtype} != {expected.dtype}"
        assert tuple(actual.shape) == tuple(expected.shape), f"{path}: shape {actual.shape} != {expected.shape}"
        assert torch.equal(tensor_bytes(actual).cpu(), tensor_bytes(expected).cpu()), f"{path}: bytes differ"
    elif isinstance(expected, np.ndarray):
        assert type(actual) is np.ndarray, f"{path}: {type(actual).__name__} instead of ndarray"
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, path
        assert actual.tobytes() == expected.tobytes(), f"{path}: bytes differ"
    elif isinstance(expected, np.float64) and type(actual) is float:
        assert struct.pack("<d", actual) == struct.pack("<d", expected), f"{path}: {actual!r} != {expected!r}"
    elif isinstance(expected, np.generic):
        assert type(actual) is type(expected), f"{path}: {type(actual)} != {type(expected)}"
        assert actual.tobytes() == expected.tobytes(), path
    elif isinstance(expected, Mapping):
        assert isinstance(actual, Mapping), f"{path}: {type(actual).__name__} instead of a dict"
        if exact_dict_types:
            assert type(actual) is type(expected), f"{path}: {type(actual).__name__} != {type(expected).__name__}"
        assert list(actual.keys()) == list(expected.keys()), f"{path}: keys {list(actual)} != {list(expected)}"
        for (ka, va), (ke, ve) in zip(actual.items(), expected.items(), strict=True):
            assert type(ka) is type(ke), f"{path}: key {ka!r} changed type"
            assert_same_tree(ve, va, f"{path}[{ke!r}]", exact_dict_types=exact_dict_types)
    elif isinstance(expected, (list, tuple)):
        assert type(actual) is type(expected), f"{path}: {type(actual).__name__} != {type(expected).__name__}"
        assert len(actual) == len(expected), f"{path}: length {len(actual)} != {len(expected)}"
        for i, (ve, va) in enumerate(zip(expected, actual, strict=True)):
            assert_same_tree(ve, va, f"{path}[{i}]", exact_dict_types=exact_dict_types)
    elif isinstance(expected, float):
        assert type(actual) is float, f"{path}: {actual!r} is not a float"
        assert struct.pack("<d", actual) == struct.pack("<d", expected), f"{path}: {actual!r} != {expected!r}"
    else:
        assert type(actual) is type(expected), f"{path}: {type(actual)} != {type(expected)}"
        assert actual == expected, f"{path}: {actual!r} != {expected!r}"


def same_tree(expected: Any, actual: Any) -> bool:
    """:func:`assert_same_tree` as a predicate."""
    try:
        assert_same_tree(expected, actual)
    except AssertionError:
        return False
    return True


class NoMemory(torch.Tensor):
    """A wrapper subclass (as float8 or NF4 weights are): shape and dtype, no memory of its own."""

    @staticmethod
    def __new__(cls, shape: tuple[int, ...], offset: int):
        return torch.Tensor._make_wrapper_subclass(cls, shape, strides=(1,), dtype=torch.float32, storage_offset=offset)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise NotImplementedError(f"{func} on a tensor with no memory")
