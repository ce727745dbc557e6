"""The system's zstd library through ctypes, for the one encoder setting python-zstandard lacks.

Byte planes of float exponents are best coded by Huffman-coding their bytes; zstd's fast strategy
spends most of its time hunting LZ matches that are short and rare there. zstd can be told to
search less (``targetLength``, its "acceleration" at the fast strategy) and still Huffman-code the
literals it then emits (``ZSTD_c_literalCompressionMode``), but only that experimental parameter
makes it keep Huffman coding at an acceleration above 0, and the python-zstandard binding does not
expose it (with the binding, an accelerated exponent plane is stored uncompressed:
tests/test_libzstd.py). The frames are ordinary zstd frames: any decoder reads them. Where the
library or the parameter is missing (no ``libzstd.so.1``, a zstd older than 1.4),
:func:`plane_compressor` returns None and callers use python-zstandard.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import threading
from collections.abc import Callable
from typing import TypeVar

import numpy as np

# ZSTD_cParameter values (zstd.h; stable across 1.4 and 1.5)
_LEVEL, _HASH_LOG, _TARGET_LENGTH, _CONTENT_SIZE, _LITERAL_MODE = 100, 102, 106, 200, 1002
_HUFFMAN = 1  # ZSTD_lcm_huffman / ZSTD_ps_enable: always try Huffman-coding literals

# The exponent-plane setting: level 1's fast strategy with zstd's smallest match table (64
# entries), acceleration 64, Huffman-coded literals (a higher acceleration gains 1-2% on exponent planes but
# loses most of the repeats in a tensor of repeated rows).
PLANE_SETTINGS = ((_LEVEL, 1), (_HASH_LOG, 6), (_TARGET_LENGTH, 64), (_LITERAL_MODE, _HUFFMAN), (_CONTENT_SIZE, 1))

_local = threading.local()
_C = TypeVar("_C")


def _load() -> ctypes.CDLL | None:
    """The library by its usual names first (find_library runs ldconfig or a compiler: slower)."""
    for name in ("libzstd.so.1", "libzstd.1.dylib", None):
        name = name or ctypes.util.find_library("zstd")  # only once the usual names failed
        if name:
            try:
                return ctypes.CDLL(name)
            except OSError:
                continue
    return None


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = _load()
    if lib is None:
        return None
    try:
        lib.ZSTD_versionNumber.restype = ctypes.c_uint
        if lib.ZSTD_versionNumber() < 10400:
            return None
        lib.ZSTD_createCCtx.restype = ctypes.c_void_p
        lib.ZSTD_freeCCtx.argtypes = [ctypes.c_void_p]
        lib.ZSTD_CCtx_setParameter.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
        lib.ZSTD_CCtx_setParameter.restype = ctypes.c_size_t
        size, pointer = ctypes.c_size_t, ctypes.c_void_p
        lib.ZSTD_compress2.argtypes = [pointer, pointer, size, pointer, size]
        lib.ZSTD_compress2.restype = ctypes.c_size_t
        lib.ZSTD_isError.argtypes = [ctypes.c_size_t]
        lib.ZSTD_isError.restype = ctypes.c_uint
        lib.ZSTD_getErrorName.argtypes = [ctypes.c_size_t]
        lib.ZSTD_getErrorName.restype = ctypes.c_char_p
        lib.ZSTD_createDCtx.restype = ctypes.c_void_p
        lib.ZSTD_freeDCtx.argtypes = [ctypes.c_void_p]
        lib.ZSTD_decompressDCtx.argtypes = [pointer, pointer, size, pointer, size]
        lib.ZSTD_decompressDCtx.restype = ctypes.c_size_t
    except AttributeError:
        return None
    return lib


class PlaneCompressor:
    """One thread's zstd context with :data:`PLANE_SETTINGS`, freed with the thread's locals."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._lib = lib
        self._cctx = lib.ZSTD_createCCtx()
        if not self._cctx:
            raise MemoryError("ZSTD_createCCtx failed")
        for key, value in PLANE_SETTINGS:
            if lib.ZSTD_isError(lib.ZSTD_CCtx_setParameter(self._cctx, key, value)):
                lib.ZSTD_freeCCtx(self._cctx)
                self._cctx = None
                raise ValueError(f"this zstd refuses parameter {key} = {value}")

    def compress_into(self, src: np.ndarray, dst: np.ndarray) -> int:
        """One frame of ``src`` written at the start of ``dst`` (both contiguous uint8 arrays).

        Returns:
            The frame's length, or 0 when it does not fit in ``dst``.
        """
        n = self._lib.ZSTD_compress2(self._cctx, dst.ctypes.data, dst.size, src.ctypes.data, src.size)
        return 0 if self._lib.ZSTD_isError(n) else int(n)

    def __del__(self) -> None:
        if getattr(self, "_cctx", None):
            self._lib.ZSTD_freeCCtx(self._cctx)
            self._cctx = None


class PlaneDecompressor:
    """One thread's zstd decompression context, for one-shot decodes of a whole plane's frame
    straight into the plane (no stream, no intermediate buffer)."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._lib = lib
        self._dctx = lib.ZSTD_createDCtx()
        if not self._dctx:
            raise MemoryError("ZSTD_createDCtx failed")

    def decompress_into(self, src: np.ndarray, dst: np.ndarray) -> int | str:
        """Decode the frame ``src`` holds into ``dst`` (contiguous uint8 arrays): the decoded
        length, or zstd's error message. zstd refuses a frame that needs more than ``dst`` holds
        or a window over 128 MiB, and checks the frame's checksum where it has one."""
        n = self._lib.ZSTD_decompressDCtx(self._dctx, dst.ctypes.data, dst.size, src.ctypes.data, src.size)
        if self._lib.ZSTD_isError(n):
            return str(self._lib.ZSTD_getErrorName(n).decode("ascii", "replace"))
        return int(n)

    def __del__(self) -> None:
        if getattr(self, "_dctx", None):
            self._lib.ZSTD_freeDCtx(self._dctx)
            self._dctx = None


def _per_thread(name: str, make: Callable[[ctypes.CDLL], _C]) -> _C | None:
    """This thread's context ``name``, made once with ``make``; None where the system's zstd
    cannot provide one (no library, a parameter it refuses, no memory)."""
    if not hasattr(_local, name):
        lib = _library()
        try:
            setattr(_local, name, None if lib is None else make(lib))
        except (ValueError, MemoryError):
            setattr(_local, name, None)
    context: _C | None = getattr(_local, name)
    return context


def plane_decompressor() -> PlaneDecompressor | None:
    """This thread's :class:`PlaneDecompressor`, or None where the system's zstd cannot provide one."""
    return _per_thread("decompressor", PlaneDecompressor)


def plane_compressor() -> PlaneCompressor | None:
    """This thread's :class:`PlaneCompressor`, or None where the system's zstd cannot provide one."""
    return _per_thread("compressor", PlaneCompressor)
