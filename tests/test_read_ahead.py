"""reader._ReadAhead: POSIX_FADV_WILLNEED on the wanted chunks of a local data file, a window ahead."""

from __future__ import annotations

import ctypes
import mmap
import os
import time
from types import SimpleNamespace

import numpy as np
import pytest

from asyncckpt.engine import reader

MiB = 1 << 20


def resident_bytes(path) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    size = os.path.getsize(path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as m:
        view = np.frombuffer(m, dtype=np.uint8)
        pages = (ctypes.c_ubyte * ((size + mmap.PAGESIZE - 1) // mmap.PAGESIZE))()
        assert libc.mincore(ctypes.c_void_p(view.ctypes.data), size, pages) == 0
        del view
    return sum(p & 1 for p in pages) * mmap.PAGESIZE


def cold_file(tmp_path, size: int):
    path = tmp_path / "data.bin"
    with open(path, "wb") as f:
        block = os.urandom(MiB)
        for _ in range(size // MiB):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    if resident_bytes(path) > 4 * MiB:
        os.close(fd)
        pytest.skip("this filesystem keeps the file in memory (tmpfs?): nothing to read ahead")
    return path, fd


def read_ahead_of(fd: int, size: int, chunk: int, window: int) -> reader._ReadAhead:
    chunks = [SimpleNamespace(file="d", offset=o, length=chunk) for o in range(0, size, chunk)]
    manifest = SimpleNamespace(chunks=chunks)
    return reader._ReadAhead(manifest, {"d": SimpleNamespace(fileno=lambda: fd)}, list(range(len(chunks))), window)


def settle(path, at_least: int) -> int:
    deadline = time.monotonic() + 5
    while resident_bytes(path) < at_least and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    return resident_bytes(path)


linux_only = pytest.mark.skipif(not hasattr(os, "posix_fadvise") or not os.path.exists("/proc/self"), reason="Linux")


@linux_only
def test_every_wanted_chunk_is_read_ahead_as_the_decoders_move(tmp_path):
    size, chunk = 128 * MiB, 4 * MiB
    path, fd = cold_file(tmp_path, size)
    try:
        ahead = read_ahead_of(fd, size, chunk, window=4)
        for position in range(size // chunk):
            ahead.started(position)
        assert settle(path, int(size * 0.9)) >= size * 0.9
    finally:
        os.close(fd)


@linux_only
def test_only_a_window_of_chunks_is_read_ahead_before_the_decoders_get_there(tmp_path):
    size, chunk = 128 * MiB, 4 * MiB
    path, fd = cold_file(tmp_path, size)
    try:
        read_ahead_of(fd, size, chunk, window=4)  # nothing started yet: the first chunk and 4 more
        resident = settle(path, 5 * chunk)
        assert 4 * chunk <= resident <= 8 * chunk, resident / MiB
    finally:
        os.close(fd)
