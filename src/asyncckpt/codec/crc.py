"""CRC32 of stored bytes: ISA-L's where the ``isal`` package is installed, zlib's otherwise.

Both compute the same CRC32 (the polynomial of zlib, gzip and PNG), so checkpoints written with
one verify with the other. ISA-L's is several times faster (``bench/crc.py``), and a save and a
load checksum every stored byte once.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

_isal: Any
try:
    from isal import isal_zlib as _isal
except ImportError:  # not installed, or no wheel for this platform: zlib's is the same function
    _isal = None

Crc32 = Callable[[Any, int], int]

crc32: Crc32 = _isal.crc32 if _isal is not None else zlib.crc32
"""``crc32(data, value=0)``: the CRC32 of ``data`` (any buffer), continuing from ``value``."""

PROVIDER = "isal" if _isal is not None else "zlib"
"""Which implementation :data:`crc32` is."""
